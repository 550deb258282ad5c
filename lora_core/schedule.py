"""Numbers and weight schedules as prompts write them (see :mod:`lora_core.syntax` for where they appear).

A number is written ``-0.5``, ``.5``, ``1e-1`` or ``+2``, with spaces around it allowed; ``nan``, ``inf``, ``1_0`` and
values too large for a float are refused. A schedule is a number or keyframes ``weight@step`` joined by ``,``
(``~`` may replace ``@`` and ``;`` may replace ``,``, as in loractl); how steps are counted is described in
:mod:`lora_core.syntax`.

Every parser here takes time linear in its text: prompts can be pasted from anywhere, and a regular expression
that backtracks over a long run of digits would take minutes on a few hundred kilobytes.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass

__all__ = ["MAX_KEYFRAMES", "ONE", "Keyframe", "Schedule", "clip", "format_number", "parse_number", "quote",
           "step_position"]

MAX_KEYFRAMES = 256
"""The most keyframes a schedule may have (a longer one is refused: it cannot be meant)."""

_NOT_A_NUMBER_CHAR = re.compile(r"[^\d.eE+\-]")
_QUOTE_LIMIT = 60

WEIGHT_HELP = "write a number such as 0.7 or a schedule such as 1@0,0.5@10"


def clip(text: str, limit: int = _QUOTE_LIMIT) -> str:
    """``text`` shortened to ``limit`` characters for a message (a pasted prompt may be megabytes long)."""
    return text if len(text) <= limit else f"{text[:limit - 1]}…"


def quote(text: str) -> str:
    """``text`` stripped, shortened and in quotes, for a message."""
    return f"'{clip(text.strip())}'"


def parse_number(text: str, unsigned: bool = False) -> float:
    """A finite number as written in a prompt (see the module docstring); ValueError says what is wrong.

    ``unsigned`` refuses a leading ``-``. Only the characters of a number are allowed, and ``float`` (which reads
    the same grammar for them) does the rest in C, in linear time.
    """
    stripped = text.strip()
    if not stripped or _NOT_A_NUMBER_CHAR.search(stripped) or (unsigned and stripped.startswith("-")):
        raise ValueError(f"{quote(text)} is not a number")
    try:
        value = float(stripped)
    except ValueError:
        raise ValueError(f"{quote(text)} is not a number") from None
    if not math.isfinite(value):
        raise ValueError(f"{quote(text)} is too large")
    return value


def format_number(value: float) -> str:
    """The shortest text that reads back as exactly ``value`` (``1.0`` -> ``1``)."""
    value = float(value)
    if value.is_integer() and abs(value) < 1e16:
        return str(int(value))
    return repr(value)


def step_position(value: float, total_steps: int, one_is_fraction: bool = False) -> float:
    """A step or fraction (see :mod:`lora_core.syntax`) -> a 0-based step position."""
    if value < 1 or (one_is_fraction and value == 1):
        return value * max(total_steps - 1, 0)
    return value


@dataclass(frozen=True)
class Keyframe:
    weight: float
    step: float
    """>= 0; a fraction of the pass when < 1 (see :mod:`lora_core.syntax`)."""


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
        count = text.count(",") + text.count(";") + 1  # counted before anything is split
        if count == 1 and "@" not in text and "~" not in text:
            try:
                return cls.constant(parse_number(text))
            except ValueError:
                raise ValueError(f"{quote(text)} is not a weight: {WEIGHT_HELP}") from None
        if count > MAX_KEYFRAMES:
            raise ValueError(f"schedule {quote(text)} has {count:,} keyframes; at most {MAX_KEYFRAMES}")
        keyframes = []
        for segment in text.replace(";", ",").split(","):
            parts = segment.replace("~", "@").split("@")
            try:
                if len(parts) != 2:
                    raise ValueError
                keyframes.append(Keyframe(parse_number(parts[0]), parse_number(parts[1], unsigned=True)))
            except ValueError:
                raise ValueError(
                    f"keyframe {quote(segment)} of schedule {quote(text)} is not weight@step"
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
            ((step_position(k.step, total_steps, one_is_fraction), k.weight) for k in self.keyframes),
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
