"""Discovering LoRA files: the index of names and aliases, metadata, hashes, and an LRU cache of loaded files.

Names are resolved through the index only, never joined into paths, so a name cannot reach a file
outside the roots. Symbolic links (folders and files) inside the roots are followed, as A1111's
`walk_files` does, but only when their target lies inside one of the roots; links pointing elsewhere,
broken links and second paths to an already listed file are not listed and are reported in
`LoraLibrary.skipped` (to use LoRAs stored elsewhere, add that folder as a root).
"""
from __future__ import annotations

import difflib
import os
import re
import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Literal, Mapping, Sequence, TypeVar

from .errors import AmbiguousNameError, LoraFileError, LoraNotFoundError
from .families import SdVersion, detect_sd_version
from .io import LORA_SUFFIXES, model_hash, read_metadata
from .syntax import name_problem

T = TypeVar("T")

PREVIEW_EXTENSIONS = ("png", "jpg", "jpeg", "webp", "gif")  # A1111's defaults, in its search order
RESERVED_NAMES = frozenset({"none"})  # never usable as an alias (A1111 forbids it too)


class LoraEntry:
    """One LoRA file on disk. Metadata and hash are read on first use and kept for this (path, mtime, size).

    A file whose header cannot be read keeps the error in `problem`; its alias is then its stem and its
    version 'unknown', while `metadata` and `hash` raise the LoraFileError.
    """

    def __init__(self, path: Path, mtime_ns: int, size: int):
        self.path = path
        self.name = path.stem
        self.mtime_ns = mtime_ns
        self.mtime = mtime_ns / 1e9
        self.size = size
        self.problem: LoraFileError | None = None
        self._metadata: dict[str, str] | None = None
        self._hash: str | None = None

    @property
    def stat_key(self) -> tuple[str, int, int]:
        return str(self.path), self.mtime_ns, self.size

    @property
    def metadata(self) -> dict[str, str]:
        if self._metadata is None:
            try:
                self._metadata = read_metadata(self.path)
            except LoraFileError as e:
                self.problem = e
                raise
        return self._metadata

    def _metadata_or_empty(self) -> Mapping[str, str]:
        try:
            return self.metadata
        except LoraFileError:
            return {}

    @property
    def alias(self) -> str:
        return self._metadata_or_empty().get("ss_output_name") or self.name

    @property
    def sd_version(self) -> SdVersion:
        return detect_sd_version(self._metadata_or_empty())

    @property
    def hash(self) -> str:
        """`sshs_model_hash` from the metadata if present, else the A1111 model hash (computed once)."""
        if self._hash is None:
            stored = self._metadata_or_empty().get("sshs_model_hash")
            if stored:
                self._hash = stored.lower()
            else:
                try:
                    self._hash = model_hash(self.path)
                except LoraFileError as e:
                    self.problem = e
                    raise
        return self._hash

    @property
    def hash_is_known(self) -> bool:
        """True when `hash` can be answered without hashing the file."""
        return self._hash is not None or bool(self._metadata_or_empty().get("sshs_model_hash"))

    @property
    def shorthash(self) -> str:
        return self.hash[:12]

    def _sibling(self, suffix: str) -> Path:
        return self.path.with_name(self.path.stem + suffix)

    def preview_path(self) -> Path | None:
        """The preview image next to the file (`stem.png`, `stem.preview.png`, jpg, jpeg, webp, gif), if any."""
        for ext in PREVIEW_EXTENSIONS:
            for suffix in (f".{ext}", f".preview.{ext}"):
                candidate = self._sibling(suffix)
                if candidate.is_file():
                    return candidate
        return None

    def user_metadata_path(self) -> Path:
        """The `stem.json` sidecar where A1111's built-in keeps user settings (it may not exist)."""
        return self._sibling(".json")

    def __repr__(self) -> str:
        return f"<LoraEntry {self.name} {self.path}>"


def _natural_key(text: str) -> list:
    return [int(part) if part.isdigit() else part.lower() for part in re.split(r"(\d+)", text)]


def _is_inside(path: str, roots: Sequence[str]) -> bool:
    for root in roots:
        try:
            if os.path.commonpath([path, root]) == root:
                return True
        except ValueError:  # different drives on Windows
            continue
    return False


