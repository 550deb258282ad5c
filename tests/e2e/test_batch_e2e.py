"""Each image of a batch its own LoRAs, in a real WebUI (issue 19).

A minimal always-on script sets per-image prompts in ``process()`` the way sd-dynamic-prompts does (it rewrites
``p.all_prompts``, and ``p.all_hr_prompts`` with hires fix). It lives in a temporary extension folder that the test
links into the WebUI's extensions folder while it holds the e2e lock, and removes afterwards.

Each image of a batch of 2 (seeds s and s+1) must equal the single generation of its own prompt at its own seed.
"""
from __future__ import annotations

import json
import re
import shutil
import tempfile
import textwrap
from pathlib import Path

import pytest

from webui import BUILTIN_NAME, Generation, WebUI, checkpoint, helper_extension, psnr, same_pixels, webui_dir

pytestmark = pytest.mark.e2e

WEBUI = webui_dir()
CKPT = checkpoint(WEBUI)
LORA_DIR = WEBUI / "models" / "Lora"
HELPER = "lora-core-e2e-per-image-prompts"
TITLE = "lora-core e2e per-image prompts"
SEED = 11

BASE = "a cat"
LORA1 = "a cat <lora:test_lora:1>"
LOHA = "a cat <lora:test_loha:1>"
HALF = "a cat <lora:test_lora:0.5>"
PAIRS = {"lora_and_none": (LORA1, BASE), "two_loras": (LORA1, LOHA), "two_weights": (LORA1, HALF),
         "none_first": (BASE, LORA1)}

SCRIPT = textwrap.dedent(f'''
    """Test helper of sd-webui-lora-core's e2e suite: per-image prompts set in process(), as sd-dynamic-prompts does."""
    import json

    import gradio as gr

    from modules import scripts


    class PerImagePrompts(scripts.Script):
        def title(self):
            return "{TITLE}"

        def show(self, is_img2img):
            return scripts.AlwaysVisible

        def ui(self, is_img2img):
            return [gr.Textbox(visible=False)]

        def process(self, p, prompts_json=""):
            if not prompts_json:
                return
            prompts = json.loads(prompts_json)
            p.all_prompts = [prompts[i % len(prompts)] for i in range(len(p.all_prompts))]
            if getattr(p, "enable_hr", False):
                p.all_hr_prompts = list(p.all_prompts)
''')


@pytest.fixture(scope="module")
def server():
    if not CKPT.is_file() or not (LORA_DIR / "test_lora.safetensors").is_file():
        pytest.skip(f"{CKPT} or {LORA_DIR}/test_lora.safetensors is missing (../shared/testbed/setup.sh makes them)")
    work = Path(tempfile.mkdtemp(prefix="lora-core-e2e-batch-"))
    try:
        with helper_extension(WEBUI, HELPER, {"per_image_prompts.py": SCRIPT}):
            ui = WebUI(WEBUI, CKPT, [BUILTIN_NAME], work)
            try:
                yield ui
            finally:
                ui.stop()
    finally:
        shutil.rmtree(work, ignore_errors=True)


def batch(ui: WebUI, prompts: list[str], **extra) -> list[Generation]:
    images, info = ui.txt2img_all({"prompt": prompts[0], "batch_size": len(prompts), "n_iter": 1, "seed": SEED,
                                   "alwayson_scripts": {TITLE: {"args": [json.dumps(prompts)]}}, **extra})
    assert info["all_prompts"] == prompts  # the helper rewrote them
    return [Generation(g.png, {**g.info, "infotexts": [info["infotexts"][i]]}) for i, g in enumerate(images)]


def single(ui: WebUI, prompt: str, seed: int, **extra) -> Generation:
    return ui.txt2img(prompt, seed=seed, **extra)


def hashes(g: Generation) -> str | None:
    m = re.search(r'Lora hashes: "([^"]*)"', g.infotext)
    return m.group(1) if m else None


def check_matches(got: list[Generation], want: list[Generation]) -> list[str]:
    """Each image equals its single generation (PSNR >= 45 dB, or the same pixels); returns which held."""
    held = []
    for i, (g, w) in enumerate(zip(got, want)):
        same = same_pixels(g, w)
        assert same or psnr(g, w) >= 45, (i, psnr(g, w))
        assert hashes(g) == hashes(w), (i, g.infotext, w.infotext)  # that image's LoRAs and hashes
        held.append("identical" if same else f"PSNR {psnr(g, w):.1f}")
    return held


@pytest.mark.parametrize("case", list(PAIRS))
def test_each_image_equals_its_single_generation(server, case):
    prompts = list(PAIRS[case])
    got = batch(server, prompts)
    want = [single(server, p, SEED + i) for i, p in enumerate(prompts)]
    assert not same_pixels(want[0], want[1])
    print(case, check_matches(got, want))


def test_without_batch_cond_uncond(server):
    """A1111 splits the UNet calls into chunks of batch size: the rows still find their images."""
    prompts = [LORA1, BASE]
    settings = {"override_settings": {"batch_cond_uncond": False}, "override_settings_restore_afterwards": True}
    got = batch(server, prompts, **settings)
    want = [single(server, p, SEED + i, **settings) for i, p in enumerate(prompts)]
    print("batch_cond_uncond off", check_matches(got, want))


def test_hires_fix(server):
    prompts = [LORA1, BASE]
    hires = {"enable_hr": True, "hr_scale": 1.5, "hr_upscaler": "Latent", "hr_second_pass_steps": 2,
             "denoising_strength": 0.5}
    got = batch(server, prompts, **hires)
    want = [single(server, p, SEED + i, **hires) for i, p in enumerate(prompts)]
    print("hires", check_matches(got, want))


def test_scope_subprompt_acts_on_its_subprompt_only(server):
    whole = single(server, "a castle AND a dragon <lora:test_lora:1>", SEED)
    scoped = single(server, "a castle AND a dragon <lora:test_lora:1:scope=subprompt>", SEED)
    plain = single(server, "a castle AND a dragon", SEED)
    assert "Lora hashes" in scoped.infotext and "Lora errors" not in scoped.infotext
    assert not same_pixels(scoped, plain) and not same_pixels(scoped, whole)
