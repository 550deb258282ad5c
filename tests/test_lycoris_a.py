"""LoHa, LoKr, Full and Norm against the lycoris-lora package itself (SPEC §5, §6).

Each case builds LyCORIS's own module (``LohaModule``, ``LokrModule``, ``FullModule``, ``NormModule``) on a float32
copy of a real layer of the tiny models, gives every factor random non-zero values (LyCORIS zero-inits one),
saves its state dict under the kohya name LyCORIS writes (``lora_unet_`` + the module path with ``_``), loads
that file with ``load_network`` and checks our delta, bypass and merged outputs against LyCORIS's forward.

LyCORIS cannot wrap ``nn.MultiheadAttention``; for the OpenCLIP q/k/v/out parts its module is built on an
``nn.Linear`` holding the part's weight, and the MHA output is checked against that delta.

Where LyCORIS and we differ on purpose (see the adapters' docstrings):
- its ``get_diff_weight``/``merge_to`` apply alpha/rank twice for LoHa/LoKr; the oracle is its forward
  (``get_weight``, scale once), which is what training saw and what A1111 applies;
- its DoRA forward at multiplier m is ``W * (m * (s/|W| - 1) + 1)``, not linear in m; ours (and A1111's)
  scales ``W' - W0``. DoRA is compared with LyCORIS at m = 1 and with ``W0 + m (W'(1) - W0)`` otherwise.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Callable

import pytest
import torch
from safetensors.torch import save_file
from torch import nn
from torch.overrides import TorchFunctionMode

from lora_core.adapters import LayerOp, TargetInfo, build_adapter
from lora_core.model_index import MHA_PARTS, ModelIndex, Target
from lora_core.network import load_network
from lora_core.patch import Patcher
from lora_factory import kohya_name_of, assert_both_modes_give
from test_lora_math import TOLERANCE, assert_modes_in_dtype, rel_err, run_layer

lycoris = pytest.importorskip("lycoris.modules")
from lycoris.modules import FullModule, LohaModule, LokrModule, NormModule  # noqa: E402

MULTIPLIERS = (1.0, -0.6)


@dataclass(frozen=True)
class Case:
    family: str
    roles: tuple[str, ...]
    make: Callable[[nn.Module], nn.Module]  # the LyCORIS module on a layer
    edit: Callable[[dict], None] = lambda sd: None  # changes to the saved state dict (alpha edits)
    dora: bool = False
    std: float = 0.3
    writes: frozenset[str] = frozenset()  # parameter names the case must produce (what its name promises)


def loha(**kw):
    return lambda layer: LohaModule("oracle", layer, 1.0, bypass_mode=False, **kw)


def lokr(**kw):
    return lambda layer: LokrModule("oracle", layer, 1.0, bypass_mode=False, **kw)


def full(layer):
    return FullModule("oracle", layer, 1.0, bypass_mode=False)


def norm(layer):
    return NormModule("oracle", layer, 1.0)


def set_alpha(value):
    def edit(sd):
        for k in [k for k in sd if k.endswith(".alpha")]:
            if value is None:
                del sd[k]
            else:
                sd[k] = torch.tensor(float(value))
    return edit


LINEAR_CONVS = ("linear", "conv1x1", "conv3x3", "conv_stride2")
KXK = ("conv3x3", "conv_stride2")
MHA = tuple(f"mha_{p}" for p in (*MHA_PARTS, "out"))
DORA = frozenset({"dora_scale"})

CASES = {
    "loha": Case("sd1", LINEAR_CONVS, loha(lora_dim=4, alpha=2.0)),
    "loha_mha": Case("sd2", MHA, loha(lora_dim=4, alpha=8.0)),
    "loha_tucker": Case("sd1", KXK, loha(lora_dim=3, alpha=1.0, use_tucker=True),
                        writes=frozenset({"hada_t1", "hada_t2"})),
    "loha_dora_out": Case("sd1", ("linear", "conv3x3"), loha(lora_dim=4, alpha=2.0, weight_decompose=True,
                                                             wd_on_out=True), dora=True, writes=DORA),
    "loha_dora_in": Case("sd2", ("linear", "conv3x3", "mha_v"),
                         loha(lora_dim=4, alpha=2.0, weight_decompose=True, wd_on_out=False), dora=True,
                         writes=DORA),
    "loha_alpha_missing": Case("sd1", ("linear",), loha(lora_dim=4, alpha=None), set_alpha(None)),
    "loha_alpha_zero": Case("sd1", ("conv3x3",), loha(lora_dim=4, alpha=None), set_alpha(0)),
    # w1 full (4, 4), w2 decomposed: (8, r) @ (r, 8 [* 9])
    "lokr": Case("sd1", LINEAR_CONVS, lokr(lora_dim=2, alpha=3.0), writes=frozenset({"lokr_w1", "lokr_w2_a"})),
    "lokr_mha": Case("sd2", MHA, lokr(lora_dim=2, alpha=1.0)),
    "lokr_both_decomposed": Case("sd1", LINEAR_CONVS, lokr(lora_dim=1, alpha=3.0, decompose_both=True),
                                 writes=frozenset({"lokr_w1_a", "lokr_w2_a"})),
    # w1 (32, 2) decomposed at rank 8, w2 (2, 16, 1, 1) full: the rank comes from w1
    "lokr_w1_decomposed": Case("sd2", ("conv1x1",), lokr(lora_dim=8, alpha=2.0, factor=2, decompose_both=True,
                                                         unbalanced_factorization=True),
                               writes=frozenset({"lokr_w1_a", "lokr_w2"})),
    # both factors full: the scale is 1 whatever alpha the file holds
    "lokr_full": Case("sd1", LINEAR_CONVS, lokr(lora_dim=4, full_matrix=True), set_alpha(7.0),
                      writes=frozenset({"lokr_w1", "lokr_w2"})),
    "lokr_tucker": Case("sd1", KXK, lokr(lora_dim=2, alpha=1.0, use_tucker=True), writes=frozenset({"lokr_t2"})),
    "lokr_factor4": Case("sd2", ("conv1x1", "linear"), lokr(lora_dim=2, alpha=4.0, factor=4)),
    "lokr_dora_out": Case("sd1", ("linear", "conv3x3"), lokr(lora_dim=2, alpha=3.0, weight_decompose=True,
                                                             wd_on_out=True), dora=True, writes=DORA),
    "lokr_dora_in": Case("sd1", ("linear", "conv_stride2"), lokr(lora_dim=2, alpha=3.0, weight_decompose=True,
                                                                  wd_on_out=False), dora=True, writes=DORA),
    "full": Case("sd1", LINEAR_CONVS, full, std=0.05, writes=frozenset({"diff", "diff_b"})),
    "full_mha": Case("sd2", MHA, full, std=0.05),
    "norm": Case("sd1", ("group_norm", "layer_norm"), norm, writes=frozenset({"w_norm", "b_norm"})),
}


# ---------------------------------------------------------------- the real layers
def lycoris_targets(index: ModelIndex) -> dict[str, Target]:
    """The layers of the brief, found by role: attn2.to_k, proj_in (1x1 on SD1), a resnet's in_layers.2 (3x3),
    a stride-2 downsampler, a GroupNorm, a LayerNorm and, on SD2, OpenCLIP's q/k/v/out."""
    found: dict[str, Target] = {}
    tests = {
        "linear": lambda n, m: isinstance(m, nn.Linear) and n.endswith("attn2.to_k"),
        "conv1x1": lambda n, m: isinstance(m, nn.Conv2d) and m.kernel_size == (1, 1),
        "conv3x3": lambda n, m: isinstance(m, nn.Conv2d) and n.endswith("in_layers.2"),
        "conv_stride2": lambda n, m: isinstance(m, nn.Conv2d) and m.stride == (2, 2),
        "group_norm": lambda n, m: isinstance(m, nn.GroupNorm),
        "layer_norm": lambda n, m: isinstance(m, nn.LayerNorm) and n.startswith("model."),
    }
    for name, mod in index.modules.items():
        for role, test in tests.items():
            if role not in found and test(name, mod):
                found[role] = Target(name)
        if isinstance(mod, nn.MultiheadAttention) and "mha_q" not in found:
            found.update({f"mha_{p}": Target(name, p) for p in (*MHA_PARTS, "out")})
    return found


