"""Checkpoints as files: their layers named as the live model's, read and written one tensor at a time.

**The index.** A checkpoint's state-dict keys are the live model's parameter names without A1111's ``.wrapped``
(``model.diffusion_model.*``, ``cond_stage_model.transformer.text_model.*`` (SD1),
``cond_stage_model.model.transformer.resblocks.*`` (SD2, q/k/v in ``attn.in_proj_weight``),
``conditioner.embedders.0.transformer.*`` / ``conditioner.embedders.1.model.*`` (SDXL)). :class:`CheckpointIndex`
builds a skeleton of ``nn.Module`` s on the ``meta`` device from the key list alone (no weight is read or
allocated) and is a :class:`~lora_core.model_index.ModelIndex` over it, so the very code that maps a LoRA onto the
live model (``keymap.map_keys``, ``network.load_network``, ``blocks.block_of``) maps it onto the file. Layer types
come from the keys: ``in_proj_weight`` -> MultiheadAttention, a 4-d weight -> Conv2d, 2-d -> Linear (``*embedding``
-> Embedding), 1-d -> GroupNorm in the UNet outside its transformer blocks, else LayerNorm. Only these types and
the names matter to the mapping; strides, heads and group counts are not known and not needed (merging uses
``delta_weight``, not the layer's forward).

**Reading** (:class:`CheckpointReader`): ``.safetensors`` tensors are read with plain reads at their offsets, not
memory-mapped, so what was read stays in the OS page cache and not in this process's resident memory;
``.pt``/``.ckpt`` go through ``io.open_lora`` (weights-only unpickler).

**Writing** (:class:`StreamingWriter`): ``safetensors.save_file`` needs every tensor in memory at once; this writer
lays out the header first (shapes and dtypes are known before any value is computed), then takes the tensors one
by one, so a merge holds about one tensor, not one model. The layout is the one ``safetensors`` itself writes
(tensor order: dtype then name; compact JSON header padded to 8 bytes), so the data section, and with it the
hash, is the same; only the order of metadata keys may differ (safetensors keeps them in a hash map). ``sshs_model_hash``
(sha256 of the data section, i.e. ``io.addnet_hash`` of the result) is hashed on the fly and written into a
fixed-width placeholder of the header at the end; ``sshs_legacy_hash`` is sd-scripts' (the 64 KiB at 1 MiB of the
file as serialised with only the ``ss_*`` metadata, first 8 hex digits). The file goes to a temporary name in the
target folder, is fsynced, and is renamed into place (as ``io.save_safetensors`` does).
"""
from __future__ import annotations

import hashlib
import json
import os
import sys
from contextlib import contextmanager
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import BinaryIO, Callable, Iterator, Mapping, Sequence

import torch
from torch import nn

from ..blocks import OTHER, block_of
from ..errors import LoraFileError
# io's validated header parser, finite check and no-clobber rename: one implementation of each
from ..io import (SAFETENSORS_SUFFIX, _check_finite, _move_into_place, _parse_header, _torch_dtype, open_lora,
                  temp_file)
from ..keymap import parse_key
from ..model_index import MHA_PARTS, ModelIndex, Target
from .checks import check_output, require_result_finite
from .common import require_file

#: the families the tools read checkpoints of (the refiner's and SD3's are not read here)
TOOL_FAMILIES = ("sd1", "sd2", "sdxl")

COMPONENT_ROOTS = ("model.diffusion_model.", "cond_stage_model.", "conditioner.embedders.")
LEGACY_HASH_OFFSET = 0x100000
LEGACY_HASH_LENGTH = 0x10000
MODEL_HASH_KEY = "sshs_model_hash"
LEGACY_HASH_KEY = "sshs_legacy_hash"


# --------------------------------------------------------------------------------------------- the index

def _is_group_norm(module: str) -> bool:
    return module.startswith("model.diffusion_model.") and ".transformer_blocks." not in module


