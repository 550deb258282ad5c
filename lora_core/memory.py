"""Where the Patcher keeps tensors, and how much of a device it may take.

Two rules, whatever the device (CUDA, MPS, CPU) and whatever the host does to the model between calls
(``--lowvram``/``--medvram`` move modules between the CPU and the GPU around each forward; FP8 storage and
manual casting change a weight's dtype for the length of a call):

- Originals live in host memory. A merged layer's original weight is copied to the CPU (into pinned memory
  when it comes from CUDA, so that putting it back is one DMA) and copied back into whatever tensor the layer
  holds then, on whatever device: a copy of the same dtype is exact.
- What must live on an accelerator (bypass factors and full-size deltas, stored cross-attention outputs) is
  bounded per device by what that device can spare: a share of its free memory beyond a reserve for the
  generation's own activations, never more than the configured budget. Free memory is read from the device
  (``torch.cuda.mem_get_info`` plus what PyTorch's allocator holds unused; MPS's recommended working set less
  what its driver holds; the host's MemAvailable), once per device and generation.
"""
from __future__ import annotations

import mmap
import sys
from dataclasses import dataclass, field
from typing import Callable, Iterable

import torch

HOST = torch.device("cpu")


@dataclass(frozen=True)
class MemoryReport:
    """What a device says about its memory, in bytes."""

    free: int  #: what a new allocation can still get (for CUDA: the driver's free memory plus PyTorch's cache)
    total: int


MemoryProbe = Callable[[torch.device], "MemoryReport | None"]


def _host_report() -> MemoryReport | None:
    try:
        with open("/proc/meminfo") as f:
            info = {line.split(":")[0]: int(line.split()[1]) * 1024 for line in f if line.split()[1:]}
        return MemoryReport(info["MemAvailable"], info["MemTotal"])
    except (OSError, KeyError, ValueError, IndexError):
        return None


def probe(device: torch.device) -> MemoryReport | None:
    """The device's own report, or None where it gives none (then only the configured budgets apply)."""
    try:
        if device.type == "cuda":
            free, total = torch.cuda.mem_get_info(device)
            cached = torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
            return MemoryReport(int(free + max(0, cached)), int(total))
        if device.type == "mps":
            total = int(torch.mps.recommended_max_memory())
            return MemoryReport(max(0, total - int(torch.mps.driver_allocated_memory())), total)
        if device.type == "cpu":
            return _host_report()
    except (AttributeError, RuntimeError):  # an older torch or a device that does not answer
        return None
    return None


@dataclass
class MemoryPolicy:
    """Budgets per device for what bypass keeps there.

    ``budget(device, configured, held)`` is at most ``configured`` and at most ``share`` of what the device
    could give beyond ``reserve`` bytes if we freed what we hold there (``held()``, asked only when the device is
    read, once per generation): a cache never pushes a
    generation into running out of memory, and on a device that reports nothing the configured budget holds.
    Defaults: half of what is free beyond 1.5 GiB. On a 6 GB card with SD1.5 in fp16 (about 3.5 GB free) that
    is about 1 GiB; the built-in keeps nothing on the device at all.
    """

    reserve: int = 3 << 29  # 1.5 GiB for activations (SD1.5 fp16 at 512x512, batch 1, needs about 1 GiB)
    share: float = 0.5
    report: MemoryProbe = probe
    _free: dict[torch.device, int | None] = field(default_factory=dict, repr=False)

    def new_generation(self) -> None:
        """Read the devices again at the next use (free memory changes between generations)."""
        self._free.clear()

    def free(self, device: torch.device, held: Callable[[], int] = lambda: 0) -> int | None:
        """What the device can give us this generation: its free bytes plus what we held there when it was read
        (``held``; read once per generation, so later growth of our caches is not counted twice); None if the
        device reports nothing."""
        device = torch.device(device)
        if device not in self._free:
            report = self.report(device)
            self._free[device] = None if report is None else max(0, int(report.free)) + held()
        return self._free[device]

    def budget(self, device: torch.device, configured: int, held: Callable[[], int] = lambda: 0) -> int:
        free = self.free(device, held)
        if free is None or torch.device(device).type == "meta":
            return configured
        return max(0, min(configured, int((free - self.reserve) * self.share)))

    def describe(self, device: torch.device) -> str:
        free = self.free(device)
        return f"{device}: free memory unknown" if free is None else f"{device}: {free / 2**20:.0f} MiB free"


