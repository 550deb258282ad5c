"""The LoRA adapter on every layer kind of the real tiny models: bypass == merged == W0 + m*dW (SPEC §6).

The oracle is ``lora_factory.expected_delta`` (the formulas of SPEC §6, written in float64 without lora_core)
run through a copy of the layer whose weight is set explicitly.
"""
from __future__ import annotations

import copy

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from lora_core.model_index import ModelIndex, Target
from lora_core.network import load_network
from lora_core.patch import Patcher
from lora_factory import LoraSpec, expected_delta, kohya_name_of, lora_tensors, assert_both_modes_give

FEATURES = {
    "plain": LoraSpec(),
    "alpha_missing": LoraSpec(alpha=None),
    "alpha_zero": LoraSpec(alpha=0.0),
    "scale_key": LoraSpec(scale_key=0.7),
    "tucker": LoraSpec(tucker=True),
    "dora_in": LoraSpec(dora=True),
    "dora_out": LoraSpec(dora=True, dora_on_out=True),
    "bias": LoraSpec(bias=True),
}


def layer_targets(index: ModelIndex) -> dict[str, Target]:
    """One target per layer kind that LoRA files touch, found in the real model by role."""
    mods = index.modules
    found: dict[str, Target] = {}
    for name, m in mods.items():
        if isinstance(m, nn.Linear) and name.endswith("attn2.to_k") and "linear" not in found:
            found["linear"] = Target(name)
        elif isinstance(m, nn.Conv2d) and m.kernel_size == (1, 1) and "conv1x1" not in found:
            found["conv1x1"] = Target(name)
        elif isinstance(m, nn.Conv2d) and m.kernel_size == (3, 3) and m.stride == (1, 1) and "conv3x3" not in found:
            found["conv3x3"] = Target(name)
        elif isinstance(m, nn.Conv2d) and m.stride == (2, 2) and "conv_stride2" not in found:
            found["conv_stride2"] = Target(name)
        elif isinstance(m, nn.MultiheadAttention) and "mha_q" not in found:
            for part in ("q", "k", "v", "out"):
                found[f"mha_{part}"] = Target(name, part)
    return found


def layer_input(module: nn.Module, gen: torch.Generator, dtype: torch.dtype) -> tuple:
    if isinstance(module, nn.MultiheadAttention):
        x = torch.randn(5, 2, module.embed_dim, generator=gen)
        if module.batch_first:
            x = x.transpose(0, 1)
        return (x.to(dtype),) * 3
    if isinstance(module, nn.Conv2d):
        return (torch.randn(2, module.in_channels, 8, 8, generator=gen).to(dtype),)
    return (torch.randn(2, 3, module.in_features, generator=gen).to(dtype),)


def run_layer(module: nn.Module, args: tuple) -> torch.Tensor:
    out = module(*args, need_weights=False) if isinstance(module, nn.MultiheadAttention) else module(*args)
    return out[0] if isinstance(out, tuple) else out


def explicit_layer(module: nn.Module, target: Target, dw: torch.Tensor, m: float) -> nn.Module:
    ref = copy.deepcopy(module).float()
    with torch.no_grad():
        if isinstance(ref, nn.MultiheadAttention):
            if target.part == "out":
                ref.out_proj.weight += m * dw.float()
            else:
                d = ref.embed_dim
                i = "qkv".index(target.part)
                ref.in_proj_weight[i * d:(i + 1) * d] += m * dw.float()
        else:
            ref.weight += m * dw.float()
    return ref


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30))


