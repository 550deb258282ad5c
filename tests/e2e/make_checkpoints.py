"""Random-weight checkpoints of the other model families the built-in Lora handles, built from the WebUI's own model
configs (the same recipe as ../shared/testbed/tools/make_random_checkpoints.py, which makes sd15-random and
sdxl-random): the LDM is instantiated from the config A1111 would pick for it, its zero-initialised convolutions and
linears inside the U-Net are re-drawn (else the U-Net's output is constant), and the state dict is written in fp16
(the e2e servers load it with --no-half, so it runs in fp32).

Run it with the WebUI's venv, from anywhere:

    A1111_DIR=$TESTBED/webui $TESTBED/webui/venv/bin/python tests/e2e/make_checkpoints.py sd2|sd2-768v|sd15-inpaint|sd15-pix2pix [out]

| kind           | config (A1111)                        | file (models/Stable-diffusion/)              |
|----------------|---------------------------------------|----------------------------------------------|
| `sd2`          | v2-inference.yaml (eps, 512)          | sd2-random.safetensors + sd2-random.yaml     |
| `sd2-768v`     | v2-inference-v.yaml (v-prediction)    | sd2-768v-random.safetensors + .yaml          |
| `sd15-inpaint` | configs/v1-inpainting-inference.yaml  | sd15-inpaint-random.safetensors (conv_in 9)  |
| `sd15-pix2pix` | configs/instruct-pix2pix.yaml         | sd15-pix2pix-random.safetensors (conv_in 8)  |

SD2 512 and 768-v have the same architecture; A1111 tells them apart by running the U-Net on a test input
(``is_using_v_parameterization_for_sd2``), which on random weights is a coin toss. The SD2 files therefore get the
config next to them (``<name>.yaml``, which A1111 reads before guessing), and ``sd2-768v`` is the ``sd2`` weights
under a second name (a hard link when the ``sd2`` file exists: no second 2.6 GB file) with the v config.
Inpainting and pix2pix are recognised by the shape of ``conv_in`` (9 and 8 input channels), as with real files.

Measured on the 2-core test bed: sd2 29 s and 8.2 GB peak RAM (ViT-H's vision tower is built, then dropped),
sd15-inpaint 20 s, sd15-pix2pix 14 s; the files are 2.4 GiB (SD2) and 2.0 GiB (SD1.5), EMA weights left out.
"""
from __future__ import annotations

import os
import shutil
import sys
import time
from pathlib import Path

KINDS = {
    # kind: (config path relative to the WebUI, file name, write the config next to the file)
    "sd2": ("repositories/stable-diffusion-stability-ai/configs/stable-diffusion/v2-inference.yaml",
            "sd2-random.safetensors", True),
    "sd2-768v": ("repositories/stable-diffusion-stability-ai/configs/stable-diffusion/v2-inference-v.yaml",
                 "sd2-768v-random.safetensors", True),
    "sd15-inpaint": ("configs/v1-inpainting-inference.yaml", "sd15-inpaint-random.safetensors", False),
    "sd15-pix2pix": ("configs/instruct-pix2pix.yaml", "sd15-pix2pix-random.safetensors", False),
}
SEED = 1234


def webui_dir() -> Path:
    a1111 = os.environ.get("A1111_DIR")
    if not a1111:
        sys.exit("set A1111_DIR to the WebUI checkout (the test bed's $TESTBED/webui)")
    return Path(a1111)


def _offline(webui: Path) -> None:
    os.environ.setdefault("HF_HOME", str(webui.parent / "hf_home"))
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def _no_downloads() -> None:
    """The text encoders' constructors fetch pretrained weights: build them from their configs instead."""
    import open_clip
    from transformers import CLIPTextConfig, CLIPTextModel

    create = open_clip.create_model_and_transforms

    def no_pretrained(*args, pretrained=None, **kwargs):
        return create(*args, pretrained=None, **kwargs)

    open_clip.create_model_and_transforms = no_pretrained
    CLIPTextModel.from_pretrained = staticmethod(lambda name, *a, **k: CLIPTextModel(CLIPTextConfig.from_pretrained(name)))


def build(kind: str, out: Path, webui: Path) -> None:
    config_rel, _, config_beside = KINDS[kind]
    config = webui / config_rel
    if kind == "sd2-768v":
        twin = out.with_name(KINDS["sd2"][1])
        if twin.is_file() and not out.exists():
            os.link(twin, out)  # the same weights; only the config (v-prediction) differs
            shutil.copyfile(config, out.with_suffix(".yaml"))
            print(f"{out}: hard link to {twin.name}, config {config.name}")
            return
    _offline(webui)
    sys.path.insert(0, str(webui / "repositories" / "stable-diffusion-stability-ai"))
    sys.path.insert(0, str(webui))  # instruct-pix2pix's model class is the WebUI's own (modules.models...)
    import torch
    from omegaconf import OmegaConf
    from safetensors.torch import save_file
    from ldm.util import instantiate_from_config

    _no_downloads()
    torch.manual_seed(SEED)
    cfg = OmegaConf.load(config)
    cfg.model.params.unet_config.params.use_checkpoint = False
    cfg.model.params.use_ema = False  # a pruned file, like the ones users download (no model_ema.* copy)
    t0 = time.time()
    model = instantiate_from_config(cfg.model).eval()
    redrawn = 0
    with torch.no_grad():
        for m in model.model.diffusion_model.modules():
            if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear)) and torch.count_nonzero(m.weight) == 0:
                w = torch.empty_like(m.weight, dtype=torch.float32)
                torch.nn.init.kaiming_uniform_(w, a=5 ** 0.5)
                m.weight.copy_(w)
                redrawn += 1
    state = {k: (v.detach().half() if v.is_floating_point() else v.detach()).contiguous()
             for k, v in model.state_dict().items()}
    del model
    tmp = out.with_name(out.name + ".part")
    save_file(state, str(tmp), metadata={"format": "pt", "lora-core-e2e": f"random {kind} weights, seed {SEED}, "
                                                                           f"config {config.name}"})
    tmp.replace(out)
    if config_beside:
        shutil.copyfile(config, out.with_suffix(".yaml"))
    conv_in = tuple(state["model.diffusion_model.input_blocks.0.0.weight"].shape)
    print(f"{out}: {len(state)} tensors, conv_in {conv_in}, {redrawn} zero layers re-drawn, "
          f"{out.stat().st_size / 2 ** 30:.2f} GiB, {time.time() - t0:.0f} s")


def main(argv: list[str]) -> int:
    if not argv or argv[0] not in KINDS:
        print(f"usage: make_checkpoints.py {'|'.join(KINDS)} [out.safetensors]", file=sys.stderr)
        return 2
    webui = webui_dir()
    out = Path(argv[1]) if len(argv) > 1 else webui / "models" / "Stable-diffusion" / KINDS[argv[0]][1]
    build(argv[0], out, webui)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
