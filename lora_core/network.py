"""A network: one LoRA/LyCORIS file mapped onto one loaded model, as adapters per target layer.

``load_network`` reads only the tensors of keys that map to a layer, refuses a file made for another model
family, and reports everything it did not use: unmatched keys, unknown keys, parameters no algorithm read, and
layers whose shapes do not fit.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from os import PathLike
from pathlib import Path
from typing import Sequence

import torch

from .adapters import Adapter, LayerOp, TargetInfo, build_adapter
from .cost import LayerCost, has_low_rank_bypass, layer_cost, unet_levels
from .families import family_name
from .errors import FamilyMismatchError, KeyMappingError, UnsupportedLayerError
from .io import LoraFile, open_lora
from .keymap import detect_file_family, map_keys
from .model_index import FAMILIES, ModelIndex, Target
from .patch import PlanEntry


@dataclass
class MappingReport:
    """What became of every key of the file."""

    used: list[str] = field(default_factory=list)
    unmatched: list[str] = field(default_factory=list)  # network keys naming no layer of this model
    unknown: list[str] = field(default_factory=list)  # keys that are no network keys
    unused: list[str] = field(default_factory=list)  # keys of matched layers that no algorithm reads
    problems: dict[str, str] = field(default_factory=dict)  # layer -> shape mismatch / unsupported message

    @property
    def total(self) -> int:
        return len(self.used) + len(self.unmatched) + len(self.unknown) + len(self.unused)

    def summary(self) -> str:
        parts = [f"{len(self.used)}/{self.total} keys used"]
        if self.unmatched:
            parts.append(f"{len(self.unmatched)} matched no layer (e.g. {self.unmatched[0]})")
        if self.unknown:
            parts.append(f"{len(self.unknown)} unknown (e.g. {self.unknown[0]})")
        if self.unused:
            parts.append(f"{len(self.unused)} unused (e.g. {self.unused[0]})")
        if self.problems:
            first = next(iter(self.problems.items()))
            parts.append(f"{len(self.problems)} layers skipped ({first[1]})")
        return "; ".join(parts)


@dataclass
class Network:
    name: str
    path: str
    family: str | None
    metadata: dict[str, str]
    adapters: dict[Target, Adapter]
    report: MappingReport
    embeddings: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)

    _dense_bytes: dict = field(default_factory=dict, repr=False, compare=False)
    _costs: dict = field(default_factory=dict, repr=False, compare=False)

    def unet_costs(self, index: ModelIndex, dyn: int | None = None) -> list[LayerCost]:
        """What bypass and a merge of this network's UNet layers do (see ``cost``), computed once per model."""
        key = (id(index), dyn)
        if key not in self._costs:
            levels = unet_levels(index)
            self._costs[key] = [layer_cost(adapter, index, target, levels, dyn)
                                for target, adapter in self.adapters.items() if not index.is_text_encoder(target)]
        return self._costs[key]

    def dense_bypass_bytes(self, index: ModelIndex, dyn: int | None = None) -> int:
        """Bytes of the full-size deltas bypass mode would hold for this network on ``index`` (targets whose
        algorithm has no low-rank form, and MultiheadAttention, which is recomputed with a full delta)."""
        key = (id(index), dyn)
        if key not in self._dense_bytes:
            total = 0
            for target, adapter in self.adapters.items():
                if has_low_rank_bypass(adapter, index, target, dyn):
                    continue
                weight = index.weight(target)
                total += weight.numel() * max(weight.element_size(), 2)  # fp8 weights run in 16 bits
            self._dense_bytes[key] = total
        return self._dense_bytes[key]

    def algorithms(self) -> dict[str, int]:
        return dict(Counter(a.algorithm for a in self.adapters.values()))

    def plan(self, index: ModelIndex, te: float, unet: float, dyn: int | None = None,
             layer_scale: "callable | None" = None, slot: int | None = None) -> list[PlanEntry]:
        """Plan entries for this network: te/unet multiplier by component, times ``layer_scale(target)``; ``slot``:
        the per-row weight column of its entries (``Patcher.set_rows``), None for every row alike."""
        entries = []
        for target, adapter in self.adapters.items():
            m = te if index.is_text_encoder(target) else unet
            if layer_scale is not None:
                m *= layer_scale(target)
            entries.append(PlanEntry(adapter, target, m, dyn, self.name, slot))
        return entries


