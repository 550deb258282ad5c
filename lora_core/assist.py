"""Help while a prompt is typed: the live check of its LoRA tags, and what completion offers.

The check runs what a generation runs before it reads any weight, with the same code: the tags as A1111 finds
them (:mod:`lora_core.tags`), the item parser (:mod:`lora_core.syntax`), the name lookup (the library, with a
re-scan for a name not known yet), the file's family and keys from its header (``network.check_fit``) and the
block-weight presets (``BlockWeights.validate``); its messages are the lines a generation puts in ``Lora errors``
(``runtime.item_error``, ``runtime.too_many_tags``). What only loading the weights finds (a non-finite value, a
layer whose shape does not fit) is left to the generation.

Offsets in the answers count UTF-16 code units, as JavaScript strings do, so the browser can select a tag.
Nothing here raises for bad input: :func:`check_payload` answers a malformed request with status 400 and a message.
"""
from __future__ import annotations

import json
import logging
import math
import os
import threading
import time
from typing import Any, Callable, Optional

from .errors import LoraError, LoraNotFoundError
from .library import LoraEntry, LoraLibrary
from .network import check_fit
from .runtime import LoraRuntime, item_error, too_many_tags
from .syntax import KNOWN_KEYS, MAX_TAGS, LoraRequest, format_name, parse_tag
from .tags import Tag, find_tags

log = logging.getLogger("lora_core")

__all__ = ["KEY_HELP", "NEGATIVE_NOTE", "PromptChecker", "check_payload", "completion_lists", "name_choices"]

KEY_HELP = {
    "te": "text-encoder weight (a number or a schedule 1@0,0.5@10)",
    "unet": "UNet weight (default: the TE weight)",
    "dyn": "rank to use (DyLoRA)",
    "lbw": "block weights: a preset or 12/17/20/26 values",
    "lbwe": "elemental block weights: a preset or BLOCKS:ELEMENTS:RATIO",
    "x": "the value of X in lbw",
    "start": "first step the LoRA acts (below 1: a fraction)",
    "stop": "step at which it stops",
    "step": "steps A-B it acts in (start and stop in one)",
    "hr": "weight in the hires pass",
    "hrte": "text-encoder weight in the hires pass",
    "hrunet": "UNet weight in the hires pass",
    "scope": "subprompt: only the AND part the tag is in (default: prompt)",
}
"""One line per key that completion offers after ``:`` (the keys of ``syntax.KNOWN_KEYS``)."""

NEGATIVE_NOTE = ("not applied: the WebUI applies the LoRA tags of the prompt only; in the negative prompt this tag "
                 "is read as text")

STATUS_OK, STATUS_WARNING, STATUS_SKIPPED, STATUS_IGNORED = "ok", "warning", "skipped", "ignored"
RESCAN_INTERVAL_S = 2.0
_FIT_CACHE_SIZE = 512


def _utf16_offsets(text: str, positions: list[int]) -> list[int]:
    """``positions`` (indices into ``text``, in code points) as UTF-16 code-unit offsets; linear in the text."""
    if text.isascii():
        return list(positions)
    order = sorted(range(len(positions)), key=positions.__getitem__)
    out = [0] * len(positions)
    extra, done = 0, 0
    for i in order:
        position = positions[i]
        extra += sum(1 for ch in text[done:position] if ord(ch) > 0xFFFF)
        done = position
        out[i] = position + extra
    return out


def _generation_order(tags: list[Tag]) -> list[Tag]:
    """The tags in the order a generation gets them: A1111 groups them per network, networks in order of first
    appearance (``lookup_extra_networks``), so every ``<lora:>`` comes before the first ``<lyco:>`` or after all."""
    first: dict[str, int] = {}
    for position, tag in enumerate(tags):
        first.setdefault(tag.network, position)
    return sorted(tags, key=lambda tag: first[tag.network])


