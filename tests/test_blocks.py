"""Block weights (lbw/lbwe, presets, block influence) on the tiny real SD1 and SDXL models.

The expected blocks come from SPEC §3 through :func:`golden_block`, written here independently of blocks.py.
"""
from __future__ import annotations

import gc
import random
import weakref

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import nn

from lora_core.blocks import (
    DEFAULT_ELEMENTAL_PRESETS, BLOCK_IDS_12, BLOCK_IDS_17, BLOCK_IDS_20, BLOCK_IDS_26, OTHER, BlockWeights, PresetBook, Weight, block_norms,
    block_of, expand, import_lbw_presets, layer_scale_factory, parse_directives, parse_elemental_presets,
    parse_weights,
)
from lora_core.errors import BlockWeightError
from lora_core.library import LoraLibrary
from lora_core.model_index import ModelIndex, Target
from lora_core.network import load_network
from lora_core.patch import Patcher
from lora_core.runtime import LoraRuntime
from lora_core.syntax import LoraRequest, parse_lora_items
from lora_factory import LoraSpec, expected_delta, kohya_name_of, make_kohya_lora, pick_targets
from test_patch_property import assert_bitwise, snapshot
from tiny_models import make_inputs, run_text_encoders, run_unet

UNET = "model.diffusion_model."
# SPEC §3, as a table of module-name prefixes (the trailing '.' keeps input_blocks.1 apart from input_blocks.10)
GOLDEN_PREFIXES = (
    [("cond_stage_model.", "BASE"), ("conditioner.embedders.", "BASE"), (UNET + "middle_block.", "M00")]
    + [(f"{UNET}input_blocks.{i}.", f"IN{i:02d}") for i in range(12)]
    + [(f"{UNET}output_blocks.{i}.", f"OUT{i:02d}") for i in range(12)]
    + [(UNET + "time_embed.", OTHER), (UNET + "label_emb.", OTHER), (UNET + "out.", OTHER)]
)
SPOT_CHECKS = {
    "model.diffusion_model.input_blocks.0.0": "IN00",
    "model.diffusion_model.input_blocks.4.1.proj_in": "IN04",
    "model.diffusion_model.input_blocks.10.0.in_layers.2": "IN10",
    "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k": "IN01",
    "model.diffusion_model.middle_block.2.out_layers.3": "M00",
    "model.diffusion_model.output_blocks.11.1.proj_out": "OUT11",
    "model.diffusion_model.output_blocks.2.1.conv": "OUT02",
    "model.diffusion_model.time_embed.0": OTHER,
    "model.diffusion_model.out.2": OTHER,
    "cond_stage_model.wrapped.transformer.text_model.encoder.layers.11.mlp.fc2": "BASE",
    "cond_stage_model.wrapped.transformer.text_model.final_layer_norm": "BASE",
}
MIDD_BLOCKS = {"BASE", "IN05", "IN07", "IN08", "M00", "OUT03", "OUT04", "OUT05", "OUT06"}


def golden_block(name: str) -> str:
    found = [block for prefix, block in GOLDEN_PREFIXES if name.startswith(prefix)]
    assert len(found) == 1, name
    return found[0]


def all_targets(index: ModelIndex) -> list[Target]:
    targets = []
    for name, module in index.modules.items():
        parts = ("q", "k", "v", "out") if isinstance(module, nn.MultiheadAttention) else (None,)
        targets += [Target(name, part) for part in parts]
    return targets


def attention_targets(index: ModelIndex) -> list[Target]:
    """What a kohya LoRA trains: the transformer layers of the UNet (the 17/12-form blocks) and the text encoder."""
    return [t for t in pick_targets(index, (nn.Linear, nn.Conv2d))
            if ".transformer_blocks." in t.module or t.module.endswith((".proj_in", ".proj_out"))
            or golden_block(t.module) == "BASE"]


