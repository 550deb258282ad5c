"""Norm (LyCORIS "norm"): trained changes of a GroupNorm's or LayerNorm's affine weight and bias.

``w_norm`` is the weight change and ``b_norm`` (optional) the bias change, both (C,), added as they are
(LyCORIS 4.1.3 ``modules/norms.py``: ``W0 + m * w_norm``; A1111's ``network_norm.py`` the same, though it
only loads files that have both keys): Full's math under other names, on norm layers only. The bypass needs no
special form: a norm's output is linear in its affine parameters,
``norm(x; W0 + dW, B0 + dB) = norm(x; W0, B0) + norm(x; dW, dB)``.
"""
from __future__ import annotations

from typing import ClassVar

from ..errors import UnsupportedLayerError
from .base import TargetInfo
from .full import FullAdapter


class NormAdapter(FullAdapter):
    algorithm = "norm"
    weight_key: ClassVar[str] = "w_norm"
    bias_key: ClassVar[str] = "b_norm"
    keys = frozenset({weight_key, bias_key})

    @classmethod
    def check_target(cls, target: TargetInfo) -> None:
        if not target.op.is_norm:
            raise UnsupportedLayerError(f"{target.name}: w_norm/b_norm apply to GroupNorm and LayerNorm layers, "
                                        f"not to a {target.op.kind} layer")