def save_lora(tmp_path, index: ModelIndex, target: Target, spec: LoraSpec, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    tensors = lora_tensors(index.weight_shape(target), spec, gen)
    name = kohya_name_of(index, target)
    path = tmp_path / f"{name}_{seed}.safetensors"
    save_file({f"{name}.{k}": v.contiguous() for k, v in tensors.items()}, str(path))
    return path, tensors


@pytest.mark.parametrize("feature", list(FEATURES))
@pytest.mark.parametrize("family", ["sd1", "sd2"])
def test_bypass_merged_explicit_agree_fp32(family, feature, request, tmp_path):
    root = request.getfixturevalue(f"fresh_{family}")
    index = ModelIndex(root)
    spec = FEATURES[feature]
    targets = layer_targets(index)
    assert {"linear", "conv3x3", "conv_stride2"} <= set(targets)
    if family == "sd2":
        assert "mha_q" in targets  # OpenCLIP's q/k/v live in in_proj_weight
    gen = torch.Generator().manual_seed(1)
    for role, target in targets.items():
        if spec.tucker and role not in ("conv3x3", "conv_stride2"):
            continue
        path, tensors = save_lora(tmp_path, index, target, spec)
        net = load_network(path, index)
        assert list(net.adapters) == [target], (role, net.report.summary())
        module = index.module(target)
        base = index.weight(target).detach().clone()
        dw = expected_delta(tensors, base)
        args = layer_input(module, gen, torch.float32)
        before = run_layer(module, args)
        for m in (1.0, -0.6):
            want = run_layer(explicit_layer(module, target, dw, m), args)
            assert rel_err(want, before) > 1e-4, f"{role}: the LoRA must change the output"
            assert_both_modes_give(index, net, target, lambda: run_layer(module, args), want, m, (role, feature))
        assert torch.equal(run_layer(module, args), before)


@pytest.mark.parametrize("dyn", [1, 2, 3])
def test_dyn_keeps_first_ranks_and_the_scale(fresh_sd1, tmp_path, dyn):
    index = ModelIndex(fresh_sd1)
    target = layer_targets(index)["linear"]
    path, tensors = save_lora(tmp_path, index, target, LoraSpec(rank=4, alpha=2.0))
    net = load_network(path, index)
    module = index.module(target)
    args = layer_input(module, torch.Generator().manual_seed(0), torch.float32)
    want = run_layer(explicit_layer(module, target, expected_delta(tensors, module.weight, dyn=dyn), 1.0), args)
    full = run_layer(explicit_layer(module, target, expected_delta(tensors, module.weight), 1.0), args)
    assert rel_err(want, full) > 1e-4
    with Patcher(index) as patcher:
        for mode in ("bypass", "merged"):
            patcher.apply(net.plan(index, 1.0, 1.0, dyn=dyn), mode)
            assert rel_err(run_layer(module, args), want) < 1e-5


TOLERANCE = {torch.float16: 3e-3, torch.bfloat16: 2e-2}


def assert_modes_in_dtype(index: ModelIndex, net, target: Target, args: tuple, want: torch.Tensor,
                          dtype: torch.dtype, role: str) -> None:
    """At multiplier 0.8, bypass and merged each give ``want`` within the dtype's tolerance, in the layer's dtype,
    and leave the weight as it was."""
    module = index.module(target)
    base = index.weight(target).detach().clone()
    with Patcher(index) as patcher:
        for mode in ("bypass", "merged"):
            patcher.apply(net.plan(index, 0.8, 0.8), mode)
            got = run_layer(module, args)
            assert got.dtype == dtype
            assert rel_err(got, want) < TOLERANCE[dtype], (role, mode, rel_err(got, want))
    assert torch.equal(index.weight(target), base)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("feature", ["plain", "tucker", "dora_in"])
def test_half_precision(fresh_sd2, tmp_path, dtype, feature):
    root = fresh_sd2.to(dtype)
    index = ModelIndex(root)
    spec = FEATURES[feature]
    gen = torch.Generator().manual_seed(2)
    for role, target in layer_targets(index).items():
        if spec.tucker and role not in ("conv3x3", "conv_stride2"):
            continue
        path, tensors = save_lora(tmp_path, index, target, LoraSpec(**{**spec.__dict__, "dtype": torch.float16}))
        net = load_network(path, index)
        module = index.module(target)
        base = index.weight(target).detach().clone()
        args = layer_input(module, gen, dtype)
        want = run_layer(explicit_layer(module, target, expected_delta(tensors, base.float()), 0.8),
                         tuple(a.float() for a in args))
        assert_modes_in_dtype(index, net, target, args, want, dtype, role)


def test_fp8_weights_use_bypass_even_when_merged_is_asked(fresh_sd1, tmp_path):
    if not hasattr(torch, "float8_e4m3fn"):
        pytest.skip("this torch has no float8")
    index = ModelIndex(fresh_sd1)
    target = layer_targets(index)["linear"]
    module = index.module(target)
    path, tensors = save_lora(tmp_path, index, target, LoraSpec())
    net = load_network(path, index)
    with torch.no_grad():
        module.weight.data = module.weight.data.to(torch.float8_e4m3fn)
    stored = module.weight.detach().clone()
    x = torch.randn(2, 3, module.in_features)
    w0 = stored.float()
    want = torch.nn.functional.linear(x, w0 + expected_delta(tensors, w0).float(), module.bias)

    def fp8_linear(mod, args):  # what A1111's FP8 mode does: cast the stored weight for the matmul
        return torch.nn.functional.linear(args[0], mod.weight.float(), mod.bias)

    with Patcher(index) as patcher:
        patcher.apply(net.plan(index, 1.0, 1.0), "merged")
        assert patcher.layer_mode(target.module) == "bypass"
        y = fp8_linear(module, (x,))
        for hook in module._forward_hooks.values():
            y = hook(module, (x,), y)
        assert rel_err(y, want) < 1e-5
    assert torch.equal(module.weight.view(torch.uint8), stored.view(torch.uint8))


@pytest.mark.parametrize("kind", ["linear", "conv1x1", "conv3x3"])
def test_bypass_adds_into_the_output_while_sampling_and_makes_a_new_tensor_under_autograd(fresh_sd1, tmp_path, kind):
    """Under no_grad the hook accumulates into the layer's own output (one addmm_ for a LoRA Linear); with
    autograd on it returns a new tensor. Both give the explicit W0 + m*dW layer, and gradients still flow."""
    index = ModelIndex(fresh_sd1)
    target = layer_targets(index)[kind]
    module = index.module(target)
    path, tensors = save_lora(tmp_path, index, target, LoraSpec())
    net = load_network(path, index)
    args = layer_input(module, torch.Generator().manual_seed(3), torch.float32)
    want = run_layer(explicit_layer(module, target, expected_delta(tensors, module.weight.detach().float()), 0.7),
                     args).detach()
    outputs = []
    module.register_forward_hook(lambda mod, a, out: outputs.append(out))  # sees the layer's own output first
    with Patcher(index) as patcher:
        patcher.apply(net.plan(index, 0.7, 0.7), "bypass")
        with torch.no_grad():
            y = run_layer(module, args)
        assert y is outputs[-1], "sampling: the delta went into the layer's output, no new tensor"
        if kind == "conv1x1":  # SD1.5's proj_in/proj_out: matmuls over the pixels, not two convolutions
            from lora_core.adapters.base import PointwiseConvBypass
            assert isinstance(patcher._layers[target.module].prepared[(y.device, y.dtype)][0][0], PointwiseConvBypass)
        torch.testing.assert_close(y, want, rtol=1e-5, atol=1e-5)
        x = args[0].clone().requires_grad_(True)
        y2 = run_layer(module, (x,))
        assert y2 is not outputs[-1]
        torch.testing.assert_close(y2.detach(), want, rtol=1e-5, atol=1e-5)
        y2.sum().backward()
        assert x.grad is not None and bool(torch.isfinite(x.grad).all())


def test_linear_bypass_add_to_falls_back_where_the_output_cannot_take_a_gemm():
    from lora_core.adapters.base import LinearBypass

    gen = torch.Generator().manual_seed(0)
    down, up = torch.randn(4, 6, generator=gen), torch.randn(5, 4, generator=gen)
    fn = LinearBypass(down, up, 0.5)
    x = torch.randn(2, 3, 6, generator=gen)
    want_h = (x @ down.T @ up.T) * 0.5
    torch.testing.assert_close(fn(x), want_h)
    for out in (torch.randn(2, 3, 5, generator=gen),                      # contiguous: addmm_
                torch.randn(3, 2, 5, generator=gen).transpose(0, 1),      # not contiguous: add_
                torch.randn(2, 3, 5, generator=gen).half()):              # another dtype: add_
        expected = out.float() + 0.3 * want_h
        fn.add_to(out, x, 0.3)
        torch.testing.assert_close(out.float(), expected, rtol=2e-3 if out.dtype == torch.half else 1e-5,
                                   atol=2e-3 if out.dtype == torch.half else 1e-5)


def test_pointwise_conv_bypass_matches_the_two_convolutions_in_either_layout(monkeypatch):
    """Contiguous and channels-last inputs (A1111's CPU UNet hands proj_in/proj_out channels-last tensors) take
    matmuls, never the two convolutions; an output of the other layout or dtype takes a plain addition."""
    from lora_core.adapters.base import PointwiseConvBypass

    gen = torch.Generator().manual_seed(1)
    down, up = torch.randn(4, 6, 1, 1, generator=gen), torch.randn(5, 4, 1, 1, generator=gen)
    fn = PointwiseConvBypass(down, up, 0.5)
    x = torch.randn(2, 6, 3, 4, generator=gen)
    want_h = torch.nn.functional.conv2d(torch.nn.functional.conv2d(x, down), up) * 0.5
    last = torch.channels_last

    def no_conv(*a, **k):
        raise AssertionError("a 4-D input in either layout must not run the convolutions")

    monkeypatch.setattr(torch.nn.functional, "conv2d", no_conv)
    torch.testing.assert_close(fn(x), want_h)
    h_last = fn(x.to(memory_format=last))
    torch.testing.assert_close(h_last, want_h)
    assert h_last.is_contiguous(memory_format=last), "the result keeps the input's layout"
    for xin in (x, x.to(memory_format=last)):
        for out in (torch.randn(2, 5, 3, 4, generator=gen),                          # NCHW
                    torch.randn(2, 5, 3, 4, generator=gen).to(memory_format=last),   # channels-last
                    torch.randn(2, 5, 3, 4, generator=gen).half()):                  # another dtype: add_
            expected = out.float() + 0.3 * want_h
            fn.add_to(out, xin, 0.3)
            half = out.dtype == torch.half
            torch.testing.assert_close(out.float(), expected, rtol=2e-3 if half else 1e-5,
                                       atol=2e-3 if half else 1e-5)
    monkeypatch.undo()
    odd = x[:, :, :, ::2]  # neither layout: the two convolutions
    torch.testing.assert_close(fn(odd), torch.nn.functional.conv2d(torch.nn.functional.conv2d(odd, down), up) * 0.5)


def test_bypass_on_a_channels_last_unet_matches_merged_and_keeps_proj_in_out_off_the_convolutions(
        fresh_sd1, tmp_path, monkeypatch):
    """A1111's CPU UNet hands SD1's 1x1 proj_in/proj_out channels-last tensors: the real tiny SD1 UNet in that
    layout gives the merged model's output in bypass, and those layers' deltas run as pixel-by-channel matmuls."""
    import tiny_models
    from lora_core.adapters.base import PointwiseConvBypass
    from lora_factory import make_kohya_lora, pick_targets

    index = ModelIndex(fresh_sd1)
    targets = [t for t in pick_targets(index, kinds=(nn.Linear, nn.Conv2d)) if not index.is_text_encoder(t)]
    pointwise = [t for t in targets if t.module.endswith((".proj_in", ".proj_out"))]
    assert pointwise and all(isinstance(index.module(t), nn.Conv2d) for t in pointwise)
    path = tmp_path / "cl.safetensors"
    save_file({k: v.contiguous() for k, v in make_kohya_lora(index, targets, LoraSpec(rank=4)).items()}, str(path))
    net = load_network(path, index)
    fresh_sd1.model.diffusion_model.to(memory_format=torch.channels_last)
    inputs = tiny_models.make_inputs(fresh_sd1, batch=2)
    inputs["x"] = inputs["x"].contiguous(memory_format=torch.channels_last)
    rows_used = []
    real_rows = PointwiseConvBypass._rows
    monkeypatch.setattr(PointwiseConvBypass, "_rows",
                        staticmethod(lambda x: rows_used.append(real_rows(x) is not None) or real_rows(x)))
    with Patcher(index) as patcher:
        patcher.apply(net.plan(index, 0.8, 0.8), "merged")
        want = tiny_models.run_unet(fresh_sd1, inputs)
        patcher.restore()  # (bypass over merged weights would only add the difference: nothing)
        patcher.apply(net.plan(index, 0.8, 0.8), "bypass")
        got = tiny_models.run_unet(fresh_sd1, inputs)
    assert any(rows_used), "no proj_in/proj_out input came channels-last: the test does not test the layout"
    rel = ((got - want).norm() / want.norm()).item()
    assert rel < 1e-5, rel
