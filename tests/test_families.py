"""Every family the built-in handles: SD2 768-v, inpainting / instruct-pix2pix, the SDXL refiner, SD3 (MMDiT).

Expected names come from the WebUI's own code: ``tests/data/a1111_*_layers.txt`` (``tools/dump_reference_layers.py``
builds each model from the WebUI's configs, SD3 from A1111's ``modules/models/sd3``, on the meta device). SD3's
diffusers names are checked against diffusers' own checkpoint converter (``convert_sd3_transformer_checkpoint_to_
diffusers``: which SAI weight, or which third of a fused qkv, each diffusers weight is), and its files are written
by diffusers/PEFT themselves (``StableDiffusion3Pipeline.save_lora_weights`` of a PEFT adapter); the q/k/v math is
checked against PEFT's own LoRA layers run on the same weights.
"""
from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

import tiny_models
from lora_core.blocks import block_ids
from lora_core.errors import FamilyMismatchError
from lora_core.families import detect_sd_version, family_name
from lora_core.inspect import describe
from lora_core.keymap import detect_file_family, map_keys
from lora_core.library import LoraLibrary
from lora_core.model_index import ModelIndex, Target
from lora_core.network import load_network
from lora_core.runtime import LoraRuntime
from lora_factory import LoraSpec, assert_both_modes_give, make_kohya_lora, pick_targets

DATA = Path(__file__).parent / "data"
TRACKED = (nn.Linear, nn.Conv2d, nn.GroupNorm, nn.LayerNorm, nn.MultiheadAttention)


def golden(name: str) -> list[tuple[str, str]]:
    text = (DATA / f"a1111_{name}_layers.txt").read_text()
    return [tuple(line.split("\t")) for line in text.splitlines() if line and not line.startswith("#")]


def golden_conv_in(name: str) -> tuple[int, ...]:
    m = re.search(r"^# conv_in weight shape: \(([\d, ]+)\)$", (DATA / f"a1111_{name}_layers.txt").read_text(), re.M)
    return tuple(int(v) for v in m[1].split(","))


@pytest.fixture(scope="module")
def sd3() -> ModelIndex:
    return ModelIndex(tiny_models.build_sd3(seed=1))


@pytest.fixture(scope="module")
def refiner() -> ModelIndex:
    return ModelIndex(tiny_models.build_sdxl_refiner(seed=1))


# ---------------------------------------------------------------- the WebUI's own layer names
@pytest.mark.parametrize("base, variant", [("sd15", "sd15_inpaint"), ("sd15", "sd15_pix2pix"), ("sd2", "sd2_v"),
                                           ("sdxl", "sdxl_inpaint")])
def test_variants_have_their_base_models_layers(base, variant):
    """SD2 768-v, inpainting and pix2pix: the same layers as the base (so the same LoRAs); only conv_in differs."""
    assert golden(variant) == golden(base)
    assert golden_conv_in(variant)[0] == golden_conv_in(base)[0] and golden_conv_in(base)[1] == 4


@pytest.mark.parametrize("golden_name, family, channels, variant", [
    ("sd15", "sd1", 4, None), ("sd15_inpaint", "sd1", 9, "inpaint"), ("sd15_pix2pix", "sd1", 8, "pix2pix"),
    ("sdxl_inpaint", "sdxl", 9, "inpaint")])
def test_index_names_the_variant(golden_name, family, channels, variant):
    assert golden_conv_in(golden_name)[1] == channels
    index = ModelIndex(tiny_models.BUILDERS[family](in_channels=channels))
    assert (index.family, index.variant) == (family, variant)
    assert family_name(index.family, index.variant) == {None: "SD1.x", "inpaint": "SD1.x inpainting",
                                                        "pix2pix": "SD1.x instruct-pix2pix"}[variant] \
        if family == "sd1" else "SDXL inpainting"


@pytest.mark.parametrize("family", ["sdxl_refiner", "sd3"])
def test_tiny_models_have_the_webuis_layers(family):
    root = tiny_models.BUILDERS[family]()
    got = [(name, type(module).__name__) for name, module in root.named_modules() if isinstance(module, TRACKED)]
    want = golden(family)
    assert set(got) == set(want) and len(got) == len(want)
    if family == "sdxl_refiner":
        assert got == want


