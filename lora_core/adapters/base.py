"""What every algorithm shares: the layer's functional op, and the Adapter interface.

An Adapter holds one file's tensors for one target layer. It is immutable; the strength (multiplier) is
never stored in it but applied by the Patcher, because every algorithm's change is linear in its multiplier:
``W(m) = W0 + m * delta_weight(W0)`` and, in bypass form, ``y(m) = y0 + m * op(x, delta_weight)`` or the
cheaper low-rank ``y0 + m * h(x)`` where an algorithm has one.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import UnsupportedLayerError

Bypass = Callable[[torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class LayerOp:
    """How a layer turns its input into output given a weight (and bias): computed once per layer."""

    kind: str  # 'linear', 'conv2d', 'group_norm', 'layer_norm'
    kwargs: Mapping[str, Any] = field(default_factory=dict)

    @classmethod
    def of(cls, module: nn.Module, part: str | None = None) -> "LayerOp":
        if isinstance(module, nn.MultiheadAttention) or isinstance(module, nn.Linear):
            return cls("linear")
        if isinstance(module, nn.Conv2d):
            return cls("conv2d", {"stride": module.stride, "padding": module.padding,
                                  "dilation": module.dilation, "groups": module.groups})
        if isinstance(module, nn.GroupNorm):
            return cls("group_norm", {"num_groups": module.num_groups, "eps": module.eps})
        if isinstance(module, nn.LayerNorm):
            return cls("layer_norm", {"normalized_shape": module.normalized_shape, "eps": module.eps})
        raise UnsupportedLayerError(f"layer type {type(module).__name__} is not supported")

    def __call__(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        if self.kind == "linear":
            return F.linear(x, weight, bias)
        if self.kind == "conv2d":
            return F.conv2d(x, weight, bias, **self.kwargs)
        if self.kind == "group_norm":
            return F.group_norm(x, self.kwargs["num_groups"], weight, bias, self.kwargs["eps"])
        return F.layer_norm(x, self.kwargs["normalized_shape"], weight, bias, self.kwargs["eps"])

    @property
    def is_conv(self) -> bool:
        return self.kind == "conv2d"

    @property
    def is_norm(self) -> bool:
        return self.kind in ("group_norm", "layer_norm")


@dataclass(frozen=True)
class TargetInfo:
    """What an adapter may know of its target when it is loaded: the weight's shape and the op."""

    name: str
    shape: tuple[int, ...]
    op: LayerOp