def part_linear(index: ModelIndex, target: Target) -> nn.Linear:
    """The nn.Linear that an MHA part computes (what LyCORIS can wrap), float32."""
    mha = index.module(target)
    weight = index.weight(target).detach().float()
    if target.part == "out":
        bias = mha.out_proj.bias
    else:
        i, d = MHA_PARTS.index(target.part), mha.embed_dim
        bias = mha.in_proj_bias[i * d:(i + 1) * d]
    layer = nn.Linear(weight.shape[1], weight.shape[0])
    with torch.no_grad():
        layer.weight.copy_(weight)
        layer.bias.copy_(bias.detach().float())
    return layer


def layer_input(module: nn.Module, gen: torch.Generator, dtype: torch.dtype) -> tuple:
    if isinstance(module, nn.MultiheadAttention):
        x = torch.randn(5, 2, module.embed_dim, generator=gen)
        x = x.transpose(0, 1) if module.batch_first else x
        return (x.to(dtype),) * 3
    if isinstance(module, nn.Conv2d):
        return (torch.randn(2, module.in_channels, 8, 8, generator=gen).to(dtype),)
    if isinstance(module, nn.GroupNorm):
        return (torch.randn(2, module.num_channels, 4, 4, generator=gen).to(dtype),)
    if isinstance(module, nn.LayerNorm):
        return (torch.randn(2, 3, *module.normalized_shape, generator=gen).to(dtype),)
    return (torch.randn(2, 3, module.in_features, generator=gen).to(dtype),)


