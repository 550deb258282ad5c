"""Bypass functions: what a hooked layer adds to its output, and the caches that make that cheap.

``h_i(x)`` of a plan entry is its low-rank form where the algorithm has one (factors cast to the device and dtype
the layer computes in), else the full delta through the layer's op. What is prepared is cached per (adapter, dyn,
device, dtype) across layer updates, so switching back to a LoRA recomputes nothing; full-size deltas are held
only within the device's budget (``memory.MemoryPolicy``) and computed per call beyond it. The cross-attention
keys and values, which read the text conditioning, keep their outputs per conditioning (``ContextMemo``).
"""
from __future__ import annotations

from collections import OrderedDict, defaultdict
from typing import TYPE_CHECKING, Callable, Sequence

import torch
import torch.nn.functional as F

from .adapters.base import Adapter, Bypass, LayerOp, OutputBypass, numel
from .model_index import ModelIndex, Target

if TYPE_CHECKING:
    from .patch import PlanEntry

#: bytes a device may hold for a cache: ``limit(device)``
DeviceLimit = Callable[[torch.device], int]


def _nbytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if t is not None)


class PreparedCache:
    """Prepared bypass values per (adapter, key, device), least recently used first out beyond each device's
    limit (``budget``, lowered by ``limit(device)`` where the device has less to spare).

    A value bigger than the limit is not kept; with ``hold=False`` it is not even computed (``get`` gives None),
    so the caller can compute it per use instead of holding it.
    """

    def __init__(self, budget: int, limit: DeviceLimit | None = None):
        self.budget = budget
        self.limit = limit
        self._items: OrderedDict[tuple, tuple[Adapter, object, int, torch.device]] = OrderedDict()
        self._bytes: dict[torch.device, int] = defaultdict(int)
        self.hits = 0
        self.misses = 0

    @property
    def bytes(self) -> int:
        return sum(self._bytes.values())

    def bytes_on(self, device: torch.device) -> int:
        return self._bytes.get(torch.device(device), 0)

    def device_limit(self, device: torch.device) -> int:
        return self.budget if self.limit is None else min(self.budget, self.limit(device))

    def get(self, adapter: Adapter, key: tuple, device: torch.device, compute: Callable[[], tuple[object, int]],
            hold: bool = True, estimate: Callable[[], int] | None = None):
        device = torch.device(device)
        full_key = (id(adapter), *key, device)
        item = self._items.get(full_key)
        if item is not None and item[0] is adapter:  # the adapter is referenced here, so its id is not reused
            self._items.move_to_end(full_key)
            self.hits += 1
            return item[1]
        self.misses += 1
        limit = self.device_limit(device)
        if not hold and estimate is not None and estimate() > limit:
            return None
        value, nbytes = compute()
        if nbytes <= limit:
            self._items[full_key] = (adapter, value, nbytes, device)
            self._bytes[device] += nbytes
            self._evict(device, limit)
        elif not hold:
            return None
        return value

    def _evict(self, device: torch.device, limit: int) -> None:
        if self._bytes[device] <= limit:
            return
        for full_key in [k for k, v in self._items.items() if v[3] == device]:  # oldest first
            self._bytes[device] -= self._items.pop(full_key)[2]
            if self._bytes[device] <= limit:
                return

    def clear(self) -> None:
        self._items.clear()
        self._bytes.clear()


class ContextMemo:
    """Bypass outputs ``h_i(c)`` of the cross-attention key/value layers per text conditioning ``c``.

    Their input is the conditioning, which the sampler passes again (as a new tensor, same values) on every step,
    so ``h_i(c)`` (independent of the multipliers) is computed on the first step and reused: at small images
    these layers were a fifth of the UNet's bypass cost (SD1.5, 8x8 latent, rank 32). A conditioning is known by
    its values: a private copy of the last ``slots`` ones is compared with ``torch.equal``, once per new tensor
    (the layers of one step see the same object; its version counter catches a change in place). Stored outputs
    are bounded by ``budget`` bytes (and the device's ``limit``); beyond it they are computed on each call by the
    same arithmetic, so an image never depends on what was stored.
    """

    def __init__(self, budget: int = 256 << 20, slots: int = 4, limit: DeviceLimit | None = None):
        self.budget, self.slots, self.limit = budget, slots, limit
        self._known: list[tuple[int, torch.Tensor]] = []  # (serial, copy of the values), newest last
        self._last: tuple[torch.Tensor, int, int] | None = None  # (tensor seen last, its version, serial)
        self._serial = 0
        self._values: dict[tuple, list[torch.Tensor]] = {}  # (layer uid, serial, dtype, device) -> h_i per entry
        self.bytes = 0
        self.hits = 0

    def bytes_on(self, device: torch.device) -> int:
        device = torch.device(device)
        return sum(_nbytes(v) for v in self._values.values() if v and v[0].device == device)

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

    def _drop(self, key: tuple) -> None:
        self.bytes -= _nbytes(self._values.pop(key))

    def outputs(self, uid: int, x: torch.Tensor, fns: Sequence[Callable],
                given: torch.Tensor | None = None) -> list[torch.Tensor]:
        """``[fn(x) for fn in fns]``, from the store when this layer has already seen these values. ``given``: the
        tensor the layer was called with, where ``x`` is a cast of it made for this layer (autocast): the
        conditioning is known by that one, the same object for every layer of a step, so its values are compared
        once per step, not once per layer (on a GPU each comparison waits for the device)."""
        key = (uid, self._serial_of(x if given is None else given), x.dtype, x.device)
        values = self._values.get(key)
        if values is not None:
            self.hits += 1
            return values
        values = [fn(x) for fn in fns]
        nbytes = _nbytes(values)
        budget = self.budget if self.limit is None else min(self.budget, self.limit(x.device))
        if self.bytes + nbytes <= budget:
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


