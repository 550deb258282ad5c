"""The tools (lora_core.tools) on the tiny real models: a checkpoint is the tiny model's state dict without
A1111's ``.wrapped``, so what a tool writes can be checked against the runtime (Patcher) on the live model."""
from __future__ import annotations

import hashlib
import io as pyio
import json
import math
import os

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save, save_file

import tiny_models
from lora_core.adapters import LayerOp
from lora_core.blocks import BlockWeights, block_norms
from lora_core.errors import FamilyMismatchError, LoraFileError
from lora_core.io import addnet_hash, read_metadata
from lora_core.keymap import resolve_module
from lora_core.model_index import ModelIndex, Target
from lora_core.network import load_network
from lora_core.patch import Patcher
from lora_core.syntax import LoraRequest
from lora_core.tools import (CheckpointIndex, LoraItem, StreamingWriter, ToolError, add_difference, extract,
                             inspect_lora, merge_into, merge_loras, parse_item, render_block_chart, resize)
from lora_core.tools.names import block_of_name, canonical_module, compvis_to_diffusers
from lora_core.tools.svd import select_rank
from lora_factory import LoraSpec, kohya_name_of, make_kohya_lora, make_lycoris

# ------------------------------------------------------------------------------------------ helpers


def checkpoint_state(root) -> dict[str, torch.Tensor]:
    """The live model's state dict as a checkpoint file holds it: no ``.wrapped``, no SDXL alias."""
    state = {}
    for key, value in root.state_dict().items():
        if root.is_sdxl and key.startswith("cond_stage_model."):
            continue  # the hijack's alias of the conditioner
        state[key.replace(".wrapped", "")] = value.detach().clone().contiguous()
    return state


def write(path, tensors, metadata=None):
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path), metadata=metadata)
    return path


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30))


def ckpt_key(index: ModelIndex, target: Target) -> str:
    """The checkpoint key of a live target's weight."""
    module = target.module.replace(".wrapped", "")
    if target.part is None:
        return module + ".weight"
    return module + (".out_proj.weight" if target.part == "out" else ".in_proj_weight")


def targets_by_name(index: ModelIndex, *suffixes: str) -> list[Target]:
    out = []
    for suffix in suffixes:
        name, _, part = suffix.partition("[")
        found = [m for m in index.modules if m.endswith(name)]
        assert found, suffix
        out.append(Target(found[0], part.rstrip("]") or None))
    return out


SD1_LAYERS = ("encoder.layers.0.self_attn.q_proj", "encoder.layers.11.mlp.fc2",
              "input_blocks.1.1.proj_in", "input_blocks.1.1.transformer_blocks.0.attn1.to_q",
              "middle_block.1.transformer_blocks.0.attn2.to_k", "output_blocks.11.1.transformer_blocks.0.ff.net.0.proj",
              "input_blocks.1.0.in_layers.2", "input_blocks.4.0.skip_connection", "output_blocks.2.1.conv",
              "input_blocks.3.0.op", "middle_block.2.emb_layers.1")


def unet_out(root, inputs) -> torch.Tensor:
    return tiny_models.run_unet(root, inputs)


def all_outputs(root, inputs) -> list[torch.Tensor]:
    return [unet_out(root, inputs), *tiny_models.run_text_encoders(root, inputs).values()]


def sd_scripts_legacy_hash(path) -> str:
    """sd-scripts' precalculate_safetensors_hashes: the file re-serialised with its ss_* metadata only."""
    tensors = load_file(str(path))
    with safe_open(str(path), "pt") as f:
        metadata = {k: v for k, v in (f.metadata() or {}).items() if k.startswith("ss_")}
    data = pyio.BytesIO(save(tensors, metadata))
    data.seek(0x100000)
    return hashlib.sha256(data.read(0x10000)).hexdigest()[:8]


def assert_hashes(path) -> None:
    metadata = read_metadata(path)
    assert metadata["sshs_model_hash"] == addnet_hash(path)
    assert metadata["sshs_legacy_hash"] == sd_scripts_legacy_hash(path)


