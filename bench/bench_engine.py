"""Engine figures on an SD1.5-sized UNet with random weights: what activating a LoRA costs.

Measured, each repeated and reported as the median, in ms and as a ratio to the no-LoRA UNet step of
the same run:

* loading and mapping the file (``load_network``);
* activation in bypass mode (``Patcher.apply`` alone, and the extra time of the first step after it,
  when the hooks prepare their low-rank functions lazily) and in merged mode (``Patcher.apply``);
* a change of the multiplier in each mode, and ``Patcher.restore`` in each mode;
* one UNet step (batch 2 = cond + uncond) with no LoRA, in bypass and merged, for each latent size
  (default 8x8 = a 64x64 image, the testbed's size, and 64x64 = a 512x512 image);
* memory growth (RSS on the CPU, allocated memory on CUDA) after activation in each mode, next to the
  size of the LoRA file, of its tensors in memory and of the backups of the touched weights.

The model is ldm's ``UNetModel`` at SD1.5 size (v1-inference.yaml) at ``model.diffusion_model``,
optionally with a full-size CLIP ViT-L text encoder at ``cond_stage_model.wrapped.transformer``
(``--te``); the LoRA targets kohya's defaults (every Linear and 1x1 conv inside the UNet's
SpatialTransformers, and the text encoder's attention and MLP Linears).

    python bench/bench_engine.py                      # CPU, fp32, ~10 minutes on 2 cores
    python bench/bench_engine.py --te --sizes 8       # with the text encoder, small steps only
    python bench/bench_engine.py --device cuda --dtype fp16 --step-repeats 20,10

Results are printed as a Markdown table and written as JSON (default ``bench/out/engine.json``).
"""
from __future__ import annotations

import argparse
import cProfile
import ctypes
import gc
import io
import json
import os
import platform
import pstats
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
for _p in (ROOT, ROOT / "tests"):
    if str(_p) not in sys.path:
        sys.path.insert(0, str(_p))

from ldm.modules.attention import SpatialTransformer  # noqa: E402
from ldm.modules.diffusionmodules.openaimodel import UNetModel  # noqa: E402

import tiny_models  # noqa: E402  (the A1111 name wrappers and the weight randomizer of the tests)
from lora_core.io import save_safetensors  # noqa: E402
from lora_core.model_index import ModelIndex, Target  # noqa: E402
from lora_core.network import Network, load_network  # noqa: E402
from lora_core.patch import Patcher, PlanEntry  # noqa: E402
from lora_factory import LoraSpec, make_kohya_lora  # noqa: E402

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
MIB = 1024 * 1024
CONTEXT_LENGTH = 77
CLIP_L_WIDTH = 768
SDXL_CONTEXT_WIDTH = 768 + 1280  # CLIP-L and OpenCLIP bigG hidden states side by side
SDXL_ADM_WIDTH = 1280 + 6 * 256  # bigG's pooled output and six size/crop numbers, 256 wide each


# --------------------------------------------------------------------------------------- options

