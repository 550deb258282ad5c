"""The Patcher: the only code that changes what the loaded model computes.

Per instance of the model (forward hooks on the touched modules, never a class-level patch), in two modes:

- ``bypass``: a forward hook adds ``sum_i m_i * h_i(x)`` to the layer's output (``nn.MultiheadAttention`` is
  recomputed with ``W0 + sum_i m_i dW_i``). Changing only multipliers costs no tensor work: the hooks read the
  multipliers from the layer's state. Cross-attention keys and values read the text conditioning, the same on
  every sampling step: their ``h_i`` are computed once per conditioning (``ContextMemo``). Over a layer merged
  with the same adapters it adds ``(m_i - M_i) h_i(x)`` (``M_i`` the merged multipliers), so a weight change
  after a merged generation costs no weight pass; bypass with every multiplier 0 restores the original weights
  instead.
- ``merged``: ``W = W0 + sum_i m_i dW_i`` computed in float32 on the layer's device and cast back. Only the
  touched weights are backed up; restore copies them back, so it is bit-exact; non-finite results are refused.
  Layers stored in float8 (A1111's FP8 mode) use bypass even in merged mode.

Applying the same plan twice does nothing (fingerprint). Any failure while applying restores the model to its
original weights before the error propagates; ``with Patcher(index) as p:`` restores in ``finally``.
"""
from __future__ import annotations

from collections import OrderedDict, defaultdict
from dataclasses import dataclass, field
from typing import Callable, Iterable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .adapters.base import Adapter, Bypass, LayerOp, numel
from .errors import NonFiniteWeightError, UnsupportedLayerError
from .model_index import MHA_PARTS, ModelIndex, Target

MODES = ("bypass", "merged")
_F32_MAX = torch.finfo(torch.float32).max
#: UNet layers whose input is the text conditioning rather than the image: the same values on every step.
CONTEXT_LAYERS = (".attn2.to_k", ".attn2.to_v")


def reads_context(index: ModelIndex, target: Target) -> bool:
    """Whether the target is a UNet layer whose input is the text conditioning (``CONTEXT_LAYERS``)."""
    return target.module.endswith(CONTEXT_LAYERS) and not index.is_text_encoder(target)


_FP8 = tuple(getattr(torch, n) for n in ("float8_e4m3fn", "float8_e5m2", "float8_e4m3fnuz", "float8_e5m2fnuz")
             if hasattr(torch, n))


@dataclass(frozen=True)
class PlanEntry:
    """One adapter on one target at one strength."""

    adapter: Adapter
    target: Target
    multiplier: float
    dyn: int | None = None
    label: str = ""  # who asked (network name), for messages

    def structure_key(self) -> tuple:
        return (id(self.adapter), self.target, self.dyn)


@dataclass
class _Layer:
    """What the Patcher did to one module, so it can update or undo it."""

    name: str
    module: nn.Module
    mode: str
    entries: list[PlanEntry]
    multipliers: list[float]
    backups: dict[str, torch.Tensor | None] = field(default_factory=dict)  # param path -> original (merged)
    created: list[str] = field(default_factory=list)  # param paths created (a bias the layer did not have)
    hook: torch.utils.hooks.RemovableHandle | None = None
    prepared: dict[tuple, list] = field(default_factory=dict)  # (device, dtype) -> bypass functions / deltas
    baked: list[float] | None = None  # multipliers merged into the weights (None: the weights are the original)
    hooked: list[float] = field(default_factory=list)  # what the hook adds, per entry: multiplier - baked
    context: bool = False  # the input is the text conditioning (see ContextMemo)
    uid: int = 0  # unique per Patcher, for ContextMemo (a name is reused by the next layer object)

    def keys(self) -> tuple:
        return tuple(e.structure_key() for e in self.entries)


def _param_paths(module: nn.Module) -> dict[str, tuple[nn.Module, str]]:
    if isinstance(module, nn.MultiheadAttention):
        return {"in_proj_weight": (module, "in_proj_weight"), "in_proj_bias": (module, "in_proj_bias"),
                "out_proj.weight": (module.out_proj, "weight"), "out_proj.bias": (module.out_proj, "bias")}
    return {"weight": (module, "weight"), "bias": (module, "bias")}


def _is_fp8(t: torch.Tensor | None) -> bool:
    return t is not None and t.dtype in _FP8