def in_block_targets(index: ModelIndex) -> list[Target]:
    """Every layer a LoCon can train (Linear, Conv2d, MHA), outside-block UNet layers left out."""
    return [t for t in pick_targets(index) if golden_block(t.module) != OTHER]


def write_network(index, targets, path, seed=0):
    tensors = make_kohya_lora(index, targets, LoraSpec(), seed=seed)
    save_file(tensors, str(path))
    return load_network(path, index), tensors


def lora(*items: str) -> LoraRequest:
    parsed = parse_lora_items(["n", *items])
    assert parsed.request is not None, parsed.warnings
    return parsed.request


def lbw26(**weights: float) -> str:
    return "lbw=" + ",".join(str(weights.get(block, 1)) for block in BLOCK_IDS_26)


def outputs(root, inputs):
    with torch.no_grad():
        return [run_unet(root, inputs), *run_text_encoders(root, inputs).values()]


def assert_equal_outputs(a, b):
    assert len(a) == len(b) and all(torch.equal(x, y) for x, y in zip(a, b))


@pytest.fixture(scope="module")
def sd1_index(sd1_model):
    return ModelIndex(sd1_model)


@pytest.fixture(scope="module")
def sdxl_index(sdxl_model):
    return ModelIndex(sdxl_model)


# ----------------------------------------------------------------------------- block ids and the block map


def test_block_id_lists_are_the_spec_ones():
    assert BLOCK_IDS_26 == ("BASE", *(f"IN{i:02d}" for i in range(12)), "M00", *(f"OUT{i:02d}" for i in range(12)))
    assert BLOCK_IDS_17 == ("BASE", "IN01", "IN02", "IN04", "IN05", "IN07", "IN08", "M00", "OUT03", "OUT04", "OUT05",
                            "OUT06", "OUT07", "OUT08", "OUT09", "OUT10", "OUT11")
    assert BLOCK_IDS_20 == ("BASE", *(f"IN{i:02d}" for i in range(9)), "M00", *(f"OUT{i:02d}" for i in range(9)))
    assert BLOCK_IDS_12 == ("BASE", "IN04", "IN05", "IN07", "IN08", "M00", "OUT00", "OUT01", "OUT02", "OUT03",
                            "OUT04", "OUT05")


@pytest.mark.parametrize("family, full", [("sd1", BLOCK_IDS_26), ("sdxl", BLOCK_IDS_20)])
def test_every_layer_goes_to_its_block(family, full, request):
    index = request.getfixturevalue(f"{family}_index")
    seen = set()
    for target in all_targets(index):
        block = block_of(index, target)
        assert block == golden_block(target.module), target
        seen.add(block)
    assert seen == set(full) | {OTHER}  # every block has layers in the real topology
    if family == "sd1":
        assert {name: block_of(index, Target(name)) for name in SPOT_CHECKS} == SPOT_CHECKS
    else:  # both SDXL encoders, q/k/v of OpenCLIP's in_proj included
        bigg = "conditioner.embedders.1.wrapped.model.transformer.resblocks.0.attn"
        assert {block_of(index, Target(bigg, p)) for p in "qkv"} == {"BASE"}
        assert block_of(index, Target("model.diffusion_model.label_emb.0.0")) == OTHER


# ----------------------------------------------------------------------------- lbw through the Patcher


