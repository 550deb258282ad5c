"""Kohya's SD1/SD2 UNet names are diffusers-style (``down_blocks_0_attentions_1_...``); the loaded ldm UNet is
compvis-style (``input_blocks_2_1_...``). This converts the first into the candidates of the second (SPEC §3).
"""
from __future__ import annotations

import re

RESNET_PARTS = {  # diffusers resnet part -> compvis
    "conv1": "in_layers_2",
    "conv2": "out_layers_3",
    "norm1": "in_layers_0",
    "norm2": "out_layers_0",
    "time_emb_proj": "emb_layers_1",
    "conv_shortcut": "skip_connection",
}


def _resnet_suffix(suffix: str) -> str:
    for a, b in RESNET_PARTS.items():
        if suffix == a or suffix.startswith(a + "_"):
            return b + suffix[len(a):]
    return suffix


def _block(kind: str, suffix: str) -> str:
    return f"1_{suffix}" if kind == "attentions" else f"0_{_resnet_suffix(suffix)}"


_RULES: list[tuple[re.Pattern[str], object]] = [
    (re.compile(r"conv_in(.*)"), lambda m: [f"input_blocks_0_0{m[1]}"]),
    (re.compile(r"conv_out(.*)"), lambda m: [f"out_2{m[1]}"]),
    (re.compile(r"conv_norm_out(.*)"), lambda m: [f"out_0{m[1]}"]),
    (re.compile(r"time_embedding_linear_(\d+)(.*)"), lambda m: [f"time_embed_{2 * int(m[1]) - 2}{m[2]}"]),
    (re.compile(r"add_embedding_linear_(\d+)(.*)"), lambda m: [f"label_emb_0_{2 * int(m[1]) - 2}{m[2]}"]),
    (re.compile(r"down_blocks_(\d+)_(attentions|resnets)_(\d+)_(.+)"),
     lambda m: [f"input_blocks_{1 + 3 * int(m[1]) + int(m[3])}_{_block(m[2], m[4])}"]),
    (re.compile(r"down_blocks_(\d+)_downsamplers_0_conv(.*)"),
     lambda m: [f"input_blocks_{3 + 3 * int(m[1])}_0_op{m[2]}"]),
    (re.compile(r"mid_block_attentions_0_(.+)"), lambda m: [f"middle_block_1_{m[1]}"]),
    (re.compile(r"mid_block_resnets_(\d+)_(.+)"),
     lambda m: [f"middle_block_{2 * int(m[1])}_{_resnet_suffix(m[2])}"]),
    (re.compile(r"up_blocks_(\d+)_(attentions|resnets)_(\d+)_(.+)"),
     lambda m: [f"output_blocks_{3 * int(m[1]) + int(m[3])}_{_block(m[2], m[4])}"]),
    # the upsampler sits after the attention when the level has one (SDXL's lowest level), else after the resnet
    (re.compile(r"up_blocks_(\d+)_upsamplers_0_conv(.*)"),
     lambda m: [f"output_blocks_{2 + 3 * int(m[1])}_{i}_conv{m[2]}" for i in (1, 2)]),
]


def diffusers_unet_to_compvis(name: str) -> list[str]:
    """Candidate compvis names (without ``lora_unet_``) for a diffusers-style UNet name; [] if none applies."""
    for pattern, convert in _RULES:
        m = pattern.fullmatch(name)
        if m:
            return convert(m)  # type: ignore[operator]
    return []
