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
import re
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


def webui_modules() -> None:
    """Import the WebUI's ``modules`` as the WebUI does: options first (with SD3's T5 on), then ``sd_models``."""
    from modules import shared, options, shared_options
    if shared.opts is None:
        shared.opts = options.Options(shared_options.options_templates, shared_options.restricted_opts)
        shared.opts.sd3_enable_t5 = True
    from modules import sd_models  # noqa: F401  (sd_hijack before sd3 and the Lora extension)


def build_sd3(config_path: Path) -> nn.Module:
    """A1111's SD3 (``modules/models/sd3``) as ``SD3Inferencer`` holds it: ``model`` (``BaseModel``, the MMDiT at
    ``model.diffusion_model``) and ``text_encoders`` (``SD3Cond``: clip_g, clip_l, t5xxl). Its classes are
    imported from the WebUI (after ``sd_models``, the import order the WebUI has), with the option that keeps T5
    on, tokenizers that are not downloaded, every encoder placed on the meta device (A1111 passes
    ``device="cpu"``) and the identity copied into CLIP-G's projection skipped (a meta tensor holds no data)."""
    webui_modules()
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


# ----------------------------------------------------------------------------- the built-in's own key mapping
KEYMAP_FAMILIES = ("sdxl", "sdxl_refiner", "sd3")
_OPEN_CLIP_AS_HF = (("mlp.c_fc", "mlp_fc1"), ("mlp.c_proj", "mlp_fc2"), ("ln_1", "layer_norm1"), ("ln_2", "layer_norm2"))


def _unet_layers(root: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    for name, module in root.model.diffusion_model.named_modules():
        if isinstance(module, (nn.Linear, nn.Conv2d)):
            yield name, module


def file_modules(root: nn.Module, family: str) -> list[tuple[str, tuple[int, ...]]]:
    """LoRA module names as their writers name them, with the (out, in, *kernel) shape of the delta:
    sd-scripts (``lora_unet_`` + the UNet's own path, ``lora_te1_``/``lora_te2_``/``lora_te3_`` + the text
    encoder's transformers path, OpenCLIP written with transformers' names), A1111's own layer names
    (``diffusion_model_...``) and, for SD3, the diffusers names of A1111's own ``diffusers_weight_mapping``."""
    out: list[tuple[str, tuple[int, ...]]] = []
    for name, module in _unet_layers(root):
        shape = tuple(module.weight.shape)
        out.append(("lora_unet_" + name.replace(".", "_"), shape))
        out.append(("diffusion_model_" + name.replace(".", "_"), shape))
    if family == "sd3":
        encoders = {"lora_te1_": root.text_encoders.clip_l.transformer, "lora_te2_": root.text_encoders.clip_g.transformer,
                    "lora_te3_": root.text_encoders.t5xxl.transformer}
        for prefix, encoder in encoders.items():
            out += [(prefix + n.replace(".", "_"), tuple(m.weight.shape)) for n, m in encoder.named_modules()
                    if isinstance(m, nn.Linear)]
        width = root.model.diffusion_model.joint_blocks[0].x_block.attn.qkv.in_features
        out += [(diffusers, (width, width)) for diffusers, _ in root.diffusers_weight_mapping()]
        return out
    embedders = [e.wrapped for e in root.conditioner.embedders if hasattr(e, "wrapped")]
    prefixes = ("lora_te2_",) if family == "sdxl_refiner" else ("lora_te1_", "lora_te2_")
    for prefix, embedder in zip(prefixes, embedders):
        if hasattr(embedder, "transformer"):  # CLIP ViT-L (transformers)
            out += [(prefix + n.replace(".", "_"), tuple(m.weight.shape))
                    for n, m in embedder.transformer.named_modules() if isinstance(m, nn.Linear)]
            continue
        for i, block in enumerate(embedder.model.transformer.resblocks):  # OpenCLIP bigG, as sd-scripts names it
            layer = f"{prefix}text_model_encoder_layers_{i}_"
            d = block.attn.embed_dim
            out += [(f"{layer}self_attn_{p}_proj", (d, d)) for p in ("q", "k", "v", "out")]
            out += [(layer + "mlp_fc1", tuple(block.mlp.c_fc.weight.shape)),
                    (layer + "mlp_fc2", tuple(block.mlp.c_proj.weight.shape))]
    return out


def builtin_keymap_lines(root: nn.Module, family: str, webui: Path, folder: Path) -> list[str]:
    """``file module<TAB>A1111 module[part]`` (``-`` where the built-in matches nothing) as the built-in Lora's own
    ``networks.load_network`` maps a rank-1 LoRA with every name of ``file_modules`` on this model."""
    from types import MethodType, SimpleNamespace

    from safetensors.torch import save_file
    webui_modules()
    from modules import shared
    sys.path.insert(0, str(webui / "extensions-builtin" / "Lora"))
    import networks

    root.is_sdxl = family.startswith("sdxl")
    if family == "sd3":
        from modules.models.sd3.sd3_model import SD3Inferencer
        root.diffusers_weight_mapping = MethodType(SD3Inferencer.diffusers_weight_mapping, root)
        object.__setattr__(root, "cond_stage_model", root.text_encoders)  # SD3Inferencer's property
    names = file_modules(root, family)
    shared.sd_model = root
    if hasattr(root, "network_layer_mapping"):
        del root.network_layer_mapping
    networks.assign_network_names_to_compvis_modules(root)
    module_names = {id(m): n for n, m in root.named_modules()}
    matched: dict[str, str] = {}
    # one file per naming: two names of one layer in one file would share the built-in's entry for that layer
    for naming in sorted({re.match(r"(lora_te\d_|lora_unet_|diffusion_model_|transformer\.)", n)[1] for n, _ in names}):
        tensors = {}
        for name, shape in names:
            if not name.startswith(naming):
                continue
            down, up = ("lora_A", "lora_B") if naming == "transformer." else ("lora_down", "lora_up")
            kernel = shape[2:]
            tensors[f"{name}.{down}.weight"] = torch.zeros(1, shape[1], *kernel)
            tensors[f"{name}.{up}.weight"] = torch.zeros(shape[0], 1, *([1] * len(kernel)))
        path = folder / f"builtin_keymap_{family}.safetensors"
        save_file(tensors, str(path))
        net = networks.load_network(family, SimpleNamespace(filename=str(path)))
        path.unlink()
        for sd_key, module in net.modules.items():
            target = module_names[id(module.sd_module)]
            part = re.search(r"_([qkv])_proj$", sd_key)
            if part and not target.endswith(("_proj", ".q", ".k", ".v")):
                target += f"[{part[1]}]"
            elif target.endswith(".out_proj") and isinstance(root.get_submodule(target[:-len(".out_proj")]),
                                                             nn.MultiheadAttention):
                target = target[:-len(".out_proj")] + "[out]"
            matched[module.network_key.rsplit(".", 2)[0]] = target
    return [f"{name}\t{matched.get(name, '-')}" for name, _ in names]


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
        if family in KEYMAP_FAMILIES:
            lines = builtin_keymap_lines(root, family, webui, args.out)
            header = [f"# A1111 v1.10.1 {family}: file module<TAB>the layer the built-in Lora's own load_network "
                      "maps it to ('-': none; [q] etc.: rows of a packed q/k/v weight)"] + source
            path = args.out / f"a1111_{family}_builtin_keymap.txt"
            path.write_text("\n".join(header + lines) + "\n")
            print(f"{path}: {sum(not line.endswith('-') for line in lines)}/{len(lines)} names matched")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
