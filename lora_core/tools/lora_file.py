"""A LoRA/LyCORIS file read module by module, without a model: for the tools that work on files alone.

Keys are grouped by module (``keymap.parse_key``: kohya, LyCORIS, diffusers and PEFT spellings) and the module
names brought to the form sd-scripts writes (``names.canonical_module``). A module's layer shape is inferred from
its own tensors, which is enough for every algorithm whose change does not depend on the layer's weight (LoRA,
LoCon, Tucker, LoHa, LoKr, full, norm); DoRA, IA3, OFT and GLoRA need the checkpoint (``--model``).
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import torch

from ..adapters import ADAPTERS, Adapter, LayerOp, TargetInfo, build_adapter
from ..adapters.loha import LohaAdapter
from ..adapters.lokr import LokrAdapter
from ..adapters.base import scalar
from ..errors import LoraFileError, UnsupportedLayerError
from ..io import open_lora
from ..keymap import detect_file_family, parse_key
from .checkpoint import COMPONENT_ROOTS
from .common import require_file
from .names import canonical_module


@dataclass
class FileModule:
    """One module of a file: its parameters under kohya names (``lora_up.weight``, ``hada_w1_a``, ``alpha``...)."""

    name: str
    params: dict[str, torch.Tensor]

    @property
    def is_plain_lora(self) -> bool:
        """up/down (+alpha/scale) only: what sum and concat merges and sd-scripts' resize handle."""
        return {"lora_up.weight", "lora_down.weight"} <= set(self.params) and \
            set(self.params) <= {"lora_up.weight", "lora_down.weight", "alpha", "scale"}

    @property
    def algorithm(self) -> str:
        """The algorithm whose keys these are (``+dora`` with a ``dora_scale``); 'unknown' for none."""
        specific = set(self.params) - {"alpha", "scale", "dora_scale"}
        name = next((cls.algorithm for cls in ADAPTERS if specific and specific <= cls.keys), "unknown")
        return name + ("+dora" if "dora_scale" in self.params else "")

    @property
    def rank(self) -> int | None:
        p = self.params
        for key, dim in (("lora_down.weight", 0), ("hada_w1_b", 0), ("lokr_w2_b", 0), ("lokr_w1_b", 0),
                         ("a2.weight", 0), ("b2.weight", 0)):
            if key in p:
                return int(p[key].shape[dim])
        return None

    @property
    def alpha(self) -> float | None:
        return scalar(self.params.get("alpha"))

    def target(self) -> TargetInfo:
        """The layer this module fits, inferred from its tensors; UnsupportedLayerError when it cannot be."""
        shape = infer_shape(self.name, self.params)
        if shape is None:
            raise UnsupportedLayerError(f"{self.name}: its change depends on the layer's own weight "
                                        f"({', '.join(sorted(self.params))}); give the checkpoint (--model)")
        if len(shape) == 1:
            return TargetInfo(self.name, shape, LayerOp("layer_norm", {"normalized_shape": shape, "eps": 1e-5}))
        return TargetInfo(self.name, shape, LayerOp("conv2d" if len(shape) == 4 else "linear"))

    def adapter(self) -> Adapter:
        adapter, _ = build_adapter(self.params, self.target())
        if adapter.needs_base:
            raise UnsupportedLayerError(f"{self.name}: {adapter.algorithm} with dora_scale depends on the layer's "
                                        "own weight; give the checkpoint (--model)")
        return adapter

    def delta(self, device: torch.device | str = "cpu") -> torch.Tensor:
        """dW at multiplier 1, float32, shaped like the layer."""
        target = self.target()
        return self.adapter().delta_weight(torch.empty(target.shape, device=device))


def infer_shape(name: str, params: dict[str, torch.Tensor]) -> tuple[int, ...] | None:
    """The layer's weight shape from a module's own tensors; None for algorithms that need the layer."""
    if "dora_scale" in params:
        return None
    if "lora_up.weight" in params and "lora_down.weight" in params:
        up, down, mid = params["lora_up.weight"], params["lora_down.weight"], params.get("lora_mid.weight")
        kernel = tuple(mid.shape[2:]) if mid is not None else tuple(down.shape[2:])
        return (up.shape[0], down.shape[1], *kernel)
    if "hada_w1_a" in params:
        return LohaAdapter._half_shape(params, 1, name)
    if any(k.startswith("lokr_") for k in params):
        (a, c), w2 = LokrAdapter._factor_shapes(params, name)
        return (a * w2[0], c * w2[1], *w2[2:])
    for key in ("diff", "w_norm"):
        if key in params:
            return tuple(params[key].shape)
    return None


@dataclass
class LoraContents:
    path: Path
    family: str | None
    metadata: dict[str, str]
    modules: dict[str, FileModule]
    other: dict[str, torch.Tensor] = field(default_factory=dict)  # keys of no module (embeddings, unknown)


def not_a_lora(keys: Sequence[str]) -> str | None:
    """Why a file of these keys is not a LoRA (a checkpoint, no key a LoRA module's), or None when it is one."""
    if any(parse_key(key) is not None for key in keys):
        return None
    if not keys:
        return "holds no tensors, so it is not a LoRA"
    weight = next((key for key in keys if key.startswith(COMPONENT_ROOTS)), None)
    if weight is not None:
        return f"is a checkpoint (model weights such as '{weight}'), not a LoRA"
    return (f"is not a LoRA: none of its {len(keys)} keys is a LoRA or LyCORIS module key in a spelling this tool "
            f"reads (kohya, LyCORIS, diffusers, PEFT), e.g. '{keys[0]}'")


def require_lora(path: str | os.PathLike) -> None:
    """Refuse (LoraFileError naming it) a file that is not a LoRA; only the key names are read."""
    with open_lora(require_file(path, "LoRA")) as f:
        problem = not_a_lora(f.keys())
    if problem is not None:
        raise LoraFileError(path, problem)


def read_lora(path: str | os.PathLike) -> LoraContents:
    """Every module of a LoRA file, by canonical name (see the module docstring). LoraFileError (naming the file
    and what it is instead) when it is not a LoRA."""
    path = require_file(path, "LoRA")
    with open_lora(path) as f:
        keys = f.keys()
        problem = not_a_lora(keys)
        if problem is not None:
            raise LoraFileError(path, problem)
        metadata = dict(f.metadata)
        family = detect_file_family(keys, metadata, f.shape)
        modules: dict[str, FileModule] = {}
        other: dict[str, torch.Tensor] = {}
        for key in keys:
            kn = parse_key(key)
            if kn is None:
                other[key] = f.get(key)
                continue
            name = canonical_module(kn.module, family)
            module = modules.setdefault(name, FileModule(name, {}))
            if kn.param in module.params:  # the same layer under two namings: keep the first (as load_network)
                other[key] = f.get(key)
                continue
            module.params[kn.param] = f.get(key)
    return LoraContents(path, family, metadata, modules, other)
