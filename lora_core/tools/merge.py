"""Bake LoRAs into a checkpoint: ``W' = W + sum_i ratio_i * blockweight_i(layer) * dW_i(W)``.

Each LoRA is mapped onto the checkpoint by the code that maps it onto the live model (``CheckpointIndex``), so
every algorithm the runtime applies is merged, with the same math (``Adapter.delta_weight`` of the checkpoint's
own weight: DoRA, OFT, IA3 and GLoRA included; the bias change of full/norm too). All deltas of a tensor are
computed from its original value, as the runtime does. Block weights (a preset name or a list) use the blocks of
``blocks.block_of``; layers outside the blocks keep the ratio.

Memory: tensors are read one at a time and the output is streamed to disk (``checkpoint.StreamingWriter``), so
the peak is about the largest tensor (a few copies of it in the compute precision) on top of the Python process,
whatever the size of the checkpoint; ``bench/bench_tools.py`` measures it.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, Sequence

import torch

from ..adapters import Adapter
from ..blocks import PresetBook, block_of
from ..errors import FamilyMismatchError
from ..io import model_hash, read_metadata
from ..network import Network, load_network
from .checkpoint import CheckpointIndex, CheckpointReader, StreamingWriter, TensorSlice, all_specs, save_dtype_for
from .checks import check_output, require_device
from .common import FamiliesDifferError, LoraItem, Progress, UsageError, as_item, block_table, dtype_of, step
from .lora_file import require_lora
from .output import Saved, modelspec, title_of

RECIPE_KEY = "lora_core_merge"


@dataclass(frozen=True)
class _Change:
    """One adapter's change of one checkpoint tensor (or of its rows)."""

    where: TensorSlice
    adapter: Adapter
    multiplier: float
    bias: bool = False


@dataclass
class MergedLora:
    name: str
    path: str
    ratio: float
    blocks: str | None
    layers: int
    report: str


@dataclass
class MergeIntoResult:
    saved: Saved
    family: str
    loras: list[MergedLora] = field(default_factory=list)


def _has_bias_delta(adapter: Adapter) -> bool:
    return type(adapter).delta_bias is not Adapter.delta_bias


def _load(item: LoraItem, index: CheckpointIndex, checkpoint: Path) -> Network:
    try:
        return load_network(item.path, index, item.name)
    except FamilyMismatchError as e:
        raise FamiliesDifferError(e.path, e.file_family, str(checkpoint), index.family) from None


def plan_changes(items: Sequence[LoraItem], index: CheckpointIndex, checkpoint: Path,
                 presets: PresetBook | None = None) -> tuple[dict[str, list[_Change]], list[MergedLora]]:
    """Checkpoint key -> the changes to make to it, and what each LoRA contributes."""
    changes: dict[str, list[_Change]] = {}
    merged: list[MergedLora] = []
    for item in items:
        network = _load(item, index, checkpoint)
        table = block_table(item.blocks, index.family, presets)
        layers = 0
        for target, adapter in network.adapters.items():
            multiplier = item.ratio * (table.get(block_of(index, target), 1.0) if table else 1.0)
            if multiplier == 0:
                continue
            layers += 1
            weight = index.weight_key(target)
            changes.setdefault(weight.key, []).append(_Change(weight, adapter, multiplier))
            bias = index.bias_key(target) if _has_bias_delta(adapter) else None
            if bias is not None:
                changes.setdefault(bias.key, []).append(_Change(bias, adapter, multiplier, bias=True))
        merged.append(MergedLora(item.name, str(item.path), item.ratio, item.blocks, layers,
                                 network.report.summary()))
    return changes, merged


def apply_changes(tensor: torch.Tensor, changes: Sequence[_Change], compute: torch.dtype,
                  device: torch.device | str) -> torch.Tensor:
    """``tensor`` plus every change, computed in ``compute`` on ``device``; each delta from the original value."""
    base = tensor.to(device)
    out = base.to(compute, copy=True)
    base32 = base.float()
    for change in changes:
        original = change.where.of(base32)
        if change.bias:
            delta = change.adapter.delta_bias(original, base32.device)
        else:
            delta = change.adapter.delta_weight(original)
        if delta is None:
            continue
        view = change.where.of(out)
        view += (change.multiplier * delta).to(compute).reshape(view.shape)
    return out.cpu()


def _lora_hash(path: Path) -> str:
    stored = read_metadata(path).get("sshs_model_hash") if path.suffix.lower() == ".safetensors" else None
    return (stored or model_hash(path))[:12]


def _metadata(reader: CheckpointReader, output: Path, merged: Sequence[MergedLora], precisions: Mapping[str, str],
              extra: Mapping[str, str] | None) -> dict[str, str]:
    kept = {k: v for k, v in reader.metadata.items() if not k.startswith(("modelspec.", "sshs_"))}
    recipe = {"checkpoint": reader.path.name, **precisions,
              "loras": [{"name": m.name, "hash": _lora_hash(Path(m.path)), "ratio": m.ratio, "blocks": m.blocks}
                        for m in merged]}
    merged_from = ", ".join([title_of(reader.path)] + [title_of(m.path) for m in merged])
    return {**kept, **modelspec(reader.family, output.stem, lora=False, merged_from=merged_from),
            RECIPE_KEY: json.dumps(recipe), **(extra or {})}


def merge_into(checkpoint: str | os.PathLike, loras: Sequence[LoraItem | str | os.PathLike], output: str | os.PathLike, *,
               save_precision: str = "fp16", compute_precision: str = "fp32", device: str = "cpu",
               presets: PresetBook | None = None, lora_dirs: Sequence[str | os.PathLike] = (),
               metadata: Mapping[str, str] | None = None, overwrite: bool = False,
               progress: Progress | None = None) -> MergeIntoResult:
    """Write ``output``: ``checkpoint`` with ``loras`` (``LoraItem`` s or ``name:ratio[:blocks]`` texts) baked in.

    Floating tensors are saved in ``save_precision`` (fp16, bf16, fp32), others as they are. Raises LoraFileError
    (missing/unreadable file, output exists without ``overwrite``), FamilyMismatchError (a LoRA for another
    family), KeyMappingError (a LoRA with nothing for this model), ToolError, ValueError (bad block weights).
    """
    save_dtype, compute = dtype_of(save_precision), dtype_of(compute_precision)
    require_device(device)
    items = [as_item(item, lora_dirs) for item in loras]
    if not items:
        raise UsageError("nothing to merge: give at least one LoRA")
    output = check_output(output, overwrite, [checkpoint, *(item.path for item in items)])
    for item in items:
        require_lora(item.path)
    with CheckpointReader(checkpoint) as reader:
        reader.require_model("the checkpoint to merge into")
        index = reader.index
        changes, merged = plan_changes(items, index, reader.path, presets)
        specs = all_specs(reader, save_dtype_for(save_dtype))
        meta = _metadata(reader, output, merged, {"save_precision": save_precision,
                                                  "compute_precision": compute_precision}, metadata)
        with StreamingWriter(output, specs, meta, overwrite=overwrite) as writer:
            total = len(writer.order)
            for done, key in enumerate(writer.order, 1):
                tensor = reader.get(key)
                if key in changes:
                    tensor = apply_changes(tensor, changes[key], compute, device)
                writer.write(key, tensor.to(specs[key][0]))
                step(progress, done, total, "merge-into")
            hashes = writer.finish()
    return MergeIntoResult(Saved(output, *hashes), index.family, merged)
