"""GLoRA: ``dW = scale * (W0 A + B)`` with two low-rank matrices, A on the input channels and B like a LoRA.

Facts (SPEC §5; LyCORIS ``GLoRAModule``): the layer computes ``W0 (x + A x) + B x``. LyCORIS 3+ names the
factors up-then-down: ``a1`` (in, r) and ``a2`` (r, in) make ``A = a1 a2``; ``b1`` (out, r, 1, 1) and ``b2``
(r, in, k, k) make ``B = b1 b2`` (a conv's k x k kernel lives in ``b2``; an optional ``bm`` (r, r, k, k) with a
1x1 ``b2`` is B's Tucker core). LyCORIS 2.x, which A1111's built-in follows, named them down-then-up: ``a1``
(r, in), ``a2`` (in, r), ``b1`` (r, in), ``b2`` (out, r), for linear and 1x1 conv layers; the two layouts are told
apart by their shapes, the newer one winning when both fit. A conv's A acts on the input channels of every
kernel tap: ``(W0 A)[o, j, ...] = sum_i W0[o, i, ...] A[i, j]``.

scale = alpha / r with r the rank of A, alpha missing or 0 meaning 1, as LyCORIS (both versions' merge) and
ComfyUI read it; A1111's built-in ignores alpha here (it never sets a rank for GLoRA), so there a file with
alpha != r acts r / alpha times as strongly as here.
"""
from __future__ import annotations

from typing import Mapping

import torch

from ..errors import UnsupportedLayerError
from .base import Adapter, TargetInfo, fit_shape, numel, scalar
from .lora import alpha_scale

NAMES = ("a1.weight", "a2.weight", "b1.weight", "b2.weight")


def _flat(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(t.shape[0], -1)


def _layout(a1, a2, b1, b2, shape: tuple[int, ...]) -> tuple | None:
    """(A up, A down, B up, B down) if the tensors fit the layer as LyCORIS 3+ or as 2.x names them."""
    out, inp = shape[0], shape[1]

    def fits(a_up, a_down, b_up, b_down) -> bool:
        return (a_up.shape[0] == inp and a_down.shape[1] == inp and a_up.shape[1] == a_down.shape[0]
                and b_up.shape[0] == out and b_down.shape[1] == inp and b_up.shape[1] == b_down.shape[0])

    if fits(a1, a2, b1, b2):
        return a1, a2, b1, b2
    if fits(a2, a1, b2, b1):
        return a2, a1, b2, b1
    return None


class GLoraAdapter(Adapter):
    algorithm = "glora"
    keys = frozenset({*NAMES, "bm.weight", "alpha"})

    def __init__(self, a_up: torch.Tensor, a_down: torch.Tensor, b_up: torch.Tensor, b_down: torch.Tensor,
                 b_mid: torch.Tensor | None, scale: float, target: TargetInfo):
        self.a_up, self.a_down = a_up, a_down
        self.b_up, self.b_down, self.b_mid = b_up, b_down, b_mid
        self.scale = scale
        self.shape = target.shape

    @classmethod
    def load(cls, params: Mapping[str, torch.Tensor], target: TargetInfo) -> "GLoraAdapter | None":
        if not all(name in params for name in NAMES):
            return None
        if len(target.shape) < 2:
            raise UnsupportedLayerError(f"{target.name}: GLoRA needs a linear or conv layer, not shape {target.shape}")
        tensors = [params[name] for name in NAMES]
        layout = _layout(*tensors, target.shape)
        if layout is None:
            shapes = ", ".join(f"{n} {tuple(t.shape)}" for n, t in zip(NAMES, tensors))
            raise UnsupportedLayerError(f"{target.name}: GLoRA factors ({shapes}) do not fit the layer's "
                                        f"{target.shape}")
        a_up, a_down, b_up, b_down = layout
        b_mid = params.get("bm.weight")
        kernel = tuple(b_mid.shape[2:]) if b_mid is not None else tuple(b_down.shape[2:])
        full = (b_up.shape[0], b_down.shape[1], *kernel)
        if b_mid is not None and tuple(b_mid.shape[:2]) != (b_down.shape[0],) * 2:
            raise UnsupportedLayerError(f"{target.name}: GLoRA 'bm.weight' {tuple(b_mid.shape)} does not match the "
                                        f"rank {b_down.shape[0]}")
        if numel(full) != numel(target.shape):
            raise UnsupportedLayerError(f"{target.name}: GLoRA's B has shape {full}, the layer {target.shape}")
        scale = alpha_scale(scalar(params.get("alpha")), a_down.shape[0])
        return cls(a_up, a_down, b_up, b_down, b_mid, scale, target)

    def _b_delta(self, device: torch.device) -> torch.Tensor:
        up = _flat(self.b_up.to(device=device, dtype=torch.float32))
        down = _flat(self.b_down.to(device=device, dtype=torch.float32))
        if self.b_mid is None:
            return fit_shape(up @ down, self.shape, "GLoRA B")
        mid = self.b_mid.to(device=device, dtype=torch.float32)
        return fit_shape(torch.einsum("nmkl,in,mj->ijkl", mid, up, down), self.shape, "GLoRA B")

    def delta_weight(self, base: torch.Tensor, dyn: int | None = None) -> torch.Tensor:
        device = base.device
        a_up = _flat(self.a_up.to(device=device, dtype=torch.float32))
        a_down = _flat(self.a_down.to(device=device, dtype=torch.float32))
        w0_a = torch.einsum("oi...,ij->oj...", base.float(), a_up @ a_down)
        return (w0_a + self._b_delta(device)) * self.scale

    @property
    def needs_base(self) -> bool:
        return True
