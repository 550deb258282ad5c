"""File key -> (canonical module name, parameter name).

The canonical module name is kohya's: ``lora_unet_<path>``, ``lora_te_<path>``, ``lora_te1_``/``lora_te2_``,
with dots of the module path written as underscores. Diffusers/PEFT files name the same modules with dots and
other parameter names (``lora_A``/``lora_B``, ``lora.down``/``lora.up``, ``lora_linear_layer.down``,
``processor.to_q_lora.down`` on the UNet, ``self_attn.to_q_lora.down`` on a text encoder); they are brought to
kohya's form here so one resolver serves every format.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

# diffusers / PEFT top-level prefixes -> kohya module prefix
DOTTED_PREFIXES = (
    ("unet.", "lora_unet_"),
    ("transformer.", "lora_unet_"),  # diffusers' SD3 (MMDiT) pipeline: the denoiser is `transformer`
    ("text_encoder_3.", "lora_te3_"),  # SD3's T5
    ("text_encoder_2.", "lora_te2_"),
    ("text_encoder.", "lora_te1_"),
    ("base_model.model.", "lora_unet_"),  # a PEFT model's own state dict around a UNet
)

KOHYA_PREFIXES = ("lora_unet_", "lora_te_", "lora_te1_", "lora_te2_", "lora_te3_")
#: module-name prefixes of other writers that name modules like kohya otherwise: sd-scripts' OFT, and A1111's own
#: network layer names (``diffusion_model_...``, what its ``network_layer_mapping`` and SD3 weight map use)
_KOHYA_ALIASES = (("oft_unet_", "lora_unet_"), ("diffusion_model_", "lora_unet_"))

# LoRA parameter spellings of diffusers/PEFT -> kohya's
_PARAM_ALIASES = {
    "lora_A.weight": "lora_down.weight",
    "lora_B.weight": "lora_up.weight",
    "lora_A.default.weight": "lora_down.weight",
    "lora_B.default.weight": "lora_up.weight",
    "lora.down.weight": "lora_down.weight",
    "lora.up.weight": "lora_up.weight",
    "lora_linear_layer.down.weight": "lora_down.weight",
    "lora_linear_layer.up.weight": "lora_up.weight",
    "lora_magnitude_vector": "dora_scale",
    "lora_magnitude_vector.weight": "dora_scale",
    "lora_magnitude_vector.default.weight": "dora_scale",
    "lora_magnitude_vector.default": "dora_scale",
}
# longest first, so 'lora_A.default.weight' wins over a shorter match
_DOTTED_PARAM_TAILS = sorted(list(_PARAM_ALIASES) + ["alpha", "lora_mid.weight", "lora_up.weight",
                                                     "lora_down.weight", "dora_scale"], key=len, reverse=True)
# diffusers before PEFT: ``attn1.processor.to_q_lora.down.weight`` (UNet), ``self_attn.to_q_lora.down.weight``
# (text encoder, whose projections are q_proj ... out_proj)
_OLD_LORA = re.compile(r"^(?P<mod>.+?)(?:\.processor)?\.(?P<proj>to_q|to_k|to_v|to_out)_lora\.(?P<p>down|up)\.weight$")
_OLD_UNET_PROJ = {"to_q": "to_q", "to_k": "to_k", "to_v": "to_v", "to_out": "to_out.0"}
_OLD_TE_PROJ = {"to_q": "q_proj", "to_k": "k_proj", "to_v": "v_proj", "to_out": "out_proj"}


_BARE_UNET = ("down_blocks.", "mid_block.", "up_blocks.", "transformer_blocks.")


@dataclass(frozen=True)
class KeyName:
    module: str  # canonical kohya-style module name
    param: str  # kohya-style parameter name, e.g. 'lora_up.weight', 'hada_w1_a', 'alpha'


def _from_dotted(key: str, prefix: str, kohya: str) -> KeyName | None:
    rest = key[len(prefix):]
    m = _OLD_LORA.match(rest)
    if m:
        proj = (_OLD_UNET_PROJ if kohya == "lora_unet_" else _OLD_TE_PROJ)[m["proj"]]
        return KeyName(kohya + (m["mod"] + "." + proj).replace(".", "_"), f"lora_{m['p']}.weight")
    for tail in _DOTTED_PARAM_TAILS:
        if rest.endswith("." + tail):
            mod = rest[: -len(tail) - 1]
            return KeyName(kohya + mod.replace(".", "_"), _PARAM_ALIASES.get(tail, tail))
    return None


def parse_key(key: str) -> KeyName | None:
    """Split a file key into its canonical module name and parameter; None when the key is not a network key."""
    for prefix, kohya in DOTTED_PREFIXES:
        if key.startswith(prefix):
            return _from_dotted(key, prefix, kohya)
    if key.startswith(_BARE_UNET):  # diffusers' save_attn_procs wrote UNet keys without the `unet.` prefix
        return _from_dotted(key, "", "lora_unet_")
    for alias, kohya in _KOHYA_ALIASES:
        if key.startswith(alias):
            key = kohya + key[len(alias):]
            break
    for kohya in KOHYA_PREFIXES:
        if key.startswith(kohya):
            module, _, param = key.partition(".")
            if not param:
                return None
            return KeyName(module, _PARAM_ALIASES.get(param, param))
    return None