def test_lbw_all_gives_the_same_multipliers_and_output_as_no_lbw(fresh_sd1, tmp_path):
    index = ModelIndex(fresh_sd1)
    network, _ = write_network(index, attention_targets(index), tmp_path / "attn.safetensors")
    scale = BlockWeights()(lora("0.8", "lbw=ALL"), network, index)
    assert scale is not None  # 17-form ALL: the 9 other blocks are 0 (they hold none of this LoRA's layers)
    plain_plan = network.plan(index, 0.8, 0.8)
    lbw_plan = network.plan(index, 0.8, 0.8, None, scale)
    assert [(e.target, e.multiplier) for e in lbw_plan] == [(e.target, e.multiplier) for e in plain_plan]
    inputs = make_inputs(fresh_sd1)
    with Patcher(index) as patcher:
        patcher.apply(plain_plan, "merged")
        expected = outputs(fresh_sd1, inputs)
        patcher.restore()
        patcher.apply(lbw_plan, "merged")
        assert_equal_outputs(outputs(fresh_sd1, inputs), expected)


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_lbw_all_zero_equals_no_lora_bitwise(family, request, tmp_path):
    root = request.getfixturevalue(f"fresh_{family}")
    index = ModelIndex(root)
    inputs = make_inputs(root)
    original, before = snapshot(root), outputs(root, inputs)
    targets = in_block_targets(index)
    save_file(make_kohya_lora(index, targets, LoraSpec(rank=2)), str(tmp_path / "locon.safetensors"))
    network = load_network(tmp_path / "locon.safetensors", index)
    zeros = {"sd1": "lbw=NONE", "sdxl": "lbw=" + ",".join(["0"] * 20)}[family]
    scale = BlockWeights()(lora(zeros), network, index)
    plan = network.plan(index, 1.0, 1.0, None, scale)
    assert len(plan) == len(targets) and all(entry.multiplier == 0.0 for entry in plan)
    with Patcher(index) as patcher:
        for mode in ("merged", "bypass"):
            patcher.apply(plan, mode)
            assert patcher.touched
            assert_equal_outputs(outputs(root, inputs), before)
    assert_bitwise(root, original)


def test_layers_outside_blocks_keep_weight_one_as_in_lbw(sd1_index, tmp_path):
    outside = [Target(n) for n in ("model.diffusion_model.time_embed.0", "model.diffusion_model.out.2")]
    inside = Target("model.diffusion_model.input_blocks.0.0")
    network, _ = write_network(sd1_index, outside + [inside], tmp_path / "o.safetensors")
    scale = BlockWeights()(lora("lbw=NONE"), network, sd1_index)
    assert [scale(t) for t in outside] == [1.0, 1.0] and scale(inside) == 0.0
    reach = BlockWeights()(lora("lbw=NONE", "lbwe=:time_embed:0.5"), network, sd1_index)
    assert reach(outside[0]) == 0.5 and reach(outside[1]) == 1.0


def test_one_block_weight_scales_exactly_that_blocks_deltas(fresh_sd1, tmp_path):
    index = ModelIndex(fresh_sd1)
    network, tensors = write_network(index, attention_targets(index), tmp_path / "attn.safetensors")
    scale = BlockWeights()(lora("1", lbw26(IN04=0.5)), network, index)
    plan = network.plan(index, 1.0, 1.0, None, scale)
    in04 = [e.target for e in plan if golden_block(e.target.module) == "IN04"]
    assert len(in04) > 5
    assert {e.target: e.multiplier for e in plan} == {e.target: 0.5 if e.target in in04 else 1.0 for e in plan}

    layer = Target("model.diffusion_model.input_blocks.4.1.transformer_blocks.0.attn2.to_k")
    module = index.module(layer)
    w0, bias = module.weight.detach().clone(), module.bias
    name = kohya_name_of(index, layer)
    dw = expected_delta({k[len(name) + 1:]: v for k, v in tensors.items() if k.startswith(name + ".")}, w0)
    x = torch.randn(2, 5, w0.shape[1], generator=torch.Generator().manual_seed(3))
    with Patcher(index) as patcher, torch.no_grad():
        for mode in ("merged", "bypass"):
            patcher.apply(plan, mode)
            expected = F.linear(x.double(), w0.double() + 0.5 * dw, None if bias is None else bias.double())
            torch.testing.assert_close(module(x).double(), expected, rtol=1e-5, atol=1e-6)
            assert not torch.allclose(module(x).double(), F.linear(x.double(), w0.double() + dw), atol=1e-4)


# ----------------------------------------------------------------------------- lists and values