def test_refiner_index_has_bigg_as_te2_and_its_own_unet(refiner):
    assert refiner.family == "sdxl_refiner"
    assert [(c.kind, c.prefix, c.kohya_prefixes) for c in refiner.components] == [
        ("unet", "model.diffusion_model.", ("lora_unet_",)),
        ("te", "conditioner.embedders.0.wrapped.model.", ("lora_te2_",))]
    mha = "conditioner.embedders.0.wrapped.model.transformer.resblocks.31.attn"
    assert refiner.lookup("lora_te2_text_model_encoder_layers_31_self_attn_v_proj") == Target(mha, "v")
    assert refiner.lookup("lora_te1_text_model_encoder_layers_0_self_attn_v_proj") is None  # no CLIP-L here
    # the refiner's 4 levels: input_blocks 0..11 (SDXL base: 0..8), attention in levels 2 and 3 only
    assert refiner.lookup("lora_unet_input_blocks_11_0_out_layers_3") is not None
    assert refiner.lookup("lora_unet_input_blocks_7_1_transformer_blocks_3_attn2_to_k") is not None
    assert refiner.lookup("lora_unet_input_blocks_1_1_proj_in") is None


def test_sd3_index_splits_the_fused_qkv(sd3):
    assert sd3.family == "sd3" and sd3.variant is None
    assert [c.kohya_prefixes for c in sd3.components] == [("lora_unet_",), ("lora_te1_",), ("lora_te2_",),
                                                          ("lora_te3_",)]
    qkv = "model.diffusion_model.joint_blocks.5.context_block.attn.qkv"
    assert sd3.lookup("lora_unet_joint_blocks_5_context_block_attn_qkv") == Target(qkv)
    width = sd3.modules[qkv].in_features
    for i, part in enumerate("qkv"):
        target = Target(qkv, part)
        assert sd3.lookup(f"lora_unet_joint_blocks_5_context_block_attn_qkv_{part}_proj") == target
        assert sd3.weight(target).data_ptr() == sd3.modules[qkv].weight[i * width:].data_ptr()
        assert sd3.weight_shape(target) == (width, width)
    assert sd3.lookup("lora_te3_encoder_block_0_layer_0_SelfAttention_q") == Target(
        "text_encoders.t5xxl.transformer.encoder.block.0.layer.0.SelfAttention.q")
    assert sd3.lookup("lora_te2_text_model_encoder_layers_31_mlp_fc2") == Target(
        "text_encoders.clip_g.transformer.text_model.encoder.layers.31.mlp.fc2")


# ---------------------------------------------------------------- SD3 names: diffusers' converter is the oracle
def _converter_oracle(root: nn.Module) -> dict[str, Target | None]:
    """diffusers module name -> the A1111 target whose weight (or q/k/v third) diffusers' own SD3 converter gives
    it; None where the values are rearranged (norm_out and the last block's norm1_context swap their halves)."""
    from diffusers.loaders.single_file_utils import convert_sd3_transformer_checkpoint_to_diffusers

    dit = root.model.diffusion_model
    gen = torch.Generator().manual_seed(0)
    state = {k: torch.randn(v.shape, generator=gen) for k, v in dit.state_dict().items()}
    for name, module in dit.named_modules():  # adaLN norms without parameters still have none
        if isinstance(module, nn.Linear) and module.bias is None:
            state[f"{name}.bias"] = torch.randn(module.out_features, generator=gen)
    state["pos_embed"] = torch.zeros(1, 16, dit.x_embedder.proj.out_channels)
    sources = {k[:-len(".weight")]: v for k, v in state.items() if k.endswith(".weight")}
    converted = convert_sd3_transformer_checkpoint_to_diffusers(dict(state))
    oracle: dict[str, Target | None] = {}
    for key, value in converted.items():
        if not key.endswith(".weight") or value.dim() != 2:
            continue
        found = None
        for src, weight in sources.items():
            if weight.shape == value.shape and torch.equal(weight, value):
                found = Target("model.diffusion_model." + src)
            elif weight.shape[0] == 3 * value.shape[0] and src.endswith("attn.qkv"):
                for part, chunk in zip("qkv", weight.chunk(3)):
                    if torch.equal(chunk, value):
                        found = Target("model.diffusion_model." + src, part)
        oracle[key[:-len(".weight")]] = found
    return oracle