class PromptChecker:
    """The live check over one runtime: its library, the bound model's family, its block-weight presets.

    Safe to call from a web-server thread while a generation runs: it reads the library and the model index and
    never loads weights, touches the model or draws random block weights."""

    def __init__(self, runtime: LoraRuntime, rescan_interval_s: float = RESCAN_INTERVAL_S,
                 clock: Callable[[], float] = time.monotonic):
        self.runtime = runtime
        self.rescan_interval_s = rescan_interval_s
        self._clock = clock
        self._last_rescan = -math.inf
        self._lock = threading.Lock()
        self._fit: dict[tuple, Optional[str]] = {}

    def check(self, prompt: str, negative: bool = False) -> dict[str, Any]:
        """Every ``<lora:...>``/``<lyco:...>`` of ``prompt``: its span, status and the messages a generation gives.

        ``status``: ``ok``; ``warning`` (used, with a message); ``skipped`` (the generation leaves it out, and says
        why); ``ignored`` (a tag in the negative prompt, which the WebUI does not apply)."""
        tags = list(find_tags(prompt))
        checked: dict[int, tuple[str, list[str]]] = {}
        if negative:
            for tag in tags:
                checked[tag.start] = (STATUS_IGNORED, [NEGATIVE_NOTE])
        else:
            ordered = _generation_order(tags)
            for tag in ordered[MAX_TAGS:]:
                checked[tag.start] = (STATUS_SKIPPED, [too_many_tags(len(ordered))])
            for tag in ordered[:MAX_TAGS]:
                checked[tag.start] = self._check_tag(tag)
        offsets = _utf16_offsets(prompt, [p for tag in tags for p in (tag.start, tag.end)])
        items = []
        for number, tag in enumerate(tags):
            status, messages = checked[tag.start]
            items.append({"start": offsets[2 * number], "end": offsets[2 * number + 1],
                          "text": prompt[tag.start:tag.end], "status": status, "messages": messages})
        index = self.runtime.index
        return {"items": items, "model_family": None if index is None else index.family}

    def _check_tag(self, tag: Tag) -> tuple[str, list[str]]:
        parsed = parse_tag(tag.text)
        messages = list(parsed.warnings)
        if parsed.request is None:
            return STATUS_SKIPPED, messages
        problem = self._usable(parsed.request)
        if problem is not None:
            return STATUS_SKIPPED, [*messages, problem]
        return (STATUS_WARNING if messages else STATUS_OK), messages

    def _usable(self, request: LoraRequest) -> Optional[str]:
        """The generation's error line for a parsed request it could not use, or None (in the runtime's order:
        name, file, block weights)."""
        try:
            entry = self._resolve(request.name)
            index = self.runtime.index
            if index is not None:
                self._check_file(entry, index)
            factory = self.runtime.layer_scale_factory
            validate = getattr(factory, "validate", None)
            if validate is not None and (request.lbw or request.lbwe):
                validate(request, None if index is None else index.family)
        except (LoraError, ValueError) as error:
            return item_error(request, error)
        return None

    def _resolve(self, name: str) -> LoraEntry:
        """As ``LoraRuntime.resolve``: an unknown name re-scans the folders (here at most every few seconds, since
        the check runs as the person types), so a file just added is found."""
        library = self.runtime.library
        try:
            return library.resolve(name)
        except LoraNotFoundError:
            with self._lock:
                now = self._clock()
                if now - self._last_rescan < self.rescan_interval_s:
                    raise
                self._last_rescan = now
            library.refresh()
            return library.resolve(name)

    def _check_file(self, entry: LoraEntry, index) -> None:
        """``network.check_fit`` for .safetensors files (a .pt/.ckpt has no header to read apart from its weights),
        remembered per file version and model."""
        if entry.path.suffix.lower() != ".safetensors":
            return
        key = (*entry.stat_key, id(index), index.family)
        if key not in self._fit:
            try:
                check_fit(entry.path, index)
                problem = None
            except LoraError as error:
                problem = error
            with self._lock:
                if len(self._fit) >= _FIT_CACHE_SIZE:
                    self._fit.clear()
                self._fit[key] = problem
        problem = self._fit[key]
        if problem is not None:
            raise problem