class PreparedCache:
    """What bypass prepares per (adapter, dyn, device, dtype), kept across layer updates so that switching back
    to a LoRA recomputes nothing: low-rank functions (factors cast to the device, tiny) and full-size deltas of
    algorithms without a low-rank form, least recently used first out beyond ``budget`` bytes.

    A value bigger than the budget is not kept; with ``hold=False`` it is not even computed (``get`` gives None),
    so the caller can compute it per use instead of holding it.
    """

    def __init__(self, budget: int):
        self.budget = budget
        self._items: OrderedDict[tuple, tuple[Adapter, object, int]] = OrderedDict()
        self.bytes = 0
        self.hits = 0
        self.misses = 0

    def get(self, adapter: Adapter, key: tuple, compute: Callable[[], tuple[object, int]], hold: bool = True,
            estimate: int = 0):
        full_key = (id(adapter), *key)
        item = self._items.get(full_key)
        if item is not None and item[0] is adapter:  # the adapter is referenced here, so its id is not reused
            self._items.move_to_end(full_key)
            self.hits += 1
            return item[1]
        self.misses += 1
        if not hold and estimate > self.budget:
            return None
        value, nbytes = compute()
        if nbytes <= self.budget:
            self._items[full_key] = (adapter, value, nbytes)
            self.bytes += nbytes
            while self.bytes > self.budget:
                _, (_, _, freed) = self._items.popitem(last=False)
                self.bytes -= freed
        elif not hold:
            return None
        return value

    def clear(self) -> None:
        self._items.clear()
        self.bytes = 0


class ContextMemo:
    """Bypass outputs ``h_i(c)`` of the cross-attention key/value layers per text conditioning ``c``.

    Their input is the conditioning, which the sampler passes again (as a new tensor, same values) on every step,
    so ``h_i(c)`` (independent of the multipliers) is computed on the first step and reused: at small images
    these layers were a fifth of the UNet's bypass cost (SD1.5, 8x8 latent, rank 32). A conditioning is known by
    its values: a private copy of the last ``slots`` ones is compared with ``torch.equal``, once per new tensor
    (the layers of one step see the same object; its version counter catches a change in place). Stored outputs
    are bounded by ``budget`` bytes; beyond it they are computed on each call by the same arithmetic, so an image
    never depends on what was stored.
    """

    def __init__(self, budget: int = 256 << 20, slots: int = 4):
        self.budget, self.slots = budget, slots
        self._known: list[tuple[int, torch.Tensor]] = []  # (serial, copy of the values), newest last
        self._last: tuple[torch.Tensor, int, int] | None = None  # (tensor seen last, its version, serial)
        self._serial = 0
        self._values: dict[tuple[int, int], list[torch.Tensor]] = {}  # (layer uid, serial) -> h_i per entry
        self.bytes = 0
        self.hits = 0

    def _serial_of(self, x: torch.Tensor) -> int:
        last = self._last
        if last is not None and last[0] is x and last[1] == x._version:
            return last[2]
        for serial, known in reversed(self._known):
            if known.shape == x.shape and known.dtype == x.dtype and known.device == x.device \
                    and torch.equal(known, x):
                break
        else:
            self._serial += 1
            serial = self._serial
            self._known.append((serial, x.detach().clone()))
            if len(self._known) > self.slots:
                gone = self._known.pop(0)[0]
                for key in [k for k in self._values if k[1] == gone]:
                    self._drop(key)
        self._last = (x, x._version, serial)
        return serial

    def _drop(self, key: tuple[int, int]) -> None:
        self.bytes -= sum(h.numel() * h.element_size() for h in self._values.pop(key))

    def outputs(self, uid: int, x: torch.Tensor, fns: Sequence[Callable]) -> list[torch.Tensor]:
        """``[fn(x) for fn in fns]``, from the store when this layer has already seen these values."""
        key = (uid, self._serial_of(x))
        values = self._values.get(key)
        if values is not None:
            self.hits += 1
            return values
        values = [fn(x) for fn in fns]
        nbytes = sum(h.numel() * h.element_size() for h in values)
        if self.bytes + nbytes <= self.budget:
            self._values[key] = values
            self.bytes += nbytes
        return values

    def forget_layer(self, uid: int) -> None:
        for key in [k for k in self._values if k[0] == uid]:
            self._drop(key)

    def clear(self) -> None:
        self._known.clear()
        self._values.clear()
        self._last = None
        self.bytes = 0


