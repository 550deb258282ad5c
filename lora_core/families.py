"""Model families: which one a LoRA file was made for (from its metadata), and how each is named to a person.

Families are what decides whether a LoRA's layers exist in a model: SD1.x, SD2.x (512 and 768-v have the same
layers), SDXL base, the SDXL refiner (another UNet, and only the OpenCLIP bigG text encoder) and SD3 (MMDiT).
An inpainting (9 input channels) or instruct-pix2pix (8) checkpoint is a *variant* of its base family: it has
the same layers, a wider first convolution, and takes that family's LoRAs (``adapters.base.ZeroPaddedInput``).
"""
from __future__ import annotations

from typing import Literal, Mapping

SdVersion = Literal["sd1", "sd2", "sdxl", "sdxl_refiner", "sd3", "unknown"]
FAMILIES: tuple[str, ...] = ("sd1", "sd2", "sdxl", "sdxl_refiner", "sd3")

FAMILY_NAMES = {"sd1": "SD1.x", "sd2": "SD2.x", "sdxl": "SDXL", "sdxl_refiner": "SDXL refiner", "sd3": "SD3"}
VARIANT_NAMES = {"inpaint": "inpainting", "pix2pix": "instruct-pix2pix"}


def family_name(family: str | None, variant: str | None = None) -> str:
    """``SD1.x``, ``SDXL refiner``, ``SD1.x inpainting``...: a family as a person reads it."""
    name = FAMILY_NAMES.get(family or "", (family or "unknown").upper())
    return f"{name} {VARIANT_NAMES[variant]}" if variant in VARIANT_NAMES else name


# (metadata key, value prefix, family), tried in order: kohya's base model, then modelspec, then old ss_v2.
_VERSION_RULES: tuple[tuple[str, str, SdVersion], ...] = (
    ("ss_base_model_version", "sdxl", "sdxl"),
    ("ss_base_model_version", "sd_v2", "sd2"),  # sd_v2 and sd_v2_v
    ("ss_base_model_version", "sd_v1", "sd1"),
    ("ss_base_model_version", "sd3", "sd3"),  # sd-scripts' SD3 branch
    ("modelspec.architecture", "stable-diffusion-xl-v1-refiner", "sdxl_refiner"),
    ("modelspec.architecture", "stable-diffusion-xl", "sdxl"),
    ("modelspec.architecture", "stable-diffusion-v2", "sd2"),
    ("modelspec.architecture", "stable-diffusion-v1", "sd1"),
    ("modelspec.architecture", "stable-diffusion-v3", "sd3"),
)
_SS_V2: dict[str, SdVersion] = {"True": "sd2", "False": "sd1"}  # kohya files from before SDXL


def detect_sd_version(metadata: Mapping[str, str]) -> SdVersion:
    """The model family a LoRA was trained for, from kohya (`ss_*`) or modelspec metadata."""
    for key, prefix, family in _VERSION_RULES:
        if str(metadata.get(key, "")).startswith(prefix):
            return family
    return _SS_V2.get(str(metadata.get("ss_v2", "")), "unknown")