def _leaf(module: str, params: Mapping[str, tuple[int, ...]]) -> nn.Module | None:
    """The layer a module's parameter shapes describe, on the meta device; None for a plain container."""
    if "in_proj_weight" in params:
        dim = params["in_proj_weight"][1]
        return nn.MultiheadAttention(dim, 1, bias="in_proj_bias" in params, device="meta")
    shape = params.get("weight")
    if shape is None:
        return None
    bias = "bias" in params
    if len(shape) == 4:
        return nn.Conv2d(shape[1], shape[0], tuple(shape[2:]), bias=bias, device="meta")
    if len(shape) == 2:
        if module.rsplit(".", 1)[-1].endswith("embedding"):
            return nn.Embedding(shape[0], shape[1], device="meta")
        return nn.Linear(shape[1], shape[0], bias=bias, device="meta")
    if len(shape) == 1:
        if _is_group_norm(module):
            return nn.GroupNorm(1, shape[0], device="meta")
        return nn.LayerNorm(shape[0], device="meta")
    return None


def skeleton(shapes: Mapping[str, Sequence[int]]) -> nn.Module:
    """A module tree on the meta device with the layers that the keys under :data:`COMPONENT_ROOTS` describe."""
    params: dict[str, dict[str, tuple[int, ...]]] = {}
    for key, shape in shapes.items():
        if key.startswith(COMPONENT_ROOTS) and "." in key:
            module, _, name = key.rpartition(".")
            params.setdefault(module, {})[name] = tuple(shape)
    attentions = {m for m, p in params.items() if "in_proj_weight" in p}
    root = nn.Module()
    for module in sorted(params):
        if module.endswith(".out_proj") and module[: -len(".out_proj")] in attentions:
            continue  # MultiheadAttention makes its own out_proj
        leaf = _leaf(module, params[module])
        if leaf is None:
            continue
        parent = root
        *path, name = module.split(".")
        for part in path:
            child = parent._modules.get(part)
            if child is None:
                child = nn.Module()
                parent.add_module(part, child)
            parent = child
        parent.add_module(name, leaf)
    return root


