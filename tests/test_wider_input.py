"""A LoRA of the base model on an inpainting (9 input channels) or instruct-pix2pix (8) UNet's first convolution.

The built-in (``networks.network_apply_weights``) zero-pads the delta of ``input_blocks.0.0`` from 4 to 9 input
channels; ours does it for 9 and 8, for every algorithm, in both modes (``adapters.base.ZeroPaddedInput``). The
oracle: the layer computes ``conv(x, W0 + m * pad(dW4))``, ``dW4`` the delta the same tensors give on a 4-channel
layer (for LoRA the independent float64 formula of ``lora_factory.expected_delta``; for the other algorithms our
4-channel path, which test_lycoris_a/b prove against lycoris-lora), and nothing is reported skipped.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

import tiny_models
from lora_core.adapters import LayerOp, TargetInfo, build_adapter
from lora_core.adapters.base import ZeroPaddedInput
from lora_core.model_index import ModelIndex, Target
from lora_core.network import load_network
from lora_factory import LoraSpec, assert_both_modes_give, expected_delta, lora_tensors, lycoris_tensors

CONV_IN = Target("model.diffusion_model.input_blocks.0.0")
NAME = "lora_unet_input_blocks_0_0"
MULTIPLIERS = (1.0, -0.7)


@pytest.fixture(scope="module")
def models() -> dict[tuple[str, int], ModelIndex]:
    return {(family, channels): ModelIndex(tiny_models.BUILDERS[family](seed=3, in_channels=channels))
            for family, channels in (("sd1", 9), ("sd1", 8), ("sdxl", 9))}


def file_tensors(kind: str, shape: tuple[int, ...]) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(7)
    if kind.startswith("lora"):
        spec = {"lora": LoraSpec(), "lora_tucker": LoraSpec(tucker=True), "lora_dora": LoraSpec(dora=True)}[kind]
        return lora_tensors(shape, spec, gen)
    return lycoris_tensors(kind, shape, gen)


def delta4(kind: str, tensors: dict[str, torch.Tensor], base4: torch.Tensor, op: LayerOp) -> torch.Tensor:
    if kind.startswith("lora"):
        return expected_delta(tensors, base4).float()
    adapter, _ = build_adapter(tensors, TargetInfo("conv_in", tuple(base4.shape), op))
    return adapter.delta_weight(base4)


@pytest.mark.parametrize("kind", ["lora", "lora_tucker", "lora_dora", "loha", "lokr", "full"])
@pytest.mark.parametrize("model", [("sd1", 9), ("sd1", 8), ("sdxl", 9)], ids=lambda m: f"{m[0]}-{m[1]}ch")
def test_conv_in_delta_is_zero_padded(models, tmp_path, kind, model):
    index = models[model]
    conv = index.module(CONV_IN)
    w0 = conv.weight.detach().clone()
    assert w0.shape[1] == model[1]
    narrow = (w0.shape[0], 4, *w0.shape[2:])
    tensors = file_tensors(kind, narrow)
    path = tmp_path / f"{kind}.safetensors"
    save_file({f"{NAME}.{k}": v.contiguous() for k, v in tensors.items()}, str(path))

    net = load_network(path, index)
    assert net.report.problems == {} and net.report.unused == []
    adapter = net.adapters[CONV_IN]
    assert isinstance(adapter, ZeroPaddedInput) and adapter.algorithm == net.algorithms().popitem()[0]

    dw4 = delta4(kind, tensors, w0[:, :4].contiguous(), LayerOp.of(conv))
    padded = torch.cat([dw4, torch.zeros(w0.shape[0], model[1] - 4, *w0.shape[2:])], dim=1)
    x = torch.randn(2, model[1], 8, 8, generator=torch.Generator().manual_seed(1))
    for m in MULTIPLIERS:
        want = F.conv2d(x.double(), (w0.double() + m * padded.double()), conv.bias.double(), padding=1)
        assert_both_modes_give(index, net, CONV_IN, lambda: conv(x).detach(), want, m, (kind, model), tolerance=2e-5)
    # the extra channels really are untouched: a change there would show in the difference of the outputs
    assert not torch.equal(dw4, torch.zeros_like(dw4))


def test_low_rank_bypass_reads_only_the_latent_channels(models):
    """Bypass of a padded LoRA stays low-rank (no 9-channel delta is built), on the latent's channels only."""
    index = models[("sd1", 9)]
    conv = index.module(CONV_IN)
    op = LayerOp.of(conv)
    tensors = file_tensors("lora", (conv.weight.shape[0], 4, 3, 3))
    adapter, _ = build_adapter(tensors, TargetInfo(str(CONV_IN), tuple(conv.weight.shape), op))
    fn = adapter.low_rank_bypass(op, torch.device("cpu"), torch.float32, None)
    assert fn is not None
    x = torch.randn(1, 9, 6, 6, generator=torch.Generator().manual_seed(2))
    x_changed = x.clone()
    x_changed[:, 4:] += 5.0  # mask and masked image: no effect on the delta's output
    assert torch.equal(fn(x), fn(x_changed))
    dense = F.conv2d(x, adapter.delta_weight(conv.weight.detach()), padding=1)
    assert torch.allclose(fn(x), dense, rtol=1e-4, atol=1e-5)


def test_a_delta_of_another_width_is_still_refused(models, tmp_path):
    """Only the latent's 4 channels are padded: a 5-channel delta is a wrong file, reported, the layer skipped."""
    index = models[("sd1", 9)]
    w0 = index.weight(CONV_IN)
    tensors = file_tensors("lora", (w0.shape[0], 5, 3, 3))
    path = tmp_path / "five.safetensors"
    save_file({f"{NAME}.{k}": v.contiguous() for k, v in tensors.items()}
              | {"lora_unet_out_2.lora_down.weight": torch.ones(2, 32, 3, 3),
                 "lora_unet_out_2.lora_up.weight": torch.ones(4, 2, 1, 1)}, str(path))
    net = load_network(path, index)
    assert CONV_IN not in net.adapters
    assert "input_blocks.0.0" in next(iter(net.report.problems.values()))


def test_merge_into_an_inpainting_checkpoint_pads_like_the_runtime(tmp_path):
    """The checkpoint tool (merge-into) reads the 9-channel conv_in from the file and pads the same way."""
    from safetensors.torch import load_file

    from lora_core.patch import Patcher
    from lora_core.tools.merge import merge_into
    from test_tools import checkpoint_state

    root = tiny_models.build_sd1(seed=4, in_channels=9)
    index = ModelIndex(root)
    ckpt = tmp_path / "inpaint.safetensors"
    save_file(checkpoint_state(root), str(ckpt))
    w0 = index.weight(CONV_IN).detach().clone()
    lora = tmp_path / "loha.safetensors"
    save_file({f"{NAME}.{k}": v.contiguous() for k, v in file_tensors("loha", (w0.shape[0], 4, 3, 3)).items()},
              str(lora), metadata={"ss_base_model_version": "sd_v1"})
    result = merge_into(ckpt, [f"{lora}:0.6"], tmp_path / "merged.safetensors", save_precision="fp32")
    merged = load_file(str(result.saved.path))[f"{CONV_IN.module}.weight"]
    with Patcher(index) as patcher:
        patcher.apply(load_network(lora, index).plan(index, 0.6, 0.6), "merged")
        assert torch.allclose(merged, index.weight(CONV_IN).detach(), atol=1e-6)
    assert torch.equal(merged[:, 4:], w0[:, 4:]) and not torch.equal(merged[:, :4], w0[:, :4])
