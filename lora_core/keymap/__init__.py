"""File keys -> the layers of the loaded model, for kohya, LyCORIS, diffusers and PEFT naming.

Converters bring every key to one canonical form (``keymap.names``); the resolver looks the module up in the
model's index, converting kohya's diffusers-style SD1/SD2 UNet names to compvis ones (``keymap.compvis``).
Nothing is dropped silently: keys that name no layer of the model, and keys that are no network keys at all,
are listed in the result.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Iterable, Mapping

from ..families import detect_sd_version
from ..model_index import ModelIndex, Target
from .compvis import diffusers_unet_to_compvis
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
    for candidate in diffusers_unet_to_compvis(name[len("lora_unet_"):]):
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
_CONTEXT_DIM_FAMILY = {768: "sd1", 1024: "sd2", 2048: "sdxl"}


def _family_from_metadata(metadata: Mapping[str, str]) -> str | None:
    family = detect_sd_version(metadata)
    return None if family == "unknown" else family


def detect_file_family(keys: Iterable[str], metadata: Mapping[str, str],
                       shape_of: Callable[[str], tuple[int, ...]]) -> str | None:
    """SD1/SD2/SDXL from metadata, else from key names, else from the cross-attention width; None if unknown."""
    family = _family_from_metadata(metadata)
    if family is not None:
        return family
    keys = list(keys)
    if any(k.startswith(("lora_te2_", "text_encoder_2.")) for k in keys):
        return "sdxl"
    for key in keys:
        kn = parse_key(key)
        if kn is None or kn.param not in ("lora_down.weight", "hada_w1_b"):
            continue
        if kn.module.endswith(("attn2_to_k", "attn2_to_v")):
            shape = shape_of(key)
            return _CONTEXT_DIM_FAMILY.get(shape[1]) if len(shape) >= 2 else None
    return None