@torch.no_grad()
def explicit_layer(index: ModelIndex, target: Target, dw: torch.Tensor, db: torch.Tensor | None,
                   m: float) -> nn.Module:
    """A float32 copy of the layer with ``W0 + m dW`` (and ``b0 + m db``) written in."""
    ref = copy.deepcopy(index.module(target)).float()
    with torch.no_grad():
        if isinstance(ref, nn.MultiheadAttention):
            if target.part == "out":
                weight, bias = ref.out_proj.weight, ref.out_proj.bias
            else:
                rows = slice(MHA_PARTS.index(target.part) * ref.embed_dim,
                             (MHA_PARTS.index(target.part) + 1) * ref.embed_dim)
                weight, bias = ref.in_proj_weight[rows], ref.in_proj_bias[rows]
        else:
            weight, bias = ref.weight, ref.bias
        weight += m * dw.reshape(weight.shape)
        if db is not None:
            bias += m * db
    return ref


# ---------------------------------------------------------------- the oracle
@dataclass
class Oracle:
    module: nn.Module  # the LyCORIS module, applied to ``layer``
    layer: nn.Module  # float32 copy of the real layer (or of an MHA part's Linear)
    dw: torch.Tensor  # LyCORIS's delta at multiplier 1
    db: torch.Tensor | None
    state_dict: dict[str, torch.Tensor]


def randomize(module: nn.Module, gen: torch.Generator, std: float, file_dtype: torch.dtype) -> None:
    """Non-zero values everywhere; a DoRA magnitude stays near the weight's norms. Rounded to the file dtype so
    that the oracle and the saved file hold the same numbers."""
    with torch.no_grad():
        for name, p in module.named_parameters():
            if name == "dora_scale":
                p.mul_(torch.rand(p.shape, generator=gen) + 0.5)
            else:
                p.copy_(torch.randn(p.shape, generator=gen) * std)
            p.copy_(p.to(file_dtype).float())


