"""Tiny SD1 / SD2 / SDXL models whose module names are exactly A1111 v1.10.1's.

Each builder returns the root of a loaded model as the WebUI holds it after ``sd_hijack``, at tiny
widths but with the real topology (every block, res block, transformer layer and text-encoder layer
is there) and built from the real classes: ldm's ``UNetModel`` (the ``ldm`` package of
stable-diffusion-sdkit), transformers' ``CLIPTextModel`` and open_clip's ``CLIP``. Only the UNet
and the text encoders are built (no VAE): that is all a LoRA touches. The names are checked against
``tests/data/a1111_*_layers.txt``, which ``tests/tools/dump_reference_layers.py`` writes from the
WebUI's own configs.

Why the names look like this:

* SD1/SD2: the root is a ``LatentDiffusion``: ``model`` is its ``DiffusionWrapper`` (so the UNet is
  ``model.diffusion_model``) and ``cond_stage_model`` its text encoder. When a checkpoint loads,
  ``sd_hijack`` replaces ``cond_stage_model`` by ``FrozenCLIPEmbedderWithCustomWords`` (SD1) or
  ``FrozenOpenCLIPEmbedderWithCustomWords`` (SD2), which keeps the original as ``.wrapped``. Hence
  ``cond_stage_model.wrapped.transformer.text_model...`` (SD1, a ``CLIPTextModel``) and
  ``cond_stage_model.wrapped.model.transformer.resblocks...`` (SD2, an open_clip ``CLIP`` whose
  ``.visual`` was deleted). Checkpoint keys have no ``.wrapped``: it exists only at run time.
* SDXL: the root is sgm's ``DiffusionEngine``. ``conditioner.embedders`` holds five embedders:
  CLIP ViT-L (``[0]``), OpenCLIP ViT-bigG (``[1]``) and three parameterless size/crop embedders
  (``[2..4]``). ``sd_hijack`` wraps the two text embedders in place, so they are
  ``conditioner.embedders.0.wrapped.transformer...`` and ``conditioner.embedders.1.wrapped.model...``;
  the size embedders have no ``.wrapped`` (A1111's Lora skips them). ``extend_sdxl`` adds an empty
  ``conditioner.wrapped`` and the hijack sets ``cond_stage_model`` to the conditioner itself, so
  ``cond_stage_model`` is an alias that ``named_modules()`` does not list twice.
* Every text encoder's token embedding is wrapped too (``EmbeddingsWithFixes``):
  ``...token_embedding.wrapped`` is the ``nn.Embedding``.

The wrappers here are plain containers: their only effect on names is ``.wrapped``.

Departures from the real models, none of which changes a name or a layer type:

* widths, heads, vocabulary and the size-embedding width are tiny; the context length stays 77;
  ldm's GroupNorm has 32 groups, so the UNets' base width is 32; SDXL's 3rd level is 3x that
  (real 4x), which still makes every res-block skip convolution that SDXL has;
* the ldm package has no per-level transformer depth and no ``"sequential"`` class embedding
  (both are sgm's). The SDXL UNet is built with depth 10 everywhere, the 2nd level is cut to
  depth 2 (real SDXL: depth 0/2/10 per level, 10 in the middle), ``label_emb`` is given sgm's layout
  (``label_emb.0.0`` Linear, ``.0.1`` SiLU, ``.0.2`` Linear), and a forward pre-hook on each
  ``SpatialTransformer`` hands a tensor context to every block (ldm indexes the context per block);
* gradient checkpointing is off (it changes nothing in eval and would block autograd in tests);
* all weights are random and non-zero (ldm zero-inits the output projections: they are re-drawn
  so that the output depends on every layer); fp32, eval mode.
"""

from __future__ import annotations

from typing import Callable

import torch
from ldm.modules.attention import SpatialTransformer
from ldm.modules.diffusionmodules.openaimodel import UNetModel
from ldm.modules.diffusionmodules.util import timestep_embedding
from torch import nn

