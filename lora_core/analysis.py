"""Sweeps and block analysis: the pure parts of the X/Y/Z axes and of the Effective Block Analyzer.

Prompt edits. An X/Y/Z cell changes the ``<lora:...>`` tags of the prompt: each tag is parsed
(:func:`~lora_core.syntax.parse_tag`), edited as a :class:`~lora_core.syntax.LoraRequest` and written back
canonically (:func:`~lora_core.syntax.format_request`); the rest of the prompt is kept as it was. Axis values may
name the LoRA they act on, ``NAME:VALUE`` (a name with ``:`` is quoted, ``"my:lora":0.5``).

Block selections. ``IN05``, ranges ``IN05-OUT05`` (full-form order, either direction), ``12ALL``/``17ALL``/
``20ALL``/``26ALL`` (the blocks of that form, which must fit the model) and ``ALL``; comma or space separated; a
leading ``NOT`` selects every other block of the model's full form (LBW's conventions).

Effective Block Analyzer (LBW's behaviour). The reference image has every block at Range[1]; each analysed block
gets one image with only that block at Range[0]. The difference of an image to its reference is the share of pixel
channels whose absolute difference exceeds the threshold (default 20, LBW's); the grid shows diff | image |
reference per block, labelled ``Diff: x%``. Per seed that is one image per block plus one shared reference.
"""
from __future__ import annotations

import dataclasses
import itertools
import math
import re
from dataclasses import dataclass
from typing import Callable, Iterable, Mapping, Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from .blocks import Weight, block_ids
from .syntax import MAX_TAGS, LoraRequest, Schedule, format_number, format_request, parse_tag
from .tags import find_tags

__all__ = [
    "DEFAULT_THRESHOLD", "BlockDiff", "LoraTag", "analyzer_grid", "analyzer_lbw", "difference", "diff_image",
    "edit_loras", "expand_weight_values", "full_form_weights", "images_needed", "labelled_grid", "lora_tags",
    "parse_block_assignments", "parse_range", "parse_steps", "percent_label", "percent_table", "percent_summary",
    "select_blocks", "split_target", "with_block_weights", "with_weight",
]

DEFAULT_THRESHOLD = 20
WeightsOf = Callable[[str], Sequence[Weight]]
"""Resolves an lbw value (a preset name or a list) to Weights: ``BlockWeights.weights_of``."""


# ----------------------------------------------------------------------------- prompt edits


@dataclass(frozen=True)
class LoraTag:
    """One parsable ``<lora:...>``/``<lyco:...>`` of a prompt and where it is."""

    start: int
    end: int
    network: str
    request: LoraRequest


def lora_tags(prompt: str) -> list[LoraTag]:
    """The tags of ``prompt`` that parse to a request (malformed ones are left alone), among its first
    :data:`~lora_core.syntax.MAX_TAGS` (the later ones are skipped, as :func:`~lora_core.syntax.parse_prompt`
    says)."""
    tags = []
    for tag in itertools.islice(find_tags(prompt or ""), MAX_TAGS):
        request = parse_tag(tag.text).request
        if request is not None:
            tags.append(LoraTag(tag.start, tag.end, tag.network, request))
    return tags


def _same_name(a: str, b: str) -> bool:
    return a == b or a.casefold() == b.casefold()


def edit_loras(prompt: str, edit: Callable[[LoraRequest], LoraRequest], name: str | None = None,
               first_only: bool = False) -> str:
    """``prompt`` with the tags of LoRA ``name`` (None: every LoRA; ``first_only``: the first of them) rewritten by
    ``edit``. LookupError when there is no such tag; ValueError from ``edit`` propagates."""
    tags = [tag for tag in lora_tags(prompt) if name is None or _same_name(tag.request.name, name)]
    if not tags:
        wanted = f"<lora:{name}:...>" if name is not None else "<lora:...>"
        raise LookupError(f"the prompt has no {wanted} to change")
    if first_only:
        tags = tags[:1]
    parts, position = [], 0
    for tag in tags:
        parts += [prompt[position:tag.start], format_request(edit(tag.request), tag.network)]
        position = tag.end
    parts.append(prompt[position:])
    return "".join(parts)


def split_target(value: str) -> tuple[str | None, str]:
    """An axis value ``NAME:VALUE`` -> (NAME, VALUE); without ``:`` -> (None, VALUE)."""
    name, colon, rest = value.rpartition(":")
    if not colon:
        return None, value.strip()
    name = name.strip()
    if len(name) >= 2 and name[0] == name[-1] == '"':
        name = name[1:-1].strip()
    if not name:
        raise ValueError(f"'{value.strip()}': the LoRA name before ':' is empty")
    return name, rest.strip()


