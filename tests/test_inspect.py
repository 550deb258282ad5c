"""The inspect data (API, CLI) describes a file on the loaded model and is strict JSON."""
from __future__ import annotations

import json

from safetensors.torch import save_file

from lora_core.inspect import describe, listing
from lora_core.library import LoraLibrary
from lora_core.model_index import ModelIndex
from lora_core.runtime import LoraRuntime
from lora_factory import LoraSpec, make_kohya_lora, pick_targets


def _keys_are_strings(value) -> bool:
    if isinstance(value, dict):
        return all(isinstance(k, str) and _keys_are_strings(v) for k, v in value.items())
    if isinstance(value, list):
        return all(_keys_are_strings(v) for v in value)
    return True


def test_describe_counts_layers_keys_and_is_strict_json(fresh_sd1, tmp_path):
    index = ModelIndex(fresh_sd1)
    targets = pick_targets(index, limit_per_kind=3)
    sd = make_kohya_lora(index, targets, LoraSpec(rank=4, alpha=2.0))
    sd["lora_unet_nowhere.lora_up.weight"] = sd[next(iter(sd))].clone()
    save_file(sd, str(tmp_path / "x.safetensors"), metadata={"ss_output_name": "ex", "ss_base_model_version": "sd_v1"})
    runtime = LoraRuntime(LoraLibrary([tmp_path]))
    runtime.bind(fresh_sd1)
    info = describe(runtime, "ex")
    assert _keys_are_strings(info)
    json.loads(json.dumps(info))
    assert info["family"] == info["model_family"] == "sd1"
    assert info["algorithms"] == {"lora": len(targets)}
    assert info["ranks"] == {"4": len(targets)} and info["scales"] == {"0.5": len(targets)}
    assert info["layers"]["total"] == len(targets)
    assert info["keys"]["unmatched"] == ["lora_unet_nowhere.lora_up.weight"]
    assert info["keys"]["used"] == info["keys"]["total"] - 1
    assert len(info["shorthash"]) == 12 and info["metadata"]["ss_output_name"] == "ex"
    assert listing(runtime.library.resolve("x"))["alias"] == "ex"
