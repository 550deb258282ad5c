"""The Patcher: the only code that changes what the loaded model computes.

Per instance of the model (forward hooks on the touched modules, never a class-level patch), in two modes:

- ``bypass``: a forward hook adds ``sum_i m_i * h_i(x)`` to the layer's output (``nn.MultiheadAttention`` is
  recomputed with ``W0 + sum_i m_i dW_i``). Changing only multipliers costs no tensor work: the hooks read the
  multipliers from the layer's state. Cross-attention keys and values read the text conditioning, the same on
  every sampling step: their ``h_i`` are computed once per conditioning (``ContextMemo``). Over a layer merged
  with the same adapters it adds ``(m_i - M_i) h_i(x)`` (``M_i`` the merged multipliers), so a weight change
  after a merged generation costs no weight pass; bypass with every multiplier 0 restores the original weights
  instead.
- ``merged``: ``W = W0 + sum_i m_i dW_i`` computed in float32 on the layer's device and cast back
  (``merge.merged_values``). Only the touched weights are backed up, in host memory (``memory.keep``: the merged
  mode holds nothing on an accelerator beyond one layer's float32 copy while it applies); restore copies them back
  into the layer's tensor wherever it lives then, so it is bit-exact; non-finite results are refused. Layers
  stored in float8 (A1111's FP8 mode) use bypass even in merged mode: a delta merged into float8 weights is
  mostly rounded away.

What bypass holds on a device (``bypass``: prepared factors and deltas, stored key/value outputs) is bounded by
what that device can spare (``memory.MemoryPolicy``). Each hook computes in the device and dtype of the layer's
output, which under ``--lowvram`` and A1111's casts may change from one call to the next.

Per-row multipliers (bypass only): a plan entry with a ``slot`` is weighted per row of the layer's input (dim 0,
the batch) by ``rows[r][slot]`` (``set_rows``; during a call of a module routed with ``route_rows``, the weights of
that call's rows). Entries of one adapter are summed into one ``h(x)`` per layer; a term whose weights are equal on
every row takes the uniform path; otherwise ``h`` is computed on the rows whose weight is not 0 only and added
scaled per row, so a row with no LoRA costs nothing. ``nn.MultiheadAttention`` (text encoders, which the WebUI glue
runs per set) takes the first row's weights.

Applying the same plan twice does nothing (fingerprint). Any failure while applying restores the model to its
original weights before the error propagates; ``with Patcher(index) as p:`` restores in ``finally``.
"""
from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from typing import Callable, Iterable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .adapters.base import Adapter, Bypass, LayerOp
from .bypass import BypassBuilder, ContextMemo, PreparedCache, RowsBypass
from .errors import NonFiniteWeightError, UnsupportedLayerError
from .memory import MemoryPolicy, keep, put_back
from .merge import bias_of, merged_values, param_paths
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
    slot: int | None = None  # per-row weight column (see ``Patcher.set_rows``); None: every row alike

    def structure_key(self) -> tuple:
        return (id(self.adapter), self.target, self.dyn, self.slot)


#: per-row slot weights: ``rows[r][slot]`` scales the entries of ``slot`` on row ``r`` of a layer's input
RowWeights = Sequence[Sequence[float]]
_ROW_TENSORS = 1024  # per-row multiplier tensors kept per (values, device, dtype)


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
    # (device, dtype) -> (bypass functions / deltas, whether one of them reads the layer's output)
    prepared: dict[tuple, tuple[list, bool]] = field(default_factory=dict)
    baked: list[float] | None = None  # multipliers merged into the weights (None: the weights are the original)
    hooked: list[float] = field(default_factory=list)  # what the hook adds, per entry: multiplier - baked
    context: bool = False  # the input is the text conditioning (see ContextMemo)
    uid: int = 0  # unique per Patcher, for ContextMemo (a name is reused by the next layer object)

    def keys(self) -> tuple:
        return tuple(e.structure_key() for e in self.entries)


