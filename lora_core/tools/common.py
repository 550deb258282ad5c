"""What every tool shares: precisions, progress, ``name:ratio[:blocks]`` items, block tables, typed refusals."""
from __future__ import annotations

import math
import os
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Mapping, Sequence

import torch

from ..blocks import BlockWeights, PresetBook, resolve_weights
from ..errors import FamilyMismatchError, LoraError, LoraFileError, LoraNotFoundError
from ..io import LORA_SUFFIXES

Progress = Callable[[int, int, str], None]
"""``progress(done, total, what)``: called as work advances (the CLI shows tqdm, the WebUI tab its bar)."""

PRECISIONS: dict[str, torch.dtype] = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32,
                                      "float": torch.float32, "fp64": torch.float64}
SAVE_PRECISIONS = ("fp16", "bf16", "fp32")
COMPUTE_PRECISIONS = ("fp32", "fp64", "fp16", "bf16")


class ToolError(LoraError):
    """A tool was asked for something it cannot do (bad option, nothing to merge...); the message says why."""


class UsageError(ToolError, ValueError):
    """An argument is out of range or contradicts another (the output is an input, a NaN ratio...); raised before
    any computation, with nothing written. The CLI exits with status 2 for it, 1 for the other errors."""


class FamiliesDifferError(FamilyMismatchError):
    """Two inputs of one tool are for different model families (SD1/SD2/SDXL)."""

    def __init__(self, path: str, file_family: str, other_path: str, other_family: str):
        LoraError.__init__(self, f"{path} is for {file_family.upper()} but {other_path} is for "
                                 f"{other_family.upper()}; a tool only combines files of one family")
        self.path, self.file_family, self.model_family = str(path), file_family, other_family


def dtype_of(precision: str | torch.dtype | None) -> torch.dtype | None:
    """'fp16' | 'bf16' | 'fp32' ('float') | 'fp64' | a torch dtype | None -> dtype or None."""
    if precision is None or isinstance(precision, torch.dtype):
        return precision
    try:
        return PRECISIONS[precision.lower()]
    except KeyError:
        raise UsageError(f"unknown precision '{precision}' (choose from {', '.join(PRECISIONS)})") from None


def same_family(files: Sequence[tuple[object, str | None]]) -> str | None:
    """The one family of ``(path, family)`` pairs (unknown families are ignored); FamiliesDifferError if two differ."""
    first: tuple[object, str] | None = None
    for path, family in files:
        if family in (None, "unknown"):
            continue
        if first is None:
            first = (path, family)
        elif family != first[1]:
            raise FamiliesDifferError(str(path), family, str(first[0]), first[1])
    return None if first is None else first[1]


def step(progress: Progress | None, done: int, total: int, what: str) -> None:
    if progress is not None:
        progress(done, total, what)


# ------------------------------------------------------------------------------------------ LoRA items

@dataclass(frozen=True)
class LoraItem:
    """One LoRA to merge: its file, its ratio and optionally block weights (a preset name or a list)."""

    path: Path
    ratio: float = 1.0
    blocks: str | None = None

    @property
    def name(self) -> str:
        return self.path.stem


def _number(text: str) -> float | None:
    try:
        return float(text)
    except ValueError:
        return None


def parse_item(text: str, lora_dirs: Sequence[str | os.PathLike] = ()) -> LoraItem:
    """``NAME[:RATIO[:PRESET|w1,...,wn]]``; NAME is a path or a file stem / alias under ``lora_dirs``.

    Split from the right, so a Windows path (``C:\\x.safetensors:0.5``) keeps its drive letter.
    """
    head, ratio, blocks = text, 1.0, None
    rest, sep, last = text.rpartition(":")
    if sep and _number(last) is not None:
        head, ratio = rest, float(last)
    elif sep:
        before, sep2, ratio_text = rest.rpartition(":")
        if sep2 and _number(ratio_text) is not None:
            head, ratio, blocks = before, float(ratio_text), last.strip() or None
    return checked_item(LoraItem(find_lora(head.strip(), lora_dirs), ratio, blocks))


def checked_item(item: LoraItem) -> LoraItem:
    """``item`` when its ratio is a finite number; UsageError otherwise (a NaN ratio would merge into NaN)."""
    if not math.isfinite(item.ratio):
        raise UsageError(f"{item.path}: the ratio must be a finite number, not {item.ratio}")
    return item


def find_lora(name: str, lora_dirs: Sequence[str | os.PathLike] = ()) -> Path:
    """A path that exists, else the LoRA of that name under ``lora_dirs``; LoraFileError when there is none."""
    path = Path(name)
    if path.is_file():
        return path
    if path.is_dir():
        raise LoraFileError(path, "is a directory, not a LoRA file")
    for folder in lora_dirs:
        if not Path(folder).is_dir():
            raise LoraFileError(folder, "the LoRA folder (--lora-dir) " + ("is not a folder" if Path(folder).exists()
                                                                           else "does not exist"))
    if lora_dirs and path.suffix.lower() not in LORA_SUFFIXES and len(path.parts) == 1:
        from ..library import LoraLibrary

        library = LoraLibrary(lora_dirs)
        library.refresh()
        try:
            return library.resolve(name).path
        except LoraNotFoundError as error:  # say where it was looked for
            raise LoraNotFoundError(name, error.close_matches,
                                    reason=f"no file '{name}', nor a LoRA of that name in "
                                           f"{', '.join(map(str, lora_dirs))} (names are file names without "
                                           "extension, or aliases)") from None
    raise LoraFileError(path, "file not found" + (" (nor a LoRA of that name in "
                                                  f"{', '.join(map(str, lora_dirs))})" if lora_dirs else ""))


def require_file(path: str | os.PathLike, kind: str) -> Path:
    """``path`` when it names a file; a LoraFileError saying it is a directory or missing (``kind``: 'LoRA')."""
    path = Path(path)
    if path.is_dir():
        raise LoraFileError(path, f"is a directory, not a {kind} file")
    if not path.exists():
        raise LoraFileError(path, "file not found")
    return path


def as_item(item: LoraItem | str | os.PathLike, lora_dirs: Sequence[str | os.PathLike] = ()) -> LoraItem:
    """A LoraItem as it is; a path: that file at ratio 1; a text: :func:`parse_item`."""
    if isinstance(item, LoraItem):
        return checked_item(item)
    if isinstance(item, os.PathLike):
        return LoraItem(find_lora(os.fspath(item)))
    return parse_item(item, lora_dirs)


def block_table(blocks: str | None, family: str, presets: PresetBook | None = None,
                seed: int = 0) -> Mapping[str, float] | None:
    """Block id -> weight for a preset name or a list (12/17/20/26 values); None without blocks.

    ``R``/``U`` values draw from a ``random.Random(seed)``, so a merge is reproducible; ``X`` is 1.
    """
    if not blocks:
        return None
    try:
        weights = BlockWeights(presets).weights_of(blocks)
        return resolve_weights(weights, family, 1.0, random.Random(seed))
    except ValueError as error:  # an unknown preset, a list of the wrong length: the argument is wrong
        raise UsageError(str(error)) from None