def with_weight(request: LoraRequest, weight: Schedule) -> LoraRequest:
    """The request with TE and UNET weight ``weight`` (hires weights, block weights and steps kept)."""
    return dataclasses.replace(request, te=weight, unet=weight)


def parse_steps(text: str) -> tuple[float | None, float | None]:
    """``A-B`` (either end may be left out) or ``A`` -> (start, stop); steps as in ``start=``/``stop=``."""
    start, dash, stop = text.partition("-")
    ends = []
    for end in (start, stop):
        end = end.strip()
        if not end:
            ends.append(None)
            continue
        try:
            value = float(end)
        except ValueError:
            value = math.nan
        if not math.isfinite(value) or value < 0:
            raise ValueError(f"steps '{text.strip()}': '{end}' is not a step (a number >= 0)")
        ends.append(value)
    if ends == [None, None]:
        raise ValueError(f"steps '{text.strip()}' is not A-B, A- or -B (e.g. 0-10)")
    return ends[0], ends[1] if dash else None


_NUMBER = r"[+-]?(?:\d+(?:\.\d*)?|\.\d+)"  # one way to match a run of digits: no backtracking over it
_WEIGHT_RANGE_RE = re.compile(rf"\s*({_NUMBER})\s*-\s*({_NUMBER})\s*(?:\[\s*(\d+)\s*\]|\(\s*({_NUMBER})\s*\))?\s*")


def _range_values(start: float, stop: float, count: int | None, step: float | None) -> list[float]:
    if count is not None:
        if count < 1:
            raise ValueError("a range needs at least 1 value")
        return [start] if count == 1 else [start + (stop - start) * i / (count - 1) for i in range(count)]
    step = abs(step if step is not None else 1.0)
    if step == 0:
        raise ValueError("a range step must not be 0")
    step = step if stop >= start else -step
    n = int(math.floor((stop - start) / step + 1e-9))
    return [start + step * i for i in range(n + 1)]


def expand_weight_values(values: Iterable[str]) -> list[str]:
    """Weight-axis values with ranges expanded: ``0-1 [5]`` (5 values), ``0-1 (+0.25)`` (a step), ``0-2`` (step 1);
    each may carry a ``NAME:`` prefix. Other values are kept as they are (checked later)."""
    out: list[str] = []
    for value in values:
        if not value.strip():
            continue
        name, rest = split_target(value)
        match = _WEIGHT_RANGE_RE.fullmatch(rest)
        if match is None:
            out.append(value.strip())
            continue
        count = int(match.group(3)) if match.group(3) else None
        step = float(match.group(4)) if match.group(4) else None
        numbers = _range_values(float(match.group(1)), float(match.group(2)), count, step)
        prefix = f"{name}:" if name is not None else ""
        out.extend(prefix + format_number(round(v, 6)) for v in numbers)
    return out


# ----------------------------------------------------------------------------- block selections and lbw lists

_ALL_RE = re.compile(r"(12|17|20|26)?ALL")


def _form_blocks(family: str, length: int, token: str) -> tuple[str, ...]:
    try:
        return block_ids(family, length)
    except ValueError:
        raise ValueError(f"{token}: an {family.upper()} model has no {length}-block form") from None


def select_blocks(spec: str, family: str) -> list[str]:
    """The blocks ``spec`` names, in the family's full-form order (see the module docstring); ValueError says why not."""
    full = block_ids(family)
    tokens = [token for token in re.split(r"[\s,]+", spec.strip()) if token]
    negate = bool(tokens) and tokens[0].upper() == "NOT"
    if negate:
        tokens = tokens[1:]
    if not tokens:
        raise ValueError(f"no blocks in '{spec.strip()}' (block ids such as IN05, ranges IN05-OUT05, 17ALL, NOT M00)")
    chosen: set[str] = set()
    for token in tokens:
        upper = token.upper()
        every = _ALL_RE.fullmatch(upper)
        if every is not None:
            chosen.update(_form_blocks(family, int(every.group(1)), token) if every.group(1) else full)
            continue
        ends = upper.split("-")
        unknown = [end for end in ends if end not in full]
        if len(ends) > 2 or unknown:
            raise ValueError(f"'{token}' is not a block or a range of blocks of an {family.upper()} model "
                             f"({' '.join(full)})")
        first, last = sorted(full.index(end) for end in (ends[0], ends[-1]))
        chosen.update(full[first:last + 1])
    return [block for block in full if (block in chosen) != negate]


