"""Block weights: block ids, layer -> block, presets, ``lbw=``/``lbwe=`` -> a multiplier per layer.

Compatible with hako-mikan's lora-block-weight (LBW); SPEC §2-§4.

Blocks. SD1/SD2 have 26 (``BASE IN00..IN11 M00 OUT00..OUT11``), SDXL 20 (``BASE IN00..IN08 M00
OUT00..OUT08``); the short forms (17 for SD1/SD2, 12 for SDXL) name the blocks with attention only. LBW defines
no blocks for the SDXL refiner or SD3 (its lists are 12/17/20/26 values for SD1/SD2/SDXL, 61 for Flux): there
``lbw=`` skips the LoRA with that message. Inpainting and instruct-pix2pix models have their base's blocks.
A layer's block comes from its A1111 module name: ``...diffusion_model.input_blocks.{i}.`` -> IN{i:02d}
(``input_blocks.0`` is the input conv: IN00), ``middle_block.`` -> M00, ``output_blocks.{i}.`` -> OUT{i:02d},
every text-encoder module (both SDXL encoders, SD2's OpenCLIP) -> BASE. The UNet layers outside the blocks
(``time_embed``, SDXL's ``label_emb``, the output ``out.``) are :data:`OTHER`: as in LBW, block weights do
not reach them (their multiplier stays 1), but an ``lbwe`` directive whose block list is empty or starts
with ``NOT`` does. (LBW also leaves text-encoder modules outside ``encoder``/``resblocks`` at 1, e.g. a
final layer norm; here they are BASE, as the spec asks.)

Weights. ``lbw`` is a preset name or a list of 12, 17, 20 or 26 values; the length must fit the model
(17/26 for SD1/SD2, 12/20 for SDXL; LBW does not check and misplaces the others). A short list is expanded
to the full form and the blocks it does not name get 0 (LBW). Values: a number, ``R`` (uniform 0..1), ``U``
(uniform -0.5..1.5), both rounded to 3 decimals as LBW does and drawn from the caller's ``random.Random``
(seed it per generation for reproducible images), ``X``, ``X+n``, ``X-n`` (the request's ``x=``).

Elemental directives (``lbwe``). ``BLOCKS:ELEMENTS:RATIO``, comma or newline separated: BLOCKS are block
ids and ``A-B`` ranges in 26-order (either direction), space separated; ELEMENTS are space-separated
substrings of the layer name below its UNet / text-encoder root, dotted or underscored as A1111's network
keys write it (``attn1``, ``proj_in``, ``ff_net``; unlike LBW, which searches the whole key, ``ff`` does not
match every UNet layer through ``diffusion_model``); either list may start with ``NOT`` to invert it (LBW),
and an empty list matches every layer. A layer that both lists match takes RATIO *instead of* its block
weight; the last matching directive wins. ``lbwe=NAME`` names an elemental preset (LBW's
``elempresets.txt`` format: paragraphs ``NAME:BLOCKS:ELEMENTS:RATIO`` separated by blank lines, more
directives on the following lines).

Preset file: one ``NAME:w1,...,wn`` per line (n in 12/17/20/26); every other line (and any line with
``#``, as in LBW) is a comment and is written back unchanged. LBW's ``lbwpresets.txt`` has this format;
its Flux presets (61 values) are reported and not imported.
"""
from __future__ import annotations

import difflib
import os
import random
import re
import weakref
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterable, Mapping, Sequence

import torch

from .errors import BlockWeightError
from .families import family_name
from .io import temp_file
from .model_index import ModelIndex, Target
from .schedule import format_number, parse_number, quote
from .syntax import LoraRequest

if TYPE_CHECKING:
    from .network import Network

__all__ = [
    "BLOCK_IDS_26", "BLOCK_IDS_17", "BLOCK_IDS_20", "BLOCK_IDS_12", "OTHER", "DEFAULT_PRESETS",
    "DEFAULT_ELEMENTAL_PRESETS", "BlockWeights", "Directive", "Preset", "PresetBook", "Weight",
    "block_ids", "block_norms", "block_of", "expand", "import_lbw_presets", "layer_scale_factory",
    "parse_directives", "parse_elemental_presets", "parse_weights", "resolve_weights",
]