def numel(shape: tuple[int, ...]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def fit_shape(delta: torch.Tensor, shape: tuple[int, ...], what: str) -> torch.Tensor:
    """Reshape a delta to the target's shape (a 1x1 conv and a linear layer hold the same numbers)."""
    if tuple(delta.shape) == tuple(shape):
        return delta
    if delta.numel() != numel(shape):
        raise UnsupportedLayerError(f"{what}: the file gives shape {tuple(delta.shape)}, the layer has {tuple(shape)}")
    return delta.reshape(shape)


#: Input channels of a UNet's first convolution that take more than the latent: an inpainting model's 9 (latent,
#: mask, masked image) and instruct-pix2pix's 8 (latent, image), mapped to the latent's 4, which is what a LoRA
#: trained on the base model changes. The extra channels come after the latent's (ldm concatenates them behind it).
WIDER_INPUT_CHANNELS = {9: 4, 8: 4}


def narrowed_input(target: TargetInfo) -> TargetInfo | None:
    """The target as a LoRA of the base model sees it when the layer takes extra conditioning channels
    (``WIDER_INPUT_CHANNELS``), else None."""
    shape = target.shape
    latent = WIDER_INPUT_CHANNELS.get(shape[1]) if target.op.is_conv and len(shape) == 4 else None
    if latent is None or target.op.kwargs.get("groups", 1) != 1:
        return None
    return TargetInfo(target.name, (shape[0], latent, *shape[2:]), target.op)


class Adapter(ABC):
    """One algorithm's weights for one layer."""

    algorithm: ClassVar[str]
    #: parameter names (as in the file, after key normalisation) this algorithm reads
    keys: ClassVar[frozenset[str]]

    @classmethod
    @abstractmethod
    def load(cls, params: Mapping[str, torch.Tensor], target: TargetInfo) -> "Adapter | None":
        """Build from the tensors of one file module; None when this algorithm's keys are absent."""

    @abstractmethod
    def delta_weight(self, base: torch.Tensor, dyn: int | None = None) -> torch.Tensor:
        """The change of the weight at multiplier 1, in float32 on ``base``'s device, shaped like ``base``."""

    def add_delta(self, out: torch.Tensor, base: torch.Tensor, multiplier: float, dyn: int | None = None) -> None:
        """``out += multiplier * delta_weight(base)`` (``out`` float32 and contiguous, shaped like ``base``, whatever
        the layer's memory layout); algorithms may fuse it."""
        out.add_(self.delta_weight(base, dyn) * multiplier)  # (alpha= refuses values beyond float32)

    def delta_bias(self, base_bias: torch.Tensor | None, device: torch.device) -> torch.Tensor | None:
        """The change of the bias at multiplier 1 (float32), or None."""
        return None

    @property
    def needs_base(self) -> bool:
        """Whether the delta depends on the layer's own weight (DoRA, OFT, IA3): then it is computed per layer."""
        return False

    def low_rank_bypass(self, op: LayerOp, device: torch.device, dtype: torch.dtype,
                        dyn: int | None) -> Bypass | None:
        """``h(x)`` at multiplier 1 without forming the full delta, or None when the algorithm has no such form."""
        return None

    def bypass_macs(self, op: LayerOp, dyn: int | None) -> int | None:
        """Multiply-adds per row (token or pixel) of ``low_rank_bypass``'s form on ``op``'s layer (its ``macs``, or
        the adapter's numbers where the form does not say), None where there is no such form: what the automatic
        mode and the cost model ask of every target the first time a file is used. This default builds the form on
        the meta device (shapes only, yet 0.2-0.4 ms a layer through PyTorch's reference kernels: a quarter of a
        second for a full-preset SD1.5 LoHa); LoRA, LoHa, LoKr and IA3 answer from their shapes, held to this
        default by tests/test_factored_bypass.py."""
        form = self.low_rank_bypass(op, torch.device("meta"), torch.float32, dyn)
        if form is None:
            return None
        macs = getattr(form, "macs", None)
        return sum(t.numel() for t in self.tensors()) if macs is None else macs

    def tensors(self) -> list[torch.Tensor]:
        """The tensors this adapter holds (for memory accounting)."""
        return [v for v in vars(self).values() if isinstance(v, torch.Tensor)]


class LinearBypass:
    """``h(x) = scale * up(down(x))`` of a low-rank Linear delta. ``add_to`` accumulates ``m * h(x)`` into the
    layer's own output with one GEMM (``addmm_``) instead of a second matmul, two scalings and an addition:
    the per-layer cost of bypass is mostly such small operations."""

    __slots__ = ("down", "up", "scale")

    def __init__(self, down: torch.Tensor, up: torch.Tensor, scale: float):
        self.down, self.up, self.scale = down, up, scale

    @property
    def macs(self) -> int:
        """Multiply-adds per row (token or pixel): what the cost model weighs against the dense delta's."""
        return self.down.numel() + self.up.numel()

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(F.linear(x, self.down), self.up) * self.scale

    def add_to(self, out: torch.Tensor, x: torch.Tensor, m: float) -> None:
        h = F.linear(x, self.down)
        alpha = m * self.scale
        if out.dtype == h.dtype and out.is_contiguous() and out.dim() >= 1 and out.shape[:-1] == h.shape[:-1]:
            out.view(-1, out.shape[-1]).addmm_(h.reshape(-1, h.shape[-1]), self.up.t(), alpha=alpha)
        else:
            out.add_(F.linear(h, self.up), alpha=alpha)


class PointwiseConvBypass:
    """``h(x) = scale * up(down(x))`` of a low-rank delta on a 1x1 convolution (stride 1, no padding, one group:
    SD1.5's ``proj_in``/``proj_out``): matmuls over the pixels instead of two convolutions. A CPU convolution
    reorders its weight on every call, which made these tiny convolutions the largest part of the UNet's bypass
    cost (SD1.5, 8x8 latent: 2.5x to 4x slower than the matmuls). Both memory layouts take matmuls: a contiguous
    (NCHW) tensor is a batch of channel-by-pixel matrices, a channels-last one (what proj_in gets inside A1111
    on the CPU test bed, without --opt-channelslast) is a pixel-by-channel matrix, where the layer is a Linear."""

    __slots__ = ("down", "up", "scale")

    def __init__(self, down: torch.Tensor, up: torch.Tensor, scale: float):
        self.down, self.up, self.scale = down.reshape(down.shape[0], -1), up.reshape(up.shape[0], -1), scale

    @property
    def macs(self) -> int:
        return self.down.numel() + self.up.numel()

    @staticmethod
    def _flat(x: torch.Tensor) -> torch.Tensor | None:
        """``[N, C, H*W]`` of a contiguous 4-D tensor, else None."""
        if x.dim() != 4 or not x.is_contiguous():
            return None
        return x.view(x.shape[0], x.shape[1], -1)

    @staticmethod
    def _rows(x: torch.Tensor) -> torch.Tensor | None:
        """``[N*H*W, C]`` of a channels-last 4-D tensor, else None."""
        if x.dim() != 4:
            return None
        nhwc = x.permute(0, 2, 3, 1)
        return nhwc.view(-1, x.shape[1]) if nhwc.is_contiguous() else None

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        flat = self._flat(x)
        if flat is not None:
            h = torch.matmul(self.up, torch.matmul(self.down, flat))
            return (h * self.scale).view(x.shape[0], -1, *x.shape[2:])
        rows = self._rows(x)
        if rows is not None:  # the result in the input's layout
            h = F.linear(F.linear(rows, self.down), self.up) * self.scale
            return h.view(x.shape[0], *x.shape[2:], -1).permute(0, 3, 1, 2)
        return F.conv2d(F.conv2d(x, self.down[:, :, None, None]), self.up[:, :, None, None]) * self.scale

    def add_to(self, out: torch.Tensor, x: torch.Tensor, m: float) -> None:
        if out.dtype == x.dtype and out.dim() == 4 and out.shape[0] == x.shape[0] and out.shape[2:] == x.shape[2:]:
            flat = self._flat(x)
            if flat is not None:
                h = torch.matmul(self.down, flat).view(x.shape[0], -1, *x.shape[2:])
            else:
                rows = self._rows(x)
                h = None if rows is None else F.linear(rows, self.down).view(x.shape[0], *x.shape[2:], -1) \
                    .permute(0, 3, 1, 2)
            if h is not None and add_pointwise(out, h, self.up, m * self.scale):
                return
        out.add_(self(x), alpha=m)


def add_pointwise(out: torch.Tensor, h: torch.Tensor, up: torch.Tensor, alpha: float) -> bool:
    """``out += alpha * up(h)``, ``up`` (out, R) a 1x1 convolution on the R-channel ``h``, as one GEMM into ``out``
    in its own memory layout (a contiguous ``out`` is a batch of channel-by-pixel matrices, a channels-last one a
    pixel-by-channel matrix); ``h``, R channels, is copied into that layout where it is not. False where ``out``
    is in neither layout (the caller adds a computed ``up(h)``)."""
    if out.dtype != h.dtype or out.shape[0] != h.shape[0] or out.shape[2:] != h.shape[2:]:
        return False
    up = up.reshape(up.shape[0], -1)
    out_flat = PointwiseConvBypass._flat(out)
    if out_flat is not None:
        flat = h.contiguous().view(h.shape[0], h.shape[1], -1)
        out_flat.baddbmm_(up.expand(h.shape[0], *up.shape), flat, alpha=alpha)
        return True
    out_rows = PointwiseConvBypass._rows(out)
    if out_rows is not None:
        rows = h.permute(0, 2, 3, 1).reshape(-1, h.shape[1])
        out_rows.addmm_(rows, up.t(), alpha=alpha)
        return True
    return False


class ConvBypass:
    """``h(x) = scale * up(mid(down(x)))`` of a factored delta on a k x k convolution: ``down`` (R, in, k, k) takes
    the layer's stride, padding, dilation and groups, then a 1x1 ``up`` (out, R); with a Tucker core ``mid``
    (R1, R2, k, k) ``down`` is 1x1 (R2, in) and ``mid`` takes the layer's arguments (one group)."""

    __slots__ = ("down", "mid", "up", "scale", "kw")

    def __init__(self, down: torch.Tensor, up: torch.Tensor, scale: float, kw: Mapping[str, Any],
                 mid: torch.Tensor | None = None):
        if mid is not None:
            down = down.reshape(down.shape[0], -1, 1, 1)
        self.down, self.mid, self.scale, self.kw = down, mid, scale, kw
        self.up = up.reshape(up.shape[0], up.shape[1], 1, 1)

    @property
    def macs(self) -> int:
        return self.down.numel() + self.up.numel() + (0 if self.mid is None else self.mid.numel())

    def _down(self, x: torch.Tensor) -> torch.Tensor:
        kw = self.kw
        if self.mid is None:
            return F.conv2d(x, self.down, None, kw["stride"], kw["padding"], kw["dilation"], kw["groups"])
        return F.conv2d(F.conv2d(x, self.down), self.mid, None, kw["stride"], kw["padding"], kw["dilation"])

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        h = self._down(x)
        flat = PointwiseConvBypass._flat(h)
        if flat is not None:  # the 1x1 up as a matmul over the pixels (a CPU convolution reorders its weight)
            up = torch.matmul(self.up.view(self.up.shape[0], -1), flat)
            return (up * self.scale).view(h.shape[0], -1, *h.shape[2:])
        return F.conv2d(h, self.up) * self.scale

    def add_to(self, out: torch.Tensor, x: torch.Tensor, m: float) -> None:
        h = self._down(x)
        if out.dim() == 4 and h.dim() == 4 and add_pointwise(out, h, self.up, m * self.scale):
            return
        out.add_(F.conv2d(h, self.up), alpha=m * self.scale)


def pointwise(kw: Mapping) -> bool:
    """A 1x1 convolution with these arguments is a matmul over the pixels: stride 1, no padding, one group."""
    return tuple(kw.get("stride", (1, 1))) == (1, 1) and kw.get("padding") in ((0, 0), 0, "valid") \
        and kw.get("groups", 1) == 1


def factored_bypass(op: LayerOp, down: torch.Tensor, up: torch.Tensor, scale: float,
                    mid: torch.Tensor | None = None) -> Bypass:
    """The bypass of ``dW = scale * up @ [mid] @ down`` on ``op``'s layer: ``up`` (out, R); ``down`` (R, in) for a
    Linear, (R, in, k, k) or (R, in) for a convolution (with ``mid`` (R1, R2, k, k) for a Tucker core)."""
    if not op.is_conv:
        return LinearBypass(down.reshape(down.shape[0], -1), up, scale)
    if mid is None and (down.dim() == 2 or down.shape[2:] == (1, 1)) and pointwise(op.kwargs):
        return PointwiseConvBypass(down, up, scale)
    if mid is None and down.dim() == 2:
        down = down.reshape(down.shape[0], down.shape[1], 1, 1)
    return ConvBypass(down, up, scale, op.kwargs, mid)


def face_split(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """The row-wise Kronecker (face-splitting) product of (n, p) and (n, q): (n, p * q), column ``i * q + j``
    holding ``a[:, i] * b[:, j]``. ``(A1 B1) * (A2 B2) = face_split(A1, A2) @ face_split(B1^T, B2^T)^T``."""
    return (a[:, :, None] * b[:, None, :]).reshape(a.shape[0], -1)


class OutputBypass:
    """A delta that the layer's own output gives for a few operations per value (IA3 on outputs, OFT/BOFT rotate
    the output channels): ``from_output(x, y, module)``, with ``y = W0 x + b`` the layer's output over its original
    weights, before anything is added to it (the hook guarantees both), returns the delta output or None; calling
    it, ``fn(x)``, computes through the dense delta (``dense``), which is right wherever the weights hold a merge."""

    __slots__ = ("form", "dense")

    def __init__(self, form: Any, dense: Bypass):
        self.form, self.dense = form, dense

    @property
    def macs(self) -> int:
        return self.form.macs

    def from_output(self, x: torch.Tensor, y: torch.Tensor, module: nn.Module) -> torch.Tensor | None:
        return self.form.from_output(x, y, module)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.dense(x)


def channels_last(y: torch.Tensor, op: LayerOp) -> torch.Tensor:
    """``y`` with its channel axis last (a convolution's is axis 1): a view."""
    return y.movedim(1, -1) if op.is_conv else y


def without_bias(y: torch.Tensor, module: nn.Module, op: LayerOp) -> torch.Tensor:
    """``W0 x`` from the layer's output ``W0 x + b``."""
    bias = getattr(module, "bias", None)
    if bias is None:
        return y
    b = bias.detach().to(device=y.device, dtype=y.dtype)
    return y - (b.reshape(-1, 1, 1) if op.is_conv else b)


def own_weight(module: nn.Module, x: torch.Tensor) -> torch.Tensor | None:
    """The layer's weight, detached, where it can run on ``x`` as it is (same dtype and device); None otherwise
    (e.g. float8 storage): a form reading the weight then leaves it to the dense delta."""
    weight = module.weight
    if weight.dtype != x.dtype or weight.device != x.device:
        return None
    return weight.detach()


def to32(t: torch.Tensor | None, device: torch.device) -> torch.Tensor | None:
    return None if t is None else t.to(device=device, dtype=torch.float32)


def scalar(t: torch.Tensor | None) -> float | None:
    return None if t is None else float(t.reshape(-1)[0].item())


class ZeroPaddedInput(Adapter):
    """An adapter made for the latent's input channels of a layer that takes more (``narrowed_input``): its delta
    is zero on the extra channels, as the built-in pads it (and for any algorithm, in both modes). Deltas that read
    the base weight (DoRA, OFT, IA3) read the latent's channels of it; bypass runs on those channels of the input."""

    def __init__(self, inner: Adapter, shape: tuple[int, ...], channels: int):
        self.inner = inner
        self.shape = tuple(shape)  # the layer's
        self.channels = channels  # the input channels the inner adapter was made for
        self.algorithm = inner.algorithm  # type: ignore[misc]
        self.keys = inner.keys  # type: ignore[misc]

    @classmethod
    def load(cls, params: Mapping[str, torch.Tensor], target: TargetInfo) -> None:
        return None  # never built from keys: ``adapters.build_adapter`` wraps an adapter it built

    def __getattr__(self, name: str) -> Any:  # rank, scale, factors: what tools and reports read
        if name == "inner":
            raise AttributeError(name)
        return getattr(self.inner, name)

    def _narrow(self, base: torch.Tensor) -> torch.Tensor:
        return base[:, :self.channels]

    def delta_weight(self, base: torch.Tensor, dyn: int | None = None) -> torch.Tensor:
        dw = self.inner.delta_weight(self._narrow(base), dyn)
        return F.pad(dw, (0, 0, 0, 0, 0, self.shape[1] - dw.shape[1]))

    def delta_bias(self, base_bias: torch.Tensor | None, device: torch.device) -> torch.Tensor | None:
        return self.inner.delta_bias(base_bias, device)

    @property
    def needs_base(self) -> bool:
        return self.inner.needs_base

    def low_rank_bypass(self, op: LayerOp, device: torch.device, dtype: torch.dtype,
                        dyn: int | None) -> Bypass | None:
        fn = self.inner.low_rank_bypass(op, device, dtype, dyn)
        if fn is None or hasattr(fn, "from_output"):  # a form reading the layer would read all of its channels
            return None
        channels = self.channels
        return lambda x: fn(x[:, :channels])

    def tensors(self) -> list[torch.Tensor]:
        return self.inner.tensors()
