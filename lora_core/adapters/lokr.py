"""LoKr (LyCORIS): ``dW = scale * kron(w1, w2)`` reshaped to the layer.

Facts (SPEC §5, §6; LyCORIS 4.1.3 ``modules/lokr.py``, ``functional/lokr.py`` and A1111's ``network_lokr.py``):

- ``w1`` (a, c) is ``lokr_w1`` or ``lokr_w1_a`` (a, r) @ ``lokr_w1_b`` (r, c).
- ``w2`` (b, d, ...) is ``lokr_w2`` (b, d) or, on a conv, (b, d, k, k); or ``lokr_w2_a`` (b, r) @ ``lokr_w2_b``
  (r, d * k * k); or Tucker: ``lokr_t2`` (r, r, k, k) with ``lokr_w2_a`` (r, b) and ``lokr_w2_b`` (r, d).
  A 4-d ``w2`` makes ``w1`` (a, c, 1, 1); a 2-d one gives (a * b, c * d * k * k), which is the layer's
  (out, in, k, k) in row-major order. Either way out = a * b.
- The scale alpha / r applies only when a factor is decomposed (r = the first dimension of ``lokr_w2_b``, else
  of ``lokr_w1_b``); with both factors full the scale is 1 whatever alpha says (LyCORIS writes alpha = its
  rank argument then and ignores it; A1111 has no rank then and uses 1). Alpha missing or 0 means 1.
- ``dora_scale``: DoRA as for LoRA. ``lokr_t1`` is in LyCORIS's key list but no LyCORIS version writes it: it is
  not read (so it is reported).

LyCORIS's ``get_diff_weight``/``merge_to`` apply the scale twice; its forward and A1111 once. We follow the
forward.

Factored form: bypass never forms the (out, in) delta. On a Linear,
``kron(w1, w2) @ vec(X) = vec(w1 @ X @ w2^T)`` with the input viewed as (c, d). On a convolution the input's
channels are c groups of d (in = c * d), and ``w2`` as a (b, d, k, k) kernel: each group is convolved with
``w2`` (the layer's stride, padding and dilation; the c groups as a batch), then ``w1`` mixes the groups,
``y[(i, j)] = sum_l w1[i, l] conv(x[(l, .)], w2[j])``. Where ``w1``/``w2`` are themselves factored the small
products are formed (they are a fraction of the layer). The cost model chooses it per layer against the dense
delta (``cost.factored_is_cheaper``); with DoRA it runs inside ``dora.DoraForm``. A merge adds ``kron(w1, w2)`` into the weight in one broadcast pass.
"""
from __future__ import annotations

from typing import Mapping

import torch

from ..errors import UnsupportedLayerError
import torch.nn.functional as F

from .base import Adapter, Bypass, LayerOp, TargetInfo, fit_shape, numel, scalar
from .dora import with_dora_form, with_dora_macs
from .lora import alpha_scale
from .loha import cast, tucker_rebuild, with_dora


