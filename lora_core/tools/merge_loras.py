"""Several LoRAs -> one LoRA, by ``sum``, ``concat`` or ``svd``; each input has a ratio and optional block weights.

- ``sum`` (sd-scripts ``merge_lora.py``; equal ranks per module): ``up = sum_i |c_i| up_i``,
  ``down = sum_i c_i down_i`` with ``c_i = sqrt(alpha_i / alpha_0) * ratio_i``, alpha = the first file's. The
  product has cross terms ``up_i down_j``, so this is **an approximation** of applying the LoRAs together, and
  a ratio acts on both factors (ratio 0.5 alone gives 0.25 dW, as in sd-scripts); ``same_to_strength`` (as
  supermerger's option) uses ``sqrt(|ratio|)`` on both, so a lone LoRA keeps its strength.
- ``concat``: ranks add; part i's factors are scaled by ``sqrt(|s_i|)`` (sign on down), with
  ``s_i = ratio_i * alpha_i / rank_i``, and alpha = the new rank, so each part keeps its scale: the result equals
  applying the LoRAs together, exactly.
- ``svd`` (sd-scripts ``svd_merge_lora.py``): per module ``dW = sum_i ratio_i dW_i`` (any algorithm whose change
  does not need the base weight), truncated SVD to ``rank`` (``conv_rank`` for k x k convs), optional clamp at a
  quantile, alpha = rank. Exact when the rank reaches the sum of the ranks and nothing is clamped.

Modules are matched by their names as sd-scripts writes them (``names.canonical_module``), so files written in
different styles combine. Keys that belong to no module (bundled embeddings) are not carried over: they are
listed in the result.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, Sequence

import torch

from ..blocks import PresetBook
from .checks import check_output, require_clamp, require_device, require_rank, require_ranks_fit
from .common import LoraItem, Progress, ToolError, UsageError, as_item, block_table, dtype_of, same_family, step
from .lora_file import FileModule, LoraContents, infer_shape, read_lora
from .names import block_of_name
from .output import Saved, modelspec, network_metadata, save_lora, title_of
from .svd import low_rank

MODES = ("sum", "concat", "svd")


@dataclass
class MergeLorasResult:
    saved: Saved
    family: str | None
    mode: str
    modules: int
    ranks: dict[int, int] = field(default_factory=dict)  # rank -> number of modules
    dropped: list[str] = field(default_factory=list)  # input keys that belong to no module


@dataclass(frozen=True)
class _Part:
    """One input's module with its multiplier (ratio x block weight)."""

    source: Path
    module: FileModule
    multiplier: float


def _effective_alpha(module: FileModule) -> float:
    """alpha such that alpha / rank is the module's scale (a missing or zero alpha, or a ``scale`` key, included)."""
    return module.adapter().scale * module.rank


def _require_plain(part: _Part, mode: str) -> None:
    if not part.module.is_plain_lora:
        raise ToolError(f"{part.source}: module {part.module.name} ({', '.join(sorted(part.module.params))}) is not "
                        f"a plain LoRA; a {mode} merge takes up/down factors only (use mode 'svd')")