def test_sd3_diffusers_names_hit_what_diffusers_converter_says(sd3):
    oracle = _converter_oracle(sd3.root)
    assert sum(t is not None and t.part is not None for t in oracle.values()) == 2 * 3 * tiny_models.SD3_DEPTH
    keys = [f"transformer.{module}.lora_A.weight" for module in oracle]
    result = map_keys(keys, sd3)
    got = {group.params["lora_down.weight"][len("transformer."):-len(".lora_A.weight")]: target
           for target, group in result.groups.items()}
    expected = {module: target for module, target in oracle.items() if target is not None}
    assert got == expected
    # what diffusers stores rearranged is not applied anywhere, and says so
    rearranged = {f"transformer.{m}.lora_A.weight" for m, t in oracle.items() if t is None}
    assert set(result.unmatched) == rearranged and rearranged == {
        "transformer.norm_out.linear.lora_A.weight",
        f"transformer.transformer_blocks.{tiny_models.SD3_DEPTH - 1}.norm1_context.linear.lora_A.weight"}


def test_sd3_kohya_and_a1111_names(sd3):
    """sd-scripts names MMDiT modules as SAI does (the fused qkv whole); A1111's own layer names start with
    ``diffusion_model_``; the built-in's diffusers map names the q/k/v rows ``..._attn_qkv_{q,k,v}_proj``."""
    keys = ["lora_unet_joint_blocks_0_x_block_attn_qkv.lora_down.weight",
            "diffusion_model_joint_blocks_1_x_block_mlp_fc1.lora_down.weight",
            "diffusion_model_joint_blocks_2_x_block_attn_qkv_k_proj.lora_down.weight",
            "lora_te1_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight",
            "lora_te3_encoder_block_3_layer_1_DenseReluDense_wi_0.lora_down.weight"]
    groups = map_keys(keys, sd3).groups
    prefix = "model.diffusion_model.joint_blocks."
    assert set(groups) == {Target(prefix + "0.x_block.attn.qkv"), Target(prefix + "1.x_block.mlp.fc1"),
                           Target(prefix + "2.x_block.attn.qkv", "k"),
                           Target("text_encoders.clip_l.transformer.text_model.encoder.layers.0.self_attn.q_proj"),
                           Target("text_encoders.t5xxl.transformer.encoder.block.3.layer.1.DenseReluDense.wi_0")}


# ---------------------------------------------------------------- SD3 files written by diffusers/PEFT
def _diffusers_sd3():
    from diffusers import SD3Transformer2DModel

    torch.manual_seed(0)
    return SD3Transformer2DModel(sample_size=8, patch_size=2, in_channels=16, num_layers=tiny_models.SD3_DEPTH,
                                 attention_head_dim=8, num_attention_heads=4, joint_attention_dim=16,
                                 caption_projection_dim=tiny_models.SD3_WIDTH, pooled_projection_dim=16,
                                 out_channels=16, pos_embed_max_size=8)


ATTENTION = ["attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0", "attn.add_q_proj", "attn.add_k_proj",
             "attn.add_v_proj", "attn.to_add_out"]


@pytest.fixture(scope="module")
def peft_sd3_file(tmp_path_factory, sd3):
    """diffusers' DreamBooth-LoRA SD3 recipe: a PEFT adapter on the attention projections, saved by the pipeline.
    Block 4's projections take the tiny A1111 model's weights (each a q/k/v third of its fused qkv). The diffusers
    format has no alpha (diffusers itself reads such a file at scale 1), so alpha is the rank here."""
    from diffusers import StableDiffusion3Pipeline
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    model = _diffusers_sd3()
    qkv = {"attn": sd3.modules["model.diffusion_model.joint_blocks.4.x_block.attn.qkv"],
           "add": sd3.modules["model.diffusion_model.joint_blocks.4.context_block.attn.qkv"]}
    attn = model.transformer_blocks[4].attn
    with torch.no_grad():
        for stream, names in (("attn", ("to_q", "to_k", "to_v")), ("add", ("add_q_proj", "add_k_proj", "add_v_proj"))):
            for name, w, b in zip(names, qkv[stream].weight.chunk(3), qkv[stream].bias.chunk(3)):
                getattr(attn, name).weight.copy_(w)
                getattr(attn, name).bias.copy_(b)
    model.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=ATTENTION, init_lora_weights=False))
    folder = tmp_path_factory.mktemp("peft_sd3")
    StableDiffusion3Pipeline.save_lora_weights(folder, transformer_lora_layers=get_peft_model_state_dict(model),
                                               weight_name="sd3_lora.safetensors")
    return folder / "sd3_lora.safetensors", model


