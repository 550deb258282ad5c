"""Which LoRAs act on which rows of a batch: per-image LoRA sets and ``AND``-subprompt scope.

A1111 hands an extra network the LoRA tags of the first prompt of a batch only. When the prompts of a batch differ in
their tags (Dynamic Prompts, wildcards), each image here gets its own set, and a tag written with ``scope=subprompt``
acts only on the cond rows of its ``AND`` subprompt. The Patcher weights each plan entry per row of a layer's input
(``Patcher.set_rows``: a row per slot weight); this module says what those weights are:

- ``PromptLoras``: the tags of one image's raw prompt, split into those for the whole image and those scoped to
  one subprompt (``prompt_loras``).
- ``RowSets``: per image (and per subprompt) which slots (distinct LoRA tags of the batch) act, with how many
  copies; ``weights`` gives one row of slot weights.
- ``cfg_rows``: the row layout of A1111's CFG denoiser (``sd_samplers_cfg_denoiser.CFGDenoiser.forward``): every
  image's cond rows, one per subprompt, in image order; then one uncond row per image; an edit model
  (instruct-pix2pix) adds one more row per image. Every UNet call of a step takes the next rows of that layout in
  order (``batch_cond_uncond`` off: chunks; cond and uncond of different lengths: cond chunks, then uncond;
  skipped uncond rows are the last ones), so ``RowRouter`` hands each call the next rows.
- Uncond rows carry the image's whole-prompt set, as the built-in does for one image (its LoRAs act on the whole
  model, negative prompt included); subprompt-scoped LoRAs act on their subprompt's cond rows only.

A UNet call the layout does not account for (another extension's extra call, a step without a layout) gets the
first image's whole-prompt set on every row, what the built-in would do; ``RowRouter.unplaced`` counts those.
"""
from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass
from typing import Hashable, Sequence

from .syntax import parse_tag
from .tags import find_tags

#: A1111's subprompt separator (``prompt_parser.re_AND``)
AND_RE = re.compile(r"\bAND\b")
Items = tuple[str, ...]
#: the owner of a row: (image, subprompt), subprompt None for the image's uncond row
Owner = tuple[int, "int | None"]


@dataclass(frozen=True)
class PromptLoras:
    """The LoRA tags of one prompt, as A1111's items (the tag text split on ``:``): ``whole`` act on every row of the
    image; ``scoped[j]`` only on the cond rows of subprompt ``j``."""

    whole: tuple[Items, ...] = ()
    scoped: tuple[tuple[Items, ...], ...] = ()

    @property
    def has_scoped(self) -> bool:
        return any(self.scoped)

    def unscoped(self) -> "PromptLoras":
        """Every tag acting on the whole image (when the subprompts cannot be told apart)."""
        return PromptLoras(self.whole + tuple(i for items in self.scoped for i in items), ())


def prompt_loras(prompt: str) -> PromptLoras:
    """The tags of a raw prompt; a tag with ``scope=subprompt`` belongs to the subprompt it is written in (``AND``
    outside tags separate subprompts, as in A1111). A tag that does not parse acts on the whole image, where the
    runtime reports its problem."""
    tags = list(find_tags(prompt))
    inside = [(t.start, t.end) for t in tags]
    ands = [m.start() for m in AND_RE.finditer(prompt) if not any(a <= m.start() < b for a, b in inside)]
    whole: list[Items] = []
    scoped: list[list[Items]] = [[] for _ in range(len(ands) + 1)]
    for tag in tags:
        items = tuple(tag.text.split(":"))
        request = parse_tag(tag.text).request
        if request is not None and request.scope == "subprompt":
            scoped[sum(1 for a in ands if a < tag.start)].append(items)
        else:
            whole.append(items)
    if not any(scoped):
        return PromptLoras(tuple(whole), ())
    return PromptLoras(tuple(whole), tuple(tuple(s) for s in scoped))


