"""SDXL base in a real A1111 WebUI: ours (built-in disabled, its default apply mode) against the built-in Lora (ours
disabled) in its functional mode ("use old method", the ``lora_functional`` setting): its default merge mode backs
up every patched weight, about twice the ~15 GB fp32 model, and is OOM-killed on the 24 GB test bed.

Needs ``A1111_DIR`` like test_webui_e2e.py with the test bed's SDXL files (``WITH_SDXL=1 setup.sh``):
``sdxl-random`` and the kohya files ``test_lora_sdxl`` (attention + TE1 + TE2 self-attention, 600 modules) and
``test_lora_sdxl_full`` (sd-scripts' default targets, 986 modules).

Cases: weights 1 and 0.5:1 (TE 0.5, U-Net 1); the same set twice (bypass, then merged); switching between the two
files and back; removal (the plain image afterwards, byte for byte); ``lbw=`` with the 20-value SDXL map
(``BASE IN00..IN08 M00 OUT00..OUT08``); the X/Y/Z plot's LoRA-weight axis.

The built-in has no ``lbw=``. Block weights are checked against the lora-block-weight definition (a block's weight
multiplies the delta of every layer in that block; BASE is the text encoders): the reference is the built-in
rendering a copy of the file that holds only the layers of the non-zero blocks, with each layer's ``alpha`` times
its block's weight (kohya scales a delta by alpha/rank, so a scaled alpha is a scaled delta). All-ones must give the
plain image, pixel for pixel.

Heavy: run it alone (``tests/run tests/e2e/test_sdxl_e2e.py``). Two SDXL servers, one after the other, inside
``extension_linked`` for the whole module (~17 GB each); 64x64, 2 steps, 24 generations and a 3-cell X/Y/Z sweep.
About 14 minutes on the 2-core test bed (first run: 16 passed, every comparison pixel-identical, PSNR inf).
"""
from __future__ import annotations

import base64
import io
import json
import re
import shutil
import tempfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from safetensors.torch import load_file, save_file

from webui import BUILTIN_NAME, EXTENSION_NAME, Generation, WebUI, extension_linked, psnr, same_pixels, webui_dir

pytestmark = pytest.mark.e2e

WEBUI = webui_dir()
CKPT = WEBUI / "models" / "Stable-diffusion" / "sdxl-random.safetensors"
LORA_DIR = WEBUI / "models" / "Lora"
E2E_DIR = LORA_DIR / "lora-core-e2e-sdxl"
STEPS = 2

BASE = "a cat"
L1 = "a cat <lora:test_lora_sdxl:1>"
L_TE_HALF = "a cat <lora:test_lora_sdxl:0.5:1>"
L_HALF = "a cat <lora:test_lora_sdxl:0.5>"
FULL = "a cat <lora:test_lora_sdxl_full:1>"
BLOCKS = ["BASE"] + [f"IN{i:02d}" for i in range(9)] + ["M00"] + [f"OUT{i:02d}" for i in range(9)]
TE_ONLY_WEIGHTS = {"BASE": 1.0}
MIXED_WEIGHTS = {"BASE": 1.0, "IN05": 0.5, "IN08": 1.0, "OUT00": 0.5, "OUT01": 1.0, "OUT03": 1.0, "OUT05": 0.5}


def lbw(weights: dict[str, float]) -> str:
    return ",".join(f"{weights.get(b, 0.0):g}" for b in BLOCKS)


LBW_ONES = f"a cat <lora:test_lora_sdxl:1:1:lbw={lbw(dict.fromkeys(BLOCKS, 1.0))}>"
LBW_TE_ONLY = f"a cat <lora:test_lora_sdxl:1:1:lbw={lbw(TE_ONLY_WEIGHTS)}>"
LBW_MIXED = f"a cat <lora:test_lora_sdxl_full:1:1:lbw={lbw(MIXED_WEIGHTS)}>"
REF_TE_ONLY = "a cat <lora:e2e_sdxl_te_only:1>"
REF_MIXED = "a cat <lora:e2e_sdxl_full_blocks:1>"
BUILTIN_PROMPTS = [BASE, L1, L_TE_HALF, L_HALF, FULL, REF_TE_ONLY, REF_MIXED]
XYZ_TITLE = "x/y/z plot"
WEIGHT_AXIS = "LoRA weight"


