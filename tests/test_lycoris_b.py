"""IA3, OFT/BOFT and GLoRA against LyCORIS itself (SPEC §5, §6).

The oracle is the ``lycoris-lora`` package: each of its modules is built on a float32 copy of a real layer of the
tiny models (a linear ``attn2.to_k``, a 1x1 conv (SD1 ``proj_in``, SD2's 32 -> 64 ``skip_connection``), a resnet's
3x3 ``in_layers.2``, a stride-2 conv, and each q/k/v/out projection of SD2's OpenCLIP ``MultiheadAttention``,
held by LyCORIS as a plain ``nn.Linear``), given random non-zero weights (LyCORIS zero-inits), and its state dict
is saved under the layer's kohya name. We load that file with ``load_network`` and compare our delta with
LyCORIS's ``get_diff_weight``, and our bypass and merged outputs with LyCORIS's own forward at the same multiplier.

Where LyCORIS's multiplier is not linear, we follow A1111's ``W0 + m * dW(1)`` and match
``W0 + m * get_diff_weight(1)``; at m = 1 all agree. BOFT moves each butterfly stage toward I (checked to differ
at m != 1); diag-OFT with ``rescale`` would leave ``(rescale - 1) W0`` unscaled, but lycoris-lora 4.1.3 cannot
compute it at m != 1 (a shape error in its unfused path), so that case is compared at m = 1 only.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Callable

import pytest
import torch
from lycoris.modules.boft import ButterflyOFTModule
from lycoris.modules.diag_oft import DiagOFTModule
from lycoris.modules.glora import GLoRAModule
from lycoris.modules.ia3 import IA3Module
from safetensors.torch import save_file
from torch import nn

import tiny_models
from lora_core.model_index import ModelIndex, Target
from lora_core.network import load_network
from lora_core.patch import Patcher
from lora_factory import kohya_name_of, assert_both_modes_give
from test_lora_math import TOLERANCE, explicit_layer, layer_input, layer_targets, rel_err, run_layer

MULTIPLIERS = (1.0, -0.6)
ROLES = ("linear", "conv1x1", "conv3x3", "conv_stride2", "mha_q", "mha_k", "mha_v", "mha_out")


@dataclass(frozen=True)
class Case:
    algorithm: str  # ours
    build: Callable[[nn.Module], nn.Module]  # the LyCORIS module on a standalone layer
    #: how LyCORIS's own multiplier behaves: 'linear' (W0 + m * dW(1), as ours), 'bends' (differs at m != 1),
    #: 'unusable' (LyCORIS fails at m != 1)
    lycoris_m: str = "linear"
    roles: tuple[str, ...] = ROLES
    #: the file's tensors from LyCORIS's module (old layouts are derived from the current one)
    tensors: Callable[[nn.Module], dict[str, torch.Tensor]] = lambda lyco: dict(lyco.state_dict())


def old_glora(lyco: nn.Module) -> dict[str, torch.Tensor]:
    """LyCORIS 2.x named GLoRA's factors down-then-up: the same matrices under swapped names."""
    sd = lyco.state_dict()
    return {"a1.weight": sd["a2.weight"], "a2.weight": sd["a1.weight"], "b1.weight": sd["b2.weight"],
            "b2.weight": sd["b1.weight"], "alpha": sd["alpha"]}


CASES = {
    "ia3_out": Case("ia3", lambda org: IA3Module("t", org)),
    "ia3_on_input": Case("ia3", lambda org: IA3Module("t", org, train_on_input=True)),
    "oft": Case("oft", lambda org: DiagOFTModule("t", org, lora_dim=4)),
    "oft_constrained": Case("oft", lambda org: DiagOFTModule("t", org, lora_dim=4, constraint=3e-3)),
    "oft_rescaled": Case("oft", lambda org: DiagOFTModule("t", org, lora_dim=8, rescaled=True), lycoris_m="unusable"),
    # LyCORIS 2.0-2.1 saved R itself as ``oft_diag``
    "oft_diag_old": Case("oft", lambda org: DiagOFTModule("t", org, lora_dim=4),
                         tensors=lambda lyco: {"oft_diag": lyco.get_r().detach()}),
    "boft": Case("oft", lambda org: ButterflyOFTModule("t", org, lora_dim=4), lycoris_m="bends"),
    "boft_constrained_rescaled": Case("oft", lambda org: ButterflyOFTModule("t", org, lora_dim=2, constraint=2e-3,
                                                                            rescaled=True), lycoris_m="bends"),
    "glora": Case("glora", lambda org: GLoRAModule("t", org, lora_dim=3, alpha=2.0)),
    "glora_old_layout": Case("glora", lambda org: GLoRAModule("t", org, lora_dim=3, alpha=2.0),
                             roles=("linear", "conv1x1", "mha_q", "mha_out"), tensors=old_glora),
}