@dataclass(frozen=True)
class TensorSlice:
    """A checkpoint tensor, or the rows of it that a target owns (q/k/v of ``in_proj_weight``)."""

    key: str
    rows: slice | None = None

    def of(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor if self.rows is None else tensor[self.rows]


class CheckpointIndex(ModelIndex):
    """A :class:`ModelIndex` over a checkpoint's keys (see the module docstring); no weight is read."""

    def __init__(self, shapes: Mapping[str, Sequence[int]]):
        self.shapes = {k: tuple(v) for k, v in shapes.items()}
        super().__init__(skeleton(self.shapes))

    def _mha_slices(self, target: Target, weight: str, bias: str) -> tuple[TensorSlice, TensorSlice]:
        if target.part == "out":
            return TensorSlice(f"{target.module}.out_proj.weight"), TensorSlice(f"{target.module}.out_proj.bias")
        dim = self.modules[target.module].embed_dim
        i = MHA_PARTS.index(target.part)
        rows = slice(i * dim, (i + 1) * dim)
        return TensorSlice(f"{target.module}.{weight}", rows), TensorSlice(f"{target.module}.{bias}", rows)

    def weight_key(self, target: Target) -> TensorSlice:
        if target.part is not None:
            return self._mha_slices(target, "in_proj_weight", "in_proj_bias")[0]
        return TensorSlice(f"{target.module}.weight")

    def bias_key(self, target: Target) -> TensorSlice | None:
        """The bias of a target, or None when the checkpoint has none."""
        found = (self._mha_slices(target, "in_proj_weight", "in_proj_bias")[1] if target.part is not None
                 else TensorSlice(f"{target.module}.bias"))
        return found if found.key in self.shapes else None

    def block_of_key(self, key: str) -> str | None:
        """The block (BASE, IN00.., M00, OUT.., OTHER) of any checkpoint key; None outside the UNet and encoders."""
        module = key.rpartition(".")[0]
        while module:
            if module in self.modules:
                return block_of(self, Target(module))
            module = module.rpartition(".")[0]
        for component in self.components:
            if key.startswith(component.prefix):
                return "BASE" if component.kind == "te" else OTHER
        return None


# --------------------------------------------------------------------------------------------- reading

class CheckpointReader:
    """A checkpoint opened to read one tensor at a time (see the module docstring). A context manager."""

    def __init__(self, path: str | os.PathLike):
        self.path = require_file(path, "checkpoint")
        self._file: BinaryIO | None = None
        self._pickle = None
        self._index: CheckpointIndex | None = None
        if self.path.suffix.lower() == SAFETENSORS_SUFFIX:
            header = _parse_header(self.path)
            self.metadata = header.metadata
            self._entries = header.tensors
            self._data_start = 8 + header.length
            self._file = open(self.path, "rb")
        else:
            self._pickle = open_lora(self.path)
            self.metadata = {}

    def keys(self) -> list[str]:
        return list(self._entries) if self._pickle is None else self._pickle.keys()

    def __contains__(self, key: object) -> bool:
        return key in (self._entries if self._pickle is None else self._pickle)

    def shape(self, key: str) -> tuple[int, ...]:
        return self._entries[key][1] if self._pickle is None else self._pickle.shape(key)

    def dtype(self, key: str) -> torch.dtype:
        return _torch_dtype(self._entries[key][0]) if self._pickle is None else self._pickle.dtype(key)

    def shapes(self) -> dict[str, tuple[int, ...]]:
        return {key: self.shape(key) for key in self.keys()}

    @property
    def index(self) -> CheckpointIndex:
        if self._index is None:
            self._index = CheckpointIndex(self.shapes())
        return self._index

    @property
    def family(self) -> str:
        return self.index.family

    def require_model(self, role: str) -> str:
        """The family of this file, when it is an SD1, SD2 or SDXL checkpoint; else a LoraFileError naming the file
        and what it is instead. ``role`` says what the tool wanted it for ('the base', 'B of add-difference')."""
        if self.family in TOOL_FAMILIES:
            return self.family
        keys = self.keys()
        if not keys:
            raise LoraFileError(self.path, f"holds no tensors; {role} must be an SD1, SD2 or SDXL checkpoint")
        lora_key = next((key for key in keys if parse_key(key) is not None), None)
        if lora_key is not None:
            raise LoraFileError(self.path, f"is a LoRA (e.g. '{lora_key}'), not a checkpoint; {role} must be "
                                           "an SD1, SD2 or SDXL checkpoint")
        raise LoraFileError(self.path, f"is not an SD1, SD2 or SDXL checkpoint: none of its {len(keys)} keys is a "
                                       f"UNet or text-encoder weight (e.g. '{keys[0]}'); {role} must be one")

    def get(self, key: str) -> torch.Tensor:
        """The tensor ``key`` on the CPU (its own memory), checked to be finite."""
        if self._pickle is not None:
            return self._pickle.get(key)
        if key not in self._entries:
            raise LoraFileError(self.path, f"has no tensor '{key}'")
        dtype_name, shape, begin, end = self._entries[key]
        buffer = torch.empty(end - begin, dtype=torch.uint8)
        self._file.seek(self._data_start + begin)
        if self._file.readinto(memoryview(buffer.numpy())) != end - begin:
            raise LoraFileError(self.path, f"truncated while reading tensor '{key}'")
        tensor = buffer.view(_torch_dtype(dtype_name)).reshape(shape)
        _check_finite(self.path, key, tensor)
        return tensor

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._pickle is not None:
            self._pickle.close()

    def __enter__(self) -> "CheckpointReader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# --------------------------------------------------------------------------------------------- writing

_DTYPE_NAMES = {dtype: name for name in ("F64", "F32", "F16", "BF16", "I64", "I32", "I16", "I8", "U8", "BOOL")
                if (dtype := _torch_dtype(name)) is not None}


def dtype_name(dtype: torch.dtype) -> str:
    try:
        return _DTYPE_NAMES[dtype]
    except KeyError:
        raise ValueError(f"cannot write tensors of dtype {dtype}") from None


@lru_cache(maxsize=1)
def _dtype_rank() -> dict[str, int]:
    """The order in which safetensors lays out dtypes, read from a file it writes (robust to its versions)."""
    from safetensors.torch import save

    raw = save({name: torch.zeros(1, dtype=dtype) for dtype, name in _DTYPE_NAMES.items()})
    header = json.loads(raw[8:8 + int.from_bytes(raw[:8], "little")])
    return {name: rank for rank, name in enumerate(k for k in header if k != "__metadata__")}


def safetensors_order(specs: Mapping[str, tuple[torch.dtype, tuple[int, ...]]]) -> list[str]:
    rank = _dtype_rank()
    return sorted(specs, key=lambda key: (rank[dtype_name(specs[key][0])], key))


def _nbytes(dtype: torch.dtype, shape: Sequence[int]) -> int:
    n = dtype.itemsize
    for s in shape:
        n *= s
    return n


def header_bytes(specs: Mapping[str, tuple[torch.dtype, tuple[int, ...]]], order: Sequence[str],
                 metadata: Mapping[str, str] | None) -> bytes:
    """The 8-byte length and the JSON header safetensors writes for these tensors, in ``order``."""
    header: dict[str, object] = {} if metadata is None else {"__metadata__": dict(metadata)}
    offset = 0
    for key in order:
        dtype, shape = specs[key]
        end = offset + _nbytes(dtype, shape)
        header[key] = {"dtype": dtype_name(dtype), "shape": list(shape), "data_offsets": [offset, end]}
        offset = end
    raw = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    raw += b" " * (-len(raw) % 8)
    return len(raw).to_bytes(8, "little") + raw


def ss_metadata(metadata: Mapping[str, str]) -> dict[str, str]:
    """The metadata sd-scripts hashes with: its training keys only (user metadata may change later)."""
    return {k: v for k, v in metadata.items() if k.startswith("ss_")}


class _Hashes:
    """sha256 of the data section, and sd-scripts' legacy window, fed the data bytes in file order."""

    def __init__(self, legacy_header: bytes):
        self.model = hashlib.sha256()
        self._legacy = bytearray(legacy_header[LEGACY_HASH_OFFSET:LEGACY_HASH_OFFSET + LEGACY_HASH_LENGTH])
        self._window = (LEGACY_HASH_OFFSET - len(legacy_header), LEGACY_HASH_OFFSET + LEGACY_HASH_LENGTH
                        - len(legacy_header))
        self._position = 0

    def update(self, data: memoryview) -> None:
        self.model.update(data)
        lo, hi = max(self._window[0], self._position), min(self._window[1], self._position + len(data))
        if lo < hi:
            self._legacy += data[lo - self._position:hi - self._position]
        self._position += len(data)

    def result(self) -> tuple[str, str]:
        return self.model.hexdigest(), hashlib.sha256(self._legacy).hexdigest()[:8]


def _tensor_bytes(tensor: torch.Tensor) -> memoryview:
    flat = tensor.detach().to("cpu").contiguous().reshape(-1)
    return memoryview(flat.view(torch.uint8).numpy()) if flat.numel() else memoryview(b"")


def tensor_hashes(tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str]) -> tuple[str, str]:
    """(sshs_model_hash, sshs_legacy_hash) of these tensors as safetensors saves them, without writing a file."""
    specs = {k: (t.dtype, tuple(t.shape)) for k, t in tensors.items()}
    order = safetensors_order(specs)
    hashes = _Hashes(header_bytes(specs, order, ss_metadata(metadata)))
    for key in order:
        hashes.update(_tensor_bytes(tensors[key]))
    return hashes.result()


