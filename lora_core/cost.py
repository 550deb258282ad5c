"""What bypass and merging would cost one generation: the automatic mode's choice for a set it has not used yet.

Bypass costs on every UNet call: per hooked layer a fixed latency (the hook, two small operations) plus the
low-rank matmuls over the layer's rows (tokens or pixels), which grow with the latent size. Merging costs once:
a few passes over each touched weight (float32 copy, backup, write back) plus the delta's matmul, whatever the
image size. So bypass wins for small images and few steps, merging for everything else: on the CPU test bed
(SD1.5, a rank-32 LoRA on its 192 attention layers) bypass cost 33 ms a step at a 8x8 latent and 88 ms at 32x32
before the keys and values of cross-attention were computed once per pass (about 9 ms less a step at 8x8), the
merge 0.75 s, so at 64x64 pixels and 4 steps bypass is the cheaper, at 256x256 and 20 steps merging is.

Only UNet layers count: the automatic mode keeps text-encoder layers in bypass in either case.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .adapters import Adapter, LayerOp
from .blocks import block_of
from .model_index import ModelIndex, Target
from .patch import reads_context


@dataclass(frozen=True)
class Workload:
    """One sampling pass as the host will run it."""

    calls: int  #: UNet evaluations (sampling steps; second-order samplers make more, so this errs towards bypass)
    rows: int  #: rows at the UNet's first level per call: latent height x width x batch x 2 (prompt and negative)


@dataclass(frozen=True)
class DeviceCosts:
    flops: float  #: FLOP/s of the small matmuls of a LoRA
    bandwidth: float  #: bytes/s of the weight passes of a merge
    hook: float  #: seconds of fixed cost per hooked layer and call
    merge: float  #: seconds of fixed cost per merged layer
    passes: int = 8  #: float32 reads and writes of a touched weight in one merge (copy, delta, check, backup, write)


#: Fitted on the CPU test bed (2 cores): an in-process SD1.5 UNet, rank 32 on 192 layers: bypass 33 ms a step at
#: 128 first-level rows and 88 ms at 2048 (the model says 33 and 89), a merge 0.70 to 1.1 s (the model: 0.76).
CPU = DeviceCosts(flops=2.2e11, bandwidth=1.4e10, hook=150e-6, merge=400e-6)
#: Fitted on an H200 (``bench/gpu_check.sh``, fp16, batch 2: SD1.5- and SDXL-sized UNets at 512 and 1024 pixels with
#: a rank-32 LoRA on 192 / 722 layers and LoHa / LoKr on 282 / 794): bypass 55-76 us a layer and step, mostly the
#: hook's Python and kernel launches, which the GPU waits for (the least-squares fit: 71 us and 2.5e14 FLOP/s; the
#: FLOP rate here is lower, for cards slower than an H200); a merge 0.35-0.55 ms a layer whatever its size (the host
#: copy of the original and the launches), the model's figures within 0.7-1.3x of the measured ones.
ACCELERATOR = DeviceCosts(flops=1e14, bandwidth=1e12, hook=60e-6, merge=350e-6)
#: A merge that replaces another (the next cell of a sweep: the originals written back, the new weights merged), as
#: a multiple of a first merge: 1.17-1.42 on the H200.
REMERGE = 1.4


def device_costs(device: torch.device) -> DeviceCosts:
    return CPU if device.type == "cpu" else ACCELERATOR


def unet_levels(index: ModelIndex) -> int:
    """Resolution levels of the compvis UNet (4 in SD1/SD2, 3 in SDXL): three output blocks per level."""
    outs = [int(block[3:]) for name in index.modules
            if (block := block_of(index, Target(name))).startswith("OUT")]
    return max(1, (max(outs) + 1) // 3) if outs else 1


def unet_level(block: str, levels: int) -> int:
    """The resolution level a layer of this block (``blocks.block_of``) runs at: 0 is the latent's own size,
    each level halves both sides."""
    if block == "M00":
        return levels - 1
    if block.startswith("IN"):
        return min(int(block[2:]) // 3, levels - 1)
    if block.startswith("OUT"):
        return max(levels - 1 - int(block[3:]) // 3, 0)
    return 0  # conv_in, conv_out, out (BASE/OTHER): full size; time embeddings are one row, counted high, harmless


@dataclass(frozen=True)
class LayerCost:
    """One UNet target of a network: what bypass does per first-level row, what a merge does once."""

    bypass_flops_per_row: float
    merge_flops: float
    merge_bytes: float
    hook_share: float = 1.0  #: of the device's fixed cost per call (a stored key/value output: a hook and an add)


def factored_is_cheaper(factored_macs: int, shape: tuple[int, ...]) -> bool:
    """Per layer, a factored bypass (LoHa as a rank r1 * r2 LoRA, LoKr's Kronecker product applied without forming
    it) against the dense delta of a weight of ``shape``: the factored one where it multiplies each row (token or
    pixel) by no more numbers than the dense delta would. It then also holds no more (its factors are those
    numbers), and it holds nothing full-size, which is what keeps a set in bypass (``runtime._choose_mode``)."""
    dense = 1
    for s in shape[1:]:
        dense *= s
    return factored_macs <= shape[0] * dense


def bypass_macs(adapter: Adapter, index: ModelIndex, target: Target, dyn: int | None) -> int | None:
    """Multiply-adds per row of what bypass runs for this target without a full-size delta (``Adapter.bypass_macs``),
    None where it holds and multiplies by the full delta (no factored form, or the dense one is cheaper; so does
    MultiheadAttention, whose packed projections are recomputed with full deltas)."""
    module = index.module(target)
    if isinstance(module, nn.MultiheadAttention):
        return None
    return adapter.bypass_macs(LayerOp.of(module, target.part), dyn)


def has_low_rank_bypass(adapter: Adapter, index: ModelIndex, target: Target, dyn: int | None) -> bool:
    """Whether bypass runs this target without a full-size delta (``bypass_macs``)."""
    return bypass_macs(adapter, index, target, dyn) is not None


def layer_cost(adapter: Adapter, index: ModelIndex, target: Target, levels: int, dyn: int | None) -> LayerCost:
    weight_numel = index.weight(target).numel()
    factors = bypass_macs(adapter, index, target, dyn)
    low = factors is not None
    rows = 4.0 ** -unet_level(block_of(index, target), levels)
    if not low:
        factors = sum(t.numel() for t in adapter.tensors())
    # a low-rank bypass multiplies each row by its factors once; without a low-rank form, by the full delta.
    # Cross-attention keys/values read the prompt, not the image: computed once per pass (patch.ContextMemo),
    # then each call is the hook and one addition (SD1.5 on the CPU test bed: ~15 us against ~280 us computed)
    context = reads_context(index, target)
    per_row = 0.0 if context else 2.0 * (factors if low else weight_numel)
    shape = index.weight_shape(target)
    rank = factors / max(1, shape[0] + weight_numel // max(1, shape[0]))  # factors / (out + in): the rank
    return LayerCost(per_row * rows, 2.0 * weight_numel * max(1.0, rank), 4.0 * weight_numel,
                     0.1 if context else 1.0)


def estimate(costs: list[LayerCost], workload: Workload, device: DeviceCosts) -> tuple[float, float]:
    """Seconds (bypass over the whole pass, merge once) for these layers."""
    per_call = sum(device.hook * c.hook_share + c.bypass_flops_per_row * workload.rows / device.flops for c in costs)
    merge = sum(device.merge + c.merge_flops / device.flops + c.merge_bytes * device.passes / device.bandwidth
                for c in costs)
    return per_call * workload.calls, merge