@pytest.fixture(scope="module")
def sd1_files(tmp_path_factory):
    """A tiny SD1 checkpoint (fp32) and a rank-4 LoRA on layers of every kind sd-scripts extracts."""
    root = tiny_models.build("sd1")
    index = ModelIndex(root)
    folder = tmp_path_factory.mktemp("sd1")
    ckpt = write(folder / "base.safetensors", checkpoint_state(root))
    targets = targets_by_name(index, *SD1_LAYERS)
    lora = write(folder / "lora.safetensors", make_kohya_lora(index, targets, LoraSpec(rank=4, alpha=2.0)),
                 {"ss_base_model_version": "sd_v1"})
    return root, index, ckpt, lora, targets, folder


# ------------------------------------------------------------------------------------------ the index


def test_checkpoint_index_maps_like_the_live_model(shared_model):
    index = ModelIndex(shared_model)
    state = checkpoint_state(shared_model)
    ckpt = CheckpointIndex({k: v.shape for k, v in state.items()})
    assert ckpt.family == index.family
    live_table = {name: (t.module.replace(".wrapped", ""), t.part) for name, t in index.kohya_names()}
    assert live_table == {name: (t.module, t.part) for name, t in ckpt.kohya_names()}
    for name, target in index.kohya_names():
        twin = ckpt.lookup(name)
        assert LayerOp.of(index.module(target), target.part).kind == LayerOp.of(ckpt.module(twin), twin.part).kind
        where = ckpt.weight_key(twin)
        assert torch.equal(where.of(state[where.key]), index.weight(target).detach()), name


def test_streaming_writer_writes_what_safetensors_writes(tmp_path):
    gen = torch.Generator().manual_seed(0)
    tensors = {"big": torch.randn(700_000, generator=gen), "half": torch.randn(3, 5, generator=gen).half(),
               "bf": torch.randn(7, generator=gen).bfloat16(), "ids": torch.arange(5), "empty": torch.zeros(0),
               "scalar": torch.tensor(2.5), "flag": torch.tensor([True, False])}
    metadata = {"ss_network_dim": "4", "title": "é \"quoted\"\n"}
    specs = {k: (v.dtype, tuple(v.shape)) for k, v in tensors.items()}
    with StreamingWriter(tmp_path / "s.safetensors", specs, metadata) as writer:
        for key in writer.order:
            writer.write(key, tensors[key])
        model_hash, legacy_hash = writer.finish()
    written = (tmp_path / "s.safetensors").read_bytes()
    reference = save(tensors, {**metadata, "sshs_model_hash": model_hash, "sshs_legacy_hash": legacy_hash})
    length = int.from_bytes(written[:8], "little")
    assert written[:8] == reference[:8] and written[8 + length:] == reference[8 + length:]
    # safetensors keeps metadata in a hash map, so only the order of the header's keys may differ
    assert json.loads(written[8:8 + length]) == json.loads(reference[8:8 + length])
    assert model_hash == addnet_hash(tmp_path / "s.safetensors")
    assert legacy_hash == sd_scripts_legacy_hash(tmp_path / "s.safetensors")
    assert not list(tmp_path.glob(".*.tmp"))


SD_SCRIPTS_LORA = "/work/testbed/webui/models/Lora/test_lora.safetensors"


@pytest.mark.skipif(not os.path.exists(SD_SCRIPTS_LORA), reason="the testbed's sd-scripts LoRA is not here")
def test_hashes_equal_those_sd_scripts_wrote():
    from lora_core.tools.checkpoint import tensor_hashes
    metadata = read_metadata(SD_SCRIPTS_LORA)
    got = tensor_hashes(load_file(SD_SCRIPTS_LORA), metadata)
    assert got == (metadata["sshs_model_hash"], metadata["sshs_legacy_hash"])


def test_streaming_writer_refuses_out_of_order_and_leaves_nothing(tmp_path):
    specs = {"a": (torch.float32, (2,)), "b": (torch.float32, (2,))}
    with pytest.raises(ValueError, match="in order"):
        with StreamingWriter(tmp_path / "x.safetensors", specs) as writer:
            writer.write("b", torch.zeros(2))
    assert list(tmp_path.iterdir()) == []


def test_module_names_round_trip_through_the_reader(shared_model):
    index = ModelIndex(shared_model)
    family = index.family
    for name, target in index.kohya_names():
        if not name.startswith("lora_unet_"):
            continue
        written = canonical_module(name, family)
        if family != "sdxl":
            assert not written[len("lora_unet_"):].startswith(("input_blocks", "middle_block", "output_blocks")), name
        assert resolve_module(written, index) == target, name
        assert block_of_name(written) == block_of_name(name)