BLOCK_IDS_26 = ("BASE", *(f"IN{i:02d}" for i in range(12)), "M00", *(f"OUT{i:02d}" for i in range(12)))
BLOCK_IDS_17 = ("BASE", "IN01", "IN02", "IN04", "IN05", "IN07", "IN08", "M00", *(f"OUT{i:02d}" for i in range(3, 12)))
BLOCK_IDS_20 = ("BASE", *(f"IN{i:02d}" for i in range(9)), "M00", *(f"OUT{i:02d}" for i in range(9)))
BLOCK_IDS_12 = ("BASE", "IN04", "IN05", "IN07", "IN08", "M00", *(f"OUT{i:02d}" for i in range(6)))
OTHER = "OTHER"
"""The block of UNet layers outside every block (time embedding, label embedding, output conv)."""

_SD_FORMS = {26: BLOCK_IDS_26, 17: BLOCK_IDS_17}
_FORMS: dict[str, dict[int, tuple[str, ...]]] = {"sd1": _SD_FORMS, "sd2": _SD_FORMS,
                                                  "sdxl": {20: BLOCK_IDS_20, 12: BLOCK_IDS_12}}
LENGTHS = (12, 17, 20, 26)

DEFAULT_PRESETS = """\
NONE:0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0
ALL:1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1
INS:1,1,1,1,0,0,0,0,0,0,0,0,0,0,0,0,0
IND:1,0,0,0,1,1,1,0,0,0,0,0,0,0,0,0,0
INALL:1,1,1,1,1,1,1,0,0,0,0,0,0,0,0,0,0
MIDD:1,0,0,0,1,1,1,1,1,1,1,1,0,0,0,0,0
OUTD:1,0,0,0,0,0,0,0,1,1,1,1,0,0,0,0,0
OUTS:1,0,0,0,0,0,0,0,0,0,0,0,1,1,1,1,1
OUTALL:1,0,0,0,0,0,0,0,1,1,1,1,1,1,1,1,1
ALL0.5:0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5
"""
"""SPEC §4 (LBW's defaults), 17-form."""

DEFAULT_ELEMENTAL_PRESETS = """\
ATTNDEEPON:IN05-OUT05:attn:1

ATTNDEEPOFF:IN05-OUT05:attn:0

PROJDEEPOFF:IN05-OUT05:proj:0
"""
"""LBW's default elemental presets."""


# ----------------------------------------------------------------------------- blocks


def _family_forms(family: str) -> dict[int, tuple[str, ...]]:
    forms = _FORMS.get(family)
    if forms is None:  # LBW has block maps for SD1/SD2 and SDXL base only (and Flux, which A1111 does not load)
        raise ValueError(f"block weights need an SD1, SD2 or SDXL model: LoRA Block Weight defines no blocks for "
                         f"{family_name(family)} (the loaded model)")
    return forms


def block_ids(family: str, length: int | None = None) -> tuple[str, ...]:
    """The block ids of a family's full form, or of its ``length``-form (ValueError if it has none)."""
    forms = _family_forms(family)
    if length is None:
        return forms[max(forms)]
    if length not in forms:
        raise ValueError(_wrong_length(length, family))
    return forms[length]


def _wrong_length(length: int, family: str) -> str:
    forms = _family_forms(family)
    return (f"lbw has {length} values but an {family.upper()} model takes "
            f"{' or '.join(str(n) for n in sorted(forms))} ({' '.join(forms[min(forms)])} or the full form)")


_UNET_BLOCK_RE = re.compile(r"(?:(input_blocks|output_blocks)\.(\d+)|middle_block)\.")
_BLOCK_PREFIX = {"input_blocks": "IN", "output_blocks": "OUT"}


def block_of(index: ModelIndex, target: Target) -> str:
    """The block of a target layer: BASE, IN00.., M00, OUT00.. or :data:`OTHER` (see the module docstring)."""
    try:
        component = index.component(target)
    except KeyError:
        return OTHER
    if component.kind == "te":
        return "BASE"
    match = _UNET_BLOCK_RE.match(target.module[len(component.prefix):] + ".")
    if match is None:
        return OTHER
    if match.group(1) is None:
        return "M00"
    return f"{_BLOCK_PREFIX[match.group(1)]}{int(match.group(2)):02d}"


# ----------------------------------------------------------------------------- weights

