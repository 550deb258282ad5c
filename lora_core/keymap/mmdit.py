"""Diffusers' SD3 transformer names -> the MMDiT names A1111 holds (SAI's ``joint_blocks``), for ``lora_unet_``.

Diffusers (and PEFT files written on its ``SD3Transformer2DModel``) name block i ``transformer_blocks_{i}`` with
separate ``to_q``/``to_k``/``to_v`` (image stream) and ``add_{q,k,v}_proj`` (text stream); A1111's MMDiT has one
fused ``attn.qkv`` Linear per stream, whose q/k/v rows the model index offers as ``..._attn_qkv_{q,k,v}_proj``
(the built-in's ``diffusers_weight_mapping`` names them the same way). Not mapped, so reported as unmatched:
``norm_out.linear`` and the last block's ``norm1_context.linear``, whose shift and scale halves diffusers stores
swapped (a delta there would land on the wrong half). The last block is the one whose text stream is "pre-only":
it has no ``context_block.attn.proj``.
"""
from __future__ import annotations

import re
from typing import Callable

_BLOCK = re.compile(r"transformer_blocks_(\d+)_(.+)")
_IN_BLOCK = {  # diffusers (underscored) -> MMDiT joint block part
    "attn_to_q": "x_block_attn_qkv_q_proj",
    "attn_to_k": "x_block_attn_qkv_k_proj",
    "attn_to_v": "x_block_attn_qkv_v_proj",
    "attn_to_out_0": "x_block_attn_proj",
    "attn_add_q_proj": "context_block_attn_qkv_q_proj",
    "attn_add_k_proj": "context_block_attn_qkv_k_proj",
    "attn_add_v_proj": "context_block_attn_qkv_v_proj",
    "attn_to_add_out": "context_block_attn_proj",
    "attn_add_out_proj_0": "context_block_attn_proj",  # the name A1111's own diffusers_weight_mapping gives it
    "ff_net_0_proj": "x_block_mlp_fc1",
    "ff_net_2": "x_block_mlp_fc2",
    "ff_context_net_0_proj": "context_block_mlp_fc1",
    "ff_context_net_2": "context_block_mlp_fc2",
    "norm1_linear": "x_block_adaLN_modulation_1",
}
_OUTSIDE = {
    "pos_embed_proj": "x_embedder_proj",
    "time_text_embed_timestep_embedder_linear_1": "t_embedder_mlp_0",
    "time_text_embed_timestep_embedder_linear_2": "t_embedder_mlp_2",
    "time_text_embed_text_embedder_linear_1": "y_embedder_mlp_0",
    "time_text_embed_text_embedder_linear_2": "y_embedder_mlp_2",
    "context_embedder": "context_embedder",
    "proj_out": "final_layer_linear",
}


def diffusers_sd3_to_mmdit(name: str, exists: Callable[[str], bool]) -> list[str]:
    """Candidate MMDiT names (without ``lora_unet_``) for a diffusers SD3 transformer name; [] if none applies.
    ``exists(name)``: whether the model has that module (``lora_unet_`` name)."""
    m = _BLOCK.fullmatch(name)
    if m and m[2] == "norm1_context_linear":  # the same layout as SAI's, except in the last (pre-only) block
        pre_only = not exists(f"lora_unet_joint_blocks_{m[1]}_context_block_attn_proj")
        return [] if pre_only else [f"joint_blocks_{m[1]}_context_block_adaLN_modulation_1"]
    if m:
        part = _IN_BLOCK.get(m[2])
        return [] if part is None else [f"joint_blocks_{m[1]}_{part}"]
    return [_OUTSIDE[name]] if name in _OUTSIDE else []
