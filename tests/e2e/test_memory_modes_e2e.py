"""The real WebUI under the memory and precision flags users run with (issue #17): ``--lowvram``, ``--medvram`` and
FP8 weight storage (Settings > Optimizations > FP8 weight: Linear/Conv2d weights in float8_e4m3fn, computed under
autocast, bf16 on the CPU). Under each, our images equal the built-in's under the same flags, in bypass (a new
set) and merged (the same set again), and the plain image after removing the LoRAs is the plain image, byte for
byte.

On the CPU test bed ``--lowvram``/``--medvram`` install A1111's module-moving hooks (send_me_to_gpu on each UNet
block, the text encoder, the VAE), with the CPU as the "GPU": the code paths run, the copies do not.

FP8: the built-in's default (merge) mode writes ``W0 + dW`` rounded to float8, which rounds much of a LoRA away
(on this test bed its test_lora image was 37 dB from its own functional mode, and so from ours); ours keeps float8
layers in bypass in either mode and so computes what the built-in's functional mode computes (Settings: "Lora: use
old method that takes longer when you have multiple Loras active..."): the built-in runs in that mode here. Outside
FP8 its functional mode fails on the test bed's fp16 files (HTTP 500, "expected m1 and m2 to have the same dtype,
but got: float != c10::Half"), so the other flag sets compare with its default mode.
"""
from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import pytest

from webui import BUILTIN_NAME, EXTENSION_NAME, WebUI, checkpoint, extension_linked, psnr, same_pixels, webui_dir

pytestmark = pytest.mark.e2e

WEBUI = webui_dir()
CKPT = checkpoint(WEBUI)
LORA_DIR = WEBUI / "models" / "Lora"

BASE = "a cat"
PROMPTS = ["a cat <lora:test_lora:1>", "a cat <lora:test_loha:1>", "a cat <lora:test_lora:0.7:0.3> <lora:test_lokr:-0.5>"]
CONFIGS = {
    "lowvram": {"args": ["--lowvram"], "settings": {}},
    "medvram": {"args": ["--medvram"], "settings": {}},
    "fp8": {"args": [], "settings": {"fp8_storage": "Enable"}, "builtin": {"lora_functional": True}},
}


@pytest.fixture(scope="module")
def workdir():
    if not CKPT.is_file() or not all((LORA_DIR / f"{n}.safetensors").is_file() for n in ("test_lora", "test_loha",
                                                                                          "test_lokr")):
        pytest.skip(f"{CKPT} or the test bed's LoRA files are missing (../shared/testbed/setup.sh makes them)")
    path = Path(tempfile.mkdtemp(prefix="lora-core-e2e-mem-"))
    with extension_linked(WEBUI):
        yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="module", params=list(CONFIGS))
def run(request, workdir):
    """Both systems' images under one configuration; the servers run one after the other."""
    config = CONFIGS[request.param]
    images: dict[str, object] = {"config": request.param}
    server = WebUI(WEBUI, CKPT, [EXTENSION_NAME], workdir, extra_args=config["args"],
                   overrides={**config["settings"], **config.get("builtin", {})})
    try:
        images["builtin base"] = server.txt2img(BASE)
        for p in PROMPTS:
            images[f"builtin {p}"] = server.txt2img(p)
    finally:
        server.stop()
    server = WebUI(WEBUI, CKPT, [BUILTIN_NAME], workdir, extra_args=config["args"], overrides=config["settings"])
    try:
        images["base before"] = server.txt2img(BASE)
        for p in PROMPTS:
            images[f"bypass {p}"] = server.txt2img(p)  # a new set: bypass
            images[f"merged {p}"] = server.txt2img(p)  # the same set again: merged
        images["base after"] = server.txt2img(BASE)
        images["log"] = server.log_tail(400)
    finally:
        server.stop()
    return images


def test_plain_image_before_and_after_is_the_builtin_plain_image(run):
    assert same_pixels(run["base before"], run["builtin base"]), run["config"]
    assert same_pixels(run["base after"], run["builtin base"]), run["config"]
    log = run["log"]  # (a Traceback about the extension's git remote at start-up is the WebUI's, harmless)
    assert "API error" not in log and "lora_core/" not in log, log[-3000:]


@pytest.mark.parametrize("mode", ["bypass", "merged"])
@pytest.mark.parametrize("prompt", PROMPTS)
def test_same_image_as_the_builtin_under_the_same_flags(run, prompt, mode):
    """45 dB against the built-in; 43 for the LoHa under FP8 storage, which the CPU computes in bf16: there the two
    systems' bf16 roundings of a LoHa differ by more (44.0 dB; 44.4 with a dense delta before the factored forms),
    and against a float32 oracle ours is no further off than the built-in's dense recipe
    (``tests/test_memory.py::test_fp8_storage_loha_is_as_close_to_float32_as_the_dense_recipe``)."""
    reference = run[f"builtin {prompt}"]
    assert not same_pixels(reference, run["builtin base"]), "the LoRA must change the image"
    value = psnr(run[f"{mode} {prompt}"], reference)
    least = 43 if run["config"] == "fp8" and "test_loha" in prompt else 45
    assert value >= least, f"{run['config']}, {mode}, {prompt}: PSNR {value:.1f} dB against the built-in"
    assert "Lora errors" not in run[f"{mode} {prompt}"].infotext
