"""Prompt syntax: the items of one ``<lora:...>`` (or ``<lyco:...>``) -> a :class:`LoraRequest`.

The syntax is a compatible superset of A1111's built-in Lora, lora-block-weight (LBW) and loractl::

    <lora:NAME[:TE[:UNET[:DYN]]][:key=value]...>

A1111 splits the text between ``<lora:`` and ``>`` on ``:``; :func:`parse_lora_items` takes that
list. ``items[0]`` is always the name (it may be quoted, ``"my lora"``; a quoted name may contain
``:``). Every later item that contains ``=`` is named, the others are positional: 1st TE, 2nd UNET,
3rd DYN (as A1111 counts them, named items in between do not shift positions). An empty positional
item is a placeholder for the default (``<lora:n::0.5>`` = TE 1, UNET 0.5). Keys are
case-insensitive: ``te``, ``unet``, ``dyn``, ``lbw`` (alias ``w``), ``lbwe``, ``x``, ``start``,
``stop``, ``step``, ``hr``, ``hrte``, ``hrunet``. A named key overrides its positional item
(A1111). ``hrte``/``hrunet`` override ``hr`` and ``step`` overrides ``start``/``stop``, whatever
the order (loractl, LBW).

Weights (TE, UNET, hr*) are a number (``-0.5``, ``.5``, ``1e-1``) or a schedule ``1@0,0.5@10``
(keyframes ``weight@step``; ``~`` may replace ``@`` and ``;`` may replace ``,``, as in loractl).
UNET defaults to TE. ``hrte``/``hrunet`` default to None, meaning "the first-pass weight".

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

Malformed input never raises; it produces a warning that names the LoRA, the item and the
problem. The rule:

- skipped (``request`` is None): no name, an unclosed quote, or a malformed value for a known
  key or position (weights, schedules, dyn, lbw, lbwe, x, start, stop, step). Such a value
  changes what the LoRA does, so applying it anyway would give an image the person did not ask
  for; every problem of the LoRA is reported, not only the first.
- item ignored (request kept): an unknown key (A1111 ignores those too), a key with an empty
  value, a named key given twice (the later wins), positional items after DYN.
- kept with a warning: start >= stop (never active).

``lbw`` keeps the preset name or the normalised list (12, 17, 20 or 26 values: numbers, ``R``,
``U``, ``X``, ``X+n``, ``X-n``); ``lbwe`` keeps an elemental preset name or inline directives
``BLOCKS:ELEMENTS:RATIO[,...]`` (these contain ``:``, so the items that A1111 split are joined
back). Presets are resolved by the block-weight module, not here.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence, TypeVar

__all__ = [
    "EXTRA_NETWORK_RE",
    "LBW_LENGTHS",
    "NETWORK_TYPES",
    "Keyframe",
    "LoraRequest",
    "ParseResult",
    "Schedule",
    "active_at",
    "format_number",
    "format_name",
    "format_request",
    "parse_lora_items",
    "parse_prompt",
]

EXTRA_NETWORK_RE = re.compile(r"<(\w+):([^>]+)>")
"""How A1111 (modules/extra_networks.py) finds extra networks in a prompt."""

NETWORK_TYPES = ("lora", "lyco")
LBW_LENGTHS = (12, 17, 20, 26)

_UNSIGNED = r"(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?"
_NUMBER_RE = re.compile(rf"\s*([+-]?{_UNSIGNED})\s*")
_UNSIGNED_RE = re.compile(rf"\s*(\+?{_UNSIGNED})\s*")
_INT_RE = re.compile(r"\s*\+?(\d+)\s*")
_STEP_RANGE_RE = re.compile(rf"\s*({_UNSIGNED})?\s*-\s*({_UNSIGNED})?\s*")
_LBW_SPECIAL_RE = re.compile(rf"\s*([RrUu]|[Xx](?:\s*([+-])\s*({_UNSIGNED}))?)\s*")
_BLOCK_ID = r"(?:BASE|IN\d\d|M00|OUT\d\d)"
_BLOCK_TOKEN_RE = re.compile(rf"{_BLOCK_ID}(?:-{_BLOCK_ID})?", re.IGNORECASE)
_KEYFRAME_SEPARATORS = re.compile(r"[,;]")
_WEIGHT_STEP_SEPARATORS = re.compile(r"[@~]")

_WEIGHT_HELP = "write a number such as 0.7 or a schedule such as 1@0,0.5@10"


# ----------------------------------------------------------------------------- numbers


def _parse_number(text: str, pattern: re.Pattern = _NUMBER_RE) -> float:
    match = pattern.fullmatch(text)
    if match is None:
        raise ValueError(f"'{text}' is not a number")
    value = float(match.group(1))
    if not math.isfinite(value):
        raise ValueError(f"'{text}' is too large")
    return value


def format_number(value: float) -> str:
    """The shortest text that reads back as exactly ``value`` (``1.0`` -> ``1``)."""
    value = float(value)
    if value.is_integer() and abs(value) < 1e16:
        return str(int(value))
    return repr(value)


def _position(value: float, total_steps: int, one_is_fraction: bool = False) -> float:
    """A step or fraction (see the module docstring) -> a 0-based step position."""
    if value < 1 or (one_is_fraction and value == 1):
        return value * max(total_steps - 1, 0)
    return value


# ----------------------------------------------------------------------------- schedules


@dataclass(frozen=True)
class Keyframe:
    weight: float
    step: float
    """>= 0; a fraction of the pass when < 1 (see the module docstring)."""


@dataclass(frozen=True)
class Schedule:
    """A weight over the steps of a pass: keyframes in written order.

    Normalised at construction: when every keyframe has the same weight, the schedule is the
    constant ``(Keyframe(weight, 0),)``, so equal meanings compare equal in that case.
    """

    keyframes: tuple[Keyframe, ...]

    def __post_init__(self) -> None:
        keyframes = tuple(self.keyframes)
        if not keyframes:
            raise ValueError("a schedule needs at least one keyframe")
        for keyframe in keyframes:
            if not (math.isfinite(keyframe.weight) and math.isfinite(keyframe.step) and keyframe.step >= 0):
                raise ValueError(f"bad keyframe {keyframe}: weight and step must be finite, step >= 0")
        if len({keyframe.weight for keyframe in keyframes}) == 1:
            keyframes = (Keyframe(keyframes[0].weight, 0.0),)
        object.__setattr__(self, "keyframes", keyframes)

    @classmethod
    def constant(cls, weight: float) -> Schedule:
        return cls((Keyframe(float(weight), 0.0),))

    @classmethod
    def parse(cls, text: str) -> Schedule:
        """``0.7`` or ``1@0,0.5@10`` -> a Schedule; ValueError says what is wrong."""
        segments = _KEYFRAME_SEPARATORS.split(text)
        if len(segments) == 1 and not _WEIGHT_STEP_SEPARATORS.search(text):
            try:
                return cls.constant(_parse_number(text))
            except ValueError:
                raise ValueError(f"'{text.strip()}' is not a weight: {_WEIGHT_HELP}") from None
        keyframes = []
        for segment in segments:
            parts = _WEIGHT_STEP_SEPARATORS.split(segment)
            try:
                if len(parts) != 2:
                    raise ValueError
                keyframes.append(Keyframe(_parse_number(parts[0]), _parse_number(parts[1], _UNSIGNED_RE)))
            except ValueError:
                raise ValueError(
                    f"keyframe '{segment.strip()}' of schedule '{text.strip()}' is not weight@step"
                    " (a number, @, a step >= 0)"
                ) from None
        return cls(tuple(keyframes))

    @property
    def is_constant(self) -> bool:
        return len(self.keyframes) == 1

    def value_at(self, step: int, total_steps: int) -> float:
        """The weight at 0-based ``step`` of a pass of ``total_steps`` steps."""
        if self.is_constant:
            return self.keyframes[0].weight
        one_is_fraction = all(keyframe.step <= 1 for keyframe in self.keyframes)
        points = sorted(
            ((_position(k.step, total_steps, one_is_fraction), k.weight) for k in self.keyframes),
            key=lambda point: point[0],
        )
        before = [point for point in points if point[0] <= step]
        after = [point for point in points if point[0] > step]
        if not before:
            return points[0][1]
        (left_step, left_weight), right = before[-1], (after[0] if after else None)
        if right is None:
            return left_weight
        right_step, right_weight = right
        return left_weight + (right_weight - left_weight) * (step - left_step) / (right_step - left_step)

    def __str__(self) -> str:
        if self.is_constant:
            return format_number(self.keyframes[0].weight)
        return ",".join(f"{format_number(k.weight)}@{format_number(k.step)}" for k in self.keyframes)


ONE = Schedule.constant(1.0)


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
    if request.start is not None and step < _position(request.start, total_steps):
        return False
    return request.stop is None or step < _position(request.stop, total_steps)


@dataclass(frozen=True)
class ParseResult:
    request: Optional[LoraRequest]
    warnings: tuple[str, ...] = ()


# ----------------------------------------------------------------------------- value parsers
# Each takes the value text and returns the parsed value or raises ValueError with the problem.


def _parse_dyn(text: str) -> int:
    match = _INT_RE.fullmatch(text)
    if match is None or int(match.group(1)) < 1:
        raise ValueError(f"dyn '{text.strip()}' is not a whole number >= 1")
    return int(match.group(1))


def _parse_step_value(text: str) -> float:
    try:
        return _parse_number(text, _UNSIGNED_RE)
    except ValueError:
        raise ValueError(f"'{text.strip()}' is not a step (a number >= 0; below 1 a fraction of the steps)") from None


def _parse_step_range(text: str) -> tuple[Optional[float], Optional[float]]:
    match = _STEP_RANGE_RE.fullmatch(text)
    if match is None or match.group(1) is None and match.group(2) is None:
        raise ValueError(f"step '{text.strip()}' is not a range A-B of steps such as 5-20")
    return tuple(None if end is None else _parse_step_value(end) for end in match.groups())


def _normalise_lbw_value(token: str) -> str:
    token = token.strip()
    special = _LBW_SPECIAL_RE.fullmatch(token)
    if special is not None:
        return re.sub(r"\s+", "", special.group(1)).upper()
    _parse_number(token)
    return token


def _parse_lbw(text: str) -> str:
    text = text.strip()
    if "," not in text:
        if _NUMBER_RE.fullmatch(text):
            raise ValueError(f"lbw '{text}' is one number: give a preset name or a list of 12, 17, 20 or 26 weights")
        if not re.fullmatch(r"[\w.+\-]+", text):
            raise ValueError(f"lbw '{text}' is neither a preset name (letters, digits, _ . + -) nor a list of weights")
        return text
    tokens = text.split(",")
    if len(tokens) not in LBW_LENGTHS:
        raise ValueError(f"lbw has {len(tokens)} values; a block-weight list needs 12, 17, 20 or 26")
    try:
        return ",".join(_normalise_lbw_value(token) for token in tokens)
    except ValueError as error:
        raise ValueError(f"lbw value {error}; values are numbers, R, U, X, X+n or X-n") from None


def _is_block_spec(text: str) -> bool:
    tokens = text.split()
    if tokens and tokens[0].upper() == "NOT":
        tokens = tokens[1:]
    return all(_BLOCK_TOKEN_RE.fullmatch(token) for token in tokens)


def _parse_lbwe_directive(text: str) -> str:
    parts = text.split(":")
    if len(parts) != 3:
        raise ValueError(f"lbwe directive '{text.strip()}' is not BLOCKS:ELEMENTS:RATIO")
    blocks, elements, ratio = (" ".join(part.split()) for part in parts)
    if not _is_block_spec(blocks):
        raise ValueError(
            f"lbwe blocks '{blocks}' are not block ids (BASE, IN00, M00, OUT11, ranges IN04-OUT05, leading NOT)"
        )
    if "=" in elements:
        raise ValueError(f"lbwe elements '{elements}' contain '='")
    try:
        _parse_number(ratio)
    except ValueError:
        raise ValueError(f"lbwe ratio '{ratio}' is not a number") from None
    return f"{blocks.upper()}:{elements}:{ratio}"


def _parse_lbwe(text: str) -> str:
    text = text.replace("\n", ",").strip()
    if ":" not in text:
        if "," in text:
            raise ValueError(f"lbwe '{text}' is neither one preset name nor BLOCKS:ELEMENTS:RATIO directives")
        return text
    return ",".join(_parse_lbwe_directive(d) for d in text.split(",") if d.strip())


def _lbwe_needs_more(value: str) -> bool:
    """Whether an lbwe value is an unfinished inline directive that A1111 split on ':'."""
    last = value.replace("\n", ",").rsplit(",", 1)[-1]
    colons = last.count(":")
    if colons == 0:  # a preset name, or the BLOCKS of a directive (surely so after a first directive)
        return ":" in value or _is_block_spec(last)
    return colons == 1


# ----------------------------------------------------------------------------- item parsing

_KEY_ALIASES = {"w": "lbw"}
_KNOWN_KEYS = ("te", "unet", "dyn", "lbw", "lbwe", "x", "start", "stop", "step", "hr", "hrte", "hrunet")
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
    """The name and the index of the first item after it; ValueError for an unclosed quote."""
    joined = texts[0].strip()
    if not joined.startswith('"'):
        return joined, 1
    end = 0
    while not (len(joined) >= 2 and joined.endswith('"')):
        end += 1
        if end == len(texts):
            raise ValueError(f"the quoted name {texts[0].strip()} has no closing quote")
        joined = f"{joined}:{texts[end]}".strip()
    return joined[1:-1].strip(), end + 1


def _split_items(texts: list[str]) -> list[_Item]:
    items = []
    index = 0
    while index < len(texts):
        text = texts[index]
        if "=" not in text:
            items.append(_Item(None, text, text))
        else:
            key, _, value = text.partition("=")
            key = key.strip().lower()
            if _KEY_ALIASES.get(key, key) == "lbwe":
                while _lbwe_needs_more(value) and index + 1 < len(texts) and "=" not in texts[index + 1]:
                    index += 1
                    value = f"{value}:{texts[index]}"
                text = f"{text.partition('=')[0]}={value}"
            items.append(_Item(_KEY_ALIASES.get(key, key), value, text))
        index += 1
    return items


_T = TypeVar("_T")


class _Collector:
    """Sorts the items of one LoRA into fields and gathers warnings and skip reasons."""

    def __init__(self, label: str):
        self.label = label
        self.warnings: list[str] = []
        self.fatal = False
        self.values: dict[str, _Item] = {}

    def warn(self, item_text: Optional[str], problem: str, outcome: str) -> None:
        where = f"{self.label}: item '{item_text}'" if item_text is not None else self.label
        self.warnings.append(f"{where}: {problem}; {outcome}")

    def skip(self, item_text: Optional[str], problem: str) -> None:
        self.fatal = True
        self.warn(item_text, problem, "the LoRA is skipped")

    def sort(self, items: list[_Item]) -> None:
        positional = [item for item in items if item.key is None]
        for index, item in enumerate(positional):
            if index >= len(_POSITIONAL_KEYS):
                self.warn(item.text, f"only {len(_POSITIONAL_KEYS)} positional values (TE:UNET:DYN) are read", "ignored")
            elif item.value.strip():
                self.values[_POSITIONAL_KEYS[index]] = item
        named: dict[str, _Item] = {}
        for item in items:
            if item.key is None:
                continue
            if item.key not in _KNOWN_KEYS:
                self.warn(item.text, f"unknown key '{item.key}' (known: {', '.join(_KNOWN_KEYS)}, w)", "ignored")
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
                self.warn(self.values[key].text, f"'{step_text}' also sets {key}", "step= wins")
        return (start if range_start is None else range_start), (stop if range_stop is None else range_stop)


def _weight(text: str) -> Schedule:
    try:
        return Schedule.parse(text)
    except ValueError as error:
        if _looks_like_block_weights(text):
            raise ValueError(f"{error} (block weights go in lbw={text.strip()})") from None
        raise


def _looks_like_block_weights(text: str) -> bool:
    """An LBW preset name (upper case, as LBW's are) or list where a weight was expected."""
    if "," not in text:
        return re.fullmatch(r"\s*[A-Z][A-Z0-9_.]*\s*", text) is not None
    try:
        _parse_lbw(text)
    except ValueError:
        return False
    return True


def parse_lora_items(items: Sequence[str]) -> ParseResult:
    """The items of one ``<lora:...>`` (its text split on ':') -> ParseResult. Never raises."""
    texts = [_as_text(item) for item in items]
    raw = ":".join(texts)
    if not texts:
        return ParseResult(None, ("<lora:>: no LoRA name; the LoRA is skipped",))
    try:
        name, first = _take_name(texts)
    except ValueError as error:
        return ParseResult(None, (f"<lora:{raw}>: {error}; the LoRA is skipped",))
    collector = _Collector(f'LoRA "{name}"' if name else f"<lora:{raw}>")
    if not name:
        collector.skip(None, "no LoRA name")
    collector.sort(_split_items(texts[first:]))

    te = collector.get("te", _weight, ONE)
    unet = collector.get("unet", _weight, te)
    hr = collector.get("hr", _weight)
    hr_te = collector.get("hrte", _weight, hr)
    hr_unet = collector.get("hrunet", _weight, hr)
    dyn = collector.get("dyn", _parse_dyn)
    lbw = collector.get("lbw", _parse_lbw)
    lbwe = collector.get("lbwe", _parse_lbwe)
    x = collector.get("x", _parse_number, 1.0)
    start, stop = collector.start_stop()
    if start is not None and stop is not None and not collector.fatal:
        _warn_if_never_active(collector, start, stop)
    if collector.fatal:
        return ParseResult(None, tuple(collector.warnings))
    request = LoraRequest(
        name=name, te=te, unet=unet, dyn=dyn, lbw=lbw, lbwe=lbwe, x=x,
        start=start, stop=stop, hr_te=hr_te, hr_unet=hr_unet, raw=raw,
    )
    return ParseResult(request, tuple(collector.warnings))


def _warn_if_never_active(collector: _Collector, start: float, stop: float) -> None:
    if (start < 1) == (stop < 1) and start >= stop:
        collector.warn(None, f"start {format_number(start)} is not before stop {format_number(stop)}", "it never acts")


def parse_prompt(prompt: str) -> list[tuple[str, ParseResult]]:
    """Every ``<lora:...>``/``<lyco:...>`` of a raw prompt, as (the tag text, its ParseResult)."""
    if not isinstance(prompt, str):
        return []
    return [
        (match.group(0), parse_lora_items(match.group(2).split(":")))
        for match in EXTRA_NETWORK_RE.finditer(prompt)
        if match.group(1) in NETWORK_TYPES
    ]


# ----------------------------------------------------------------------------- formatting


def format_name(name: str) -> str:
    """A LoRA name as it must be written in a prompt (quoted when it contains ``:``)."""
    return f'"{name}"' if ":" in name or name.startswith('"') else name


def format_request(request: LoraRequest, network: str = "lora") -> str:
    """A canonical ``<lora:...>`` that parses back to an equal request."""
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
    }
    if request.hr_te is not None and request.hr_te == request.hr_unet:
        named["hr"] = request.hr_te
    else:
        named.update(hrte=request.hr_te, hrunet=request.hr_unet)
    parts.extend(f"{key}={value}" for key, value in named.items() if value is not None)
    return f"<{network}:{':'.join(parts)}>"