def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--sizes", default="8,64",
                   help="latent sizes of the UNet steps, comma-separated (8 = 64x64 image, 64 = 512x512); "
                        "the first is also used for the first-step-after-activation figures")
    p.add_argument("--step-repeats", default="7,2",
                   help="timed UNet steps per mode for each size (one number per size, or one for all); "
                        "a 64x64 step takes ~45 s on 2 CPU cores")
    p.add_argument("--repeats", type=int, default=5,
                   help="repeats of load / activation / multiplier change / restore")
    p.add_argument("--batch", type=int, default=2, help="UNet batch (2 = cond + uncond)")
    p.add_argument("--rank", type=int, default=32, help="LoRA rank")
    p.add_argument("--alpha", type=float, default=16.0, help="LoRA alpha")
    p.add_argument("--multiplier", type=float, default=1.0,
                   help="strength when activating (multiplier changes go to half of it and back)")
    p.add_argument("--te", action="store_true",
                   help="add a full-size CLIP ViT-L text encoder (12 layers, 768) and LoRA its layers too")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1 ...")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="fp32", help="dtype of the model and inputs")
    p.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (CPU)")
    p.add_argument("--clock", choices=sorted(CLOCKS), default="wall",
                   help="wall time, or the process's CPU time (CPU device only; with --threads 1 it is not "
                        "inflated by other processes on a shared machine)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--profile", action="store_true",
                   help="also print cProfile's top functions for one activation in each mode")
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "out" / "engine.json", help="JSON output")
    args = p.parse_args(argv)
    args.sizes = [int(s) for s in args.sizes.split(",")]
    repeats = [int(s) for s in args.step_repeats.split(",")]
    if len(repeats) == 1:
        repeats *= len(args.sizes)
    if len(repeats) != len(args.sizes):
        p.error(f"--step-repeats gives {len(repeats)} numbers for {len(args.sizes)} sizes")
    args.step_repeats = dict(zip(args.sizes, repeats))
    args.device = torch.device(args.device)
    if args.clock == "cpu" and args.device.type != "cpu":
        p.error("--clock cpu measures CPU work: use it with --device cpu")
    args.torch_dtype = DTYPES[args.dtype]
    return args


# --------------------------------------------------------------------------------------- model

def sd15_unet(width: int = 320, context_dim: int = CLIP_L_WIDTH) -> UNetModel:
    """The UNet of v1-inference.yaml (SD1.5), ~860M parameters at the real width (320)."""
    return UNetModel(
        image_size=32, in_channels=4, out_channels=4, model_channels=width, attention_resolutions=[4, 2, 1],
        num_res_blocks=2, channel_mult=[1, 2, 4, 4], num_heads=8, use_spatial_transformer=True,
        transformer_depth=1, context_dim=context_dim, use_checkpoint=False, legacy=False,
    )


def sdxl_unet(width: int = 320, context_dim: int = SDXL_CONTEXT_WIDTH, adm_in_channels: int = SDXL_ADM_WIDTH,
              head_channels: int = 64) -> UNetModel:
    """The UNet of sd_xl_base.yaml, ~2.6B parameters at the real width (320), from ldm's class.

    Built as ``tests/tiny_models.py`` builds its tiny SDXL UNet, at real widths and levels (1, 2, 4): ldm has
    no per-level transformer depth, so every level is built 10 deep and the 2nd is cut to 2 (the 1st has no
    attention); ``label_emb`` gets sgm's layout; each SpatialTransformer hands one context to all its blocks.
    """
    return tiny_models._sdxl_unet(context_dim, adm_in_channels, width=width, channel_mult=[1, 2, 4],
                                  head_channels=head_channels)


def clip_l_text_encoder() -> nn.Module:
    """CLIP ViT-L/14's text tower at full size, wrapped as A1111's hijack names it."""
    from transformers import CLIPTextConfig, CLIPTextModel

    config = CLIPTextConfig(vocab_size=49408, hidden_size=CLIP_L_WIDTH, intermediate_size=4 * CLIP_L_WIDTH,
                            projection_dim=CLIP_L_WIDTH, num_hidden_layers=12, num_attention_heads=12,
                            max_position_embeddings=CONTEXT_LENGTH, hidden_act="quick_gelu")
    model = CLIPTextModel(config)
    if not hasattr(model, "text_model"):
        model = tiny_models.ClipTextModelV4Layout(model)
    embeddings = model.text_model.embeddings
    embeddings.token_embedding = tiny_models.HijackedTokenEmbedding(embeddings.token_embedding)
    return tiny_models.HijackedTextEncoder(tiny_models.ClipTextEmbedder(model))