FAMILIES = ("sd1", "sd2", "sdxl")
#: built too, but outside the suite-wide family fixtures (their inputs and forwards are not modelled here):
#: the SDXL refiner (full forward) and SD3, whose MMDiT is built for its layers only (see ``build_sd3``)
EXTRA_FAMILIES = ("sdxl_refiner", "sd3")

CONTEXT_LENGTH = 77  # real: tokens per chunk, as A1111 feeds them
VOCAB_SIZE = 1024  # real: 49408
LATENT_CHANNELS = 4

# Tiny text towers: (width, heads, layers). The layer counts are the real ones.
CLIP_L = dict(width=32, heads=4, layers=12)  # real ViT-L/14: 768, 12, 12
OPEN_CLIP_H = dict(width=32, heads=4, layers=24)  # real ViT-H/14: 1024, 16, 24
OPEN_CLIP_BIGG = dict(width=48, heads=6, layers=32)  # real ViT-bigG/14: 1280, 20, 32
SIZE_EMBED_DIM = 8  # real 256: width of one sinusoidal embedding of one size/crop number
SIZE_EMBEDDERS = 3  # original_size, crop_coords_top_left, target_size (two numbers each)

UNET_WIDTH = 32  # real 320; 32 is the least ldm's 32-group GroupNorm allows


# --- A1111's hijack, as far as names go ----------------------------------------------------------

class HijackedTextEncoder(nn.Module):
    """Stands for ``Frozen(Open)CLIPEmbedder...WithCustomWords``: the original encoder is ``.wrapped``."""

    def __init__(self, wrapped: nn.Module):
        super().__init__()
        self.wrapped = wrapped


class HijackedTokenEmbedding(nn.Module):
    """Stands for ``EmbeddingsWithFixes`` (no textual inversion here): the embedding is ``.wrapped``."""

    def __init__(self, wrapped: nn.Embedding):
        super().__init__()
        self.wrapped = wrapped

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.wrapped(input_ids)


class ClipTextEmbedder(nn.Module):
    """Stands for ldm/sgm ``FrozenCLIPEmbedder``: holds the ``transformer`` (a ``CLIPTextModel``)."""

    def __init__(self, transformer: nn.Module):
        super().__init__()
        self.transformer = transformer


class ClipTextModelV4Layout(nn.Module):
    """``CLIPTextModel`` as transformers 4.x lays it out: the text tower is ``.text_model``.

    A1111 pins transformers 4.30, whose ``CLIPTextModel`` holds a ``CLIPTextTransformer`` as
    ``text_model``. transformers 5 flattened that level away (its ``CLIPTextModel`` has the
    ``embeddings``/``encoder``/``final_layer_norm`` itself), so here it is put back around it.
    """

    def __init__(self, text_model: nn.Module):
        super().__init__()
        self.text_model = text_model

    @property
    def config(self):
        return self.text_model.config

    def forward(self, *args: object, **kwargs: object):
        return self.text_model(*args, **kwargs)


class OpenClipTextEmbedder(nn.Module):
    """Stands for ldm ``FrozenOpenCLIPEmbedder`` / sgm ``FrozenOpenCLIPEmbedder2``: holds ``model``."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model


class SizeTimestep(nn.Module):
    """Stands for sgm's parameterless ``Timestep``: a sinusoidal embedding of each number."""

    def __init__(self, dim: int):
        super().__init__()
        self.dim = dim

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        return timestep_embedding(t, self.dim)


class SizeEmbedder(nn.Module):
    """Stands for sgm's ``ConcatTimestepEmbedderND`` (SDXL size/crop conditioning; no weights)."""

    def __init__(self, outdim: int):
        super().__init__()
        self.timestep = SizeTimestep(outdim)
        self.outdim = outdim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch = x.shape[0]
        return self.timestep(x.flatten()).reshape(batch, -1)


class Conditioner(nn.Module):
    """Stands for sgm's ``GeneralConditioner``: ``embedders`` plus A1111's empty ``wrapped``."""

    def __init__(self, embedders: list[nn.Module]):
        super().__init__()
        self.embedders = nn.ModuleList(embedders)
        self.wrapped = nn.Module()  # sd_models_xl.extend_sdxl