def _like(tensor: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """A 1x1 conv factor and a linear one hold the same numbers: bring ``tensor`` to ``reference``'s layout."""
    if tensor.dim() == reference.dim():
        return tensor
    return tensor.reshape(*tensor.shape[:2], *reference.shape[2:]) if reference.dim() == 4 else tensor.flatten(1)


def _sum(name: str, parts: Sequence[_Part], same_to_strength: bool) -> dict[str, torch.Tensor]:
    first = parts[0].module
    base_alpha = _effective_alpha(first)
    up = torch.zeros_like(first.params["lora_up.weight"], dtype=torch.float32)
    down = torch.zeros_like(first.params["lora_down.weight"], dtype=torch.float32)
    for part in parts:
        _require_plain(part, "sum")
        p_up, p_down = part.module.params["lora_up.weight"], part.module.params["lora_down.weight"]
        if p_down.shape[0] != down.shape[0]:
            raise ToolError(f"sum needs equal ranks: {name} has rank {down.shape[0]} in {parts[0].source} and "
                            f"{p_down.shape[0]} in {part.source} (use mode 'concat' or 'svd')")
        factor = math.sqrt(_effective_alpha(part.module) / base_alpha)
        m = part.multiplier
        if same_to_strength:
            c_up, c_down = factor * math.sqrt(abs(m)), factor * math.sqrt(abs(m)) * (1 if m >= 0 else -1)
        else:
            c_up, c_down = abs(factor * m), factor * m
        up += _like(p_up.float(), up) * c_up
        down += _like(p_down.float(), down) * c_down
    return {"lora_up.weight": up, "lora_down.weight": down, "alpha": torch.tensor(float(base_alpha))}


def _concat(name: str, parts: Sequence[_Part]) -> dict[str, torch.Tensor]:
    ups, downs = [], []
    for part in parts:
        _require_plain(part, "concat")
        scale = part.multiplier * part.module.adapter().scale
        root = math.sqrt(abs(scale))
        reference_up, reference_down = parts[0].module.params["lora_up.weight"], parts[0].module.params["lora_down.weight"]
        ups.append(_like(part.module.params["lora_up.weight"].float(), reference_up) * root)
        downs.append(_like(part.module.params["lora_down.weight"].float(), reference_down) * (root if scale >= 0 else -root))
    up, down = torch.cat(ups, dim=1), torch.cat(downs, dim=0)
    return {"lora_up.weight": up, "lora_down.weight": down, "alpha": torch.tensor(float(down.shape[0]))}


def _svd(name: str, parts: Sequence[_Part], rank: int, conv_rank: int, clamp_quantile: float | None,
         device: str) -> dict[str, torch.Tensor]:
    total: torch.Tensor | None = None
    for part in parts:
        delta = part.module.delta(device) * part.multiplier
        if total is not None and total.numel() != delta.numel():
            raise ToolError(f"{name}: the layer has shape {tuple(total.shape)} in {parts[0].source} but "
                            f"{tuple(delta.shape)} in {part.source}")
        total = delta if total is None else total + delta.reshape(total.shape)
    is_kxk = total.dim() == 4 and total.shape[2] * total.shape[3] > 1
    factors = low_rank(total, conv_rank if is_kxk else rank, clamp_quantile=clamp_quantile, device=device)
    return {"lora_up.weight": factors.up, "lora_down.weight": factors.down,
            "alpha": torch.tensor(float(factors.retained.rank))}


def _parts(contents: Sequence[LoraContents], items: Sequence[LoraItem], tables) -> dict[str, list[_Part]]:
    parts: dict[str, list[_Part]] = {}
    for lora, item, table in zip(contents, items, tables):
        for name, module in lora.modules.items():
            multiplier = item.ratio * (table.get(block_of_name(name), 1.0) if table else 1.0)
            if multiplier != 0:
                parts.setdefault(name, []).append(_Part(lora.path, module, multiplier))
    return parts


def _one_or_dynamic(values: set) -> str:
    return str(next(iter(values))) if len(values) == 1 else "Dynamic"


def merge_loras(loras: Sequence[LoraItem | str | os.PathLike], output: str | os.PathLike, *, mode: str = "svd",
                rank: int | None = None, conv_rank: int | None = None, clamp_quantile: float | None = 0.99,
                same_to_strength: bool = False, save_precision: str = "fp32", device: str = "cpu",
                presets: PresetBook | None = None, lora_dirs: Sequence[str | os.PathLike] = (),
                title: str | None = None, include_modelspec: bool = True,
                metadata: Mapping[str, str] | None = None, overwrite: bool = False,
                progress: Progress | None = None) -> MergeLorasResult:
    """Merge ``loras`` into one LoRA file (see the module docstring for the modes).

    ``clamp_quantile`` (svd only): None keeps every value. Raises LoraFileError, FamilyMismatchError (files of
    different families), ToolError (bad mode, unequal ranks for sum, algorithms a mode cannot take), ValueError.
    """
    if mode not in MODES:
        raise UsageError(f"unknown mode '{mode}' (choose from {', '.join(MODES)})")
    if mode == "svd" and not rank:
        raise UsageError("an svd merge needs the new rank (rank=..., --rank)")
    require_rank(rank, "the rank (--rank)")
    require_rank(conv_rank, "the conv rank (--conv-rank)")
    require_clamp(clamp_quantile if mode == "svd" else None)
    save_dtype = dtype_of(save_precision)
    require_device(device)
    items = [as_item(item, lora_dirs) for item in loras]
    if not items:
        raise UsageError("nothing to merge: give at least one LoRA")
    output = check_output(output, overwrite, [item.path for item in items])
    contents = [read_lora(item.path) for item in items]
    family = same_family([(c.path, c.family) for c in contents])
    if family is None and any(item.blocks for item in items):
        raise ToolError("block weights need to know the model family, and no input says it (no metadata)")
    tables = [block_table(item.blocks, family, presets) if family else None for item in items]
    parts = _parts(contents, items, tables)
    if mode == "svd":
        shapes = [shape for module_parts in parts.values() for part in module_parts
                  if (shape := infer_shape(part.module.name, part.module.params)) is not None]
        require_ranks_fit(rank, conv_rank, shapes, "the inputs")
    tensors: dict[str, torch.Tensor] = {}
    for done, (name, module_parts) in enumerate(sorted(parts.items()), 1):
        if mode == "sum":
            merged = _sum(name, module_parts, same_to_strength)
        elif mode == "concat":
            merged = _concat(name, module_parts)
        else:
            merged = _svd(name, module_parts, rank, conv_rank or rank, clamp_quantile, device)
        tensors.update({f"{name}.{param}": value for param, value in merged.items()})
        step(progress, done, len(parts), f"merge-loras ({mode})")
    if not tensors:
        raise ToolError("nothing to merge: every ratio is 0 or the files have no modules")
    ranks = [int(tensors[f"{name}.lora_down.weight"].shape[0]) for name in parts]
    alphas = {float(tensors[f"{name}.alpha"]) for name in parts}
    meta = _merge_metadata(contents, family, _one_or_dynamic(set(ranks)), _one_or_dynamic(alphas))
    if include_modelspec:
        meta.update(modelspec(family, title or Path(output).stem, merged_from=", ".join(title_of(i.path) for i in items),
                              v_parameterization=meta.get("ss_base_model_version") == "sd_v2_v"))
    meta.update(metadata or {})
    saved = save_lora(tensors, output, meta, save_dtype=save_dtype, overwrite=overwrite)
    dropped = [f"{c.path.name}: {key}" for c in contents for key in c.other]
    return MergeLorasResult(saved, family, mode, len(parts), {r: ranks.count(r) for r in sorted(set(ranks))}, dropped)


def _merge_metadata(contents: Sequence[LoraContents], family: str | None, dim: str, alpha: str) -> dict[str, str]:
    """sd-scripts' minimum metadata; the base model version of the first input that names one."""
    metadata = network_metadata(family, dim, alpha)
    version = next((c.metadata["ss_base_model_version"] for c in contents if "ss_base_model_version" in c.metadata), None)
    if version is not None:
        metadata["ss_base_model_version"] = version
    return metadata