def test_short_lists_expand_to_the_full_form_with_zeros():
    values = [float(i + 1) for i in range(17)]
    full = expand(values, "sd1")
    assert list(full) == list(BLOCK_IDS_26)
    assert {b: full[b] for b in BLOCK_IDS_17} == dict(zip(BLOCK_IDS_17, values))
    assert {b for b, w in full.items() if w == 0} == {"IN00", "IN03", "IN06", "IN09", "IN10", "IN11",
                                                       "OUT00", "OUT01", "OUT02"}
    xl = expand([float(i + 1) for i in range(12)], "sdxl")
    assert list(xl) == list(BLOCK_IDS_20)
    assert {b for b, w in xl.items() if w == 0} == {"IN00", "IN01", "IN02", "IN03", "IN06", "OUT06", "OUT07", "OUT08"}
    assert xl["OUT05"] == 12.0 and xl["M00"] == 6.0
    assert expand(list(range(26)), "sd2")["OUT11"] == 25.0


def test_every_value_kind_resolves(sd1_index):
    lbw = "lbw=0.25,R,U,X,X+0.2,X-0.1,R," + ",".join(["1"] * 10)
    weights = BlockWeights()
    weights.new_generation(random.Random(42))
    table = weights(lora(lbw, "x=0.5"), None, sd1_index).weights
    draw = random.Random(42)
    r1, u, r2 = round(draw.random(), 3), round(draw.uniform(-0.5, 1.5), 3), round(draw.random(), 3)
    assert [table[b] for b in BLOCK_IDS_17[:7]] == [0.25, r1, u, 0.5, 0.7, 0.4, r2]
    assert table["IN00"] == 0.0 and table["M00"] == 1.0
    assert [str(Weight.parse(t)) for t in ("1.50", " r", "u", "x", "X + .2", "x-0.1", "-2e-1")] == \
        ["1.5", "R", "U", "X", "X+0.2", "X-0.1", "-0.2"]


def test_random_values_are_reproducible_per_generation_and_tables_are_cached(sd1_index):
    weights = BlockWeights()
    rand = lora("lbw=R,R,R,R,R,R,R,R,R,R,R,R,R,R,R,R,R")
    weights.new_generation(random.Random(7))
    first = weights(rand, None, sd1_index)
    assert weights(rand, None, sd1_index) is first  # the hires pass of the same generation: same draws
    other_lora = weights(LoraRequest("other", lbw=rand.lbw), None, sd1_index)
    assert other_lora.weights != first.weights  # each LoRA draws its own
    assert all(0 <= v <= 1 and round(v, 3) == v for v in first.weights.values())
    weights.new_generation(random.Random(7))
    again = weights(rand, None, sd1_index)
    assert again is not first and again.weights == first.weights
    weights.new_generation(random.Random(8))
    assert weights(rand, None, sd1_index).weights != first.weights
    fixed = weights(lora("0.5", "lbw=MIDD"), None, sd1_index)
    weights.new_generation(random.Random(9))
    assert weights(lora("0.9", "lbw=MIDD"), None, sd1_index) is fixed  # a weight sweep reuses the table
    assert weights(lora("lbw=X,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1", "x=0.3"), None, sd1_index).weights["BASE"] == 0.3


def test_cache_lets_go_of_a_replaced_model(sd1_model):
    weights, index = BlockWeights(), ModelIndex(sd1_model)
    assert weights(lora("lbw=MIDD"), None, index)(Target(T["mid_attn"])) == 1.0
    gone = weakref.ref(index)
    del index
    gc.collect()
    assert gone() is None and len(weights._cache) == 0


def test_all_ones_needs_no_scaling(sd1_index):
    assert BlockWeights()(lora("lbw=" + ",".join(["1"] * 26)), None, sd1_index) is None
    assert BlockWeights()(lora("1"), None, sd1_index) is None


# ----------------------------------------------------------------------------- lbwe