@dataclass(frozen=True)
class Weight:
    """One value of an lbw list: a number, ``R``, ``U`` or ``X`` plus an offset."""

    kind: str  # "number", "R", "U" or "X"
    number: float = 0.0  # the value of a number, the offset of X

    @classmethod
    def parse(cls, text: str) -> Weight:
        compact = "".join(text.split())
        kind = compact[:1].upper()
        if kind in ("R", "U", "X") and len(compact) == 1:
            return cls(kind)
        if kind != "X":
            try:
                return cls("number", parse_number(compact))
            except ValueError as error:
                raise ValueError(f"{error}; values are numbers, R, U, X, X+n or X-n") from None
        sign, offset = compact[1], compact[2:]
        try:
            if sign not in "+-" or offset.startswith(("+", "-")):
                raise ValueError
            value = parse_number(offset, unsigned=True)
        except ValueError:
            raise ValueError(f"{quote(text)} is not X, X+n or X-n (n a number)") from None
        return cls("X", -value if sign == "-" else value)

    @property
    def is_random(self) -> bool:
        return self.kind in ("R", "U")

    def resolve(self, x: float, rng: random.Random) -> float:
        if self.kind == "R":
            return round(rng.random(), 3)
        if self.kind == "U":
            return round(rng.uniform(-0.5, 1.5), 3)
        if self.kind == "X":
            return x + self.number
        return self.number

    def __str__(self) -> str:
        if self.kind == "number":
            return format_number(self.number)
        if self.kind == "X" and self.number:
            return f"X{'+' if self.number > 0 else '-'}{format_number(abs(self.number))}"
        return self.kind


def parse_weights(text: str) -> tuple[Weight, ...]:
    """``1,0,R,X+0.2,...`` (12, 17, 20 or 26 values) -> Weights; ValueError says which value is wrong."""
    tokens = text.split(",")
    if len(tokens) not in LENGTHS:
        raise ValueError(f"a block-weight list has {len(tokens)} values; it needs 12, 17, 20 or 26")
    weights = []
    for position, token in enumerate(tokens, 1):
        try:
            weights.append(Weight.parse(token))
        except ValueError as error:
            raise ValueError(f"block weight {position}: {error}") from None
    return tuple(weights)


def expand(values: Sequence[float], family: str) -> dict[str, float]:
    """A list of block weights -> {block: weight} in the family's full form; unnamed blocks get 0 (LBW)."""
    ids = block_ids(family, len(values))
    full = dict.fromkeys(block_ids(family), 0.0)
    full.update(zip(ids, (float(v) for v in values)))
    return full


def resolve_weights(weights: Sequence[Weight], family: str, x: float = 1.0,
                    rng: random.Random | None = None) -> dict[str, float]:
    """Weights -> {block: float} in the full form; R and U draw from ``rng`` in list order."""
    block_ids(family, len(weights))  # the length must fit before anything is drawn
    rng = rng if rng is not None else random.Random()
    return expand([w.resolve(x, rng) for w in weights], family)


# ----------------------------------------------------------------------------- elemental directives

_RANGE_RE = re.compile(r"([A-Z0-9]+)-([A-Z0-9]+)")


def _block_set(tokens: Sequence[str], directive: str) -> frozenset[str]:
    blocks: set[str] = set()
    for token in tokens:
        ends = _RANGE_RE.fullmatch(token.upper())
        names = ends.groups() if ends else (token.upper(),)
        for name in names:
            if name not in BLOCK_IDS_26:
                raise ValueError(f"lbwe directive '{directive}': unknown block '{name}' "
                                 "(BASE, IN00..IN11, M00, OUT00..OUT11, ranges such as IN05-OUT05)")
        first, last = sorted(BLOCK_IDS_26.index(name) for name in (names[0], names[-1]))
        blocks.update(BLOCK_IDS_26[first:last + 1])
    return frozenset(blocks)


def _negated(tokens: list[str]) -> tuple[bool, list[str]]:
    if tokens and tokens[0].upper() == "NOT":
        return True, tokens[1:]
    return False, tokens


@dataclass(frozen=True)
class Directive:
    """``BLOCKS:ELEMENTS:RATIO``: layers in BLOCKS whose name contains one of ELEMENTS take RATIO."""

    blocks: frozenset[str]  # empty: every layer
    not_blocks: bool
    elements: tuple[str, ...]  # empty: every layer
    not_elements: bool
    ratio: float

    @classmethod
    def parse(cls, text: str) -> Directive:
        parts = text.split(":")
        if len(parts) != 3:
            raise ValueError(f"lbwe directive '{text.strip()}' is not BLOCKS:ELEMENTS:RATIO")
        not_blocks, block_tokens = _negated(parts[0].split())
        not_elements, elements = _negated(parts[1].split())
        try:
            ratio = parse_number(parts[2])
        except ValueError:
            raise ValueError(f"lbwe directive {quote(text)}: ratio {quote(parts[2])} is not a number") from None
        return cls(_block_set(block_tokens, text.strip()), not_blocks, tuple(elements), not_elements, ratio)

    def matches(self, block: str, names: Sequence[str]) -> bool:
        if self.blocks and (block in self.blocks) == self.not_blocks:
            return False
        if self.elements:
            found = any(element in name for element in self.elements for name in names)
            if found == self.not_elements:
                return False
        return True


