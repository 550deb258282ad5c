"""Module names as the tools write them, and the block of a module name without a model.

Written files name modules as sd-scripts does, so that A1111's built-in Lora (and every other loader) reads them:
SD1/SD2 UNet modules diffusers-style (``lora_unet_down_blocks_0_attentions_0_proj_in``), SDXL UNet modules
compvis-style (``lora_unet_input_blocks_4_1_proj_in``), text encoders HF-CLIP style (``lora_te_`` for SD1/SD2,
``lora_te1_``/``lora_te2_`` for SDXL). :func:`canonical_module` brings any file's module name to that form, so
LoRAs written in different styles combine module by module.
"""
from __future__ import annotations

import re

from ..blocks import OTHER
from ..keymap.compvis import RESNET_PARTS, diffusers_unet_to_compvis

UNET = "lora_unet_"

_RESNET_PARTS = {compvis: diffusers for diffusers, compvis in RESNET_PARTS.items()}  # inverse of keymap's


def _resnet(suffix: str) -> str:
    for compvis, diffusers in _RESNET_PARTS.items():
        if suffix == compvis or suffix.startswith(compvis + "_"):
            return diffusers + suffix[len(compvis):]
    return suffix


def _down(i: int, kind: str, suffix: str) -> str:
    level, j = divmod(i - 1, 3)
    if kind == "0":
        return f"down_blocks_{level}_resnets_{j}_{_resnet(suffix)}"
    return f"down_blocks_{level}_attentions_{j}_{suffix}"


def _up(i: int, kind: str, suffix: str) -> str:
    level, j = divmod(i, 3)
    if kind == "0":
        return f"up_blocks_{level}_resnets_{j}_{_resnet(suffix)}"
    return f"up_blocks_{level}_attentions_{j}_{suffix}"


_COMPVIS_RULES: list[tuple[re.Pattern[str], object]] = [
    (re.compile(r"input_blocks_0_0(.*)"), lambda m: f"conv_in{m[1]}"),
    (re.compile(r"input_blocks_(\d+)_0_op(.*)"), lambda m: f"down_blocks_{(int(m[1]) - 3) // 3}_downsamplers_0_conv{m[2]}"),
    (re.compile(r"input_blocks_(\d+)_([01])_(.+)"), lambda m: _down(int(m[1]), m[2], m[3])),
    (re.compile(r"middle_block_1_(.+)"), lambda m: f"mid_block_attentions_0_{m[1]}"),
    (re.compile(r"middle_block_([02])_(.+)"), lambda m: f"mid_block_resnets_{int(m[1]) // 2}_{_resnet(m[2])}"),
    (re.compile(r"output_blocks_(\d+)_[12]_conv(_.*)?"),
     lambda m: f"up_blocks_{int(m[1]) // 3}_upsamplers_0_conv{m[2] or ''}"),
    (re.compile(r"output_blocks_(\d+)_([01])_(.+)"), lambda m: _up(int(m[1]), m[2], m[3])),
    (re.compile(r"out_0(.*)"), lambda m: f"conv_norm_out{m[1]}"),
    (re.compile(r"out_2(.*)"), lambda m: f"conv_out{m[1]}"),
    (re.compile(r"time_embed_([02])(.*)"), lambda m: f"time_embedding_linear_{int(m[1]) // 2 + 1}{m[2]}"),
    (re.compile(r"label_emb_0_([02])(.*)"), lambda m: f"add_embedding_linear_{int(m[1]) // 2 + 1}{m[2]}"),
]


def compvis_to_diffusers(name: str) -> str | None:
    """The diffusers-style name (no ``lora_unet_``) of a compvis-style UNet module; None if it is not one.

    Checked against ``keymap.compvis`` (the reader's conversion): a name it would not map back is not returned.
    """
    for pattern, convert in _COMPVIS_RULES:
        m = pattern.fullmatch(name)
        if m:
            result = convert(m)  # type: ignore[operator]
            return result if name in diffusers_unet_to_compvis(result) else None
    return None


def is_compvis(name: str) -> bool:
    return name.startswith(("input_blocks_", "middle_block_", "output_blocks_", "out_", "time_embed_", "label_emb_"))


def compvis_name(module: str) -> str | None:
    """The compvis-style path (no prefix) of a UNet module name in either style; None for other names."""
    if not module.startswith(UNET):
        return None
    rest = module[len(UNET):]
    if is_compvis(rest):
        return rest
    candidates = diffusers_unet_to_compvis(rest)
    # an upsampler's index depends on whether its level has attention; SDXL's two upsampling levels both do
    return candidates[-1] if candidates else None


def canonical_module(module: str, family: str | None) -> str:
    """``module`` (a kohya-style name, as ``keymap.parse_key`` gives it) named as sd-scripts writes it."""
    if module.startswith(UNET):
        rest = module[len(UNET):]
        if family in ("sd1", "sd2") and is_compvis(rest):
            return UNET + (compvis_to_diffusers(rest) or rest)
        if family == "sdxl" and not is_compvis(rest):
            return UNET + (compvis_name(module) or rest)
        return module
    if family in ("sd1", "sd2") and module.startswith("lora_te1_"):
        return "lora_te_" + module[len("lora_te1_"):]
    return module


_BLOCK_RE = re.compile(r"(?:(input_blocks|output_blocks)_(\d+)|middle_block)_")


def block_of_name(module: str) -> str:
    """BASE, IN00.., M00, OUT00.. or OTHER for a kohya module name, without a model."""
    if module.startswith("lora_te"):
        return "BASE"
    path = compvis_name(module)
    match = _BLOCK_RE.match(path + "_") if path is not None else None
    if match is None:
        return OTHER
    if match.group(1) is None:
        return "M00"
    return f"{'IN' if match.group(1) == 'input_blocks' else 'OUT'}{int(match.group(2)):02d}"