class DiffusionWrapper(nn.Module):
    """Stands for ldm's ``DiffusionWrapper`` / sgm's ``OpenAIWrapper``: holds ``diffusion_model``."""

    def __init__(self, diffusion_model: nn.Module):
        super().__init__()
        self.diffusion_model = diffusion_model


class TinySDModel(nn.Module):
    """The root, like A1111's ``shared.sd_model``, with its ``is_sd1/is_sd2/is_sdxl`` flags."""

    def __init__(self, family: str, unet: nn.Module):
        super().__init__()
        if family not in FAMILIES + EXTRA_FAMILIES:
            raise ValueError(f"unknown family {family!r}; expected one of {FAMILIES + EXTRA_FAMILIES}")
        self.family = family
        self.is_sd1 = family == "sd1"
        self.is_sd2 = family == "sd2"
        self.is_sdxl = family in ("sdxl", "sdxl_refiner")  # A1111: hasattr(model, 'conditioner')
        self.is_sd3 = family == "sd3"
        self.is_ssd = False
        self.model = DiffusionWrapper(unet)


def family_of(root: nn.Module) -> str:
    """'sd1' | 'sd2' | 'sdxl' for a model built here."""
    if not isinstance(root, TinySDModel):
        raise TypeError(f"not a tiny model: {type(root).__name__}")
    return root.family


# --- text encoders --------------------------------------------------------------------------------

def _clip_text_model(width: int, heads: int, layers: int) -> nn.Module:
    from transformers import CLIPTextConfig, CLIPTextModel

    config = CLIPTextConfig(
        vocab_size=VOCAB_SIZE, hidden_size=width, intermediate_size=4 * width, projection_dim=width,
        num_hidden_layers=layers, num_attention_heads=heads, max_position_embeddings=CONTEXT_LENGTH,
        hidden_act="quick_gelu", pad_token_id=VOCAB_SIZE - 1, bos_token_id=VOCAB_SIZE - 2,
        eos_token_id=VOCAB_SIZE - 1,
    )
    model = CLIPTextModel(config)
    if not hasattr(model, "text_model"):
        model = ClipTextModelV4Layout(model)
    embeddings = model.text_model.embeddings
    embeddings.token_embedding = HijackedTokenEmbedding(embeddings.token_embedding)
    return model


def _open_clip_model(width: int, heads: int, layers: int) -> nn.Module:
    from open_clip.model import CLIP, CLIPTextCfg, CLIPVisionCfg

    text_cfg = CLIPTextCfg(context_length=CONTEXT_LENGTH, vocab_size=VOCAB_SIZE, width=width,
                           heads=heads, layers=layers)
    tiny_vision = CLIPVisionCfg(layers=1, width=32, head_width=16, patch_size=8, image_size=16)
    model = CLIP(embed_dim=width, vision_cfg=tiny_vision, text_cfg=text_cfg)
    del model.visual  # as ldm's FrozenOpenCLIPEmbedder and sgm's FrozenOpenCLIPEmbedder2 do
    model.token_embedding = HijackedTokenEmbedding(model.token_embedding)
    return model


def _hijacked_clip_l() -> HijackedTextEncoder:
    return HijackedTextEncoder(ClipTextEmbedder(_clip_text_model(**CLIP_L)))


def _hijacked_open_clip(tower: dict) -> HijackedTextEncoder:
    return HijackedTextEncoder(OpenClipTextEmbedder(_open_clip_model(**tower)))


# --- UNets ---------------------------------------------------------------------------------------

def _sd_unet(context_dim: int, in_channels: int = LATENT_CHANNELS, **kwargs: object) -> UNetModel:
    """The SD1/SD2 UNet of v1-/v2-inference.yaml, tiny (``in_channels`` 9: inpainting, 8: instruct-pix2pix)."""
    return UNetModel(
        image_size=32, in_channels=in_channels, out_channels=LATENT_CHANNELS, model_channels=UNET_WIDTH,
        attention_resolutions=[4, 2, 1], num_res_blocks=2, channel_mult=[1, 2, 4, 4],
        use_spatial_transformer=True, transformer_depth=1, context_dim=context_dim,
        use_checkpoint=False, legacy=False, **kwargs,
    )