def _target_info(index: ModelIndex, target: Target) -> TargetInfo:
    return TargetInfo(str(target), index.weight_shape(target), LayerOp.of(index.module(target), target.part))


def load_network(path: str | PathLike, index: ModelIndex, name: str | None = None) -> Network:
    """Read ``path`` and build its adapters for the model of ``index``.

    Raises LoraFileError (unreadable file, NaN/Inf), FamilyMismatchError (a LoRA for another family) and
    KeyMappingError (nothing in the file fits this model).
    """
    path = Path(path)
    name = name or path.stem
    with open_lora(path) as f:
        keys: Sequence[str] = list(f.keys())
        metadata = dict(f.metadata)
        family, keymap = _fit(path, keys, metadata, f, index)
        report = MappingReport(unmatched=list(keymap.unmatched), unknown=list(keymap.unknown))
        adapters: dict[Target, Adapter] = {}
        for target, group in keymap.groups.items():
            params = {p: f.get(k) for p, k in group.params.items()}
            try:
                adapter, unused = build_adapter(params, _target_info(index, target))
            except UnsupportedLayerError as e:
                report.problems[str(target)] = str(e)
                report.unused.extend(group.params.values())
                continue
            adapters[target] = adapter
            report.unused.extend(group.params[p] for p in unused)
            report.used.extend(k for p, k in group.params.items() if p not in unused)
        embeddings = {emb: {vec: f.get(k) for vec, k in vecs.items()} for emb, vecs in keymap.embeddings.items()}
        report.used.extend(k for vecs in keymap.embeddings.values() for k in vecs.values())
    if not adapters and not embeddings:
        raise _nothing_fits(path, keys, index, report.unmatched or report.unknown or list(report.problems.values()))
    return Network(name, str(path), family, metadata, adapters, report, embeddings)


def check_fit(path: str | PathLike, index: ModelIndex) -> None:
    """What ``load_network`` finds from the file's header alone, without reading a weight: raises
    FamilyMismatchError (a LoRA for another family), KeyMappingError (no key names a layer of this model) and
    LoraFileError (an unreadable header), with the messages ``load_network`` gives. A file that passes may still
    fail to load (a non-finite weight, shapes that do not fit): only loading finds those."""
    path = Path(path)
    with open_lora(path) as f:
        keys = list(f.keys())
        _, keymap = _fit(path, keys, dict(f.metadata), f, index)
    if not keymap.groups and not keymap.embeddings:
        raise _nothing_fits(path, keys, index, list(keymap.unmatched) or list(keymap.unknown))


def _fit(path: Path, keys: Sequence[str], metadata: dict[str, str], f: LoraFile, index: ModelIndex):
    """(the file's family, its keys mapped onto the model); FamilyMismatchError for a file of another family."""
    family = detect_file_family(keys, metadata, f.shape, index.family)
    if family is not None and index.family in FAMILIES and family != index.family:
        raise FamilyMismatchError(str(path), family, index.family, family_name(family),
                                  family_name(index.family, index.variant))
    return family, map_keys(keys, index)


def _nothing_fits(path: Path, keys: Sequence[str], index: ModelIndex, examples: Sequence[str]) -> KeyMappingError:
    example = (list(examples) or ["the file is empty"])[0]
    return KeyMappingError(f"{path}: none of its {len(keys)} keys fits a layer of the loaded "
                           f"{family_name(index.family, index.variant)} model (e.g. {example})")
