"""Which model family (SD1, SD2, SDXL) a LoRA file was made for, from its metadata."""
from __future__ import annotations

from typing import Literal, Mapping

SdVersion = Literal["sd1", "sd2", "sdxl", "unknown"]


# (metadata key, value prefix, family), tried in order: kohya's base model, then modelspec, then old ss_v2.
_VERSION_RULES: tuple[tuple[str, str, SdVersion], ...] = (
    ("ss_base_model_version", "sdxl", "sdxl"),
    ("ss_base_model_version", "sd_v2", "sd2"),  # sd_v2 and sd_v2_v
    ("ss_base_model_version", "sd_v1", "sd1"),
    ("modelspec.architecture", "stable-diffusion-xl", "sdxl"),
    ("modelspec.architecture", "stable-diffusion-v2", "sd2"),
    ("modelspec.architecture", "stable-diffusion-v1", "sd1"),
)
_SS_V2: dict[str, SdVersion] = {"True": "sd2", "False": "sd1"}  # kohya files from before SDXL


def detect_sd_version(metadata: Mapping[str, str]) -> SdVersion:
    """The model family a LoRA was trained for, from kohya (`ss_*`) or modelspec metadata."""
    for key, prefix, family in _VERSION_RULES:
        if str(metadata.get(key, "")).startswith(prefix):
            return family
    return _SS_V2.get(str(metadata.get("ss_v2", "")), "unknown")