def test_compvis_to_diffusers_examples():
    assert compvis_to_diffusers("input_blocks_1_1_proj_in") == "down_blocks_0_attentions_0_proj_in"
    assert compvis_to_diffusers("input_blocks_4_0_skip_connection") == "down_blocks_1_resnets_0_conv_shortcut"
    assert compvis_to_diffusers("input_blocks_3_0_op") == "down_blocks_0_downsamplers_0_conv"
    assert compvis_to_diffusers("middle_block_2_emb_layers_1") == "mid_block_resnets_1_time_emb_proj"
    assert compvis_to_diffusers("output_blocks_2_1_conv") == "up_blocks_0_upsamplers_0_conv"
    assert compvis_to_diffusers("output_blocks_11_1_transformer_blocks_0_ff_net_2") == \
        "up_blocks_3_attentions_2_transformer_blocks_0_ff_net_2"
    assert block_of_name("lora_unet_up_blocks_3_attentions_2_proj_in") == "OUT11"
    assert block_of_name("lora_te1_text_model_encoder_layers_0_mlp_fc1") == "BASE"


# ------------------------------------------------------------------------------------------ merge-into


def test_merge_into_equals_the_runtime_merged_weights(fresh_sd2, tmp_path):
    """Every algorithm, several LoRAs, block weights: the file holds what the Patcher's merged mode computes."""
    index = ModelIndex(fresh_sd2)
    ckpt = write(tmp_path / "base.safetensors", checkpoint_state(fresh_sd2))
    attn = targets_by_name(index, "resblocks.0.attn[q]", "resblocks.0.attn[v]", "resblocks.1.attn[out]")
    unet = targets_by_name(index, "input_blocks.1.1.proj_in", "output_blocks.5.1.transformer_blocks.0.attn2.to_v",
                           "input_blocks.7.0.in_layers.2", "middle_block.1.proj_out", "out.2")
    files = {
        "lora": make_kohya_lora(index, attn + unet[:2], LoraSpec(rank=4, alpha=2.0), seed=1),
        "dora": make_kohya_lora(index, unet[1:3], LoraSpec(rank=2, alpha=1.0, dora=True), seed=2),
        "loha": make_lycoris(index, attn[:2] + unet[3:], "loha", seed=3),
        "oft": make_lycoris(index, unet[:2], "oft", seed=4),
        "full": make_lycoris(index, attn[2:] + unet[3:4], "full", seed=5),
        "ia3": make_lycoris(index, unet[4:], "ia3", seed=6),
    }
    proj_out = kohya_name_of(index, unet[3])
    files["full"][f"{proj_out}.diff_b"] = torch.randn(index.weight_shape(unet[3])[0]) * 0.1
    ratios = {"lora": 0.8, "dora": 1.0, "loha": -0.5, "oft": 0.7, "full": 0.3, "ia3": 0.6}
    blocks = {"loha": "OUTALL"}
    paths = {n: write(tmp_path / f"{n}.safetensors", sd, {"ss_base_model_version": "sd_v2"}) for n, sd in files.items()}
    items = [LoraItem(paths[n], ratios[n], blocks.get(n)) for n in files]
    calls = []
    result = merge_into(ckpt, items, tmp_path / "merged.safetensors", save_precision="fp32",
                        progress=lambda done, total, what: calls.append((done, total)))
    assert calls[-1][0] == calls[-1][1]
    assert result.family == "sd2" and [m.layers for m in result.loras][0] == len(attn) + 2
    merged = load_file(str(result.saved.path))
    assert_hashes(result.saved.path)

    lbw = BlockWeights()
    with Patcher(index) as patcher:
        plan = []
        for name, path in paths.items():
            net = load_network(path, index, name)
            scale = lbw(LoraRequest(name, lbw=blocks.get(name)), net, index) if name in blocks else None
            plan += net.plan(index, ratios[name], ratios[name], layer_scale=scale)
        patcher.apply(plan, "merged")
        checked = 0
        for target in {e.target for e in plan}:
            key = ckpt_key(index, target)
            got = merged[key]
            if target.part in ("q", "k", "v"):
                i = "qkv".index(target.part)
                d = index.module(target).embed_dim
                got = got[i * d:(i + 1) * d]
            assert rel(got, index.weight(target).detach()) < 1e-6, target
            checked += 1
        full_bias = merged["model.diffusion_model.middle_block.1.proj_out.bias"]
        assert torch.allclose(full_bias, index.module(unet[3]).bias.detach(), atol=1e-6)
        assert not torch.equal(full_bias, load_file(str(ckpt))["model.diffusion_model.middle_block.1.proj_out.bias"])
    assert checked == len(set(attn + unet))
    untouched = "model.diffusion_model.input_blocks.2.1.proj_in.weight"
    assert torch.equal(merged[untouched], load_file(str(ckpt))[untouched])