T = {
    "in05_attn": "model.diffusion_model.input_blocks.5.1.transformer_blocks.0.attn1.to_q",
    "in05_attn2": "model.diffusion_model.input_blocks.5.1.transformer_blocks.0.attn2.to_v",
    "in05_ff": "model.diffusion_model.input_blocks.5.1.transformer_blocks.0.ff.net.2",
    "in04_attn": "model.diffusion_model.input_blocks.4.1.transformer_blocks.0.attn1.to_q",
    "mid_attn": "model.diffusion_model.middle_block.1.transformer_blocks.0.attn1.to_q",
    "out05_attn": "model.diffusion_model.output_blocks.5.1.transformer_blocks.0.attn1.to_q",
    "out06_attn": "model.diffusion_model.output_blocks.6.1.transformer_blocks.0.attn1.to_q",
    "te_attn": "cond_stage_model.wrapped.transformer.text_model.encoder.layers.0.self_attn.q_proj",
    "time": "model.diffusion_model.time_embed.0",
}


def scales(index, *items):
    assert all(name in index.modules for name in T.values())
    scale = BlockWeights()(lora(*items), None, index)
    return {key: scale(Target(name)) for key, name in T.items()}


def changed(result):
    return {k: v for k, v in result.items() if v != 1.0}


@pytest.mark.parametrize("lbwe, expected", [
    ("IN05:attn:0", {"in05_attn": 0, "in05_attn2": 0}),
    ("IN04 IN05:attn1:0.5", {"in05_attn": 0.5, "in04_attn": 0.5}),
    ("IN05-OUT05:attn1:0", {"in05_attn": 0, "mid_attn": 0, "out05_attn": 0}),
    ("OUT05-IN05:attn1:0", {"in05_attn": 0, "mid_attn": 0, "out05_attn": 0}),  # a range either way
    ("NOT IN05 M00:attn1:0", {"in04_attn": 0, "out05_attn": 0, "out06_attn": 0}),
    ("IN05:NOT attn:0.3", {"in05_ff": 0.3}),
    (":attn:0.3", {k: 0.3 for k in T if "attn" in k}),  # empty blocks: every layer, text encoder too
    ("IN05::0.2", {"in05_attn": 0.2, "in05_attn2": 0.2, "in05_ff": 0.2}),  # empty elements: the whole block
    ("IN05:attn2 ff:0", {"in05_attn2": 0, "in05_ff": 0}),  # 'ff' is not looked for in 'diffusion_model'
    ("IN05:ff_net:0", {"in05_ff": 0}),  # the underscored form matches too
    ("IN05:attn:0,IN05:attn1:0.7", {"in05_attn": 0.7, "in05_attn2": 0}),  # the later directive wins
    ("BASE:self_attn_q_proj:2", {"te_attn": 2}),
    ("NOT OUT05:diffusion:0", {}),  # the path above the UNet / text-encoder root is not searched
    ("ATTNDEEPOFF", {"in05_attn": 0, "in05_attn2": 0, "mid_attn": 0, "out05_attn": 0}),  # elemental preset
])
def test_lbwe_forms(sd1_index, lbwe, expected):
    assert changed(scales(sd1_index, f"lbwe={lbwe}")) == expected


def test_lbwe_ratio_replaces_the_block_weight(sd1_index):
    got = scales(sd1_index, lbw26(IN05=0.5, IN04=0), "lbwe=IN05 IN04:attn1:2")
    assert (got["in05_attn"], got["in04_attn"], got["in05_ff"], got["in05_attn2"]) == (2, 2, 0.5, 0.5)


def test_lbwe_as_a1111_splits_it(sd1_index):
    req = parse_lora_items(["n", "1", "lbwe=IN05", "attn1", "0,M00", "attn1", "0.5"]).request
    assert req.lbwe == "IN05:attn1:0,M00:attn1:0.5"
    assert changed(scales(sd1_index, f"lbwe={req.lbwe}")) == {"in05_attn": 0, "mid_attn": 0.5}