def parse_directives(text: str) -> tuple[Directive, ...]:
    """Directives separated by ``,`` or newlines; ValueError names the bad one."""
    return tuple(Directive.parse(d) for d in re.split(r"[,\n]", text) if d.strip())


def parse_elemental_presets(text: str) -> dict[str, str]:
    """LBW's ``elempresets.txt``: paragraphs ``NAME:BLOCKS:ELEMENTS:RATIO`` (+ directive lines) -> {name: directives}.

    Lines starting with ``#`` are comments; a later paragraph with the same name wins.
    """
    presets: dict[str, str] = {}
    for paragraph in re.split(r"\n\s*\n", text.replace("\r\n", "\n")):
        lines = [line.strip() for line in paragraph.split("\n") if line.strip() and not line.lstrip().startswith("#")]
        if not lines or ":" not in lines[0]:
            continue
        name, _, first = lines[0].partition(":")
        presets[name.strip()] = ",".join([first, *lines[1:]])
    return presets


def _layer_names(index: ModelIndex, target: Target) -> tuple[str, str]:
    """The names elements are looked for in: the module name below its UNet / text-encoder root, dotted and
    underscored (as A1111's network keys write it); an MHA projection adds ``[q]`` / ``_q_proj``."""
    try:
        name = target.module[len(index.component(target).prefix):]
    except KeyError:
        name = target.module
    if target.part is None:
        return name, name.replace(".", "_")
    return f"{name}[{target.part}]", f"{name.replace('.', '_')}_{target.part}_proj"


# ----------------------------------------------------------------------------- presets


@dataclass(frozen=True)
class Preset:
    name: str
    weights: tuple[Weight, ...]
    line: str = field(default="", compare=False)
    """The line as written in the file (kept when the preset is written back unchanged)."""

    def __str__(self) -> str:
        return f"{self.name}:{','.join(str(w) for w in self.weights)}"


def _valid_name(name: str) -> str:
    name = name.strip()
    if not name or any(c in name for c in ":,#\n"):
        raise ValueError(f"preset name '{name}' must be non-empty, without ':', ',', '#' or a line break")
    return name


