"""lora_core.io: header validation, lazy reads, weights-only pickles, hashes, atomic saving."""
from __future__ import annotations

import hashlib
import json
import os
import stat
import struct
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from lora_core import io as lio
from lora_core.blocks import PresetBook
from lora_core.errors import LoraFileError
from lora_core.io import (addnet_hash, file_sha256, model_hash, open_lora, read_metadata,
                          save_safetensors)

METADATA = {"ss_output_name": "my_lora", "ss_network_dim": "4"}


def tiny_tensors() -> dict[str, torch.Tensor]:
    return {
        "a.lora_down.weight": torch.arange(8, dtype=torch.float32).reshape(2, 4),
        "b.lora_up.weight": torch.ones(4, 2, dtype=torch.float16),
        "c.alpha": torch.tensor(2.0),
    }


def write_lora(path: Path, tensors=None, metadata=METADATA) -> Path:
    save_file(tensors if tensors is not None else tiny_tensors(), str(path), metadata=metadata)
    return path


def split_file(path: Path) -> tuple[dict, int, bytes]:
    """(header dict, header length, data section) of a safetensors file, read independently of lora_core."""
    raw = path.read_bytes()
    length = struct.unpack("<Q", raw[:8])[0]
    return json.loads(raw[8:8 + length]), length, raw[8 + length:]


def write_raw(path: Path, header: dict | bytes, data: bytes) -> Path:
    blob = header if isinstance(header, bytes) else json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(blob)) + blob + data)
    return path


def data_region(path: Path, key: str) -> tuple[int, int]:
    """Absolute byte range of tensor `key` in the file."""
    header, length, _ = split_file(path)
    begin, end = header[key]["data_offsets"]
    return 8 + length + begin, 8 + length + end


def overwrite_bytes(path: Path, start: int, payload: bytes) -> None:
    with open(path, "r+b") as f:
        f.seek(start)
        f.write(payload)


NAN_F32 = struct.pack("<f", float("nan"))


# --- reading -------------------------------------------------------------------------------------

def test_safetensors_round_trip(tmp_path):
    path = write_lora(tmp_path / "x.safetensors")
    expected = tiny_tensors()
    with open_lora(path) as lora:
        assert lora.path == path
        assert lora.metadata == METADATA
        assert sorted(lora.keys()) == sorted(expected)
        assert "a.lora_down.weight" in lora and "nope" not in lora
        assert lora.shape("a.lora_down.weight") == (2, 4)
        assert lora.shape("c.alpha") == ()
        assert lora.dtype("b.lora_up.weight") == torch.float16
        got = lora.get_many(["a.lora_down.weight", "b.lora_up.weight"])
        assert list(got) == ["a.lora_down.weight", "b.lora_up.weight"]
        for key, tensor in got.items():
            assert tensor.device.type == "cpu"
            assert torch.equal(tensor, expected[key])
        with pytest.raises(LoraFileError, match="has no tensor 'nope'"):
            lora.get("nope")
    with pytest.raises(ValueError, match="closed"):
        lora.get("c.alpha")


def test_read_metadata_reads_only_the_header(tmp_path):
    path = write_lora(tmp_path / "x.safetensors")
    start, _ = data_region(path, "a.lora_down.weight")
    size = path.stat().st_size
    overwrite_bytes(path, start, b"\xff" * (size - start))  # every tensor byte is now NaN garbage
    assert read_metadata(path) == METADATA
    with open_lora(path) as lora:  # and the data really is garbage: reading a tensor fails
        with pytest.raises(LoraFileError, match="contains NaN"):
            lora.get("a.lora_down.weight")


def test_read_metadata_of_pt_is_empty_without_loading(tmp_path):
    path = tmp_path / "x.pt"
    path.write_bytes(b"not a pickle at all")  # would fail to load: proves it is not loaded
    assert read_metadata(path) == {}


