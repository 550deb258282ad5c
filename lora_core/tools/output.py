"""Writing LoRA files: sd-scripts' metadata (``ss_*`` and modelspec) and its hashes, then ``io.save_safetensors``.

A LoRA is small, so it is built in memory and saved at once (atomically, by ``io.save_safetensors``). The
hashes go into the metadata before saving: ``sshs_model_hash`` is the sha256 of the data section exactly as
safetensors will write it (so it equals ``io.addnet_hash`` of the file), ``sshs_legacy_hash`` is sd-scripts'
(see ``checkpoint``).
"""
from __future__ import annotations

import datetime
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

import torch

from ..errors import LoraFileError
from ..io import read_metadata, save_safetensors
from .checkpoint import LEGACY_HASH_KEY, MODEL_HASH_KEY, with_hashes
from .checks import require_result_finite

NETWORK_MODULE = "networks.lora"
IMPLEMENTATION = "sd-webui-lora-core"
_ARCHITECTURES = {"sd1": "stable-diffusion-v1", "sd2": "stable-diffusion-v2-512", "sdxl": "stable-diffusion-xl-v1-base"}
_SD2_V = "stable-diffusion-v2-768-v"
_SGM = "https://github.com/Stability-AI/generative-models"


@dataclass(frozen=True)
class Saved:
    """A file a tool wrote, with the hashes it carries in its metadata."""

    path: Path
    model_hash: str
    legacy_hash: str

    @property
    def shorthash(self) -> str:
        return self.model_hash[:12]


def base_model_version(family: str | None, v_parameterization: bool = False) -> str | None:
    if family == "sdxl":
        return "sdxl_base_v1-0"
    if family in ("sd1", "sd2"):
        return ("sd_v2" if family == "sd2" else "sd_v1") + ("_v" if v_parameterization else "")
    return None


def network_metadata(family: str | None, dim: str, alpha: str, network_args: Mapping[str, str] | None = None,
                     v_parameterization: bool = False) -> dict[str, str]:
    """sd-scripts' minimum LoRA metadata (``ss_v2``, base model, module, dim, alpha, args)."""
    metadata: dict[str, str] = {}
    if family is not None:
        metadata["ss_v2"] = str(family == "sd2")
    version = base_model_version(family, v_parameterization)
    if version is not None:
        metadata["ss_base_model_version"] = version
    metadata.update(ss_network_module=NETWORK_MODULE, ss_network_dim=dim, ss_network_alpha=alpha)
    if network_args is not None:
        metadata["ss_network_args"] = json.dumps(dict(network_args))
    return metadata


def modelspec(family: str | None, title: str, *, lora: bool = True, v_parameterization: bool = False,
              merged_from: str | None = None) -> dict[str, str]:
    """sd-scripts' modelspec (SAI model spec 1.0.1) for a LoRA or a checkpoint of ``family``."""
    if family not in _ARCHITECTURES:
        return {}
    architecture = _SD2_V if family == "sd2" and v_parameterization else _ARCHITECTURES[family]
    resolution = {"sdxl": "1024x1024", "sd2": "768x768" if v_parameterization else "512x512"}.get(family, "512x512")
    spec = {
        "modelspec.sai_model_spec": "1.0.1",
        "modelspec.architecture": architecture + ("/lora" if lora else ""),
        "modelspec.implementation": _SGM if (family == "sdxl" or not lora) else "diffusers",
        "modelspec.title": title,
        "modelspec.resolution": resolution,
        "modelspec.date": datetime.datetime.fromtimestamp(int(time.time())).isoformat(),
        "modelspec.prediction_type": "v" if v_parameterization else "epsilon",
        "modelspec.implementation_version": IMPLEMENTATION,
    }
    if merged_from:
        spec["modelspec.merged_from"] = merged_from
    return spec


def title_of(path: str | os.PathLike) -> str:
    """modelspec.title of a .safetensors file, else its file name (sd-scripts' ``build_merged_from``)."""
    path = Path(path)
    try:
        title = read_metadata(path).get("modelspec.title")
    except LoraFileError:  # unreadable: reported where the file itself is read
        title = None
    return title or path.stem


def cast_floats(tensors: Mapping[str, torch.Tensor], dtype: torch.dtype | None) -> dict[str, torch.Tensor]:
    return {k: (v.to(dtype) if dtype is not None and v.is_floating_point() else v).contiguous()
            for k, v in tensors.items()}


def save_lora(tensors: Mapping[str, torch.Tensor], path: str | os.PathLike, metadata: Mapping[str, str],
              *, save_dtype: torch.dtype | None, overwrite: bool = False) -> Saved:
    """Cast floating tensors to ``save_dtype``, add the sshs hashes to ``metadata`` and save atomically."""
    tensors = cast_floats(tensors, save_dtype)
    for key, tensor in tensors.items():
        require_result_finite(key, tensor)
    metadata = with_hashes(tensors, metadata)
    try:
        save_safetensors(tensors, path, metadata, overwrite=overwrite)
    except OSError as error:  # disk full, folder removed meanwhile: name the output, not the temporary file
        raise LoraFileError(path, f"could not be written ({error.strerror or error})") from None
    return Saved(Path(path), metadata[MODEL_HASH_KEY], metadata[LEGACY_HASH_KEY])
