"""The key mapping, proven against third-party writers (SPEC §3, §5).

LoRAs are written by PEFT on diffusers' ``UNet2DConditionModel`` and transformers' ``CLIPTextModel`` built with
the tiny models' sizes, saved in PEFT/diffusers naming, in diffusers' older namings, and converted to kohya's
with ``diffusers.utils.convert_state_dict_to_kohya``; sd-scripts' SDXL/SD2 names are written from the rules of
SPEC §3, in this file, without lora_core's index. Each file must map every key onto the layer of the same
shape. That a key lands on the *right* layer (not just a same-shaped one) is proven by computing: the
diffusers UNet's weights are copied into the ldm UNet through the mapping and both must compute the same,
before and after the LoRA (PEFT's forward against our patched model); the OpenCLIP text tower gets an HF CLIP's
weights by the SPEC table and must compute what PEFT's HF CLIP computes.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

import tiny_models
from lora_core.keymap import map_keys, resolve_module
from lora_core.model_index import ModelIndex, Target
from lora_core.network import Network, load_network
from lora_core.patch import Patcher
from lora_factory import LoraSpec, lora_tensors

peft = pytest.importorskip("peft")
diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")
from diffusers import UNet2DConditionModel  # noqa: E402
from diffusers.utils import convert_state_dict_to_kohya  # noqa: E402
from ldm.modules.diffusionmodules.util import timestep_embedding  # noqa: E402

RANK = 2
UNET = "model.diffusion_model."
LORA_LAYERS = (nn.Linear, nn.Conv2d)
COPIED_LAYERS = (nn.Linear, nn.Conv2d, nn.GroupNorm, nn.LayerNorm)
CLIP_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"]
CLIP_LAYER = r"encoder\.layers\.(\d+)\.(self_attn\.(q|k|v|out)_proj|mlp\.fc1|mlp\.fc2)"  # HF CLIP's Linear layers
# Every kind of layer kohya's LoRA/LoCon targets in an SD UNet; the PEFT LoRA below must cover each.
UNET_LAYER_KINDS = ("attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0", "attn2.to_k", "proj_in",
                    "proj_out", "ff.net.0.proj", "ff.net.2", "conv1", "conv2", "time_emb_proj", "conv_shortcut",
                    "downsamplers.0.conv", "upsamplers.0.conv", "conv_in", "conv_out",
                    "time_embedding.linear_1", "time_embedding.linear_2")


# ---------------------------------------------------------------- third-party twins of the tiny models
def diffusers_sd1_unet() -> UNet2DConditionModel:
    """v1-inference.yaml's UNet as diffusers builds it, at the sizes of ``tiny_models.build_sd1``."""
    return UNet2DConditionModel(
        sample_size=32, in_channels=tiny_models.LATENT_CHANNELS, out_channels=tiny_models.LATENT_CHANNELS,
        block_out_channels=tuple(tiny_models.UNET_WIDTH * m for m in (1, 2, 4, 4)),
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        layers_per_block=2, norm_num_groups=32, cross_attention_dim=tiny_models.CLIP_L["width"],
        attention_head_dim=8,  # diffusers' SD1 configs mean 8 heads by it, as ldm's num_heads=8
        use_linear_projection=False)


def diffusers_sdxl_unet() -> UNet2DConditionModel:
    """sd_xl_base.yaml's UNet as diffusers builds it, at the sizes of ``tiny_models.build_sdxl``."""
    widths = tuple(tiny_models.UNET_WIDTH * m for m in tiny_models.SDXL_CHANNEL_MULT)
    return UNet2DConditionModel(
        sample_size=32, in_channels=tiny_models.LATENT_CHANNELS, out_channels=tiny_models.LATENT_CHANNELS,
        block_out_channels=widths,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        layers_per_block=2, norm_num_groups=32,
        cross_attention_dim=tiny_models.CLIP_L["width"] + tiny_models.OPEN_CLIP_BIGG["width"],
        attention_head_dim=tuple(w // 16 for w in widths),  # heads, 16 channels each (num_head_channels=16)
        transformer_layers_per_block=(1, tiny_models.SDXL_LEVEL2_DEPTH, tiny_models.SDXL_DEPTH),
        use_linear_projection=True, addition_embed_type="text_time",
        addition_time_embed_dim=tiny_models.SIZE_EMBED_DIM,
        projection_class_embeddings_input_dim=tiny_models.sdxl_adm_in_channels())


def hf_clip_config(width: int, heads: int, layers: int, act: str):
    v = tiny_models.VOCAB_SIZE
    return transformers.CLIPTextConfig(
        vocab_size=v, hidden_size=width, intermediate_size=4 * width, projection_dim=width,
        num_hidden_layers=layers, num_attention_heads=heads, max_position_embeddings=tiny_models.CONTEXT_LENGTH,
        hidden_act=act, pad_token_id=v - 1, bos_token_id=v - 2, eos_token_id=v - 1)


def hf_clip(config) -> nn.Module:
    """The text tower of a ``CLIPTextModel`` (``embeddings``, ``encoder``, ``final_layer_norm``)."""
    model = transformers.CLIPTextModel(config)
    return getattr(model, "text_model", model)


# How a diffusers pipeline prefixes a text encoder's PEFT keys: transformers 4 nests the tower as
# ``text_model`` (the names of every diffusers LoRA published so far), transformers 5 does not.
TE_LAYOUT_PREFIX = {"v4": ".text_model", "flat": ""}


# ---------------------------------------------------------------- PEFT
def lora_layer_names(model: nn.Module) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, LORA_LAYERS)]


