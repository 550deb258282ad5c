"""Write the golden name lists of A1111 v1.10.1 to ``tests/data/a1111_{sd15,sd2,sdxl}_{layers,modules}.txt``.

Run it with the Python of a real WebUI checkout, which has ldm, sgm, transformers and open_clip
at the versions A1111 pins::

    /path/to/webui/venv/bin/python tests/tools/dump_reference_layers.py --webui /path/to/webui

What it builds, for each family, is the part of the loaded model that LoRA touches: the UNet and
the text encoders, from the same YAML configs the WebUI loads (``configs/v1-inference.yaml``,
``v2-inference.yaml`` of stable-diffusion-stability-ai, ``sd_xl_base.yaml`` of generative-models),
with the real ldm/sgm classes, on the meta device (no weights, no RAM). The only stand-ins are the
two hub downloads the encoders would make (``CLIPTextModel.from_pretrained`` and
``open_clip.create_model_and_transforms``): they are replaced by the same architectures built from
their configs. After that it rewires the modules the way ``modules/sd_hijack.py`` does when a
checkpoint is loaded:

* each text encoder's token embedding is wrapped (``EmbeddingsWithFixes``: ``...token_embedding.wrapped``);
* SD1/SD2: ``cond_stage_model`` is wrapped (``FrozenCLIPEmbedderWithCustomWords`` /
  ``FrozenOpenCLIPEmbedderWithCustomWords``): ``cond_stage_model.wrapped....``;
* SDXL: every text embedder in ``conditioner.embedders`` is wrapped in place
  (``conditioner.embedders.0.wrapped.transformer...``, ``conditioner.embedders.1.wrapped.model...``),
  ``conditioner.wrapped`` is an empty module (``sd_models_xl.extend_sdxl``) and
  ``cond_stage_model`` is the conditioner itself (so it adds no new names).

``*_layers.txt`` has a line ``name<TAB>TypeName`` for every module that is an instance of one of the
layer types the built-in Lora extension patches (Linear, Conv2d, GroupNorm, LayerNorm,
MultiheadAttention; subclasses such as ldm's ``GroupNorm32`` keep their own type name).
``*_modules.txt`` has the name of every module (containers, activations, wrappers too), in
``named_modules()`` order; the stand-ins for the hijack wrappers have other type names, so only the
names are written.
This file is an independent reference: it does not import the code it checks.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
from pathlib import Path
from typing import Callable, Iterator

import torch
from torch import nn

TRACKED_TYPES = (nn.Linear, nn.Conv2d, nn.GroupNorm, nn.LayerNorm, nn.MultiheadAttention)

# CLIP ViT-L/14 text tower, as in openai/clip-vit-large-patch14's config.json (used only when the
# offline HF cache with that config is not there).
CLIP_L_TEXT_CONFIG = dict(
    vocab_size=49408, hidden_size=768, intermediate_size=3072, projection_dim=768,
    num_hidden_layers=12, num_attention_heads=12, max_position_embeddings=77, hidden_act="quick_gelu",
)

FAMILIES = {
    "sd15": "configs/v1-inference.yaml",
    "sd2": "repositories/stable-diffusion-stability-ai/configs/stable-diffusion/v2-inference.yaml",
    "sdxl": "repositories/generative-models/configs/inference/sd_xl_base.yaml",
}


class Wrapper(nn.Module):
    """Stands for A1111's hijack wrappers: all they add to module names is ``.wrapped``."""

    def __init__(self, wrapped: nn.Module):
        super().__init__()
        self.wrapped = wrapped


@contextlib.contextmanager
def patched(obj: object, attr: str, value: object) -> Iterator[None]:
    old = getattr(obj, attr)
    setattr(obj, attr, value)
    try:
        yield
    finally:
        setattr(obj, attr, old)


@contextlib.contextmanager
def offline_encoders() -> Iterator[None]:
    """Build the text encoders from their configs instead of downloading weights."""
    import open_clip
    import transformers

    def clip_text_model(version: str, *args: object, **kwargs: object) -> nn.Module:
        try:
            config = transformers.CLIPTextConfig.from_pretrained(version)
        except OSError:
            config = transformers.CLIPTextConfig(**CLIP_L_TEXT_CONFIG)
        return transformers.CLIPTextModel(config)

    def clip_tokenizer(version: str, *args: object, **kwargs: object) -> None:
        return None  # names only: no tokenizer is needed

    def create_model_and_transforms(arch: str, *args: object, **kwargs: object) -> tuple:
        config = open_clip.get_model_config(arch)
        return open_clip.model.CLIP(**config), None, None

    with contextlib.ExitStack() as stack:
        stack.enter_context(patched(transformers.CLIPTextModel, "from_pretrained", clip_text_model))
        stack.enter_context(patched(transformers.CLIPTokenizer, "from_pretrained", clip_tokenizer))
        stack.enter_context(patched(open_clip, "create_model_and_transforms", create_model_and_transforms))
        yield


