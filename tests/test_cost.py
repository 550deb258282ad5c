"""The automatic mode's cost model: UNet levels against the rows each layer really sees, estimates that grow as they
should, and the choice it makes for a new set or a sweep's cell (bypass for small passes, merged for large ones; a
sweep's merge priced as a re-merge)."""
from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from lora_core import cost
from lora_core.library import LoraLibrary
from lora_core.blocks import block_of
from lora_core.model_index import ModelIndex, Target
from lora_core.network import load_network
from lora_core.runtime import LoraRuntime
from lora_factory import LoraSpec, make_kohya_lora, make_lycoris, pick_targets
from test_patch_property import assert_bitwise, snapshot
from tiny_models import make_inputs, run_unet


def _observed_rows(root, index: ModelIndex, inputs: dict) -> dict[str, int]:
    """Rows (tokens or pixels, times batch) each UNet Linear/Conv2d gets in one real forward."""
    rows, hooks = {}, []
    for name, module in index.modules.items():
        if name.startswith("model.diffusion_model.") and isinstance(module, (torch.nn.Linear, torch.nn.Conv2d)):
            def hook(mod, args, out, name=name):
                rows[name] = out.numel() // out.shape[-1 if isinstance(mod, torch.nn.Linear) else 1]
            hooks.append(module.register_forward_hook(hook))
    try:
        run_unet(root, inputs)
    finally:
        for h in hooks:
            h.remove()
    return rows


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_unet_level_gives_the_rows_every_attention_layer_sees(family, fresh_sd1, fresh_sdxl):
    root = fresh_sd1 if family == "sd1" else fresh_sdxl
    index = ModelIndex(root)
    levels = cost.unet_levels(index)
    assert levels == (4 if family == "sd1" else 3)
    inputs = make_inputs(root, family, batch=2, size=16)
    rows = _observed_rows(root, index, inputs)
    first = 2 * 16 * 16
    checked = 0
    for name, seen in rows.items():
        if ".transformer_blocks." in name or name.endswith((".proj_in", ".proj_out")):
            if name.endswith(("attn2.to_k", "attn2.to_v")):
                continue  # these read the prompt, the same on every step: computed once (test below)
            assert seen == first // 4 ** cost.unet_level(block_of(index, Target(name)), levels), name
            checked += 1
    assert checked > 20


def test_estimates_scale_with_steps_and_image_size_and_merge_does_not(fresh_sd1, tmp_path):
    index = ModelIndex(fresh_sd1)
    targets = [t for t in pick_targets(index, kinds=(torch.nn.Linear, torch.nn.Conv2d)) if not index.is_text_encoder(t)]
    save_file(make_kohya_lora(index, targets, LoraSpec(rank=4), seed=1), str(tmp_path / "a.safetensors"))
    save_file(make_lycoris(index, targets[:6], "loha", seed=2), str(tmp_path / "h.safetensors"))
    costs = load_network(tmp_path / "a.safetensors", index).unet_costs(index)
    assert len(costs) == len(targets)
    small, large = cost.Workload(calls=4, rows=128), cost.Workload(calls=20, rows=8192)
    (b_small, m_small), (b_large, m_large) = (cost.estimate(costs, w, cost.CPU) for w in (small, large))
    assert m_small == m_large > 0
    assert b_large > 5 * b_small
    twice = cost.estimate(costs, cost.Workload(calls=8, rows=128), cost.CPU)[0]
    assert twice == pytest.approx(2 * b_small)
    # without a low-rank form (LoHa), bypass multiplies every row by the full delta: costlier per row
    dense = load_network(tmp_path / "h.safetensors", index).unet_costs(index)
    low = costs[:6]
    assert all(d.bypass_flops_per_row > l.bypass_flops_per_row for d, l in zip(dense, low))


def test_cross_attention_keys_and_values_cost_no_flops_per_step(fresh_sd1, tmp_path):
    """They read the prompt, whose low-rank outputs bypass computes once per pass (patch.ContextMemo)."""
    index = ModelIndex(fresh_sd1)
    targets = [t for t in pick_targets(index, kinds=(torch.nn.Linear,)) if not index.is_text_encoder(t)]
    save_file(make_kohya_lora(index, targets, LoraSpec(rank=4), seed=1), str(tmp_path / "a.safetensors"))
    network = load_network(tmp_path / "a.safetensors", index)
    by_target = dict(zip([t for t in network.adapters if not index.is_text_encoder(t)], network.unet_costs(index)))
    context = {t for t in by_target if t.module.endswith(("attn2.to_k", "attn2.to_v"))}
    assert context and len(context) < len(by_target)
    for target, c in by_target.items():
        assert (c.bypass_flops_per_row == 0) == (target in context), target
        assert (c.hook_share < 1) == (target in context), target
        assert c.merge_flops > 0 and c.merge_bytes > 0


@pytest.fixture
def world(fresh_sd1, tmp_path):
    index = ModelIndex(fresh_sd1)
    targets = pick_targets(index, limit_per_kind=6)
    save_file(make_kohya_lora(index, targets, LoraSpec(), seed=1), str(tmp_path / "alpha.safetensors"))
    runtime = LoraRuntime(LoraLibrary([tmp_path]))
    runtime.bind(fresh_sd1)
    return fresh_sd1, runtime, snapshot(fresh_sd1)


def test_auto_merges_a_new_set_at_once_when_the_pass_is_large(world):
    root, runtime, original = world
    small, large = cost.Workload(calls=2, rows=8), cost.Workload(calls=50, rows=1 << 16)
    network = runtime.load(runtime.resolve("alpha"))
    costs = network.unet_costs(runtime.index)
    assert cost.estimate(costs, small, cost.CPU)[0] < cost.estimate(costs, small, cost.CPU)[1]
    assert cost.estimate(costs, large, cost.CPU)[0] > cost.estimate(costs, large, cost.CPU)[1]
    assert runtime.activate([["alpha", "1"]], workload=small).mode == "bypass"
    assert runtime.activate([["alpha", "0.5"]], workload=large).mode == "merged"  # a new weight, merged at once
    assert runtime.activate([["alpha", "0.7"]], workload=small, sweep=True).mode == "bypass"  # a small sweep cell
    inputs = make_inputs(root, "sd1")
    at_07 = run_unet(root, inputs)
    cell = runtime.activate([["alpha", "0.6"]], workload=large, sweep=True)  # a large one: a merge per cell
    assert cell.mode == "merged" and cell.reason.startswith("a merge per cell costs less")
    cell = runtime.activate([["alpha", "0.7"]], workload=large, sweep=True)  # the next cell: re-merged
    assert cell.mode == "merged"
    assert torch.allclose(run_unet(root, inputs), at_07, rtol=1e-4, atol=1e-5)
    # a pass where a first merge pays off but a re-merge would not: a new set is merged, a sweep's cell is not
    per_call, merge = cost.estimate(costs, cost.Workload(calls=1, rows=8), cost.CPU)
    between = cost.Workload(calls=int(merge * (1 + cost.REMERGE) / 2 / per_call), rows=8)
    assert merge < cost.estimate(costs, between, cost.CPU)[0] < merge * cost.REMERGE
    assert runtime.activate([["alpha", "0.4"]], workload=between).mode == "merged"
    assert runtime.activate([["alpha", "0.3"]], workload=between, sweep=True).mode == "bypass"
    assert runtime.activate([["alpha", "0@0,1@9"]], workload=large, total_steps=10).mode == "bypass"  # schedules
    assert runtime.activate([["alpha", "0.3"]]).mode == "bypass"  # no workload: the new set runs in bypass
    runtime.restore()
    assert_bitwise(root, original)