def add_peft_lora(model: nn.Module, targets: list[str], seed: int) -> nn.Module:
    """PEFT LoRA on ``targets``, A and B random (not PEFT's zero B), scaling 1 (alpha = rank, as the kohya
    conversion writes it)."""
    config = peft.LoraConfig(r=RANK, lora_alpha=RANK, target_modules=targets, init_lora_weights=False)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        peft.inject_adapter_in_model(config, model)
    return model.eval()


def peft_state_dict(model: nn.Module, prefix: str) -> dict[str, torch.Tensor]:
    """What a diffusers pipeline saves: PEFT's state dict under the component's prefix."""
    return {f"{prefix}.{k}": v for k, v in peft.get_peft_model_state_dict(model).items()}


def peft_deltas(model: nn.Module, prefix: str) -> dict[str, torch.Tensor]:
    """dW of every LoRA layer, as PEFT computes it, by dotted diffusers name (with ``prefix``)."""
    return {f"{prefix}.{n}": m.get_delta_weight("default").detach() for n, m in model.named_modules()
            if isinstance(m, peft.tuners.lora.LoraLayer)}


def base_layer(module: nn.Module) -> nn.Module:
    return getattr(module, "base_layer", module)


def seeded(build, seed: int):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build().float().eval()


# ---------------------------------------------------------------- files and checks
def write(path: Path, tensors: dict[str, torch.Tensor]) -> Path:
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path))
    return path


def load_all(path: Path, index: ModelIndex) -> Network:
    """Load and demand that every key was used."""
    net = load_network(path, index)
    report = net.report
    assert not report.unmatched, f"{len(report.unmatched)} unmatched, e.g. {report.unmatched[:3]}"
    assert not report.unknown, f"{len(report.unknown)} unknown, e.g. {report.unknown[:3]}"
    assert not report.unused and not report.problems, report.summary()
    assert len(report.used) == report.total
    return net


def targets_by_module(keys, index: ModelIndex) -> dict[str, Target]:
    """File module (canonical kohya name) -> target, for every group of the file."""
    keymap = map_keys(keys, index)
    return {group.module: target for target, group in keymap.groups.items()}


KOHYA_PREFIX = {"unet": "lora_unet_", "text_encoder": "lora_te1_", "text_encoder_2": "lora_te2_"}


def diffusers_targets(deltas: dict[str, torch.Tensor], index: ModelIndex) -> dict[str, Target]:
    """Dotted diffusers name (``unet.x.y``) -> the target lora_core resolves it to."""
    out = {}
    for name in deltas:
        prefix, path = name.split(".", 1)
        out[name] = resolve_module(KOHYA_PREFIX[prefix] + path.replace(".", "_"), index)
    return out


def assert_deltas_are_peft(net: Network, index: ModelIndex, deltas: dict[str, torch.Tensor]) -> None:
    """One adapter per PEFT layer, on a target of exactly that layer's weight shape, with PEFT's dW."""
    targets = diffusers_targets(deltas, index)
    assert None not in targets.values(), [n for n, t in targets.items() if t is None][:5]
    assert len(set(targets.values())) == len(targets), "two layers of the writer land on one target"
    assert set(net.adapters) == set(targets.values())
    for name, target in targets.items():
        want = deltas[name]
        assert index.weight_shape(target) == tuple(want.shape), f"{name} -> {target}"
        adapter = net.adapters[target]
        assert (adapter.up.shape[0], *adapter.down.shape[1:]) == tuple(want.shape)  # no reshaping needed
        got = adapter.delta_weight(index.weight(target).detach())
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6, msg=f"{name} -> {target}")


# ---------------------------------------------------------------- SD1: diffusers UNet + CLIP with PEFT
@dataclass
class PeftWorld:
    """A diffusers UNet and HF text encoders with PEFT LoRAs, what a pipeline saves of them, and the UNet's
    output on ``inputs`` (the tiny model's inputs) without and with the LoRA."""

    unet: nn.Module
    unet_sd: dict[str, torch.Tensor]  # 'unet.' + PEFT names
    te_sd: dict[str, torch.Tensor]  # 'text_encoder[_2].' + PEFT names
    deltas: dict[str, torch.Tensor]  # PEFT's dW by prefixed dotted name
    inputs: dict
    base_out: torch.Tensor
    lora_out: torch.Tensor


def diffusers_unet_out(unet: nn.Module, inputs: dict, added: dict | None = None) -> torch.Tensor:
    with torch.no_grad():
        return unet(inputs["x"], inputs["timesteps"], encoder_hidden_states=inputs["context"],
                    added_cond_kwargs=added).sample