def test_a_diffusers_sd3_lora_maps_every_key_and_is_sd3(peft_sd3_file, sd3):
    path, _ = peft_sd3_file
    net = load_network(path, sd3)
    assert net.family == "sd3"
    report = net.report
    assert not report.unmatched and not report.unknown and not report.unused and not report.problems
    # 24 blocks x 8 projections, but the last block has no to_add_out (its text stream is "pre-only")
    assert len(net.adapters) == tiny_models.SD3_DEPTH * len(ATTENTION) - 1
    assert Target("model.diffusion_model.joint_blocks.23.context_block.attn.qkv", "v") in net.adapters


@pytest.mark.parametrize("m", [1.0, -0.5])
def test_sd3_qkv_rows_follow_peft_in_both_modes(peft_sd3_file, sd3, m):
    """The fused qkv with LoRAs on q, k and v: each third of its output moves as PEFT's own to_q/to_k/to_v."""
    path, model = peft_sd3_file
    net = load_network(path, sd3)
    attn = model.transformer_blocks[4].attn
    x = torch.randn(2, 5, tiny_models.SD3_WIDTH, generator=torch.Generator().manual_seed(3))
    for stream, names in (("x_block", ("to_q", "to_k", "to_v")), ("context_block", ("add_q_proj", "add_k_proj",
                                                                                      "add_v_proj"))):
        name = f"model.diffusion_model.joint_blocks.4.{stream}.attn.qkv"
        layer = sd3.modules[name]
        with torch.no_grad():
            base = torch.cat([getattr(attn, n).base_layer(x) for n in names], dim=-1)
            peft = torch.cat([getattr(attn, n)(x) for n in names], dim=-1)
            assert torch.allclose(layer(x), base, atol=1e-6)  # the same weights on both sides
        want = base + m * (peft - base)
        assert_both_modes_give(sd3, net, Target(name, "q"), lambda: layer(x).detach(), want, m, stream)


# ---------------------------------------------------------------- the refiner's LoRAs
@pytest.mark.parametrize("m", [1.0, -0.6])
def test_refiner_lora_on_bigg_and_its_unet_in_both_modes(refiner, tmp_path, m):
    """A refiner LoRA (te2 = bigG's q/k/v rows and out_proj, UNet layers of the refiner's own widths): each layer
    computes ``W0 + m dW`` (dW by the independent float64 formula) in both modes, and is restored."""
    from lora_factory import expected_delta
    from test_lora_math import explicit_layer, layer_input, run_layer

    mha = "conditioner.embedders.0.wrapped.model.transformer.resblocks.5.attn"
    targets = [Target(mha, "k"), Target(mha, "out"),
               Target("model.diffusion_model.input_blocks.7.1.transformer_blocks.2.attn2.to_k"),
               Target("model.diffusion_model.output_blocks.9.0.in_layers.2")]
    sd = make_kohya_lora(refiner, targets, LoraSpec(rank=2, alpha=1.0), seed=5)
    assert {k.split(".")[0] for k in sd} == {"lora_te2_text_model_encoder_layers_5_self_attn_k_proj",
                                            "lora_te2_text_model_encoder_layers_5_self_attn_out_proj",
                                            "lora_unet_input_blocks_7_1_transformer_blocks_2_attn2_to_k",
                                            "lora_unet_output_blocks_9_0_in_layers_2"}
    path = tmp_path / "refiner.safetensors"
    save_file(sd, str(path))
    net = load_network(path, refiner)
    assert set(net.adapters) == set(targets) and not net.report.problems and not net.report.unmatched
    gen = torch.Generator().manual_seed(2)
    for target in targets:  # one layer's file at a time (k and out share bigG's MultiheadAttention)
        module = refiner.module(target)
        name = next(k.split(".")[0] for k in sd if k.split(".")[0] in _names_of(refiner, target))
        tensors = {k[len(name) + 1:]: v for k, v in sd.items() if k.startswith(name + ".")}
        single = tmp_path / f"{name}.safetensors"
        save_file({f"{name}.{k}": v for k, v in tensors.items()}, str(single))
        dw = expected_delta(tensors, refiner.weight(target).detach())
        args = layer_input(module, gen, torch.float32)
        want = run_layer(explicit_layer(module, target, dw, m), args).detach()
        assert_both_modes_give(refiner, load_network(single, refiner), target,
                               lambda: run_layer(module, args).detach(), want, m, target)