# ----------------------------------------------------------------------------- the request


def _bad(message: str) -> tuple[int, dict[str, Any]]:
    return 400, {"detail": message}


def check_payload(checker: PromptChecker, body: object) -> tuple[int, dict[str, Any]]:
    """(HTTP status, JSON answer) for the body of ``POST /lora-core/v1/check``: ``{"prompt": str, "negative":
    bool}``. A malformed body gets 400 and a message; a failure of the check itself 200, no items and ``error``
    (the page keeps working; the console has the traceback). Never raises."""
    if isinstance(body, (bytes, bytearray)):
        try:
            body = body.decode("utf-8")
        except UnicodeDecodeError as error:
            return _bad(f"the request body is not UTF-8 text ({error.reason} at byte {error.start})")
    if isinstance(body, str):
        try:
            body = json.loads(body)
        except ValueError as error:
            return _bad(f"the request body is not JSON: {error}")
    if not isinstance(body, dict):
        return _bad(f'the request body must be a JSON object {{"prompt": "..."}}, not {type(body).__name__}')
    prompt, negative = body.get("prompt"), body.get("negative", False)
    if not isinstance(prompt, str):
        return _bad(f"'prompt' must be a string, not {'missing' if prompt is None else type(prompt).__name__}")
    if not isinstance(negative, bool):
        return _bad(f"'negative' must be true or false, not {type(negative).__name__}")
    try:
        return 200, checker.check(prompt, negative)
    except Exception as error:  # a bug must not break the page: say what it was
        log.exception("lora-core: the prompt check failed")
        return 200, {"items": [], "model_family": None, "error": f"the check failed: {type(error).__name__}: {error}"}


# ----------------------------------------------------------------------------- completion


def _relative_path(entry: LoraEntry, roots: list) -> str:
    """The file's path under its LoRA folder, with ``/`` (``styles/ink.safetensors``)."""
    path = os.path.abspath(entry.path)
    for root in roots:
        root = os.path.abspath(root)
        if path.startswith(root.rstrip(os.sep) + os.sep):
            return os.path.relpath(path, root).replace(os.sep, "/")
    return entry.path.name


def name_choices(library: LoraLibrary, *, prefer_filename: bool = False,
                 hidden: Optional[Callable[[LoraEntry], bool]] = None) -> list[dict[str, str]]:
    """The LoRAs completion offers: each with the name to write (the alias where it reaches only this file, else
    the file name, or the file name always with ``prefer_filename``), the text to insert (quoted when needed), file
    name, alias, path under its folder and family. Left out: files that no name reaches (a file name used in two
    folders), names no prompt can carry, and those ``hidden`` says (the SD-version filter)."""
    choices = []
    for entry in library.entries:
        if hidden is not None and hidden(entry):
            continue
        name = entry.name if prefer_filename else library.prompt_name(entry)
        try:
            if library.resolve(name) is not entry:
                continue
            insert = format_name(name)
        except (LoraError, ValueError):
            continue
        choices.append({"name": name, "insert": insert, "file": entry.name, "alias": entry.alias,
                        "path": _relative_path(entry, library.roots), "version": entry.sd_version})
    choices.sort(key=lambda choice: (choice["name"].lower(), choice["path"]))
    return choices


def completion_lists(library: LoraLibrary, presets: list[str], elemental_presets: list[str], *,
                     prefer_filename: bool = False,
                     hidden: Optional[Callable[[LoraEntry], bool]] = None) -> dict[str, Any]:
    """Everything completion offers, in one answer (``GET /lora-core/v1/completions``)."""
    return {
        "names": name_choices(library, prefer_filename=prefer_filename, hidden=hidden),
        "lbw_presets": list(presets),
        "lbwe_presets": list(elemental_presets),
        "keys": [{"key": key, "help": KEY_HELP[key]} for key in KNOWN_KEYS],
    }