@pytest.fixture(scope="module")
def sd1_peft(sd1_model) -> PeftWorld:
    unet = seeded(diffusers_sd1_unet, 1)
    inputs = tiny_models.make_inputs(sd1_model, seed=3)
    base_out = diffusers_unet_out(unet, inputs)
    add_peft_lora(unet, lora_layer_names(unet), seed=2)
    config = tiny_models.text_encoders(sd1_model)["te"].transformer.config
    te = add_peft_lora(seeded(lambda: hf_clip(config), 4), CLIP_TARGETS, seed=5)
    return PeftWorld(unet, peft_state_dict(unet, "unet"), peft_state_dict(te, "text_encoder.text_model"),
                     {**peft_deltas(unet, "unet"), **peft_deltas(te, "text_encoder.text_model")},
                     inputs, base_out, diffusers_unet_out(unet, inputs))


def test_the_peft_lora_covers_every_layer_kind_kohya_targets(sd1_peft):
    names = [n for n in sd1_peft.deltas if n.startswith("unet.")]
    missing = [kind for kind in UNET_LAYER_KINDS if not any(n.endswith("." + kind) for n in names)]
    assert not missing
    assert len(names) == len(lora_layer_names(diffusers_sd1_unet()))  # every Linear and Conv2d
    assert len([n for n in sd1_peft.deltas if n.startswith("text_encoder.")]) == 6 * tiny_models.CLIP_L["layers"]


def test_kohya_conversion_of_a_peft_sd1_lora_maps_every_key(sd1_model, sd1_peft, tmp_path):
    kohya = convert_state_dict_to_kohya({**sd1_peft.unet_sd, **sd1_peft.te_sd})
    assert any(k.startswith("lora_unet_down_blocks_0_attentions_1_") for k in kohya)  # diffusers-style names
    assert any(k.startswith("lora_te1_text_model_encoder_layers_11_") for k in kohya)
    index = ModelIndex(sd1_model)
    net = load_all(write(tmp_path / "kohya.safetensors", kohya), index)
    assert_deltas_are_peft(net, index, sd1_peft.deltas)


def test_peft_naming_of_sd1_maps_every_key(sd1_model, sd1_peft, tmp_path):
    index = ModelIndex(sd1_model)
    net = load_all(write(tmp_path / "peft.safetensors", {**sd1_peft.unet_sd, **sd1_peft.te_sd}), index)
    assert_deltas_are_peft(net, index, sd1_peft.deltas)


def test_sd1_text_encoder_lands_on_the_same_named_clip_layer(sd1_model, sd1_peft):
    """HF CLIP to HF CLIP: the target is the writer's module under A1111's prefix, name for name."""
    index = ModelIndex(sd1_model)
    te_prefix = "cond_stage_model.wrapped.transformer."
    for name, target in diffusers_targets(sd1_peft.deltas, index).items():
        if name.startswith("text_encoder."):
            assert target == Target(te_prefix + name[len("text_encoder."):])


def _old_diffusers_names(unet_sd: dict[str, torch.Tensor], te_sd: dict[str, torch.Tensor]) -> dict[str, str]:
    """New key -> PEFT key, in the namings diffusers wrote before PEFT: attention processors (UNet,
    ``attn1.processor.to_q_lora.down.weight``), ``to_q_lora`` and ``lora_linear_layer`` (text encoder),
    ``lora.down`` (UNet, diffusers 0.2x)."""
    out = {}
    processor = re.compile(r"(unet\..+\.attn[12])\.(to_q|to_k|to_v|to_out)(?:\.0)?\.lora_([AB])\.weight")
    te_attn = re.compile(r"(text_encoder\..+\.self_attn)\.(q|k|v|out)_proj\.lora_([AB])\.weight")
    up_down = {"A": "down", "B": "up"}
    for key in unet_sd:
        m = processor.fullmatch(key)
        if m:
            out[f"{m[1]}.processor.{m[2]}_lora.{up_down[m[3]]}.weight"] = key
        else:
            mod, ab = re.fullmatch(r"(.+)\.lora_([AB])\.weight", key).groups()
            out[f"{mod}.lora.{up_down[ab]}.weight"] = key
    for key in te_sd:
        m = te_attn.fullmatch(key)
        if m and m[2] in ("q", "out"):  # diffusers 0.17: to_q_lora / to_out_lora on the text encoder too
            out[f"{m[1]}.to_{m[2]}_lora.{up_down[m[3]]}.weight"] = key
        else:
            mod, ab = re.fullmatch(r"(.+)\.lora_([AB])\.weight", key).groups()
            out[f"{mod}.lora_linear_layer.{up_down[ab]}.weight"] = key
    return out