# Real (1, 2, 4); the 3rd level is 3x here to halve the memory of its 10-deep transformers. It
# still differs from the 2nd, so every res block that has a skip convolution keeps it.
SDXL_CHANNEL_MULT = (1, 2, 3)
SDXL_DEPTH = 10  # transformer depth of the 3rd level and the middle block
SDXL_LEVEL2_DEPTH = 2  # transformer depth of the 2nd level
# Attention blocks of SDXL's 2nd level: input_blocks 4, 5 and output_blocks 3, 4, 5.
SDXL_LEVEL2_BLOCKS = (("input_blocks", 4), ("input_blocks", 5),
                      ("output_blocks", 3), ("output_blocks", 4), ("output_blocks", 5))


def _context_per_block(module: nn.Module, args: tuple) -> tuple | None:
    """ldm's SpatialTransformer reads ``context[i]`` for block i; sgm repeats one tensor context."""
    if len(args) > 1 and isinstance(args[1], torch.Tensor):
        return (args[0], [args[1]] * len(module.transformer_blocks), *args[2:])
    return None


def _sdxl_unet(context_dim: int, adm_in_channels: int, width: int = UNET_WIDTH, channel_mult=SDXL_CHANNEL_MULT,
               head_channels: int = 16, in_channels: int = LATENT_CHANNELS) -> UNetModel:
    """The UNet of sd_xl_base.yaml, tiny, from ldm's class (see the module docstring); ``bench/bench_engine.py``
    builds the real-size one with the real width, levels and head size."""
    unet = UNetModel(
        image_size=32, in_channels=in_channels, out_channels=LATENT_CHANNELS, model_channels=width,
        attention_resolutions=[4, 2], num_res_blocks=2, channel_mult=channel_mult, num_head_channels=head_channels,
        use_spatial_transformer=True, use_linear_in_transformer=True, transformer_depth=SDXL_DEPTH,
        context_dim=[context_dim] * SDXL_DEPTH, use_checkpoint=False, legacy=False,
        num_classes=1,  # creates label_emb where sgm has it; replaced below
    )
    for blocks, index in SDXL_LEVEL2_BLOCKS:
        del getattr(unet, blocks)[index][1].transformer_blocks[SDXL_LEVEL2_DEPTH:]
    time_embed_dim = unet.time_embed[0].out_features
    unet.num_classes = "sequential"
    unet.label_emb = nn.Sequential(nn.Sequential(
        nn.Linear(adm_in_channels, time_embed_dim), nn.SiLU(), nn.Linear(time_embed_dim, time_embed_dim)))
    for module in unet.modules():
        if isinstance(module, SpatialTransformer):
            module.register_forward_pre_hook(_context_per_block)
    return unet


# --- weights ------------------------------------------------------------------------------------

def _randomize_layer(module: nn.Module) -> bool:
    """Draws the weights of one layer of a known type; False for any other module."""
    if isinstance(module, (nn.Linear, nn.Conv2d)):
        module.reset_parameters()  # kaiming-uniform weight, uniform (non-zero) bias
    elif isinstance(module, (nn.GroupNorm, nn.LayerNorm)):
        if module.weight is not None:  # SD3's adaLN norms have no affine parameters
            module.weight.normal_(1.0, 0.1)
            module.bias.normal_(0.0, 0.1)
    elif isinstance(module, nn.MultiheadAttention):  # its out_proj is a Linear, drawn on its own
        nn.init.xavier_uniform_(module.in_proj_weight)
        module.in_proj_bias.normal_(0.0, 0.1)
    elif isinstance(module, nn.Embedding):
        module.weight.normal_(0.0, 0.5)
    else:
        return False
    return True


def _randomize(root: nn.Module) -> None:
    """Non-zero random weights everywhere (ldm zero-inits output projections; biases start at 0)."""
    with torch.no_grad():
        for module in root.modules():
            if not _randomize_layer(module):
                for param in module.parameters(recurse=False):  # positions, text projection, logit scale
                    param.normal_(0.0, 0.1)


