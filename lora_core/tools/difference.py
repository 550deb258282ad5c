"""Add difference: ``A + M * (B - C)`` over three checkpoints, M per block optional (supermerger / A1111's merger).

Every floating tensor that A, B and C all have with one shape gets the formula, computed in the compute precision
(``(B - C)`` first, then ``* M``, then ``A +``); the others (A's integer tensors, keys B or C lack or shape
differently, e.g. an inpainting model's input conv) are A's, and listed in the result. With block weights
(a preset or a list), a key's M is its block's weight (``BASE`` for the text encoders); keys outside the blocks
(time embedding, output, VAE...) take ``multiplier``. Streamed like ``merge``: about three input tensors and one
output tensor in memory at a time.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Mapping

from ..blocks import PresetBook
from ..errors import LoraFileError
from .checkpoint import CheckpointReader, StreamingWriter, all_specs, save_dtype_for
from .checks import check_output, require_device, require_finite
from .common import Progress, block_table, dtype_of, same_family, step
from .output import Saved


@dataclass
class DifferenceResult:
    saved: Saved
    family: str | None
    from_a: list[str] = field(default_factory=list)  # floating keys copied from A (missing or shaped otherwise)


def _multiplier(reader: CheckpointReader, key: str, multiplier: float, table: Mapping[str, float] | None) -> float:
    if table is None:
        return multiplier
    return table.get(reader.index.block_of_key(key), multiplier)


def _differs(key: str, a: CheckpointReader, other: CheckpointReader) -> bool:
    return key not in other or other.shape(key) != a.shape(key)


def _require_shared_tensors(a: CheckpointReader, b: CheckpointReader, c: CheckpointReader) -> None:
    """B and C share some floating tensor with A (else the result would be a copy of A): a LoraFileError naming
    the file that shares none."""
    floating = [key for key in a.keys() if a.dtype(key).is_floating_point]
    for reader, role in ((b, "B"), (c, "C")):
        if floating and all(_differs(key, a, reader) for key in floating):
            raise LoraFileError(reader.path, f"({role}) shares no tensor (same name and shape) with A ({a.path}): "
                                             "the result would be a copy of A")


def add_difference(a: str | os.PathLike, b: str | os.PathLike, c: str | os.PathLike, output: str | os.PathLike, *,
                   multiplier: float = 1.0, blocks: str | None = None, presets: PresetBook | None = None,
                   save_precision: str = "fp16", compute_precision: str = "fp32", device: str = "cpu",
                   metadata: Mapping[str, str] | None = None, overwrite: bool = False,
                   progress: Progress | None = None) -> DifferenceResult:
    """Write ``output`` = ``a + M * (b - c)`` (see the module docstring).

    Raises LoraFileError, FamilyMismatchError (checkpoints of different families), ToolError, ValueError.
    """
    require_finite(multiplier, "the multiplier (--multiplier)")
    save_dtype, compute = dtype_of(save_precision), dtype_of(compute_precision)
    require_device(device)
    output = check_output(output, overwrite, [a, b, c])
    with CheckpointReader(a) as ra, CheckpointReader(b) as rb, CheckpointReader(c) as rc:
        for reader, role in ((ra, "A"), (rb, "B"), (rc, "C")):
            reader.require_model(f"{role} of add-difference")
        family = same_family([(r.path, r.family) for r in (ra, rb, rc)])
        table = block_table(blocks, family, presets) if blocks else None
        _require_shared_tensors(ra, rb, rc)
        specs = all_specs(ra, save_dtype_for(save_dtype))
        from_a: list[str] = []
        meta = {k: v for k, v in ra.metadata.items() if not k.startswith(("sshs_", "modelspec."))}
        meta.update(metadata or {})
        with StreamingWriter(output, specs, meta, overwrite=overwrite) as writer:
            for done, key in enumerate(writer.order, 1):
                tensor = ra.get(key)
                if tensor.is_floating_point():
                    if not (_differs(key, ra, rb) or _differs(key, ra, rc)):
                        m = _multiplier(ra, key, multiplier, table)
                        base = tensor.to(device, compute)
                        tensor = (base + m * (rb.get(key).to(device, compute) - rc.get(key).to(device, compute))).cpu()
                    else:
                        from_a.append(key)
                writer.write(key, tensor.to(specs[key][0]))
                step(progress, done, len(writer.order), "add-difference")
            hashes = writer.finish()
    return DifferenceResult(Saved(output, *hashes), family, from_a)