def with_hashes(tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str]) -> dict[str, str]:
    """``metadata`` plus ``sshs_model_hash`` and ``sshs_legacy_hash`` of ``tensors``."""
    model_hash, legacy_hash = tensor_hashes(tensors, metadata)
    return {**metadata, MODEL_HASH_KEY: model_hash, LEGACY_HASH_KEY: legacy_hash}


class StreamingWriter:
    """Writes one .safetensors file from tensors given one at a time, in :attr:`order` (module docstring)."""

    def __init__(self, path: str | os.PathLike, specs: Mapping[str, tuple[torch.dtype, Sequence[int]]],
                 metadata: Mapping[str, str] | None = None, *, overwrite: bool = False):
        if sys.byteorder != "little":
            raise RuntimeError("safetensors files are little-endian; this machine is not")
        self.path = check_output(path, overwrite)
        self.overwrite = overwrite
        self.specs = {k: (dtype, tuple(shape)) for k, (dtype, shape) in specs.items()}
        self.order = safetensors_order(self.specs)
        metadata = {k: v for k, v in (metadata or {}).items() if k not in (MODEL_HASH_KEY, LEGACY_HASH_KEY)}
        legacy_header = header_bytes(self.specs, self.order, ss_metadata(metadata))
        metadata[MODEL_HASH_KEY], metadata[LEGACY_HASH_KEY] = "0" * 64, "0" * 8  # placeholders, same width
        self._header = header_bytes(self.specs, self.order, metadata)
        self._hashes = _Hashes(legacy_header)
        self._next = 0
        with self._writing():
            fd, name = temp_file(self.path.parent, f".{self.path.stem}.", ".tmp")
        self._tmp = Path(name)
        self._file = os.fdopen(fd, "wb")
        try:
            with self._writing():
                self._file.write(self._header)
        except LoraFileError:
            self.abort()
            raise

    @property
    def remaining(self) -> list[str]:
        return self.order[self._next:]

    def write(self, key: str, tensor: torch.Tensor) -> None:
        """Append the next tensor; it must be ``order[i]`` with the dtype and shape announced, and finite."""
        expected = self.order[self._next] if self._next < len(self.order) else None
        if key != expected:
            raise ValueError(f"tensors must be written in order: expected '{expected}', got '{key}'")
        dtype, shape = self.specs[key]
        if tensor.dtype != dtype or tuple(tensor.shape) != shape:
            raise ValueError(f"'{key}': announced {dtype} {shape}, got {tensor.dtype} {tuple(tensor.shape)}")
        require_result_finite(key, tensor)
        data = _tensor_bytes(tensor)
        with self._writing():
            self._file.write(data)
        self._hashes.update(data)
        self._next += 1

    @contextmanager
    def _writing(self) -> Iterator[None]:
        """An OSError of the file system (disk full...) names the output, not the temporary file."""
        try:
            yield
        except OSError as error:
            raise LoraFileError(self.path, f"could not be written ({error.strerror or error})") from None

    def finish(self) -> tuple[str, str]:
        """Fill in the hashes, fsync and rename into place; returns (sshs_model_hash, sshs_legacy_hash)."""
        if self.remaining:
            raise ValueError(f"{len(self.remaining)} tensors were not written (e.g. '{self.remaining[0]}')")
        model_hash, legacy_hash = self._hashes.result()
        with self._writing():
            for key, value in ((MODEL_HASH_KEY, model_hash), (LEGACY_HASH_KEY, legacy_hash)):
                marker = json.dumps(key).encode() + b':"'
                position = self._header.index(marker) + len(marker)
                self._file.seek(position)
                self._file.write(value.encode())
            self._file.flush()
            os.fsync(self._file.fileno())
            self._file.close()
            try:
                _move_into_place(self._tmp, self.path, self.overwrite)
            finally:
                self._tmp.unlink(missing_ok=True)
        return model_hash, legacy_hash

    def abort(self) -> None:
        if not self._file.closed:
            self._file.close()
        self._tmp.unlink(missing_ok=True)

    def __enter__(self) -> "StreamingWriter":
        return self

    def __exit__(self, exc_type, *exc) -> None:
        if exc_type is not None or not self._file.closed:
            self.abort()


def all_specs(reader: CheckpointReader, dtype_for: Callable[[torch.dtype], torch.dtype]) -> dict[str, tuple[torch.dtype, tuple[int, ...]]]:
    """Output specs for every tensor of ``reader``: ``dtype_for(input dtype)`` and the same shape."""
    return {key: (dtype_for(reader.dtype(key)), reader.shape(key)) for key in reader.keys()}


def save_dtype_for(save_dtype: torch.dtype | None) -> Callable[[torch.dtype], torch.dtype]:
    """Floating tensors become ``save_dtype`` (None: unchanged); other tensors keep theirs."""
    return lambda dtype: save_dtype if save_dtype is not None and dtype.is_floating_point else dtype
