"""The tiny models have A1111 v1.10.1's exact layer names and types, and they really compute."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

import tiny_models

DATA = Path(__file__).parent / "data"
GOLDEN_NAME = {"sd1": "sd15", "sd2": "sd2", "sdxl": "sdxl"}  # written by tools/dump_reference_layers.py
# The layer types A1111's built-in Lora patches (subclasses count).
TRACKED_TYPES = (nn.Linear, nn.Conv2d, nn.GroupNorm, nn.LayerNorm, nn.MultiheadAttention)


def _golden_lines(family: str, kind: str) -> list[str]:
    text = (DATA / f"a1111_{GOLDEN_NAME[family]}_{kind}.txt").read_text()
    return [line for line in text.splitlines() if line and not line.startswith("#")]


def golden(family: str) -> list[tuple[str, str]]:
    """(name, type) of every layer A1111's Lora patches."""
    return [tuple(line.split("\t")) for line in _golden_lines(family, "layers")]


def golden_module_names(family: str) -> list[str]:
    """The name of every module of the UNet and the text encoders, in named_modules() order."""
    return _golden_lines(family, "modules")


def tracked_layers(root: nn.Module) -> list[tuple[str, str]]:
    return [(name, type(module).__name__) for name, module in root.named_modules()
            if isinstance(module, TRACKED_TYPES)]


def test_layer_names_and_types_are_a1111s(model_family, shared_model):
    want, got = golden(model_family), tracked_layers(shared_model)
    missing, extra = sorted(set(want) - set(got)), sorted(set(got) - set(want))
    assert not missing and not extra, f"missing {missing[:10]} ({len(missing)}), extra {extra[:10]} ({len(extra)})"
    assert got == want  # the same order too


def test_every_module_name_is_a1111s(model_family, shared_model):
    """Containers, activations and hijack wrappers too (``token_embedding.wrapped``, ``conditioner.wrapped``)."""
    want, got = golden_module_names(model_family), [name for name, _ in shared_model.named_modules() if name]
    missing, extra = sorted(set(want) - set(got)), sorted(set(got) - set(want))
    assert not missing and not extra, f"missing {missing[:10]} ({len(missing)}), extra {extra[:10]} ({len(extra)})"
    assert got == want


@pytest.mark.parametrize("family, expected", [
    ("sd1", {
        "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn1.to_q": "Linear",
        "model.diffusion_model.input_blocks.1.1.proj_in": "Conv2d",
        "model.diffusion_model.output_blocks.11.1.transformer_blocks.0.ff.net.2": "Linear",
        "model.diffusion_model.input_blocks.4.0.skip_connection": "Conv2d",
        "model.diffusion_model.middle_block.1.norm": "GroupNorm",
        "model.diffusion_model.out.0": "GroupNorm32",
        "cond_stage_model.wrapped.transformer.text_model.encoder.layers.11.self_attn.q_proj": "Linear",
        "cond_stage_model.wrapped.transformer.text_model.final_layer_norm": "LayerNorm",
    }),
    ("sd2", {
        "model.diffusion_model.input_blocks.1.1.proj_in": "Linear",
        "cond_stage_model.wrapped.model.transformer.resblocks.23.attn": "MultiheadAttention",
        "cond_stage_model.wrapped.model.transformer.resblocks.23.attn.out_proj": "NonDynamicallyQuantizableLinear",
        "cond_stage_model.wrapped.model.transformer.resblocks.0.mlp.c_fc": "Linear",
        "cond_stage_model.wrapped.model.ln_final": "LayerNorm",
    }),
    ("sdxl", {
        "model.diffusion_model.label_emb.0.0": "Linear",
        "model.diffusion_model.label_emb.0.2": "Linear",
        "model.diffusion_model.input_blocks.4.1.transformer_blocks.1.attn2.to_k": "Linear",
        "model.diffusion_model.input_blocks.7.1.transformer_blocks.9.attn2.to_k": "Linear",
        "model.diffusion_model.middle_block.1.transformer_blocks.9.ff.net.0.proj": "Linear",
        "model.diffusion_model.output_blocks.5.2.conv": "Conv2d",
        "conditioner.embedders.0.wrapped.transformer.text_model.encoder.layers.11.mlp.fc2": "Linear",
        "conditioner.embedders.1.wrapped.model.transformer.resblocks.31.attn": "MultiheadAttention",
    }),
])
def test_golden_lists_hold_known_a1111_layers(family, expected):
    layers = dict(golden(family))
    assert {name: layers.get(name) for name in expected} == expected


@pytest.mark.parametrize("family, absent", [
    ("sd1", ["model.diffusion_model.label_emb.0.0", "model.diffusion_model.input_blocks.1.1.transformer_blocks.1.attn1.to_q"]),
    ("sdxl", ["model.diffusion_model.input_blocks.1.1.proj_in",  # no attention at the 1st level
              "model.diffusion_model.input_blocks.4.1.transformer_blocks.2.attn1.to_q",  # depth 2 at the 2nd
              "model.diffusion_model.middle_block.1.transformer_blocks.10.attn1.to_q",  # depth 10 in the middle
              "model.diffusion_model.input_blocks.9.0.in_layers.0"]),  # 3 levels, no 4th
])
def test_golden_lists_lack_what_a1111_does_not_have(family, absent):
    layers = dict(golden(family))
    assert [name for name in absent if name in layers] == []