def test_elemental_presets_file():
    text = "A:IN05:attn:0\nIN04:ff:0.5\n\n# a comment\nB:::1\n\n\nA2 :NOT M00:proj:0\n"
    assert parse_elemental_presets(text) == {"A": "IN05:attn:0,IN04:ff:0.5", "B": "::1", "A2": "NOT M00:proj:0"}
    assert len(parse_directives(parse_elemental_presets(text)["A"])) == 2


# ----------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("family, fields, message", [
    ("sdxl", dict(lbw="MIDD"), "17 values but an SDXL model takes 12 or 20"),
    ("sd1", dict(lbw=",".join(["1"] * 12)), "12 values but an SD1 model takes 17 or 26"),
    ("sd1", dict(lbw="NOPE"), r"lbw preset 'NOPE' is not in the presets \(known: NONE, ALL, INS"),
    ("sd1", dict(lbw="MIDDD"), r"lbw preset 'MIDDD' is not .*; did you mean 'MIDD'\?"),
    ("sd1", dict(lbw="outdd"), "did you mean 'OUTD' or 'OUTS'?"),  # presets match case-insensitively
    # the parser refuses these block ids already; an elemental preset from a file reaches blocks.py unchecked
    ("sd1", dict(lbwe="IN12:attn:0"), "unknown block 'IN12'"),
    ("sd1", dict(lbwe="IN03-IN13:attn:0"), "unknown block 'IN13'"),
    ("sd1", dict(lbwe="NOPE"), "lbwe preset 'NOPE' is not in the elemental presets"),
    ("sd1", dict(lbwe="ATTNDEEPOF"), "did you mean 'ATTNDEEPOFF' or 'ATTNDEEPON'"),
    ("sd1", dict(lbwe="BAD"), "unknown block 'IN99'"),
])
def test_bad_block_weights_say_what_is_wrong(family, fields, message, request):
    index = request.getfixturevalue(f"{family}_index")
    elemental = {"BAD": "IN99:attn:0", **parse_elemental_presets(DEFAULT_ELEMENTAL_PRESETS)}
    with pytest.raises(BlockWeightError, match=message):
        BlockWeights(elemental=elemental)(LoraRequest("n", **fields), None, index)


def test_bad_lists_and_directives_say_what_is_wrong():
    with pytest.raises(ValueError, match="has 5 values; it needs 12, 17, 20 or 26"):
        parse_weights("1,1,1,1,1")
    with pytest.raises(ValueError, match="block weight 3: 'Q' is not a number; values are numbers, R, U, X"):
        parse_weights("1,1,Q," + ",".join(["1"] * 14))
    with pytest.raises(ValueError, match="is not BLOCKS:ELEMENTS:RATIO"):
        parse_directives("IN05:attn")
    with pytest.raises(ValueError, match="ratio 'half' is not a number"):
        parse_directives("IN05:attn:half")
    with pytest.raises(ValueError, match="need an SD1, SD2 or SDXL model"):
        BlockWeights()(lora("lbw=ALL"), None, ModelIndex(nn.Sequential(nn.Linear(2, 2))))


# ----------------------------------------------------------------------------- the runtime, end to end