def test_get_reads_only_the_requested_tensor(tmp_path):
    path = write_lora(tmp_path / "x.safetensors")
    with open_lora(path) as lora:
        # Damage tensor a on disk *after* opening: an eager reader would already hold the good values.
        start, end = data_region(path, "a.lora_down.weight")
        overwrite_bytes(path, start, NAN_F32 * ((end - start) // 4))
        assert torch.equal(lora.get("b.lora_up.weight"), tiny_tensors()["b.lora_up.weight"])
        with pytest.raises(LoraFileError, match="'a.lora_down.weight' contains NaN"):
            lora.get("a.lora_down.weight")


def test_returned_tensors_own_their_memory(tmp_path):
    path = write_lora(tmp_path / "x.safetensors")
    with open_lora(path) as lora:
        got = lora.get("a.lora_down.weight")
        start, _ = data_region(path, "a.lora_down.weight")
        overwrite_bytes(path, start, struct.pack("<f", 99.0))  # the file changes under a live tensor
        assert torch.equal(got, tiny_tensors()["a.lora_down.weight"])
        assert lora.get("a.lora_down.weight")[0, 0].item() == 99.0


def test_nan_in_one_tensor_does_not_block_the_others(tmp_path):
    path = write_lora(tmp_path / "x.safetensors")
    start, _ = data_region(path, "a.lora_down.weight")
    overwrite_bytes(path, start, NAN_F32)
    with open_lora(path) as lora:
        assert lora.get("c.alpha").item() == 2.0
        with pytest.raises(LoraFileError) as err:
            lora.get("a.lora_down.weight")
    assert err.value.path == str(path)
    assert "a.lora_down.weight" in err.value.problem and "NaN" in err.value.problem


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("bad, word", [(float("inf"), "Inf"), (float("-inf"), "Inf"), (float("nan"), "NaN")])
def test_non_finite_values_are_named(tmp_path, dtype, bad, word):
    t = torch.zeros(3, 3, dtype=dtype)
    t[1, 2] = bad
    path = write_lora(tmp_path / "x.safetensors", {"layer.weight": t, "ok": torch.ones(2)})
    with open_lora(path) as lora:
        with pytest.raises(LoraFileError, match=f"'layer.weight' contains {word}"):
            lora.get("layer.weight")


def test_large_finite_values_whose_sum_overflows_are_accepted(tmp_path):
    t = torch.full((64,), 60000.0, dtype=torch.float16)  # fp16 sum overflows to inf; every value is finite
    assert not torch.isfinite(t.sum())
    path = write_lora(tmp_path / "x.safetensors", {"big": t})
    with open_lora(path) as lora:
        assert torch.equal(lora.get("big"), t)


def test_fp8_and_integer_tensors(tmp_path):
    fp8 = torch.tensor([1.0, -2.0, 448.0]).to(torch.float8_e4m3fn)
    path = write_lora(tmp_path / "x.safetensors", {"f8": fp8, "i": torch.tensor([1, 2], dtype=torch.int64)})
    with open_lora(path) as lora:
        assert lora.dtype("f8") == torch.float8_e4m3fn
        assert torch.equal(lora.get("f8").float(), fp8.float())
        assert lora.get("i").tolist() == [1, 2]
    bad = fp8.clone()
    bad.view(torch.uint8)[1] = 0x7F  # e4m3fn NaN
    path = write_lora(tmp_path / "y.safetensors", {"f8": bad})
    with open_lora(path) as lora, pytest.raises(LoraFileError, match="'f8' contains NaN"):
        lora.get("f8")


# --- safetensors errors --------------------------------------------------------------------------

def assert_file_error(path: Path, match: str, reader=open_lora) -> LoraFileError:
    with pytest.raises(LoraFileError, match=match) as err:
        reader(path)
    assert err.value.path == str(path)
    return err.value


@pytest.mark.parametrize("reader", [open_lora, read_metadata])
def test_missing_directory_empty(tmp_path, reader):
    assert_file_error(tmp_path / "missing.safetensors", "file not found", reader)
    (tmp_path / "dir.safetensors").mkdir()
    assert_file_error(tmp_path / "dir.safetensors", "is a directory", reader)
    (tmp_path / "empty.safetensors").write_bytes(b"")
    assert_file_error(tmp_path / "empty.safetensors", "empty", reader)
    (tmp_path / "empty.pt").write_bytes(b"")
    assert_file_error(tmp_path / "empty.pt", "empty", reader)


@pytest.mark.parametrize("reader", [open_lora, read_metadata])
def test_unknown_extension(tmp_path, reader):
    path = write_lora(tmp_path / "x.bin")
    assert_file_error(path, r"unknown file type '\.bin'", reader)


def test_too_short_for_a_header(tmp_path):
    path = tmp_path / "x.safetensors"
    path.write_bytes(b"\x10\x00\x00")
    assert_file_error(path, "truncated")


@pytest.mark.parametrize("reader", [open_lora, read_metadata])
def test_header_length_beyond_the_file(tmp_path, reader):
    path = write_lora(tmp_path / "x.safetensors")
    raw = path.read_bytes()
    header_len = struct.unpack("<Q", raw[:8])[0]
    path.write_bytes(raw[:8 + header_len // 2])  # cut inside the header
    assert_file_error(path, f"header length {header_len}", reader)


def test_torch_file_renamed_to_safetensors_gets_a_hint(tmp_path):
    path = tmp_path / "x.safetensors"
    torch.save({"a": torch.ones(2)}, str(path))
    assert_file_error(path, "looks like a PyTorch")


@pytest.mark.parametrize("reader", [open_lora, read_metadata])
def test_data_offsets_beyond_the_file(tmp_path, reader):
    path = write_lora(tmp_path / "x.safetensors")
    raw = path.read_bytes()
    path.write_bytes(raw[:-3])
    assert_file_error(path, "truncated: tensor '.*' needs data up to byte", reader)


def test_bad_json(tmp_path):
    path = write_raw(tmp_path / "x.safetensors", b'{"a": {"dtype": "F32", ', b"")
    assert_file_error(path, "not valid JSON")
    path = write_raw(tmp_path / "y.safetensors", b"\xff\xfe{}", b"")
    assert_file_error(path, "not valid JSON")


def test_header_not_an_object(tmp_path):
    path = write_raw(tmp_path / "x.safetensors", b"[1, 2, 3]", b"")
    assert_file_error(path, "expected a JSON object, got list")


def test_metadata_must_be_str_to_str(tmp_path):
    header = {"__metadata__": {"ss_network_dim": 4}}
    assert_file_error(write_raw(tmp_path / "x.safetensors", header, b""), "metadata 'ss_network_dim' must be a string")
    header = {"__metadata__": ["x"]}
    assert_file_error(write_raw(tmp_path / "y.safetensors", header, b""), "__metadata__ must be an object")


def one_tensor_header(**entry) -> dict:
    base = {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}
    base.update(entry)
    return {"w": base}


@pytest.mark.parametrize("entry, match", [
    ({"dtype": "Q7"}, "'w' has unknown dtype 'Q7'"),
    ({"dtype": None}, "'w' has unknown dtype None"),
    ({"shape": [2, -1]}, "'w' has an invalid shape"),
    ({"shape": "2"}, "'w' has an invalid shape"),
    ({"data_offsets": [8, 0]}, "'w' has invalid data_offsets"),
    ({"data_offsets": [0]}, "'w' has invalid data_offsets"),
    ({"shape": [3]}, r"'w' has shape \[3\] of F32 \(12 bytes\) but data_offsets span 8 bytes"),
    ({"dtype": "F16"}, r"'w' has shape \[2\] of F16 \(4 bytes\) but data_offsets span 8 bytes"),
])
def test_bad_tensor_entries(tmp_path, entry, match):
    path = write_raw(tmp_path / "x.safetensors", one_tensor_header(**entry), b"\x00" * 8)
    assert_file_error(path, match)
    assert_file_error(path, match, read_metadata)


def test_entry_not_an_object(tmp_path):
    path = write_raw(tmp_path / "x.safetensors", {"w": [1, 2]}, b"")
    assert_file_error(path, "'w' is not described by an object")


def test_gap_overlap_and_trailing_bytes(tmp_path):
    f32x2 = {"dtype": "F32", "shape": [2]}
    gap = {"a": {**f32x2, "data_offsets": [0, 8]}, "b": {**f32x2, "data_offsets": [12, 20]}}
    assert_file_error(write_raw(tmp_path / "gap.safetensors", gap, b"\x00" * 20), "'b' leaves a gap")
    overlap = {"a": {**f32x2, "data_offsets": [0, 8]}, "b": {**f32x2, "data_offsets": [4, 12]}}
    assert_file_error(write_raw(tmp_path / "ov.safetensors", overlap, b"\x00" * 12), "'b' overlaps")
    trailing = {"a": {**f32x2, "data_offsets": [0, 8]}}
    assert_file_error(write_raw(tmp_path / "tr.safetensors", trailing, b"\x00" * 11), "3 unexpected bytes")


def test_hand_written_valid_file_reads(tmp_path):
    """The validator accepts what it should: out-of-order keys, a zero-size tensor, no metadata."""
    header = {"b": {"dtype": "F32", "shape": [1], "data_offsets": [4, 8]},
              "a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]},
              "empty": {"dtype": "F16", "shape": [0, 3], "data_offsets": [8, 8]}}
    path = write_raw(tmp_path / "x.safetensors", header, struct.pack("<ff", 1.5, -2.5))
    assert read_metadata(path) == {}
    with open_lora(path) as lora:
        assert lora.get("a").item() == 1.5 and lora.get("b").item() == -2.5
        assert lora.shape("empty") == (0, 3)


# --- .pt / .ckpt ---------------------------------------------------------------------------------

@pytest.mark.parametrize("suffix", [".pt", ".ckpt", ".PT"])
@pytest.mark.parametrize("zip_format", [True, False])
def test_pt_flat_dict(tmp_path, suffix, zip_format):
    path = tmp_path / f"x{suffix}"
    torch.save(tiny_tensors(), str(path), _use_new_zipfile_serialization=zip_format)
    with open_lora(path) as lora:
        assert lora.metadata == {}
        assert sorted(lora.keys()) == sorted(tiny_tensors())
        assert lora.shape("a.lora_down.weight") == (2, 4)
        assert lora.dtype("b.lora_up.weight") == torch.float16
        assert torch.equal(lora.get("a.lora_down.weight"), tiny_tensors()["a.lora_down.weight"])


def test_pt_loads_when_the_host_has_replaced_torch_load(tmp_path, monkeypatch):
    """A1111 sets ``torch.load = modules.safe.load``, whose own unpickler refuses what torch 2.x writes and returns
    None (in the WebUI: 'expected a dict of tensors, found a NoneType'); the library does not go through it."""
    path = tmp_path / "x.pt"
    torch.save(tiny_tensors(), str(path))
    monkeypatch.setattr(torch, "load", lambda *args, **kwargs: None)
    with open_lora(path) as lora:
        assert sorted(lora.keys()) == sorted(tiny_tensors())


def test_pt_nested_state_dict(tmp_path):
    path = tmp_path / "x.ckpt"
    torch.save({"state_dict": tiny_tensors(), "global_step": 10}, str(path))
    with open_lora(path) as lora:
        assert sorted(lora.keys()) == sorted(tiny_tensors())


def test_pt_nan_is_named(tmp_path):
    path = tmp_path / "x.pt"
    torch.save({"w": torch.tensor([1.0, float("inf")])}, str(path))
    with open_lora(path) as lora, pytest.raises(LoraFileError, match="'w' contains Inf"):
        lora.get("w")


@pytest.mark.parametrize("payload, match", [
    ({"a": torch.ones(1), "b": "hello"}, "key 'b' holds a str, not a tensor"),
    ({"a": torch.ones(1), "b": [torch.ones(1)]}, "key 'b' holds a list"),
    ({"a": {"inner": torch.ones(1)}}, "key 'a' holds a dict"),
    ({"state_dict": {"a": torch.ones(1), "n": 3}}, "key 'n' holds a int"),
    ({"state_dict": [torch.ones(1)]}, "'state_dict' is a list"),
    ({1: torch.ones(1)}, "key 1 is a int"),
    ([torch.ones(1)], "expected a dict of tensors, found a list"),
    ("just a string", "found a str"),
])
def test_pt_non_tensor_payloads(tmp_path, payload, match):
    path = tmp_path / "x.pt"
    torch.save(payload, str(path))
    assert_file_error(path, match)


class _CodeRunner:
    """A pickle payload that creates a marker file when unpickled without restrictions."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return open, (str(self.marker), "w")


@pytest.mark.parametrize("zip_format", [True, False])
def test_pickle_that_runs_code_is_refused(tmp_path, zip_format):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    torch.save({"w": torch.ones(2), "x": _CodeRunner(marker)}, str(path), _use_new_zipfile_serialization=zip_format)
    err = assert_file_error(path, "pickle refused")
    assert "run code" in err.problem
    assert not marker.exists()

    # Control: the payload is real; an unrestricted load does run it.
    control = tmp_path / "control"
    torch.save({"x": _CodeRunner(control)}, str(tmp_path / "control.pt"))
    torch.load(str(tmp_path / "control.pt"), weights_only=False)
    assert control.exists()


def test_damaged_pt(tmp_path):
    path = tmp_path / "x.pt"
    torch.save(tiny_tensors(), str(path))
    raw = path.read_bytes()
    path.write_bytes(raw[: len(raw) // 2])
    assert_file_error(path, "not a readable PyTorch file")
    path.write_bytes(b"\x80\x02" + b"garbage" * 10)
    assert_file_error(path, "pickle refused|not a readable PyTorch file")


# --- hashes --------------------------------------------------------------------------------------

def test_addnet_hash_is_sha256_of_the_data_section(tmp_path):
    big = {"w": torch.randn(700, 1000)}  # 2.8 MB: several 1 MiB chunks
    path = write_lora(tmp_path / "x.safetensors", big)
    _, _, data = split_file(path)
    expected = hashlib.sha256(data).hexdigest()
    assert addnet_hash(path) == expected
    assert model_hash(path) == expected
    assert file_sha256(path) == hashlib.sha256(path.read_bytes()).hexdigest() != expected


def test_addnet_hash_ignores_metadata_edits(tmp_path):
    a = write_lora(tmp_path / "a.safetensors", metadata={"ss_output_name": "one"})
    b = write_lora(tmp_path / "b.safetensors", metadata={"ss_output_name": "two", "extra": "x" * 100})
    assert addnet_hash(a) == addnet_hash(b)
    assert file_sha256(a) != file_sha256(b)


def test_hash_chunking_does_not_change_the_result(tmp_path, monkeypatch):
    path = write_lora(tmp_path / "x.safetensors")
    whole = addnet_hash(path)
    monkeypatch.setattr(lio, "HASH_CHUNK_BYTES", 7)
    assert addnet_hash(path) == whole


def test_model_hash_of_pt_is_the_whole_file(tmp_path):
    path = tmp_path / "x.pt"
    torch.save(tiny_tensors(), str(path))
    assert model_hash(path) == hashlib.sha256(path.read_bytes()).hexdigest()
    assert_file_error(path, "safetensors only", addnet_hash)


def test_hash_errors(tmp_path):
    assert_file_error(tmp_path / "missing.safetensors", "file not found", model_hash)
    assert_file_error(tmp_path / "missing.pt", "file not found", model_hash)
    path = tmp_path / "x.safetensors"
    path.write_bytes(struct.pack("<Q", 1000) + b"{}")
    assert_file_error(path, "header length 1000", addnet_hash)


# --- saving --------------------------------------------------------------------------------------

def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.endswith(".tmp"))


def test_save_round_trip(tmp_path):
    path = tmp_path / "out.safetensors"
    assert save_safetensors(tiny_tensors(), path, {"k": "v"}) == path
    assert read_metadata(path) == {"k": "v"}
    with open_lora(path) as lora:
        for key, tensor in tiny_tensors().items():
            assert torch.equal(lora.get(key), tensor)
    assert leftovers(tmp_path) == []


def test_saved_files_get_the_usual_permissions_not_private_ones(tmp_path):
    """The temporary file renamed into place is made by mkstemp (0600): the result must be 0666 less the umask,
    as any file the WebUI writes, so a shared models folder stays readable."""
    old = os.umask(0o022)
    try:
        path = save_safetensors(tiny_tensors(), tmp_path / "out.safetensors")
        PresetBook.default().save(tmp_path / "presets.txt")
    finally:
        os.umask(old)
    assert stat.S_IMODE(path.stat().st_mode) == 0o644
    assert stat.S_IMODE((tmp_path / "presets.txt").stat().st_mode) == 0o644


def test_save_refuses_to_overwrite(tmp_path):
    path = tmp_path / "out.safetensors"
    save_safetensors({"w": torch.ones(2)}, path)
    before = path.read_bytes()
    with pytest.raises(LoraFileError, match="already exists"):
        save_safetensors({"w": torch.zeros(2)}, path)
    assert path.read_bytes() == before
    save_safetensors({"w": torch.zeros(2)}, path, overwrite=True)
    with open_lora(path) as lora:
        assert torch.equal(lora.get("w"), torch.zeros(2))
    assert leftovers(tmp_path) == []


def test_save_failure_leaves_no_file(tmp_path, monkeypatch):
    import safetensors.torch

    def half_write(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"\x00" * 10)
        raise OSError("disk full")

    monkeypatch.setattr(safetensors.torch, "save_file", half_write)
    path = tmp_path / "out.safetensors"
    with pytest.raises(OSError, match="disk full"):
        save_safetensors({"w": torch.ones(2)}, path)
    assert not path.exists()
    assert list(tmp_path.iterdir()) == []


def test_save_refuses_bad_input(tmp_path):
    with pytest.raises(LoraFileError, match="'w' contains NaN"):
        save_safetensors({"w": torch.tensor([float("nan")])}, tmp_path / "a.safetensors")
    with pytest.raises(LoraFileError, match="only save .safetensors"):
        save_safetensors({"w": torch.ones(1)}, tmp_path / "a.pt")
    with pytest.raises(LoraFileError, match="must be strings"):
        save_safetensors({"w": torch.ones(1)}, tmp_path / "a.safetensors", {"dim": 4})
    with pytest.raises(LoraFileError, match="expected a string key and a tensor"):
        save_safetensors({"w": [1.0]}, tmp_path / "a.safetensors")
    assert list(tmp_path.iterdir()) == []


def test_save_handles_shared_and_non_contiguous_tensors(tmp_path):
    base = torch.arange(12, dtype=torch.float32).reshape(3, 4)
    tensors = {"t": base.t(), "first": base[0], "same": base}
    path = save_safetensors(tensors, tmp_path / "out.safetensors")
    with open_lora(path) as lora:
        for key, tensor in tensors.items():
            assert torch.equal(lora.get(key), tensor)


def test_lora_core_io_imports_nothing_from_a1111():
    source = Path(lio.__file__).read_text()
    assert "from modules" not in source and "import modules" not in source
    assert os.path.basename(lio.__file__) == "io.py"
