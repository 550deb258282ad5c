"""Extra-network tags (``<lora:...>``, ``<lyco:...>``) in a prompt, found exactly as A1111 finds them, in linear time.

A1111 (``modules/extra_networks.py``) finds them with :data:`EXTRA_NETWORK_RE` and splits the text after the
first ``:`` on ``:``; that list is what :func:`lora_core.syntax.parse_lora_items` reads. Run over a whole prompt the
expression takes quadratic time when ``>`` is missing: at every ``<word:`` it reads to the end of the prompt before
it fails (a prompt of 240 KB of ``<lora:`` took 35 s). Every match ends with a ``>``, so :func:`find_tags` searches
only up to the last ``>`` of the prompt: each candidate then stops at the next ``>``, and a match consumes what it
read. The matches are the same as A1111's, in the same order.
"""
from __future__ import annotations

import re
from typing import Iterator, NamedTuple

__all__ = ["EXTRA_NETWORK_RE", "NETWORK_TYPES", "Tag", "find_tags"]

EXTRA_NETWORK_RE = re.compile(r"<(\w+):([^>]+)>")
"""How A1111 (modules/extra_networks.py) finds extra networks in a prompt."""

NETWORK_TYPES = ("lora", "lyco")


class Tag(NamedTuple):
    """One extra-network tag of a prompt: ``prompt[start:end]`` is ``<network:text>``.

    A named tuple: a prompt may hold tens of thousands of tags, and it is built several times faster than a
    frozen dataclass."""

    start: int
    end: int
    network: str
    text: str
    """What A1111 splits on ``:`` into the items of the tag."""


def find_tags(prompt: str, networks: tuple[str, ...] = NETWORK_TYPES) -> Iterator[Tag]:
    """The tags of ``prompt`` whose network is one of ``networks`` (A1111's matches, see the module docstring)."""
    if not isinstance(prompt, str):
        return
    last_close = prompt.rfind(">")
    for match in EXTRA_NETWORK_RE.finditer(prompt, 0, last_close + 1):
        if match.group(1) in networks:
            yield Tag(match.start(), match.end(), match.group(1), match.group(2))
