"""Write the golden name lists of A1111 v1.10.1 to ``tests/data/a1111_{family}_{layers,modules}.txt``.

Families: sd15, sd15_inpaint (9 input channels), sd15_pix2pix (8), sd2, sd2_v (768-v), sdxl, sdxl_inpaint,
sdxl_refiner and sd3 (A1111's own ``modules/models/sd3``, SD3 medium's shapes).

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
    "sd15_inpaint": "configs/v1-inpainting-inference.yaml",
    "sd15_pix2pix": "configs/instruct-pix2pix.yaml",
    "sd2": "repositories/stable-diffusion-stability-ai/configs/stable-diffusion/v2-inference.yaml",
    "sd2_v": "repositories/stable-diffusion-stability-ai/configs/stable-diffusion/v2-inference-v.yaml",
    "sdxl": "repositories/generative-models/configs/inference/sd_xl_base.yaml",
    "sdxl_inpaint": "configs/sd_xl_inpaint.yaml",
    "sdxl_refiner": "repositories/generative-models/configs/inference/sd_xl_refiner.yaml",
    "sd3": "configs/sd3-inference.yaml",
}

# SD3 medium's shapes where A1111's BaseModel reads its configuration from the checkpoint (sd3_impls.BaseModel):
# the patch embedding (depth 24 -> width 1536, patch 2), 192x192 positions, the pooled and the context widths.
SD3_MEDIUM_SHAPES = {
    "x_embedder.proj.weight": (1536, 16, 2, 2),
    "pos_embed": (1, 36864, 1536),
    "y_embedder.mlp.0.weight": (1536, 2048),
    "context_embedder.weight": (1536, 4096),
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


def build_sd3(config_path: Path) -> nn.Module:
    """A1111's SD3 (``modules/models/sd3``) as ``SD3Inferencer`` holds it: ``model`` (``BaseModel``, the MMDiT at
    ``model.diffusion_model``) and ``text_encoders`` (``SD3Cond``: clip_g, clip_l, t5xxl). Its classes are
    imported from the WebUI (after ``sd_models``, the import order the WebUI has), with the option that keeps T5
    on, tokenizers that are not downloaded, every encoder placed on the meta device (A1111 passes
    ``device="cpu"``) and the identity copied into CLIP-G's projection skipped (a meta tensor holds no data)."""
    from modules import shared, options, shared_options
    shared.opts = options.Options(shared_options.options_templates, shared_options.restricted_opts)
    shared.opts.sd3_enable_t5 = True
    from modules import sd_models  # noqa: F401  (sd_hijack before sd3, as the WebUI imports them)
    import modules.models.sd3.sd3_cond as sd3_cond
    import modules.models.sd3.sd3_impls as sd3_impls

    class NoTokenizer:
        @classmethod
        def from_pretrained(cls, *args: object, **kwargs: object) -> "NoTokenizer":
            return cls()

        def __call__(self, *args: object, **kwargs: object) -> dict:
            return {"input_ids": [0, 1]}

    def on_meta(cls: type) -> Callable[..., nn.Module]:
        def build(*args: object, **kwargs: object) -> nn.Module:
            return cls(*args, **{**kwargs, "device": "meta"})
        return build

    copy = torch.Tensor.copy_
    with contextlib.ExitStack() as stack:
        for name, value in (("CLIPTokenizer", NoTokenizer), ("T5TokenizerFast", NoTokenizer),
                            ("SD3Tokenizer", lambda: None)):
            stack.enter_context(patched(sd3_cond, name, value))
        for name in ("SDXLClipG", "SDClipModel", "T5XXLModel"):
            stack.enter_context(patched(sd3_cond, name, on_meta(getattr(sd3_cond, name))))
        stack.enter_context(patched(torch.Tensor, "copy_", lambda self, src, *a, **k:
                                    self if self.is_meta else copy(self, src, *a, **k)))
        prefix = "model.diffusion_model."
        shapes = {prefix + k: torch.empty(v, device="meta") for k, v in SD3_MEDIUM_SHAPES.items()}
        root = nn.Module()
        root.model = sd3_impls.BaseModel(shift=3, state_dict=shapes, prefix=prefix, device="meta")
        root.text_encoders = sd3_cond.SD3Cond()
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
    args.out = args.out.resolve()
    for sub in ("repositories/stable-diffusion-stability-ai", "repositories/generative-models"):
        sys.path.insert(0, str(webui / sub))
    sys.path.insert(0, str(webui))  # A1111's own `modules` (SD3, the pix2pix LatentDiffusion)
    os.chdir(webui)  # A1111 resolves its data paths from the working folder
    sys.argv = sys.argv[:1]  # A1111's option parser reads the command line
    builders: dict[str, Callable[[Path], nn.Module]] = {
        "sd15": build_sd, "sd15_inpaint": build_sd, "sd15_pix2pix": build_sd, "sd2": build_sd, "sd2_v": build_sd,
        "sdxl": build_sdxl, "sdxl_inpaint": build_sdxl, "sdxl_refiner": build_sdxl, "sd3": build_sd3}

    args.out.mkdir(parents=True, exist_ok=True)
    for family in args.family or sorted(FAMILIES):
        with offline_encoders(), torch.device("meta"):
            root = builders[family](webui / FAMILIES[family])
        source = [f"# from {FAMILIES[family]}; {versions()}", "# written by tests/tools/dump_reference_layers.py"]
        conv_in = dict(root.named_modules()).get("model.diffusion_model.input_blocks.0.0")
        if conv_in is not None:  # what tells an inpainting (9) or instruct-pix2pix (8) UNet from its base
            source.append(f"# conv_in weight shape: {tuple(conv_in.weight.shape)}")
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
