"""One generation's LoRAs end to end in the library (what the WebUI glue calls), on the tiny real SD1 model."""
from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from lora_core.library import LoraLibrary
from lora_core.model_index import ModelIndex, Target
from lora_core.runtime import LoraRuntime
from lora_factory import LoraSpec, make_kohya_lora, make_lycoris, pick_targets
from test_patch_property import assert_bitwise, snapshot
from tiny_models import make_inputs, run_text_encoders, run_unet


@pytest.fixture
def world(fresh_sd1, tmp_path):
    index = ModelIndex(fresh_sd1)
    te = [t for t in pick_targets(index, kinds=(torch.nn.Linear,)) if index.is_text_encoder(t)][:4]
    targets = pick_targets(index, limit_per_kind=4) + te
    assert te and not index.is_text_encoder(targets[0])
    save_file(make_kohya_lora(index, targets, LoraSpec(), seed=1), str(tmp_path / "alpha.safetensors"),
              metadata={"ss_output_name": "alpha_alias", "ss_base_model_version": "sd_v1"})
    save_file(make_kohya_lora(index, targets[::2], LoraSpec(rank=2), seed=2), str(tmp_path / "beta.safetensors"))
    (tmp_path / "broken.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    runtime = LoraRuntime(LoraLibrary([tmp_path]))
    runtime.bind(fresh_sd1)
    return fresh_sd1, runtime, snapshot(fresh_sd1), make_inputs(fresh_sd1, "sd1")


def unet_out(root, inputs):
    with torch.no_grad():
        return run_unet(root, inputs)


def test_static_set_is_merged_and_schedule_is_bypass(world):
    root, runtime, original, inputs = world
    plain = unet_out(root, inputs)
    result = runtime.activate([["alpha", "1"]])  # a new set: bypass (no weight pass before the first step)
    assert result.mode == "bypass" and not result.errors and [a.entry.name for a in result.active] == ["alpha"]
    assert_bitwise(root, original)
    bypassed = unet_out(root, inputs)
    result = runtime.activate([["alpha", "1"]])  # the same set again: steady, merged
    assert result.mode == "merged" and not result.errors
    merged = unet_out(root, inputs)
    assert not torch.equal(merged, plain)
    assert torch.allclose(bypassed, merged, rtol=1e-4, atol=1e-5)
    for _ in range(2):
        result = runtime.activate([["alpha", "1@0,1@10"]], total_steps=10)  # constant schedule is still static
    assert result.mode == "merged"
    result = runtime.activate([["alpha", "0@0,1@9"]], total_steps=10)
    assert result.mode == "bypass"
    assert_bitwise(root, original)  # bypass writes no weight
    runtime.step(0, 10)
    assert torch.allclose(unet_out(root, inputs), plain, atol=1e-6)  # weight 0 at step 0
    runtime.step(9, 10)
    assert torch.allclose(unet_out(root, inputs), merged, rtol=1e-4, atol=1e-5)  # weight 1 at the last step
    runtime.restore()
    assert_bitwise(root, original)


def test_start_stop_switches_the_lora_per_step(world):
    root, runtime, original, inputs = world
    plain = unet_out(root, inputs)
    assert runtime.activate([["alpha", "1", "start=2", "stop=4"]], total_steps=6).mode == "bypass"
    seen = []
    for step in range(6):
        runtime.step(step, 6)
        seen.append(not torch.allclose(unet_out(root, inputs), plain, atol=1e-6))
    assert seen == [False, False, True, True, False, False]
    runtime.restore()
    assert_bitwise(root, original)


def test_te_and_unet_weights_apply_to_their_part(world):
    root, runtime, original, inputs = world
    te0 = run_text_encoders(root, inputs)
    unet0 = unet_out(root, inputs)
    runtime.activate([["alpha", "0", "1"]])  # te 0, unet 1
    assert all(torch.equal(a, b) for a, b in zip(run_text_encoders(root, inputs).values(), te0.values()))
    assert not torch.equal(unet_out(root, inputs), unet0)
    runtime.activate([["alpha", "1", "0"]])
    assert not all(torch.equal(a, b) for a, b in zip(run_text_encoders(root, inputs).values(), te0.values()))
    assert torch.equal(unet_out(root, inputs), unet0)
    runtime.activate([])
    assert_bitwise(root, original)


def test_hires_pass_uses_hr_weights(world):
    root, runtime, original, inputs = world
    unet0 = unet_out(root, inputs)
    runtime.activate([["alpha", "1", "hr=0"]])
    first = unet_out(root, inputs)
    runtime.activate([["alpha", "1", "hr=0"]], hires=True)
    assert not torch.equal(first, unet0) and torch.equal(unet_out(root, inputs), unet0)


def test_bad_items_are_reported_and_the_rest_applies(world):
    root, runtime, original, inputs = world
    result = runtime.activate([["alpha", "abc"], ["nope", "1"], ["broken", "1"], ["beta", "0.5"], ["", "1"]])
    assert [a.entry.name for a in result.active] == ["beta"]
    text = "\n".join(result.errors)
    assert "abc" in text and "nope" in text and "broken" in text
    assert len(result.errors) >= 4
    runtime.restore()
    assert_bitwise(root, original)


def test_names_resolve_by_alias_and_hashes_are_reported(world):
    root, runtime, original, inputs = world
    result = runtime.activate([["alpha_alias", "1"], ["beta", "1"]])
    assert [a.entry.name for a in result.active] == ["alpha", "beta"]
    assert set(result.hashes) == {"alpha_alias", "beta"}
    assert all(len(h) == 12 for h in result.hashes.values())


def test_non_finite_lora_is_dropped_and_the_others_stay(world):
    root, runtime, original, inputs = world
    result = runtime.activate([["alpha", "1e39"], ["beta", "1"]])
    assert [a.entry.name for a in result.active] == ["beta"]
    assert any("NaN" in e or "Inf" in e for e in result.errors)
    runtime.restore()
    assert_bitwise(root, original)


def test_model_reloaded_in_place_drops_state_without_writing(world):
    root, runtime, original, inputs = world
    runtime.activate([["alpha", "1"]])
    # the host loads a checkpoint into the same object: weights replaced under us
    with torch.no_grad():
        for p in root.parameters():
            p.add_(1.0)
    reloaded = snapshot(root)
    runtime.model_reloaded(root)
    assert_bitwise(root, reloaded)  # our stale backups were not written back
    assert not runtime.patcher.active


def test_binding_another_model_restores_the_previous(world, fresh_sd2):
    root, runtime, original, inputs = world
    runtime.activate([["alpha", "1"]])
    runtime.bind(fresh_sd2)
    assert_bitwise(root, original)
    result = runtime.activate([["alpha", "1"]])  # an SD1 file on the SD2 model now
    assert not result.active and "SD1" in result.errors[0] and "SD2" in result.errors[0]


def test_unused_keys_become_a_console_note_naming_the_file(world, tmp_path):
    root, runtime, original, inputs = world
    from safetensors.torch import load_file

    sd = load_file(str(tmp_path / "beta.safetensors"))
    sd["lora_unet_no_such_layer.lora_up.weight"] = torch.zeros(2, 2)
    save_file(sd, str(tmp_path / "gamma.safetensors"))
    result = runtime.activate([["gamma", "1"]])
    assert [a.entry.name for a in result.active] == ["gamma"] and not result.errors
    (note,) = result.notes
    assert "gamma.safetensors" in note and "matched no layer" in note


def test_auto_mode_merges_only_a_set_repeated_from_the_previous_generation(world):
    root, runtime, original, inputs = world
    modes = [runtime.activate(items).mode for items in (
        [["alpha", "1"]],        # new set: bypass
        [["alpha", "1"]],        # steady: merged
        [["alpha", "1"]],        # still steady: merged, nothing to do
        [["alpha", "0.5"]],      # same file, new weight: bypass (no re-merge)
        [["alpha", "0.7"]],      # sweeping on: bypass
        [["alpha", "0.7"]],      # steady again: merged
        [["alpha", "0.7"], ["beta", "1"]],  # another set: bypass
        [["beta", "1"]],         # switching back and forth: bypass each time
        [["alpha", "0.7"], ["beta", "1"]],
        [["alpha", "0.7"], ["beta", "1"]],  # steady: merged
    )]
    assert modes == ["bypass", "merged", "merged", "bypass", "bypass", "merged", "bypass", "bypass", "bypass",
                     "merged"]
    runtime.mode = "merged"
    assert runtime.activate([["alpha", "0.2"]]).mode == "merged"  # a forced mode wins
    runtime.mode = "bypass"
    assert runtime.activate([["alpha", "0.2"]]).mode == "bypass"
    runtime.restore()
    assert_bitwise(root, original)


def test_auto_merges_the_unet_and_keeps_the_text_encoders_in_bypass(world):
    """The text encoders run once per prompt: merging them would cost a weight pass and backups for nothing."""
    root, runtime, original, inputs = world
    runtime.activate([["alpha", "1"]])
    assert runtime.activate([["alpha", "1"]]).mode == "merged"
    index, patcher = runtime.index, runtime.patcher
    modes = {name: patcher.layer_mode(name) for name in patcher.touched}
    te = {name for name in modes if index.is_text_encoder(Target(name))}
    assert te and len(te) < len(modes)
    assert all(modes[name] == "bypass" for name in te) and all(modes[n] == "merged" for n in modes if n not in te)
    changed = {k for k, t in root.named_parameters() if not torch.equal(t, original.tensors[f"p:{k}"])}
    assert changed and not any(n.startswith("cond_stage_model") for n in changed)
    text = run_text_encoders(root, inputs)
    runtime.mode = "merged"  # a forced mode merges the text encoders too, with the same result
    runtime.activate([["alpha", "1"]])
    assert all(patcher.layer_mode(name) == "merged" for name in patcher.touched)
    merged_text = run_text_encoders(root, inputs)
    assert text.keys() == merged_text.keys()
    assert all(torch.allclose(text[k], merged_text[k], rtol=1e-4, atol=1e-5) for k in text)
    runtime.restore()
    assert_bitwise(root, original)


def test_hires_pass_keeps_the_first_pass_mode_for_the_same_set(world):
    root, runtime, original, inputs = world
    for _ in range(2):
        assert runtime.activate([["alpha", "1"]]).mode in ("bypass", "merged")
    assert runtime.activate([["alpha", "1"]], hires=True).mode == "merged"  # same set: no change mid-generation
    assert runtime.activate([["alpha", "1"]]).mode == "merged"  # the next generation is still steady
    assert runtime.activate([["alpha", "1", "1", "hr=0.5"]], hires=False).mode == "merged"  # first pass: same
    assert runtime.activate([["alpha", "1", "1", "hr=0.5"]], hires=True).mode == "bypass"  # hires weights differ
    runtime.restore()
    assert_bitwise(root, original)


def test_full_size_bypass_deltas_beyond_the_budget_are_merged_instead(world, tmp_path):
    root, runtime, original, inputs = world
    index = runtime.index
    targets = pick_targets(index, kinds=(torch.nn.Linear, torch.nn.Conv2d), limit_per_kind=3)
    save_file(make_lycoris(index, targets, "full", seed=3), str(tmp_path / "hada.safetensors"))
    plain = unet_out(root, inputs)
    runtime.activate([["hada", "1"]])
    network = runtime._active[0].network
    dense = network.dense_bypass_bytes(index)
    assert dense == sum(index.weight(t).numel() * 4 for t in targets)  # a full diff has no factored form
    assert network.dense_bypass_bytes(runtime.index) == dense
    runtime.restore()
    runtime.set_bypass_budget(dense - 1)
    runtime._last_set = None
    result = runtime.activate([["hada", "0.5"]])
    assert result.mode == "merged" and "MiB of full-size deltas" in result.reason
    merged = unet_out(root, inputs)
    runtime.set_bypass_budget(dense)
    assert runtime.activate([["hada", "0.7"]]).mode == "bypass"
    # forced bypass beyond the cache budget: the deltas are computed per call, not held, with the same result
    runtime.mode = "bypass"
    runtime.patcher.cache.budget = 1
    runtime.patcher.cache.clear()
    result = runtime.activate([["hada", "0.5"]])
    assert result.mode == "bypass"
    assert torch.allclose(unet_out(root, inputs), merged, rtol=1e-4, atol=1e-5)
    assert runtime.patcher.cache.bytes == 0
    assert not torch.equal(merged, plain)
    runtime.restore()
    assert_bitwise(root, original)


def test_switching_back_reuses_what_bypass_prepared(world):
    root, runtime, original, inputs = world
    runtime.activate([["alpha", "1"]])
    first = unet_out(root, inputs)
    cache = runtime.patcher.cache
    misses = cache.misses
    runtime.activate([["beta", "1"]])
    unet_out(root, inputs)
    assert cache.misses > misses  # beta's layers were prepared
    misses, hits = cache.misses, cache.hits
    runtime.activate([["alpha", "1"]])
    again = unet_out(root, inputs)
    assert cache.misses == misses and cache.hits > hits  # alpha's were not prepared again
    assert torch.equal(first, again)
    runtime.restore()
    assert_bitwise(root, original)


def test_a_session_of_generations_ends_bitwise_original(world):
    """The e2e suite's order: LoRA at 1 (merged), at 0 (weights-only change: bypass), other sets, block
    weights, then nothing: the model must be the original bit for bit."""
    root, runtime, original, inputs = world
    plain = unet_out(root, inputs)
    for items in ([["alpha", "1"]], [["alpha", "0"]], [["beta", "0.8"]], [["alpha", "0.7", "0.3"], ["beta", "-0.5", "1"]],
                  [["alpha", "1", "1", "lbw=ALL"]], [["alpha", "1", "1", "lbw=NONE"]], [["alpha", "1", "1", "lbw=MIDD"]]):
        result = runtime.activate(items)
        assert result.active, result.errors
    runtime.activate([])
    assert_bitwise(root, original)
    assert torch.equal(unet_out(root, inputs), plain)


def test_many_unknown_names_rescan_the_folders_once_and_tags_are_capped(world, monkeypatch):
    """A pasted prompt of hundreds of unknown names: one folder scan per generation (each cost ~6.5 ms), at most
    ``MAX_TAGS`` tags, and one error saying how many were skipped."""
    from lora_core.syntax import MAX_TAGS

    root, runtime, original, inputs = world
    scans = []
    real = runtime.library.refresh
    monkeypatch.setattr(runtime.library, "refresh", lambda: (scans.append(1), real())[1])
    result = runtime.activate([[f"nosuch{i}", "1"] for i in range(MAX_TAGS + 50)] + [["alpha", "1"]])
    assert len(scans) == 1
    assert any(f"the other {51} are skipped" in e for e in result.errors)
    assert sum("nosuch" in e for e in result.errors) == MAX_TAGS
    assert not result.active  # alpha was the 151st tag
    runtime.restore()
    assert_bitwise(root, original)