def build_model(with_te: bool, seed: int, device: torch.device, dtype: torch.dtype, family: str = "sd1",
                unet: Callable[[], nn.Module] = sd15_unet) -> nn.Module:
    """Root whose UNet is ``model.diffusion_model`` (and TE ``cond_stage_model.wrapped.transformer``).

    Built on ``device`` itself (an SDXL-sized UNet takes seconds to draw on a GPU, minutes on a few cores)."""
    torch.manual_seed(seed)
    with torch.device(device):
        root = tiny_models.TinySDModel(family, unet())
        if with_te:
            root.cond_stage_model = clip_l_text_encoder()
        tiny_models._randomize(root)  # ldm zero-inits output projections: redraw so every layer is non-zero
    return root.to(device=device, dtype=dtype).eval().requires_grad_(False)


def kohya_default_targets(root: nn.Module, index: ModelIndex) -> list[Target]:
    """What kohya's sd-scripts trains by default: Linear / 1x1 conv in SpatialTransformers; TE attn + MLP."""
    targets = []
    for st_name, st in root.model.diffusion_model.named_modules():
        if not isinstance(st, SpatialTransformer):
            continue
        for sub, mod in st.named_modules():
            if isinstance(mod, nn.Linear) or (isinstance(mod, nn.Conv2d) and mod.kernel_size == (1, 1)):
                targets.append(Target(f"model.diffusion_model.{st_name}.{sub}"))
    te_layers = (".self_attn.q_proj", ".self_attn.k_proj", ".self_attn.v_proj", ".self_attn.out_proj",
                 ".mlp.fc1", ".mlp.fc2")
    targets += [Target(name) for name in index.modules
                if name.startswith("cond_stage_model.") and name.endswith(te_layers)]
    missing = [t for t in targets if t.module not in index.modules]
    if missing:
        raise RuntimeError(f"{len(missing)} targets are not in the model index, e.g. {missing[0]}")
    return targets


def unet_inputs(batch: int, size: int, device: torch.device, dtype: torch.dtype, seed: int,
                context_dim: int = CLIP_L_WIDTH, adm_in_channels: int | None = None) -> dict:
    """Latent ``x``, ``timesteps``, text ``context`` and, for SDXL (``adm_in_channels``), the vector ``y``."""
    gen = torch.Generator().manual_seed(seed + size)
    inputs = {"x": torch.randn(batch, 4, size, size, generator=gen).to(device, dtype),
              "timesteps": torch.randint(0, 1000, (batch,), generator=gen).to(device),
              "context": torch.randn(batch, CONTEXT_LENGTH, context_dim, generator=gen).to(device, dtype)}
    if adm_in_channels is not None:
        inputs["y"] = torch.randn(batch, adm_in_channels, generator=gen).to(device, dtype)
    return inputs


def unet_step(root: nn.Module, inputs: dict) -> torch.Tensor:
    """One UNet call (no grad) as A1111 makes it: a half-precision model runs under autocast, because ldm
    computes its GroupNorms and timestep embedding in float32."""
    x = inputs["x"]
    half = x.dtype in (torch.float16, torch.bfloat16)
    with torch.no_grad(), torch.autocast(x.device.type, dtype=x.dtype, enabled=half):
        return root.model.diffusion_model(x, inputs["timesteps"], context=inputs["context"], y=inputs.get("y"))


# --------------------------------------------------------------------------------------- measuring

def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}


def timed(fn: Callable[[], object], device: torch.device, clock: str = "wall") -> float:
    """Seconds ``fn`` takes on ``clock``, the device synchronised before and after.

    ``cpu`` is the process's CPU time (all threads, user + system): with one thread it equals the wall time
    of a quiet machine and ignores the time spent waiting for a core on a busy one.
    """
    now = CLOCKS[clock]
    sync(device)
    start = now()
    fn()
    sync(device)
    return now() - start


