"""Factored bypass forms of LyCORIS algorithms, each against the dense delta it stands for (issue #22).

LoHa runs as a LoRA of rank r1 * r2 (face-splitting factors; the Tucker variant as a Tucker LoRA), LoKr applies its
Kronecker product without forming it (Linear and convolutions), IA3 scales the layer's output (or feeds the scaled
input through the layer's own weight), OFT/BOFT rotate the output channels. Every form is checked against the
layer's op on the dense delta (``delta_weight``, itself proven against lycoris-lora in test_lycoris_a/b.py) on the
real layers of the tiny models, in float32 tightly and in fp16/bf16 within the dtype's tolerance; each has a
deliberately wrong variant that the same check rejects. The cost model's choice (factored only where it multiplies
each row by no more numbers than the dense delta) and the automatic mode's use of it are checked at the end.
"""
from __future__ import annotations

from collections import Counter
from contextlib import contextmanager

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

import lora_core.cost as cost
from lora_core.adapters.base import (Adapter, ConvBypass, LayerOp, LinearBypass, OutputBypass, PointwiseConvBypass,
                                     face_split, numel)
from lora_core.adapters.dora import DoraForm
from lora_core.adapters.ia3 import IA3Form
from lora_core.adapters.loha import LohaAdapter
from lora_core.adapters.lokr import KronConvBypass, KronLinearBypass
from lora_core.adapters.oft import OftForm
from lora_core.library import LoraLibrary
from lora_core.model_index import ModelIndex
from lora_core.network import load_network
from lora_core.patch import Patcher
from lora_core.runtime import LoraRuntime
from lora_factory import kohya_name_of, make_lycoris, pick_targets
from test_lora_math import TOLERANCE, rel_err
from tiny_models import make_inputs, run_unet
import test_lycoris_a as la
import test_lycoris_b as lb

ROLES = ("linear", "conv1x1", "conv3x3", "conv_stride2")
A_CASES = ["loha", "loha_tucker", "loha_alpha_missing", "lokr", "lokr_both_decomposed", "lokr_full",
           "lokr_tucker", "lokr_factor4", "lokr_w1_decomposed",
           "loha_dora_out", "loha_dora_in", "lokr_dora_out", "lokr_dora_in"]
B_CASES = ["ia3_out", "ia3_on_input", "oft", "oft_rescaled", "oft_diag_old", "boft", "boft_constrained_rescaled"]


COST_MODEL = cost.factored_is_cheaper  # the cost model's own choice, which ``always_factored`` replaces


@pytest.fixture(autouse=True)
def always_factored(monkeypatch):
    """The forms themselves are under test here, whatever the cost model would choose for these tiny layers."""
    monkeypatch.setattr(cost, "factored_is_cheaper", lambda macs, shape: True)


def model(case_id: str, request) -> nn.Module:
    family = la.CASES[case_id].family if case_id in la.CASES else "sd1"
    return request.getfixturevalue(f"fresh_{family}")


def a_network(index: ModelIndex, case_id: str, role: str, tmp_path, seed: int = 0):
    case = la.CASES[case_id]
    target = la.lycoris_targets(index)[role]
    oracle = la.build_oracle(index, target, case, seed)
    path = tmp_path / f"{case_id}_{role}.safetensors"
    save_file(oracle.state_dict, str(path))
    return target, load_network(path, index)


def b_network(index: ModelIndex, case_id: str, role: str, tmp_path, seed: int = 0):
    case = lb.CASES[case_id]
    target = lb.oracle_targets(index)[role]
    with torch.no_grad():
        lyco = lb.lycoris_module(case, lb.standalone(index, target), torch.Generator().manual_seed(seed))
        path = lb.save_for(tmp_path, index, target, case.tensors(lyco))
    return target, load_network(path, index)


def layer_x(module: nn.Module, dtype: torch.dtype) -> torch.Tensor:
    return la.layer_input(module, torch.Generator().manual_seed(3), torch.float32)[0].to(dtype)


