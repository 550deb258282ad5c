"""Safe, lazy reading and atomic writing of LoRA files.

`.safetensors`: the header is parsed and validated here first, so a damaged file gives a precise
message; tensors are then read one at a time, memory-mapped, through `safetensors.safe_open`.
`.pt` / `.ckpt`: only `torch.load(weights_only=True)`; a pickle that asks to run code is refused.
Every problem is a `LoraFileError(path, problem)`.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import pickle
import tempfile
import zipfile
from pathlib import Path
from typing import BinaryIO, Iterable, Mapping

import torch

from .errors import LoraFileError

SAFETENSORS_SUFFIX = ".safetensors"
PICKLE_SUFFIXES = (".pt", ".ckpt")
LORA_SUFFIXES = (SAFETENSORS_SUFFIX,) + PICKLE_SUFFIXES

HASH_CHUNK_BYTES = 1024 * 1024
MAX_HEADER_BYTES = 100_000_000  # the limit the safetensors library itself enforces
METADATA_KEY = "__metadata__"

# safetensors dtype names -> torch dtype attribute names (looked up lazily: older torch lacks some).
_SAFETENSORS_DTYPES = {
    "F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16",
    "I64": "int64", "I32": "int32", "I16": "int16", "I8": "int8",
    "U64": "uint64", "U32": "uint32", "U16": "uint16", "U8": "uint8", "BOOL": "bool",
    "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2",
    "F8_E4M3FNUZ": "float8_e4m3fnuz", "F8_E5M2FNUZ": "float8_e5m2fnuz", "C64": "complex64",
}


def _torch_dtype(name: str) -> torch.dtype | None:
    attr = _SAFETENSORS_DTYPES.get(name)
    return getattr(torch, attr, None) if attr else None


# ---------------------------------------------------------------------------------------------
# File checks and the safetensors header
# ---------------------------------------------------------------------------------------------

def _file_size(path: Path) -> int:
    """Size of a readable, non-empty regular file, or a LoraFileError saying why not."""
    try:
        st = path.stat()
    except FileNotFoundError:
        raise LoraFileError(path, "file not found") from None
    except OSError as e:
        raise LoraFileError(path, f"cannot be read ({e.strerror or e})") from None
    if path.is_dir():
        raise LoraFileError(path, "is a directory, not a LoRA file")
    if st.st_size == 0:
        raise LoraFileError(path, "file is empty (0 bytes)")
    return st.st_size


def _suffix(path: Path) -> str:
    suffix = path.suffix.lower()
    if suffix not in LORA_SUFFIXES:
        raise LoraFileError(path, f"unknown file type '{path.suffix}'; expected one of {', '.join(LORA_SUFFIXES)}")
    return suffix


def _read_header_length(path: Path, file: BinaryIO, size: int) -> int:
    """The 8-byte little-endian JSON length, checked against the file size."""
    if size < 8:
        raise LoraFileError(path, f"truncated: {size} bytes, too short for a safetensors header")
    prefix = file.read(8)
    length = int.from_bytes(prefix, "little")
    if length > size - 8 or length > MAX_HEADER_BYTES:
        hint = ""
        if prefix.startswith(b"PK\x03\x04") or prefix[:1] == b"\x80":
            hint = " (it looks like a PyTorch .pt/.ckpt file renamed to .safetensors)"
        raise LoraFileError(
            path, f"not a valid safetensors file or truncated: header length {length} but the file has only "
                  f"{size - 8} bytes after the length field{hint}")
    if length < 2:
        raise LoraFileError(path, f"not a valid safetensors file: header length {length} is too small")
    return length


class _Header:
    """A validated safetensors header: metadata, and per tensor (dtype name, shape, begin, end)."""

    def __init__(self, metadata: dict[str, str], tensors: dict[str, tuple[str, tuple[int, ...], int, int]],
                 length: int):
        self.metadata = metadata
        self.tensors = tensors
        self.length = length


def _parse_header(path: Path) -> _Header:
    size = _file_size(path)
    with open(path, "rb") as file:
        length = _read_header_length(path, file, size)
        raw = file.read(length)
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise LoraFileError(path, f"bad safetensors header: not valid JSON ({e})") from None
    if not isinstance(header, dict):
        raise LoraFileError(path, f"bad safetensors header: expected a JSON object, got {type(header).__name__}")

    metadata = _validate_metadata(path, header.pop(METADATA_KEY, None))
    tensors = {key: _validate_entry(path, key, entry) for key, entry in header.items()}
    _validate_layout(path, tensors, data_size=size - 8 - length)
    return _Header(metadata, tensors, length)


def _validate_metadata(path: Path, metadata: object) -> dict[str, str]:
    if metadata is None:
        return {}
    if not isinstance(metadata, dict):
        raise LoraFileError(path, f"bad safetensors header: {METADATA_KEY} must be an object, "
                                  f"got {type(metadata).__name__}")
    for key, value in metadata.items():
        if not isinstance(value, str):
            raise LoraFileError(path, f"bad safetensors header: metadata '{key}' must be a string, "
                                      f"got {type(value).__name__}")
    return dict(metadata)


def _validate_entry(path: Path, key: str, entry: object) -> tuple[str, tuple[int, ...], int, int]:
    def bad(problem: str) -> LoraFileError:
        return LoraFileError(path, f"bad safetensors header: tensor '{key}' {problem}")

    if not isinstance(entry, dict):
        raise bad("is not described by an object")
    dtype = entry.get("dtype")
    if not isinstance(dtype, str) or _torch_dtype(dtype) is None:
        raise bad(f"has unknown dtype {dtype!r}")
    shape = entry.get("shape")
    if not isinstance(shape, list) or not all(type(d) is int and d >= 0 for d in shape):
        raise bad(f"has an invalid shape {shape!r}")
    offsets = entry.get("data_offsets")
    if (not isinstance(offsets, list) or len(offsets) != 2
            or not all(type(o) is int and o >= 0 for o in offsets) or offsets[0] > offsets[1]):
        raise bad(f"has invalid data_offsets {offsets!r}")
    begin, end = offsets
    expected = math.prod(shape) * _torch_dtype(dtype).itemsize
    if end - begin != expected:
        raise bad(f"has shape {shape} of {dtype} ({expected} bytes) but data_offsets span {end - begin} bytes")
    return dtype, tuple(shape), begin, end


def _validate_layout(path: Path, tensors: Mapping[str, tuple], data_size: int) -> None:
    """Tensors must tile the data section exactly: no gap, no overlap, nothing past the end."""
    position = 0
    for key, (_, _, begin, end) in sorted(tensors.items(), key=lambda item: (item[1][2], item[1][3])):
        if end > data_size:
            raise LoraFileError(path, f"truncated: tensor '{key}' needs data up to byte {end} "
                                      f"but the data section has only {data_size} bytes")
        if begin != position:
            kind = "overlaps the previous tensor" if begin < position else "leaves a gap after the previous tensor"
            raise LoraFileError(path, f"bad safetensors header: data of tensor '{key}' {kind}")
        position = end
    if position != data_size:
        raise LoraFileError(path, f"bad safetensors file: {data_size - position} unexpected bytes after the last tensor")


def read_metadata(path: str | os.PathLike) -> dict[str, str]:
    """The `__metadata__` of a .safetensors file (header only, no tensor is read); {} for .pt/.ckpt."""
    path = Path(path)
    if _suffix(path) != SAFETENSORS_SUFFIX:
        _file_size(path)
        return {}
    return _parse_header(path).metadata


# ---------------------------------------------------------------------------------------------
# LoraFile
# ---------------------------------------------------------------------------------------------

def _check_finite(path: Path, key: str, tensor: torch.Tensor) -> None:
    """Cheap: a sum is non-finite iff an element is NaN/Inf (or the sum overflows); only then look closer."""
    if not tensor.is_floating_point() or tensor.numel() == 0:
        return
    if tensor.dtype.itemsize == 1:  # fp8: no CPU sum kernel; every fp8 value fits in fp16
        tensor = tensor.to(torch.float16)
    if torch.isfinite(tensor.sum()):
        return
    if torch.isnan(tensor).any():
        raise LoraFileError(path, f"tensor '{key}' contains NaN")
    if torch.isinf(tensor).any():
        raise LoraFileError(path, f"tensor '{key}' contains Inf")


class LoraFile:
    """An opened LoRA file. Tensors are read on `get`, each checked to be finite. Use as a context manager."""

    def __init__(self, path: Path, metadata: dict[str, str], tensors: Mapping[str, object]):
        self.path = path
        self.metadata = metadata
        self._tensors = tensors  # key -> what the subclass needs to describe and read that tensor
        self._closed = False

    def keys(self) -> list[str]:
        return list(self._tensors)

    # Subclasses provide these three.
    def shape(self, key: str) -> tuple[int, ...]:
        raise NotImplementedError

    def dtype(self, key: str) -> torch.dtype:
        raise NotImplementedError

    def _read(self, key: str) -> torch.Tensor:
        raise NotImplementedError

    def get(self, key: str) -> torch.Tensor:
        """The tensor `key` on the CPU, owning its memory (safe if the file changes later).

        LoraFileError if it is absent or contains NaN/Inf. Only this tensor's bytes are read.
        """
        self._require(key)
        tensor = self._read(key)
        _check_finite(self.path, key, tensor)
        return tensor

    def get_many(self, keys: Iterable[str]) -> dict[str, torch.Tensor]:
        return {key: self.get(key) for key in keys}

    def __contains__(self, key: object) -> bool:
        return key in self._tensors

    def _require(self, key: str) -> None:
        if self._closed:
            raise ValueError(f"{self.path}: the LoraFile is closed")
        if key not in self._tensors:
            raise LoraFileError(self.path, f"has no tensor '{key}'")

    def close(self) -> None:
        self._closed = True

    def __enter__(self) -> "LoraFile":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.path} ({len(self._tensors)} tensors)>"


class _SafetensorsFile(LoraFile):
    def __init__(self, path: Path):
        header = _parse_header(path)
        super().__init__(path, header.metadata, header.tensors)
        self._handle = None
        try:
            from safetensors import safe_open
            self._handle = safe_open(str(path), framework="pt", device="cpu")
        except Exception as e:  # the file changed since the header was read, or safetensors disagrees
            raise LoraFileError(path, f"safetensors could not open it: {e}") from None

    def shape(self, key: str) -> tuple[int, ...]:
        self._require(key)
        return self._tensors[key][1]

    def dtype(self, key: str) -> torch.dtype:
        self._require(key)
        return _torch_dtype(self._tensors[key][0])

    def _read(self, key: str) -> torch.Tensor:
        try:
            return self._handle.get_tensor(key).clone()  # own the memory: the mapped file may change later
        except Exception as e:
            raise LoraFileError(self.path, f"tensor '{key}' could not be read: {e}") from None

    def close(self) -> None:
        if not self._closed and self._handle is not None:
            self._handle.__exit__(None, None, None)
            self._handle = None
        super().close()


class _PickleFile(LoraFile):
    def __init__(self, path: Path):
        super().__init__(path, {}, _load_pickle_state_dict(path))

    def shape(self, key: str) -> tuple[int, ...]:
        self._require(key)
        return tuple(self._tensors[key].shape)

    def dtype(self, key: str) -> torch.dtype:
        self._require(key)
        return self._tensors[key].dtype

    def _read(self, key: str) -> torch.Tensor:
        return self._tensors[key].clone()  # own the memory: the file may be memory-mapped

    def close(self) -> None:
        self._tensors = {}
        super().close()


def _unpickler_detail(message: str) -> str:
    """The useful part of torch's long weights-only error ("Unsupported global: GLOBAL io.open ...")."""
    marker = "WeightsUnpickler error:"
    detail = message.split(marker, 1)[1] if marker in message else message
    detail = " ".join(detail.split())
    return detail.split(" Please use ")[0].split(" Check the documentation")[0][:300]


