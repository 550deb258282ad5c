"""Full (LyCORIS "full", a.k.a. full fine-tune diff): the file stores the whole weight change.

``diff`` is ``W_trained - W0`` shaped like the layer, ``diff_b`` (optional) the bias change. No alpha or rank
scale applies (LyCORIS 4.1.3 ``modules/full.py`` has none; A1111's ``network_full.py`` has no rank, so its
alpha-based scale is 1). ``norm.py`` is the same algorithm under other key names.
"""
from __future__ import annotations

from typing import ClassVar, Mapping

import torch

from ..errors import UnsupportedLayerError
from .base import Adapter, TargetInfo, fit_shape, numel
from .loha import cast


class FullAdapter(Adapter):
    algorithm = "full"
    weight_key: ClassVar[str] = "diff"
    bias_key: ClassVar[str] = "diff_b"
    keys = frozenset({weight_key, bias_key})

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, target: TargetInfo):
        self.weight, self.bias = weight, bias
        self.shape = target.shape

    @classmethod
    def load(cls, params: Mapping[str, torch.Tensor], target: TargetInfo) -> "FullAdapter | None":
        if cls.weight_key not in params:
            return None
        cls.check_target(target)
        weight, bias = params[cls.weight_key], params.get(cls.bias_key)
        if weight.numel() != numel(target.shape):
            raise UnsupportedLayerError(f"{target.name}: '{cls.weight_key}' has shape {tuple(weight.shape)}, "
                                        f"the layer {target.shape}")
        if bias is not None and bias.numel() != target.shape[0]:
            raise UnsupportedLayerError(f"{target.name}: '{cls.bias_key}' has shape {tuple(bias.shape)}, the layer "
                                        f"has {target.shape[0]} outputs")
        return cls(weight, bias, target)

    @classmethod
    def check_target(cls, target: TargetInfo) -> None:
        """Any layer with a weight will do."""

    def delta_weight(self, base: torch.Tensor, dyn: int | None = None) -> torch.Tensor:
        return fit_shape(cast(self.weight, base.device), self.shape, self.algorithm)

    def delta_bias(self, base_bias: torch.Tensor | None, device: torch.device) -> torch.Tensor | None:
        return None if self.bias is None else cast(self.bias, device).reshape(-1)
