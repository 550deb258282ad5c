"""Loading a file onto a model: everything is accounted for, and every bad input is a clear, typed error that
leaves the model bit for bit as it was."""
from __future__ import annotations

import os
import pickle

import pytest
import torch
from safetensors.torch import save_file

from lora_core.errors import FamilyMismatchError, KeyMappingError, LoraError, LoraFileError
from lora_core.model_index import ModelIndex
from lora_core.network import load_network
from lora_factory import LoraSpec, kohya_name_of, make_kohya_lora, pick_targets
from test_patch_property import assert_bitwise, snapshot


@pytest.fixture
def sd1(fresh_sd1):
    return fresh_sd1, ModelIndex(fresh_sd1), snapshot(fresh_sd1)


def write(path, tensors, metadata=None):
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path), metadata=metadata)
    return path


def test_every_key_is_accounted_for(sd1, tmp_path):
    root, index, original = sd1
    targets = pick_targets(index, limit_per_kind=3)
    sd = make_kohya_lora(index, targets)
    real = kohya_name_of(index, targets[0])
    sd["lora_unet_no_such_block_0_proj.lora_up.weight"] = torch.zeros(4, 4)
    sd["something_else.weight"] = torch.zeros(2)
    sd[f"{real}.weird_extra"] = torch.zeros(1)
    net = load_network(write(tmp_path / "x.safetensors", sd), index)
    report = net.report
    assert report.total == len(sd)
    assert report.unmatched == ["lora_unet_no_such_block_0_proj.lora_up.weight"]
    assert report.unknown == ["something_else.weight"]
    assert report.unused == [f"{real}.weird_extra"]
    assert len(net.adapters) == len(targets)
    assert "1 unknown" in report.summary() and "1 matched no layer" in report.summary()
    assert_bitwise(root, original)


def test_shape_mismatch_skips_that_layer_and_says_so(sd1, tmp_path):
    root, index, original = sd1
    targets = pick_targets(index, limit_per_kind=2)
    sd = make_kohya_lora(index, targets)
    bad = kohya_name_of(index, targets[0])
    sd[f"{bad}.lora_down.weight"] = torch.randn(4, 7)  # wrong input width
    net = load_network(write(tmp_path / "x.safetensors", sd), index)
    assert targets[0] not in net.adapters and len(net.adapters) == len(targets) - 1
    (layer, message), = net.report.problems.items()
    assert layer == str(targets[0])
    assert "shape" in message and "7" in message
    assert_bitwise(root, original)


def test_unknown_algorithm_is_reported_with_the_supported_list(sd1, tmp_path):
    root, index, original = sd1
    targets = pick_targets(index, limit_per_kind=1)
    sd = make_kohya_lora(index, targets)
    name = kohya_name_of(index, targets[0])
    for k in [k for k in sd if k.startswith(name + ".")]:
        del sd[k]
    sd[f"{name}.mystery_w1"] = torch.randn(3, 3)
    net = load_network(write(tmp_path / "x.safetensors", sd), index)
    message = net.report.problems[str(targets[0])]
    assert "mystery_w1" in message and "supported: lora" in message


@pytest.mark.parametrize("how", ["te2_keys", "metadata_sdxl", "metadata_sd2"])
def test_lora_for_another_family_is_refused_naming_both(sd1, tmp_path, how):
    root, index, original = sd1
    sd = make_kohya_lora(index, pick_targets(index, limit_per_kind=1))
    metadata = None
    if how == "te2_keys":
        sd["lora_te2_text_model_encoder_layers_0_mlp_fc1.lora_up.weight"] = torch.zeros(4, 4)
    else:
        metadata = {"ss_base_model_version": "sdxl_base_v1-0" if how == "metadata_sdxl" else "sd_v2"}
    path = write(tmp_path / "other.safetensors", sd, metadata)
    with pytest.raises(FamilyMismatchError) as e:
        load_network(path, index)
    msg = str(e.value)
    assert str(path) in msg and "SD1" in msg and ("SDXL" in msg or "SD2" in msg)
    assert_bitwise(root, original)


def test_nothing_matching_is_an_error(sd1, tmp_path):
    root, index, original = sd1
    path = write(tmp_path / "none.safetensors", {"lora_unet_nowhere.lora_up.weight": torch.zeros(2, 2)})
    with pytest.raises(KeyMappingError, match="none of its 1 keys"):
        load_network(path, index)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_tensor_names_file_and_key(sd1, tmp_path, bad):
    root, index, original = sd1
    targets = pick_targets(index, limit_per_kind=1)
    sd = make_kohya_lora(index, targets)
    key = next(k for k in sd if k.endswith("lora_up.weight"))
    sd[key][0, 0] = bad
    path = write(tmp_path / "nan.safetensors", sd)
    with pytest.raises(LoraFileError) as e:
        load_network(path, index)
    assert str(path) in str(e.value) and key in str(e.value)
    assert_bitwise(root, original)


def test_truncated_file(sd1, tmp_path):
    root, index, original = sd1
    path = write(tmp_path / "t.safetensors", make_kohya_lora(index, pick_targets(index, limit_per_kind=2)))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(LoraFileError) as e:
        load_network(path, index)
    assert str(path) in str(e.value)
    assert_bitwise(root, original)


class _Exploit:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


def test_malicious_pickle_never_runs(sd1, tmp_path):
    root, index, original = sd1
    marker = str(tmp_path / "pwned")
    path = tmp_path / "evil.pt"
    with open(path, "wb") as f:
        pickle.dump({"lora_unet_x.lora_up.weight": _Exploit(marker)}, f)
    with pytest.raises(LoraFileError) as e:
        load_network(path, index)
    assert str(path) in str(e.value)
    assert not os.path.exists(marker)
    assert_bitwise(root, original)


def test_errors_share_one_base_class():
    assert issubclass(FamilyMismatchError, LoraError) and issubclass(KeyMappingError, LoraError)


def test_bundled_embeddings_are_collected(sd1, tmp_path):
    root, index, original = sd1
    sd = make_kohya_lora(index, pick_targets(index, limit_per_kind=1))
    sd["bundle_emb.mychar.string_to_param.*"] = torch.randn(2, 32)
    sd["bundle_emb.otherchar.clip_l"] = torch.randn(1, 32)
    net = load_network(write(tmp_path / "b.safetensors", sd), index)
    assert set(net.embeddings) == {"mychar", "otherchar"}
    assert list(net.embeddings["mychar"]) == ["string_to_param.*"]
    assert torch.equal(net.embeddings["otherchar"]["clip_l"], sd["bundle_emb.otherchar.clip_l"])
    assert "bundle_emb.mychar.string_to_param.*" in net.report.used