def form_output(fn, x: torch.Tensor, module: nn.Module) -> torch.Tensor:
    """What the hook adds at multiplier 1: from the layer's output where the form reads it."""
    if hasattr(fn, "from_output"):
        with torch.no_grad():
            got = fn.from_output(x, module(x), module)
        assert got is not None
        return got
    return fn(x)


def dense_output(adapter, module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The layer's op on the dense delta, in float64 (the reference)."""
    op = LayerOp.of(module)
    dw = adapter.delta_weight(module.weight.detach().float()).double()
    return op(x.double(), dw)


def check(fn, adapter, module: nn.Module, x: torch.Tensor) -> float:
    with torch.no_grad():
        got = form_output(fn, x, module)
        want = dense_output(adapter, module, x)
    assert got.shape == want.shape and got.dtype == x.dtype
    assert want.abs().max() > 0
    return rel_err(got, want)


def forms(index: ModelIndex, case_id: str, tmp_path):
    make = a_network if case_id in la.CASES else b_network
    roles = la.CASES[case_id].roles if case_id in la.CASES else ROLES
    for seed, role in enumerate(r for r in roles if r in ROLES):
        target, net = make(index, case_id, role, tmp_path, seed)
        yield role, index.module(target), net.adapters[target]


@pytest.mark.parametrize("case_id", A_CASES + B_CASES)
def test_factored_form_equals_the_dense_delta_fp32(case_id, request, tmp_path):
    index = ModelIndex(model(case_id, request))
    for role, module, adapter in forms(index, case_id, tmp_path):
        fn = adapter.low_rank_bypass(LayerOp.of(module), torch.device("cpu"), torch.float32, None)
        assert fn is not None, (case_id, role)
        assert getattr(fn, "macs", 0) > 0
        err = check(fn, adapter, module, layer_x(module, torch.float32))
        assert err < 1e-5, (case_id, role, err)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("case_id", ["loha", "loha_tucker", "lokr", "lokr_tucker", "ia3_out", "ia3_on_input",
                                     "oft", "boft_constrained_rescaled"])
def test_factored_form_in_half_precision(case_id, dtype, request, tmp_path):
    root = model(case_id, request)
    index = ModelIndex(root)
    items = list(forms(index, case_id, tmp_path))  # files written from the float32 model
    root.to(dtype)
    for role, module, adapter in items:
        fn = adapter.low_rank_bypass(LayerOp.of(module), torch.device("cpu"), dtype, None)
        err = check(fn, adapter, module, layer_x(module, dtype))
        assert err < TOLERANCE[dtype], (case_id, role, err)


# ---------------------------------------------------------------- deliberately wrong forms
def wrong_forms(adapter, module: nn.Module):
    """A plausible mistake for each algorithm, built from the same parts."""
    op = LayerOp.of(module)
    name = adapter.algorithm
    if name == "loha":  # the face-split pairs i of one factor with j of the other: (i, j) up, (j, i) down
        w1a, w2a, w1b, w2b = adapter.w1a.float(), adapter.w2a.float(), adapter.w1b.float(), adapter.w2b.float()
        up = face_split(w1a, w2a)
        down = face_split(w2b.reshape(w2b.shape[0], -1).T, w1b.reshape(w1b.shape[0], -1).T).T
        if op.is_conv:
            return ConvBypass(down.reshape(down.shape[0], *module.weight.shape[1:]), up, adapter.scale, op.kwargs)
        return LinearBypass(down, up, adapter.scale)
    if name == "lokr":  # the input viewed as (d, c) instead of (c, d): w1 and w2 read the wrong axes
        w1 = adapter._w1(torch.device("cpu"), torch.float32) * adapter.scale
        w2 = adapter._w2(torch.device("cpu"), torch.float32)
        if op.is_conv:
            c = w1.shape[1]
            fn = KronConvBypass(w1.T.contiguous(), w2.reshape(w2.shape[0], module.weight.shape[1] // c,
                                                               *module.weight.shape[2:]), op.kwargs, 1)
            return fn if w1.shape[0] == w1.shape[1] else None
        return KronLinearBypass(w1, w2.reshape(w2.shape[0], -1).T.contiguous(), 1) \
            if w2.shape[0] == w2.reshape(w2.shape[0], -1).shape[1] else None
    if name == "ia3":  # the bias scaled too (LyCORIS's own bypass does this; its merge and ours do not);
        # on inputs, the layer's weight at half strength
        if not adapter.on_input and module.bias is None:
            return None
        class WithBias(IA3Form):
            def from_output(self, x, y, module):
                return y * self._along_channels() if not self.on_input else self.op(x, module.weight) * 0.5

        return WithBias(adapter.scale.float().reshape(-1), adapter.on_input, op, tuple(module.weight.shape))
    if name == "oft":  # R applied where R^T belongs
        rd = adapter._rotation_delta(torch.device("cpu")).transpose(-1, -2)
        return OftForm(rd, None if adapter.rescale is None else adapter.rescale.float(), op)
    raise AssertionError(name)


@pytest.mark.parametrize("case_id", ["loha", "lokr", "ia3_out", "ia3_on_input", "oft", "boft"])
def test_a_wrong_form_fails_the_same_check(case_id, fresh_sd1, tmp_path):
    index = ModelIndex(fresh_sd1)
    checked = 0
    for role, module, adapter in forms(index, case_id, tmp_path):
        wrong = wrong_forms(adapter, module)
        if wrong is None:
            continue
        x = layer_x(module, torch.float32)
        right = adapter.low_rank_bypass(LayerOp.of(module), torch.device("cpu"), torch.float32, None)
        assert check(right, adapter, module, x) < 1e-5
        assert check(wrong, adapter, module, x) > 1e-2, (case_id, role)
        checked += 1
    assert checked


# ---------------------------------------------------------------- merged path
@pytest.mark.parametrize("case_id", ["loha", "lokr", "lokr_both_decomposed", "lokr_w1_decomposed", "lokr_tucker"])
def test_fused_merge_adds_the_dense_delta(case_id, request, tmp_path):
    """LoHa's merge is one rank r1 * r2 ``addmm_``, LoKr's one broadcast ``addcmul_``: the same as adding the
    dense delta."""
    index = ModelIndex(model(case_id, request))
    for role, module, adapter in forms(index, case_id, tmp_path):
        base = module.weight.detach().float()
        out = base.clone()
        adapter.add_delta(out, base, -0.7)
        want = base.double() - 0.7 * adapter.delta_weight(base).double()
        assert rel_err(out, want) < 1e-6, (case_id, role)


# ---------------------------------------------------------------- the cost model and the automatic mode
def test_the_cost_model_chooses_dense_where_the_factors_are_larger(monkeypatch, fresh_sd1, tmp_path):
    monkeypatch.undo()  # the real choice
    index = ModelIndex(fresh_sd1)
    target = la.lycoris_targets(index)["linear"]
    shape = index.weight_shape(target)
    gen = torch.Generator().manual_seed(1)
    name = kohya_name_of(index, target)
    op = LayerOp.of(index.module(target))
    for rank, factored in ((2, True), (max(shape), False)):  # r1 * r2 * (out + in) against out * in
        tensors = {"hada_w1_a": torch.randn(shape[0], rank, generator=gen),
                   "hada_w1_b": torch.randn(rank, shape[1], generator=gen),
                   "hada_w2_a": torch.randn(shape[0], rank, generator=gen),
                   "hada_w2_b": torch.randn(rank, shape[1], generator=gen)}
        save_file({f"{name}.{k}": v for k, v in tensors.items()}, str(tmp_path / f"r{rank}.safetensors"))
        net = load_network(tmp_path / f"r{rank}.safetensors", index)
        adapter = net.adapters[target]
        assert cost.factored_is_cheaper(rank * rank * (shape[0] + shape[1]), shape) is factored
        assert (adapter.low_rank_bypass(op, torch.device("cpu"), torch.float32, None) is not None) is factored
        assert (net.dense_bypass_bytes(index) == 0) is factored


@pytest.mark.parametrize("kind", ["loha", "lokr", "ia3", "oft"])
def test_auto_mode_keeps_a_lycoris_set_in_bypass_holding_nothing_full_size(kind, monkeypatch, fresh_sd1, tmp_path):
    """With no room at all for full-size deltas, a LyCORIS set still runs in bypass (nothing full-size is held),
    and its output equals the merged one."""
    monkeypatch.undo()
    index = ModelIndex(fresh_sd1)
    chosen = [t for t in pick_targets(index, kinds=(nn.Linear, nn.Conv2d)) if not index.is_text_encoder(t)][::4]
    assert chosen
    save_file(make_lycoris(index, chosen, kind, seed=4), str(tmp_path / f"{kind}.safetensors"))
    runtime = LoraRuntime(LoraLibrary([tmp_path]), bypass_budget=0)
    runtime.bind(fresh_sd1)
    inputs = make_inputs(fresh_sd1, "sd1")

    def unet(root, inputs):
        with torch.no_grad():
            return run_unet(root, inputs)

    result = runtime.activate([[kind, "0.8"]])
    assert result.mode == "bypass", result.reason
    assert runtime._active[0].network.dense_bypass_bytes(index) == 0
    got = unet(fresh_sd1, inputs)
    assert runtime.patcher.cache.bytes == sum(
        v[2] for k, v in runtime.patcher.cache._items.items() if "dense" not in k)  # factors only
    assert not any("dense" in k for k in runtime.patcher.cache._items)
    runtime.restore()
    with Patcher(index) as merged:
        merged.apply(load_network(tmp_path / f"{kind}.safetensors", index).plan(index, 0.8, 0.8), "merged")
        want = unet(fresh_sd1, inputs)
    assert torch.allclose(got, want, rtol=1e-4, atol=1e-5)


def test_output_forms_fall_back_to_the_dense_delta_over_merged_weights(fresh_sd1, tmp_path):
    """A weight change after a merged generation: the hook adds ``(m - M) h(x)`` over merged weights, where the
    layer's output no longer gives ``W0 x``; an OFT/IA3 form then uses its dense delta, with the right result."""
    index = ModelIndex(fresh_sd1)
    target, net = b_network(index, "oft", "conv3x3", tmp_path)
    module = index.module(target)
    x = layer_x(module, torch.float32)
    with torch.no_grad():
        want = module(x) + 0.3 * dense_output(net.adapters[target], module, x).float()
        with Patcher(index) as patcher:
            patcher.apply(net.plan(index, 1.0, 1.0), "merged")
            patcher.apply(net.plan(index, 0.3, 0.3), "bypass")  # over the merged weights
            assert patcher._layers[target.module].baked == [1.0]
            fns, _ = patcher._prepare(patcher._layers[target.module], x)
            assert isinstance(fns[0], OutputBypass)
            got = module(x)
        assert rel_err(got, want) < 1e-5


def test_an_in_place_merge_that_overflows_puts_the_weights_back(fresh_sd1, tmp_path):
    """A float32 layer is merged where it lives (after its backup): a result that overflows is refused, and the
    weights written so far are put back bit for bit."""
    from lora_core.errors import NonFiniteWeightError

    index = ModelIndex(fresh_sd1)
    targets = [t for t in pick_targets(index, kinds=(nn.Linear, nn.Conv2d)) if not index.is_text_encoder(t)][:3]
    gen = torch.Generator().manual_seed(2)
    tensors = {f"{kohya_name_of(index, t)}.diff": torch.randn(index.weight_shape(t), generator=gen) * 1e20
               for t in targets}
    save_file(tensors, str(tmp_path / "huge.safetensors"))
    net = load_network(tmp_path / "huge.safetensors", index)
    before = {t: index.weight(t).detach().clone() for t in targets}
    assert all(index.weight(t).dtype == torch.float32 for t in targets)
    patcher = Patcher(index)
    with pytest.raises(NonFiniteWeightError, match="nothing was written"):
        patcher.apply(net.plan(index, 1e20, 1e20), "merged")
    assert not patcher.active
    assert all(torch.equal(index.weight(t), before[t]) for t in targets)
    patcher.apply(net.plan(index, 1e-20, 1e-20), "merged")  # finite: merged in place, restored exactly
    assert not all(torch.equal(index.weight(t), before[t]) for t in targets)
    patcher.restore()
    assert all(torch.equal(index.weight(t), before[t]) for t in targets)


@pytest.mark.parametrize("kind", ["oft", "ia3"])
def test_a_merge_with_an_adapter_that_reads_the_weight_uses_the_original(kind, fresh_sd1, tmp_path):
    """A LoRA and an OFT/IA3 (whose delta reads the weight) on one float32 layer: the merged weight is the original
    plus both deltas of the original (the in-place merge is only for adapters that do not read the weight)."""
    index = ModelIndex(fresh_sd1)
    target = la.lycoris_targets(index)["conv3x3"]
    from lora_factory import LoraSpec, make_kohya_lora
    save_file(make_kohya_lora(index, [target], LoraSpec(rank=4, alpha=2.0), seed=1), str(tmp_path / "l.safetensors"))
    save_file(make_lycoris(index, [target], kind, seed=4), str(tmp_path / "o.safetensors"))
    nets = [load_network(tmp_path / f"{n}.safetensors", index) for n in ("l", "o")]
    assert nets[1].adapters[target].needs_base
    w0 = index.weight(target).detach().clone()
    want = w0.double() + sum(0.8 * net.adapters[target].delta_weight(w0).double() for net in nets)
    with Patcher(index) as patcher:
        patcher.apply([e for net in nets for e in net.plan(index, 0.8, 0.8)], "merged")
        assert rel_err(index.weight(target).detach(), want) < 1e-6
    assert torch.equal(index.weight(target), w0)


@contextmanager
def counting_convs():
    """The convolutions the adapters' module runs inside the block (``F.conv2d`` as ``lora_core.adapters.base``
    sees it)."""
    import lora_core.adapters.base as base_module

    calls: list[str] = []
    real = base_module.F

    class Counting:
        def __getattr__(self, name):
            return getattr(real, name)

        def conv2d(self, *args, **kwargs):
            calls.append("conv2d")
            return real.conv2d(*args, **kwargs)

    base_module.F = Counting()
    try:
        yield calls
    finally:
        base_module.F = real


@pytest.mark.parametrize("case_id", ["loha", "loha_tucker"])
def test_conv_form_adds_into_the_output_in_either_layout(case_id, fresh_sd1, tmp_path):
    """``add_to`` (the hook's in-place path while sampling) adds ``m * fn(x)``; the 1x1 up runs as one GEMM into
    the output in its own layout (channel-by-pixel matrices for a contiguous one, a pixel-by-channel matrix for a
    channels-last one), whatever the input's layout."""
    index = ModelIndex(fresh_sd1)
    for role, module, adapter in forms(index, case_id, tmp_path):
        op = LayerOp.of(module)
        if not op.is_conv:
            continue
        fn = adapter.low_rank_bypass(op, torch.device("cpu"), torch.float32, None)
        assert isinstance(fn, ConvBypass) or role == "conv1x1"
        layouts = (torch.contiguous_format, torch.channels_last)
        for x_layout, out_layout in [(a, b) for a in layouts for b in layouts]:  # A1111 hands either, mixed too
            x = layer_x(module, torch.float32).contiguous(memory_format=x_layout)
            with torch.no_grad():
                y = module(x).contiguous(memory_format=out_layout)
                want = y.double() + 0.6 * dense_output(adapter, module, x)
                with counting_convs() as convs:
                    fn.add_to(y, x, 0.6)
            downs = 0 if isinstance(fn, PointwiseConvBypass) else 1 + (fn.mid is not None)  # the up is a GEMM
            assert len(convs) == downs, (role, x_layout, out_layout)
            assert y.is_contiguous(memory_format=out_layout)
            assert rel_err(y, want) < 1e-5, (case_id, role, x_layout, out_layout)


# ---------------------------------------------------------------- DoRA
DORA_SPECS = {"kohya_columns": dict(dora=True), "peft_rows": dict(dora=True, dora_on_out=True),
              "tucker_columns": dict(dora=True, tucker=True)}


def dora_network(index: ModelIndex, spec_id: str, tmp_path, seed: int = 0):
    """A kohya-named DoRA LoRA on the roles' layers, its tensors per target (for the independent oracle)."""
    from lora_factory import LoraSpec, make_kohya_lora
    targets = {role: la.lycoris_targets(index)[role] for role in ROLES}
    state = make_kohya_lora(index, targets.values(), LoraSpec(rank=4, alpha=2.0, std=0.5, **DORA_SPECS[spec_id]),
                            seed=seed)
    path = tmp_path / f"dora_{spec_id}.safetensors"
    save_file(state, str(path))
    per_target = {t: {k.split(".", 1)[1]: v for k, v in state.items() if k.split(".", 1)[0] == kohya_name_of(index, t)}
                  for t in targets.values()}
    return targets, load_network(path, index), per_target


def dora_oracle(tensors: dict, module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The layer's op on lora_factory's DoRA delta (SPEC §6, written without lora_core), in float64."""
    from lora_factory import expected_delta
    return LayerOp.of(module)(x.double(), expected_delta(tensors, module.weight.detach().double()))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=["fp32", "fp16", "bf16"])
@pytest.mark.parametrize("spec_id", list(DORA_SPECS))
def test_dora_form_equals_the_dense_delta(spec_id, dtype, fresh_sd1, tmp_path):
    """DoRA holds no delta in bypass: the norms of ``W0 + dW`` once, then the plain low-rank form on a scaled input
    (norms per input column) or output (per output row); against an oracle written without lora_core."""
    index = ModelIndex(fresh_sd1)
    targets, net, tensors = dora_network(index, spec_id, tmp_path)
    fresh_sd1.to(dtype)
    for role, target in targets.items():
        module = index.module(target)
        fn = net.adapters[target].low_rank_bypass(LayerOp.of(module), torch.device("cpu"), dtype, None)
        assert isinstance(fn, DoraForm), (spec_id, role)
        assert fn.on_out is (spec_id == "peft_rows")
        x = layer_x(module, dtype)
        with torch.no_grad():
            got = fn.from_output(x, module(x), module)
        want = dora_oracle(tensors[target], module, x)
        assert got.dtype == dtype and got.shape == want.shape
        assert rel_err(got, want) < (1e-5 if dtype == torch.float32 else TOLERANCE[dtype]), (spec_id, role)


@pytest.mark.parametrize("spec_id", ["kohya_columns", "peft_rows"])
def test_a_wrong_dora_form_fails_the_same_check(spec_id, fresh_sd1, tmp_path):
    """Two plausible mistakes, rejected by the oracle that the right form passes: norms of ``W0`` alone (``dW``
    left out of them), and the scales applied to the plain form only (forgetting that DoRA also rescales ``W0``)."""
    index = ModelIndex(fresh_sd1)
    targets, net, tensors = dora_network(index, spec_id, tmp_path)

    class PlainOnly(DoraForm):
        def from_output(self, x, y, module):
            scale, _ = self.scales(module.weight, x.device, x.dtype)
            return self.plain(x) * scale if self.on_out else self.plain(x * scale)

    for role, target in targets.items():
        module = index.module(target)
        right = net.adapters[target].low_rank_bypass(LayerOp.of(module), torch.device("cpu"), torch.float32, None)
        parts = (right.plain, right.plain_delta, right.magnitude, right.op, right.shape, right.on_out)
        norms_of_w0 = DoraForm(right.plain, lambda device: torch.zeros(right.shape, device=device), *parts[2:])
        x = layer_x(module, torch.float32)
        want = dora_oracle(tensors[target], module, x)
        with torch.no_grad():
            y = module(x)
            assert rel_err(right.from_output(x, y, module), want) < 1e-5
            for wrong in (norms_of_w0, PlainOnly(*parts)):
                assert rel_err(wrong.from_output(x, y, module), want) > 1e-2, (spec_id, role, type(wrong))


def test_dora_norms_follow_the_base_weight(fresh_sd1, tmp_path):
    """The scales are computed once per base weight: a second call reuses them, and a weight changed in place
    (another checkpoint loaded into the same layer) gets new ones."""
    index = ModelIndex(fresh_sd1)
    targets, net, tensors = dora_network(index, "kohya_columns", tmp_path)
    target = targets["conv3x3"]
    module = index.module(target)
    fn = net.adapters[target].low_rank_bypass(LayerOp.of(module), torch.device("cpu"), torch.float32, None)
    x = layer_x(module, torch.float32)
    with torch.no_grad():
        first = fn.scales(module.weight, x.device, x.dtype)
        assert fn.scales(module.weight, x.device, x.dtype) is first
        module.weight.mul_(1.5)
        assert rel_err(fn.from_output(x, module(x), module), dora_oracle(tensors[target], module, x)) < 1e-5
    assert fn.scales(module.weight, x.device, x.dtype) is not first


@pytest.mark.parametrize("spec_id", ["kohya_columns", "peft_rows"])
def test_a_dora_set_runs_in_bypass_holding_nothing_full_size(spec_id, monkeypatch, fresh_sd1, tmp_path):
    """With no room for full-size deltas, a DoRA LoRA stays in bypass holding factors only, and the UNet's output
    equals the merged one (through the hook, weight changes included)."""
    monkeypatch.undo()
    index = ModelIndex(fresh_sd1)
    from lora_factory import LoraSpec, make_kohya_lora
    chosen = [t for t in pick_targets(index, kinds=(nn.Linear, nn.Conv2d)) if not index.is_text_encoder(t)][::3]
    save_file(make_kohya_lora(index, chosen, LoraSpec(rank=4, alpha=2.0, std=0.5, **DORA_SPECS[spec_id]), seed=3),
              str(tmp_path / "dora.safetensors"))
    runtime = LoraRuntime(LoraLibrary([tmp_path]), bypass_budget=0)
    runtime.bind(fresh_sd1)
    inputs = make_inputs(fresh_sd1, "sd1")
    for weight in ("0.8", "-0.5"):
        result = runtime.activate([["dora", weight]])
        assert result.mode == "bypass", result.reason
        assert runtime._active[0].network.dense_bypass_bytes(index) == 0
        with torch.no_grad():
            got = run_unet(fresh_sd1, inputs)
        assert not any("dense" in k for k in runtime.patcher.cache._items)
        runtime.restore()
        with Patcher(index) as merged, torch.no_grad():
            merged.apply(load_network(tmp_path / "dora.safetensors", index).plan(index, float(weight), float(weight)),
                         "merged")
            want = run_unet(fresh_sd1, inputs)
        assert rel_err(got, want) < 1e-5, weight


# ---------------------------------------------------------------- the forms' sizes, from shapes
LORA_SPECS = {"plain": {}, "tucker": dict(tucker=True), "dora_columns": dict(dora=True),
              "dora_rows": dict(dora=True, dora_on_out=True), "bias": dict(bias=True)}


def every_case_network(request, tmp_path):
    """(case, index, network) for every LyCORIS case of test_lycoris_a/b and kohya LoRAs of each kind."""
    from lora_factory import LoraSpec, make_kohya_lora
    indexes = {family: ModelIndex(request.getfixturevalue(f"fresh_{family}")) for family in ("sd1", "sd2")}
    for seed, (case_id, case) in enumerate(la.CASES.items()):
        index = indexes[case.family]
        for role in case.roles:
            target, net = a_network(index, case_id, role, tmp_path, seed)
            yield f"{case_id} {role}", index, net
    for seed, case_id in enumerate(lb.CASES):
        for role in ROLES:
            target, net = b_network(indexes["sd1"], case_id, role, tmp_path, seed)
            yield f"{case_id} {role}", indexes["sd1"], net
    targets = [la.lycoris_targets(indexes["sd1"])[role] for role in ROLES]
    gen = torch.Generator().manual_seed(2)
    wide = {}  # LoHa of a rank the cost model refuses: r1 * r2 * (out + in) > out * in
    for target in targets:
        shape, name = indexes["sd1"].weight_shape(target), kohya_name_of(indexes["sd1"], target)
        rank, rest = max(shape[:2]), numel(shape[1:])
        for w in ("w1", "w2"):
            wide[f"{name}.hada_{w}_a"] = torch.randn(shape[0], rank, generator=gen)
            wide[f"{name}.hada_{w}_b"] = torch.randn(rank, rest, generator=gen)
    save_file(wide, str(tmp_path / "loha_wide.safetensors"))
    yield "loha wide", indexes["sd1"], load_network(tmp_path / "loha_wide.safetensors", indexes["sd1"])
    for seed, (spec_id, spec) in enumerate(LORA_SPECS.items()):
        path = tmp_path / f"lora_{spec_id}.safetensors"
        save_file(make_kohya_lora(indexes["sd1"], targets, LoraSpec(rank=4, std=0.5, **spec), seed=seed), str(path))
        yield f"lora {spec_id}", indexes["sd1"], load_network(path, indexes["sd1"])


def macs_mismatches(request, tmp_path) -> tuple[list, Counter]:
    """Targets where an adapter's ``bypass_macs`` differs from the default's (the form built on the meta device),
    and a count of what was compared: (adapter class, whether it has a form)."""
    wrong, seen = [], Counter()
    for case, index, net in every_case_network(request, tmp_path):
        for target, adapter in net.adapters.items():
            module = index.module(target)
            if isinstance(module, nn.MultiheadAttention):  # never asked: recomputed with full deltas
                continue
            op = LayerOp.of(module, target.part)
            for dyn in (None, 2):
                got, want = adapter.bypass_macs(op, dyn), Adapter.bypass_macs(adapter, op, dyn)
                seen[type(adapter).__name__, want is not None] += 1
                if got != want:
                    wrong.append((case, target.module, dyn, got, want))
    return wrong, seen


@pytest.mark.parametrize("choice", ["forced", "cost model"])
def test_shapes_give_each_forms_size_without_building_it(choice, monkeypatch, request, tmp_path):
    """The first use of a file asks each target what its factored form multiplies per row (the mode choice, the cost
    model). LoRA, LoHa, LoKr and IA3 answer from their shapes (building the form on the meta device took 0.1-0.3 s
    for a full-preset SD1.5 LoHa or LoKr): the built form's ``macs``, or None where none is built, in every case,
    with factored forms forced and with the cost model's own choice, which refuses some here."""
    if choice == "cost model":
        monkeypatch.setattr(cost, "factored_is_cheaper", COST_MODEL)
    wrong, seen = macs_mismatches(request, tmp_path)
    assert not wrong, wrong[:5]
    for name in ("LoraAdapter", "LohaAdapter", "LokrAdapter", "IA3Adapter"):
        assert seen[name, True] > 0, (name, seen)
    assert seen["LoraAdapter", False] > 0  # a bias: no form
    assert (seen["LohaAdapter", False] > 0) is (choice == "cost model"), seen  # the wide LoHa


def test_a_wrong_size_fails_the_same_check(monkeypatch, request, tmp_path):
    """LoHa's answer forgetting what its DoRA form adds per row: the comparison above catches it."""
    monkeypatch.setattr(LohaAdapter, "bypass_macs",
                        lambda self, op, dyn: self.factored_macs() if self._has_factored_form(op) else None)
    wrong, _ = macs_mismatches(request, tmp_path)
    assert wrong and all(case.startswith("loha_dora") for case, *_ in wrong), wrong[:5]
