"""LoHa (LyCORIS): ``dW = scale * (w1a @ w1b) * (w2a @ w2b)``, a Hadamard product of two low-rank matrices.

Facts (SPEC §5, §6; LyCORIS 4.1.3 ``modules/loha.py`` and A1111's ``network_hada.py`` agree on all but alpha 0):

- plain: ``hada_w1_a`` (out, r), ``hada_w1_b`` (r, in * k * k); same for ``w2``. A conv's delta is the
  (out, in * k * k) product reshaped to the layer (older files may store ``w1_b`` as (r, in, k, k)).
- Tucker (k x k convs): ``hada_t1`` (r, r, k, k) with ``hada_w1_a`` (r, out) and ``hada_w1_b`` (r, in):
  ``rebuild[p, q, ...] = sum_ij t[i, j, ...] w1_a[i, p] w1_b[j, q]``; same for ``t2``.
- scale = alpha / r with r = ``hada_w1_b``'s first dimension; alpha missing or 0 means 1 (LyCORIS; A1111
  reads alpha 0 as scale 0, which no trainer writes on purpose).
- ``dora_scale``: DoRA on ``W0 + dW`` (lora.py's ``dora_rescale``), then the multiplier scales ``W' - W0``.

LyCORIS's ``get_diff_weight``/``merge_to`` multiply this delta by the scale a second time (scale**2); its
forward, which training used, and A1111 apply it once. We follow the forward.
"""
from __future__ import annotations

from typing import Mapping

import torch

from ..errors import UnsupportedLayerError
from .base import Adapter, TargetInfo, fit_shape, numel, scalar
from .lora import alpha_scale, dora_rescale


def cast(t: torch.Tensor, device: torch.device, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``t`` in ``dtype`` on ``device``, cast where it lives before it moves: a bf16 file never becomes a bf16
    tensor on the compute device (MPS on older macOS has no bf16)."""
    return t.to(dtype=dtype).to(device=device)


def with_dora(dw: torch.Tensor, base: torch.Tensor, magnitude: torch.Tensor | None) -> torch.Tensor:
    """The delta at multiplier 1, DoRA-rescaled when the file has a ``dora_scale``."""
    if magnitude is None:
        return dw
    base32 = base.float()
    return dora_rescale(base32 + dw, base32, cast(magnitude, dw.device))


def tucker_rebuild(t: torch.Tensor, wa: torch.Tensor, wb: torch.Tensor) -> torch.Tensor:
    """(out, in, k, k) from a core ``t`` (r, r, k, k), ``wa`` (r, out) and ``wb`` (r, in)."""
    return torch.einsum("ij...,ip,jq->pq...", t, wa, wb)


class LohaAdapter(Adapter):
    algorithm = "loha"
    keys = frozenset({"hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2", "alpha",
                      "scale", "dora_scale"})
    _factors = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b")

    def __init__(self, params: Mapping[str, torch.Tensor], scale: float, target: TargetInfo):
        self.w1a, self.w1b = params["hada_w1_a"], params["hada_w1_b"]
        self.w2a, self.w2b = params["hada_w2_a"], params["hada_w2_b"]
        self.t1, self.t2 = params.get("hada_t1"), params.get("hada_t2")
        self.dora_scale = params.get("dora_scale")
        self.scale = scale
        self.shape = target.shape

    @classmethod
    def load(cls, params: Mapping[str, torch.Tensor], target: TargetInfo) -> "LohaAdapter | None":
        if not any(k in params for k in cls._factors):
            return None
        tucker = ("hada_t1", "hada_t2") if "hada_t1" in params or "hada_t2" in params else ()
        missing = [k for k in cls._factors + tucker if k not in params]
        if missing:
            raise UnsupportedLayerError(f"{target.name}: incomplete LoHa, missing {', '.join(missing)}")
        halves = [cls._half_shape(params, i, target.name) for i in (1, 2)]
        if any(numel(h) != numel(target.shape) or h[0] != target.shape[0] for h in halves):
            raise UnsupportedLayerError(f"{target.name}: the LoHa's halves have shapes {halves[0]} and {halves[1]}, "
                                        f"the layer {target.shape}")
        rank = params["hada_w1_b"].shape[0]
        scale = alpha_scale(scalar(params.get("alpha")), rank, scalar(params.get("scale")))
        return cls(params, scale, target)

    @staticmethod
    def _half_shape(params: Mapping[str, torch.Tensor], i: int, name: str) -> tuple[int, ...]:
        wa, wb, t = params[f"hada_w{i}_a"], params[f"hada_w{i}_b"], params.get(f"hada_t{i}")
        if t is not None:
            ok = wa.dim() == wb.dim() == 2 and tuple(t.shape[:2]) == (wa.shape[0], wb.shape[0])
            shape = (wa.shape[1], wb.shape[1], *t.shape[2:])
        else:
            ok = wa.dim() == 2 and wa.shape[1] == wb.shape[0]
            shape = (wa.shape[0], *wb.shape[1:])
        if not ok:
            shapes = f"a {tuple(wa.shape)}, b {tuple(wb.shape)}" + (f", t {tuple(t.shape)}" if t is not None else "")
            raise UnsupportedLayerError(f"{name}: LoHa w{i} has inconsistent ranks ({shapes})")
        return shape

    @staticmethod
    def _rebuild(wa: torch.Tensor, wb: torch.Tensor, t: torch.Tensor | None, device: torch.device) -> torch.Tensor:
        if t is not None:
            return tucker_rebuild(cast(t, device), cast(wa, device), cast(wb, device))
        return cast(wa, device) @ cast(wb, device).reshape(wb.shape[0], -1)

    def delta_weight(self, base: torch.Tensor, dyn: int | None = None) -> torch.Tensor:
        device = base.device
        w1 = self._rebuild(self.w1a, self.w1b, self.t1, device)
        w2 = self._rebuild(self.w2a, self.w2b, self.t2, device)
        dw = fit_shape(w1 * w2 * self.scale, self.shape, "LoHa")
        return with_dora(dw, base, self.dora_scale)

    @property
    def needs_base(self) -> bool:
        return self.dora_scale is not None
