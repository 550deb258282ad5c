"""What every tool checks before it works: its arguments, and the file it will write.

Each tool calls these first, so a bad request ends in one typed error that names the option or the file, before
any tensor is read or anything is written. :class:`~.common.UsageError` is for arguments that are wrong whatever
the files hold (out of range, contradicting each other, an output that is also an input); ``LoraFileError`` is
for a file that is missing, of the wrong kind, or in the way. The CLI exits with 2 for the first and 1 for the
second.
"""
from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Iterable, Sequence

import torch

from ..errors import LoraFileError
from ..io import SAFETENSORS_SUFFIX, temp_file
from .common import ToolError, UsageError
from .svd import DYNAMIC_PARAMS


def require_rank(value: int | None, what: str) -> None:
    """A rank is a whole number of at least 1 (None: not given). ``what`` names it: 'the rank (--rank)'."""
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise UsageError(f"{what} must be a whole number of at least 1, not {value}")


def require_finite(value: float, what: str, *, minimum: float | None = None) -> None:
    """A finite number (NaN and Inf would end in a file of NaN), optionally at least ``minimum``."""
    if not math.isfinite(value):
        raise UsageError(f"{what} must be a finite number, not {value}")
    if minimum is not None and value < minimum:
        raise UsageError(f"{what} must be at least {minimum:g}, not {value:g}")


def require_clamp(quantile: float | None) -> None:
    """A clamp quantile is above 0 and at most 1 (None: no clamp)."""
    if quantile is not None and not (math.isfinite(quantile) and 0 < quantile <= 1):
        raise UsageError(f"the clamp quantile (--clamp-quantile) must be above 0 and at most 1 (0.99 clamps the "
                         f"top 1% of values), not {quantile:g}; --no-clamp keeps every value")


def require_dynamic(method: str | None, param: float | None) -> None:
    """A dynamic method comes with its parameter, in its range; a parameter without a method is refused."""
    if method is None:
        if param is not None:
            raise UsageError("the dynamic parameter (--dynamic-param) needs a dynamic method (--dynamic "
                             f"{'|'.join(DYNAMIC_PARAMS)})")
        return
    if method not in DYNAMIC_PARAMS:
        raise UsageError(f"unknown dynamic method '{method}' (choose from {', '.join(DYNAMIC_PARAMS)})")
    if param is None:
        raise UsageError(f"the dynamic method {method} needs its parameter (dynamic_param=..., --dynamic-param)")
    meaning, low, high, low_allowed = DYNAMIC_PARAMS[method]
    above = param >= low if low_allowed else param > low
    if not (math.isfinite(param) and above and param <= high):
        bounds = f"at least {low:g}" if high == math.inf else f"above {low:g} and at most {high:g}"
        raise UsageError(f"the parameter of {method} (--dynamic-param) is {meaning}: it must be {bounds}, "
                         f"not {param:g}")


def require_device(device: str | torch.device) -> None:
    """A device torch knows and this machine has (checked before hours of work end in a device error)."""
    try:
        parsed = torch.device(device)
    except (RuntimeError, TypeError):
        raise UsageError(f"unknown device '{device}' (cpu, cuda, cuda:N, mps)") from None
    if parsed.type == "cpu":
        return
    if parsed.type == "mps":
        available, count = torch.backends.mps.is_available(), 1
    else:
        backend = getattr(torch, parsed.type, None)
        available = bool(backend is not None and hasattr(backend, "is_available") and backend.is_available())
        count = backend.device_count() if available and hasattr(backend, "device_count") else int(available)
    if not available:
        raise UsageError(f"device '{device}': this machine has no {parsed.type} device (use cpu)")
    if parsed.index is not None and parsed.index >= count:
        raise UsageError(f"device '{device}': this machine has {count} {parsed.type} device(s), "
                         f"numbered from 0")


def same_file(a: str | os.PathLike, b: str | os.PathLike) -> bool:
    """Whether two paths name one file: the same real path (symlinks resolved), or one inode (hard links)."""
    if os.path.realpath(a) == os.path.realpath(b):
        return True
    try:
        return os.path.samefile(a, b)
    except OSError:  # one of them does not exist (yet)
        return False


def require_writable_folder(folder: Path) -> None:
    """A folder that exists and takes a new file; else a LoraFileError naming it."""
    if not folder.exists():
        raise LoraFileError(folder, "the output folder does not exist")
    if not folder.is_dir():
        raise LoraFileError(folder, "is not a folder, so the output cannot be written in it")
    try:  # os.access says yes to root on read-only mounts; creating a file is the real test
        fd, name = temp_file(folder, ".lora-core-write-test.")
    except OSError as error:
        raise LoraFileError(folder, f"cannot write the output in this folder ({error.strerror or error})") from None
    os.close(fd)
    os.unlink(name)


def check_output(path: str | os.PathLike, overwrite: bool,
                 inputs: Iterable[str | os.PathLike] = ()) -> Path:
    """The output path, or a refusal: not .safetensors, a folder, one of ``inputs`` (even with ``overwrite``: a
    tool reads its inputs while it writes), an existing file without ``overwrite``, a folder it cannot write in."""
    path = Path(path)
    if path.suffix.lower() != SAFETENSORS_SUFFIX:
        raise LoraFileError(path, "the output must be a .safetensors file")
    if path.is_dir():
        raise LoraFileError(path, "is a directory")
    for source in inputs:
        if same_file(path, source):
            raise UsageError(f"{path}: the output is also an input ({source}); write to a new file "
                             "(--overwrite never replaces an input)")
    if path.exists() and not overwrite:
        raise LoraFileError(path, "already exists; pass overwrite=True (--overwrite) to replace it")
    require_writable_folder(path.parent)
    return path


def require_result_finite(key: str, tensor: torch.Tensor) -> None:
    """A tensor about to be written is finite; else the ratios or the multiplier are too large for its dtype."""
    if tensor.is_floating_point() and tensor.numel() and not bool(torch.isfinite(tensor).all()):
        dtype = str(tensor.dtype).removeprefix("torch.")
        raise ToolError(f"the result is not finite: tensor '{key}' would hold NaN or Inf in {dtype} (a ratio or "
                        "multiplier too large for the save precision?); nothing was written")


def layer_rank_limit(shape: Sequence[int]) -> int:
    """The largest rank a change of a layer of weight ``shape`` can have: min(out, in x k x k)."""
    return min(shape[0], math.prod(shape[1:]))


def is_kxk(shape: Sequence[int]) -> bool:
    """A convolution with a kernel larger than 1x1 (its rank is ``conv_rank``)."""
    return len(shape) == 4 and shape[2] * shape[3] > 1


def require_ranks_fit(rank: int | None, conv_rank: int | None, shapes: Iterable[Sequence[int]], source: str) -> None:
    """Refuse a rank larger than every layer of its kind can hold (a smaller layer caps it, as sd-scripts does):
    ``rank`` for linear and 1x1 layers, ``conv_rank`` for k x k convolutions, over the layer shapes of ``source``."""
    limits = {False: 0, True: 0}
    for shape in shapes:
        limits[is_kxk(shape)] = max(limits[is_kxk(shape)], layer_rank_limit(shape))
    for value, kxk, what in ((rank, False, "the rank (--rank)"), (conv_rank, True, "the conv rank (--conv-rank)")):
        if value is not None and limits[kxk] and value > limits[kxk]:
            raise UsageError(f"{what} {value} is larger than any layer of {source} can hold (at most "
                             f"{limits[kxk]})")
