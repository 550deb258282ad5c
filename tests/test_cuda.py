"""The memory and precision modes of issue #17 on a real CUDA device, on the tiny real SD1 model.

``test_memory.py`` proves these on the CPU, with dtypes standing in for devices; here the devices are real:

- half precision under CUDA autocast, as A1111 runs a UNet on NVIDIA cards: LoRA and the factored LyCORIS forms
  (LoHa, LoKr) in bypass and merged give the reference merged in float32;
- ``--medvram``: the whole UNet moved to the CPU and back between generations (A1111 swaps it with the text
  encoder), a set applied while it is on either side, restored while it is on the CPU;
- ``--lowvram``: one UNet block on the GPU at a time, moved by forward pre-hooks as A1111's ``lowvram.py`` does;
- FP8 weight storage computed under CUDA autocast;
- a batch whose images have different LoRAs (issue 19: per-row sets, their multipliers and row indices held on the
  device);

and after every restore the model is the original bit for bit.

Marked ``gpu``: ``bench/gpu_check.sh`` runs them, and without CUDA they are skipped with the reason.
``LORA_CORE_GPU_TEST_DEVICE=cpu`` runs them on the CPU instead (float16 autocast as well), to check the tests
themselves.
"""
from __future__ import annotations

import os

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from lora_core.library import LoraLibrary
from lora_core.model_index import ModelIndex
from lora_core.network import load_network
from lora_core.patch import Patcher
from lora_core.rows import prompt_loras
from lora_core.runtime import LoraRuntime
from lora_factory import LoraSpec, make_kohya_lora, make_lycoris, pick_targets
from test_patch_property import assert_bitwise, snapshot
from test_rows import _row
from tiny_models import build_sd1, make_inputs, run_unet

DEVICE = torch.device(os.environ.get("LORA_CORE_GPU_TEST_DEVICE", "cuda"))
HALF = torch.float16  # CPU autocast takes float16 too: the check of the tests runs what CUDA runs
FP8 = getattr(torch, "float8_e4m3fn", None)
pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(DEVICE.type == "cuda" and not torch.cuda.is_available(),
                                 reason="needs CUDA (bench/gpu_check.sh runs these)")]
SETS = ("lo", "ha", "kr")  # kohya LoRA, LoHa, LoKr: the files of the world fixture
MODES = ("bypass", "merged")


@pytest.fixture
def world(fresh_sd1, tmp_path):
    index = ModelIndex(fresh_sd1)
    unet_targets = [t for t in pick_targets(index, kinds=(nn.Linear, nn.Conv2d)) if not index.is_text_encoder(t)]
    save_file(make_kohya_lora(index, unet_targets[::2], LoraSpec(rank=4, std=0.5), seed=5),
              str(tmp_path / "lo.safetensors"))
    save_file(make_lycoris(index, unet_targets[1::2], "loha", seed=6), str(tmp_path / "ha.safetensors"))
    save_file(make_lycoris(index, unet_targets[::3], "lokr", seed=7), str(tmp_path / "kr.safetensors"))
    return fresh_sd1, index, tmp_path, make_inputs(fresh_sd1, "sd1")


def to_half(root: nn.Module, weights: torch.dtype = HALF) -> nn.Module:
    """The model on the device in half precision as A1111 loads it (``weights``: the Linear/Conv2d dtype, float8
    for FP8 storage). GroupNorm/LayerNorm stay float32: CUDA autocast computes them in float32 anyway, the CPU's
    has no such rule."""
    root.to(DEVICE, HALF)
    for module in root.modules():
        if isinstance(module, (nn.GroupNorm, nn.LayerNorm)):
            module.float()
        elif weights != HALF and isinstance(module, (nn.Linear, nn.Conv2d)):
            module.to(weights)
    return root


def unet(root: nn.Module, inputs: dict) -> torch.Tensor:
    """One UNet call on the device, as A1111 makes it (a half-precision model under autocast); the output in
    float32 on the host."""
    half = next(root.model.diffusion_model.parameters()).dtype != torch.float32
    on = {k: v.to(DEVICE) for k, v in inputs.items() if isinstance(v, torch.Tensor)}
    if half:
        on["x"], on["context"] = on["x"].to(HALF), on["context"].to(HALF)
    with torch.no_grad(), torch.autocast(DEVICE.type, dtype=HALF, enabled=half):
        return run_unet(root, on).float().cpu()


class Reference:
    """The set merged in float32 on the host into a separate model: its output in float32 (``exact``; CUDA
    convolutions may use TF32, as A1111 allows) and in half precision on the device (``half``). How far ``half`` is
    from ``exact`` is what half precision itself costs."""

    def __init__(self, merged: nn.Module, inputs: dict):
        self.exact = unet(merged.to(DEVICE), inputs)
        self.half = unet(to_half(merged), inputs)

    @classmethod
    def of(cls, tmp_path, name: str, m: float, inputs: dict, weights_of: nn.Module | None = None) -> "Reference":
        return cls(reference(tmp_path, name, m, weights_of), inputs)