def test_merge_into_saves_the_requested_precision(sd1_files, tmp_path):
    _, _, ckpt, lora, _, _ = sd1_files
    result = merge_into(ckpt, [f"{lora}:0.5"], tmp_path / "half.safetensors", save_precision="bf16")
    with safe_open(str(result.saved.path), "pt") as f:
        dtypes = {f.get_slice(k).get_dtype() for k in f.keys()}
    assert "BF16" in dtypes and "F32" not in dtypes
    recipe = read_metadata(result.saved.path)["lora_core_merge"]
    assert '"ratio": 0.5' in recipe and "lora" in recipe


# ------------------------------------------------------------------------------------------ extract


def test_merge_into_then_extract_recovers_the_lora(sd1_files, tmp_path):
    root, index, ckpt, lora, targets, _ = sd1_files
    tuned = merge_into(ckpt, [lora], tmp_path / "tuned.safetensors", save_precision="fp32").saved.path
    result = extract(ckpt, tuned, tmp_path / "extracted.safetensors", rank=8, conv_rank=8, clamp_quantile=None)
    assert result.text_encoder and result.family == "sd1"
    original = load_network(lora, index)
    extracted = load_network(result.saved.path, index)
    assert not extracted.report.unmatched and not extracted.report.unknown
    for target in targets:
        base = index.weight(target).detach()
        want = original.adapters[target].delta_weight(base)
        assert rel(extracted.adapters[target].delta_weight(base), want) < 1e-4, target
    others = [t for t in extracted.adapters if t not in targets]
    assert others and all(float(extracted.adapters[t].delta_weight(index.weight(t)).abs().max()) < 1e-5
                          for t in others)
    metadata = read_metadata(result.saved.path)
    assert metadata["ss_network_module"] == "networks.lora" and metadata["ss_network_dim"] == "8"
    assert metadata["ss_network_alpha"] == "8.0" and metadata["ss_base_model_version"] == "sd_v1"
    assert metadata["modelspec.architecture"] == "stable-diffusion-v1/lora"
    assert '"conv_dim": "8"' in metadata["ss_network_args"]
    assert_hashes(result.saved.path)
    keys = load_file(str(result.saved.path))
    assert "lora_unet_down_blocks_0_attentions_0_proj_in.lora_up.weight" in keys  # sd-scripts' SD1 names
    assert "lora_te_text_model_encoder_layers_0_self_attn_q_proj.alpha" in keys


def test_extract_leaves_out_an_unchanged_text_encoder_and_names_sdxl_compvis(sdxl_model, tmp_path):
    index = ModelIndex(sdxl_model)
    state = checkpoint_state(sdxl_model)
    ckpt = write(tmp_path / "base.safetensors", state)
    targets = targets_by_name(index, "input_blocks.4.1.proj_in", "output_blocks.2.2.conv")
    lora = write(tmp_path / "l.safetensors", make_kohya_lora(index, targets, LoraSpec(rank=2)))
    tuned = merge_into(ckpt, [lora], tmp_path / "t.safetensors", save_precision="fp32").saved.path
    result = extract(ckpt, tuned, tmp_path / "x.safetensors", rank=2, conv_rank=2, clamp_quantile=None)
    assert not result.text_encoder and result.text_encoder_max_diff == 0.0
    keys = load_file(str(result.saved.path))
    assert not any(k.startswith("lora_te") for k in keys)
    assert "lora_unet_input_blocks_4_1_proj_in.lora_down.weight" in keys
    assert "lora_unet_output_blocks_2_2_conv.lora_down.weight" in keys
    net = load_network(result.saved.path, index)
    for target in targets:
        base = index.weight(target).detach()
        want = make_net_delta(index, lora, target)
        assert rel(net.adapters[target].delta_weight(base), want) < 1e-4
    assert read_metadata(result.saved.path)["ss_base_model_version"] == "sdxl_base_v1-0"


def make_net_delta(index, path, target):
    return load_network(path, index).adapters[target].delta_weight(index.weight(target).detach())