#: Host copies from at least this many bytes get a memory mapping of their own (see ``host_empty_like``).
OWN_MAPPING_BYTES = 1 << 16
_PRIVATE = {} if sys.platform == "win32" else {"flags": mmap.MAP_PRIVATE}  # anonymous: fileno -1 adds MAP_ANON


def host_empty_like(tensor: torch.Tensor) -> torch.Tensor:
    """An uninitialised host tensor of ``tensor``'s dtype, shape and strides.

    From ``OWN_MAPPING_BYTES`` on it lives in an anonymous memory mapping of its own, outside the allocator's heap,
    and goes back to the system when the last view of it is freed. Backups are gigabytes that come and go with each
    merge and restore: in the heap, the model's activations are placed around them in one state and in the hole
    they leave in the other, and whether the heap ever gives them back depends on the allocator. Measured in the
    CPU WebUI (``bench/bench_webui.py``, a merged LyCORIS stack running exactly the plain model's operations): UNet
    calls 1.04-1.07x plain's with the backups in the heap (three runs), 0.98-1.00x with them in mappings (three).
    A mapping costs what a large ``malloc`` costs from the system: its pages are faulted in on the first write
    (about 0.25 s a GiB on the 2-core test bed; huge pages would fault less but can stall for seconds compacting).
    """
    shape, stride = tuple(tensor.shape), tuple(tensor.stride())
    extent = 1 + sum((size - 1) * step for size, step in zip(shape, stride)) if tensor.numel() else 0
    nbytes = extent * tensor.element_size()
    if nbytes >= OWN_MAPPING_BYTES:
        try:
            block = mmap.mmap(-1, nbytes, **_PRIVATE)
        except (OSError, ValueError, OverflowError):  # no mapping to be had: the heap will do
            pass
        else:  # the tensor holds a reference to the mapping: unmapped when the last view is freed
            flat = torch.frombuffer(block, dtype=torch.uint8)
            return flat.view(tensor.dtype).as_strided(shape, stride)
    return torch.empty_strided(shape, stride, dtype=tensor.dtype, device=HOST)


def keep(tensor: torch.Tensor) -> torch.Tensor:
    """A copy of ``tensor`` in host memory, same dtype, shape and strides: pinned when it comes from CUDA (putting
    it back is one DMA), else in a mapping of its own when it is large (``host_empty_like``)."""
    tensor = tensor.detach()
    if tensor.device.type == "cuda":
        copy = torch.empty_strided(tensor.shape, tensor.stride(), dtype=tensor.dtype, device=HOST,
                                   pin_memory=True)
    else:
        copy = host_empty_like(tensor)
    copy.copy_(tensor)
    return copy


def put_back(pairs: Iterable[tuple[torch.Tensor, torch.Tensor]]) -> None:
    """Copy each host original into its live tensor (wherever it lives now), exactly; one wait at the end for
    copies from pinned memory."""
    pending = False
    for live, original in pairs:
        asynchronous = original.is_pinned() and live.device.type == "cuda"
        live.copy_(original, non_blocking=asynchronous)
        pending = pending or asynchronous
    if pending:
        torch.cuda.synchronize()


def host_bytes_free() -> int | None:
    report = _host_report()
    return None if report is None else report.free


def compute_device(parameters: Iterable[torch.Tensor]) -> torch.device:
    """Where the model computes: its first accelerator parameter's device (with ``--lowvram`` most of the UNet
    waits on the CPU between forwards), else the CPU."""
    device = HOST
    for p in parameters:
        if p.device.type not in ("cpu", "meta"):
            return p.device
        device = p.device
    return device
