"""Prompt syntax: the items of one ``<lora:...>`` (or ``<lyco:...>``) -> a :class:`LoraRequest`, and back.

The syntax is a compatible superset of A1111's built-in Lora, lora-block-weight (LBW) and loractl::

    <lora:NAME[:TE[:UNET[:DYN]]][:key=value]...>

A1111 finds the tags of a prompt (:mod:`lora_core.tags`) and splits the text between ``<lora:`` and ``>`` on
``:``; :func:`parse_lora_items` takes that list. ``items[0]`` is always the name (it may be quoted,
``"my lora"``; a quoted name may contain ``:``). Every later item that contains ``=`` is named, the others are
positional: 1st TE, 2nd UNET, 3rd DYN (as A1111 counts them, named items in between do not shift positions). An
empty positional item is a placeholder for the default (``<lora:n::0.5>`` = TE 1, UNET 0.5). Keys are
case-insensitive: ``te``, ``unet``, ``dyn``, ``lbw`` (alias ``w``), ``lbwe``, ``x``, ``start``, ``stop``,
``step``, ``hr``, ``hrte``, ``hrunet``, ``scope``. A named key overrides its positional item (A1111). ``hrte``/``hrunet``
override ``hr`` and ``step`` overrides ``start``/``stop``, whatever the order (loractl, LBW).

Weights (TE, UNET, hr*) are a number (``-0.5``, ``.5``, ``1e-1``) or a schedule ``1@0,0.5@10``
(keyframes ``weight@step``; ``~`` may replace ``@`` and ``;`` may replace ``,``, as in loractl; see
:mod:`lora_core.schedule`). UNET defaults to TE. ``hrte``/``hrunet`` default to None, meaning "the first-pass
weight".

Steps. ``step`` arguments are 0-based indices of the sampling step within one pass (the first
step of a pass is 0) and ``total_steps`` is the number of steps of that pass. Note that A1111's
``shared.state.sampling_step`` lags by one during a step; callers pass the true index. A value
below 1 is a fraction of the pass: fraction f is step f * (total_steps - 1), so 0 is the first
step and 0.5 the middle. For schedules, 1 also means the last step when no keyframe of that
schedule is above 1 (loractl: ``0@0,1@1`` ramps over the whole pass); otherwise values >= 1 are
step indices. For start/stop (LBW uses whole step numbers), values >= 1 are always step indices.
A schedule is constant before its first and after its last keyframe and linear in between;
keyframes at the same step make a jump (the later-written one holds from that step on).
``start=A``/``stop=B``: the LoRA is active in steps [A, B) of each pass (LBW's behaviour, once
A1111's one-step lag is removed). ``step=A-B`` is ``start=A:stop=B``; either end may be left out.

``scope=subprompt`` makes the LoRA act only on the rows of the ``AND`` subprompt its tag is written in (text
encoder and UNet cond rows; see :mod:`lora_core.rows`); ``scope=prompt``, the default, acts on every row of the
prompt's image, as A1111's built-in does.

Malformed input never raises; it produces a warning that names the LoRA, the item and the
problem. One rule: an item that cannot be read as written skips the LoRA (``request`` is None),
since applying the LoRA without it, or with a guess, gives an image the person did not ask for
(a typo such as ``lbw=MIDDD`` or ``stpo=10`` would silently change the picture). Skipped:

- no name, an unclosed quote, a name that cannot be written back into a prompt (:func:`name_problem`);
- an unknown key (unlike A1111, which ignores those), a non-empty positional item after DYN;
- a malformed value for a key or position (weights, schedules, dyn, lbw, lbwe, x, start, stop, step),
  including an unknown block id in ``lbwe``; unknown ``lbw``/``lbwe`` presets are found when the
  block-weight module resolves them, which raises, and the runtime then skips the LoRA the same way;
- a tag of more than :data:`MAX_ITEMS` items, a schedule of more than ``MAX_KEYFRAMES``, and in
  :func:`parse_prompt` every tag after the first :data:`MAX_TAGS` of a prompt (limits far above any
  real use, so that a pasted megabyte is read in milliseconds).

Every problem of a skipped LoRA is reported, not only the first, up to :data:`MAX_WARNINGS` warnings
per LoRA and then one line with the number left out. Kept with a warning, since what they mean is
clear: an empty item after DYN or a key with an empty value (the default), a named key given twice
(the later wins, as in A1111), start/stop also set by step= (step= wins), start >= stop (never active).

``lbw`` keeps the preset name or the normalised list (12, 17, 20 or 26 values: numbers, ``R``,
``U``, ``X``, ``X+n``, ``X-n``); ``lbwe`` keeps an elemental preset name or inline directives
``BLOCKS:ELEMENTS:RATIO[,...]`` (these contain ``:``, so the items that A1111 split are joined
back). Presets are resolved by the block-weight module, not here.

Names. :func:`format_request` writes a request back as a tag that parses to an equal request; a name
that no tag can carry (``>``, a control character, white space at either end, ``"`` before a ``:``
of a quoted name) is refused with a ValueError that says why, and the parser skips such a name too.

Every function here takes time linear in the length of its input (a pasted prompt may be megabytes).
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence, TypeVar

from .schedule import (ONE, Keyframe, Schedule, clip, format_number, parse_number, quote,
                       step_position)
from .tags import EXTRA_NETWORK_RE, NETWORK_TYPES, find_tags

__all__ = [
    "EXTRA_NETWORK_RE",
    "KNOWN_KEYS",
    "LBW_LENGTHS",
    "MAX_ITEMS",
    "MAX_TAGS",
    "MAX_WARNINGS",
    "NETWORK_TYPES",
    "Keyframe",
    "LoraRequest",
    "ParseResult",
    "Schedule",
    "active_at",
    "format_number",
    "format_name",
    "format_request",
    "name_problem",
    "parse_lora_items",
    "parse_prompt",
    "parse_tag",
]

LBW_LENGTHS = (12, 17, 20, 26)
MAX_ITEMS = 256
"""The most ``:``-separated items a LoRA tag may have (a longer one is skipped: it cannot be meant)."""
MAX_TAGS = 100
"""The most LoRA tags read from one prompt (:func:`parse_prompt`, ``analysis.lora_tags``): a pasted megabyte of
tags must not hold the WebUI for seconds, and no generation applies a hundred LoRAs."""
MAX_WARNINGS = 8
"""Warnings listed per LoRA; the rest are counted in one more line."""

_BLOCK_ID = r"(?:BASE|IN(?:0\d|1[01])|M00|OUT(?:0\d|1[01]))"
_BLOCK_SHAPE = r"(?:BASE|IN\d\d|M\d\d|OUT\d\d)"
_BLOCK_TOKEN_RE = re.compile(rf"{_BLOCK_ID}(?:-{_BLOCK_ID})?", re.IGNORECASE)
_BLOCK_SHAPE_RE = re.compile(rf"{_BLOCK_SHAPE}(?:-{_BLOCK_SHAPE})?", re.IGNORECASE)
_MAX_BLOCK_TOKENS = 64  # 26 blocks and NOT: a longer list is no block list
_NOT_PRESET_CHAR_RE = re.compile(r"[^\w.+\-]")
_PRESET_LIKE_RE = re.compile(r"[A-Z][A-Z0-9_.]*")
_RANGE_DASH_RE = re.compile(r"(?<![eE])-")  # the '-' of A-B, not of an exponent (1e-3)
_CONTROL_RE = re.compile("[\x00-\x1f\x7f-\x9f\ud800-\udfff]")


# ----------------------------------------------------------------------------- the request


@dataclass(frozen=True)
class LoraRequest:
    """What one ``<lora:...>`` asks for. ``unet`` left as None becomes ``te`` (A1111's default)."""

    name: str
    te: Schedule = ONE
    unet: Optional[Schedule] = None
    dyn: Optional[int] = None
    lbw: Optional[str] = None
    lbwe: Optional[str] = None
    x: float = 1.0
    start: Optional[float] = None
    stop: Optional[float] = None
    hr_te: Optional[Schedule] = None
    hr_unet: Optional[Schedule] = None
    scope: str = "prompt"
    """``prompt``: every row of the image; ``subprompt``: only the cond rows of the tag's ``AND`` subprompt."""
    raw: str = field(default="", compare=False)
    """The item text as written, for messages; not part of equality."""

    def __post_init__(self) -> None:
        if self.unet is None:
            object.__setattr__(self, "unet", self.te)

    def is_static(self) -> bool:
        """No weight changes within a pass: every weight constant, no start/stop.

        The hires pass may still use other (constant) weights than the first pass.
        """
        schedules = (self.te, self.unet, self.hr_te, self.hr_unet)
        return all(s is None or s.is_constant for s in schedules) and self.start is None and self.stop is None

    def pass_weights(self, hires: bool) -> tuple[Schedule, Schedule]:
        """(TE, UNET) schedules for the first pass or the hires pass."""
        if not hires:
            return self.te, self.unet
        return self.hr_te or self.te, self.hr_unet or self.unet


def active_at(request: LoraRequest, step: int, total_steps: int) -> bool:
    """Whether start/stop let the LoRA act at 0-based ``step`` of a pass: step in [start, stop)."""
    if request.start is not None and step < step_position(request.start, total_steps):
        return False
    return request.stop is None or step < step_position(request.stop, total_steps)


@dataclass(frozen=True)
class ParseResult:
    request: Optional[LoraRequest]
    warnings: tuple[str, ...] = ()


# ----------------------------------------------------------------------------- names


def _printable(text: str) -> str:
    """``text`` shortened, with control characters written as ``\\uXXXX`` (for messages)."""
    return _CONTROL_RE.sub(lambda match: f"\\u{ord(match.group()):04x}", clip(text))


def name_problem(name: str) -> Optional[str]:
    """Why ``name`` cannot be written into a prompt and read back the same, or None when it can."""
    stripped = name.strip()
    if not stripped:
        return "the name is empty"
    if ">" in name:
        return "the name contains '>', which ends the tag"
    control = _CONTROL_RE.search(name)
    if control is not None:
        code = ord(control.group())
        if 0xD800 <= code <= 0xDFFF:
            return f"the name contains U+{code:04X}, half of a surrogate pair (a file name that is not UTF-8?)"
        return f"the name contains the control character U+{code:04X}"
    if stripped != name:
        return "the name begins or ends with white space, which reading a prompt drops"
    if ":" in name and any(part.rstrip().endswith('"') for part in name.split(":")[:-1]):
        return "the name contains '\"' before a ':', which would end its quotes early"
    return None


def format_name(name: str) -> str:
    """A LoRA name as it must be written in a prompt (quoted when it contains ``:`` or starts with ``"``).

    ValueError when no prompt can carry the name (:func:`name_problem` says why).
    """
    problem = name_problem(name)
    if problem is not None:
        raise ValueError(f'the LoRA name "{_printable(name)}" cannot be written in a prompt: {problem}')
    return f'"{name}"' if ":" in name or name.startswith('"') else name


# ----------------------------------------------------------------------------- value parsers
# Each takes the value text and returns the parsed value or raises ValueError with the problem.


def _parse_dyn(text: str) -> int:
    digits = text.strip()
    digits = digits[1:] if digits.startswith("+") else digits
    if not digits.isdecimal() or len(digits) > 9 or int(digits) < 1:
        raise ValueError(f"dyn {quote(text)} is not a whole number from 1 to 999999999")
    return int(digits)


def _parse_step_value(text: str) -> float:
    try:
        return parse_number(text, unsigned=True)
    except ValueError:
        raise ValueError(f"{quote(text)} is not a step (a number >= 0; below 1 a fraction of the steps)") from None


def _parse_step_range(text: str) -> tuple[Optional[float], Optional[float]]:
    dash = _RANGE_DASH_RE.search(text)
    ends = (text[:dash.start()], text[dash.end():]) if dash is not None else ()
    try:
        if not ends or not any(end.strip() for end in ends):
            raise ValueError
        return tuple(_parse_step_value(end) if end.strip() else None for end in ends)
    except ValueError:
        raise ValueError(f"step {quote(text)} is not a range A-B of steps such as 5-20") from None


def _normalise_lbw_value(token: str) -> str:
    token = token.strip()
    letter = token[:1].upper()
    if letter in ("R", "U") and len(token) == 1:
        return letter
    if letter == "X":
        offset = token[1:].strip()
        if not offset:
            return "X"
        sign, number = offset[0], offset[1:].strip()
        if sign not in "+-" or number.startswith(("+", "-")):
            raise ValueError(f"{quote(token)} is not a number")
        parse_number(number, unsigned=True)
        return f"X{sign}{number}".upper()
    parse_number(token)
    return token


def _parse_lbw(text: str) -> str:
    text = text.strip()
    if "," not in text:
        try:
            parse_number(text)
        except ValueError:
            pass
        else:
            raise ValueError(f"lbw {quote(text)} is one number: give a preset name or a list of 12, 17, 20 or 26 weights")
        if _NOT_PRESET_CHAR_RE.search(text):
            raise ValueError(f"lbw {quote(text)} is neither a preset name (letters, digits, _ . + -) nor a list of weights")
        return text
    count = text.count(",") + 1
    if count not in LBW_LENGTHS:
        raise ValueError(f"lbw has {count:,} values; a block-weight list needs 12, 17, 20 or 26")
    try:
        return ",".join(_normalise_lbw_value(token) for token in text.split(","))
    except ValueError as error:
        raise ValueError(f"lbw value {error}; values are numbers, R, U, X, X+n or X-n") from None


def _block_tokens(text: str) -> list[str]:
    tokens = text.split()
    return tokens[1:] if tokens and tokens[0].upper() == "NOT" else tokens


def _looks_like_block_spec(text: str) -> bool:
    """Whether ``text`` is written like a list of block ids (which may still name blocks that do not exist)."""
    tokens = _block_tokens(text)
    return len(tokens) <= _MAX_BLOCK_TOKENS and all(_BLOCK_SHAPE_RE.fullmatch(token) for token in tokens)


def _parse_lbwe_directive(text: str) -> str:
    parts = text.split(":")
    if len(parts) != 3:
        raise ValueError(f"lbwe directive {quote(text)} is not BLOCKS:ELEMENTS:RATIO")
    blocks, elements, ratio = (" ".join(part.split()) for part in parts)
    tokens = _block_tokens(blocks)
    if len(tokens) > _MAX_BLOCK_TOKENS:
        raise ValueError(f"lbwe blocks {quote(blocks)} are {len(tokens):,} block ids; there are 26")
    unknown = next((token for token in tokens if not _BLOCK_TOKEN_RE.fullmatch(token)), None)
    if unknown is not None:
        raise ValueError(
            f"lbwe blocks {quote(blocks)}: {quote(unknown)} is not a block id or range (BASE, IN00..IN11, M00,"
            " OUT00..OUT11, ranges IN04-OUT05, leading NOT)"
        )
    if "=" in elements:
        raise ValueError(f"lbwe elements {quote(elements)} contain '='")
    try:
        parse_number(ratio)
    except ValueError:
        raise ValueError(f"lbwe ratio {quote(ratio)} is not a number") from None
    return f"{blocks.upper()}:{elements}:{ratio}"


def _parse_lbwe(text: str) -> str:
    text = text.replace("\n", ",").strip()
    if ":" not in text:
        if "," in text:
            raise ValueError(f"lbwe {quote(text)} is neither one preset name nor BLOCKS:ELEMENTS:RATIO directives")
        return text
    return ",".join(_parse_lbwe_directive(d) for d in text.split(",") if d.strip())


# ----------------------------------------------------------------------------- item parsing

_KEY_ALIASES = {"w": "lbw"}
KNOWN_KEYS = ("te", "unet", "dyn", "lbw", "lbwe", "x", "start", "stop", "step", "hr", "hrte", "hrunet", "scope")
"""The keys of named items (``w`` is another name for ``lbw``)."""
_KNOWN_KEYS = KNOWN_KEYS
SCOPES = ("prompt", "subprompt")
_POSITIONAL_KEYS = ("te", "unet", "dyn")


@dataclass(frozen=True)
class _Item:
    key: Optional[str]
    """None for a positional item."""
    value: str
    text: str


def _as_text(item: object) -> str:
    return item if isinstance(item, str) else str(item)


def _take_name(texts: list[str]) -> tuple[str, int]:
    """The name and the index of the first item after it; ValueError for an unclosed quote.

    A quoted name runs to the first item that ends with ``"``; the items are joined as written, so the
    white space inside the quotes is kept (only the ends of the name are stripped).
    """
    first = texts[0].strip()
    if not first.startswith('"'):
        return first, 1
    if len(first) >= 2 and first.endswith('"'):
        return first[1:-1].strip(), 1
    for end in range(1, len(texts)):
        if texts[end].rstrip().endswith('"'):
            return ":".join(texts[:end + 1]).strip()[1:-1].strip(), end + 1
    raise ValueError(f"the quoted name {quote(texts[0])} has no closing quote")


def _last_directive(text: str) -> str:
    return text.replace("\n", ",").rsplit(",", 1)[-1]


def _lbwe_needs_more(last: str, value_has_colon: bool) -> bool:
    """Whether an lbwe value whose last directive is ``last`` is unfinished (A1111 split it on ':')."""
    colons = last.count(":")
    if colons == 0:  # a preset name, or the BLOCKS of a directive (surely so after a first directive)
        return value_has_colon or _looks_like_block_spec(last)
    return colons == 1


def _lbwe_end(texts: list[str], index: int) -> int:
    """The index of the last item of the inline lbwe value that starts at ``texts[index]`` (``lbwe=...``)."""
    value = texts[index].partition("=")[2]
    last, has_colon = _last_directive(value), ":" in value
    while _lbwe_needs_more(last, has_colon) and index + 1 < len(texts) and "=" not in texts[index + 1]:
        index += 1
        piece = texts[index]
        last = _last_directive(piece) if ("," in piece or "\n" in piece) else f"{last}:{piece}"
        has_colon = True
    return index


def _split_items(texts: list[str]) -> list[_Item]:
    items = []
    index = 0
    while index < len(texts):
        text = texts[index]
        if "=" not in text:
            items.append(_Item(None, text, text))
        else:
            written_key, _, value = text.partition("=")
            key = written_key.strip().lower()
            key = _KEY_ALIASES.get(key, key)
            if key == "lbwe":
                end = _lbwe_end(texts, index)
                text = ":".join(texts[index:end + 1])
                value = text.partition("=")[2]
                index = end
            items.append(_Item(key, value, text))
        index += 1
    return items


_T = TypeVar("_T")


class _Collector:
    """Sorts the items of one LoRA into fields and gathers warnings and skip reasons."""

    def __init__(self, label: str):
        self.label = label
        self.warnings: list[str] = []
        self.unlisted = 0
        self.fatal = False
        self.values: dict[str, _Item] = {}

    def warn(self, item_text: Optional[str], problem: str, outcome: str) -> None:
        if len(self.warnings) >= MAX_WARNINGS:
            self.unlisted += 1
            return
        where = f"{self.label}: item {quote(item_text)}" if item_text is not None else self.label
        self.warnings.append(f"{where}: {problem}; {outcome}")

    def skip(self, item_text: Optional[str], problem: str) -> None:
        self.fatal = True
        self.warn(item_text, problem, "the LoRA is skipped")

    def all_warnings(self) -> tuple[str, ...]:
        if not self.unlisted:
            return tuple(self.warnings)
        outcome = "the LoRA is skipped" if self.fatal else "the LoRA is kept"
        return (*self.warnings, f"{self.label}: {self.unlisted:,} more problems, not listed; {outcome}")

    def sort(self, items: list[_Item]) -> None:
        positional = [item for item in items if item.key is None]
        for index, item in enumerate(positional):
            if index < len(_POSITIONAL_KEYS):
                if item.value.strip():
                    self.values[_POSITIONAL_KEYS[index]] = item
            elif item.value.strip():
                self.skip(item.text, f"only {len(_POSITIONAL_KEYS)} positional values (TE:UNET:DYN) are read;"
                                     " name the others (key=value)")
            else:
                self.warn(item.text, "empty item after DYN", "ignored")
        named: dict[str, _Item] = {}
        for item in items:
            if item.key is None:
                continue
            if item.key not in _KNOWN_KEYS:
                self.skip(item.text, f"unknown key {quote(item.key)} (known: {', '.join(_KNOWN_KEYS)}, w)")
            elif not item.value.strip():
                self.warn(item.text, "empty value", "ignored")
            else:
                if item.key in named:
                    self.warn(named[item.key].text, f"'{item.key}' is given again later", "the later one wins")
                named[item.key] = item
        self.values.update(named)

    def get(self, key: str, parser: Callable[[str], _T], default: _T = None) -> _T:
        item = self.values.get(key)
        if item is None:
            return default
        try:
            return parser(item.value)
        except ValueError as error:
            self.skip(item.text, str(error))
            return default

    def start_stop(self) -> tuple[Optional[float], Optional[float]]:
        start = self.get("start", _parse_step_value)
        stop = self.get("stop", _parse_step_value)
        range_start, range_stop = self.get("step", _parse_step_range, (None, None))
        step_text = self.values["step"].text if "step" in self.values else None
        for key, explicit, from_range in (("start", start, range_start), ("stop", stop, range_stop)):
            if explicit is not None and from_range is not None:
                self.warn(self.values[key].text, f"{quote(step_text)} also sets {key}", "step= wins")
        return (start if range_start is None else range_start), (stop if range_stop is None else range_stop)


def _parse_scope(text: str) -> str:
    scope = text.strip().lower()
    if scope not in SCOPES:
        raise ValueError(f"scope {quote(text)} is not one of {', '.join(SCOPES)}")
    return scope


def _weight(text: str) -> Schedule:
    try:
        return Schedule.parse(text)
    except ValueError as error:
        if _looks_like_block_weights(text):
            raise ValueError(f"{error} (block weights go in lbw={clip(text.strip())})") from None
        raise


def _looks_like_block_weights(text: str) -> bool:
    """An LBW preset name (upper case, as LBW's are) or list where a weight was expected."""
    if "," not in text:
        return _PRESET_LIKE_RE.fullmatch(text.strip()) is not None
    try:
        _parse_lbw(text)
    except ValueError:
        return False
    return True


def _too_many_items(count: int, first: str) -> ParseResult:
    return ParseResult(None, (f"<lora:{_printable(first.strip())}:…>: the tag has {count:,} items (values between"
                              f" ':'); a LoRA tag has at most {MAX_ITEMS}; the LoRA is skipped",))


def parse_lora_items(items: Sequence[str]) -> ParseResult:
    """The items of one ``<lora:...>`` (its text split on ':') -> ParseResult. Never raises."""
    if len(items) > MAX_ITEMS:
        return _too_many_items(len(items), _as_text(items[0]))
    texts = [_as_text(item) for item in items]
    raw = ":".join(texts)
    if not texts:
        return ParseResult(None, ("<lora:>: no LoRA name; the LoRA is skipped",))
    try:
        name, first = _take_name(texts)
    except ValueError as error:
        return ParseResult(None, (f"<lora:{_printable(raw)}>: {error}; the LoRA is skipped",))
    collector = _Collector(f'LoRA "{_printable(name)}"' if name else f"<lora:{_printable(raw)}>")
    if not name:
        collector.skip(None, "no LoRA name")
    elif (problem := name_problem(name)) is not None:
        collector.skip(None, problem)
    collector.sort(_split_items(texts[first:]))

    te = collector.get("te", _weight, ONE)
    unet = collector.get("unet", _weight, te)
    hr = collector.get("hr", _weight)
    hr_te = collector.get("hrte", _weight, hr)
    hr_unet = collector.get("hrunet", _weight, hr)
    dyn = collector.get("dyn", _parse_dyn)
    lbw = collector.get("lbw", _parse_lbw)
    lbwe = collector.get("lbwe", _parse_lbwe)
    x = collector.get("x", parse_number, 1.0)
    scope = collector.get("scope", _parse_scope, "prompt")
    start, stop = collector.start_stop()
    if start is not None and stop is not None and not collector.fatal:
        _warn_if_never_active(collector, start, stop)
    if collector.fatal:
        return ParseResult(None, collector.all_warnings())
    request = LoraRequest(
        name=name, te=te, unet=unet, dyn=dyn, lbw=lbw, lbwe=lbwe, x=x,
        start=start, stop=stop, hr_te=hr_te, hr_unet=hr_unet, scope=scope, raw=raw,
    )
    return ParseResult(request, collector.all_warnings())


def _warn_if_never_active(collector: _Collector, start: float, stop: float) -> None:
    if (start < 1) == (stop < 1) and start >= stop:
        collector.warn(None, f"start {format_number(start)} is not before stop {format_number(stop)}", "it never acts")


def parse_tag(text: str) -> ParseResult:
    """The text of one tag (between ``<lora:`` and ``>``) -> ParseResult; a tag of too many items is refused
    before it is split."""
    count = text.count(":") + 1
    if count > MAX_ITEMS:
        return _too_many_items(count, text.partition(":")[0])
    return parse_lora_items(text.split(":"))


def parse_prompt(prompt: str) -> list[tuple[str, ParseResult]]:
    """Every ``<lora:...>``/``<lyco:...>`` of a raw prompt, as (the tag text, its ParseResult).

    At most :data:`MAX_TAGS` tags are read; when there are more, the list ends with the next one, skipped with a
    warning that says so, and the rest of the prompt is not searched.
    """
    found = []
    for tag in find_tags(prompt):
        text = prompt[tag.start:tag.end]
        if len(found) == MAX_TAGS:
            found.append((text, ParseResult(None, (f"{_printable(text)}: a prompt may have at most {MAX_TAGS} LoRA"
                                                   " tags; this one and every one after it are skipped",))))
            break
        found.append((text, parse_tag(tag.text)))
    return found


# ----------------------------------------------------------------------------- formatting


def format_request(request: LoraRequest, network: str = "lora") -> str:
    """A canonical ``<lora:...>`` that parses back to an equal request; ValueError for a name no tag can carry."""
    parts = [format_name(request.name), str(request.te)]
    if request.unet != request.te:
        parts.append(str(request.unet))
    named = {
        "dyn": request.dyn,
        "lbw": request.lbw,
        "lbwe": request.lbwe,
        "x": None if request.x == 1.0 else format_number(request.x),
        "start": None if request.start is None else format_number(request.start),
        "stop": None if request.stop is None else format_number(request.stop),
        "scope": None if request.scope == "prompt" else request.scope,
    }
    if request.hr_te is not None and request.hr_te == request.hr_unet:
        named["hr"] = request.hr_te
    else:
        named.update(hrte=request.hr_te, hrunet=request.hr_unet)
    parts.extend(f"{key}={value}" for key, value in named.items() if value is not None)
    return f"<{network}:{':'.join(parts)}>"