def reference(tmp_path, name: str, m: float, weights_of: nn.Module | None = None) -> nn.Module:
    """A separate model with the set merged in float32 on the host. ``weights_of``: take the Linear/Conv2d weights
    and biases of that model first (the FP8 values, exactly)."""
    root = build_sd1()
    if weights_of is not None:
        for (_, mine), (_, theirs) in zip(root.named_modules(), weights_of.named_modules()):
            if isinstance(mine, (nn.Linear, nn.Conv2d)):  # A1111 stores biases in float8 too
                mine.weight.data = theirs.weight.data.to("cpu", torch.float32)
                if mine.bias is not None:
                    mine.bias.data = theirs.bias.data.to("cpu", torch.float32)
    index = ModelIndex(root)
    Patcher(index).apply(load_network(tmp_path / f"{name}.safetensors", index).plan(index, m, m), "merged")
    return root


def plan(index: ModelIndex, tmp_path, name: str, m: float = 1.0):
    return load_network(tmp_path / f"{name}.safetensors", index).plan(index, m, m)


def close(got: torch.Tensor, want: Reference, plain: torch.Tensor, slack: float = 3.0) -> None:
    """``got`` is no further from the float32 merge than ``slack`` times what half precision costs the reference
    itself, and the set is there (``plain`` is much further from it)."""
    err, own = (got - want.exact).abs(), (want.half - want.exact).abs()
    assert err.max() <= slack * own.max() and err.mean() <= slack * own.mean(), (err.max(), own.max())
    assert err.mean() < 0.25 * (plain - want.exact).abs().mean()


def on_device(root: nn.Module) -> bool:
    return all(p.device.type == DEVICE.type for p in root.parameters())


# ------------------------------------------------------------------ half precision under autocast
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("name", SETS)
def test_half_precision_gives_the_float32_merge(world, name, mode):
    root, index, tmp_path, inputs = world
    to_half(root)
    original = snapshot(root)
    plain = unet(root, inputs)
    want = Reference.of(tmp_path, name, 0.8, inputs)
    with Patcher(index) as patcher:
        patcher.apply(plan(index, tmp_path, name, 0.8), mode)
        assert {patcher.layer_mode(n) for n in patcher.touched} == {mode}
        got = unet(root, inputs)
        if mode == "bypass":
            assert_bitwise(root, original)  # bypass never writes a weight
    close(got, want, plain)
    assert_bitwise(root, original)


# ------------------------------------------------------------------ --medvram: the UNet moves whole
@pytest.mark.parametrize("mode", MODES)
def test_medvram_the_unet_moves_to_the_host_and_back(world, mode):
    """A1111's medvram keeps one of UNet / text encoder / VAE on the GPU: the UNet goes to the host while prompts
    are encoded. A set applied while the UNet is on the host, then on the device, gives the reference each time;
    moving it back and forth changes nothing; a restore while it is on the host leaves the original."""
    root, index, tmp_path, inputs = world
    to_half(root)
    diffusion = root.model.diffusion_model
    original = snapshot(root)
    plain = unet(root, inputs)
    want = {m: Reference.of(tmp_path, "ha", m, inputs) for m in (1.5, -1.5)}
    patcher = Patcher(index)

    diffusion.to("cpu")  # first generation: activated while the UNet waits on the host
    patcher.apply(plan(index, tmp_path, "ha", 1.5), mode)
    diffusion.to(DEVICE)
    first = unet(root, inputs)
    close(first, want[1.5], plain)
    diffusion.to("cpu")  # the next prompt is encoded
    diffusion.to(DEVICE)
    assert torch.equal(unet(root, inputs), first)

    patcher.apply(plan(index, tmp_path, "ha", -1.5), mode)  # next generation: activated on the device
    diffusion.to("cpu")
    diffusion.to(DEVICE)
    close(unet(root, inputs), want[-1.5], plain)

    diffusion.to("cpu")
    patcher.restore()
    diffusion.to(DEVICE)
    assert on_device(root)
    assert_bitwise(root, original)
    assert torch.equal(unet(root, inputs), plain)