def test_old_diffusers_namings_map_to_the_same_targets_as_kohya(sd1_model, sd1_peft, tmp_path):
    index = ModelIndex(sd1_model)
    renamed = _old_diffusers_names(sd1_peft.unet_sd, sd1_peft.te_sd)
    assert any(".processor.to_out_lora.up.weight" in k for k in renamed)
    assert any(".self_attn.to_q_lora.down.weight" in k for k in renamed)
    assert any(".mlp.fc1.lora_linear_layer.down.weight" in k for k in renamed)
    old = {new: {**sd1_peft.unet_sd, **sd1_peft.te_sd}[key] for new, key in renamed.items()}
    net = load_all(write(tmp_path / "old.safetensors", old), index)
    assert_deltas_are_peft(net, index, sd1_peft.deltas)
    kohya = convert_state_dict_to_kohya({**sd1_peft.unet_sd, **sd1_peft.te_sd})
    assert set(targets_by_module(kohya, index).values()) == set(net.adapters)


def test_save_attn_procs_keys_without_unet_prefix_map_like_the_prefixed(sd1_model, sd1_peft, tmp_path):
    """diffusers' ``save_attn_procs`` wrote UNet keys with no ``unet.`` prefix."""
    index = ModelIndex(sd1_model)
    bare = {k[len("unet."):]: v for k, v in sd1_peft.unet_sd.items()}
    assert all(k.startswith(("down_blocks.", "mid_block.", "up_blocks.", "conv_", "time_embedding.")) for k in bare)
    keep = {k: v for k, v in bare.items() if k.startswith(("down_blocks.", "mid_block.", "up_blocks."))}
    net = load_all(write(tmp_path / "bare.safetensors", keep), index)
    assert len(net.adapters) * 2 == len(keep)
    prefixed = targets_by_module(convert_state_dict_to_kohya({"unet." + k: v for k, v in keep.items()}), index)
    assert set(prefixed.values()) == set(net.adapters)


# SPEC §3 by example: diffusers-style names -> compvis layers, including same-shaped neighbours.
SD1_EXAMPLES = {
    "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q": "input_blocks.1.1.transformer_blocks.0.attn1.to_q",
    "down_blocks.0.attentions.1.transformer_blocks.0.attn1.to_q": "input_blocks.2.1.transformer_blocks.0.attn1.to_q",
    "down_blocks.1.resnets.0.conv_shortcut": "input_blocks.4.0.skip_connection",
    "down_blocks.1.resnets.1.conv1": "input_blocks.5.0.in_layers.2",
    "down_blocks.2.downsamplers.0.conv": "input_blocks.9.0.op",
    "down_blocks.3.resnets.1.time_emb_proj": "input_blocks.11.0.emb_layers.1",
    "mid_block.attentions.0.proj_in": "middle_block.1.proj_in",
    "mid_block.resnets.1.conv2": "middle_block.2.out_layers.3",
    "up_blocks.0.upsamplers.0.conv": "output_blocks.2.1.conv",
    "up_blocks.1.upsamplers.0.conv": "output_blocks.5.2.conv",
    "up_blocks.3.attentions.2.proj_out": "output_blocks.11.1.proj_out",
    "up_blocks.3.resnets.2.conv_shortcut": "output_blocks.11.0.skip_connection",
    "conv_in": "input_blocks.0.0",
    "conv_out": "out.2",
    "time_embedding.linear_2": "time_embed.2",
}


def test_spec_examples_land_on_their_compvis_layer(sd1_model):
    index = ModelIndex(sd1_model)
    for diffusers_name, compvis in SD1_EXAMPLES.items():
        assert resolve_module("lora_unet_" + diffusers_name.replace(".", "_"), index) == Target(UNET + compvis)


def layer_kind(module: nn.Module) -> type:
    return next(kind for kind in COPIED_LAYERS if isinstance(module, kind))


def copy_unet_weights(unet: nn.Module, index: ModelIndex) -> int:
    """Copy every weighted layer of a diffusers UNet into the ldm UNet through lora_core's mapping."""
    copied = set()
    with torch.no_grad():
        for name, module in unet.named_modules():
            if not isinstance(module, COPIED_LAYERS) or ".lora_" in f".{name}":
                continue
            name = name.replace(".base_layer", "")
            target = resolve_module("lora_unet_" + name.replace(".", "_"), index)
            assert target is not None and target.module.startswith(UNET), name
            dst = index.module(target)
            assert layer_kind(dst) is layer_kind(module), f"{name} -> {target}"
            assert dst.weight.shape == module.weight.shape, f"{name} -> {target}"
            dst.weight.copy_(module.weight)
            assert (dst.bias is None) == (module.bias is None), name
            if module.bias is not None:
                dst.bias.copy_(module.bias)
            copied.add(target)
    return len(copied)