@dataclass
class _NameIndex:
    by_stem: dict[str, list[LoraEntry]] = field(default_factory=dict)
    by_alias: dict[str, list[LoraEntry]] = field(default_factory=dict)
    claims: dict[str, list[LoraEntry]] = field(default_factory=dict)  # lower-cased stem or alias -> entries
    forbidden_aliases: set[str] = field(default_factory=set)  # lower-cased

    @classmethod
    def build(cls, entries: Sequence[LoraEntry]) -> "_NameIndex":
        index = cls()
        for entry in entries:
            index.by_stem.setdefault(entry.name, []).append(entry)
            index.claims.setdefault(entry.name.lower(), []).append(entry)
            alias = entry.alias
            if alias != entry.name:
                index.by_alias.setdefault(alias, []).append(entry)
                if alias.lower() != entry.name.lower():
                    index.claims.setdefault(alias.lower(), []).append(entry)
        for alias in index.by_alias:
            if alias.lower() in RESERVED_NAMES or len(index.claims.get(alias.lower(), ())) > 1:
                index.forbidden_aliases.add(alias.lower())
        return index

    def usable_names(self) -> list[str]:
        names = [stem for stem, entries in self.by_stem.items() if len(entries) == 1]
        names += [alias for alias in self.by_alias if alias.lower() not in self.forbidden_aliases]
        return names


