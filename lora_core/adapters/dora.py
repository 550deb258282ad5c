"""DoRA in bypass without a full-size delta (issue #22).

DoRA's delta at multiplier 1 is ``dW' = (W0 + dW) * S - W0``, ``S = magnitude / ||W0 + dW||`` (``lora.dora_rescale``;
the multiplier then scales ``dW'``, as A1111 reads it). ``S`` depends on the base weight and the file, not on the
multiplier, so it is computed once per base weight (the norms need ``W0 + dW`` once, one layer at a time) and the
delta is then applied through the plain low-rank form ``h(x) = dW x``:

- one norm per output row (PEFT, LyCORIS ``wd_on_out``): ``dW' x = (S - 1) * (W0 x) + S * h(x)``, read from the
  layer's own output ``y = W0 x + b`` (a few operations per value);
- one norm per input column (kohya, LyCORIS, the built-in; for a convolution per input channel over its
  ``out x k x k`` weights): ``dW' x = W0 ((S - 1) * x) + h(S * x)``: the layer's own weight on a scaled input, one
  more pass of the layer's op, as the dense delta would cost, and nothing full-size held.

Like IA3 and OFT it reads the layer (``from_output``): over merged weights the hook uses the dense delta instead.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from ..errors import UnsupportedLayerError
from .base import Bypass, LayerOp, numel, own_weight, without_bias


def per_output_row(magnitude: torch.Tensor, shape: tuple[int, ...]) -> bool | None:
    """True: one norm per output row; False: one per input column; None: the magnitude fits neither."""
    if magnitude.dim() >= 2 and magnitude.shape[0] == 1 and magnitude.shape[1] == shape[1]:
        return False
    if magnitude.numel() == shape[0]:
        return True
    return None


def dora_rescale(merged: torch.Tensor, base: torch.Tensor, magnitude: torch.Tensor) -> torch.Tensor:
    """``W' - W0`` where ``W' = merged * magnitude / ||merged||``: the dense DoRA delta.

    A magnitude shaped (1, in, ...) holds one norm per input column (kohya, LyCORIS, A1111); one shaped (out,)
    or (out, 1, ...) one per output row (PEFT, LyCORIS ``wd_on_out``).
    """
    out_dim, in_dim = merged.shape[0], merged.shape[1]
    mag = magnitude.to(merged)
    on_out = per_output_row(mag, tuple(merged.shape))
    if on_out is None:
        raise UnsupportedLayerError(f"dora_scale of shape {tuple(mag.shape)} fits neither {in_dim} input columns "
                                    f"nor {out_dim} output rows")
    if on_out:
        norm = merged.reshape(out_dim, -1).norm(dim=1).reshape(out_dim, *[1] * (merged.dim() - 1))
    else:
        norm = merged.transpose(0, 1).reshape(in_dim, -1).norm(dim=1)
        norm = norm.reshape(1, in_dim, *[1] * (merged.dim() - 2))
    return merged * (mag.reshape(norm.shape) / norm) - base


class DoraForm:
    """``h(x)`` of a DoRA delta from the plain form ``plain`` (``dW x``, multiplier 1) and the scales ``S``, which
    ``plain_delta(device)`` (``dW`` in float32, the layer's shape) gives once per base weight."""

    __slots__ = ("plain", "plain_delta", "magnitude", "op", "shape", "on_out", "_key", "_scales")

    def __init__(self, plain: Bypass, plain_delta: Callable[[torch.device], torch.Tensor], magnitude: torch.Tensor,
                 op: LayerOp, shape: tuple[int, ...], on_out: bool):
        self.plain, self.plain_delta, self.magnitude = plain, plain_delta, magnitude
        self.op, self.shape, self.on_out = op, tuple(shape), on_out
        self._key: tuple | None = None
        self._scales: tuple[torch.Tensor, torch.Tensor] | None = None

    @property
    def macs(self) -> int:
        return self.plain.macs + _scaling_macs(self.shape, self.on_out)

    def scales(self, weight: torch.Tensor, device: torch.device, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """``(S, S - 1)`` shaped along the channels they scale, in ``dtype``; computed in float32 when the base
        weight (its storage or contents) changed since the last call."""
        key = (weight.data_ptr(), weight._version, weight.dtype, device, dtype)
        if self._key != key or self._scales is None:
            with torch.no_grad():
                merged = weight.detach().to(device=device, dtype=torch.float32) + self.plain_delta(device)
                out_dim, in_dim = self.shape[0], self.shape[1]
                if self.on_out:
                    norm = merged.reshape(out_dim, -1).norm(dim=1)
                else:
                    norm = merged.transpose(0, 1).reshape(in_dim, -1).norm(dim=1)
                del merged
                s = self.magnitude.to(device=device, dtype=torch.float32).reshape(-1) / norm
                if self.op.is_conv:
                    s = s.reshape(-1, 1, 1)
                self._scales = (s.to(dtype), (s - 1).to(dtype))
            self._key = key
        return self._scales

    def from_output(self, x: torch.Tensor, y: torch.Tensor, module: nn.Module) -> torch.Tensor | None:
        weight = own_weight(module, x)
        if weight is None:
            return None
        s, s_minus_1 = self.scales(weight, x.device, x.dtype)
        if self.on_out:
            h = self.plain(x)
            return h.mul_(s).add_(without_bias(y, module, self.op) * s_minus_1)
        h = self.op(x * s_minus_1, weight)
        return h.add_(self.plain(x * s))


def _scaling_macs(shape: tuple[int, ...], on_out: bool) -> int:
    """Per row, beyond the plain form: a multiply per output (rows), or the layer's own op again (columns)."""
    return shape[0] if on_out else numel(shape)


def _form_side(magnitude: torch.Tensor, op: LayerOp, shape: tuple[int, ...]) -> bool | None:
    """``DoraForm.on_out`` of the form that fits this layer, None where none does (the dense delta)."""
    on_out = per_output_row(magnitude, shape)
    if on_out is None or op.is_norm or (not on_out and op.kwargs.get("groups", 1) != 1):
        return None
    return on_out


def with_dora_form(plain: Bypass | None, plain_delta: Callable[[torch.device], torch.Tensor],
                   magnitude: torch.Tensor | None, op: LayerOp, shape: tuple[int, ...]) -> Bypass | None:
    """``plain`` where the file has no DoRA magnitude; its DoRA form where one fits; else None (the dense delta)."""
    if magnitude is None or plain is None:
        return plain
    on_out = _form_side(magnitude, op, shape)
    return None if on_out is None else DoraForm(plain, plain_delta, magnitude, op, shape, on_out)


def with_dora_macs(plain_macs: int | None, magnitude: torch.Tensor | None, op: LayerOp,
                   shape: tuple[int, ...]) -> int | None:
    """``with_dora_form(...).macs`` from the plain form's, without building either."""
    if magnitude is None or plain_macs is None:
        return plain_macs
    on_out = _form_side(magnitude, op, shape)
    return None if on_out is None else plain_macs + _scaling_macs(shape, on_out)