class RowsBypass:
    """``h(x)`` of a target that is some output rows of its layer (q, k or v of SD3's fused qkv Linear): the
    part's own output, placed in its rows of the layer's output."""

    __slots__ = ("fn", "rows", "width")

    def __init__(self, fn: Bypass, rows: slice, width: int):
        self.fn, self.rows, self.width = fn, rows, width

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return F.pad(self.fn(x), (self.rows.start, self.width - self.rows.stop))

    def add_to(self, out: torch.Tensor, x: torch.Tensor, m: float) -> None:
        view = out[..., self.rows]
        add_to = getattr(self.fn, "add_to", None)
        if add_to is not None:
            add_to(view, x, m)
        else:
            view.add_(self.fn(x), alpha=m)


#: the original weight or bias of a target as the model had it before any merge: ``original(target, what)``
Original = Callable[[Target, str], "torch.Tensor | None"]


class BypassBuilder:
    """Builds ``h_i`` of plan entries for a device and dtype, through a ``PreparedCache``."""

    def __init__(self, index: ModelIndex, cache: PreparedCache, original: Original):
        self.index, self.cache, self.original = index, cache, original

    def functions(self, entry: "PlanEntry", op: LayerOp, device: torch.device, dtype: torch.dtype) -> Bypass:
        """``h(x)`` of one entry: the low-rank form where the algorithm has one, else the full delta (held while
        the device's budget allows it, computed on each call beyond it, so a forced bypass never runs out of
        memory). A form that reads the layer's output (IA3, OFT) comes as an ``OutputBypass``: ``from_output``
        where the hook can give it the output over the original weights, the full delta otherwise."""
        adapter = entry.adapter

        def low_rank():  # the factors, cast to the device and dtype, are what the function holds
            fn = adapter.low_rank_bypass(op, device, dtype, entry.dyn)
            size = torch.empty((), dtype=dtype).element_size()
            return fn, 0 if fn is None else sum(t.numel() for t in adapter.tensors()) * size

        fast = self.cache.get(adapter, ("low", entry.dyn, dtype), device, low_rank)
        if fast is not None and not hasattr(fast, "from_output"):
            return fast

        def full(x: torch.Tensor) -> torch.Tensor:  # looked up per call: only the cache holds deltas
            dense = self.dense(entry, device, dtype, hold=False)
            return op(x, *(dense if dense is not None else self.compute_dense(entry, device, dtype)))

        return full if fast is None else OutputBypass(fast, full)

    def compute_dense(self, entry: "PlanEntry", device: torch.device,
                      dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The entry's full delta (and bias delta) of the original weight, in ``dtype`` on ``device``."""
        base = self.original(entry.target, "weight").detach().to(device)
        dw = entry.adapter.delta_weight(base.float(), entry.dyn).to(dtype)
        bias = self.original(entry.target, "bias")
        db = entry.adapter.delta_bias(None if bias is None else bias.detach().to(device), device)
        return dw, None if db is None else db.to(dtype)

    def dense(self, entry: "PlanEntry", device: torch.device, dtype: torch.dtype, hold: bool):
        """The full delta (and bias delta) of an entry through the cache; None when it does not fit the budget
        and ``hold`` is false (the caller then computes it when needed)."""
        def compute():
            dw, db = self.compute_dense(entry, device, dtype)
            return (dw, db), _nbytes((dw, db))

        def estimate() -> int:  # only on a miss: a forced bypass beyond the budget looks the delta up per call
            return numel(self.index.weight_shape(entry.target)) * torch.empty((), dtype=dtype).element_size()

        return self.cache.get(entry.adapter, ("dense", entry.dyn, dtype), device, compute, hold=hold,
                              estimate=estimate)
