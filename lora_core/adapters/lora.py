"""LoRA and LoCon: ``dW = scale * up @ down`` (conv: a k x k down and a 1 x 1 up), Tucker ``lora_mid``, DoRA.

Facts (SPEC §5, §6): scale = ``scale`` key if present, else alpha / rank, with a missing or zero alpha meaning
1; ``dyn`` keeps the first ranks but not the scale; a ``bias`` key is a weight-shaped term added before the
scale (as A1111 and LyCORIS read it); DoRA rescales ``W0 + dW`` to the stored magnitude, per input column when
``dora_scale`` is shaped (1, in, ...) (kohya/LyCORIS, the built-in) and per output row when it is (out, 1)
(PEFT, LyCORIS ``wd_on_out``); the multiplier then scales ``W' - W0``.
"""
from __future__ import annotations

from typing import Mapping

import torch

from ..errors import UnsupportedLayerError
from .base import Adapter, Bypass, LayerOp, TargetInfo, factored_bypass, fit_shape, numel, scalar
from .dora import dora_rescale, with_dora_form, with_dora_macs


def alpha_scale(alpha: float | None, rank: int, explicit: float | None = None) -> float:
    if explicit is not None:
        return explicit
    if alpha is None or alpha == 0:
        return 1.0
    return alpha / rank


class LoraAdapter(Adapter):
    algorithm = "lora"
    keys = frozenset({"lora_up.weight", "lora_down.weight", "lora_mid.weight", "alpha", "scale",
                      "dora_scale", "bias"})

    def __init__(self, up: torch.Tensor, down: torch.Tensor, mid: torch.Tensor | None, scale: float,
                 dora_scale: torch.Tensor | None, bias: torch.Tensor | None, target: TargetInfo):
        self.up, self.down, self.mid = up, down, mid
        self.scale = scale
        self.dora_scale = dora_scale
        self.bias = bias
        self.shape = target.shape
        self.rank = down.shape[0]

    @classmethod
    def load(cls, params: Mapping[str, torch.Tensor], target: TargetInfo) -> "LoraAdapter | None":
        if "lora_up.weight" not in params or "lora_down.weight" not in params:
            return None
        up, down, mid = params["lora_up.weight"], params["lora_down.weight"], params.get("lora_mid.weight")
        rank = down.shape[0]
        if up.shape[1] != rank or (mid is not None and tuple(mid.shape[:2]) != (rank, rank)):
            raise UnsupportedLayerError(f"{target.name}: inconsistent LoRA ranks (up {tuple(up.shape)}, "
                                        f"down {tuple(down.shape)}" + (f", mid {tuple(mid.shape)})" if mid is not None else ")"))
        kernel = tuple(mid.shape[2:]) if mid is not None else tuple(down.shape[2:])
        full = (up.shape[0], down.shape[1], *kernel)
        if numel(full) != numel(target.shape):
            raise UnsupportedLayerError(f"{target.name}: the LoRA's shape {full} does not fit the layer's {target.shape}")
        scale = alpha_scale(scalar(params.get("alpha")), rank, scalar(params.get("scale")))
        bias = params.get("bias")
        if bias is not None and bias.numel() != numel(target.shape):
            raise UnsupportedLayerError(f"{target.name}: 'bias' has shape {tuple(bias.shape)}, the layer {target.shape}")
        return cls(up, down, mid, scale, params.get("dora_scale"), bias, target)

    # ------------------------------------------------------------------ weights
    def _rank(self, dyn: int | None) -> int:
        return self.rank if dyn is None else max(0, min(dyn, self.rank))

    def _factors(self, device: torch.device, dtype: torch.dtype, dyn: int | None):
        r = self._rank(dyn)
        up = self.up.to(device=device, dtype=dtype).reshape(self.up.shape[0], -1)[:, :r]
        down = self.down.to(device=device, dtype=dtype)[:r]
        mid = None if self.mid is None else self.mid.to(device=device, dtype=dtype)[:r, :r]
        return up, down, mid

    def _plain_delta(self, device: torch.device, dyn: int | None) -> torch.Tensor:
        up, down, mid = self._factors(device, torch.float32, dyn)
        if mid is None:
            dw = up @ down.reshape(down.shape[0], -1)
            if down.dim() == 4:
                dw = dw.reshape(up.shape[0], down.shape[1], *down.shape[2:])
        else:
            dw = torch.einsum("nmkl,in,mj->ijkl", mid, up, down.reshape(down.shape[0], -1))
        dw = fit_shape(dw, self.shape, "LoRA")
        if self.bias is not None:
            dw = dw + self.bias.to(device=device, dtype=torch.float32).reshape(self.shape)
        return dw * self.scale

    def delta_weight(self, base: torch.Tensor, dyn: int | None = None) -> torch.Tensor:
        dw = self._plain_delta(base.device, dyn)
        if self.dora_scale is None:
            return dw
        base32 = base.float()
        return dora_rescale(base32 + dw, base32, self.dora_scale.to(base.device))

    def add_delta(self, out: torch.Tensor, base: torch.Tensor, multiplier: float, dyn: int | None = None) -> None:
        alpha = multiplier * self.scale
        if self.dora_scale is not None or self.bias is not None or self.mid is not None or \
                not abs(alpha) <= torch.finfo(torch.float32).max:  # addmm_ refuses what float32 cannot hold
            return super().add_delta(out, base, multiplier, dyn)
        up, down, _ = self._factors(out.device, torch.float32, dyn)
        # one fused pass: out (out_dim x rest) += (m * scale) * up @ down
        out.view(out.shape[0], -1).addmm_(up, down.reshape(down.shape[0], -1), alpha=alpha)

    @property
    def needs_base(self) -> bool:
        return self.dora_scale is not None

    def low_rank_bypass(self, op: LayerOp, device: torch.device, dtype: torch.dtype,
                        dyn: int | None) -> Bypass | None:
        if not self._has_factored_form(op):
            return None
        up, down, mid = self._factors(device, dtype, dyn)
        if op.is_conv and mid is None and down.dim() == 2:
            down = down.reshape(down.shape[0], down.shape[1], 1, 1)
        plain = factored_bypass(op, down, up, self.scale, mid)
        return with_dora_form(plain, lambda d: self._plain_delta(d, dyn), self.dora_scale, op, self.shape)

    def _has_factored_form(self, op: LayerOp) -> bool:
        """A bias delta or a norm layer takes the dense delta."""
        return self.bias is None and not op.is_norm

    def bypass_macs(self, op: LayerOp, dyn: int | None) -> int | None:
        if not self._has_factored_form(op):
            return None
        r = self._rank(dyn)  # up (out, r), down (r, in [* k * k]), a Tucker core (r, r, k, k)
        plain = r * (self.up.shape[0] + numel(self.down.shape[1:]))
        if self.mid is not None:
            plain += r * r * numel(self.mid.shape[2:])
        return with_dora_macs(plain, self.dora_scale, op, self.shape)