@pytest.fixture(scope="module")
def models() -> dict[str, ModelIndex]:
    """One SD1 and one SD2 model for this module: every test restores them and asserts so."""
    with torch.random.fork_rng(devices=[]):
        return {family: ModelIndex(tiny_models.build(family)) for family in ("sd1", "sd2")}


def oracle_targets(index: ModelIndex) -> dict[str, Target]:
    """test_lora_math's layer roles, with the 3x3 conv taken from a res block as the brief names it."""
    found = layer_targets(index)
    found["conv3x3"] = next(Target(name) for name, m in index.modules.items()
                            if isinstance(m, nn.Conv2d) and name.endswith("in_layers.2"))
    return found


@pytest.fixture(scope="module")
def half_sd2() -> Callable[[torch.dtype], ModelIndex]:
    """SD2 cast to a half dtype, built once per dtype for this module."""
    built: dict[torch.dtype, ModelIndex] = {}

    def get(dtype: torch.dtype) -> ModelIndex:
        if dtype not in built:
            with torch.random.fork_rng(devices=[]):
                built[dtype] = ModelIndex(tiny_models.build("sd2").to(dtype))
        return built[dtype]

    return get


@pytest.fixture(autouse=True)
def no_grad():
    with torch.no_grad():
        yield


def standalone(index: ModelIndex, target: Target) -> nn.Module:
    """A float32 copy of the layer for LyCORIS to wrap; an MHA projection becomes the nn.Linear it is."""
    module = index.module(target)
    if isinstance(module, nn.MultiheadAttention):
        weight = index.weight(target).detach().float()
        linear = nn.Linear(weight.shape[1], weight.shape[0], bias=False)
        linear.weight.data.copy_(weight)
        return linear
    return copy.deepcopy(module).float()


def lycoris_module(case: Case, layer: nn.Module, gen: torch.Generator) -> nn.Module:
    lyco = case.build(layer)
    for name, p in lyco.named_parameters():
        noise = torch.randn(p.shape, generator=gen)
        p.copy_(1 + 0.3 * noise if name == "rescale" else 0.2 * noise)
    return lyco


def save_for(tmp_path, index: ModelIndex, target: Target, tensors: dict[str, torch.Tensor], dtype=None):
    name = kohya_name_of(index, target)
    path = tmp_path / f"{name}.safetensors"
    cast = (lambda v: v.to(dtype) if dtype is not None and v.is_floating_point() and v.dim() else v)
    save_file({f"{name}.{k}": cast(v.detach()).contiguous() for k, v in tensors.items()}, str(path))
    return path


def lycoris_forward(lyco: nn.Module, layer: nn.Module, x: torch.Tensor, m: float) -> torch.Tensor:
    lyco.multiplier = m
    lyco.apply_to()
    try:
        return layer(x)
    finally:
        lyco.restore()


@pytest.mark.parametrize("case_id", list(CASES))
@pytest.mark.parametrize("family", ["sd1", "sd2"])
def test_matches_lycoris_fp32(models, tmp_path, family, case_id):
    case = CASES[case_id]
    index = models[family]
    targets = oracle_targets(index)
    gen = torch.Generator().manual_seed(0)
    assert set(ROLES[:4] if family == "sd1" else ROLES) <= set(targets)
    roles = [role for role in case.roles if role in targets]
    for role in roles:
        target = targets[role]
        module = index.module(target)
        layer = standalone(index, target)
        lyco = lycoris_module(case, layer, gen)
        net = load_network(save_for(tmp_path, index, target, case.tensors(lyco)), index)
        assert list(net.adapters) == [target], (role, net.report.summary())
        assert not net.report.unused, net.report.unused
        adapter = net.adapters[target]
        assert adapter.algorithm == case.algorithm
        base = index.weight(target).detach().clone()
        usable = MULTIPLIERS if case.lycoris_m != "unusable" else (1.0,)
        lyco_dw = {m: lyco.get_diff_weight(m)[0].reshape(base.shape) for m in usable}
        assert rel_err(adapter.delta_weight(base), lyco_dw[1.0]) < 1e-5, (case_id, role)
        args = layer_input(module, gen, torch.float32)
        before = run_layer(module, args)
        for m in MULTIPLIERS:
            lyco_line = m * lyco_dw[1.0]
            if case.lycoris_m == "linear":
                assert rel_err(lyco_dw[m], lyco_line) < 1e-5
            elif case.lycoris_m == "bends" and m != 1.0:
                assert rel_err(lyco_dw[m], lyco_line) > 1e-3, "LyCORIS's multiplier was expected to bend here"
            want = run_layer(explicit_layer(module, target, lyco_line, 1.0), args)
            assert rel_err(want, before) > 1e-3, f"{case_id} {role}: the adapter must change the output"
            lycoris_is_ours = case.lycoris_m == "linear" or m == 1.0
            if lycoris_is_ours and not isinstance(module, nn.MultiheadAttention):
                assert rel_err(lycoris_forward(lyco, layer, args[0], m), want) < 1e-5, (case_id, role, m)
            assert_both_modes_give(index, net, target, lambda: run_layer(module, args), want, m, (case_id, role))
        assert torch.equal(run_layer(module, args), before)