class Patcher:
    """Applies plans of adapters to one model instance, and restores it exactly."""

    def __init__(self, index: ModelIndex, cache_budget: int = 2 << 30):
        self.index = index
        self.cache = PreparedCache(cache_budget)
        self.context_memo = ContextMemo()
        self._layers: dict[str, _Layer] = {}
        self._uids = 0
        self._fingerprint: tuple | None = None

    # ------------------------------------------------------------------ public
    @property
    def active(self) -> bool:
        return bool(self._layers)

    @property
    def touched(self) -> list[str]:
        return sorted(self._layers)

    def layer_mode(self, name: str) -> str | None:
        layer = self._layers.get(name)
        return None if layer is None else layer.mode

    def apply(self, plan: Iterable[PlanEntry], mode: str = "bypass", text_encoders: str | None = None) -> None:
        """Make the model compute ``plan``. Cheap when only multipliers changed in bypass mode.

        ``text_encoders`` overrides ``mode`` for text-encoder layers (they run once per prompt, so merging them
        buys nothing per step: ``"bypass"`` spares their weight pass and backups).
        """
        if mode not in MODES or text_encoders not in (None, *MODES):
            raise ValueError(f"modes must be one of {MODES}, not {mode!r}/{text_encoders!r}")
        plan = [e for e in plan if e.target.module in self.index.modules]
        fingerprint = (mode, text_encoders, tuple((e.structure_key(), e.multiplier) for e in plan))
        if fingerprint == self._fingerprint:
            return
        by_module: dict[str, list[PlanEntry]] = defaultdict(list)
        for entry in plan:
            by_module[entry.target.module].append(entry)
        try:
            with torch.no_grad():
                for name in [n for n in self._layers if n not in by_module]:
                    self._restore_layer(self._layers.pop(name))
                for name, entries in by_module.items():
                    te = text_encoders is not None and self.index.is_text_encoder(entries[0].target)
                    self._update_layer(name, entries, text_encoders if te else mode)
        except BaseException:
            self.restore()
            raise
        self._fingerprint = fingerprint

    def restore(self) -> None:
        """Undo everything: hooks removed, merged weights copied back bit for bit."""
        errors: list[BaseException] = []
        self.context_memo.clear()  # all of it goes: spares each layer's own scan of the store below
        with torch.no_grad():
            for layer in list(self._layers.values()):
                try:
                    self._restore_layer(layer)
                except BaseException as e:  # keep restoring the others, then report
                    errors.append(e)
        self._layers.clear()
        self._fingerprint = None
        if errors:
            raise errors[0]

    def forget(self) -> None:
        """Drop all state without writing weights back: for when the host has replaced the weights itself
        (a checkpoint loaded into the same model object), so the backups are stale. Hooks are removed."""
        for layer in self._layers.values():
            if layer.hook is not None:
                layer.hook.remove()
            paths = _param_paths(layer.module)
            for path in layer.created:
                owner, attr = paths[path]
                setattr(owner, attr, None)
        self._layers.clear()
        self.context_memo.clear()
        self._fingerprint = None

    def __enter__(self) -> "Patcher":
        return self

    def __exit__(self, *exc) -> None:
        self.restore()

    # ------------------------------------------------------------------ per layer
    def _layer_mode(self, module: nn.Module, mode: str) -> str:
        if mode == "merged" and any(_is_fp8(getattr(owner, attr, None))
                                    for owner, attr in _param_paths(module).values()):
            return "bypass"
        return mode

    def _update_layer(self, name: str, entries: list[PlanEntry], mode: str) -> None:
        module = self.index.modules[name]
        layer_mode = self._layer_mode(module, mode)
        for e in entries:  # merged refuses non-finite weights below; bypass cannot look at its outputs
            if not abs(e.multiplier) <= _F32_MAX:
                raise NonFiniteWeightError(f"{name}: multiplier {e.multiplier:g} of {e.label or e.adapter.algorithm} "
                                           f"is NaN/Inf in float32; nothing was applied")
        old = self._layers.get(name)
        multipliers = [e.multiplier for e in entries]
        if old is not None and old.keys() == tuple(e.structure_key() for e in entries):
            if old.mode == layer_mode and old.multipliers == multipliers:
                return
            if layer_mode == "bypass" and (old.baked is None or any(m != 0 for m in multipliers)):
                # the hook reads its multipliers: no tensor work. Over merged weights it adds the difference
                # (a weight change after a steady generation costs neither a restore nor a re-merge); all
                # multipliers 0 restores instead, so "no LoRA" is the original model bit for bit.
                self._set_bypass(old, multipliers)
                return
            if layer_mode == "merged" and old.baked == multipliers:  # the weights already hold these
                if old.hook is not None:
                    old.hook.remove()
                    old.hook = None
                old.mode, old.multipliers, old.hooked = "merged", multipliers, []
                return
        if old is not None:
            self._restore_layer(self._layers.pop(name))
        self._uids += 1
        layer = _Layer(name, module, layer_mode, list(entries), multipliers, uid=self._uids,
                       context=reads_context(self.index, entries[0].target))
        self._layers[name] = layer  # registered first, so a failure below is undone by restore()
        if layer_mode == "merged":
            self._merge(layer)
            layer.baked = list(multipliers)
        else:
            self._set_bypass(layer, multipliers)

    def _set_bypass(self, layer: _Layer, multipliers: list[float]) -> None:
        baked = layer.baked or [0.0] * len(multipliers)
        layer.mode = "bypass"
        layer.multipliers = list(multipliers)
        layer.hooked[:] = [m - b for m, b in zip(multipliers, baked)]
        if layer.hook is None:
            self._hook(layer)

    def _restore_layer(self, layer: _Layer) -> None:
        if layer.hook is not None:
            layer.hook.remove()
            layer.hook = None
        if layer.context:
            self.context_memo.forget_layer(layer.uid)
        paths = _param_paths(layer.module)
        for path, original in layer.backups.items():
            owner, attr = paths[path]
            getattr(owner, attr).copy_(original)
        for path in layer.created:
            owner, attr = paths[path]
            setattr(owner, attr, None)
        layer.backups.clear()
        layer.created.clear()
        layer.baked = None

    # ------------------------------------------------------------------ merged
    def _merged_values(self, layer: _Layer, device: torch.device) -> dict[str, torch.Tensor]:
        """``W0 + sum_i m_i dW_i`` (and biases) per parameter path, float32 on ``device``.

        Deltas are accumulated straight into one float32 copy of each parameter (``Adapter.add_delta``, a fused
        ``addmm_`` for plain LoRA): merging is bound by memory passes over the touched weights.
        """
        module = layer.module
        paths = _param_paths(module)
        out: dict[str, torch.Tensor] = {}

        def buffer(path: str, like: torch.Tensor | None = None) -> torch.Tensor:
            if path not in out:
                owner, attr = paths[path]
                current = getattr(owner, attr)
                if current is not None:  # contiguous whatever the layer's layout (--opt-channelslast): the
                    # fused adds view it as a matrix; writing it back restores the layout
                    out[path] = current.detach().to(device=device, dtype=torch.float32, copy=True,
                                                    memory_format=torch.contiguous_format)
                else:  # a bias the layer does not have yet
                    shape = (3 * module.embed_dim,) if path == "in_proj_bias" else like.shape
                    out[path] = torch.zeros(shape, dtype=torch.float32, device=device)
            return out[path]

        for entry, m in zip(layer.entries, layer.multipliers):
            if m == 0:
                continue
            target = entry.target
            base = self.index.weight(target).detach()
            db = entry.adapter.delta_bias(self._bias_of(target), device)
            if isinstance(module, nn.MultiheadAttention) and target.part != "out":
                d = module.embed_dim
                rows = slice(MHA_PARTS.index(target.part) * d, (MHA_PARTS.index(target.part) + 1) * d)
                weight_view = buffer("in_proj_weight")[rows]
                bias_view = None if db is None else buffer("in_proj_bias")[rows]
            else:
                prefix = "out_proj." if isinstance(module, nn.MultiheadAttention) else ""
                weight_view = buffer(prefix + "weight")
                bias_view = None if db is None else buffer(prefix + "bias", db)
            entry.adapter.add_delta(weight_view, base.to(device), m, entry.dyn)
            if db is not None:
                bias_view.add_(db, alpha=m)
        return out

    def _original(self, target: Target, what: str) -> torch.Tensor | None:
        """The target's weight or bias as the model had it (the backup where the layer holds merged weights):
        deltas of algorithms that read the base weight (DoRA, OFT, IA3) are always of the original."""
        current = self.index.weight(target) if what == "weight" else self._bias_of(target)
        layer = self._layers.get(target.module)
        if layer is None or not layer.backups:
            return current
        module = layer.module
        if isinstance(module, nn.MultiheadAttention):
            if target.part == "out":
                return layer.backups.get(f"out_proj.{what}", current)
            whole = layer.backups.get(f"in_proj_{what}")
            if whole is None:
                return current
            d = module.embed_dim
            i = MHA_PARTS.index(target.part)
            return whole[i * d:(i + 1) * d]
        return layer.backups.get(what, current)

    def _bias_of(self, target: Target) -> torch.Tensor | None:
        module = self.index.modules[target.module]
        if isinstance(module, nn.MultiheadAttention):
            if target.part == "out":
                return module.out_proj.bias
            if module.in_proj_bias is None:
                return None
            d = module.embed_dim
            i = MHA_PARTS.index(target.part)
            return module.in_proj_bias[i * d:(i + 1) * d]
        return getattr(module, "bias", None)

    def _merge(self, layer: _Layer) -> None:
        paths = _param_paths(layer.module)
        weight_path = "in_proj_weight" if isinstance(layer.module, nn.MultiheadAttention) else "weight"
        device = getattr(paths[weight_path][0], paths[weight_path][1]).device
        new_values: dict[str, torch.Tensor] = {}
        for path, new in self._merged_values(layer, device).items():
            owner, attr = paths[path]
            current = getattr(owner, attr)
            dtype = getattr(owner, "weight").dtype if current is None else current.dtype
            if not bool(torch.isfinite(new).all()):
                labels = ", ".join(sorted({e.label or e.adapter.algorithm for e in layer.entries}))
                raise NonFiniteWeightError(f"{layer.name}: applying {labels} would write NaN/Inf into "
                                           f"{path}; nothing was written")
            new_values[path] = new.to(dtype)
        for path, value in new_values.items():  # all computed: now write
            owner, attr = paths[path]
            current = getattr(owner, attr)
            if current is None:
                setattr(owner, attr, nn.Parameter(value, requires_grad=False))
                layer.created.append(path)
            else:
                layer.backups[path] = current.detach().clone()
                current.copy_(value)

    # ------------------------------------------------------------------ bypass
    def _prepare(self, layer: _Layer, x: torch.Tensor) -> list:
        key = (x.device, x.dtype)
        prepared = layer.prepared.get(key)
        if prepared is not None:
            return prepared
        with torch.no_grad():
            if isinstance(layer.module, nn.MultiheadAttention):
                prepared = [(e.target.part, *self._dense(e, x.device, x.dtype, hold=True)) for e in layer.entries]
            else:
                op = LayerOp.of(layer.module)
                prepared = [self._bypass_fn(e, op, x.device, x.dtype) for e in layer.entries]
        layer.prepared[key] = prepared
        return prepared

    def _bypass_fn(self, entry: PlanEntry, op: LayerOp, device: torch.device, dtype: torch.dtype) -> Bypass:
        """``h(x)`` of one entry: the low-rank form where the algorithm has one, else the full delta (held while
        the cache budget allows it, computed on each call beyond it, so a forced bypass never runs out of memory)."""
        adapter = entry.adapter
        def low_rank():  # the factors, cast to the device and dtype, are what the function holds
            fn = adapter.low_rank_bypass(op, device, dtype, entry.dyn)
            size = torch.empty((), dtype=dtype).element_size()
            return fn, 0 if fn is None else sum(t.numel() for t in adapter.tensors()) * size

        fast = self.cache.get(adapter, ("low", entry.dyn, device, dtype), low_rank)
        if fast is not None:
            return fast
        dense = self._dense(entry, device, dtype, hold=False)
        if dense is not None:
            dw, db = dense
            return lambda x: op(x, dw, db)
        return lambda x: op(x, *self._compute_dense(entry, device, dtype))

    def _compute_dense(self, entry: PlanEntry, device: torch.device,
                       dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor | None]:
        base = self._original(entry.target, "weight").detach().to(device)
        dw = entry.adapter.delta_weight(base.float(), entry.dyn).to(dtype)
        bias = self._original(entry.target, "bias")
        db = entry.adapter.delta_bias(None if bias is None else bias.detach().to(device), device)
        return dw, None if db is None else db.to(dtype)

    def _dense(self, entry: PlanEntry, device: torch.device, dtype: torch.dtype, hold: bool):
        """The full delta (and bias delta) of an entry through the cache; None when it does not fit the budget
        and ``hold`` is false (the caller then computes it when needed)."""
        def compute():
            dw, db = self._compute_dense(entry, device, dtype)
            return (dw, db), dw.numel() * dw.element_size() + (0 if db is None else db.numel() * db.element_size())

        estimate = numel(self.index.weight_shape(entry.target)) * torch.empty((), dtype=dtype).element_size()
        return self.cache.get(entry.adapter, ("dense", entry.dyn, device, dtype), compute, hold=hold,
                              estimate=estimate)

    def _hook(self, layer: _Layer) -> None:
        module = layer.module
        if isinstance(module, nn.MultiheadAttention):
            if not module._qkv_same_embed_dim:
                raise UnsupportedLayerError(f"{layer.name}: MultiheadAttention with separate q/k/v weights")
            layer.hook = module.register_forward_hook(self._mha_hook(layer), with_kwargs=True)
            return

        def hook(mod: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
            if not any(layer.hooked):  # over merged weights that already hold these multipliers, or all zero
                return output
            x = args[0]
            fns: list[Bypass] = self._prepare(layer, x)
            if torch.is_grad_enabled():  # autograd may need the layer's output as it was: a new tensor
                for fn, m in zip(fns, layer.hooked):
                    if m != 0:
                        output = output + m * fn(x)
                return output
            # sampling (no_grad / inference_mode): the output is the layer's own new tensor, add into it
            if layer.context:
                for h, m in zip(self.context_memo.outputs(layer.uid, x, fns), layer.hooked):
                    if m != 0:
                        output.add_(h, alpha=m)
                return output
            for fn, m in zip(fns, layer.hooked):
                if m != 0:
                    add_to = getattr(fn, "add_to", None)
                    if add_to is not None:
                        add_to(output, x, m)
                    else:
                        output.add_(fn(x), alpha=m)
            return output

        layer.hook = module.register_forward_hook(hook)

    def _mha_hook(self, layer: _Layer) -> Callable:
        mha: nn.MultiheadAttention = layer.module  # type: ignore[assignment]
        names = ("query", "key", "value", "key_padding_mask", "need_weights", "attn_mask",
                 "average_attn_weights", "is_causal")
        defaults = (None, None, None, None, True, None, True, False)

        def hook(mod: nn.Module, args: tuple, kwargs: dict, output):
            if not any(layer.hooked):  # nothing to add: the layer's own output stands
                return output
            call = dict(zip(names, defaults))
            call.update(zip(names, args))
            call.update(kwargs)
            q, k, v = call["query"], call["key"], call["value"]
            prepared = self._prepare(layer, q)
            # one copy each in the input's dtype (`.to` then `.clone` copied twice when the dtype differed)
            in_w = mha.in_proj_weight.detach().to(q.dtype, copy=True)
            in_b = None if mha.in_proj_bias is None else mha.in_proj_bias.detach().to(q.dtype, copy=True)
            out_w = mha.out_proj.weight.detach().to(q.dtype, copy=True)
            out_b = None if mha.out_proj.bias is None else mha.out_proj.bias.detach().to(q.dtype)
            d = mha.embed_dim
            for (part, dw, db), m in zip(prepared, layer.hooked):
                if m == 0:
                    continue
                if part == "out":
                    out_w += m * dw.to(q.dtype)
                    if db is not None:
                        out_b = m * db.to(q.dtype) if out_b is None else out_b + m * db.to(q.dtype)
                else:
                    i = MHA_PARTS.index(part)
                    in_w[i * d:(i + 1) * d] += m * dw.to(q.dtype)
                    if db is not None and in_b is not None:
                        in_b[i * d:(i + 1) * d] += m * db.to(q.dtype)
            batched = q.dim() == 3
            if mha.batch_first and batched:
                q, k, v = (t.transpose(0, 1) for t in (q, k, v))
            attn, weights = F.multi_head_attention_forward(
                q, k, v, d, mha.num_heads, in_w, in_b, mha.bias_k, mha.bias_v, mha.add_zero_attn,
                mha.dropout, out_w, out_b, training=mha.training, key_padding_mask=call["key_padding_mask"],
                need_weights=call["need_weights"], attn_mask=call["attn_mask"],
                average_attn_weights=call["average_attn_weights"], is_causal=call["is_causal"])
            if mha.batch_first and batched:
                attn = attn.transpose(0, 1)
            return attn, weights

        return hook