def wrap_token_embedding(owner: nn.Module) -> None:
    owner.token_embedding = Wrapper(owner.token_embedding)


def hijack_text_encoder(encoder: nn.Module) -> nn.Module:
    """What sd_hijack.StableDiffusionModelHijack.hijack does to one text encoder."""
    if hasattr(encoder, "transformer"):  # FrozenCLIPEmbedder (ldm or sgm)
        wrap_token_embedding(encoder.transformer.text_model.embeddings)
    else:  # FrozenOpenCLIPEmbedder / FrozenOpenCLIPEmbedder2
        wrap_token_embedding(encoder.model)
    return Wrapper(encoder)


def build_sd(config_path: Path) -> nn.Module:
    from omegaconf import OmegaConf
    from ldm.models.diffusion.ddpm import DiffusionWrapper
    from ldm.util import instantiate_from_config

    params = OmegaConf.load(config_path).model.params
    root = nn.Module()
    root.model = DiffusionWrapper(params.unet_config, params.conditioning_key)
    root.cond_stage_model = hijack_text_encoder(instantiate_from_config(params.cond_stage_config))
    return root


def build_sdxl(config_path: Path) -> nn.Module:
    from omegaconf import OmegaConf
    from sgm.modules.diffusionmodules.wrappers import OpenAIWrapper
    from sgm.util import instantiate_from_config

    params = OmegaConf.load(config_path).model.params
    root = nn.Module()
    root.model = OpenAIWrapper(instantiate_from_config(params.network_config), compile_model=False)
    conditioner = instantiate_from_config(params.conditioner_config)
    conditioner.wrapped = nn.Module()
    for i, embedder in enumerate(conditioner.embedders):
        if type(embedder).__name__ in ("FrozenCLIPEmbedder", "FrozenOpenCLIPEmbedder", "FrozenOpenCLIPEmbedder2"):
            conditioner.embedders[i] = hijack_text_encoder(embedder)
    root.conditioner = conditioner
    root.cond_stage_model = conditioner
    return root


def layer_lines(root: nn.Module) -> list[str]:
    return [f"{name}\t{type(module).__name__}" for name, module in root.named_modules()
            if isinstance(module, TRACKED_TYPES)]


def module_lines(root: nn.Module) -> list[str]:
    return [name for name, _ in root.named_modules() if name]


def versions() -> str:
    import open_clip
    import transformers

    open_clip_version = getattr(open_clip, "__version__", None)
    if open_clip_version is None:
        from importlib.metadata import version
        open_clip_version = version("open_clip_torch")
    return f"torch {torch.__version__}, transformers {transformers.__version__}, open_clip {open_clip_version}"


def main(argv: list[str] | None = None) -> int:
    here = Path(__file__).resolve().parent
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--webui", type=Path, default=Path(os.environ.get("WEBUI_DIR", "/work/testbed/webui")))
    parser.add_argument("--out", type=Path, default=here.parent / "data")
    parser.add_argument("--family", choices=sorted(FAMILIES), action="append",
                        help="only this family (repeatable); default: all")
    args = parser.parse_args(argv)

    webui = args.webui.resolve()
    for sub in ("", "repositories/stable-diffusion-stability-ai", "repositories/generative-models"):
        sys.path.insert(0, str(webui / sub))
    builders: dict[str, Callable[[Path], nn.Module]] = {"sd15": build_sd, "sd2": build_sd, "sdxl": build_sdxl}

    args.out.mkdir(parents=True, exist_ok=True)
    for family in args.family or sorted(FAMILIES):
        with offline_encoders(), torch.device("meta"):
            root = builders[family](webui / FAMILIES[family])
        source = [f"# from {FAMILIES[family]}; {versions()}", "# written by tests/tools/dump_reference_layers.py"]
        for kind, what, lines in (
            ("layers", "layers the built-in Lora patches (name<TAB>type)", layer_lines(root)),
            ("modules", "every module of the UNet and the text encoders (name)", module_lines(root)),
        ):
            header = [f"# A1111 v1.10.1 {family} after sd_hijack: {what}"] + source
            path = args.out / f"a1111_{family}_{kind}.txt"
            path.write_text("\n".join(header + lines) + "\n")
            print(f"{path}: {len(lines)} {kind}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