class PresetBook:
    """A block-weight presets file: presets and comment lines in file order; ``text()`` writes it back."""

    def __init__(self, lines: Iterable[Preset | str] = (), problems: Iterable[str] = (), trailing_newline: bool = True):
        self.lines: list[Preset | str] = list(lines)
        self.problems: list[str] = list(problems)
        """One message per line that looks like a preset but is not valid (kept as a comment)."""
        self.trailing_newline = trailing_newline

    @classmethod
    def parse(cls, text: str) -> PresetBook:
        lines: list[Preset | str] = []
        problems: list[str] = []
        for number, line in enumerate(text.splitlines(), 1):
            name, colon, values = line.partition(":")
            if "#" in line or not colon or "," not in values:
                lines.append(line)
                continue
            try:
                lines.append(Preset(_valid_name(name), parse_weights(values), line))
            except ValueError as error:
                problems.append(f"line {number} ('{name.strip()}'): {error}; kept as a comment")
                lines.append(line)
        return cls(lines, problems, text.endswith(("\n", "\r")) or not text)

    @classmethod
    def default(cls) -> PresetBook:
        return cls.parse(DEFAULT_PRESETS)

    @classmethod
    def load(cls, path: str | os.PathLike) -> PresetBook:
        """The presets of ``path``; the defaults when the file does not exist."""
        try:
            text = Path(path).read_text(encoding="utf-8")
        except FileNotFoundError:
            return cls.default()
        return cls.parse(text)

    def save(self, path: str | os.PathLike) -> None:
        """Write atomically (a crash never leaves half a file)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = temp_file(path.parent, f".{path.name}.")
        try:
            with os.fdopen(fd, "w", encoding="utf-8", newline="\n") as f:
                f.write(self.text())
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    def text(self) -> str:
        body = "\n".join(line if isinstance(line, str) else (line.line or str(line)) for line in self.lines)
        return body + "\n" if self.trailing_newline and self.lines else body

    # -- presets -------------------------------------------------------------------------------

    @property
    def presets(self) -> dict[str, Preset]:
        """Name -> preset; a later line with the same name wins (LBW)."""
        return {line.name: line for line in self.lines if isinstance(line, Preset)}

    def names(self) -> list[str]:
        return list(self.presets)

    def get(self, name: str) -> Preset | None:
        """By exact name, else by a unique case-insensitive match."""
        presets = self.presets
        if name.strip() in presets:
            return presets[name.strip()]
        folded = [p for n, p in presets.items() if n.casefold() == name.strip().casefold()]
        return folded[0] if len(folded) == 1 else None

    def set(self, name: str, weights: str | Sequence[Weight]) -> Preset:
        """Add or replace a preset (in place, where it was); ValueError for a bad name or list."""
        weights = parse_weights(weights) if isinstance(weights, str) else tuple(weights)
        if len(weights) not in LENGTHS:
            raise ValueError(f"a block-weight list has {len(weights)} values; it needs 12, 17, 20 or 26")
        preset = Preset(_valid_name(name), weights)
        places = [i for i, line in enumerate(self.lines) if isinstance(line, Preset) and line.name == preset.name]
        if places:
            self.lines[places[-1]] = preset
            for i in reversed(places[:-1]):
                del self.lines[i]
        else:
            self.lines.append(preset)
        return preset

    def remove(self, name: str) -> bool:
        before = len(self.lines)
        self.lines = [line for line in self.lines if not (isinstance(line, Preset) and line.name == name)]
        return len(self.lines) != before

    def merge(self, other: PresetBook) -> list[str]:
        """Add (or replace with) the presets of ``other``; the names taken, in its order."""
        taken = []
        for preset in other.presets.values():
            if self.presets.get(preset.name) != preset:
                self.set(preset.name, preset.weights)
            taken.append(preset.name)
        return taken


def import_lbw_presets(book: PresetBook, path: str | os.PathLike) -> tuple[list[str], list[str]]:
    """Merge LBW's ``lbwpresets.txt`` into ``book``: (the names imported, the lines that were not)."""
    other = PresetBook.parse(Path(path).read_text(encoding="utf-8"))
    return book.merge(other), other.problems


# ----------------------------------------------------------------------------- the runtime hook

LayerScale = Callable[[Target], float]


class _LayerScale:
    """The multiplier of each layer for one resolved lbw/lbwe on one model (memoised per target)."""

    def __init__(self, index: ModelIndex, weights: Mapping[str, float], directives: Sequence[Directive]):
        self.index = weakref.proxy(index)  # the cache is keyed weakly by the index: do not keep it alive
        self.weights = dict(weights)
        self.directives = tuple(directives)
        self._memo: dict[Target, float] = {}

    def __call__(self, target: Target) -> float:
        scale = self._memo.get(target)
        if scale is None:
            scale = self._memo[target] = self._compute(target)
        return scale

    def _compute(self, target: Target) -> float:
        block = block_of(self.index, target)
        scale = self.weights.get(block, 1.0)  # OTHER: block weights do not reach it
        if self.directives:
            names = _layer_names(self.index, target)
            for directive in self.directives:
                if directive.matches(block, names):
                    scale = directive.ratio
        return scale