def assert_patched_unet_computes_what_peft_computes(root: nn.Module, world: PeftWorld, mode: str,
                                                    tmp_path: Path) -> None:
    """Every key on the right layer: the same base weights through the mapping give the same UNet, and the
    kohya-converted LoRA changes the output as PEFT's LoRA changes the diffusers UNet's."""
    index = ModelIndex(root)
    ldm_layers = [n for n, m in root.model.diffusion_model.named_modules() if isinstance(m, COPIED_LAYERS)]
    assert copy_unet_weights(world.unet, index) == len(ldm_layers)
    base = tiny_models.run_unet(root, world.inputs)
    torch.testing.assert_close(base, world.base_out, rtol=1e-4, atol=1e-5)
    change = world.lora_out - world.base_out
    assert change.abs().max() > 1e-2  # the LoRA matters, so a misplaced key would show
    net = load_all(write(tmp_path / "kohya.safetensors", convert_state_dict_to_kohya(world.unet_sd)), index)
    with Patcher(index) as patcher:
        patcher.apply(net.plan(index, te=1.0, unet=1.0), mode)
        patched = tiny_models.run_unet(root, world.inputs)
    torch.testing.assert_close(patched - base, change, rtol=1e-3, atol=1e-4)


@pytest.mark.parametrize("mode", ["bypass", "merged"])
def test_patched_ldm_unet_computes_what_peft_diffusers_computes(fresh_sd1, sd1_peft, mode, tmp_path):
    assert_patched_unet_computes_what_peft_computes(fresh_sd1, sd1_peft, mode, tmp_path)


@pytest.mark.parametrize("layout", ["v4", "flat"])
def test_sd1_text_encoder_from_either_transformers_layout_maps_every_key(sd1_model, layout, tmp_path):
    config = tiny_models.text_encoders(sd1_model)["te"].transformer.config
    te = add_peft_lora(seeded(lambda: hf_clip(config), 6), CLIP_TARGETS, seed=7)
    sd = peft_state_dict(te, "text_encoder" + TE_LAYOUT_PREFIX[layout])
    assert any(k.startswith("text_encoder.text_model.") for k in sd) == (layout == "v4")
    index = ModelIndex(sd1_model)
    deltas = peft_deltas(te, "text_encoder.text_model")
    for name, tensors in (("peft", sd), ("kohya", convert_state_dict_to_kohya(sd))):
        net = load_all(write(tmp_path / f"{name}.safetensors", tensors), index)
        assert_deltas_are_peft(net, index, deltas)


# ---------------------------------------------------------------- OpenCLIP (SD2, SDXL te2)
def copy_hf_clip_into_open_clip(hf: nn.Module, oc: nn.Module) -> None:
    """HF CLIP text weights into an OpenCLIP text tower by the SPEC §3 table (independent of lora_core)."""
    tower = hf
    with torch.no_grad():
        oc.token_embedding.wrapped.weight.copy_(tower.embeddings.token_embedding.weight)
        oc.positional_embedding.copy_(tower.embeddings.position_embedding.weight)
        oc.ln_final.load_state_dict(tower.final_layer_norm.state_dict())
        assert len(tower.encoder.layers) == len(oc.transformer.resblocks)
        for layer, block in zip(tower.encoder.layers, oc.transformer.resblocks):
            attn = layer.self_attn
            qkv = [base_layer(getattr(attn, f"{p}_proj")) for p in "qkv"]
            block.attn.in_proj_weight.copy_(torch.cat([m.weight for m in qkv]))
            block.attn.in_proj_bias.copy_(torch.cat([m.bias for m in qkv]))
            block.attn.out_proj.load_state_dict(base_layer(attn.out_proj).state_dict())
            block.ln_1.load_state_dict(layer.layer_norm1.state_dict())
            block.ln_2.load_state_dict(layer.layer_norm2.state_dict())
            block.mlp.c_fc.load_state_dict(base_layer(layer.mlp.fc1).state_dict())
            block.mlp.c_proj.load_state_dict(base_layer(layer.mlp.fc2).state_dict())


def open_clip_config(tower: dict):
    return hf_clip_config(tower["width"], tower["heads"], tower["layers"], act="gelu")


def sd_scripts_te_names(hf: nn.Module, prefix: str) -> dict[str, str]:
    """sd-scripts' module names for an HF CLIP text model: ``lora_te_text_model_encoder_layers_N_...``."""
    return {n: prefix + "text_model_" + n.replace(".", "_") for n, _ in hf.named_modules()
            if re.fullmatch(CLIP_LAYER, n)}


def kohya_file_of(hf: nn.Module, names: dict[str, str]) -> dict[str, torch.Tensor]:
    """The PEFT LoRA of ``hf`` under kohya module names ``names`` (HF module path -> kohya name)."""
    tower = hf
    sd = {}
    for path, kohya in names.items():
        layer = tower.get_submodule(path)
        if isinstance(layer, peft.tuners.lora.LoraLayer):
            sd[f"{kohya}.lora_down.weight"] = layer.lora_A["default"].weight.detach()
            sd[f"{kohya}.lora_up.weight"] = layer.lora_B["default"].weight.detach()
            sd[f"{kohya}.alpha"] = torch.tensor(float(RANK))
    return sd