#: torch's own loader. Hosts replace ``torch.load`` (A1111's ``modules.safe.load`` runs its own restricted unpickler
#: first, which rejects files that torch 2.x writes, logs "The file may be malicious" and returns None): the
#: function in ``torch.serialization`` stays torch's, and with ``weights_only=True`` it never runs pickled code.
_TORCH_LOAD = torch.serialization.load


def _load_pickle_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """torch.load with weights_only=True; accepts {name: tensor} or {'state_dict': {name: tensor}, ...}."""
    _file_size(path)
    is_zip = zipfile.is_zipfile(path)
    try:
        payload = _TORCH_LOAD(str(path), map_location="cpu", weights_only=True, mmap=is_zip)
    except pickle.UnpicklingError as e:
        detail = _unpickler_detail(str(e))
        if "global" in detail.lower() or "class" in detail.lower():
            raise LoraFileError(
                path, "pickle refused: the file asks to run code or build Python objects that are not tensors, "
                      "so it was not loaded (only weights-only loading is allowed; convert it to .safetensors "
                      f"with a tool you trust). Safe unpickler: {detail}") from None
        raise LoraFileError(path, f"pickle refused: the safe weights-only unpickler could not read it "
                                  f"(damaged, or not plain tensors): {detail}") from None
    except (RuntimeError, EOFError, OSError, ValueError, zipfile.BadZipFile) as e:
        raise LoraFileError(path, f"not a readable PyTorch file (damaged or truncated?): {e}") from None

    if not isinstance(payload, dict):
        raise LoraFileError(path, f"expected a dict of tensors, found a {type(payload).__name__}")
    state_dict = payload.get("state_dict", payload)
    if not isinstance(state_dict, dict):
        raise LoraFileError(path, f"'state_dict' is a {type(state_dict).__name__}, expected a dict of tensors")
    for key, value in state_dict.items():
        if not isinstance(key, str):
            raise LoraFileError(path, f"key {key!r} is a {type(key).__name__}, expected a string")
        if not isinstance(value, torch.Tensor):
            raise LoraFileError(path, f"key '{key}' holds a {type(value).__name__}, not a tensor")
    return dict(state_dict)