def lycoris_delta(module: nn.Module, layer: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The weight (and bias) change LyCORIS's forward applies at multiplier 1."""
    with torch.no_grad():
        if isinstance(module, (LohaModule, LokrModule)):
            w0 = layer.weight.detach().float()
            dw = module.get_weight(module.shape) * module.scalar
            if module.wd:
                dw = module.apply_weight_decompose(w0 + dw, 1.0) - w0
            return dw, None
        return module.get_diff_weight(1.0)


def build_oracle(index: ModelIndex, target: Target, case: Case, seed: int,
                 file_dtype: torch.dtype = torch.float32) -> Oracle:
    module_of_target = index.module(target)
    layer = part_linear(index, target) if target.part else copy.deepcopy(module_of_target).float()
    lyco = case.make(layer)
    randomize(lyco, torch.Generator().manual_seed(seed), case.std, file_dtype)
    lyco.apply_to()
    dw, db = lycoris_delta(lyco, layer)
    name = kohya_name_of(index, target)
    sd = {f"{name}.{k}": v.detach().to(file_dtype if v.dim() else torch.float32).contiguous()
          for k, v in lyco.state_dict().items()}
    case.edit(sd)
    return Oracle(lyco, layer, dw.detach(), None if db is None else db.detach(), sd)


@torch.no_grad()
def part_output(index: ModelIndex, target: Target, oracle: Oracle, args: tuple, m: float) -> torch.Tensor:
    """What an MHA part's Linear computes with ``W0 + m dW`` (LyCORIS's module wraps that Linear)."""
    layer = part_linear(index, target)
    bias = layer.bias if oracle.db is None else layer.bias + m * oracle.db
    return nn.functional.linear(args[0], layer.weight + m * oracle.dw, bias)


def lycoris_output(oracle: Oracle, args: tuple, m: float) -> torch.Tensor:
    oracle.module.multiplier = m
    with torch.no_grad():
        return oracle.layer(args[0].float())


# ---------------------------------------------------------------- tests
@pytest.mark.parametrize("case_id", list(CASES))
def test_matches_lycoris_fp32(case_id, request, tmp_path):
    case = CASES[case_id]
    index = ModelIndex(request.getfixturevalue(f"fresh_{case.family}"))
    targets = lycoris_targets(index)
    gen = torch.Generator().manual_seed(7)
    written: set[str] = set()
    for seed, role in enumerate(case.roles):
        target = targets[role]
        oracle = build_oracle(index, target, case, seed)
        path = tmp_path / f"{role}.safetensors"
        save_file(oracle.state_dict, str(path))
        net = load_network(path, index)
        written |= {k.split(".", 1)[1] for k in oracle.state_dict}
        assert list(net.adapters) == [target], (role, net.report.summary())
        assert not net.report.unused and not net.report.problems, net.report.summary()
        adapter = net.adapters[target]
        assert adapter.algorithm == case_id.split("_")[0]

        module = index.module(target)
        base = index.weight(target).detach().clone()
        ours = adapter.delta_weight(base.float())
        assert ours.dtype == torch.float32 and ours.shape == base.shape
        assert rel_err(ours, oracle.dw.reshape(base.shape)) < 1e-5, (role, rel_err(ours, oracle.dw))
        if oracle.db is not None:
            assert rel_err(adapter.delta_bias(None, base.device), oracle.db) < 1e-5

        args = layer_input(module, gen, torch.float32)
        before = run_layer(module, args)
        for m in MULTIPLIERS:
            want = run_layer(explicit_layer(index, target, oracle.dw, oracle.db, m), args)
            assert rel_err(want, before) > 1e-3, f"{role}: the change must show in the output"
            if not (case.dora and m != 1.0):  # LyCORIS's DoRA is not linear in m (module docstring)
                same_layer = want if target.part is None else part_output(index, target, oracle, args, m)
                assert rel_err(same_layer, lycoris_output(oracle, args, m)) < 1e-5, (role, m)
            assert_both_modes_give(index, net, target, lambda: run_layer(module, args), want, m, (case_id, role))
        assert torch.equal(run_layer(module, args), before)
    assert case.writes <= written, f"{case_id} did not produce {sorted(case.writes - written)}"


def test_lycoris_merge_scales_loha_twice_and_we_follow_its_forward(fresh_sd1, tmp_path):
    """Documents the LyCORIS quirk we depart from: ``get_diff_weight`` = scale * the forward's delta."""
    index = ModelIndex(fresh_sd1)
    target = lycoris_targets(index)["linear"]
    oracle = build_oracle(index, target, CASES["loha"], seed=3)
    scale = oracle.module.scale
    assert scale == 0.5
    with torch.no_grad():
        merged_diff, _ = oracle.module.get_diff_weight(1.0)
    assert rel_err(merged_diff, scale * oracle.dw) < 1e-6
    save_file(oracle.state_dict, str(tmp_path / "x.safetensors"))
    adapter = load_network(tmp_path / "x.safetensors", index).adapters[target]
    assert rel_err(adapter.delta_weight(index.weight(target).detach()), oracle.dw) < 1e-5


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("case_id", ["loha_mha", "loha_dora_in", "lokr", "full", "norm"])
def test_half_precision(case_id, dtype, tmp_path, request):
    case = CASES[case_id]
    root = request.getfixturevalue(f"fresh_{case.family}").to(dtype)
    index = ModelIndex(root)
    targets = lycoris_targets(index)
    gen = torch.Generator().manual_seed(11)
    # ldm's GroupNorm32 runs a half model's GroupNorm in float32 against half parameters, which CPU torch refuses
    # (the model itself cannot run); the GroupNorm is covered in float32 above
    roles = [r for r in case.roles if r != "group_norm"]
    for seed, role in enumerate(roles):
        target = targets[role]
        oracle = build_oracle(index, target, case, seed, file_dtype=torch.float16)
        path = tmp_path / f"{role}.safetensors"
        save_file(oracle.state_dict, str(path))
        net = load_network(path, index)
        args = layer_input(index.module(target), gen, dtype)
        want = run_layer(explicit_layer(index, target, oracle.dw, oracle.db, 0.8), tuple(a.float() for a in args))
        assert_modes_in_dtype(index, net, target, args, want, dtype, role)


class DtypeRecorder(TorchFunctionMode):
    """Every tensor any torch function returns while active: dtype and device."""

    def __init__(self):
        super().__init__()
        self.made: list[tuple[torch.dtype, str, str]] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.made.append((t.dtype, t.device.type, getattr(func, "__name__", str(func))))
        return out


@pytest.mark.parametrize("case_id, role", [("loha_tucker", "conv3x3"), ("loha_dora_in", "linear"),
                                           ("lokr", "linear"), ("lokr_tucker", "conv_stride2"),
                                           ("lokr_dora_out", "conv3x3"), ("full", "conv1x1"),
                                           ("norm", "group_norm")])
def test_bf16_file_never_becomes_a_bf16_tensor_on_the_compute_device(case_id, role, fresh_sd1, tmp_path):
    case = CASES[case_id]
    index = ModelIndex(fresh_sd1)
    target = lycoris_targets(index)[role]
    oracle = build_oracle(index, target, case, seed=5, file_dtype=torch.bfloat16)
    params = {k.split(".", 1)[1]: v for k, v in oracle.state_dict.items()}
    assert any(v.dtype == torch.bfloat16 for v in params.values())
    module = index.module(target)
    info = TargetInfo(str(target), index.weight_shape(target), LayerOp.of(module))
    adapter, unused = build_adapter(params, info)
    assert not unused
    base = index.weight(target).detach().float().to("meta")
    bias = None if module.bias is None else module.bias.detach().float().to("meta")
    x32 = layer_input(module, torch.Generator().manual_seed(0), torch.float32)[0]
    x = x32.to(torch.float16).to("meta")
    with DtypeRecorder() as rec:
        dw = adapter.delta_weight(base)
        db = adapter.delta_bias(bias, base.device)
        fast = adapter.low_rank_bypass(info.op, base.device, torch.float16, None)
        if fast is None:
            y = info.op(x, dw.to(torch.float16), None if db is None else db.half())
        elif hasattr(fast, "from_output"):  # a form reading the layer (DoRA): given the layer on that device
            layer = copy.deepcopy(module).to(device="meta", dtype=torch.float16)
            y = fast.from_output(x, layer(x), layer)
        else:
            y = fast(x)
    assert dw.device.type == "meta" and dw.dtype == torch.float32 and tuple(dw.shape) == tuple(base.shape)
    assert db is None or db.dtype == torch.float32
    assert y.dtype == torch.float16 and y.shape == module(x32).shape
    on_device = [(d, f) for d, dev, f in rec.made if dev == "meta"]
    assert on_device, "the recorder saw the computation"
    assert all(d in (torch.float32, torch.float16) for d, _ in on_device), on_device


def test_unknown_and_incomplete_keys_are_reported(fresh_sd1, tmp_path):
    index = ModelIndex(fresh_sd1)
    targets = lycoris_targets(index)
    loha_sd = build_oracle(index, targets["linear"], CASES["loha"], seed=1).state_dict
    name = kohya_name_of(index, targets["linear"])
    loha_sd[f"{name}.hada_extra"] = torch.ones(1)
    lokr_sd = build_oracle(index, targets["conv3x3"], CASES["lokr"], seed=2).state_dict
    lokr_name = kohya_name_of(index, targets["conv3x3"])
    del lokr_sd[f"{lokr_name}.lokr_w2_b"]  # half of w2 is gone
    norm_on_linear = {f"{kohya_name_of(index, targets['conv1x1'])}.w_norm": torch.ones(32)}
    save_file({**loha_sd, **lokr_sd, **norm_on_linear}, str(tmp_path / "x.safetensors"))
    net = load_network(tmp_path / "x.safetensors", index)
    assert list(net.adapters) == [targets["linear"]]
    assert net.adapters[targets["linear"]].algorithm == "loha"
    assert f"{name}.hada_extra" in net.report.unused
    problems = net.report.problems
    assert "incomplete LoKr" in problems[str(targets["conv3x3"])]
    assert "GroupNorm and LayerNorm" in problems[str(targets["conv1x1"])]