def expected_open_clip_target(hf_path: str, oc_prefix: str) -> Target:
    """SPEC §3: layers_N -> resblocks.N; q/k/v_proj -> slices of attn.in_proj_weight; out_proj -> attn's out;
    fc1 -> mlp.c_fc; fc2 -> mlp.c_proj."""
    m = re.fullmatch(CLIP_LAYER, hf_path)
    assert m, hf_path
    block = f"{oc_prefix}transformer.resblocks.{m[1]}."
    if m[3]:
        return Target(block + "attn", m[3])
    return Target(block + {"mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj"}[m[2]])


@pytest.fixture(scope="module")
def sd2_te_peft() -> nn.Module:
    """PEFT on an HF CLIP the size of SD2's OpenCLIP tower."""
    return add_peft_lora(seeded(lambda: hf_clip(open_clip_config(tiny_models.OPEN_CLIP_H)), 8), CLIP_TARGETS, seed=9)


def test_sd2_kohya_text_encoder_names_map_to_open_clip_slices(sd2_model, sd2_te_peft, tmp_path):
    index = ModelIndex(sd2_model)
    names = sd_scripts_te_names(sd2_te_peft, "lora_te_")
    assert "lora_te_text_model_encoder_layers_23_self_attn_v_proj" in names.values()
    sd = kohya_file_of(sd2_te_peft, names)
    net = load_all(write(tmp_path / "sd2.safetensors", sd), index)
    oc_prefix = "cond_stage_model.wrapped.model."
    expected = {kohya: expected_open_clip_target(path, oc_prefix) for path, kohya in names.items()}
    assert targets_by_module(sd, index) == expected
    assert len(net.adapters) == 6 * tiny_models.OPEN_CLIP_H["layers"]
    width = tiny_models.OPEN_CLIP_H["width"]
    for target in net.adapters:
        if target.part is not None:
            assert index.weight_shape(target) == (width, width)


def test_sd2_diffusers_named_text_encoder_maps_like_kohya(sd2_model, sd2_te_peft, tmp_path):
    """diffusers names an SD2 text encoder ``text_encoder.`` (kohya conversion: ``lora_te1_``)."""
    index = ModelIndex(sd2_model)
    kohya = kohya_file_of(sd2_te_peft, sd_scripts_te_names(sd2_te_peft, "lora_te_"))
    want = set(targets_by_module(kohya, index).values())
    sd = peft_state_dict(sd2_te_peft, "text_encoder.text_model")
    for name, tensors in (("peft", sd), ("converted", convert_state_dict_to_kohya(sd))):
        net = load_all(write(tmp_path / f"{name}.safetensors", tensors), index)
        assert set(net.adapters) == want
        assert_deltas_are_peft(net, index, peft_deltas(sd2_te_peft, "text_encoder.text_model"))


def parameters_copy(oc: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in oc.named_parameters()}