def parse_block_assignments(text: str, family: str) -> dict[str, str]:
    """``IN05=0.5``, ``IN05-OUT05=0``, ``NOT M00=0``, several separated by ``;`` -> {block: weight}."""
    values: dict[str, str] = {}
    for part in text.split(";"):
        if not part.strip():
            continue
        blocks, equals, value = part.rpartition("=")
        if not equals:
            raise ValueError(f"'{part.strip()}' is not BLOCKS=VALUE (e.g. IN05=0.5, IN05-OUT05=0, NOT M00=0)")
        weight = str(Weight.parse(value))
        values.update(dict.fromkeys(select_blocks(blocks, family), weight))
    if not values:
        raise ValueError("no BLOCKS=VALUE given (e.g. IN05=0.5)")
    return values


def full_form_weights(lbw: str | None, family: str, weights_of: WeightsOf) -> dict[str, str]:
    """A request's block weights as {block: weight text} in the family's full form: 1 everywhere without lbw; a short
    list expanded (blocks it does not name get 0, as in LBW); ``R``/``U``/``X`` kept as written."""
    full = block_ids(family)
    if lbw is None:
        return dict.fromkeys(full, "1")
    weights = weights_of(lbw)
    tokens = dict.fromkeys(full, "0")
    tokens.update(zip(block_ids(family, len(weights)), (str(w) for w in weights)))
    return tokens


def with_block_weights(request: LoraRequest, values: Mapping[str, str], family: str,
                       weights_of: WeightsOf) -> LoraRequest:
    """The request with ``values`` ({block: weight}) written over its block weights (a full-form lbw list)."""
    tokens = full_form_weights(request.lbw, family, weights_of)
    tokens.update(values)
    return dataclasses.replace(request, lbw=",".join(tokens.values()))


def parse_range(text: str) -> tuple[float, float]:
    """The analyzer's range ``TEST,REFERENCE`` (e.g. ``0,1``)."""
    parts = [part.strip() for part in text.split(",")]
    try:
        values = [float(part) for part in parts]
    except ValueError:
        values = []
    if len(values) != 2 or not all(math.isfinite(v) for v in values):
        raise ValueError(f"range '{text.strip()}' is not two numbers TEST,REFERENCE such as 0,1")
    return values[0], values[1]


def analyzer_lbw(family: str, block: str | None, test: float, reference: float) -> str:
    """The full-form lbw list of one analyzer image: every block at ``reference``, ``block`` (None: none) at ``test``."""
    return ",".join(format_number(test if b == block else reference) for b in block_ids(family))


def images_needed(seeds: int, blocks: int) -> int:
    """Generations of an analyzer run: per seed, one per block plus the reference its blocks share."""
    return seeds * (blocks + 1)


# ----------------------------------------------------------------------------- image math


def _pixels(image: Image.Image | np.ndarray) -> np.ndarray:
    if isinstance(image, Image.Image):
        image = image.convert("RGB")
    return np.asarray(image, dtype=np.uint8)


def difference(image: Image.Image | np.ndarray, reference: Image.Image | np.ndarray,
               threshold: float = DEFAULT_THRESHOLD) -> tuple[float, np.ndarray]:
    """(% of pixel channels whose absolute difference exceeds ``threshold``, the absolute difference as uint8)."""
    a, b = _pixels(image), _pixels(reference)
    if a.shape != b.shape:
        raise ValueError(f"images of different sizes: {a.shape} and {b.shape}")
    diff = np.abs(a.astype(np.int16) - b.astype(np.int16)).astype(np.uint8)
    percent = float(np.count_nonzero(diff > threshold)) * 100.0 / diff.size if diff.size else 0.0
    return percent, diff


def diff_image(diff: np.ndarray, colour: str = "black") -> Image.Image:
    """The absolute difference as an image: on black (unchanged pixels black) or inverted, on white."""
    if colour not in ("black", "white"):
        raise ValueError(f"diff colour '{colour}' is not black or white")
    return Image.fromarray(diff if colour == "black" else 255 - diff)


def percent_label(percent: float) -> str:
    return f"Diff: {percent:.3f}%"


@dataclass(frozen=True)
class BlockDiff:
    """One analysed block: its image (only this block at the test value), the diff image and the % difference."""

    block: str
    image: Image.Image
    diff: Image.Image
    percent: float