def _finish(root: TinySDModel) -> TinySDModel:
    _randomize(root)
    return root.float().eval()


# --- builders -----------------------------------------------------------------------------------

def build_sd1(seed: int = 0, in_channels: int = LATENT_CHANNELS) -> TinySDModel:
    """SD1.5: ldm UNet (v1-inference.yaml topology) + CLIP ViT-L text encoder (12 layers). ``in_channels`` 9 is
    v1-inpainting-inference.yaml's UNet, 8 instruct-pix2pix's (latent + conditioning channels)."""
    torch.manual_seed(seed)
    root = TinySDModel("sd1", _sd_unet(context_dim=CLIP_L["width"], in_channels=in_channels, num_heads=8))
    root.cond_stage_model = _hijacked_clip_l()
    return _finish(root)


def build_sd2(seed: int = 0) -> TinySDModel:
    """SD2.x: ldm UNet (v2-inference.yaml: linear proj, head channels) + OpenCLIP ViT-H text tower (24)."""
    torch.manual_seed(seed)
    root = TinySDModel("sd2", _sd_unet(context_dim=OPEN_CLIP_H["width"], num_head_channels=8,
                                       use_linear_in_transformer=True))
    root.cond_stage_model = _hijacked_open_clip(OPEN_CLIP_H)
    return _finish(root)


def sdxl_adm_in_channels() -> int:
    """Width of SDXL's vector conditioning ``y``: pooled bigG output + the size/crop embeddings."""
    return OPEN_CLIP_BIGG["width"] + SIZE_EMBEDDERS * 2 * SIZE_EMBED_DIM


def build_sdxl(seed: int = 0, in_channels: int = LATENT_CHANNELS) -> TinySDModel:
    """SDXL base: UNet of sd_xl_base.yaml + CLIP ViT-L (12 layers) and OpenCLIP ViT-bigG (32 layers); ``in_channels``
    9 is the SDXL inpainting UNet."""
    torch.manual_seed(seed)
    context_dim = CLIP_L["width"] + OPEN_CLIP_BIGG["width"]
    root = TinySDModel("sdxl", _sdxl_unet(context_dim, sdxl_adm_in_channels(), in_channels=in_channels))
    embedders = [_hijacked_clip_l(), _hijacked_open_clip(OPEN_CLIP_BIGG)]
    embedders += [SizeEmbedder(SIZE_EMBED_DIM) for _ in range(SIZE_EMBEDDERS)]
    root.conditioner = Conditioner(embedders)
    root.cond_stage_model = root.conditioner  # sd_hijack: the conditioner doubles as cond_stage_model
    return _finish(root)


# SDXL refiner (sd_xl_refiner.yaml): 4 levels (real width 384 x (1, 2, 4, 4); here 32 x (1, 2, 3, 3), which keeps
# the skip convolutions where the real one has them), attention on the 2nd and 3rd level and in the middle, depth
# 4 everywhere, cross-attention on OpenCLIP bigG alone, and ``y`` = bigG pooled + 5 size/crop/aesthetic numbers.
REFINER_CHANNEL_MULT = (1, 2, 3, 3)
REFINER_DEPTH = 4


def refiner_adm_in_channels() -> int:
    return OPEN_CLIP_BIGG["width"] + 5 * SIZE_EMBED_DIM