class BlockWeights:
    """The runtime's ``layer_scale_factory``: ``(request, network, index) -> LayerScale | None``.

    Raises :class:`~lora_core.errors.BlockWeightError` (a ValueError) for an lbw whose length does not fit the
    model, an unknown preset, a bad value, or a directive with an unknown block: the request cannot be applied as
    written, so the runtime skips the LoRA and reports the error (as the parser does for a malformed item; a typo
    such as ``lbw=MIDDD`` must not give a different image with no more than a note). Tables are cached per
    model index and per what they depend on (weights, directives, x), so an X/Y/Z sweep over other
    parameters reuses them; random (R/U) tables are cached for the current generation only: call
    :meth:`new_generation` with a seeded ``random.Random`` before each generation.
    """

    def __init__(self, presets: PresetBook | None = None, elemental: Mapping[str, str] | None = None,
                 rng: random.Random | None = None):
        self.presets = presets if presets is not None else PresetBook.default()
        if elemental is None:
            elemental = parse_elemental_presets(DEFAULT_ELEMENTAL_PRESETS)
        self.elemental = dict(elemental)
        self._rng = rng if rng is not None else random.Random()
        self._generation = 0
        self._cache: weakref.WeakKeyDictionary[ModelIndex, dict[tuple, _LayerScale | None]] = \
            weakref.WeakKeyDictionary()

    def new_generation(self, rng: random.Random) -> None:
        """A new generation draws R/U anew from ``rng``; non-random tables stay cached."""
        self._rng = rng
        self._generation += 1

    def weights_of(self, lbw: str | None) -> tuple[Weight, ...] | None:
        """The Weights of an lbw value (a list or a preset name); ValueError for an unknown preset."""
        if lbw is None:
            return None
        if "," in lbw:
            return parse_weights(lbw)
        preset = self.presets.get(lbw)
        if preset is None:
            raise ValueError(_unknown("lbw preset", lbw, "the presets", self.presets.names()))
        return preset.weights

    def directives_of(self, lbwe: str | None) -> tuple[Directive, ...]:
        """The Directives of an lbwe value (inline or an elemental preset name); ValueError for an unknown preset."""
        if lbwe is None:
            return ()
        if ":" not in lbwe:
            text = self.elemental.get(lbwe.strip())
            if text is None:
                raise ValueError(_unknown("lbwe preset", lbwe, "the elemental presets", list(self.elemental)))
            lbwe = text
        return parse_directives(lbwe)

    def validate(self, request: LoraRequest, family: str | None) -> tuple[tuple[Weight, ...] | None,
                                                                          tuple[Directive, ...]]:
        """The request's weights and directives; BlockWeightError for an unknown preset or block, a bad value, or
        (``family`` given) a list whose length that family does not take. Draws nothing (R/U stay unresolved)."""
        try:
            weights = self.weights_of(request.lbw)
            directives = self.directives_of(request.lbwe)
            if family is not None and weights is not None and len(weights) not in _family_forms(family):
                raise ValueError(_wrong_length(len(weights), family))
        except ValueError as error:
            raise BlockWeightError(str(error)) from None
        return weights, directives

    def __call__(self, request: LoraRequest, network: Network, index: ModelIndex) -> LayerScale | None:
        family = index.family
        weights, directives = self.validate(request, family)
        if weights is None and not directives:
            return None
        uses_x = weights is not None and any(w.kind == "X" for w in weights)
        random_tag = (request.name, self._generation) if weights and any(w.is_random for w in weights) else None
        key = (weights, directives, request.x if uses_x else None, random_tag)
        tables = self._cache.setdefault(index, {})
        if key not in tables:
            full = resolve_weights(weights, family, request.x, self._rng) if weights is not None else {}
            plain = all(v == 1.0 for v in full.values()) and not directives
            tables[key] = None if plain else _LayerScale(index, full, directives)
        return tables[key]


def _unknown(what: str, name: str, where: str, known: Sequence[str]) -> str:
    """``what`` ``name`` is not in ``where``, with the closest known names (a typo is the usual cause)."""
    name = name.strip()
    by_folded = {k.casefold(): k for k in known}
    close = [by_folded[m] for m in difflib.get_close_matches(name.casefold(), list(by_folded), n=3, cutoff=0.6)]
    message = f"{what} {quote(name)} is not in {where} (known: {', '.join(known) or 'none'})"
    return message + (f"; did you mean {' or '.join(repr(c) for c in close)}?" if close else "")


def layer_scale_factory(presets: PresetBook | None = None, elemental: Mapping[str, str] | None = None,
                        rng: random.Random | None = None) -> BlockWeights:
    """The hook ``LoraRuntime(library, layer_scale_factory=layer_scale_factory(presets))`` takes."""
    return BlockWeights(presets, elemental, rng)


# ----------------------------------------------------------------------------- analysis


def block_norms(network: Network, index: ModelIndex) -> dict[str, float]:
    """A LoRA's influence per block: the sum of ||dW||_F (float32, at multiplier 1) over its layers in each.

    Every block of the family's full form is listed (0 when the LoRA has no layer there), then OTHER if used.
    """
    norms = dict.fromkeys(block_ids(index.family), 0.0) if index.family in _FORMS else {}
    with torch.no_grad():
        for target, adapter in network.adapters.items():
            delta = adapter.delta_weight(index.weight(target).detach().float())
            block = block_of(index, target)
            norms[block] = norms.get(block, 0.0) + float(torch.linalg.vector_norm(delta.float()))
    return norms