class LoraLibrary:
    """The LoRA files under `roots`: call `refresh()` to (re)scan, `resolve(name)` to look one up."""

    def __init__(self, roots: Sequence[str | os.PathLike], cache_size: int = 4):
        self.roots = [Path(root) for root in roots]
        self.skipped: list[tuple[Path, str]] = []
        self._entries: list[LoraEntry] = []
        self._index: _NameIndex | None = None
        self._lock = threading.RLock()
        self._cache: OrderedDict[tuple[str, str, int, int], object] = OrderedDict()
        self._cache_size = 0
        self.set_cache_size(cache_size)

    # -- scanning ------------------------------------------------------------------------------

    def refresh(self) -> None:
        """Rescan the roots. Entries whose (path, mtime, size) did not change are kept with their metadata/hash."""
        previous = {entry.stat_key: entry for entry in self._entries}
        skipped: list[tuple[Path, str]] = []
        entries = [previous.get((str(path), mtime_ns, size)) or LoraEntry(path, mtime_ns, size)
                   for path, mtime_ns, size in self._scan(skipped)]
        with self._lock:
            self._entries = entries
            self.skipped = skipped
            self._index = None

    def _scan(self, skipped: list[tuple[Path, str]]) -> Iterator[tuple[Path, int, int]]:
        real_roots = [os.path.realpath(root) for root in self.roots if root.is_dir()]
        skipped.extend((root, "not a folder") for root in self.roots if not root.is_dir())
        visited_dirs: set[str] = set()
        listed_files: dict[str, str] = {}
        for root in self.roots:
            if not root.is_dir() or os.path.realpath(root) in visited_dirs:
                continue
            visited_dirs.add(os.path.realpath(root))
            for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
                dirnames[:] = self._walkable(dirpath, sorted(dirnames, key=_natural_key), real_roots,
                                             visited_dirs, skipped)
                for filename in sorted(filenames, key=_natural_key):
                    if os.path.splitext(filename)[1].lower() not in LORA_SUFFIXES:
                        continue
                    found = self._stat_file(os.path.join(dirpath, filename), real_roots, listed_files, skipped)
                    if found is not None:
                        yield found

    @staticmethod
    def _walkable(dirpath: str, dirnames: list[str], real_roots: list[str], visited: set[str],
                  skipped: list[tuple[Path, str]]) -> list[str]:
        keep = []
        for dirname in dirnames:
            full = os.path.join(dirpath, dirname)
            real = os.path.realpath(full)
            if not _is_inside(real, real_roots):
                skipped.append((Path(full), f"link to a folder outside the LoRA folders ({real})"))
            elif real not in visited:  # a second path to a folder (or a link cycle) is walked once
                visited.add(real)
                keep.append(dirname)
        return keep

    @staticmethod
    def _stat_file(full: str, real_roots: list[str], listed: dict[str, str],
                   skipped: list[tuple[Path, str]]) -> tuple[Path, int, int] | None:
        real = os.path.realpath(full)
        if not _is_inside(real, real_roots):
            skipped.append((Path(full), f"link to a file outside the LoRA folders ({real})"))
            return None
        if real in listed:
            skipped.append((Path(full), f"same file as {listed[real]}"))
            return None
        try:
            st = os.stat(full)
        except OSError as e:
            skipped.append((Path(full), f"cannot be read ({e.strerror or e})"))
            return None
        if not os.path.isfile(full):
            return None
        listed[real] = full
        return Path(full), st.st_mtime_ns, st.st_size

    # -- listing and lookup --------------------------------------------------------------------

    @property
    def entries(self) -> list[LoraEntry]:
        return list(self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    def __iter__(self) -> Iterator[LoraEntry]:
        return iter(list(self._entries))

    def problems(self) -> list[LoraEntry]:
        """Entries whose header or hash could not be read so far (`entry.problem` says why)."""
        return [entry for entry in self._entries if entry.problem is not None]

    def _name_index(self) -> _NameIndex:
        with self._lock:
            if self._index is None:
                self._index = _NameIndex.build(self._entries)
            return self._index

    def resolve(self, name: str) -> LoraEntry:
        """The entry whose file stem, or else alias, is `name` (A1111 rules, but ambiguity is an error).

        A stem always wins. An alias shared with another entry's stem or alias (case-insensitively),
        and the alias 'none', are forbidden: only the stem reaches such a file.
        """
        index = self._name_index()
        by_stem = index.by_stem.get(name, [])
        if len(by_stem) == 1:
            return by_stem[0]
        if by_stem:
            raise AmbiguousNameError(name, [e.path for e in by_stem],
                                     "Rename one of the files or move it out of the LoRA folders")
        key = name.lower() if isinstance(name, str) else ""
        if key in RESERVED_NAMES:
            raise LoraNotFoundError(name, reason=f"'{name}' is reserved and cannot name a LoRA by alias")
        if key in index.forbidden_aliases:
            claimants = index.claims.get(key, [])
            raise AmbiguousNameError(name, [e.path for e in claimants],
                                     "Use the file name (without extension) instead of the alias")
        by_alias = index.by_alias.get(name, [])
        if len(by_alias) == 1:
            return by_alias[0]
        raise LoraNotFoundError(name, self._close_matches(name, index))

    def prompt_name(self, entry: LoraEntry) -> str:
        """The name to write into a prompt: the alias when it reaches only this file, else the file stem.

        An alias that no prompt can carry (``>``, a control character...: ``syntax.name_problem``) is passed over for
        the stem; a stem that cannot be written is returned as it is (``syntax.format_name`` then refuses it).
        """
        alias = entry.alias
        if alias == entry.name or alias.lower() in RESERVED_NAMES or name_problem(alias) is not None:
            return entry.name
        return entry.name if alias.lower() in self._name_index().forbidden_aliases else alias

    @staticmethod
    def _close_matches(name: object, index: _NameIndex) -> list[str]:
        if not isinstance(name, str):
            return []
        candidates = index.usable_names()
        by_lower = {candidate.lower(): candidate for candidate in candidates}
        matches = difflib.get_close_matches(name.lower(), list(by_lower), n=5, cutoff=0.6)
        return [by_lower[match] for match in matches]

    def by_hash(self, shorthash: str) -> LoraEntry | None:
        """The entry whose hash starts with `shorthash` (for pasted infotext), or None.

        Entries whose hash is already known are checked first; others are hashed one by one only as needed.
        """
        wanted = shorthash.strip().lower()
        if not wanted:
            return None
        entries = self.entries
        known = [entry for entry in entries if entry.hash_is_known]
        unknown = [entry for entry in entries if not entry.hash_is_known]
        for entry in known + unknown:
            try:
                if entry.hash.lower().startswith(wanted):
                    return entry
            except LoraFileError:
                continue  # recorded in entry.problem, reported by problems()
        return None

    # -- LRU cache of loaded files ---------------------------------------------------------------

    @property
    def cache_size(self) -> int:
        return self._cache_size

    def set_cache_size(self, size: int) -> None:
        if size < 0:
            raise ValueError(f"cache_size must be >= 0, got {size}")
        with self._lock:
            self._cache_size = size
            self._trim_cache()

    def clear_cache(self) -> None:
        with self._lock:
            self._cache.clear()

    def _trim_cache(self) -> None:
        while len(self._cache) > self._cache_size:
            self._cache.popitem(last=False)

    def load(self, entry: LoraEntry, loader: Callable[[LoraEntry], T], *, kind: str = "") -> T:
        """`loader(entry)`, cached under (kind, path, mtime, size); a file changed on disk is loaded again.

        `kind` separates results of different loaders for the same file. The file is stat'ed on every
        call; when it changed since the last refresh, the loader gets a fresh entry for it.
        """
        try:
            st = os.stat(entry.path)
        except OSError as e:
            raise LoraFileError(entry.path, f"cannot be read ({e.strerror or e})") from None
        if (st.st_mtime_ns, st.st_size) != (entry.mtime_ns, entry.size):
            entry = LoraEntry(entry.path, st.st_mtime_ns, st.st_size)
        key = (kind, str(entry.path), st.st_mtime_ns, st.st_size)
        with self._lock:
            if key in self._cache:
                self._cache.move_to_end(key)
                return self._cache[key]  # type: ignore[return-value]
        value = loader(entry)
        with self._lock:
            if self._cache_size > 0:
                for stale in [k for k in self._cache if k[:2] == key[:2] and k != key]:
                    del self._cache[stale]
                self._cache[key] = value
                self._trim_cache()
        return value

    def cached_keys(self) -> list[tuple[str, str, int, int]]:
        """(kind, path, mtime_ns, size) of the cached results, least recently used first."""
        with self._lock:
            return list(self._cache)
