"""The bypass outputs of the cross-attention key/value layers are computed once per text conditioning
(``patch.ContextMemo``): on the real tiny SD1 and SDXL UNets, a stored output is only ever used for the same
conditioning values, and an image never depends on what happened to be stored."""
from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

import tiny_models
from lora_core.model_index import ModelIndex
from lora_core.network import load_network
from lora_core.patch import CONTEXT_LAYERS, Patcher
from lora_factory import LoraSpec, make_kohya_lora, make_lycoris, pick_targets


def _network(index: ModelIndex, tmp_path, kind: str):
    targets = [t for t in pick_targets(index, kinds=(nn.Linear,)) if not index.is_text_encoder(t)]
    assert any(t.module.endswith(CONTEXT_LAYERS) for t in targets)
    sd = make_kohya_lora(index, targets, LoraSpec(rank=4)) if kind == "lora" else make_lycoris(index, targets, kind)
    path = tmp_path / f"{kind}.safetensors"
    save_file({k: v.contiguous() for k, v in sd.items()}, str(path))
    return load_network(path, index)


def _unet(root, inputs: dict, context: torch.Tensor) -> torch.Tensor:
    return tiny_models.run_unet(root, {**inputs, "context": context})


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
@pytest.mark.parametrize("kind", ["lora", "loha"])
def test_outputs_equal_an_unstored_run_and_follow_the_conditioning(family, kind, tmp_path):
    root = tiny_models.build(family)
    index = ModelIndex(root)
    net = _network(index, tmp_path, kind)
    inputs = tiny_models.make_inputs(root, batch=2)
    ctx = inputs["context"]
    other = ctx + 0.5
    plain = _unet(root, inputs, ctx)

    stored, unstored = Patcher(index), Patcher(index)
    unstored.context_memo.budget = 0  # computes every output on every call, by the same arithmetic
    try:
        results = {}
        for name, patcher in (("stored", stored), ("unstored", unstored)):
            outs = []
            for context, m in ((ctx, 1.0), (ctx.clone(), 1.0), (ctx.clone(), 0.4), (other, 0.4), (ctx.clone(), 0.4)):
                patcher.apply(net.plan(index, m, m), "bypass")
                outs.append(_unet(root, inputs, context))
            context = ctx.clone()
            outs.append(_unet(root, inputs, context))
            context.add_(0.5)  # the same object, changed in place: the stored outputs of ``ctx`` must not be used
            outs.append(_unet(root, inputs, context))
            results[name] = outs
            patcher.restore()
        assert stored.context_memo.hits > 0 and unstored.context_memo.hits == 0
        for a, b in zip(results["stored"], results["unstored"]):
            assert torch.equal(a, b)
        s = results["stored"]
        assert torch.equal(s[0], s[1])  # a new tensor with the same values: the same image
        assert not torch.equal(s[1], s[2])  # the multiplier is applied to stored outputs
        assert not torch.equal(s[2], s[3]) and torch.equal(s[2], s[4])  # another conditioning, then back
        assert torch.equal(s[5], s[2]) and torch.equal(s[6], s[3])  # changed in place = the other conditioning
        assert not torch.equal(s[0], plain)
    finally:
        stored.restore()
        unstored.restore()


def test_bypass_with_stored_outputs_matches_merged_weights(fresh_sd1, tmp_path):
    index = ModelIndex(fresh_sd1)
    net = _network(index, tmp_path, "lora")
    inputs = tiny_models.make_inputs(fresh_sd1, batch=2)
    with Patcher(index) as patcher:
        patcher.apply(net.plan(index, 0.8, 0.8), "merged")
        want = _unet(fresh_sd1, inputs, inputs["context"])
        patcher.restore()  # bypass over merged weights would only add the difference (nothing) to them
        patcher.apply(net.plan(index, 0.8, 0.8), "bypass")
        _unet(fresh_sd1, inputs, inputs["context"])
        got = _unet(fresh_sd1, inputs, inputs["context"].clone())  # from the stored outputs
        assert patcher.context_memo.hits > 0
    rel = ((got - want).norm() / want.norm()).item()
    assert rel < 1e-5, rel


def test_budget_bounds_the_store_and_restore_empties_it(fresh_sd1, tmp_path):
    index = ModelIndex(fresh_sd1)
    net = _network(index, tmp_path, "lora")
    inputs = tiny_models.make_inputs(fresh_sd1, batch=2)
    patcher = Patcher(index)
    memo = patcher.context_memo
    patcher.apply(net.plan(index, 1.0, 1.0), "bypass")
    _unet(fresh_sd1, inputs, inputs["context"])
    one = memo.bytes
    n_layers = sum(name.endswith(CONTEXT_LAYERS) for name in patcher.touched)
    assert one > 0 and n_layers > 0
    memo.budget = one  # room for one conditioning: the next ones are computed, not stored
    for i in range(3):
        _unet(fresh_sd1, inputs, inputs["context"] + i + 1)
    assert memo.bytes == one
    assert len(memo._known) <= memo.slots
    patcher.restore()
    assert memo.bytes == 0 and not memo._known and not memo._values


def _linear_dtype(root, dtype) -> None:
    for module in root.model.diffusion_model.modules():
        if isinstance(module, (nn.Linear, nn.Conv2d)):
            module.to(dtype)


def test_a_cast_conditioning_is_compared_once_per_call_not_per_layer(fresh_sd1, tmp_path, monkeypatch):
    """Under autocast the key/value layers compute in another dtype than the conditioning they are given (a float32
    context into bfloat16 weights: the hook casts it for each layer). The conditioning is still known by the tensor
    the UNet was called with, so its values are compared once per new tensor, not once per layer (on a GPU each
    comparison waits for the device); the outputs are those of a run that stores nothing. A layer whose dtype
    changes later gets outputs computed in its new dtype, not the stored ones."""
    index = ModelIndex(fresh_sd1)
    net = _network(index, tmp_path, "lora")
    inputs = tiny_models.make_inputs(fresh_sd1, batch=2)
    _linear_dtype(fresh_sd1, torch.bfloat16)
    comparisons = []
    equal = torch.equal
    monkeypatch.setattr(torch, "equal", lambda a, b: comparisons.append(1) or equal(a, b))

    def run(budget: int | None) -> list[torch.Tensor]:
        with Patcher(index) as patcher:
            if budget is not None:
                patcher.context_memo.budget = budget
            patcher.apply(net.plan(index, 0.8, 0.8), "bypass")
            with torch.autocast("cpu", dtype=torch.bfloat16):
                out = [_unet(fresh_sd1, inputs, inputs["context"]).float()]
                comparisons.clear()
                out += [_unet(fresh_sd1, inputs, inputs["context"].clone()).float() for _ in range(3)]
            assert len(comparisons) == 3  # one per new tensor
            assert (patcher.context_memo.hits > 0) == (budget is None)
        return out

    stored, unstored = run(None), run(0)
    for a, b in zip(stored, unstored):
        assert torch.equal(a, b)

    with Patcher(index) as patcher:
        patcher.apply(net.plan(index, 0.8, 0.8), "bypass")
        with torch.autocast("cpu", dtype=torch.bfloat16):
            _unet(fresh_sd1, inputs, inputs["context"])  # stores bfloat16 outputs
        _linear_dtype(fresh_sd1, torch.float32)  # the host converts the model; the same conditioning object
        got = _unet(fresh_sd1, inputs, inputs["context"])
        patcher.context_memo.budget = 0
        patcher.context_memo.clear()
        want = _unet(fresh_sd1, inputs, inputs["context"])
    assert torch.equal(got, want)