def build_sdxl_refiner(seed: int = 0) -> TinySDModel:
    """SDXL refiner: UNet of sd_xl_refiner.yaml + OpenCLIP ViT-bigG (32 layers) as ``conditioner.embedders.0``."""
    torch.manual_seed(seed)
    unet = UNetModel(
        image_size=32, in_channels=LATENT_CHANNELS, out_channels=LATENT_CHANNELS, model_channels=UNET_WIDTH,
        attention_resolutions=[4, 2], num_res_blocks=2, channel_mult=REFINER_CHANNEL_MULT, num_head_channels=16,
        use_spatial_transformer=True, use_linear_in_transformer=True, transformer_depth=REFINER_DEPTH,
        context_dim=[OPEN_CLIP_BIGG["width"]] * REFINER_DEPTH, use_checkpoint=False, legacy=False, num_classes=1,
    )
    time_embed_dim = unet.time_embed[0].out_features
    unet.num_classes = "sequential"
    unet.label_emb = nn.Sequential(nn.Sequential(
        nn.Linear(refiner_adm_in_channels(), time_embed_dim), nn.SiLU(), nn.Linear(time_embed_dim, time_embed_dim)))
    for module in unet.modules():
        if isinstance(module, SpatialTransformer):
            module.register_forward_pre_hook(_context_per_block)
    root = TinySDModel("sdxl_refiner", unet)
    root.conditioner = Conditioner([_hijacked_open_clip(OPEN_CLIP_BIGG)] +
                                   [SizeEmbedder(SIZE_EMBED_DIM) for _ in range(SIZE_EMBEDDERS)])
    root.cond_stage_model = root.conditioner
    return _finish(root)


# --- SD3 (A1111's modules/models/sd3), for its layers ------------------------------------------------
# A1111 holds SD3 as ``SD3Inferencer``: ``model.diffusion_model`` is SAI's MMDiT (``mmdit.py``), ``text_encoders``
# is ``SD3Cond`` with CLIP-G, CLIP-L (A1111's own CLIP classes, laid out like transformers' with a
# ``text_projection``) and T5-XXL. The classes below give every layer the name, type and role it has there
# (24 joint blocks, the last one's context block "pre-only": no proj, norm2 or mlp), at tiny widths; their
# forward is not modelled, so tests run single layers (each a real nn.Linear / LayerNorm / Conv2d).
SD3_DEPTH = 24
SD3_WIDTH = 32  # real 64 * depth = 1536
SD3_T5 = dict(width=16, ff=32, layers=24)  # real 4096, 10240, 24
SD3_CLIP_G = dict(width=48, heads=6, layers=32)
SD3_LATENT_CHANNELS = 16


class QkvLinear(nn.Linear):
    """A1111's ``mmdit.QkvLinear``: one Linear whose output rows are q, then k, then v."""


class AutocastLinear(nn.Linear):
    """A1111's T5 Linear (``other_impls.AutocastLinear``)."""


class _Mlp(nn.Module):
    def __init__(self, width: int, hidden: int):
        super().__init__()
        self.fc1, self.act, self.fc2 = nn.Linear(width, hidden), nn.GELU(approximate="tanh"), nn.Linear(hidden, width)


class _SelfAttention(nn.Module):
    def __init__(self, width: int, pre_only: bool):
        super().__init__()
        self.qkv = QkvLinear(width, 3 * width)
        if not pre_only:
            self.proj = nn.Linear(width, width)
        self.ln_q, self.ln_k = nn.Identity(), nn.Identity()


class _DismantledBlock(nn.Module):
    def __init__(self, width: int, pre_only: bool):
        super().__init__()
        self.norm1 = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.attn = _SelfAttention(width, pre_only)
        if not pre_only:
            self.norm2 = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
            self.mlp = _Mlp(width, 4 * width)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(width, (2 if pre_only else 6) * width))


class _JointBlock(nn.Module):
    def __init__(self, width: int, pre_only: bool):
        super().__init__()
        self.context_block = _DismantledBlock(width, pre_only)
        self.x_block = _DismantledBlock(width, False)


def _embedder_mlp(width_in: int, width: int) -> nn.Module:
    holder = nn.Module()
    holder.mlp = nn.Sequential(nn.Linear(width_in, width), nn.SiLU(), nn.Linear(width, width))
    return holder