class LokrAdapter(Adapter):
    algorithm = "lokr"
    keys = frozenset({"lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2",
                      "alpha", "scale", "dora_scale"})

    def __init__(self, params: Mapping[str, torch.Tensor], scale: float, w1_shape: tuple[int, int],
                 w2_shape: tuple[int, ...], target: TargetInfo):
        self.w1, self.w1a, self.w1b = params.get("lokr_w1"), params.get("lokr_w1_a"), params.get("lokr_w1_b")
        self.w2, self.w2a, self.w2b = params.get("lokr_w2"), params.get("lokr_w2_a"), params.get("lokr_w2_b")
        self.t2 = params.get("lokr_t2")
        self.dora_scale = params.get("dora_scale")
        self.scale = scale
        self.w1_shape, self.w2_shape = w1_shape, w2_shape
        self.shape = target.shape

    @classmethod
    def load(cls, params: Mapping[str, torch.Tensor], target: TargetInfo) -> "LokrAdapter | None":
        if not any(k.startswith("lokr_") for k in params):
            return None
        has_w1 = "lokr_w1" in params or ("lokr_w1_a" in params and "lokr_w1_b" in params)
        has_w2 = "lokr_w2" in params or ("lokr_w2_a" in params and "lokr_w2_b" in params)
        if not (has_w1 and has_w2):
            raise UnsupportedLayerError(f"{target.name}: incomplete LoKr (it needs lokr_w1 or lokr_w1_a/b, and "
                                        f"lokr_w2 or lokr_w2_a/b; the file has {', '.join(sorted(params))})")
        w1_shape, w2_shape = cls._factor_shapes(params, target.name)
        out = w1_shape[0] * w2_shape[0]
        if out != target.shape[0] or numel(w1_shape) * numel(w2_shape) != numel(target.shape):
            raise UnsupportedLayerError(f"{target.name}: the LoKr's factors {w1_shape} x {w2_shape} do not fit "
                                        f"the layer's {target.shape}")
        decomposed = [params[k] for k in ("lokr_w2_b", "lokr_w1_b") if k in params and k[:-2] not in params]
        rank = decomposed[0].shape[0] if decomposed else None
        alpha = scalar(params.get("alpha")) if rank else None  # both factors full: alpha is not used
        scale = alpha_scale(alpha, rank or 1, scalar(params.get("scale")))
        return cls(params, scale, w1_shape, w2_shape, target)

    @staticmethod
    def _factor_shapes(params: Mapping[str, torch.Tensor], name: str) -> tuple[tuple[int, int], tuple[int, ...]]:
        def bad(what: str) -> UnsupportedLayerError:
            shapes = ", ".join(f"{k} {tuple(v.shape)}" for k, v in sorted(params.items()) if k.startswith("lokr_"))
            return UnsupportedLayerError(f"{name}: LoKr {what} has inconsistent shapes ({shapes})")

        if "lokr_w1" in params:
            w1_shape = tuple(params["lokr_w1"].shape)
        else:
            a, b = params["lokr_w1_a"], params["lokr_w1_b"]
            if a.dim() != 2 or b.dim() != 2 or a.shape[1] != b.shape[0]:
                raise bad("w1")
            w1_shape = (a.shape[0], b.shape[1])
        if len(w1_shape) != 2:
            raise bad("w1")
        if "lokr_w2" in params:
            return w1_shape, tuple(params["lokr_w2"].shape)
        a, b, t = params["lokr_w2_a"], params["lokr_w2_b"], params.get("lokr_t2")
        if t is not None:
            if a.dim() != 2 or b.dim() != 2 or tuple(t.shape[:2]) != (a.shape[0], b.shape[0]):
                raise bad("w2")
            return w1_shape, (a.shape[1], b.shape[1], *t.shape[2:])
        if a.dim() != 2 or a.shape[1] != b.shape[0]:
            raise bad("w2")
        return w1_shape, (a.shape[0], numel(tuple(b.shape[1:])))

    # ------------------------------------------------------------------ weights
    def _w1(self, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        if self.w1 is not None:
            return cast(self.w1, device, dtype)
        return cast(self.w1a, device, dtype) @ cast(self.w1b, device, dtype)

    def _w2(self, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        if self.w2 is not None:
            return cast(self.w2, device, dtype)
        a, b = cast(self.w2a, device, dtype), cast(self.w2b, device, dtype)
        if self.t2 is not None:
            return tucker_rebuild(cast(self.t2, device, dtype), a, b)
        return a @ b.reshape(b.shape[0], -1)

    def _plain_delta(self, device: torch.device) -> torch.Tensor:
        w1, w2 = self._w1(device, torch.float32), self._w2(device, torch.float32)
        w1 = w1.reshape(*w1.shape, *[1] * (w2.dim() - w1.dim()))
        return fit_shape(torch.kron(w1, w2.contiguous()) * self.scale, self.shape, "LoKr")

    def delta_weight(self, base: torch.Tensor, dyn: int | None = None) -> torch.Tensor:
        return with_dora(self._plain_delta(base.device), base, self.dora_scale)

    def add_delta(self, out: torch.Tensor, base: torch.Tensor, multiplier: float, dyn: int | None = None) -> None:
        alpha = multiplier * self.scale
        if self.dora_scale is not None or not abs(alpha) <= torch.finfo(torch.float32).max:
            return super().add_delta(out, base, multiplier, dyn)
        w1, w2 = self._w1(out.device, torch.float32), self._w2(out.device, torch.float32)
        (a, c), b = self.w1_shape, self.w2_shape[0]
        # out[(i, j), (l, q)] += alpha * w1[i, l] * w2[j, q]: one broadcast pass, no product formed
        grid = out.view(a, b, c, -1)
        grid.addcmul_(w1.reshape(a, 1, c, 1), w2.reshape(1, b, 1, -1), value=alpha)

    @property
    def needs_base(self) -> bool:
        return self.dora_scale is not None

    def factored_macs(self, op: LayerOp) -> int | None:
        """Multiply-adds per output row of the Kronecker form on ``op``'s layer, None where it has none."""
        (a, c), b = self.w1_shape, self.w2_shape[0]
        inner = numel(self.shape[1:]) // c  # d * k * k: what w2 reads per group
        if op.is_norm or inner * c != numel(self.shape[1:]):
            return None
        if op.is_conv and (op.kwargs.get("groups", 1) != 1 or self.shape[1] % c
                           or numel(self.w2_shape[1:]) != inner):
            return None
        return c * b * inner + a * c * b

    def low_rank_bypass(self, op: LayerOp, device: torch.device, dtype: torch.dtype,
                        dyn: int | None) -> Bypass | None:
        macs = self._form_macs(op)
        if macs is None:
            return None
        w1 = (self._w1(device, torch.float32) * self.scale).to(dtype)  # the scale folded into the small factor
        w2 = self._w2(device, torch.float32).to(dtype)
        if not op.is_conv:
            plain = KronLinearBypass(w1, w2.reshape(w2.shape[0], -1), macs)
        else:
            plain = KronConvBypass(w1, w2.reshape(w2.shape[0], self.shape[1] // self.w1_shape[1], *self.shape[2:]),
                                   op.kwargs, macs)
        return with_dora_form(plain, self._plain_delta, self.dora_scale, op, self.shape)

    def _form_macs(self, op: LayerOp) -> int | None:
        """``factored_macs`` where bypass runs the Kronecker form, else None."""
        from ..cost import factored_is_cheaper  # (cost imports the adapters)

        macs = self.factored_macs(op)
        return macs if macs is not None and factored_is_cheaper(macs, self.shape) else None

    def bypass_macs(self, op: LayerOp, dyn: int | None) -> int | None:
        return with_dora_macs(self._form_macs(op), self.dora_scale, op, self.shape)


class KronLinearBypass:
    """``h(x) = vec(w1 @ X @ w2^T)``, X the input row viewed as (c, d): ``kron(w1, w2) @ x`` (scale in ``w1``)."""

    __slots__ = ("w1", "w2", "macs")

    def __init__(self, w1: torch.Tensor, w2: torch.Tensor, macs: int):
        self.w1, self.w2, self.macs = w1, w2, macs

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        (a, c), b = self.w1.shape, self.w2.shape[0]
        grid = F.linear(x.reshape(*x.shape[:-1], c, -1), self.w2)  # (..., c, b) = X @ w2^T
        return torch.matmul(self.w1, grid).reshape(*x.shape[:-1], a * b)


class KronConvBypass:
    """A convolution by ``kron(w1, w2)`` (``w2`` a (b, d, k, k) kernel, scale in ``w1``) without forming it: the
    input's c channel groups convolved with ``w2`` as one batch, then mixed by ``w1``."""

    __slots__ = ("w1", "w2", "kw", "macs")

    def __init__(self, w1: torch.Tensor, w2: torch.Tensor, kw, macs: int):
        self.w1, self.w2, self.kw, self.macs = w1, w2, kw, macs

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        batched = x.dim() == 4
        if not batched:
            x = x.unsqueeze(0)
        n, (a, c), (b, d) = x.shape[0], self.w1.shape, self.w2.shape[:2]
        kw = self.kw
        z = F.conv2d(x.reshape(n * c, d, *x.shape[2:]), self.w2, None, kw["stride"], kw["padding"], kw["dilation"])
        h, w = z.shape[2:]
        y = torch.matmul(self.w1, z.reshape(n, c, -1)).reshape(n, a * b, h, w)  # (n, a, b * h * w)
        return y if batched else y.squeeze(0)