def _text_size(draw: ImageDraw.ImageDraw, text: str, font) -> tuple[int, int, int, int]:
    """(width, height, left offset, top offset) of ``text`` as drawn at (0, 0)."""
    if not text:
        return 0, 0, 0, 0
    left, top, right, bottom = draw.multiline_textbbox((0, 0), text, font=font)
    return right - left, bottom - top, left, top


def labelled_grid(cells: Sequence[Sequence[Image.Image]], column_labels: Sequence[str], row_labels: Sequence[str],
                  font=None, padding: int = 4) -> Image.Image:
    """Images in rows and columns (all the same size) with a label above each column and left of each row.

    A label wider (taller) than a cell widens (heightens) every slot, cells centred in their slot; black text on
    white. ``font``: a Pillow font (default: Pillow's default font).
    """
    rows, cols = len(cells), len(cells[0]) if cells else 0
    if not rows or not cols or any(len(row) != cols for row in cells):
        raise ValueError("the grid needs rows of the same, non-zero number of images")
    if len(column_labels) != cols or len(row_labels) != rows:
        raise ValueError(f"{cols} columns and {rows} rows need as many labels, "
                         f"not {len(column_labels)} and {len(row_labels)}")
    width, height = cells[0][0].size
    if any(cell.size != (width, height) for row in cells for cell in row):
        raise ValueError("every image of the grid must have the same size")
    font = font if font is not None else ImageFont.load_default()
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    col_sizes = [_text_size(measure, text, font) for text in column_labels]
    row_sizes = [_text_size(measure, text, font) for text in row_labels]
    slot_w = max([width] + [w + 2 * padding for w, *_ in col_sizes])
    slot_h = max([height] + [h + 2 * padding for _, h, *_ in row_sizes])
    left = max(w for w, *_ in row_sizes) + 2 * padding if any(row_labels) else 0
    top = max(h for _, h, *_ in col_sizes) + 2 * padding if any(column_labels) else 0
    grid = Image.new("RGB", (left + cols * slot_w, top + rows * slot_h), "white")
    draw = ImageDraw.Draw(grid)
    for r, row in enumerate(cells):
        for c, cell in enumerate(row):
            grid.paste(cell.convert("RGB"), (left + c * slot_w + (slot_w - width) // 2,
                                             top + r * slot_h + (slot_h - height) // 2))
    for c, (text, (w, h, dx, dy)) in enumerate(zip(column_labels, col_sizes)):
        draw.multiline_text((left + c * slot_w + (slot_w - w) // 2 - dx, (top - h) // 2 - dy), text,
                            fill="black", font=font, align="center")
    for r, (text, (w, h, dx, dy)) in enumerate(zip(row_labels, row_sizes)):
        draw.multiline_text(((left - w) // 2 - dx, top + r * slot_h + (slot_h - h) // 2 - dy), text,
                            fill="black", font=font, align="center")
    return grid


def analyzer_grid(results: Sequence[BlockDiff], reference: Image.Image, test_label: str, reference_label: str,
                  swap: bool = False, font=None) -> Image.Image:
    """One row per block (diff | image | reference, the block labelled with its ``Diff: x%``); ``swap``: one column
    per block instead."""
    per_block = [[result.diff, result.image, reference] for result in results]
    block_labels = [f"{result.block}\n{percent_label(result.percent)}" for result in results]
    kinds = ["diff", test_label, reference_label]
    if not swap:
        return labelled_grid(per_block, kinds, block_labels, font)
    return labelled_grid([list(kind) for kind in zip(*per_block)], block_labels, kinds, font)


def percent_table(blocks: Sequence[str], percents: Sequence[Sequence[float]], seeds: Sequence[int]) -> str:
    """A text table: one line per block, its % difference per seed (``percents[seed][block]``) and their mean."""
    header = ["block", *(f"seed {seed}" for seed in seeds), "mean"]
    lines = [" | ".join(header), " | ".join("---" for _ in header)]
    for i, block in enumerate(blocks):
        values = [run[i] for run in percents]
        mean = sum(values) / len(values) if values else 0.0
        lines.append(" | ".join([block, *(f"{v:.3f}%" for v in values), f"{mean:.3f}%"]))
    return "\n".join(lines)


def percent_summary(blocks: Sequence[str], percents: Sequence[Sequence[float]]) -> str:
    """``BLOCK: mean%`` per block on one line (for the generation parameters)."""
    means = [sum(run[i] for run in percents) / len(percents) if percents else 0.0 for i in range(len(blocks))]
    return ", ".join(f"{block}: {mean:.3f}%" for block, mean in zip(blocks, means))