def test_family_flags_like_a1111(model_family, shared_model):
    assert tiny_models.family_of(shared_model) == model_family
    flags = (shared_model.is_sd1, shared_model.is_sd2, shared_model.is_sdxl)
    assert flags == tuple(model_family == f for f in tiny_models.FAMILIES)


def test_hijack_wrappers_are_where_a1111_puts_them(model_family, shared_model):
    encoders = tiny_models.text_encoders(shared_model)
    for encoder in encoders.values():
        owner = (encoder.transformer.text_model.embeddings if hasattr(encoder, "transformer") else encoder.model)
        assert isinstance(owner.token_embedding.wrapped, nn.Embedding)
    if model_family == "sdxl":
        embedders = shared_model.conditioner.embedders
        assert len(embedders) == 5
        assert [hasattr(e, "wrapped") for e in embedders] == [True, True, False, False, False]
        assert shared_model.cond_stage_model is shared_model.conditioner
        assert isinstance(shared_model.conditioner.wrapped, nn.Module)
    else:
        assert list(encoders) == ["te"]
        assert encoders["te"] is shared_model.cond_stage_model.wrapped


def test_models_are_fp32_eval_and_small(shared_model):
    params = list(shared_model.parameters())
    assert all(p.dtype == torch.float32 for p in params)
    assert not any(m.training for m in shared_model.modules())
    assert sum(p.numel() * p.element_size() for p in params) < 64 * 2**20


def test_no_weight_is_all_zero(shared_model):
    zero = [name for name, p in shared_model.named_parameters() if not p.detach().abs().sum() > 0]
    assert zero == []


def test_builders_are_seeded(model_family, shared_model):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(123)  # the builder must not depend on the RNG state it finds
        again = tiny_models.build(model_family, seed=0)
        other = tiny_models.build(model_family, seed=1)
    reference = shared_model.state_dict()
    assert reference.keys() == again.state_dict().keys()
    assert all(torch.equal(reference[k], v) for k, v in again.state_dict().items())
    assert not all(torch.equal(reference[k], v) for k, v in other.state_dict().items())


def test_forward_is_finite_deterministic_and_input_dependent(model_family, shared_model):
    first = tiny_models.make_inputs(shared_model, model_family, batch=2, seed=0)
    second = tiny_models.make_inputs(shared_model, model_family, batch=2, seed=1)

    out = tiny_models.run_unet(shared_model, first)
    assert out.shape == first["x"].shape and torch.isfinite(out).all()
    assert torch.equal(out, tiny_models.run_unet(shared_model, first))
    assert not torch.allclose(out, tiny_models.run_unet(shared_model, second))

    texts = tiny_models.run_text_encoders(shared_model, first)
    expected = {"sd1": {"te"}, "sd2": {"te"}, "sdxl": {"te1", "te2", "te2_pooled"}}[model_family]
    assert set(texts) == expected
    others = tiny_models.run_text_encoders(shared_model, second)
    for name, value in texts.items():
        assert torch.isfinite(value).all()
        assert value.shape[0] == 2
        assert not torch.allclose(value, others[name]), name


def test_context_width_is_the_sum_of_the_text_encoders(model_family, shared_model):
    texts = tiny_models.run_text_encoders(shared_model, tiny_models.make_inputs(shared_model))
    hidden = sum(v.shape[-1] for k, v in texts.items() if not k.endswith("_pooled"))
    assert tiny_models.context_dim(shared_model) == hidden


def _backward(outputs: list[torch.Tensor]) -> None:
    gen = torch.Generator().manual_seed(0)
    sum((out * torch.randn(out.shape, generator=gen)).sum() for out in outputs).backward()


def _layers_without_gradient(module: nn.Module) -> list[str]:
    return [name for name, layer in module.named_modules() if isinstance(layer, TRACKED_TYPES)
            and not any(p.grad is not None and p.grad.abs().sum() > 0 for p in layer.parameters(recurse=False))]


def test_unet_output_depends_on_every_layer(fresh_model):
    root = fresh_model
    _backward([tiny_models.run_unet(root, tiny_models.make_inputs(root), grad=True)])
    assert _layers_without_gradient(root.model.diffusion_model) == []


def test_text_output_depends_on_every_layer(fresh_model):
    root = fresh_model
    _backward(list(tiny_models.run_text_encoders(root, tiny_models.make_inputs(root), grad=True).values()))
    encoders = tiny_models.text_encoders(root)
    assert {name: _layers_without_gradient(encoder) for name, encoder in encoders.items()} == \
        {name: [] for name in encoders}


def test_make_inputs_refuses_a_wrong_family(sd1_model):
    with pytest.raises(ValueError, match="sd1"):
        tiny_models.make_inputs(sd1_model, "sdxl")
