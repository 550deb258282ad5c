"""End to end in a real A1111 WebUI: our extension against the built-in Lora, through /sdapi/v1/txt2img.

Needs ``A1111_DIR``: a WebUI v1.10.x checkout with its venv (``venv/``), a random-weight SD1.5 checkpoint in
``models/Stable-diffusion`` (``A1111_CKPT``, default ``sd15-random.safetensors``) and the test bed's LoRA files
in ``models/Lora`` (``test_lora``); ``../shared/testbed/`` builds all of that offline. The built-in Lora runs first
(our extension disabled) and its images are the reference; then our extension runs with the built-in disabled.
"""
from __future__ import annotations

import re
import shutil
import struct
import tempfile
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from webui import (BUILTIN_NAME, EXTENSION_NAME, ROOT, Generation, WebUI, checkpoint, extension_linked, psnr,
                   same_pixels, webui_dir)

pytestmark = pytest.mark.e2e

WEBUI = webui_dir()
CKPT = checkpoint(WEBUI)
LORA_DIR = WEBUI / "models" / "Lora"
E2E_DIR = LORA_DIR / "lora-core-e2e"

BASE = "a cat"
NO_LORA = "a cat <lora:e2e_no_such_lora:1>"  # the same prompt text once the tag is removed, nothing applied
LORA1 = "a cat <lora:test_lora:1>"
LORA0 = "a cat <lora:test_lora:0>"
LOCON = "a cat <lora:e2e_locon:0.8>"
STACK = "a cat <lora:test_lora:0.7:0.3> <lora:e2e_locon:-0.5:1>"
LOHA = "a cat <lora:test_loha:1>"
LOKR = "a cat <lora:test_lokr:1>"
DORA = "a cat <lora:e2e_dora:0.8>"
COMPARED = [LORA1, LOCON, STACK, LOHA, LOKR, DORA]
STEADY = [LORA1, STACK, LOHA, DORA]  # asked twice in a row: bypass, then merged
RANK32_TE_NAME = "e2e_rank32_te"
RANK32_TE = f"a cat <lora:{RANK32_TE_NAME}:0.8>"
LBW = {name: f"a cat <lora:test_lora:1:1:lbw={name}>" for name in ("ALL", "NONE", "MIDD")}
BAD = {
    "corrupt": ("a cat <lora:e2e_corrupt:1>", "e2e_corrupt"),
    "unknown": ("a cat <lora:e2e_no_such_lora:1>", "e2e_no_such_lora"),
    "sdxl_on_sd15": ("a cat <lora:e2e_sdxl:1>", "SDXL"),
    "malformed": ("a cat <lora:test_lora:abc>", "abc"),
}