def block_of(key: str) -> str:
    if key.startswith("lora_te"):
        return "BASE"
    m = re.match(r"lora_unet_(input_blocks|output_blocks)_(\d+)_", key)
    if m:
        return f"{'IN' if m.group(1) == 'input_blocks' else 'OUT'}{int(m.group(2)):02d}"
    if key.startswith("lora_unet_middle_block_"):
        return "M00"
    raise AssertionError(f"no block for {key}")


def write_block_reference(source: Path, weights: dict[str, float], out: Path) -> None:
    """``source`` with only the layers of the blocks in ``weights``, each layer's alpha times its block weight."""
    tensors = load_file(str(source))
    kept = {}
    for key, value in tensors.items():
        w = weights.get(block_of(key), 0.0)
        if w == 0:
            continue
        kept[key] = (value.float() * w).to(value.dtype) if key.endswith(".alpha") else value
    assert kept and len(kept) < len(tensors)
    save_file(kept, str(out), metadata={"ss_network_module": "networks.lora", "ss_base_model_version": "sdxl_base_v1-0"})


@pytest.fixture(scope="module")
def workdir():
    needed = [CKPT] + [LORA_DIR / f"{n}.safetensors" for n in ("test_lora_sdxl", "test_lora_sdxl_full")]
    if not all(p.is_file() for p in needed):
        pytest.skip(f"{needed} missing (WITH_SDXL=1 ../shared/testbed/setup.sh makes them)")
    path = Path(tempfile.mkdtemp(prefix="lora-core-e2e-sdxl-"))
    E2E_DIR.mkdir(exist_ok=True)
    write_block_reference(LORA_DIR / "test_lora_sdxl.safetensors", TE_ONLY_WEIGHTS, E2E_DIR / "e2e_sdxl_te_only.safetensors")
    write_block_reference(LORA_DIR / "test_lora_sdxl_full.safetensors", MIXED_WEIGHTS,
                          E2E_DIR / "e2e_sdxl_full_blocks.safetensors")
    with extension_linked(WEBUI):  # the whole module: one SDXL server at a time on this machine
        yield path
    shutil.rmtree(path, ignore_errors=True)
    shutil.rmtree(E2E_DIR, ignore_errors=True)


def gen(server: WebUI, prompt: str) -> Generation:
    return server.txt2img(prompt, steps=STEPS)


@pytest.fixture(scope="module")
def builtin(workdir):
    server = WebUI(WEBUI, CKPT, [EXTENSION_NAME], workdir, overrides={"lora_functional": True})
    try:
        images = {p: gen(server, p) for p in BUILTIN_PROMPTS}
        images["base after"] = gen(server, BASE)
        return images
    finally:
        server.stop()


@pytest.fixture(scope="module")
def ours_server(builtin, workdir):
    server = WebUI(WEBUI, CKPT, [BUILTIN_NAME], workdir)
    yield server
    server.stop()


@pytest.fixture(scope="module")
def ours(ours_server):
    """A new set runs in bypass, the same set asked again is merged; L1 -> FULL -> L1 switches files both ways."""
    s = ours_server
    images = {"base before": gen(s, BASE)}
    images[L1] = gen(s, L1)
    images[("merged", L1)] = gen(s, L1)
    images[FULL] = gen(s, FULL)
    images[("merged", FULL)] = gen(s, FULL)
    images[("back", L1)] = gen(s, L1)
    images[L_TE_HALF] = gen(s, L_TE_HALF)
    images[("merged", L_TE_HALF)] = gen(s, L_TE_HALF)
    for p in (LBW_ONES, LBW_TE_ONLY, LBW_MIXED):
        images[p] = gen(s, p)
    images[("merged", LBW_MIXED)] = gen(s, LBW_MIXED)
    images["base after"] = gen(s, BASE)
    images["log"] = s.log_tail(400)
    return images


def test_plain_image_before_and_after_is_the_builtin_plain_image(ours, builtin):
    assert same_pixels(ours["base before"], builtin[BASE])
    assert same_pixels(ours["base after"], builtin[BASE])
    assert same_pixels(builtin["base after"], builtin[BASE])


CASES = {"1": (L1, L1), "1 merged": (("merged", L1), L1), "0.5:1": (L_TE_HALF, L_TE_HALF),
         "0.5:1 merged": (("merged", L_TE_HALF), L_TE_HALF), "full after attn": (FULL, FULL),
         "full merged": (("merged", FULL), FULL), "attn after full": (("back", L1), L1)}