def subprompt_count(prompt: str) -> int:
    return len(AND_RE.split(prompt))


@dataclass(frozen=True)
class RowSets:
    """Slots per image: ``whole[i]`` act on all of image i's rows, ``scoped[i][j]`` on its subprompt j's cond rows
    (a Counter: a tag written twice acts twice, as in one generation)."""

    whole: tuple[Counter, ...]
    scoped: tuple[tuple[Counter, ...], ...]
    slots: int

    @classmethod
    def of(cls, prompts: Sequence[PromptLoras], slot_of: dict[Hashable, int], slots: int) -> "RowSets":
        """``slot_of`` maps a tag's items to its slot; items not in it (LoRAs that failed) act nowhere."""
        def counted(items_list) -> Counter:
            return Counter(slot_of[items] for items in items_list if items in slot_of)

        return cls(tuple(counted(p.whole) for p in prompts),
                   tuple(tuple(counted(s) for s in p.scoped) for p in prompts), slots)

    def of_row(self, image: int, subprompt: int | None = None) -> Counter:
        slots = Counter(self.whole[image])
        scoped = self.scoped[image]
        if subprompt is not None and subprompt < len(scoped):
            slots.update(scoped[subprompt])
        return slots

    def weights(self, image: int, subprompt: int | None = None) -> tuple[float, ...]:
        slots = self.of_row(image, subprompt)
        return tuple(float(slots.get(s, 0)) for s in range(self.slots))

    def uses(self, image: int) -> list[int]:
        """The slots that act anywhere in image ``image`` (its infotext), in slot order."""
        used = set(self.whole[image])
        for s in self.scoped[image]:
            used.update(s)
        return sorted(used)


def cfg_rows(counts: Sequence[int], rows: int) -> list[Owner] | None:
    """The owner of each row of the batch A1111's CFG denoiser builds for ``len(counts)`` images with ``counts[i]``
    subprompts each: cond rows, then uncond rows (twice for an edit model); None when ``rows`` fits neither."""
    cond = [(i, j) for i, n in enumerate(counts) for j in range(n)]
    uncond = [(i, None) for i in range(len(counts))]
    for layout in (cond + uncond, cond + uncond + uncond):
        if len(layout) == rows:
            return layout
    return None


class RowRouter:
    """Hands each UNet call of a step the slot weights of its rows (``Patcher.route_rows``)."""

    def __init__(self, sets: RowSets):
        self.sets = sets
        self.default = (sets.weights(0),)  # the built-in's choice: the first prompt's LoRAs everywhere
        self._layout: list[tuple[float, ...]] | None = None
        self._layouts: dict[tuple, list[tuple[float, ...]] | None] = {}  # (counts, rows) -> layout: once per pass
        self._cursor = 0
        self.unplaced = 0  # calls no layout accounted for

    def begin_step(self, counts: Sequence[int], rows: int) -> bool:
        """A new step of the CFG denoiser over ``rows`` rows; False (and calls get the default) when the layout is
        not the one expected."""
        key = (tuple(counts), rows)
        if key not in self._layouts:  # the sets are fixed for the pass: every step has the same layout
            owners = cfg_rows(counts, rows)
            self._layouts[key] = None if owners is None else [self.sets.weights(i, j) for i, j in owners]
        self._layout = self._layouts[key]
        self._cursor = 0
        return self._layout is not None

    def rows_of_call(self, batch: int) -> Sequence[Sequence[float]]:
        layout = self._layout
        if layout is None or self._cursor + batch > len(layout):
            self.unplaced += 1
            return self.default
        rows = layout[self._cursor:self._cursor + batch]
        self._cursor += batch
        return rows

    def text(self, image: int, subprompt: int | None = None) -> tuple[tuple[float, ...]]:
        """One row for the text encoder run of image ``image``'s subprompt (None: its negative prompt)."""
        return (self.sets.weights(image, subprompt),)