def _mmdit(width: int = SD3_WIDTH, depth: int = SD3_DEPTH) -> nn.Module:
    dit = nn.Module()
    dit.x_embedder = nn.Module()
    dit.x_embedder.proj = nn.Conv2d(SD3_LATENT_CHANNELS, width, 2, stride=2)
    dit.t_embedder = _embedder_mlp(16, width)
    dit.y_embedder = _embedder_mlp(2 * 8, width)
    dit.context_embedder = nn.Linear(16, width)
    dit.joint_blocks = nn.ModuleList(_JointBlock(width, pre_only=i == depth - 1) for i in range(depth))
    dit.final_layer = nn.Module()
    dit.final_layer.norm_final = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
    dit.final_layer.linear = nn.Linear(width, 2 * 2 * SD3_LATENT_CHANNELS)
    dit.final_layer.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(width, 2 * width))
    return dit


def _sd3_clip(width: int, heads: int, layers: int) -> nn.Module:
    holder = nn.Module()
    holder.transformer = nn.Module()
    holder.transformer.text_model = _clip_text_model(width, heads, layers).text_model
    holder.transformer.text_projection = nn.Linear(width, width, bias=False)
    return holder


def _sd3_t5(width: int, ff: int, layers: int) -> nn.Module:
    holder = nn.Module()
    holder.transformer = nn.Module()
    holder.transformer.encoder = nn.Module()
    blocks = nn.ModuleList()
    for _ in range(layers):
        attention, dense = nn.Module(), nn.Module()
        attention.SelfAttention = nn.Module()
        for name in ("q", "k", "v", "o"):
            setattr(attention.SelfAttention, name, AutocastLinear(width, width, bias=False))
        dense.DenseReluDense = nn.Module()
        dense.DenseReluDense.wi_0 = AutocastLinear(width, ff, bias=False)
        dense.DenseReluDense.wi_1 = AutocastLinear(width, ff, bias=False)
        dense.DenseReluDense.wo = AutocastLinear(ff, width, bias=False)
        block = nn.Module()
        block.layer = nn.ModuleList([attention, dense])
        blocks.append(block)
    holder.transformer.encoder.block = blocks
    return holder


def build_sd3(seed: int = 0) -> TinySDModel:
    """SD3 medium's layers as A1111 names them (``model.diffusion_model.joint_blocks...``, ``text_encoders...``)."""
    torch.manual_seed(seed)
    root = TinySDModel("sd3", _mmdit())
    root.text_encoders = nn.Module()
    root.text_encoders.clip_g = _sd3_clip(**SD3_CLIP_G)
    root.text_encoders.clip_l = _sd3_clip(**CLIP_L)
    root.text_encoders.t5xxl = _sd3_t5(**SD3_T5)
    return _finish(root)


BUILDERS: dict[str, Callable[..., TinySDModel]] = {"sd1": build_sd1, "sd2": build_sd2, "sdxl": build_sdxl,
                                                   "sdxl_refiner": build_sdxl_refiner, "sd3": build_sd3}


def build(family: str, seed: int = 0) -> TinySDModel:
    if family not in BUILDERS:
        raise ValueError(f"unknown family {family!r}; expected one of {FAMILIES}")
    return BUILDERS[family](seed)


# --- running -----------------------------------------------------------------------------------

def text_encoders(root: TinySDModel) -> dict[str, nn.Module]:
    """The wrapped text encoders by kohya prefix: ``te`` (SD1/SD2) or ``te1``/``te2`` (SDXL)."""
    if root.is_sdxl:
        return {"te1": root.conditioner.embedders[0].wrapped, "te2": root.conditioner.embedders[1].wrapped}
    return {"te": root.cond_stage_model.wrapped}


def context_dim(root: TinySDModel) -> int:
    """Width of the cross-attention context the UNet takes."""
    return sum(_encoder_width(encoder) for encoder in text_encoders(root).values())


def _encoder_width(encoder: nn.Module) -> int:
    if isinstance(encoder, ClipTextEmbedder):
        return encoder.transformer.config.hidden_size
    return encoder.model.transformer.width


def _random_tokens(batch: int, generator: torch.Generator, pad_id: int) -> torch.Tensor:
    """``bos prompt eos pad...``, 77 long; the prompt length varies, the ids stay below bos/eos."""
    bos, eos = VOCAB_SIZE - 2, VOCAB_SIZE - 1
    tokens = torch.full((batch, CONTEXT_LENGTH), pad_id, dtype=torch.long)
    for row in tokens:
        length = int(torch.randint(3, 20, (1,), generator=generator))
        row[0] = bos
        row[1:length + 1] = torch.randint(1, bos, (length,), generator=generator)
        row[length + 1] = eos
    return tokens