class Memory:
    """Current and peak memory of where the model lives: process RSS (CPU) or allocated memory (CUDA)."""

    def __init__(self, device: torch.device):
        self.device = device
        self._libc = ctypes.CDLL("libc.so.6") if platform.system() == "Linux" else None

    def settle(self) -> None:
        """Free what can be freed, so readings count live memory only."""
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        elif self._libc is not None:
            self._libc.malloc_trim(0)

    def reset_peak(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
            return
        try:  # Linux >= 4.0: writing 5 resets VmHWM to the current RSS
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
        except OSError:
            pass

    def current(self) -> int:
        if self.device.type == "cuda":
            return torch.cuda.memory_allocated(self.device)
        return _proc_status_bytes("VmRSS")

    def peak(self) -> int:
        if self.device.type == "cuda":
            return torch.cuda.max_memory_allocated(self.device)
        return _proc_status_bytes("VmHWM")

    def growth(self, fn: Callable[[], object]) -> tuple[int, int]:
        """(live growth after ``fn``, peak growth during it), in bytes over the settled state before."""
        self.settle()
        before = self.current()
        self.reset_peak()
        fn()
        peak = self.peak()
        self.settle()
        return self.current() - before, peak - before


def _proc_status_bytes(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"/proc/self/status has no {field}")


def tensor_bytes(tensors: Iterable[torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def profile_top(fn: Callable[[], object], lines: int = 14) -> str:
    profiler = cProfile.Profile()
    profiler.enable()
    fn()
    profiler.disable()
    out = io.StringIO()
    pstats.Stats(profiler, stream=out).sort_stats("tottime").print_stats(lines)
    return out.getvalue()


# --------------------------------------------------------------------------------------- the bench

@dataclass
class Bench:
    args: argparse.Namespace
    root: nn.Module
    index: ModelIndex
    inputs: dict[int, dict]
    memory: Memory

    @property
    def device(self) -> torch.device:
        return self.args.device

    @property
    def small(self) -> int:
        return self.args.sizes[0]

    def step(self, size: int) -> torch.Tensor:
        return unet_step(self.root, self.inputs[size])

    def timed(self, fn: Callable[[], object]) -> float:
        return timed(fn, self.device, self.args.clock)

    def time_step(self, size: int) -> float:
        return self.timed(lambda: self.step(size))

    def plan(self, network: Network, multiplier: float) -> list[PlanEntry]:
        return network.plan(self.index, te=multiplier, unet=multiplier)


def stats(seconds: list[float]) -> dict:
    """Median, minimum and every value, in ms. On a busy machine the minimum is the least disturbed."""
    ms = [t * 1000.0 for t in seconds]
    return {"median_ms": statistics.median(ms), "min_ms": min(ms), "all_ms": ms}


def measure_load(bench: Bench, path: Path) -> tuple[Network, dict]:
    times = [bench.timed(lambda: load_network(path, bench.index)) for _ in range(bench.args.repeats)]
    holder: list[Network] = []
    live, peak = bench.memory.growth(lambda: holder.append(load_network(path, bench.index)))
    return holder[0], {"time": stats(times), "mem_growth": live, "mem_peak_growth": peak}


def measure_mode(bench: Bench, network: Network, mode: str) -> dict:
    """Activation, first step after it, multiplier changes and restore in one mode."""
    args, small = bench.args, bench.small
    full, half = bench.plan(network, args.multiplier), bench.plan(network, args.multiplier / 2)
    patcher = Patcher(bench.index)
    apply_s, first_s, steady_s, restore_s = [], [], [], []
    for _ in range(args.repeats):
        apply_s.append(bench.timed(lambda: patcher.apply(full, mode)))
        first_s.append(bench.time_step(small))
        steady_s.append(statistics.mean(bench.time_step(small) for _ in range(2)))
        restore_s.append(bench.timed(patcher.restore))
        bench.memory.settle()
    extra_s = [f - s for f, s in zip(first_s, steady_s)]
    patcher.apply(full, mode)
    change_s = [bench.timed(lambda: patcher.apply(half if i % 2 == 0 else full, mode)) for i in range(args.repeats)]
    patcher.restore()

    # memory: activation, plus (bypass) the first step, whose hooks prepare; compare with a plain step
    live, peak = bench.memory.growth(lambda: (patcher.apply(full, mode), bench.step(small)))
    patcher.restore()
    result = {"apply": stats(apply_s), "first_step": stats(first_s), "steady_step": stats(steady_s),
              "first_step_extra": stats(extra_s),
              "activation": stats([a + max(e, 0.0) for a, e in zip(apply_s, extra_s)]),
              "multiplier_change": stats(change_s), "restore": stats(restore_s),
              "mem_growth": live, "mem_peak_growth": peak}
    if args.profile:
        result["profile_apply"] = profile_top(lambda: patcher.apply(full, mode))
        result["profile_first_step"] = profile_top(lambda: bench.step(small))
        patcher.restore()
    return result


def measure_steps(bench: Bench, network: Network) -> dict:
    """Steps per size and mode, the modes interleaved in rounds so that a busy spell of the machine hits all
    of them; also the per-round (paired) ratio and difference to the no-LoRA step of the same round."""
    full = bench.plan(network, bench.args.multiplier)
    patcher = Patcher(bench.index)
    modes = {"none": patcher.restore,
             "bypass": lambda: patcher.apply(full, "bypass"),
             "merged": lambda: patcher.apply(full, "merged")}
    out: dict[str, dict] = {}
    for size in bench.args.sizes:
        bench.step(size)  # warm-up (allocator, kernels) at this size
        times: dict[str, list[float]] = {m: [] for m in modes}
        for _ in range(bench.args.step_repeats[size]):
            for mode, activate in modes.items():
                activate()
                bench.memory.settle()  # hand freed backups back to the OS: merge/restore cycles fragment the heap
                bench.step(bench.small)  # untimed: lets bypass hooks prepare; the same for every mode
                times[mode].append(bench.time_step(size))
        patcher.restore()
        result = {m: stats(t) for m, t in times.items()}
        result["paired_ratio"] = {m: statistics.median(a / b for a, b in zip(t, times["none"]))
                                  for m, t in times.items()}
        result["paired_extra_ms"] = {m: statistics.median((a - b) * 1000 for a, b in zip(t, times["none"]))
                                     for m, t in times.items()}
        out[str(size)] = result
    return out


def check_outputs(bench: Bench, network: Network) -> dict:
    """Sanity: the LoRA changes the output, bypass == merged (to float error), restore is exact."""
    full = bench.plan(network, bench.args.multiplier)
    reference = bench.step(bench.small).float()
    with Patcher(bench.index) as patcher:
        patcher.apply(full, "bypass")
        bypass = bench.step(bench.small).float()
        patcher.apply(full, "merged")
        merged = bench.step(bench.small).float()
    restored = bench.step(bench.small).float()
    scale = reference.abs().max().item()
    return {"lora_effect_rel": (bypass - reference).abs().max().item() / scale,
            "bypass_vs_merged_rel": (bypass - merged).abs().max().item() / scale,
            "restore_bitwise": bool(torch.equal(restored, reference))}


# --------------------------------------------------------------------------------------- report

MODE_FIGURES = (("apply", "apply"), ("first_step_extra", "first step extra (lazy preparation)"),
                ("activation", "activation = apply + first-step extra"),
                ("multiplier_change", "multiplier change"), ("restore", "restore"))


def table(results: dict, sizes: list[int]) -> str:
    """Median and minimum ms, and the median as a ratio to the median no-LoRA step of each size."""
    steps = results["steps"]
    bases = [steps[str(s)]["none"]["median_ms"] for s in sizes]
    head = ["figure", "median ms", "min ms"] + [f"x step {s}x{s}" for s in sizes]
    rows = [head, ["---"] + ["---:"] * (len(head) - 1)]

    def row(name: str, median: float, minimum: float | None = None) -> None:
        rows.append([name, f"{median:.1f}", "" if minimum is None else f"{minimum:.1f}"]
                    + [f"{median / b:.3g}" for b in bases])

    for s in sizes:
        for mode in ("none", "bypass", "merged"):
            st = steps[str(s)][mode]
            row(f"UNet step, {s}x{s} latent, {mode}", st["median_ms"], st["min_ms"])
        for mode in ("bypass", "merged"):
            row(f"  {mode} - none, {s}x{s}, paired per round (ratio {steps[str(s)]['paired_ratio'][mode]:.3f})",
                steps[str(s)]["paired_extra_ms"][mode])
    load = results["load"]["time"]
    row("load_network (read + map)", load["median_ms"], load["min_ms"])
    for mode in ("bypass", "merged"):
        for key, label in MODE_FIGURES:
            st = results[mode][key]
            row(f"{mode}: {label}", st["median_ms"], st["min_ms"])
    return "\n".join("| " + " | ".join(r) + " |" for r in rows)


def memory_table(results: dict) -> str:
    sizes, load, plain = results["sizes_bytes"], results["load"], results["plain_step_mem"]

    def mib(n: int) -> str:
        return f"{n / MIB:.1f}"

    def growth(live: int, peak: int) -> str:
        return f"{mib(live)} (peak {mib(peak)})"

    rows = [["memory", "MiB"], ["---", "---:"],
            ["LoRA file", mib(sizes["file"])],
            ["network tensors in memory", mib(sizes["network_tensors"])],
            ["touched weights = merged backups (expected)", mib(sizes["touched_weights"])],
            ["low-rank factors in compute dtype = bypass (expected)", mib(sizes["factors_compute_dtype"])],
            ["growth: load_network", growth(load["mem_growth"], load["mem_peak_growth"])]]
    for mode in ("bypass", "merged"):
        r = results[mode]
        rows.append([f"growth: {mode} apply + one step", growth(r["mem_growth"], r["mem_peak_growth"])])
    rows.append(["growth: one no-LoRA step (reference)", growth(*plain)])
    return "\n".join("| " + " | ".join(r) + " |" for r in rows)


# --------------------------------------------------------------------------------------- main

def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    memory = Memory(args.device)
    t0 = time.perf_counter()

    print(f"building SD1.5 UNet{' + CLIP-L' if args.te else ''} ({args.dtype}, {args.device}) ...", flush=True)
    root = build_model(args.te, args.seed, args.device, args.torch_dtype)
    index = ModelIndex(root)
    targets = kohya_default_targets(root, index)
    lora_path = args.out.parent / f"bench_lora_r{args.rank}{'_te' if args.te else ''}.safetensors"
    spec = LoraSpec(rank=args.rank, alpha=args.alpha, dtype=torch.float16, std=0.03)
    save_safetensors(make_kohya_lora(index, targets, spec, seed=args.seed), lora_path, overwrite=True)
    inputs = {s: unet_inputs(args.batch, s, args.device, args.torch_dtype, args.seed) for s in args.sizes}
    bench = Bench(args, root, index, inputs, memory)
    print(f"  {sum(p.numel() for p in root.parameters()) / 1e6:.0f}M parameters, {len(targets)} LoRA targets, "
          f"file {lora_path.stat().st_size / MIB:.1f} MiB; {time.perf_counter() - t0:.0f} s", flush=True)

    bench.step(bench.small)  # warm-up
    results: dict = {"config": _config(args, root, targets)}
    results["plain_step_mem"] = memory.growth(lambda: bench.step(bench.small))
    network, results["load"] = measure_load(bench, lora_path)
    print(f"  loaded: {network.report.summary()}", flush=True)
    results["sizes_bytes"] = _expected_sizes(bench, network, targets, lora_path)
    results["checks"] = check_outputs(bench, network)
    for mode in ("bypass", "merged"):
        print(f"measuring {mode} activation ...", flush=True)
        results[mode] = measure_mode(bench, network, mode)
    print(f"measuring UNet steps at {args.sizes} ...", flush=True)
    results["steps"] = measure_steps(bench, network)
    _derive(results, args.sizes, sum(t.module.startswith("model.diffusion_model.") for t in targets))
    results["total_s"] = time.perf_counter() - t0
    results["config"]["loadavg_end"] = os.getloadavg()

    args.out.write_text(json.dumps(results, indent=2, default=str))
    _print_report(results, args)
    return results


def _config(args: argparse.Namespace, root: nn.Module, targets: list[Target]) -> dict:
    return {"device": str(args.device), "dtype": args.dtype, "threads": torch.get_num_threads(), "clock": args.clock,
            "batch": args.batch, "sizes": args.sizes, "step_repeats": args.step_repeats, "repeats": args.repeats,
            "rank": args.rank, "alpha": args.alpha, "multiplier": args.multiplier, "te": args.te,
            "parameters": sum(p.numel() for p in root.parameters()), "targets": len(targets),
            "torch": torch.__version__, "python": platform.python_version(), "machine": platform.machine(),
            "cpu_count": os.cpu_count(), "loadavg_start": os.getloadavg(),
            "gpu": torch.cuda.get_device_name(args.device) if args.device.type == "cuda" else None}


def _expected_sizes(bench: Bench, network: Network, targets: list[Target], path: Path) -> dict:
    factors = [t for a in network.adapters.values() for t in a.tensors() if t.dim() >= 2]
    itemsize = torch.empty(0, dtype=bench.args.torch_dtype).element_size()
    return {"file": path.stat().st_size,
            "network_tensors": tensor_bytes(t for a in network.adapters.values() for t in a.tensors()),
            "touched_weights": tensor_bytes(bench.index.weight(t) for t in targets),
            "factors_compute_dtype": sum(t.numel() for t in factors) * itemsize}


def _derive(results: dict, sizes: list[int], n_unet_targets: int) -> None:
    """Ratios to the no-LoRA step (medians) and the bypass cost per hooked UNet layer, for the JSON."""
    ratios = {}
    for s in sizes:
        steps = results["steps"][str(s)]
        base = steps["none"]["median_ms"]
        per = {f"step_{m}": steps[m]["median_ms"] / base for m in ("none", "bypass", "merged")}
        per["step_bypass_paired"] = steps["paired_ratio"]["bypass"]
        per["step_merged_paired"] = steps["paired_ratio"]["merged"]
        per["bypass_extra_per_hooked_unet_layer_us"] = steps["paired_extra_ms"]["bypass"] * 1000 / n_unet_targets
        per["load"] = results["load"]["time"]["median_ms"] / base
        for mode in ("bypass", "merged"):
            for key, _ in MODE_FIGURES:
                per[f"{mode}_{key}"] = results[mode][key]["median_ms"] / base
        ratios[str(s)] = per
    results["ratios_to_no_lora_step"] = ratios


def _print_report(results: dict, args: argparse.Namespace) -> None:
    cfg = results["config"]
    print(f"\nSD1.5 UNet{' + CLIP-L' if cfg['te'] else ''}, {cfg['parameters'] / 1e6:.0f}M params, "
          f"{cfg['dtype']} on {cfg['gpu'] or cfg['device']} ({cfg['threads']} threads, {cfg['clock']} clock); "
          f"rank-{cfg['rank']} LoRA on {cfg['targets']} layers; batch {cfg['batch']}; "
          f"load average {cfg['loadavg_start'][0]:.1f} at start, {cfg['loadavg_end'][0]:.1f} at end\n")
    print(table(results, args.sizes))
    print()
    print(memory_table(results))
    print(f"\nchecks: {results['checks']}")
    for mode in ("bypass", "merged"):
        for key in ("profile_apply", "profile_first_step"):
            if key in results[mode]:
                print(f"\n--- {mode} {key}\n{results[mode][key]}")
    print(f"\nwrote {args.out} ({results['total_s']:.0f} s in all)")


if __name__ == "__main__":
    main()