def _names_of(index: ModelIndex, target: Target) -> set[str]:
    return {name for name, t in index.kohya_names() if t == target}


# ---------------------------------------------------------------- the family of a file; another family's LoRA
@pytest.mark.parametrize("metadata, family", [
    ({"ss_base_model_version": "sd3"}, "sd3"),
    ({"modelspec.architecture": "stable-diffusion-v3-medium/lora"}, "sd3"),
    ({"modelspec.architecture": "stable-diffusion-xl-v1-refiner/lora"}, "sdxl_refiner"),
    ({"modelspec.architecture": "stable-diffusion-xl-v1-base/lora"}, "sdxl"),
    ({"ss_base_model_version": "sd_v2_768_v"}, "sd2")])
def test_family_from_metadata(metadata, family):
    assert detect_sd_version(metadata) == family


@pytest.mark.parametrize("keys, width, model_family, family", [
    (["lora_unet_input_blocks_4_1_transformer_blocks_0_attn2_to_k.lora_down.weight"], 1280, None, "sdxl_refiner"),
    (["lora_unet_input_blocks_4_1_transformer_blocks_0_attn2_to_k.lora_down.weight"], 2048, None, "sdxl"),
    (["lora_unet_joint_blocks_0_x_block_attn_qkv.lora_down.weight"], 0, None, "sd3"),
    (["transformer.transformer_blocks.0.attn.to_q.lora_A.weight"], 0, None, "sd3"),
    (["lora_te2_text_model_encoder_layers_0_mlp_fc1.lora_down.weight"], 0, "sdxl_refiner", "sdxl_refiner"),
    (["lora_te2_text_model_encoder_layers_0_mlp_fc1.lora_down.weight"], 0, "sd3", "sd3"),
    (["lora_te2_text_model_encoder_layers_0_mlp_fc1.lora_down.weight"], 0, "sd1", "sdxl")])
def test_family_from_keys(keys, width, model_family, family):
    assert detect_file_family(keys, {}, lambda key: (4, width), model_family) == family


@pytest.mark.parametrize("file_family, model, message", [
    ("sdxl", ("sd1", 4), "this LoRA is for SDXL, the loaded model is SD1.x"),
    ("sd3", ("sdxl", 4), "this LoRA is for SD3, the loaded model is SDXL"),
    ("sdxl", ("sd1", 9), "this LoRA is for SDXL, the loaded model is SD1.x inpainting")])
def test_another_familys_lora_is_skipped_with_one_clear_message(tmp_path, file_family, model, message):
    root = tiny_models.BUILDERS[model[0]](in_channels=model[1])
    original = {k: v.clone() for k, v in root.state_dict().items()}
    index = ModelIndex(root)
    sd = make_kohya_lora(index, pick_targets(index, limit_per_kind=2))  # names that exist in the loaded model
    save_file(sd, str(tmp_path / "other.safetensors"), metadata={"ss_base_model_version": {
        "sdxl": "sdxl_base_v1-0", "sd3": "sd3"}[file_family]})
    save_file(make_kohya_lora(index, pick_targets(index, limit_per_kind=1)), str(tmp_path / "fine.safetensors"))
    with pytest.raises(FamilyMismatchError, match=re.escape(message)):
        load_network(tmp_path / "other.safetensors", index)
    runtime = LoraRuntime(LoraLibrary([tmp_path]))
    runtime.bind(root)
    result = runtime.activate([["other", "1"], ["fine", "1"]])
    assert [a.entry.name for a in result.active] == ["fine"]  # the generation goes on with the others
    assert len(result.errors) == 1 and message in result.errors[0] and "Traceback" not in result.errors[0]
    runtime.restore()
    assert all(torch.equal(v, original[k]) for k, v in root.state_dict().items())