# The least latent size at which the middle block's self-attention sees 2x2 tokens: with a single
# token, softmax is 1 and attn1's to_q/to_k would not change the output.
DEFAULT_LATENT_SIZE = {"sd1": 16, "sd2": 16, "sdxl": 8}


def make_inputs(root: TinySDModel, family: str | None = None, batch: int = 1, size: int | None = None,
                seed: int = 0) -> dict:
    """Inputs for :func:`run_unet` and :func:`run_text_encoders`.

    ``x`` (latent, ``size`` x ``size``; default: :data:`DEFAULT_LATENT_SIZE`), ``timesteps``,
    ``context`` (batch, 77, context width), ``y`` for SDXL (vector conditioning), and ``tokens``:
    one id tensor per text encoder (``te`` or ``te1``/``te2``). Random but fixed by ``seed``; the
    global RNG is not touched.
    """
    family = family or family_of(root)
    if family != family_of(root):
        raise ValueError(f"model is {family_of(root)}, not {family}")
    size = size or DEFAULT_LATENT_SIZE[family]
    gen = torch.Generator().manual_seed(seed)
    inputs = {
        "x": torch.randn(batch, root.model.diffusion_model.in_channels, size, size, generator=gen),
        "timesteps": torch.randint(0, 1000, (batch,), generator=gen),
        "context": torch.randn(batch, CONTEXT_LENGTH, context_dim(root), generator=gen),
    }
    if root.is_sdxl:
        inputs["y"] = torch.randn(batch, sdxl_adm_in_channels(), generator=gen)
    inputs["tokens"] = {
        name: _random_tokens(batch, gen, pad_id=VOCAB_SIZE - 1 if isinstance(enc, ClipTextEmbedder) else 0)
        for name, enc in text_encoders(root).items()
    }
    return inputs


def run_unet(root: TinySDModel, inputs: dict, *, grad: bool = False) -> torch.Tensor:
    """The UNet's output for ``inputs``, shaped like ``inputs['x']`` (under no_grad unless ``grad``)."""
    with torch.set_grad_enabled(grad):
        return root.model.diffusion_model(inputs["x"], inputs["timesteps"], context=inputs["context"],
                                          y=inputs.get("y"))


def run_text_encoders(root: TinySDModel, inputs: dict, *, grad: bool = False) -> dict[str, torch.Tensor]:
    """Each text encoder's output for ``inputs['tokens']`` (under no_grad unless ``grad``).

    The hidden states after the last layer and the final norm (batch, 77, width), so every layer
    counts (A1111 may stop a layer earlier: clip skip, SD2/SDXL's penultimate layer). SDXL adds
    ``te2_pooled``: bigG's projected pooled output, which feeds ``y``.
    """
    outputs = {}
    with torch.set_grad_enabled(grad):
        for name, encoder in text_encoders(root).items():
            tokens = inputs["tokens"][name]
            if isinstance(encoder, ClipTextEmbedder):
                outputs[name] = encoder.transformer(input_ids=tokens).last_hidden_state
            else:
                outputs[name] = _open_clip_hidden(encoder.model, tokens)
                if root.is_sdxl:
                    outputs[f"{name}_pooled"] = encoder.model.encode_text(tokens)
    return outputs


def _open_clip_hidden(model: nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    """Token embedding + positions, every resblock, ``ln_final`` (like FrozenOpenCLIPEmbedder, layer 'last')."""
    x = model.token_embedding(tokens) + model.positional_embedding
    batch_first = getattr(model.transformer, "batch_first", False)
    if not batch_first:
        x = x.permute(1, 0, 2)
    x = model.transformer(x, attn_mask=model.attn_mask)
    if not batch_first:
        x = x.permute(1, 0, 2)
    return model.ln_final(x)