def _checkpoint_shapes(path: Path) -> dict[str, list[int]]:
    with open(path, "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        header = json.loads(f.read(n))
    return {k: v["shape"] for k, v in header.items() if k != "__metadata__"}


def _locon_pairs() -> dict[str, str]:
    """kohya (diffusers-style) SD1 names -> checkpoint keys, written from SPEC §3 for a LoCon on convs + attention."""
    pairs = {"lora_unet_conv_in": "model.diffusion_model.input_blocks.0.0",
             "lora_unet_mid_block_resnets_0_conv1": "model.diffusion_model.middle_block.0.in_layers.2",
             "lora_te_text_model_encoder_layers_3_mlp_fc1": "cond_stage_model.transformer.text_model.encoder.layers.3.mlp.fc1"}
    for i in range(4):
        for j in range(2):
            pairs[f"lora_unet_down_blocks_{i}_resnets_{j}_conv1"] = f"model.diffusion_model.input_blocks.{1 + 3 * i + j}.0.in_layers.2"
        for j in range(3):
            pairs[f"lora_unet_up_blocks_{i}_resnets_{j}_conv2"] = f"model.diffusion_model.output_blocks.{3 * i + j}.0.out_layers.3"
    for i in range(3):
        pairs[f"lora_unet_down_blocks_{i}_downsamplers_0_conv"] = f"model.diffusion_model.input_blocks.{3 + 3 * i}.0.op"
        pairs[f"lora_unet_up_blocks_{i}_upsamplers_0_conv"] = f"model.diffusion_model.output_blocks.{2 + 3 * i}.{1 if i == 0 else 2}.conv"
        pairs[f"lora_unet_down_blocks_{i}_attentions_0_proj_in"] = f"model.diffusion_model.input_blocks.{1 + 3 * i}.1.proj_in"
    return pairs


@pytest.fixture(scope="module")
def lora_files():
    if not CKPT.is_file() or not (LORA_DIR / "test_lora.safetensors").is_file():
        pytest.skip(f"{CKPT} or {LORA_DIR}/test_lora.safetensors is missing (../shared/testbed/setup.sh makes them)")
    shapes = _checkpoint_shapes(CKPT)
    E2E_DIR.mkdir(exist_ok=True)
    gen = torch.Generator().manual_seed(7)
    locon = {}
    for name, key in _locon_pairs().items():
        out_dim, in_dim, *kernel = shapes[key + ".weight"]
        r = 4
        locon[f"{name}.lora_down.weight"] = (torch.randn(r, in_dim, *kernel, generator=gen)
                                             / (in_dim * max(1, len(kernel) and kernel[0] * kernel[1])) ** 0.5).half()
        up_shape = (out_dim, r, 1, 1) if kernel else (out_dim, r)
        locon[f"{name}.lora_up.weight"] = (torch.randn(*up_shape, generator=gen) * 0.5).half()
        locon[f"{name}.alpha"] = torch.tensor(2.0).half()
    save_file(locon, str(E2E_DIR / "e2e_locon.safetensors"),
              metadata={"ss_network_module": "networks.lora", "ss_base_model_version": "sd_v1"})
    _write_dora(locon, E2E_DIR / "e2e_dora.safetensors", gen)
    data = (LORA_DIR / "test_lora.safetensors").read_bytes()
    (E2E_DIR / "e2e_corrupt.safetensors").write_bytes(data[: len(data) // 3])
    save_file({"lora_te2_text_model_encoder_layers_0_mlp_fc1.lora_down.weight": torch.zeros(4, 1280).half(),
               "lora_te2_text_model_encoder_layers_0_mlp_fc1.lora_up.weight": torch.zeros(5120, 4).half(),
               "lora_unet_input_blocks_4_1_proj_in.lora_down.weight": torch.zeros(4, 640).half(),
               "lora_unet_input_blocks_4_1_proj_in.lora_up.weight": torch.zeros(640, 4).half()},
              str(E2E_DIR / "e2e_sdxl.safetensors"), metadata={"ss_base_model_version": "sdxl_base_v1-0"})
    _write_rank32_te_lora(E2E_DIR / f"{RANK32_TE_NAME}.safetensors")
    with extension_linked(WEBUI):
        yield
    shutil.rmtree(E2E_DIR, ignore_errors=True)


def _write_dora(locon: dict, path: Path, gen: torch.Generator) -> None:
    """The LoCon's layers with a kohya DoRA magnitude (``dora_scale`` (1, in, ...), one per input column, as the
    built-in reads it): the base weight's column norms times 0.8-1.2, so the layers are rescaled, not wrecked."""
    from safetensors import safe_open

    dora = dict(locon)
    pairs = _locon_pairs()
    with safe_open(str(CKPT), "pt") as f:
        for name, key in pairs.items():
            w = f.get_tensor(key + ".weight").float()
            norms = w.transpose(0, 1).reshape(w.shape[1], -1).norm(dim=1)
            factor = 0.8 + 0.4 * torch.rand(w.shape[1], generator=gen)
            dora[f"{name}.dora_scale"] = (norms * factor).reshape(1, w.shape[1], *[1] * (w.dim() - 2)).half()
    save_file(dora, str(path), metadata={"ss_network_module": "networks.lora", "ss_base_model_version": "sd_v1"})


def _write_rank32_te_lora(path: Path) -> None:
    """The text-encoder half of the WebUI bench's random rank-32 LoRA with seed 23: the strongest text-encoder
    LoRA of the suite. With A1111's "Original" emphasis its cond at 0.8 had a float32 mean of exactly 0.0 under
    our extension and the sampler raised a NansException (0/0 in A1111's emphasis rescale, see ``WebUI``'s
    settings); the servers now run with "No norm" and the test checks the two images agree."""
    import sys

    sys.path.insert(0, str(ROOT / "bench"))
    from bench_webui import write_lora
    from lora_core.tools.checkpoint import CheckpointReader
    from lora_core.tools.extract import extract_targets

    with CheckpointReader(CKPT) as reader:
        targets = {t: n for t, n in extract_targets(reader.index, conv=False).items() if n.startswith("lora_te_")}
        write_lora(reader, targets, path, rank=32, seed=23)


@pytest.fixture(scope="module")
def workdir():
    """Logs and settings files of the servers. Not under pytest's tmp_path: pytest prunes old base temp
    folders when other test runs start, which would pull a running server's settings file away."""
    path = Path(tempfile.mkdtemp(prefix="lora-core-e2e-"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="module")
def builtin(lora_files, workdir):
    """The built-in Lora's images (our extension disabled), in its default merge mode (it backs up every patchable
    weight: ~4.3 GB more for SD1.5); the server is stopped before ours starts."""
    server = WebUI(WEBUI, CKPT, [EXTENSION_NAME], workdir)
    try:
        return {p: server.txt2img(p) for p in [BASE, NO_LORA, LORA0, *COMPARED, RANK32_TE]}
    finally:
        server.stop()


@pytest.fixture(scope="module")
def ours(lora_files, builtin, workdir):
    server = WebUI(WEBUI, CKPT, [BUILTIN_NAME], workdir)
    yield server
    server.stop()


@pytest.fixture(scope="module")
def ours_images(ours):
    """Our images, in an order that also proves restore: base first, LoRAs, base again. Each prompt differs from
    the one before, so the automatic mode applies it in bypass; the ones asked twice in a row are merged the
    second time (a steady set)."""
    images = {"base_before": ours.txt2img(BASE)}
    for p in [LORA1, LORA0, *COMPARED[1:], *LBW.values()]:
        images[p] = ours.txt2img(p)
        if p in STEADY:
            images[f"steady {p}"] = ours.txt2img(p)
    images["base_after"] = ours.txt2img(BASE)
    return images


def hashes(g: Generation) -> str | None:
    m = re.search(r'Lora hashes: "([^"]*)"', g.infotext)
    return m.group(1) if m else None


def test_lora_changes_the_image(ours_images):
    assert psnr(ours_images[LORA1], ours_images["base_before"]) < 40


def test_dora_magnitude_is_applied_by_both(ours_images, builtin):
    """The DoRA file is the LoCon plus ``dora_scale``: both systems give another image than the LoCon's (so the
    comparison with the built-in above is a comparison of DoRA, which ours runs in bypass without a full delta)."""
    assert psnr(ours_images[DORA], ours_images[LOCON]) < 40
    assert psnr(builtin[DORA], builtin[LOCON]) < 40


def test_zero_weight_is_the_no_lora_image(ours_images, builtin):
    assert same_pixels(ours_images[LORA0], ours_images["base_before"])
    assert same_pixels(builtin[NO_LORA], builtin[BASE]) and same_pixels(builtin[LORA0], builtin[BASE])


def test_without_the_lora_afterwards_is_the_plain_image(ours_images, builtin):
    assert same_pixels(ours_images["base_before"], builtin[BASE])
    assert same_pixels(ours_images["base_after"], builtin[BASE])


@pytest.mark.parametrize("prompt", COMPARED)
def test_same_image_as_the_builtin(ours_images, builtin, prompt):
    assert not same_pixels(builtin[prompt], builtin[BASE]), "the reference LoRA must change the image"
    value = psnr(ours_images[prompt], builtin[prompt])
    assert value >= 45, f"{prompt}: PSNR {value:.1f} dB against the built-in"


@pytest.mark.parametrize("prompt", STEADY)
def test_steady_set_merged_is_the_same_image_as_the_builtin(ours_images, builtin, prompt):
    value = psnr(ours_images[f"steady {prompt}"], builtin[prompt])
    assert value >= 45, f"{prompt}, second time: PSNR {value:.1f} dB against the built-in"


def test_block_weights_in_the_webui(ours_images):
    """test_lora trains attention layers only, which the 17-form ALL keeps (BASE too): ALL = no lbw;
    NONE (all zeros, BASE too) = no LoRA; MIDD keeps some blocks only: a third image."""
    assert same_pixels(ours_images[LBW["ALL"]], ours_images[LORA1])
    assert same_pixels(ours_images[LBW["NONE"]], ours_images["base_before"])
    midd = ours_images[LBW["MIDD"]]
    assert not same_pixels(midd, ours_images[LORA1]) and not same_pixels(midd, ours_images["base_before"])
    assert "Lora errors" not in midd.infotext


@pytest.mark.parametrize("prompt", [LORA1, STACK])
def test_lora_hashes_infotext_equals_the_builtin(ours_images, builtin, prompt):
    assert hashes(builtin[prompt]) is not None
    assert hashes(ours_images[prompt]) == hashes(builtin[prompt])


@pytest.mark.parametrize("apply_mode", ["bypass", "merged"])
def test_rank32_text_encoder_lora_gives_the_builtin_image(ours, ours_images, builtin, apply_mode):
    """A strong text-encoder LoRA (see _write_rank32_te_lora) in each mode. A1111 caches the cond by prompt text
    and networks across requests, so the same prompt in the second mode would reuse the first mode's cond: each
    mode gets its own spelling (an extra space, which tokenizes the same) so its text encoder really runs."""
    prompt = RANK32_TE if apply_mode == "bypass" else RANK32_TE.replace(" <", "  <")
    g = ours.txt2img(prompt, override_settings={"lora_core_apply_mode": apply_mode})
    value = psnr(g, builtin[RANK32_TE])
    assert value >= 45, f"PSNR {value:.1f} dB against the built-in"


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_gives_image_and_error_and_leaves_model_intact(ours, ours_images, builtin, case):
    prompt, expected = BAD[case]
    g = ours.txt2img(prompt)
    assert g.pixels.shape == (64, 64, 3), "an image comes back"
    errors = g.params.get("Lora errors", "")
    assert expected in errors, f"{case}: Lora errors = {errors!r}"
    assert "Lora errors" in g.infotext
    assert same_pixels(ours.txt2img(BASE), builtin[BASE])


def test_api_lists_refreshes_and_inspects(ours):
    names = {x["name"] for x in ours.get("/sdapi/v1/loras")}
    assert {"test_lora", "e2e_locon"} <= names
    ours.post("/sdapi/v1/refresh-loras")
    info = ours.get("/lora-core/v1/inspect?name=test_lora")
    assert info["model_family"] == "sd1" and info["family"] == "sd1"
    assert info["algorithms"] == {"lora": 264} and info["layers"] == {"total": 264, "te": 72, "unet": 192}
    assert info["keys"]["used"] == info["keys"]["total"] == 792
    assert info["shorthash"] == "9e7c5d9b7e76" or len(info["shorthash"]) == 12
