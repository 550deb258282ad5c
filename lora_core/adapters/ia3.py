"""(IA)^3: a learned vector scales the layer's output channels, or its input channels when ``on_input``.

Facts (SPEC §5, §6; LyCORIS ``IA3Module``): ``W' = W0 * (1 + m * w)`` along the output rows (or the input
columns), so ``dW = W0 * w`` depends on the layer's own weight. LyCORIS stores ``w`` as (C,) for a linear layer
and (1, C, 1, 1) for a conv, and ``on_input`` as an integer scalar; a file without ``on_input`` scales outputs.
The bias is left alone, as in LyCORIS's merged weight and A1111's built-in (LyCORIS's own bypass forward scales
the output after the bias is added, so on a layer with a bias it is not the merged weight; we keep one meaning).

Bypass holds no delta: on outputs, ``dW x = w * (W0 x) = w * (y - b)`` from the layer's own output (``from_output``,
one multiply per value); on inputs, ``dW x = W0 (w * x)``, the layer's own weight on the scaled input (the dense
delta's cost, without holding it).
"""
from __future__ import annotations

from typing import Mapping

import torch

from ..errors import UnsupportedLayerError
from torch import nn

from .base import Adapter, Bypass, LayerOp, TargetInfo, numel, own_weight, scalar, without_bias


class IA3Adapter(Adapter):
    algorithm = "ia3"
    keys = frozenset({"weight", "on_input"})

    def __init__(self, scale: torch.Tensor, on_input: bool, target: TargetInfo):
        self.scale = scale
        self.on_input = on_input
        self.shape = target.shape

    @classmethod
    def load(cls, params: Mapping[str, torch.Tensor], target: TargetInfo) -> "IA3Adapter | None":
        if "weight" not in params:
            return None
        flag = scalar(params.get("on_input"))
        on_input = flag is not None and flag != 0
        if len(target.shape) < 2:
            raise UnsupportedLayerError(f"{target.name}: IA3 needs a linear or conv layer, not shape {target.shape}")
        axis = 1 if on_input else 0
        scale = params["weight"]
        if scale.numel() != target.shape[axis]:
            side = "input" if on_input else "output"
            raise UnsupportedLayerError(f"{target.name}: IA3 'weight' has {scale.numel()} values, the layer has "
                                        f"{target.shape[axis]} {side} channels")
        return cls(scale, on_input, target)

    def _broadcast_shape(self) -> tuple[int, ...]:
        ones = [1] * len(self.shape)
        axis = 1 if self.on_input else 0
        ones[axis] = self.shape[axis]
        return tuple(ones)

    def delta_weight(self, base: torch.Tensor, dyn: int | None = None) -> torch.Tensor:
        w = self.scale.to(device=base.device, dtype=torch.float32).reshape(self._broadcast_shape())
        return base.float() * w

    @property
    def needs_base(self) -> bool:
        return True

    def low_rank_bypass(self, op: LayerOp, device: torch.device, dtype: torch.dtype,
                        dyn: int | None) -> Bypass | None:
        if op.is_norm:
            return None
        return IA3Form(self.scale.to(torch.float32).to(device=device, dtype=dtype).reshape(-1), self.on_input, op,
                       self.shape)

    def bypass_macs(self, op: LayerOp, dyn: int | None) -> int | None:
        return None if op.is_norm else IA3Form.macs_of(self.on_input, self.shape)


class IA3Form:
    """IA3 from the layer: ``w * (y - b)`` on outputs, ``W0 (w * x)`` on inputs (None where the layer's weight is
    not in the input's dtype, e.g. float8 storage: the caller then uses the dense delta)."""

    __slots__ = ("w", "on_input", "op", "macs")

    def __init__(self, w: torch.Tensor, on_input: bool, op: LayerOp, shape: tuple[int, ...]):
        self.w, self.on_input, self.op = w, on_input, op
        self.macs = self.macs_of(on_input, shape)

    @staticmethod
    def macs_of(on_input: bool, shape: tuple[int, ...]) -> int:
        """Per row: the layer's own op again on the scaled input, or a multiply per output."""
        return numel(shape) if on_input else shape[0]

    def _along_channels(self) -> torch.Tensor:
        return self.w.reshape(-1, 1, 1) if self.op.is_conv else self.w

    def from_output(self, x: torch.Tensor, y: torch.Tensor, module: nn.Module) -> torch.Tensor | None:
        if not self.on_input:
            return without_bias(y, module, self.op) * self._along_channels()
        weight = own_weight(module, x)
        return None if weight is None else self.op(x * self._along_channels(), weight)