def test_runtime_applies_lbw_and_survives_a_bad_one(fresh_sd1, tmp_path):
    index = ModelIndex(fresh_sd1)
    tensors = make_kohya_lora(index, attention_targets(index), LoraSpec(), seed=5)
    save_file(tensors, str(tmp_path / "full.safetensors"))
    midd_names = {kohya_name_of(index, t) for t in attention_targets(index) if golden_block(t.module) in MIDD_BLOCKS}
    save_file({k: v for k, v in tensors.items() if k.split(".", 1)[0] in midd_names},
              str(tmp_path / "midd_only.safetensors"))
    runtime = LoraRuntime(LoraLibrary([tmp_path]), layer_scale_factory=layer_scale_factory(PresetBook.default()))
    runtime.bind(fresh_sd1)
    inputs, original = make_inputs(fresh_sd1), snapshot(fresh_sd1)
    before = outputs(fresh_sd1, inputs)

    result = runtime.activate([["full", "1", "lbw=MIDD"]])  # new: bypass
    assert not result.errors and result.mode == "bypass" and result.active[0].layer_scale is not None
    with_midd = outputs(fresh_sd1, inputs)
    result = runtime.activate([["full", "1", "lbw=MIDD"]])  # steady: merged, the same outputs
    assert not result.errors and result.mode == "merged"
    merged = outputs(fresh_sd1, inputs)
    assert all(torch.allclose(x, y, rtol=1e-4, atol=1e-5) for x, y in zip(with_midd, merged))
    runtime.mode = "merged"  # below, exact equalities between sets: one mode for every layer
    runtime.activate([["full", "1", "lbw=MIDD"]])
    with_midd = outputs(fresh_sd1, inputs)
    assert not torch.equal(with_midd[0], before[0])
    runtime.activate([["midd_only", "1"]])
    assert_equal_outputs(with_midd, outputs(fresh_sd1, inputs))  # MIDD = only the layers of its blocks

    runtime.activate([["full", "1"]])
    plain = outputs(fresh_sd1, inputs)
    assert runtime.activate([["full", "1", "lbw=ALL"]]).errors == []
    assert_equal_outputs(outputs(fresh_sd1, inputs), plain)

    runtime.restore()
    assert_bitwise(fresh_sd1, original)


@pytest.mark.parametrize("bad_item, problem", [
    ("lbw=MIDDD", "did you mean 'MIDD'"),  # a typo of a preset
    ("lbw=" + ",".join(["0"] * 12), "12 values but an SD1 model takes 17 or 26"),
    ("lbwe=NOPE", "lbwe preset 'NOPE' is not in the elemental presets"),
])
def test_runtime_skips_a_lora_whose_block_weights_cannot_be_applied(fresh_sd1, tmp_path, bad_item, problem):
    index = ModelIndex(fresh_sd1)
    save_file(make_kohya_lora(index, attention_targets(index), LoraSpec(), seed=5), str(tmp_path / "full.safetensors"))
    runtime = LoraRuntime(LoraLibrary([tmp_path]), layer_scale_factory=layer_scale_factory(PresetBook.default()))
    runtime.bind(fresh_sd1)
    inputs, original = make_inputs(fresh_sd1), snapshot(fresh_sd1)
    before = outputs(fresh_sd1, inputs)

    result = runtime.activate([["full", "1", bad_item]])
    assert len(result.errors) == 1 and problem in result.errors[0]
    assert result.active == []  # skipped, as a malformed item is: not applied at full strength without them
    assert_equal_outputs(outputs(fresh_sd1, inputs), before)
    runtime.restore()
    assert_bitwise(fresh_sd1, original)


# ----------------------------------------------------------------------------- presets files

USER_FILE = """\
# my presets (comments and odd lines are kept)
NONE:0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0
 SPACED : 1, 0.5 ,R,U,X,X+0.2,X-0.1,0,0,0,0,0,0,0,0,0,0

XLMID:1,0,0,0,1,1,1,1,1,0,0,0
#OFF:0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0
FULL26:1,1,1,1,1,1,1,1,1,1,1,1,1,0,0,0,0,0,0,0,0,0,0,0,0,1
XL20:1,1,1,1,1,1,1,1,1,1,0.5,1,1,1,1,1,1,1,1,1
BAD:1,2,3
Note: not a preset
"""