def test_constraint_and_rescale_matter(models, tmp_path):
    """The cases above would pass with alpha or rescale ignored if they changed nothing: they do."""
    index = models["sd1"]
    target = oracle_targets(index)["conv3x3"]
    gen = torch.Generator().manual_seed(3)
    for case_id, drop in (("oft_constrained", "alpha"), ("oft_rescaled", "rescale"),
                          ("boft_constrained_rescaled", "alpha"), ("boft_constrained_rescaled", "rescale")):
        lyco = lycoris_module(CASES[case_id], standalone(index, target), gen)
        tensors = dict(lyco.state_dict())
        full = load_network(save_for(tmp_path, index, target, tensors), index).adapters[target]
        del tensors[drop]
        partial = load_network(save_for(tmp_path, index, target, tensors), index).adapters[target]
        base = index.weight(target).detach()
        assert rel_err(partial.delta_weight(base), full.delta_weight(base)) > 1e-2, (case_id, drop)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("case_id", ["ia3_on_input", "oft_constrained", "boft", "glora"])
def test_half_precision(half_sd2, tmp_path, case_id, dtype):
    case = CASES[case_id]
    index = half_sd2(dtype)
    gen = torch.Generator().manual_seed(4)
    for role, target in oracle_targets(index).items():
        module = index.module(target)
        layer = standalone(index, target)  # float32 holding the half weights: LyCORIS computes in float32
        lyco = lycoris_module(case, layer, gen)
        for p in lyco.parameters():  # the file is fp16: the oracle uses the same rounded numbers
            p.copy_(p.half().float())
        dw = lyco.get_diff_weight(1.0)[0].reshape(layer.weight.shape)
        net = load_network(save_for(tmp_path, index, target, case.tensors(lyco), torch.float16), index)
        base = index.weight(target).detach().clone()
        args = layer_input(module, gen, dtype)
        want = run_layer(explicit_layer(module, target, 0.8 * dw, 1.0), tuple(a.float() for a in args))
        with Patcher(index) as patcher:
            for mode in ("bypass", "merged"):
                patcher.apply(net.plan(index, 0.8, 0.8), mode)
                got = run_layer(module, args)
                assert got.dtype == dtype
                assert rel_err(got, want) < TOLERANCE[dtype], (case_id, role, mode, rel_err(got, want))
        assert torch.equal(index.weight(target), base)


def test_glora_tucker_core_matches_lycoris_math(models, tmp_path):
    """``bm.weight`` (B's Tucker core on a k x k conv): lycoris-lora 4.1.3 declares it but never builds it (its
    ``use_tucker`` test can never pass), so its weight function is the oracle here."""
    from lycoris.modules.glora import _glora_weight

    index = models["sd1"]
    target = oracle_targets(index)["conv_stride2"]
    out, inp, kh, kw = index.weight_shape(target)
    gen = torch.Generator().manual_seed(5)
    r = 3
    shapes = {"a1.weight": (inp, r, 1, 1), "a2.weight": (r, inp, 1, 1), "b1.weight": (out, r, 1, 1),
              "b2.weight": (r, inp, 1, 1), "bm.weight": (r, r, kh, kw)}
    tensors = {k: 0.2 * torch.randn(shape, generator=gen) for k, shape in shapes.items()}
    net = load_network(save_for(tmp_path, index, target, {**tensors, "alpha": torch.tensor(1.5)}), index)
    assert not net.report.unused
    base = index.weight(target).detach()
    want = _glora_weight(base, *tensors.values(), 1.5 / r)
    assert rel_err(net.adapters[target].delta_weight(base), want) < 1e-5
