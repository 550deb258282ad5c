"""File keys -> the layers of the loaded model, for kohya, LyCORIS, diffusers and PEFT naming.

Converters bring every key to one canonical form (``keymap.names``); the resolver looks the module up in the
model's index, converting kohya's diffusers-style SD1/SD2 UNet names to compvis ones (``keymap.compvis``) and
diffusers' SD3 transformer names to A1111's MMDiT ones (``keymap.mmdit``).
Nothing is dropped silently: keys that name no layer of the model, and keys that are no network keys at all,
are listed in the result.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Callable, Iterable, Mapping

from ..families import detect_sd_version
from ..model_index import ModelIndex, Target
from .compvis import diffusers_unet_to_compvis
from .mmdit import diffusers_sd3_to_mmdit
from .names import KeyName, parse_key

__all__ = ["KeyGroup", "KeyMap", "map_keys", "resolve_module", "detect_file_family", "parse_key", "KeyName"]


@dataclass
class KeyGroup:
    """The keys of one file module, matched to one target of the model."""

    module: str
    target: Target
    params: dict[str, str] = field(default_factory=dict)  # parameter name -> file key


@dataclass
class KeyMap:
    groups: dict[Target, KeyGroup] = field(default_factory=dict)
    unmatched: list[str] = field(default_factory=list)  # network keys whose module is not in the model
    unknown: list[str] = field(default_factory=list)  # keys that are not network keys at all
    embeddings: dict[str, dict[str, str]] = field(default_factory=dict)  # bundle_emb.NAME -> {vector: key}


def resolve_module(name: str, index: ModelIndex) -> Target | None:
    """The target a canonical (kohya-style) module name means in ``index``, or None."""
    target = index.lookup(name)
    if target is not None or not name.startswith("lora_unet_"):
        return target
    if index.family == "sd3":
        candidates = diffusers_sd3_to_mmdit(name[len("lora_unet_"):], lambda n: index.lookup(n) is not None)
    else:
        candidates = diffusers_unet_to_compvis(name[len("lora_unet_"):])
    for candidate in candidates:
        target = index.lookup("lora_unet_" + candidate)
        if target is not None:
            return target
    return None


def map_keys(keys: Iterable[str], index: ModelIndex) -> KeyMap:
    result = KeyMap()
    by_module: dict[str, Target | None] = {}
    for key in keys:
        if key.startswith("bundle_emb."):
            _, emb, vec = key.split(".", 2) if key.count(".") >= 2 else (None, key, "")
            result.embeddings.setdefault(emb, {})[vec] = key
            continue
        kn = parse_key(key)
        if kn is None:
            result.unknown.append(key)
            continue
        if kn.module not in by_module:
            by_module[kn.module] = resolve_module(kn.module, index)
        target = by_module[kn.module]
        if target is None:
            result.unmatched.append(key)
            continue
        group = result.groups.get(target)
        if group is None:
            group = result.groups[target] = KeyGroup(kn.module, target)
        elif group.module != kn.module or kn.param in group.params:
            # two file modules for one layer (e.g. the same layer under two namings): keep the first
            result.unmatched.append(key)
            continue
        group.params[kn.param] = key
    return result


# ---------------------------------------------------------------- family of a file
#: width of the UNet's cross-attention context: what its attn2 to_k/to_v read
_CONTEXT_DIM_FAMILY = {768: "sd1", 1024: "sd2", 2048: "sdxl", 1280: "sdxl_refiner"}
#: module names only SD3 has: the MMDiT's joint blocks (kohya, A1111), diffusers' transformer blocks, T5 (te3)
_SD3_MODULES = re.compile(r"lora_unet_(joint_blocks|transformer_blocks)_\d|lora_te3_")


def _family_from_metadata(metadata: Mapping[str, str]) -> str | None:
    family = detect_sd_version(metadata)
    return None if family == "unknown" else family


#: families whose text encoders include SDXL's second (OpenCLIP bigG: SD3's clip_g is the same tower)
_TE2_FAMILIES = ("sdxl", "sdxl_refiner", "sd3")


def detect_file_family(keys: Iterable[str], metadata: Mapping[str, str],
                       shape_of: Callable[[str], tuple[int, ...]], model_family: str | None = None) -> str | None:
    """The family a file was made for (``families.FAMILIES``): from metadata, else from SD3's module names, else
    from the UNet's cross-attention width, else from the text encoders' names; None if unknown.

    Text-encoder keys alone tell only that the file is for a model with a second encoder: SDXL, its refiner and
    SD3 share it (and SD3 SDXL's first). Then the file is taken to be for ``model_family`` when that is one of
    them, else for SDXL."""
    family = _family_from_metadata(metadata)
    if family is not None:
        return family
    names = [(key, parse_key(key)) for key in keys]
    names = [(key, kn) for key, kn in names if kn is not None]
    if any(_SD3_MODULES.match(kn.module) for _, kn in names):
        return "sd3"
    for key, kn in names:
        if kn.param not in ("lora_down.weight", "hada_w1_b"):
            continue
        if kn.module.endswith(("attn2_to_k", "attn2_to_v")):
            shape = shape_of(key)
            return _CONTEXT_DIM_FAMILY.get(shape[1]) if len(shape) >= 2 else None
    if any(kn.module.startswith("lora_te2_") for _, kn in names):
        return model_family if model_family in _TE2_FAMILIES else "sdxl"
    return None