# ------------------------------------------------------------------ --lowvram: one block at a time
def lowvram(root: nn.Module):
    """A1111's lowvram for the UNet: its big parts (time embedding, each input block, the middle block, each
    output block) wait on the host and a forward pre-hook brings each to the device, sending the previous one
    back; the rest (``out``) stays on the device. Returns the hooks' handles."""
    diffusion = root.model.diffusion_model
    parts = [diffusion.time_embed, *diffusion.input_blocks, diffusion.middle_block, *diffusion.output_blocks]
    for part in parts:
        part.to("cpu")
    held: list[nn.Module] = []

    def send_me_to_device(module, _args):
        if held and held[0] is module:
            return
        if held:
            held.pop().to("cpu")
        module.to(DEVICE)
        held.append(module)

    return [part.register_forward_pre_hook(send_me_to_device) for part in parts]


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("name", ("lo", "ha"))
def test_lowvram_one_block_on_the_device_at_a_time(world, name, mode):
    """For two weights in a row (a prepared bypass factor or a merged weight must follow its layer between
    devices): the float32 merge to half precision, and the output of the whole model on the device in the same
    mode to within what half precision costs (a merge computed on the host may round a weight the other way than
    one computed on the device); the original after restore."""
    root, index, tmp_path, inputs = world
    to_half(root)
    original = snapshot(root)
    whole, want = {}, {}
    with Patcher(index) as patcher:  # the same mode with the whole UNet on the device
        for m in (0.8, -0.5):
            patcher.apply(plan(index, tmp_path, name, m), mode)
            whole[m], want[m] = unet(root, inputs), Reference.of(tmp_path, name, m, inputs)
    assert_bitwise(root, original)
    plain = unet(root, inputs)

    handles = lowvram(root)
    patcher = Patcher(index)
    for m in (0.8, -0.5):
        patcher.apply(plan(index, tmp_path, name, m), mode)
        got = unet(root, inputs)
        if DEVICE.type != "cpu":
            assert not on_device(root.model.diffusion_model.input_blocks)  # only one block was brought over
        close(got, want[m], plain)
        assert (got - whole[m]).abs().max() <= (want[m].half - want[m].exact).abs().max()
    patcher.restore()
    for handle in handles:
        handle.remove()
    root.to(DEVICE)
    assert_bitwise(root, original)


# ------------------------------------------------------------------ FP8 storage
@pytest.mark.skipif(FP8 is None, reason="this torch has no float8")
@pytest.mark.parametrize("mode", MODES)
def test_fp8_storage_under_autocast(world, mode):
    """A1111's FP8 weight storage on CUDA: Linear/Conv2d weights in float8_e4m3fn, computed under autocast in
    half precision. Both modes give the float32 merge over the float8 values (merged keeps float8 layers in
    bypass: a delta merged into float8 is mostly rounded away), and the float8 bytes stay as they were."""
    root, index, tmp_path, inputs = world
    to_half(root, weights=FP8)
    original = snapshot(root)
    plain = unet(root, inputs)
    want = Reference.of(tmp_path, "lo", 1.0, inputs, weights_of=root)
    with Patcher(index) as patcher:
        patcher.apply(plan(index, tmp_path, "lo"), mode)
        assert {patcher.layer_mode(n) for n in patcher.touched} == {"bypass"}
        got = unet(root, inputs)
        assert_bitwise(root, original)
    close(got, want, plain)
    assert_bitwise(root, original)


# ------------------------------------------------------------------ per-row sets (issue 19)
ROW_PROMPTS = ["a cat <lora:lo:1>", "a cat", "a dog <lora:lo:0.5> <lora:ha:1.5> <lora:kr:-1>"]


def test_per_row_sets_in_half_precision(world):
    """Three images with three sets, cond and uncond rows in one batch on the device: each LoRA row is its own
    set's float32 merge to half precision, the row without LoRAs is the plain batch's row bit for bit (it is not
    computed at all), and nothing is written into the weights."""
    root, index, tmp_path, _ = world
    to_half(root)
    original = snapshot(root)
    inputs = make_inputs(root, "sd1", batch=6, seed=4)  # cond rows of images 0, 1, 2, then their uncond rows
    plain = unet(root, inputs)
    runtime = LoraRuntime(LoraLibrary([tmp_path]), mode="bypass")
    runtime.bind(root)
    prompts = [prompt_loras(p) for p in ROW_PROMPTS]
    result = runtime.activate_batch(prompts)
    assert not result.errors and result.mode == "bypass" and runtime.per_row
    assert runtime.begin_cfg_step([1, 1, 1], 6)
    got = unet(root, inputs)
    assert_bitwise(root, original)
    runtime.restore()
    assert_bitwise(root, original)

    for r in range(6):
        items = [list(i) for i in prompts[r % 3].whole]
        if not items:
            assert torch.equal(got[r], plain[r]), r
            continue
        ref_root = build_sd1()
        ref = LoraRuntime(LoraLibrary([tmp_path]), mode="merged")
        ref.bind(ref_root)
        assert ref.activate(items).mode == "merged"
        close(got[r:r + 1], Reference(ref_root, _row(inputs, r)), plain[r:r + 1])