def open_lora(path: str | os.PathLike) -> LoraFile:
    """Open a .safetensors (lazily) or .pt/.ckpt (weights-only) LoRA file; use it as a context manager."""
    path = Path(path)
    if _suffix(path) == SAFETENSORS_SUFFIX:
        return _SafetensorsFile(path)
    return _PickleFile(path)


# ---------------------------------------------------------------------------------------------
# Hashes (A1111-compatible)
# ---------------------------------------------------------------------------------------------

def _sha256_from(path: Path, offset: int) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        file.seek(offset)
        for chunk in iter(lambda: file.read(HASH_CHUNK_BYTES), b""):
            digest.update(chunk)
    return digest.hexdigest()


def file_sha256(path: str | os.PathLike) -> str:
    """sha256 of the whole file (A1111's hash for .pt/.ckpt)."""
    path = Path(path)
    _file_size(path)
    return _sha256_from(path, 0)


def addnet_hash(path: str | os.PathLike) -> str:
    """sha256 of a .safetensors file's data section (the bytes after 8 + header length): metadata edits keep it."""
    path = Path(path)
    if _suffix(path) != SAFETENSORS_SUFFIX:
        raise LoraFileError(path, "the addnet hash is defined for .safetensors only; use model_hash")
    size = _file_size(path)
    with open(path, "rb") as file:
        length = _read_header_length(path, file, size)
    return _sha256_from(path, 8 + length)