def test_extract_clamps_at_the_quantile(sd1_files, tmp_path):
    _, _, ckpt, lora, _, _ = sd1_files
    tuned = merge_into(ckpt, [lora], tmp_path / "t.safetensors", save_precision="fp32").saved.path
    result = extract(ckpt, tuned, tmp_path / "x.safetensors", rank=4, clamp_quantile=0.9)
    tensors = load_file(str(result.saved.path))
    name = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
    values = torch.cat([tensors[f"{name}.lora_up.weight"].flatten(), tensors[f"{name}.lora_down.weight"].flatten()])
    high = values.max()
    assert int((values == high).sum()) >= 0.05 * values.numel()  # the top 10% were cut to one value
    assert float(values.min()) >= -float(high)


# ------------------------------------------------------------------------------------------ resize


def test_resize_keeps_the_top_singular_values(sd1_files, tmp_path):
    _, index, _, _, _, folder = sd1_files
    targets = targets_by_name(index, "input_blocks.1.1.transformer_blocks.0.attn1.to_q", "input_blocks.1.0.in_layers.2")
    tucker = targets_by_name(index, "output_blocks.3.0.out_layers.3")
    sd = {**make_kohya_lora(index, targets, LoraSpec(rank=8, alpha=4.0)),
          **make_kohya_lora(index, tucker, LoraSpec(rank=6, alpha=3.0, tucker=True), seed=1)}
    lora = write(tmp_path / "r8.safetensors", sd, {"ss_base_model_version": "sd_v1"})
    result = resize(lora, tmp_path / "r3.safetensors", rank=3, conv_rank=2)
    original, resized = load_network(lora, index), load_network(result.saved.path, index)
    for target in targets + tucker:
        base = index.weight(target).detach()
        before = torch.linalg.svdvals(original.adapters[target].delta_weight(base).flatten(1).double())
        after = torch.linalg.svdvals(resized.adapters[target].delta_weight(base).flatten(1).double())
        k = 2 if base.dim() == 4 and base.shape[-1] > 1 else 3
        assert resized.adapters[target].rank == k
        assert torch.allclose(after[:k], before[:k], rtol=1e-5) and float(after[k:].abs().max()) < 1e-6 * float(before[0])
    report = {m.name: m for m in result.modules}
    attn = report["lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"]
    assert attn.old_rank == 8 and attn.new_rank == 3 and attn.new_alpha == pytest.approx(0.5 * 3)
    assert 0 < attn.fro_retained < 1 and attn.sum_retained < 1
    assert "average Frobenius" in result.report()
    metadata = read_metadata(result.saved.path)
    assert metadata["ss_network_dim"] == "Dynamic"  # 3 for linear layers, 2 for 3x3 convs
    assert "resized from 8 to 3 (conv: 2)" in metadata["ss_training_comment"]
    assert_hashes(result.saved.path)


def test_dynamic_rank_selection_follows_sd_scripts():
    s = torch.tensor([10.0, 5.0, 1.0, 0.1, 0.01])
    assert select_rank(s, 8, "sv_ratio", 4) == 3  # 2 values above 10/4, clamped to [1, 4], plus one
    assert select_rank(s, 8, "sv_ratio", 1000) == 5
    assert select_rank(s, 8, "sv_cumulative", 0.5) == 2  # min index 1, plus one
    assert select_rank(s, 8, "sv_cumulative", 0.95) == 4  # cumulative share reaches 0.95 at index 2; +1, +1
    assert select_rank(s, 8, "sv_fro", 0.999) == 4
    assert select_rank(s, 2, "sv_fro", 0.999) == 2  # capped at the rank
    assert select_rank(torch.zeros(3), 8, "sv_ratio", 2) == 1


def test_resize_dynamic_writes_per_module_ranks(sd1_files, tmp_path):
    _, index, _, _, _, _ = sd1_files
    targets = targets_by_name(index, "input_blocks.1.1.transformer_blocks.0.attn1.to_q", "middle_block.1.proj_in")
    sd = make_kohya_lora(index, targets, LoraSpec(rank=8, alpha=8.0))
    name = kohya_name_of(index, targets[0])
    sd[f"{name}.lora_up.weight"][:, 1:] *= 1e-3  # one dominant direction
    result = resize(write(tmp_path / "d.safetensors", sd), tmp_path / "dd.safetensors", rank=8,
                    dynamic="sv_fro", dynamic_param=0.99)
    ranks = {m.new_rank for m in result.modules}
    assert min(ranks) == 2 and len(ranks) == 2
    assert read_metadata(result.saved.path)["ss_network_dim"] == "Dynamic"