def hf_without_lora(hf: nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    """The HF model's output with its LoRA layers switched off."""
    layers = [m for m in hf.modules() if isinstance(m, peft.tuners.lora.LoraLayer)]
    for m in layers:
        m.enable_adapters(False)
    try:
        with torch.no_grad():
            return hf(input_ids=tokens).last_hidden_state
    finally:
        for m in layers:
            m.enable_adapters(True)


def test_sd2_patched_open_clip_computes_what_peft_hf_clip_computes(fresh_sd2, sd2_te_peft, tmp_path):
    """q/k/v land on rows [0:d], [d:2d], [2d:3d] of ``in_proj_weight``, out on out_proj, fc1/fc2 on c_fc/c_proj:
    with an HF CLIP's weights copied in by the SPEC table, our patched OpenCLIP tower equals PEFT's HF CLIP."""
    oc = tiny_models.text_encoders(fresh_sd2)["te"].model
    copy_hf_clip_into_open_clip(sd2_te_peft, oc)
    inputs = tiny_models.make_inputs(fresh_sd2, seed=4)
    tokens = inputs["tokens"]["te"]
    with torch.no_grad():
        peft_out = sd2_te_peft(input_ids=tokens).last_hidden_state
    hf_base = hf_without_lora(sd2_te_peft, tokens)
    base = tiny_models.run_text_encoders(fresh_sd2, inputs)["te"]
    torch.testing.assert_close(base, hf_base, rtol=1e-4, atol=1e-5)
    assert (peft_out - hf_base).abs().max() > 1e-2
    index = ModelIndex(fresh_sd2)
    sd = kohya_file_of(sd2_te_peft, sd_scripts_te_names(sd2_te_peft, "lora_te_"))
    net = load_all(write(tmp_path / "sd2.safetensors", sd), index)
    with Patcher(index) as patcher:
        patcher.apply(net.plan(index, te=1.0, unet=1.0), "bypass")
        patched = tiny_models.run_text_encoders(fresh_sd2, inputs)["te"]
    torch.testing.assert_close(patched - base, peft_out - hf_base, rtol=1e-3, atol=1e-4)
    # merged: the rows of in_proj_weight change by PEFT's q, k, v deltas, in that order
    before = parameters_copy(oc)
    deltas = peft_deltas(sd2_te_peft, "te")
    with Patcher(index) as patcher:
        patcher.apply(net.plan(index, te=1.0, unet=1.0), "merged")
        after = parameters_copy(oc)
    for i in (0, 23):
        block, layer = f"transformer.resblocks.{i}.", f"te.encoder.layers.{i}."
        qkv = torch.cat([deltas[f"{layer}self_attn.{p}_proj"] for p in "qkv"])
        torch.testing.assert_close(after[block + "attn.in_proj_weight"] - before[block + "attn.in_proj_weight"],
                                   qkv, rtol=1e-4, atol=1e-5)
        for oc_name, hf_name in (("attn.out_proj", "self_attn.out_proj"), ("mlp.c_fc", "mlp.fc1"),
                                 ("mlp.c_proj", "mlp.fc2")):
            torch.testing.assert_close(after[f"{block}{oc_name}.weight"] - before[f"{block}{oc_name}.weight"],
                                       deltas[layer + hf_name], rtol=1e-4, atol=1e-5)
        assert torch.equal(after[block + "attn.in_proj_bias"], before[block + "attn.in_proj_bias"])


# ---------------------------------------------------------------- SDXL
def sd_scripts_sdxl_names(root: nn.Module) -> dict[str, Target]:
    """sd-scripts' SDXL module names for every Linear/Conv2d of the UNet and both encoders, from SPEC §3:
    UNet already compvis (dots -> underscores under ``lora_unet_``), te1 HF CLIP under ``lora_te1_``, te2
    OpenCLIP under ``lora_te2_`` written with HF-CLIP names by the SPEC table."""
    names: dict[str, Target] = {}
    for n, m in root.model.diffusion_model.named_modules():
        if isinstance(m, LORA_LAYERS):
            names["lora_unet_" + n.replace(".", "_")] = Target(UNET + n)
    te1 = "conditioner.embedders.0.wrapped.transformer."
    for n, m in root.get_submodule(te1[:-1]).named_modules():
        if isinstance(m, LORA_LAYERS):
            names["lora_te1_" + n.replace(".", "_")] = Target(te1 + n)
    te2 = "conditioner.embedders.1.wrapped.model."
    covered = set()
    for n, m in root.get_submodule(te2[:-1]).named_modules():
        match = re.fullmatch(r"transformer\.resblocks\.(\d+)\.(attn|mlp\.c_fc|mlp\.c_proj)", n)
        if not match:
            continue
        layer = f"lora_te2_text_model_encoder_layers_{match[1]}_"
        if match[2] == "attn":
            for p in ("q", "k", "v", "out"):
                names[f"{layer}self_attn_{p}_proj"] = Target(te2 + n, p)
            covered.add(n + ".out_proj")
        else:
            names[layer + {"mlp.c_fc": "mlp_fc1", "mlp.c_proj": "mlp_fc2"}[match[2]]] = Target(te2 + n)
        covered.add(n)
    te2_linears = {n for n, m in root.get_submodule(te2[:-1]).named_modules() if isinstance(m, LORA_LAYERS)}
    assert te2_linears <= covered  # every te2 Linear is named
    return names


def _weight_shape(root: nn.Module, target: Target) -> tuple[int, ...]:
    """The shape of a target's weight, from the module itself (MHA: one d x d projection)."""
    module = root.get_submodule(target.module)
    if isinstance(module, nn.MultiheadAttention):
        return (module.embed_dim, module.embed_dim)
    return tuple(module.weight.shape)


def test_sd_scripts_sdxl_names_map_every_key_to_their_layer(sdxl_model, tmp_path):
    names = sd_scripts_sdxl_names(sdxl_model)
    for example in ("lora_unet_input_blocks_4_1_transformer_blocks_1_attn1_to_q",
                    "lora_te1_text_model_encoder_layers_0_mlp_fc1",
                    "lora_te2_text_model_encoder_layers_0_self_attn_q_proj",
                    "lora_te2_text_model_encoder_layers_31_self_attn_out_proj"):
        assert example in names
    gen = torch.Generator().manual_seed(0)
    sd = {}
    for name, target in names.items():
        for k, v in lora_tensors(_weight_shape(sdxl_model, target), LoraSpec(rank=RANK), gen).items():
            sd[f"{name}.{k}"] = v
    index = ModelIndex(sdxl_model)
    net = load_all(write(tmp_path / "sdxl.safetensors", sd), index)
    assert targets_by_module(sd, index) == names
    assert len(net.adapters) == len(names)
    for target in net.adapters:
        assert index.weight_shape(target) == _weight_shape(sdxl_model, target)


def test_sdxl_te2_q_k_v_patch_rows_0_d_2d_3d(fresh_sdxl, tmp_path):
    root = fresh_sdxl
    block = "conditioner.embedders.1.wrapped.model.transformer.resblocks.5.attn"
    attn = root.get_submodule(block)
    d = attn.embed_dim
    gen = torch.Generator().manual_seed(1)
    sd = {}
    for p in ("q", "k", "v"):
        for k, v in lora_tensors((d, d), LoraSpec(rank=RANK, alpha=None), gen).items():
            sd[f"lora_te2_text_model_encoder_layers_5_self_attn_{p}_proj.{k}"] = v
    index = ModelIndex(root)
    net = load_all(write(tmp_path / "qkv.safetensors", sd), index)
    before = attn.in_proj_weight.detach().clone()
    with Patcher(index) as patcher:
        patcher.apply(net.plan(index, te=1.0, unet=1.0), "merged")
        change = attn.in_proj_weight.detach() - before
    for i, p in enumerate("qkv"):
        name = f"lora_te2_text_model_encoder_layers_5_self_attn_{p}_proj"
        want = sd[f"{name}.lora_up.weight"] @ sd[f"{name}.lora_down.weight"]
        torch.testing.assert_close(change[i * d:(i + 1) * d], want, rtol=1e-4, atol=1e-6)
    assert torch.equal(attn.in_proj_weight, before)  # restored


@pytest.fixture(scope="module")
def sdxl_peft(sdxl_model) -> PeftWorld:
    unet = seeded(diffusers_sdxl_unet, 11)
    inputs = tiny_models.make_inputs(sdxl_model, seed=5)
    gen = torch.Generator().manual_seed(6)
    text_embeds = torch.randn(1, tiny_models.OPEN_CLIP_BIGG["width"], generator=gen)
    time_ids = torch.rand(1, 2 * tiny_models.SIZE_EMBEDDERS, generator=gen) * 1024
    # ldm's y = pooled text + a sinusoidal embedding of each size number, as diffusers' text_time computes it
    inputs["y"] = torch.cat([text_embeds, timestep_embedding(time_ids.flatten(), tiny_models.SIZE_EMBED_DIM)
                             .reshape(1, -1)], dim=1)
    added = {"text_embeds": text_embeds, "time_ids": time_ids}
    base_out = diffusers_unet_out(unet, inputs, added)
    add_peft_lora(unet, lora_layer_names(unet), seed=12)
    te1 = add_peft_lora(seeded(lambda: hf_clip(hf_clip_config(**tiny_models.CLIP_L, act="quick_gelu")), 13),
                        CLIP_TARGETS, seed=14)
    te2 = add_peft_lora(seeded(lambda: hf_clip(open_clip_config(tiny_models.OPEN_CLIP_BIGG)), 15),
                        CLIP_TARGETS, seed=16)
    te_sd = {**peft_state_dict(te1, "text_encoder.text_model"), **peft_state_dict(te2, "text_encoder_2.text_model")}
    deltas = {**peft_deltas(unet, "unet"), **peft_deltas(te1, "text_encoder.text_model"),
              **peft_deltas(te2, "text_encoder_2.text_model")}
    return PeftWorld(unet, peft_state_dict(unet, "unet"), te_sd, deltas, inputs, base_out,
                     diffusers_unet_out(unet, inputs, added))


def test_kohya_conversion_of_a_peft_sdxl_lora_maps_every_key(sdxl_model, sdxl_peft, tmp_path):
    sd = {**sdxl_peft.unet_sd, **sdxl_peft.te_sd}
    assert any("_upsamplers_0_conv" in k for k in convert_state_dict_to_kohya(sd))
    index = ModelIndex(sdxl_model)
    for name, tensors in (("peft", sd), ("kohya", convert_state_dict_to_kohya(sd))):
        net = load_all(write(tmp_path / f"{name}.safetensors", tensors), index)
        assert_deltas_are_peft(net, index, sdxl_peft.deltas)
        te2 = [t for t in net.adapters if t.module.startswith("conditioner.embedders.1.")]
        assert len(te2) == 6 * tiny_models.OPEN_CLIP_BIGG["layers"]
        assert Target("conditioner.embedders.1.wrapped.model.transformer.resblocks.0.attn", "k") in te2
    # SDXL's lowest level has attention, so its upsampler comes after it (SPEC §3; SD1 differs)
    for diffusers_name, compvis in (("up_blocks.0.upsamplers.0.conv", "output_blocks.2.2.conv"),
                                    ("up_blocks.1.upsamplers.0.conv", "output_blocks.5.2.conv"),
                                    ("add_embedding.linear_1", "label_emb.0.0"),
                                    ("down_blocks.1.attentions.1.transformer_blocks.1.attn2.to_k",
                                     "input_blocks.5.1.transformer_blocks.1.attn2.to_k")):
        assert resolve_module("lora_unet_" + diffusers_name.replace(".", "_"), index) == Target(UNET + compvis)


def test_patched_sdxl_ldm_unet_computes_what_peft_diffusers_computes(fresh_sdxl, sdxl_peft, tmp_path):
    assert_patched_unet_computes_what_peft_computes(fresh_sdxl, sdxl_peft, "bypass", tmp_path)


def test_sd_scripts_oft_prefix_names_the_same_unet_modules():
    from lora_core.keymap import parse_key

    oft = parse_key("oft_unet_input_blocks_4_1_proj_in.oft_blocks")
    lora = parse_key("lora_unet_input_blocks_4_1_proj_in.lora_up.weight")
    assert oft.module == lora.module and oft.param == "oft_blocks"
