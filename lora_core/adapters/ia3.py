"""(IA)^3: a learned vector scales the layer's output channels, or its input channels when ``on_input``.

Facts (SPEC §5, §6; LyCORIS ``IA3Module``): ``W' = W0 * (1 + m * w)`` along the output rows (or the input
columns), so ``dW = W0 * w`` depends on the layer's own weight. LyCORIS stores ``w`` as (C,) for a linear layer
and (1, C, 1, 1) for a conv, and ``on_input`` as an integer scalar; a file without ``on_input`` scales outputs.
The bias is left alone, as in LyCORIS's merged weight and A1111's built-in (LyCORIS's own bypass forward scales
the output after the bias is added, so on a layer with a bias it is not the merged weight; we keep one meaning).
"""
from __future__ import annotations

from typing import Mapping

import torch

from ..errors import UnsupportedLayerError
from .base import Adapter, TargetInfo, scalar


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