# ------------------------------------------------------------------------------------------ merge-loras


@pytest.fixture
def two_loras(sd1_files, tmp_path):
    _, index, _, _, _, _ = sd1_files
    shared = targets_by_name(index, "encoder.layers.3.self_attn.v_proj", "input_blocks.1.1.proj_in",
                             "input_blocks.2.0.in_layers.2", "output_blocks.8.1.transformer_blocks.0.attn2.to_q")
    only_b = targets_by_name(index, "middle_block.1.transformer_blocks.0.ff.net.2")
    a = write(tmp_path / "a.safetensors", make_kohya_lora(index, shared, LoraSpec(rank=4, alpha=2.0), seed=10),
              {"ss_base_model_version": "sd_v1"})
    b = write(tmp_path / "b.safetensors", make_kohya_lora(index, shared + only_b, LoraSpec(rank=2, alpha=4.0), seed=11),
              {"ss_base_model_version": "sd_v1"})
    return a, b, shared + only_b


@pytest.mark.parametrize("mode", ["concat", "svd"])
def test_concat_and_svd_merges_equal_applying_the_loras_together(mode, fresh_sd1, two_loras, tmp_path):
    a, b, _ = two_loras
    index = ModelIndex(fresh_sd1)
    inputs = tiny_models.make_inputs(fresh_sd1)
    options = {"rank": 6, "clamp_quantile": None} if mode == "svd" else {}
    result = merge_loras([f"{a}:0.7", f"{b}:-0.5"], tmp_path / "m.safetensors", mode=mode, **options)
    assert result.ranks == ({6: 4, 2: 1} if mode == "concat" else {6: 5})
    assert_hashes(result.saved.path)
    with Patcher(index) as patcher:
        patcher.apply(load_network(a, index).plan(index, 0.7, 0.7) + load_network(b, index).plan(index, -0.5, -0.5),
                      "bypass")
        want = all_outputs(fresh_sd1, inputs)
        patcher.apply(load_network(result.saved.path, index).plan(index, 1.0, 1.0), "bypass")
        got = all_outputs(fresh_sd1, inputs)
        base = None
        patcher.restore()
        base = all_outputs(fresh_sd1, inputs)
    for g, w, b0 in zip(got, want, base):
        assert not torch.allclose(w, b0)
        assert rel(g, w) < 1e-5


def test_sum_merge_is_sd_scripts_formula(sd1_files, tmp_path):
    _, index, _, _, _, _ = sd1_files
    targets = targets_by_name(index, "input_blocks.1.1.proj_in", "encoder.layers.5.mlp.fc1")
    a_sd = make_kohya_lora(index, targets, LoraSpec(rank=4, alpha=2.0), seed=1)
    b_sd = make_kohya_lora(index, targets, LoraSpec(rank=4, alpha=8.0), seed=2)
    a, b = (write(tmp_path / f"{n}.safetensors", sd, {"ss_base_model_version": "sd_v1"}) for n, sd in (("a", a_sd), ("b", b_sd)))
    result = merge_loras([f"{a}:0.8", f"{b}:-0.5"], tmp_path / "s.safetensors", mode="sum")
    merged = load_file(str(result.saved.path))
    for target in targets:
        name = kohya_name_of(index, target)
        out = canonical_module(name, "sd1")
        ca, cb = math.sqrt(2.0 / 2.0) * 0.8, math.sqrt(8.0 / 2.0) * -0.5
        up = a_sd[f"{name}.lora_up.weight"] * abs(ca) + b_sd[f"{name}.lora_up.weight"] * abs(cb)
        down = a_sd[f"{name}.lora_down.weight"] * ca + b_sd[f"{name}.lora_down.weight"] * cb
        assert torch.allclose(merged[f"{out}.lora_up.weight"], up, atol=1e-6)
        assert torch.allclose(merged[f"{out}.lora_down.weight"], down, atol=1e-6)
        assert float(merged[f"{out}.alpha"]) == 2.0