def test_inspect_names_the_family_and_the_variant(tmp_path):
    root = tiny_models.build_sd1(in_channels=9)
    index = ModelIndex(root)
    save_file(make_kohya_lora(index, pick_targets(index, limit_per_kind=1)), str(tmp_path / "a.safetensors"),
              metadata={"ss_base_model_version": "sd_v1"})
    runtime = LoraRuntime(LoraLibrary([tmp_path]))
    runtime.bind(root)
    info = describe(runtime, "a")
    assert (info["family"], info["family_name"]) == ("sd1", "SD1.x")
    assert (info["model_family"], info["model_variant"], info["model_family_name"]) == ("sd1", "inpaint",
                                                                                      "SD1.x inpainting")


@pytest.mark.parametrize("family", ["sdxl_refiner", "sd3"])
def test_block_weights_say_lbw_has_no_blocks_for_the_family(family, tmp_path):
    from lora_core.blocks import PresetBook, layer_scale_factory

    message = f"defines no blocks for {family_name(family)}"
    with pytest.raises(ValueError, match=message):
        block_ids(family)
    root = tiny_models.BUILDERS[family]()
    index = ModelIndex(root)
    save_file(make_kohya_lora(index, pick_targets(index, limit_per_kind=1)), str(tmp_path / "a.safetensors"))
    runtime = LoraRuntime(LoraLibrary([tmp_path]), layer_scale_factory=layer_scale_factory(PresetBook.default()))
    runtime.bind(root)
    assert runtime.activate([["a", "1"]]).active  # without block weights it applies
    runtime.restore()
    result = runtime.activate([["a", "1", "lbw=ALL"]])
    assert result.active == [] and len(result.errors) == 1 and message in result.errors[0]


# ---------------------------------------------------------------- the built-in's own mapping, run in the WebUI
def builtin_keymap(family: str) -> dict[str, str]:
    """file module -> what the built-in Lora's ``networks.load_network`` matched it to on the real model ('-': none),
    written by ``tools/dump_reference_layers.py`` with the WebUI's own code."""
    text = (DATA / f"a1111_{family}_builtin_keymap.txt").read_text()
    return dict(line.split("\t") for line in text.splitlines() if line and not line.startswith("#"))


def _file_key(module: str) -> str:
    return f"{module}.lora_A.weight" if module.startswith("transformer.") else f"{module}.lora_down.weight"


def _target_text(target: Target) -> str:
    return target.module if target.part is None else f"{target.module}[{target.part}]"


#: where ours maps what the built-in leaves unmatched, per family: name pattern of the file module
BEYOND_BUILTIN = {
    "sdxl": None,
    "sdxl_refiner": r"lora_te2_",  # the refiner's bigG: the built-in looks for it as the second embedder
    "sd3": r"lora_te[123]_|transformer\.transformer_blocks\.\d+\.attn\.add_[qkv]_proj",  # text encoders; the
    # text stream's q/k/v (A1111's diffusers map names them with a stray dot)
}


@pytest.mark.parametrize("family", sorted(BEYOND_BUILTIN))
def test_ours_agrees_with_the_builtins_own_mapping(family):
    expected = builtin_keymap(family)
    index = ModelIndex(tiny_models.BUILDERS[family]())  # the same layer names as the real model (tested above)
    ours = {}
    for module in expected:  # one name at a time: a file names each layer once (here two namings name each)
        groups = map_keys([_file_key(module)], index).groups
        if groups:
            ours[module] = _target_text(next(iter(groups)))
    builtin_matched = {m: t for m, t in expected.items() if t != "-"}
    assert {m: ours.get(m) for m in builtin_matched} == builtin_matched
    beyond = {m: t for m, t in ours.items() if m not in builtin_matched}
    pattern = BEYOND_BUILTIN[family]
    assert all(re.match(pattern, m) for m in beyond) if pattern else not beyond
    # what neither maps is only what the real model does not have (the last SD3 block's text-stream projection)
    neither = {m for m in expected if m not in ours}
    assert neither == ({f"transformer.transformer_blocks.{tiny_models.SD3_DEPTH - 1}.attn.add_out_proj.0"}
                       if family == "sd3" else set())
    if pattern:
        assert len(beyond) == sum(1 for m, t in expected.items() if t == "-") - len(neither)
