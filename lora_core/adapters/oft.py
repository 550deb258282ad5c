"""OFT and BOFT: the layer's output rows are rotated, ``W' = rescale * R W0``.

The layouts files contain (SPEC §5, §6):

- ``oft_blocks`` of shape (n, b, b): kohya's OFT and LyCORIS ``diag-oft``. Each block gives a skew-symmetric
  ``Q = B - B^T`` and a rotation by Cayley, ``R = (I + Q)(I - Q)^-1``. With ``alpha`` > 0 the norm of all of Q
  together is limited to ``alpha * out``. Block k of the output rows becomes ``R_k^T W0_k`` (both writers
  contract R's first index with the rows).
- ``oft_diag`` of shape (n, b, b): LyCORIS 2.0-2.1 saved the rotation itself (its ``get_r()``, any rescale folded
  in), applied the same way; no Cayley, no constraint.
- ``oft_blocks`` of shape (m, n, b, b): LyCORIS BOFT, m butterfly stages. Stage i pairs rows ``2^i * b/2`` apart,
  gathers them into n groups of b and applies ``R_{i,j}`` to each (not transposed).
- ``rescale`` (one value per output row, LyCORIS 3+) scales the rotated rows.

The multiplier enters linearly, ``W(m) = W0 + m * (W' - W0)``, as in A1111's built-in, and as the Patcher needs.
LyCORIS agrees for OFT without rescale (its ``(I + m (R - I))^T W0`` is the same line), but for BOFT it moves each
stage toward I (``I + m (R_i - I)``, a polynomial in m of degree m), and with ``rescale`` it leaves
``(rescale - 1) W0`` unscaled; at m = 1 all agree.

The bias is not rotated: only the weight changes, in LyCORIS's merged weight, kohya's OFT and A1111's built-in
(LyCORIS's own bypass forward rotates the output after the bias is added; we keep one meaning for both modes).

Bypass holds no delta: the change rotates the layer's output channels, ``dW x = (R^T - I)(W0 x)`` block by block
(stage by stage for BOFT, with the rescale), and ``W0 x = y - b`` is the layer's own output (``from_output``): a few
multiplies per output value (b per value for OFT, 2 b per stage for BOFT), through the same row arithmetic as the
merged delta.

Precision: ``R - I = 2 Q (I - Q)^-1`` is computed in float64 (blocks are small), and the BOFT delta is summed
stage by stage, so the change is never the difference of two large, nearly equal weights.
"""
from __future__ import annotations

from typing import Mapping

import torch

from ..errors import UnsupportedLayerError
from torch import nn

from .base import Adapter, Bypass, LayerOp, TargetInfo, channels_last, scalar, without_bias


def cayley_minus_identity(blocks: torch.Tensor, constraint: float) -> torch.Tensor:
    """``R - I`` for ``R = (I + Q)(I - Q)^-1``, ``Q = B - B^T`` (norm of Q capped at ``constraint`` when > 0)."""
    q = blocks.double()
    q = q - q.transpose(-1, -2)
    if constraint > 0:
        norm = q.norm() + 1e-8
        if norm > constraint:
            q = q * (constraint / norm)
    eye = torch.eye(q.shape[-1], dtype=q.dtype, device=q.device)
    # (I + Q)(I - Q)^-1 - I = 2 Q (I - Q)^-1: solve X (I - Q) = 2 Q
    return torch.linalg.solve(eye - q, 2 * q, left=False)


def rotate_blocks(weight: torch.Tensor, rotation_delta: torch.Tensor) -> torch.Tensor:
    """``(R_k - I)^T W_k`` for each block k of b consecutive output rows."""
    n, b, _ = rotation_delta.shape
    blocks = weight.reshape(n, b, -1)
    return torch.einsum("knm,knf->kmf", rotation_delta, blocks).reshape(weight.shape)