def test_sum_same_to_strength_keeps_a_lone_loras_strength(sd1_files, tmp_path):
    _, index, _, lora, targets, _ = sd1_files
    result = merge_loras([f"{lora}:-0.6"], tmp_path / "s.safetensors", mode="sum", same_to_strength=True)
    original, merged = load_network(lora, index), load_network(result.saved.path, index)
    for target in targets:
        base = index.weight(target).detach()
        assert rel(merged.adapters[target].delta_weight(base), -0.6 * original.adapters[target].delta_weight(base)) < 1e-6


def test_sum_refuses_unequal_ranks_and_svd_needs_a_rank(two_loras, tmp_path):
    a, b, _ = two_loras
    with pytest.raises(ToolError, match="equal ranks"):
        merge_loras([str(a), str(b)], tmp_path / "s.safetensors", mode="sum")
    with pytest.raises(ToolError, match="rank"):
        merge_loras([str(a), str(b)], tmp_path / "s.safetensors", mode="svd")
    assert not (tmp_path / "s.safetensors").exists()


def test_merge_loras_block_weights(sd1_files, tmp_path):
    _, index, _, lora, targets, _ = sd1_files
    result = merge_loras([f"{lora}:1:OUTALL"], tmp_path / "b.safetensors", mode="svd", rank=4, clamp_quantile=None)
    original, merged = load_network(lora, index), load_network(result.saved.path, index)
    weights = BlockWeights()(LoraRequest("x", lbw="OUTALL"), original, index)
    for target in targets:
        base = index.weight(target).detach()
        want = weights(target) * original.adapters[target].delta_weight(base)
        got = merged.adapters[target].delta_weight(base) if target in merged.adapters else torch.zeros_like(want)
        assert float((got - want).norm()) <= 1e-5 * max(float(want.norm()), 1.0), target


# ------------------------------------------------------------------------------------------ add-difference


def test_add_difference_is_the_formula(sd1_files, tmp_path):
    _, _, ckpt, _, _, _ = sd1_files
    a = load_file(str(ckpt))
    gen = torch.Generator().manual_seed(0)
    states = [a] + [{k: v + torch.randn(v.shape, generator=gen) * 0.1 if v.is_floating_point() else v
                     for k, v in a.items()} for _ in range(2)]
    paths = [ckpt] + [write(tmp_path / f"{n}.safetensors", state) for n, state in zip("bc", states[1:])]
    result = add_difference(*paths, tmp_path / "out.safetensors", multiplier=0.3, save_precision="fp32")
    out = load_file(str(result.saved.path))
    a, b, c = states
    for key, value in out.items():
        if value.is_floating_point():
            assert torch.equal(value, a[key] + 0.3 * (b[key] - c[key])), key
        else:
            assert torch.equal(value, a[key])
    assert_hashes(result.saved.path)

    blocks = "0," + ",".join(["0.5"] * 12) + ",1," + ",".join(["2"] * 12)
    per_block = add_difference(*paths, tmp_path / "blocks.safetensors", multiplier=0.3, blocks=blocks,
                               save_precision="fp32")
    out = load_file(str(per_block.saved.path))
    expect = {"model.diffusion_model.input_blocks.4.1.proj_in.weight": 0.5,
              "model.diffusion_model.middle_block.0.in_layers.2.bias": 1.0,
              "model.diffusion_model.output_blocks.0.0.skip_connection.weight": 2.0,
              "cond_stage_model.transformer.text_model.encoder.layers.0.mlp.fc1.weight": 0.0,
              "model.diffusion_model.time_embed.0.weight": 0.3}
    for key, m in expect.items():
        assert torch.equal(out[key], a[key] + m * (b[key] - c[key])), key


# ------------------------------------------------------------------------------------------ inspect


def test_inspect_reports_ranks_hashes_and_block_norms(sd1_files, tmp_path):
    _, index, ckpt, lora, targets, _ = sd1_files
    info = inspect_lora(lora)
    assert info["family"] == "sd1" and info["algorithms"] == {"lora": len(targets)}
    assert info["ranks"] == {4: len(targets)} and info["alphas"] == {2.0: len(targets)}
    assert info["hashes"]["model_hash"] == addnet_hash(lora) and info["hashes"]["sshs_model_hash"] is None
    want = block_norms(load_network(lora, index), index)
    for block, value in want.items():
        assert info["block_norms"].get(block, 0.0) == pytest.approx(value, rel=1e-5, abs=1e-6), block
    with_model = inspect_lora(lora, model=ckpt)
    for block, value in want.items():
        assert with_model["block_norms"].get(block, 0.0) == pytest.approx(value, rel=1e-5, abs=1e-6), block
    png = render_block_chart(info["block_norms"], tmp_path / "chart.png", "lora")
    from PIL import Image
    with Image.open(png) as image:
        assert image.format == "PNG" and image.size[0] > 200
        assert len(image.getcolors(maxcolors=1 << 16)) > 2  # bars drawn, not a blank image