class _Known:
    """A bypass function for one call whose result ``h`` over all rows of the input is known already (a form that
    reads the layer's output); ``rows`` picks the rows that a per-row multiplier needs."""

    __slots__ = ("h",)

    def __init__(self, h: torch.Tensor):
        self.h = h

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.h

    def rows(self, index: torch.Tensor) -> torch.Tensor:
        return self.h.index_select(0, index)


def _given(h: torch.Tensor | None, fn: Bypass) -> Bypass:
    """``fn`` for one call whose result is known already (``h``; None: not known, ``fn`` computes it)."""
    return fn if h is None else _Known(h)


def _is_fp8(t: torch.Tensor | None) -> bool:
    return t is not None and t.dtype in _FP8


class Patcher:
    """Applies plans of adapters to one model instance, and restores it exactly."""

    def __init__(self, index: ModelIndex, cache_budget: int = 2 << 30, memory: MemoryPolicy | None = None):
        self.index = index
        self.memory = memory or MemoryPolicy()
        self.cache = PreparedCache(cache_budget, self.device_budget)
        self.context_memo = ContextMemo(limit=self.device_budget)
        self.bypass = BypassBuilder(index, self.cache, self._original)
        self._layers: dict[str, _Layer] = {}
        self._uids = 0
        self._fingerprint: tuple | None = None
        self._rows: tuple[tuple[float, ...], ...] | None = None  # per-row slot weights in effect now
        self._row_tensors: dict[tuple, tuple[torch.Tensor, torch.Tensor | None]] = {}
        self._routes: list[torch.utils.hooks.RemovableHandle] = []

    # ------------------------------------------------------------------ public
    @property
    def active(self) -> bool:
        return bool(self._layers)

    @property
    def touched(self) -> list[str]:
        return sorted(self._layers)

    def device_budget(self, device: torch.device) -> int:
        """Bytes the caches may hold on ``device`` this generation: the configured budget, lowered to what the
        device can spare (``MemoryPolicy``; what the caches hold there now counts as spare)."""
        return self.memory.budget(device, self.cache.budget,
                                  lambda: self.cache.bytes_on(device) + self.context_memo.bytes_on(device))

    def backed_up(self, name: str) -> bool:
        """Whether the layer's originals are already in host memory (its weights hold a merge)."""
        layer = self._layers.get(name)
        return layer is not None and bool(layer.backups)

    def new_generation(self) -> None:
        """Free memory is read from the devices again at the next use."""
        self.memory.new_generation()

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

    def set_rows(self, rows: RowWeights | None) -> None:
        """Per-row weights of slotted entries from now on: ``rows[r][slot]`` (one row: every row alike). None: every
        slot weighs 1 on every row."""
        self._rows = None if rows is None else tuple(tuple(float(w) for w in row) for row in rows)

    def route_rows(self, module: nn.Module, rows_of_call: Callable[[int], RowWeights | None]) -> None:
        """During each forward of ``module`` (the UNet), the rows are ``rows_of_call(batch)`` (None: as set outside
        the call). Removed by ``unroute`` and ``restore``."""
        def before(_mod, args, kwargs):
            x = args[0] if args else next(iter(kwargs.values()), None)
            rows = rows_of_call(int(x.shape[0])) if isinstance(x, torch.Tensor) and x.dim() > 0 else None
            outside.append(self._rows)
            if rows is not None:
                self.set_rows(rows)

        def after(_mod, _args, _kwargs, output):
            self._rows = outside.pop() if outside else None
            return output

        outside: list = []
        self._routes += [module.register_forward_pre_hook(before, with_kwargs=True),
                         module.register_forward_hook(after, with_kwargs=True, always_call=True)]

    def unroute(self) -> None:
        for handle in self._routes:
            handle.remove()
        self._routes.clear()
        self._rows = None

    def restore(self) -> None:
        """Undo everything: hooks removed, merged weights copied back bit for bit."""
        self.unroute()
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
            paths = param_paths(layer.module)
            for path in layer.created:
                owner, attr = paths[path]
                setattr(owner, attr, None)
        self._layers.clear()
        self.context_memo.clear()
        self._fingerprint = None
        self.unroute()

    def __enter__(self) -> "Patcher":
        return self

    def __exit__(self, *exc) -> None:
        self.restore()

    # ------------------------------------------------------------------ per layer
    def _layer_mode(self, module: nn.Module, mode: str) -> str:
        if mode == "merged" and any(_is_fp8(getattr(owner, attr, None))
                                    for owner, attr in param_paths(module).values()):
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
        paths = param_paths(layer.module)
        put_back((getattr(*paths[path]), original) for path, original in layer.backups.items())
        for path in layer.created:
            owner, attr = paths[path]
            setattr(owner, attr, None)
        layer.backups.clear()
        layer.created.clear()
        layer.baked = None

    # ------------------------------------------------------------------ merged
    def _original(self, target: Target, what: str) -> torch.Tensor | None:
        """The target's weight or bias as the model had it (the backup where the layer holds merged weights):
        deltas of algorithms that read the base weight (DoRA, OFT, IA3) are always of the original."""
        current = self.index.weight(target) if what == "weight" else bias_of(self.index, target)
        layer = self._layers.get(target.module)
        if layer is None or not layer.backups:
            return current
        module = layer.module
        rows = self.index.rows(target)
        if isinstance(module, nn.MultiheadAttention):
            if target.part == "out":
                return layer.backups.get(f"out_proj.{what}", current)
            whole = layer.backups.get(f"in_proj_{what}")
        else:
            whole = layer.backups.get(what)
        if whole is None:
            return current
        return whole if rows is None else whole[rows]

    def _merge(self, layer: _Layer) -> None:
        paths = param_paths(layer.module)
        weight_path = "in_proj_weight" if isinstance(layer.module, nn.MultiheadAttention) else "weight"
        device = getattr(paths[weight_path][0], paths[weight_path][1]).device
        # a float32 weight on its device is backed up first and merged into where it lives: no float32 copy and no
        # write-back (two of the five passes over the weight), unless an adapter reads the weight it changes
        in_place = not isinstance(layer.module, nn.MultiheadAttention) and \
            not any(e.adapter.needs_base for e in layer.entries)
        taken: dict[str, torch.Tensor] = {}

        def live(path: str, current: torch.Tensor) -> bool:
            if not (in_place and current.dtype == torch.float32 and current.device == device
                    and current.is_contiguous()):
                return False
            taken[path] = keep(current)  # host memory, never the accelerator
            return True

        new_values: dict[str, torch.Tensor] = {}
        try:
            for path, new in merged_values(self.index, layer.module, layer.entries, layer.multipliers, device,
                                           live).items():
                owner, attr = paths[path]
                current = getattr(owner, attr)
                dtype = getattr(owner, "weight").dtype if current is None else current.dtype
                # one reduction instead of a boolean copy of the weight: NaN and Inf propagate into the sum (a
                # finite weight whose sum overflows float32 would need values near 1e31: refused as well)
                if not bool(torch.isfinite(new.sum())):
                    labels = ", ".join(sorted({e.label or e.adapter.algorithm for e in layer.entries}))
                    raise NonFiniteWeightError(f"{layer.name}: applying {labels} would write NaN/Inf into "
                                               f"{path}; nothing was written")
                new_values[path] = new.to(dtype)
        except BaseException:
            put_back((getattr(*paths[path]), original) for path, original in taken.items())
            raise
        for path, value in new_values.items():  # all computed: now write
            owner, attr = paths[path]
            current = getattr(owner, attr)
            if current is None:
                setattr(owner, attr, nn.Parameter(value, requires_grad=False))
                layer.created.append(path)
            elif path in taken:  # merged where it lives
                layer.backups[path] = taken[path]
            else:
                layer.backups[path] = keep(current)  # host memory, never the accelerator
                current.copy_(value)

    # ------------------------------------------------------------------ bypass
    def _prepare(self, layer: _Layer, x: torch.Tensor) -> tuple[list, bool]:
        """The layer's bypass functions for ``x``'s device and dtype, and whether one reads the layer's output."""
        key = (x.device, x.dtype)
        found = layer.prepared.get(key)
        if found is not None:
            return found
        with torch.no_grad():
            if isinstance(layer.module, nn.MultiheadAttention):
                prepared = [(e.target.part, *self.bypass.dense(e, x.device, x.dtype, hold=True))
                            for e in layer.entries]
            else:
                op = LayerOp.of(layer.module)
                prepared = [self._rows_of(e, self.bypass.functions(e, op, x.device, x.dtype)) for e in layer.entries]
        found = layer.prepared[key] = (prepared, any(hasattr(fn, "from_output") for fn in prepared))
        return found

    def _rows_of(self, entry: PlanEntry, fn: Bypass) -> Bypass:
        """A q/k/v part of a fused Linear (SD3's qkv) adds to its rows of the output only."""
        rows = self.index.rows(entry.target)
        return fn if rows is None else RowsBypass(fn, rows, self.index.modules[entry.target.module].out_features)

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
            x = given = args[0]
            if x.dtype != output.dtype or x.device != output.device:
                # the layer computed in another dtype than its input (autocast, A1111's manual cast for FP8
                # weights, an fp32 timestep embedding into fp16 weights): so does its delta
                x = x.to(device=output.device, dtype=output.dtype)
            fns, reads_output = self._prepare(layer, x)
            if layer.baked is None and reads_output:
                # forms that read the layer's output (IA3, OFT): from the output over the original weights,
                # taken before anything is added to it; each becomes a plain function of this call
                fns = [_given(fn.from_output(x, output, mod), fn) if hasattr(fn, "from_output") else fn
                       for fn in fns]
            terms = self._terms(layer, fns, x.shape[0] if x.dim() > 0 else 1)
            if torch.is_grad_enabled():  # autograd may need the layer's output as it was: a new tensor
                for fn, m in terms:
                    output = self._add_term(output, fn, x, m, in_place=False)
                return output
            # sampling (no_grad / inference_mode): the output is the layer's own new tensor, add into it
            if layer.context:  # every distinct function's h(c) is stored, whatever its multiplier now
                unique = list({id(fn): fn for fn in fns}.values())
                stored = dict(zip(map(id, unique), self.context_memo.outputs(layer.uid, x, unique, given)))
                for fn, m in terms:
                    h = stored[id(fn)]
                    if isinstance(m, tuple):
                        output.addcmul_(h, self._row_tensor(m, output)[0])
                    else:
                        output.add_(h, alpha=m)
                return output
            for fn, m in terms:
                self._add_term(output, fn, x, m, in_place=True)
            return output

        layer.hook = module.register_forward_hook(hook)

    def _row_multipliers(self, layer: _Layer, batch: int) -> list["float | tuple[float, ...]"]:
        """Each entry's multiplier now: a float, or one per row where its slot's weights differ between rows."""
        rows = self._rows
        out: list = []
        for entry, m in zip(layer.entries, layer.hooked):
            if entry.slot is None or rows is None or m == 0:
                out.append(m)
            elif len(rows) == 1 or len(rows) != batch:  # one row for all (text encoders), or not this batch's rows
                out.append(m * rows[0][entry.slot])
            else:
                per_row = tuple(m * row[entry.slot] for row in rows)
                out.append(per_row[0] if all(v == per_row[0] for v in per_row) else per_row)
        return out

    def _terms(self, layer: _Layer, fns: list, batch: int) -> list[tuple[Callable, "float | tuple[float, ...]"]]:
        """(function, multiplier) per distinct bypass function (one adapter in several slots is computed once),
        without the terms that are 0 on every row."""
        if self._rows is None or all(e.slot is None for e in layer.entries):  # one multiplier per entry, as ever
            return [(fn, m) for fn, m in zip(fns, layer.hooked) if m != 0]
        summed: dict[int, list] = {}
        for fn, m in zip(fns, self._row_multipliers(layer, batch)):
            if m == 0:
                continue
            item = summed.setdefault(id(fn), [fn, 0.0])
            if isinstance(m, tuple) or isinstance(item[1], tuple):
                a = item[1] if isinstance(item[1], tuple) else (item[1],) * batch
                b = m if isinstance(m, tuple) else (m,) * batch
                item[1] = tuple(u + v for u, v in zip(a, b))
            else:
                item[1] += m
        terms = []
        for fn, m in summed.values():
            if isinstance(m, tuple) and all(v == m[0] for v in m):
                m = m[0]
            if m != 0 and not (isinstance(m, tuple) and not any(m)):
                terms.append((fn, m))
        return terms

    def _row_tensor(self, m: tuple[float, ...], like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The per-row multipliers shaped to broadcast over ``like`` (batch first), and the indices of the rows
        whose multiplier is not 0 (None: all of them); cached, so a step does not copy them to the device again."""
        key = (m, like.device, like.dtype, like.dim())
        found = self._row_tensors.get(key)
        if found is None:
            if len(self._row_tensors) >= _ROW_TENSORS:
                self._row_tensors.clear()
            values = torch.tensor(m, dtype=like.dtype).view(-1, *([1] * (like.dim() - 1))).to(like.device)
            used = [r for r, v in enumerate(m) if v != 0]
            index = None if len(used) == len(m) else torch.tensor(used, dtype=torch.long).to(like.device)
            found = self._row_tensors[key] = (values, index)
        return found

    def _add_term(self, output: torch.Tensor, fn: Callable, x: torch.Tensor, m, in_place: bool) -> torch.Tensor:
        """``output + m * fn(x)``; per row where ``m`` is a tuple, computing ``fn`` only on the rows that need it."""
        if not isinstance(m, tuple):
            if not in_place:
                return output + m * fn(x)
            add_to = getattr(fn, "add_to", None)
            if add_to is not None:
                add_to(output, x, m)
            else:
                output.add_(fn(x), alpha=m)
            return output
        values, index = self._row_tensor(m, output)
        if index is None:
            h = fn(x)
            return output.addcmul_(h, values) if in_place else torch.addcmul(output, h, values)
        h = fn.rows(index) if isinstance(fn, _Known) else fn(x.index_select(0, index))
        h = h * values.index_select(0, index)
        return output.index_add_(0, index, h) if in_place else output.index_add(0, index, h)

    def _mha_hook(self, layer: _Layer) -> Callable:
        mha: nn.MultiheadAttention = layer.module  # type: ignore[assignment]
        names = ("query", "key", "value", "key_padding_mask", "need_weights", "attn_mask",
                 "average_attn_weights", "is_causal")
        defaults = (None, None, None, None, True, None, True, False)

        def hook(mod: nn.Module, args: tuple, kwargs: dict, output):
            multipliers = [m[0] if isinstance(m, tuple) else m for m in self._row_multipliers(layer, 1)]
            if not any(multipliers):  # nothing to add: the layer's own output stands
                return output
            call = dict(zip(names, defaults))
            call.update(zip(names, args))
            call.update(kwargs)
            q, k, v = call["query"], call["key"], call["value"]
            prepared, _ = self._prepare(layer, q)
            # one copy each in the input's dtype (`.to` then `.clone` copied twice when the dtype differed);
            # FP8 storage keeps out_proj (a Linear) in float8: computed in the input's dtype like the layer
            like = {"device": q.device, "dtype": q.dtype}
            in_w = mha.in_proj_weight.detach().to(**like, copy=True)
            in_b = None if mha.in_proj_bias is None else mha.in_proj_bias.detach().to(**like, copy=True)
            out_w = mha.out_proj.weight.detach().to(**like, copy=True)
            out_b = None if mha.out_proj.bias is None else mha.out_proj.bias.detach().to(**like)
            d = mha.embed_dim
            for (part, dw, db), m in zip(prepared, multipliers):
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
            first = output[0] if isinstance(output, tuple) else output
            if isinstance(first, torch.Tensor) and first.dtype != attn.dtype:  # as the host cast the layer's
                attn = attn.to(first.dtype)
            return attn, weights

        return hook