def test_presets_round_trip_with_comments(tmp_path):
    book = PresetBook.parse(USER_FILE)
    assert book.names() == ["NONE", "SPACED", "XLMID", "FULL26", "XL20"]
    assert str(book.get("SPACED")) == "SPACED:1,0.5,R,U,X,X+0.2,X-0.1,0,0,0,0,0,0,0,0,0,0"
    assert book.get("spaced") is book.get("SPACED") and book.get("OFF") is None
    assert len(book.problems) == 1 and book.problems[0].startswith("line 9 ('BAD'): a block-weight list has 3")
    assert book.text() == USER_FILE
    path = tmp_path / "presets" / "lbw.txt"
    book.save(path)
    assert path.read_text(encoding="utf-8") == USER_FILE

    book.set("XLMID", "1,1,1,1,1,1,0,0,0,0,0,0")
    book.set("NEW", ",".join(["0.5"] * 20))
    assert book.remove("NONE") and not book.remove("NONE")
    book.save(path)
    again = PresetBook.load(path)
    assert again.names() == ["SPACED", "XLMID", "FULL26", "XL20", "NEW"]
    assert str(again.get("XLMID")) == "XLMID:1,1,1,1,1,1,0,0,0,0,0,0"
    assert "#OFF:0" in again.text() and "Note: not a preset" in again.text() and "BAD:1,2,3" in again.text()
    with pytest.raises(ValueError, match="preset name"):
        book.set("A:B", ",".join(["1"] * 17))
    assert PresetBook.load(tmp_path / "missing.txt").names()[:2] == ["NONE", "ALL"]


def test_edited_presets_take_effect(sd1_index):
    book = PresetBook.default()
    assert book.names() == ["NONE", "ALL", "INS", "IND", "INALL", "MIDD", "OUTD", "OUTS", "OUTALL", "ALL0.5"]
    weights = BlockWeights(book)
    book.set("MINE", ",".join(["0.5"] * 26))
    assert set(weights(lora("lbw=MINE"), None, sd1_index).weights.values()) == {0.5}
    book.set("MINE", ",".join(["0.25"] * 26))
    assert set(weights(lora("lbw=MINE"), None, sd1_index).weights.values()) == {0.25}


def test_import_lbw_presets_file(tmp_path):
    lbw_file = tmp_path / "lbwpresets.txt"
    flux = "FLUXALL:" + ",".join(["1"] * 61)
    lbw_file.write_text("NONE:0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0\n"
                        "INS:1,1,1,1,1,1,1,0,0,0,0,0,0,0,0,0,0\n"
                        f"{flux}\n"
                        "# XLOFF:0,0,0,0,0,0,0,0,0,0,0,0\n"
                        "XLIN:1,1,1,1,1,0,0,0,0,0,0,0\n", encoding="utf-8")
    book = PresetBook.default()
    imported, skipped = import_lbw_presets(book, lbw_file)
    assert imported == ["NONE", "INS", "XLIN"]
    assert len(skipped) == 1 and "FLUXALL" in skipped[0] and "61 values" in skipped[0]
    assert str(book.get("INS")) == "INS:1,1,1,1,1,1,1,0,0,0,0,0,0,0,0,0,0"  # replaced in place
    assert book.names().index("INS") == 2 and book.names()[-1] == "XLIN" and "XLOFF" not in book.names()


# ----------------------------------------------------------------------------- block influence


def test_block_norms_sum_the_deltas_of_each_block(sd1_index, tmp_path):
    targets = attention_targets(sd1_index)[::7] + [Target("model.diffusion_model.time_embed.0"),
                                                   Target("model.diffusion_model.input_blocks.0.0")]
    network, tensors = write_network(sd1_index, targets, tmp_path / "n.safetensors", seed=9)
    expected = dict.fromkeys(BLOCK_IDS_26, 0.0)
    for target in targets:
        name = kohya_name_of(sd1_index, target)
        own = {k[len(name) + 1:]: v for k, v in tensors.items() if k.startswith(name + ".")}
        block = golden_block(target.module)
        expected[block] = expected.get(block, 0.0) + float(expected_delta(own, sd1_index.weight(target)).norm())
    got = block_norms(network, sd1_index)
    assert list(got) == list(BLOCK_IDS_26) + [OTHER]
    assert got == pytest.approx(expected, rel=1e-4)
    assert got["IN03"] == 0.0 and got["IN00"] > 0 and got[OTHER] > 0