def test_inspect_needs_the_model_for_base_dependent_algorithms(sd1_files, tmp_path):
    _, index, ckpt, _, targets, _ = sd1_files
    dora = write(tmp_path / "dora.safetensors", make_kohya_lora(index, targets[:3], LoraSpec(dora=True)))
    info = inspect_lora(dora)
    assert len(info["needs_model"]) == 3 and info["algorithms"] == {"lora+dora": 3}
    assert not inspect_lora(dora, model=ckpt)["needs_model"]


# ------------------------------------------------------------------------------------------ refusals


def test_every_tool_refuses_to_overwrite(sd1_files, tmp_path):
    _, _, ckpt, lora, _, _ = sd1_files
    out = tmp_path / "exists.safetensors"
    out.write_bytes(b"keep me")
    calls = [lambda **kw: merge_into(ckpt, [lora], out, **kw),
             lambda **kw: merge_loras([lora], out, mode="concat", **kw),
             lambda **kw: extract(ckpt, ckpt, out, **kw),
             lambda **kw: resize(lora, out, rank=2, **kw),
             lambda **kw: add_difference(ckpt, ckpt, ckpt, out, **kw)]
    for call in calls:
        with pytest.raises(LoraFileError, match="already exists"):
            call()
        assert out.read_bytes() == b"keep me"
    resize(lora, out, rank=2, overwrite=True)
    assert read_metadata(out)["ss_network_dim"] == "2"
    assert not list(tmp_path.glob(".*.tmp"))


def test_family_mismatches_are_refused_with_both_files_named(sd1_files, sdxl_model, tmp_path):
    _, _, ckpt, lora, _, _ = sd1_files
    index = ModelIndex(sdxl_model)
    xl_lora = write(tmp_path / "xl.safetensors", make_kohya_lora(index, targets_by_name(index, "input_blocks.4.1.proj_in")),
                    {"ss_base_model_version": "sdxl_base_v1-0"})
    with pytest.raises(FamilyMismatchError, match="SDXL.*SD1"):
        merge_into(ckpt, [xl_lora], tmp_path / "o.safetensors")
    with pytest.raises(FamilyMismatchError) as error:
        merge_loras([lora, xl_lora], tmp_path / "o.safetensors", mode="concat")
    assert "xl.safetensors" in str(error.value) and "lora.safetensors" in str(error.value)
    xl_ckpt = write(tmp_path / "xl_ckpt.safetensors", checkpoint_state(sdxl_model))
    with pytest.raises(FamilyMismatchError, match="SDXL"):
        extract(ckpt, xl_ckpt, tmp_path / "o.safetensors")
    with pytest.raises(FamilyMismatchError):
        add_difference(ckpt, ckpt, xl_ckpt, tmp_path / "o.safetensors")
    assert not (tmp_path / "o.safetensors").exists()


def test_missing_files_and_bad_items_are_clear_errors(sd1_files, tmp_path):
    _, _, ckpt, lora, _, folder = sd1_files
    with pytest.raises(LoraFileError, match="file not found"):
        merge_into(ckpt, [str(tmp_path / "nope.safetensors")], tmp_path / "o.safetensors")
    with pytest.raises(LoraFileError, match="file not found"):
        merge_into(tmp_path / "no_ckpt.safetensors", [lora], tmp_path / "o.safetensors")
    with pytest.raises(ValueError, match="values"):
        merge_into(ckpt, [f"{lora}:1:1,0,1"], tmp_path / "o.safetensors")
    item = parse_item("lora:0.5:OUTALL", lora_dirs=[folder])
    assert item.path == lora and item.ratio == 0.5 and item.blocks == "OUTALL"
    assert parse_item(f"{lora}:-1").ratio == -1.0 and parse_item(str(lora)).ratio == 1.0
    with pytest.raises(LoraFileError):
        resize(lora, tmp_path / "o.ckpt")
    assert not (tmp_path / "o.safetensors").exists()
