"""LoHa (LyCORIS): ``dW = scale * (w1a @ w1b) * (w2a @ w2b)``, a Hadamard product of two low-rank matrices.

Facts (SPEC §5, §6; LyCORIS 4.1.3 ``modules/loha.py`` and A1111's ``network_hada.py`` agree on all but alpha 0):

- plain: ``hada_w1_a`` (out, r), ``hada_w1_b`` (r, in * k * k); same for ``w2``. A conv's delta is the
  (out, in * k * k) product reshaped to the layer (older files may store ``w1_b`` as (r, in, k, k)).
- Tucker (k x k convs): ``hada_t1`` (r, r, k, k) with ``hada_w1_a`` (r, out) and ``hada_w1_b`` (r, in):
  ``rebuild[p, q, ...] = sum_ij t[i, j, ...] w1_a[i, p] w1_b[j, q]``; same for ``t2``.
- scale = alpha / r with r = ``hada_w1_b``'s first dimension; alpha missing or 0 means 1 (LyCORIS; A1111
  reads alpha 0 as scale 0, which no trainer writes on purpose).
- ``dora_scale``: DoRA on ``W0 + dW`` (``dora.dora_rescale``), then the multiplier scales ``W' - W0``.

LyCORIS's ``get_diff_weight``/``merge_to`` multiply this delta by the scale a second time (scale**2); its
forward, which training used, and A1111 apply it once. We follow the forward.

Factored form: a Hadamard product of two low-rank matrices has rank at most r1 * r2, with explicit factors (the
row-wise Kronecker, or face-splitting, product): ``(A1 B1) * (A2 B2) = (A1 . A2)(B1^T . B2^T)^T`` where column
``i * r2 + j`` of ``A1 . A2`` is ``A1[:, i] * A2[:, j]``. So bypass runs it as a LoRA of rank r1 * r2 (a conv's
k x k kernel in the down factor) where that multiplies each row by fewer numbers than the dense delta
(``cost.factored_is_cheaper``), and a merge adds it in one ``addmm_``. The Tucker variant is a Tucker LoRA of
rank r1a * r2a by r1b * r2b: the outer factors face-split the same way and the core is the pairwise product of the
two cores, ``T[(i, i'), (j, j')] = t1[i, j] * t2[i', j']``. With DoRA the form runs inside ``dora.DoraForm``
(the norms of ``W0 + dW`` once per base weight, no delta held).
"""
from __future__ import annotations

from typing import Mapping

import torch

from ..errors import UnsupportedLayerError
from .base import Adapter, Bypass, LayerOp, TargetInfo, face_split, factored_bypass, fit_shape, numel, scalar
from .dora import dora_rescale, with_dora_form, with_dora_macs
from .lora import alpha_scale


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

    def _plain_delta(self, device: torch.device) -> torch.Tensor:
        w1 = self._rebuild(self.w1a, self.w1b, self.t1, device)
        w2 = self._rebuild(self.w2a, self.w2b, self.t2, device)
        return fit_shape(w1.mul_(w2).mul_(self.scale), self.shape, "LoHa")

    def delta_weight(self, base: torch.Tensor, dyn: int | None = None) -> torch.Tensor:
        return with_dora(self._plain_delta(base.device), base, self.dora_scale)

    def factors(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """``(up, down, mid)`` in float32 with ``dW = scale * up @ [mid] @ down``: up (out, R1), down (R2, in * k * k)
        or, with a Tucker core, down (R2, in) and mid (R1, R2, k, k)."""
        w1a, w2a = cast(self.w1a, device), cast(self.w2a, device)
        w1b = cast(self.w1b, device).reshape(self.w1b.shape[0], -1)
        w2b = cast(self.w2b, device).reshape(self.w2b.shape[0], -1)
        if self.t1 is None:
            return face_split(w1a, w2a), face_split(w1b.T, w2b.T).T, None
        t1, t2 = cast(self.t1, device), cast(self.t2, device)
        (a1, b1), (a2, b2) = t1.shape[:2], t2.shape[:2]
        core = (t1[:, None, :, None] * t2[None, :, None, :]).reshape(a1 * a2, b1 * b2, *t1.shape[2:])
        return face_split(w1a.T, w2a.T), face_split(w1b.T, w2b.T).T, core

    def factored_macs(self) -> int:
        """Multiply-adds per row of the factored form."""
        r1, r2 = self.w1b.shape[0], self.w2b.shape[0]
        if self.t1 is None:
            return r1 * r2 * (self.shape[0] + numel(self.shape[1:]))
        (a1, b1), (a2, b2) = self.t1.shape[:2], self.t2.shape[:2]
        return a1 * a2 * self.shape[0] + a1 * a2 * b1 * b2 * numel(self.shape[2:]) + b1 * b2 * self.shape[1]

    def add_delta(self, out: torch.Tensor, base: torch.Tensor, multiplier: float, dyn: int | None = None) -> None:
        alpha = multiplier * self.scale
        if self.dora_scale is not None or self.t1 is not None or not abs(alpha) <= torch.finfo(torch.float32).max:
            return super().add_delta(out, base, multiplier, dyn)
        up, down, _ = self.factors(out.device)
        if up.shape[1] >= min(up.shape[0], down.shape[1]):  # no cheaper than the two products
            w1 = self._rebuild(self.w1a, self.w1b, None, out.device)
            w1.mul_(self._rebuild(self.w2a, self.w2b, None, out.device))
            out.view(out.shape[0], -1).add_(w1, alpha=alpha)
            return
        # one fused pass over the weight: out += (m * scale) * up @ down, rank r1 * r2
        out.view(out.shape[0], -1).addmm_(up, down, alpha=alpha)

    def low_rank_bypass(self, op: LayerOp, device: torch.device, dtype: torch.dtype,
                        dyn: int | None) -> Bypass | None:
        if not self._has_factored_form(op):
            return None
        up, down, mid = (None if t is None else t.to(dtype) for t in self.factors(device))
        if op.is_conv and mid is None:
            down = down.reshape(down.shape[0], *self.shape[1:])
        plain = factored_bypass(op, down, up, self.scale, mid)
        return with_dora_form(plain, self._plain_delta, self.dora_scale, op, self.shape)

    def _has_factored_form(self, op: LayerOp) -> bool:
        from ..cost import factored_is_cheaper  # (cost imports the adapters)

        if op.is_norm or not factored_is_cheaper(self.factored_macs(), self.shape):
            return False
        return self.t1 is None or (op.is_conv and op.kwargs.get("groups", 1) == 1)

    def bypass_macs(self, op: LayerOp, dyn: int | None) -> int | None:
        if not self._has_factored_form(op):
            return None
        return with_dora_macs(self.factored_macs(), self.dora_scale, op, self.shape)  # the factors' sizes

    @property
    def needs_base(self) -> bool:
        return self.dora_scale is not None