def butterfly_stage(weight: torch.Tensor, rotation_delta: torch.Tensor, stride: int) -> torch.Tensor:
    """One BOFT stage's change: rows ``stride`` apart are paired, grouped by b, and mixed by ``R_j - I``."""
    n, b, _ = rotation_delta.shape
    rows = weight.shape[0]
    flat = weight.reshape(rows // (2 * stride), 2, stride, -1).transpose(1, 2).reshape(n, b, -1)
    mixed = torch.einsum("nij,njf->nif", rotation_delta, flat)
    return mixed.reshape(rows // (2 * stride), stride, 2, -1).transpose(1, 2).reshape(weight.shape)


class OftAdapter(Adapter):
    algorithm = "oft"
    keys = frozenset({"oft_blocks", "oft_diag", "alpha", "rescale"})

    def __init__(self, blocks: torch.Tensor, is_rotation: bool, constraint: float,
                 rescale: torch.Tensor | None, target: TargetInfo):
        self.blocks = blocks
        self.is_rotation = is_rotation  # the file holds R itself (old ``oft_diag``)
        self.constraint = constraint
        self.rescale = rescale
        self.shape = target.shape

    @property
    def is_butterfly(self) -> bool:
        return self.blocks.dim() == 4

    @classmethod
    def load(cls, params: Mapping[str, torch.Tensor], target: TargetInfo) -> "OftAdapter | None":
        if "oft_blocks" in params:
            blocks, is_rotation = params["oft_blocks"], False
        elif "oft_diag" in params:
            blocks, is_rotation = params["oft_diag"], True
        else:
            return None
        out = target.shape[0]
        cls._check_blocks(blocks, is_rotation, out, target.name)
        alpha = scalar(params.get("alpha"))
        constraint = 0.0 if is_rotation or not alpha or alpha < 0 else alpha * out
        rescale = params.get("rescale")
        if rescale is not None and rescale.numel() != out:
            raise UnsupportedLayerError(f"{target.name}: OFT 'rescale' has {rescale.numel()} values, the layer "
                                        f"{out} output rows")
        return cls(blocks, is_rotation, constraint, rescale, target)

    @staticmethod
    def _check_blocks(blocks: torch.Tensor, is_rotation: bool, out: int, name: str) -> None:
        shape = tuple(blocks.shape)
        square = blocks.dim() in (3, 4) and shape[-1] == shape[-2]
        if not square or (is_rotation and blocks.dim() != 3):
            raise UnsupportedLayerError(f"{name}: OFT blocks of shape {shape} are not (n, b, b) or (m, n, b, b)")
        n, b = shape[-3], shape[-1]
        if n * b != out:
            raise UnsupportedLayerError(f"{name}: OFT blocks {shape} cover {n * b} rows, the layer has {out}")
        if blocks.dim() == 4:
            stages = shape[0]
            if b % 2 or out % ((2 ** (stages - 1)) * b):
                raise UnsupportedLayerError(f"{name}: BOFT blocks {shape} do not make a butterfly over {out} rows")

    def _rotation_delta(self, device: torch.device) -> torch.Tensor:
        """``R - I`` per block, float32 on ``device``; worked out in float64 on the CPU (the blocks are small, and
        some accelerators, MPS among them, have no float64)."""
        blocks = self.blocks.to("cpu", torch.float64)
        if self.is_rotation:
            delta = blocks - torch.eye(blocks.shape[-1], dtype=torch.float64)
        else:
            delta = cayley_minus_identity(blocks, self.constraint)
        return delta.to(device=device, dtype=torch.float32)

    def delta_weight(self, base: torch.Tensor, dyn: int | None = None) -> torch.Tensor:
        rescale = None if self.rescale is None else self.rescale.to(device=base.device, dtype=torch.float32)
        return row_delta(base.float(), self._rotation_delta(base.device), rescale)

    def low_rank_bypass(self, op: LayerOp, device: torch.device, dtype: torch.dtype,
                        dyn: int | None) -> Bypass | None:
        if op.is_norm:
            return None
        rescale = None if self.rescale is None else self.rescale.to(torch.float32).to(device=device, dtype=dtype)
        return OftForm(self._rotation_delta(device).to(dtype), rescale, op)

    @property
    def needs_base(self) -> bool:
        return True


def row_delta(w0: torch.Tensor, rotation_delta: torch.Tensor, rescale: torch.Tensor | None) -> torch.Tensor:
    """The change of the rows (output channels) of ``w0`` (rows first, anything after): the merged delta of a
    weight, or of the layer's outputs ``W0 x`` laid out as (out, samples)."""
    if rotation_delta.dim() == 3:
        delta = rotate_blocks(w0, rotation_delta)
    else:
        half = rotation_delta.shape[-1] // 2
        current, delta = w0, torch.zeros_like(w0)
        for i, stage in enumerate(rotation_delta):
            step = butterfly_stage(current, stage, (2 ** i) * half)
            current, delta = current + step, delta + step
    if rescale is None:
        return delta
    s = rescale.reshape(-1, *[1] * (w0.dim() - 1))
    return s * delta + (s - 1) * w0


class OftForm:
    """OFT/BOFT from the layer's output: ``row_delta`` of ``W0 x = y - b`` with the channels as rows."""

    __slots__ = ("rotation_delta", "rescale", "op", "macs")

    def __init__(self, rotation_delta: torch.Tensor, rescale: torch.Tensor | None, op: LayerOp):
        self.rotation_delta, self.rescale, self.op = rotation_delta, rescale, op
        self.macs = rotation_delta.numel()  # per output row: b per channel and stage

    def from_output(self, x: torch.Tensor, y: torch.Tensor, module: nn.Module) -> torch.Tensor | None:
        z = channels_last(without_bias(y, module, self.op), self.op)  # (..., out)
        rows = z.reshape(-1, z.shape[-1]).t()  # (out, samples)
        delta = row_delta(rows, self.rotation_delta, self.rescale).t().reshape(z.shape)
        return delta.movedim(-1, 1) if self.op.is_conv else delta