@pytest.mark.parametrize("case", list(CASES))
def test_same_image_as_the_builtin(ours, builtin, case):
    mine, ref = CASES[case]
    assert not same_pixels(builtin[ref], builtin[BASE]), "the LoRA must change the image"
    value = psnr(ours[mine], builtin[ref])
    print(f"PSNR sdxl {case}: {value:.1f} dB")
    assert value >= 45, f"{case}: PSNR {value:.1f} dB against the built-in"
    assert "Lora errors" not in ours[mine].infotext, ours[mine].params.get("Lora errors")


def test_the_weights_and_files_give_different_images(builtin):
    images = [builtin[p] for p in (BASE, L1, L_TE_HALF, L_HALF, FULL)]
    for i in range(len(images)):
        for j in range(i):
            assert not same_pixels(images[i], images[j])


def test_lbw_all_ones_is_the_plain_weight(ours):
    assert same_pixels(ours[LBW_ONES], ours[L1])


@pytest.mark.parametrize("prompt,reference", [(LBW_TE_ONLY, REF_TE_ONLY), (LBW_MIXED, REF_MIXED),
                                              (("merged", LBW_MIXED), REF_MIXED)],
                         ids=["te-only", "mixed", "mixed merged"])
def test_lbw_is_the_builtin_with_those_blocks_scaled_in_the_file(ours, builtin, prompt, reference):
    assert not same_pixels(builtin[reference], builtin[BASE]) and not same_pixels(builtin[reference], builtin[L1])
    value = psnr(ours[prompt], builtin[reference])
    print(f"PSNR sdxl lbw {prompt}: {value:.1f} dB")
    assert value >= 45, f"{prompt}: PSNR {value:.1f} dB against the built-in on the block-scaled file"
    assert "Lora errors" not in ours[prompt].infotext, ours[prompt].params.get("Lora errors")


def test_no_traceback_from_our_code(ours):
    log = ours["log"]
    assert "API error" not in log and "lora_core/" not in log, log[-3000:]


def _decode(images: list[str]) -> list[np.ndarray]:
    return [np.asarray(Image.open(io.BytesIO(base64.b64decode(i.split(",", 1)[-1]))).convert("RGB")) for i in images]


def _png(pixels: np.ndarray) -> bytes:
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format="PNG")
    return out.getvalue()


@pytest.fixture(scope="module")
def xyz(ours_server, ours):
    infos = [s for s in ours_server.get("/sdapi/v1/script-info") if s["name"] == XYZ_TITLE and not s["is_img2img"]]
    axes = infos[0]["args"][0]["choices"]
    assert WEIGHT_AXIS in axes, axes
    # as test_blocks_e2e.py: x type/values/dropdown, y, z, legend, lone images, sub grids, no fixed seeds,
    # vary seeds x/y/z, margin, csv mode
    args = [axes.index(WEIGHT_AXIS), "0, 0.5, 1", [], 0, "", [], 0, "", [], True, True, False, False,
            False, False, False, 0, False]
    payload = {"prompt": L1, "negative_prompt": "", "width": 64, "height": 64, "steps": STEPS, "seed": 1,
               "cfg_scale": 7.0, "sampler_name": "Euler", "scheduler": "Automatic", "batch_size": 1, "n_iter": 1,
               "save_images": False, "send_images": True, "script_name": XYZ_TITLE, "script_args": args}
    res = ours_server.post("/sdapi/v1/txt2img", payload)
    cells = [i for i in _decode(res["images"]) if i.shape == (64, 64, 3)]
    return cells, json.loads(res["info"])


def test_xyz_weight_axis(xyz, ours, builtin):
    """Cells 0, 0.5 and 1: the plain image exactly, the built-in's <lora:test_lora_sdxl:0.5>, and ours at 1 in
    bypass exactly (at this size on the CPU a sweep does not re-merge per cell)."""
    cells, info = xyz
    assert len(cells) == 3 and "LoRA weight" in info["infotexts"][0]
    assert np.array_equal(cells[0], ours["base before"].pixels.astype(np.uint8))
    assert np.array_equal(cells[2], ours[L1].pixels.astype(np.uint8))
    value = psnr(Generation(_png(cells[1]), {}), builtin[L_HALF])
    print(f"PSNR sdxl xyz 0.5: {value:.1f} dB")
    assert value >= 45, f"X/Y/Z cell 0.5: PSNR {value:.1f} dB against the built-in's <lora:test_lora_sdxl:0.5>"


def test_inspect_names_sdxl(ours_server, ours):
    info = ours_server.get("/lora-core/v1/inspect?name=test_lora_sdxl_full")
    assert info["family"] == "sdxl" and info["model_family"] == "sdxl"
    assert info["layers"]["total"] == 986