def model_hash(path: str | os.PathLike) -> str:
    """The hash A1111 shows for a LoRA: addnet hash for .safetensors, whole-file sha256 for .pt/.ckpt."""
    path = Path(path)
    return addnet_hash(path) if _suffix(path) == SAFETENSORS_SUFFIX else file_sha256(path)


# ---------------------------------------------------------------------------------------------
# Writing
# ---------------------------------------------------------------------------------------------

def _prepare_for_saving(path: Path, tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """CPU, contiguous, finite, and no two tensors sharing storage (safetensors refuses shared storage)."""
    prepared: dict[str, torch.Tensor] = {}
    seen_storages: set[int] = set()
    for key, tensor in tensors.items():
        if not isinstance(key, str) or not isinstance(tensor, torch.Tensor):
            raise LoraFileError(path, f"cannot save key {key!r}: expected a string key and a tensor value")
        tensor = tensor.detach().to("cpu").contiguous()
        _check_finite(path, key, tensor)
        storage = tensor.untyped_storage().data_ptr()
        if storage in seen_storages and tensor.numel():
            tensor = tensor.clone()
        seen_storages.add(tensor.untyped_storage().data_ptr())
        prepared[key] = tensor
    return prepared


def save_safetensors(tensors: Mapping[str, torch.Tensor], path: str | os.PathLike,
                     metadata: Mapping[str, str] | None = None, *, overwrite: bool = False) -> Path:
    """Write a .safetensors file atomically: a temp file in the same folder, then a rename.

    Refuses to replace an existing file unless `overwrite`; refuses NaN/Inf tensors (the file would
    not load back). Returns the path written.
    """
    from safetensors.torch import save_file

    path = Path(path)
    if path.suffix.lower() != SAFETENSORS_SUFFIX:
        raise LoraFileError(path, "can only save .safetensors files")
    metadata = dict(metadata or {})
    for key, value in metadata.items():
        if not isinstance(key, str) or not isinstance(value, str):
            raise LoraFileError(path, f"cannot save metadata {key!r}: keys and values must be strings")
    if path.exists() and not overwrite:
        raise LoraFileError(path, "already exists; pass overwrite=True to replace it")
    prepared = _prepare_for_saving(path, tensors)

    fd, tmp_name = temp_file(path.parent, f".{path.stem}.", ".tmp")
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        save_file(prepared, str(tmp), metadata=metadata or None)
        os.chmod(tmp, _new_file_mode())  # safetensors writes a file of its own, private to the owner
        with open(tmp, "rb+") as file:
            os.fsync(file.fileno())
        _move_into_place(tmp, path, overwrite)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def temp_file(folder: str | os.PathLike, prefix: str, suffix: str = "") -> tuple[int, str]:
    """``tempfile.mkstemp`` for a file that will be renamed into place: it gets the permissions a newly created
    file would have (0666 less the umask), not mkstemp's private 0600."""
    fd, name = tempfile.mkstemp(dir=folder, prefix=prefix, suffix=suffix)
    os.fchmod(fd, _new_file_mode())
    return fd, name


def _new_file_mode() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def _move_into_place(tmp: Path, path: Path, overwrite: bool) -> None:
    if overwrite:
        os.replace(tmp, path)
        return
    try:  # a hard link fails if the target exists, closing the race of check-then-rename
        os.link(tmp, path)
    except FileExistsError:
        raise LoraFileError(path, "already exists; pass overwrite=True to replace it") from None
    except OSError:  # file systems without hard links
        if path.exists():
            raise LoraFileError(path, "already exists; pass overwrite=True to replace it") from None
        os.replace(tmp, path)
