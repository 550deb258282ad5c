"""The GPU check of issue #17: the library tests that need CUDA, and the engine on SD1.5- and SDXL-sized UNets.

On a machine with CUDA (``bench/gpu_check.sh`` picks the python), it

1. runs the tests marked ``gpu`` (``pytest -m gpu`` on the modules under ``tests/`` that use the marker), and
2. for an SD1.5-sized UNet (64x64 latent = 512x512 image) and an SDXL-sized one (128x128 = 1024x1024), in fp16
   under autocast as A1111 runs them, batch 2 (cond + uncond), with each set of ``--sets`` in turn (``lora``: a
   rank-32 LoRA on kohya's default layers, every Linear and 1x1 conv in the transformer blocks; ``loha`` and
   ``lokr``: LyCORIS's full preset, every Linear and Conv2d of the UNet, as many downloaded files are), measures:
   the UNet step with no LoRA, in bypass and in merged mode (median of the timed steps of every round, each
   step synchronised; rounds alternate the modes); the activation (``Patcher.apply`` + the first step's extra
   time over the steady step, when bypass prepares its functions); the peak memory of activation and two steps
   over that of a no-LoRA step (``torch.cuda.max_memory_allocated``); a weight change (an X/Y/Z cell: the same
   set applied at another weight in the same mode, plus the next step's extra time); and whether every parameter
   and buffer is bitwise the original after the last restore. Below the table, the cost model's figures
   (``lora_core.cost``, what ``auto`` decides with) beside the measured ones.

It prints one Markdown table (a row per UNet) and writes the raw figures as JSON (``bench/out/gpu_check.json``).
Attention runs through ``scaled_dot_product_attention`` as A1111 runs it on CUDA, not ldm's float32 matrix,
which would make the no-LoRA step slower than users see and every ratio look better than it is.

    bench/gpu_check.sh                                  # the whole check (a few minutes on an H200)
    python bench/gpu_check.py --device cpu --tiny       # the same code at tiny widths on the CPU (seconds)

Without CUDA (or without torch) it says so and exits 0. Exit status otherwise: 0 all passed; 1 a test failed,
a restore was not exact or a measurement failed; 2 a part could not run (a package is missing: it says which).
"""
from __future__ import annotations

import argparse
import gc
import importlib.util
import itertools
import json
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass
from itertools import chain
from pathlib import Path
from typing import Callable

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "bench"
GPU_MARK = re.compile(r"^[^#'\"\n]*pytest\.mark\.gpu\b", re.MULTILINE)  # in code, not in a comment or string
MIB = 1 << 20
MODES = ("none", "bypass", "merged")
SETS = {  # what each row's network is
    "lora": "rank-{rank} kohya LoRA on kohya's default layers",
    "loha": "LoHa rank {lycoris_rank}, LyCORIS full preset (every UNet Linear and Conv2d)",
    "lokr": "LoKr rank {lycoris_rank}, LyCORIS full preset (every UNet Linear and Conv2d)",
}
NOT_RUN, FAILED = 2, 1


# --------------------------------------------------------------------------------------- options

@dataclass(frozen=True)
class UNetSize:
    """One UNet to measure: its builder's arguments and the latent it is stepped at."""

    label: str
    family: str  # tiny_models.TinySDModel family: how A1111 flags the loaded model
    builder: str  # bench_engine function
    kwargs: tuple  # (name, value) pairs for the builder
    latent: int  # latent side (x8 = image side)
    context_dim: int
    adm_in_channels: int | None = None  # SDXL's vector conditioning y

    def build(self, engine) -> Callable[[], object]:
        return lambda: getattr(engine, self.builder)(**dict(self.kwargs))


SIZES = {  # real widths; the step at A1111's default image size of each model
    "sd15": UNetSize("SD1.5-sized", "sd1", "sd15_unet", (), 64, 768),
    "sdxl": UNetSize("SDXL-sized", "sdxl", "sdxl_unet", (), 128, 2048, 2816),
}
TINY_SIZES = {  # the same topologies at width 32 (ldm's 32-group GroupNorm allows no less)
    "sd15": UNetSize("SD1.5-sized (tiny)", "sd1", "sd15_unet", (("width", 32), ("context_dim", 32)), 16, 32),
    "sdxl": UNetSize("SDXL-sized (tiny)", "sdxl", "sdxl_unet",
                     (("width", 32), ("context_dim", 64), ("adm_in_channels", 64), ("head_channels", 16)), 8, 64, 64),
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--device", default="cuda", help="cuda, cuda:1 ... or cpu (with --tiny: the check of the check)")
    p.add_argument("--tiny", action="store_true", help="tiny widths (the same topologies and code path)")
    p.add_argument("--dtype", choices=("fp16", "bf16", "fp32"), default=None,
                   help="model dtype (default: fp16 on CUDA, fp32 on the CPU)")
    p.add_argument("--sizes", default="sd15,sdxl", help=f"UNets to measure, of {','.join(SIZES)}")
    p.add_argument("--rounds", type=int, default=None, help="rounds of none/bypass/merged (default 3; tiny 2)")
    p.add_argument("--steps", type=int, default=None, help="timed steps per mode and round (default 10; tiny 2)")
    p.add_argument("--batch", type=int, default=2, help="UNet batch (2 = cond + uncond)")
    p.add_argument("--rank", type=int, default=32, help="LoRA rank")
    p.add_argument("--sets", default="lora,loha,lokr", help=f"networks to measure on each UNet, of {','.join(SETS)}")
    p.add_argument("--lycoris-rank", type=int, default=8, help="rank of the LoHa / LoKr factors")
    p.add_argument("--warmup", type=float, default=None,
                   help="seconds of untimed steps before the first set (default 3; tiny 0: two steps)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-tests", dest="tests", action="store_false", help="skip the tests marked gpu")
    p.add_argument("--out", type=Path, default=BENCH / "out" / "gpu_check.json", help="JSON output")
    args = p.parse_args(argv)
    unknown = [s for s in args.sizes.split(",") if s not in SIZES]
    if unknown:
        p.error(f"unknown --sizes {unknown}; choose from {sorted(SIZES)}")
    args.sizes = args.sizes.split(",")
    args.sets = args.sets.split(",")
    if unknown := [s for s in args.sets if s not in SETS]:
        p.error(f"unknown --sets {unknown}; choose from {sorted(SETS)}")
    args.dtype = args.dtype or ("fp32" if args.device == "cpu" else "fp16")
    args.rounds = args.rounds or (2 if args.tiny else 3)
    args.steps = args.steps or (2 if args.tiny else 10)
    args.warmup = (0.0 if args.tiny else 3.0) if args.warmup is None else args.warmup
    return args


# --------------------------------------------------------------------------------------- tests

def gpu_test_files(tests_dir: Path) -> list[Path]:
    """Test modules that mark tests ``gpu``, found by their text: collecting every module would import what
    only some need (diffusers, lycoris...), which a bare GPU machine may lack."""
    return sorted(p for p in tests_dir.glob("test_*.py") if GPU_MARK.search(p.read_text(encoding="utf-8")))


def run_gpu_tests(tests_dir: Path, cwd: Path = ROOT) -> dict:
    """``pytest -m gpu`` on :func:`gpu_test_files`, its report passed through; ``ok`` only if all passed."""
    files = gpu_test_files(tests_dir)
    if not files:
        return {"ok": False, "status": NOT_RUN, "summary": f"no module in {tests_dir} marks a test pytest.mark.gpu"}
    if importlib.util.find_spec("pytest") is None:
        return {"ok": False, "status": NOT_RUN, "summary": f"pytest is not installed for {sys.executable}"}
    cmd = [sys.executable, "-m", "pytest", "-m", "gpu", "-q", "-rfEs", "-p", "no:cacheprovider",
           *(str(f) for f in files)]
    print(f"$ {' '.join(cmd[1:])}", flush=True)
    last = ""
    with subprocess.Popen(cmd, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) as proc:
        for line in proc.stdout:
            print(line, end="", flush=True)
            last = line.strip() or last
    if proc.returncode == 5:
        return {"ok": False, "status": NOT_RUN, "summary": f"pytest -m gpu selected no test in {len(files)} modules"}
    return {"ok": proc.returncode == 0, "status": 0 if proc.returncode == 0 else FAILED,
            "summary": last.strip("= "), "files": [f.name for f in files]}


# --------------------------------------------------------------------------------------- measuring

def use_sdp_attention(root) -> int:
    """Give every ldm ``CrossAttention`` of ``root`` a forward through ``scaled_dot_product_attention`` (A1111's
    default on CUDA); it calls the same to_q/to_k/to_v/to_out layers, so LoRA hooks see the same calls.
    Per instance, this model only. Returns how many were changed."""
    import torch.nn.functional as F
    from ldm.modules.attention import CrossAttention

    def sdp_forward(attn):
        def forward(x, context=None, mask=None):
            if mask is not None:
                raise NotImplementedError("attention masks: the UNet passes none")
            context = x if context is None else context
            q, k, v = attn.to_q(x), attn.to_k(context), attn.to_v(context)
            batch, heads = x.shape[0], attn.heads
            q, k, v = (t.reshape(batch, -1, heads, t.shape[-1] // heads).transpose(1, 2) for t in (q, k, v))
            out = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(batch, -1, q.shape[-1] * heads)
            return attn.to_out(out)
        return forward

    changed = 0
    for module in root.modules():
        if isinstance(module, CrossAttention):
            module.forward = sdp_forward(module)
            changed += 1
    return changed


def float_norms(root) -> None:
    """GroupNorm and LayerNorm parameters back to float32. CUDA's autocast computes norms in float32 whatever
    their parameters' dtype; the CPU's has no such rule, and ldm's GroupNorm hands them a float32 input (as
    tests/test_memory.py, which keeps the norms in float32 on the CPU)."""
    from torch import nn

    for module in root.modules():
        if isinstance(module, (nn.GroupNorm, nn.LayerNorm)):
            module.float()


def host_copy(root) -> dict:
    """Every parameter and buffer, copied to host memory."""
    return {name: t.detach().to("cpu", copy=True) for name, t in chain(root.named_parameters(), root.named_buffers())}


def changed_tensors(root, original: dict) -> list[str]:
    """Names of the parameters and buffers whose name, dtype, shape or bytes differ from ``original``."""
    import torch

    now = dict(chain(root.named_parameters(), root.named_buffers()))
    if now.keys() != original.keys():
        return sorted(now.keys() ^ original.keys())

    def same(a, b) -> bool:
        a = a.detach().cpu()
        return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a.reshape(-1).view(torch.uint8),
                                                                         b.reshape(-1).view(torch.uint8))
    return [name for name, t in now.items() if not same(t, original[name])]


def median_ms(seconds: list[float]) -> float:
    return statistics.median(seconds) * 1000.0


def measure_memory(memory, patcher, plan, step) -> tuple[dict, dict]:
    """Peak and held memory of activation + two steps in each mode, over the settled no-LoRA state; and each
    mode's output (on the host) from the second step, for the sanity checks."""
    outputs, mem = {}, {}

    def plain_step():
        outputs["none"] = step().float().cpu()

    _, none_peak = memory.growth(plain_step)
    mem["none"] = {"peak": none_peak}
    for mode in ("bypass", "merged"):
        def activate_and_step(mode=mode):
            patcher.apply(plan, mode)
            step()
            outputs[mode] = step().float().cpu()
        held, peak = memory.growth(activate_and_step)
        patcher.restore()
        mem[mode] = {"held": held, "peak": peak, "peak_over_none": peak - none_peak}
    return mem, outputs


def measure_rounds(engine, new_patcher, plans, step, device, rounds: int, steps: int) -> dict:
    """Per mode, the steady steps of every round, the activations (apply + first step's extra) and the weight
    changes (the same set applied at another weight in the same mode + the next step's extra: an X/Y/Z cell).

    Each round has a new Patcher: a Patcher keeps prepared bypass factors after a restore, and the figure
    wanted is a LoRA's first activation (its file already loaded)."""
    plan, other = plans
    samples = {m: {"step": [], "apply": [], "first_step_extra": [], "activation": [], "change": []} for m in MODES}
    for _ in range(rounds):
        patcher = new_patcher()
        for mode in MODES:
            apply_s = engine.timed(lambda: mode == "none" or patcher.apply(plan, mode), device)
            first_s = engine.timed(step, device)
            steady = [engine.timed(step, device) for _ in range(steps)]
            median = statistics.median(steady)
            extra = first_s - median
            s = samples[mode]
            s["step"] += steady
            s["apply"].append(apply_s)
            s["first_step_extra"].append(extra)
            s["activation"].append(apply_s + max(extra, 0.0))
            if mode != "none":
                change_s = engine.timed(lambda: patcher.apply(other, mode), device)
                s["change"].append(change_s + max(engine.timed(step, device) - median, 0.0))
            patcher.restore()
        gc.collect()
    return samples


def full_preset_targets(index) -> list:
    """LyCORIS's full preset on the UNet: every Linear and Conv2d."""
    from torch import nn
    from lora_core.model_index import Target

    return [Target(name) for name, module in index.modules.items()
            if name.startswith("model.diffusion_model.") and isinstance(module, (nn.Linear, nn.Conv2d))]


def make_set(name: str, index, root, args: argparse.Namespace, engine) -> tuple[dict, int]:
    """The state dict of one ``SETS`` network for this model (fp16, as files are shipped) and its layer count."""
    import torch
    from lora_factory import LoraSpec, make_kohya_lora, make_lycoris

    if name == "lora":
        targets = engine.kohya_default_targets(root, index)
        spec = LoraSpec(rank=args.rank, alpha=args.rank / 2, dtype=torch.float16, std=0.03)
        return make_kohya_lora(index, targets, spec, seed=args.seed), len(targets)
    targets = full_preset_targets(index)
    sd = make_lycoris(index, targets, name, seed=args.seed, rank=args.lycoris_rank)
    return {k: t.half() for k, t in sd.items()}, len(targets)


def predicted(network, index, latent: int, batch: int, device) -> dict:
    """What ``lora_core.cost`` says this set costs on ``device``: bypass per UNet call, a merge once."""
    from lora_core.cost import Workload, device_costs, estimate

    costs = network.unet_costs(index)
    bypass, merge = estimate(costs, Workload(calls=1, rows=latent * latent * batch), device_costs(device))
    return {"bypass_step_extra_s": bypass, "merge_s": merge, "unet_layers": len(costs)}


def build_size(size: UNetSize, args: argparse.Namespace, engine):
    """One UNet at ``size`` with SDP attention, its index, a host copy of it and its inputs."""
    import torch
    from lora_core.model_index import ModelIndex

    device, dtype = torch.device(args.device), engine.DTYPES[args.dtype]
    t0 = time.perf_counter()
    root = engine.build_model(False, args.seed, device, dtype, family=size.family, unet=size.build(engine))
    if device.type == "cpu" and dtype != torch.float32:
        float_norms(root)
    attention = use_sdp_attention(root)
    inputs = engine.unet_inputs(args.batch, size.latent, device, dtype, args.seed, size.context_dim,
                                size.adm_in_channels)
    built = {"label": size.label, "latent": size.latent, "dtype": args.dtype, "batch": args.batch,
             "parameters": sum(p.numel() for p in root.parameters()), "sdp_attention_layers": attention,
             "build_s": time.perf_counter() - t0}
    print(f"  {size.label}: {built['parameters'] / 1e6:.0f}M parameters, {attention} attention layers on SDP; "
          f"built in {built['build_s']:.0f} s", flush=True)
    return root, ModelIndex(root), host_copy(root), inputs, built


def measure_size(size: UNetSize, args: argparse.Namespace, engine) -> list[dict]:
    """Build one UNet and take every figure of one row per set; a set that fails is reported, the next measured."""
    import torch

    device = torch.device(args.device)
    root, index, original, inputs, built = build_size(size, args, engine)

    def step():
        return engine.unet_step(root, inputs)

    warm_until = time.perf_counter() + args.warmup
    for i in itertools.count():  # warm-up: kernels, allocator, the GPU's clocks
        engine.timed(step, device)
        if i >= 1 and time.perf_counter() >= warm_until:
            break
    rows = []
    for name in args.sets:
        try:
            rows.append(measure_set(name, root, index, original, step, built, args, engine))
        except Exception as e:  # an out-of-memory, say: the next set starts from the original model
            traceback.print_exc()
            rows.append({**built, "set": name, "error": f"failed: {type(e).__name__}: {e}".splitlines()[0][:200]})
            reset(root, original)
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    del root, original
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return rows


def measure_set(name: str, root, index, original: dict, step, built: dict, args: argparse.Namespace,
                engine) -> dict:
    import torch
    from lora_core.io import save_safetensors
    from lora_core.network import load_network
    from lora_core.patch import Patcher

    device = torch.device(args.device)
    t0 = time.perf_counter()
    result = {**built, "set": name, "network": SETS[name].format(rank=args.rank, lycoris_rank=args.lycoris_rank)}
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / f"{name}.safetensors"
        sd, result["lora_layers"] = make_set(name, index, root, args, engine)
        save_safetensors(sd, path)
        network = load_network(path, index)
        plans = (network.plan(index, te=1.0, unet=1.0), network.plan(index, te=0.5, unet=0.5))
        print(f"  {built['label']}, {name}: {result['lora_layers']} layers", flush=True)
        memory = engine.Memory(device)
        result["memory"], outputs = measure_memory(memory, Patcher(index), plans[0], step)
        scale = outputs["none"].abs().max().item()
        result["checks"] = {"lora_effect_rel": (outputs["bypass"] - outputs["none"]).abs().max().item() / scale,
                            "bypass_vs_merged_rel": (outputs["bypass"] - outputs["merged"]).abs().max().item() / scale}
        samples = measure_rounds(engine, lambda: Patcher(index), plans, step, device, args.rounds, args.steps)
        result["model"] = predicted(network, index, built["latent"], built["batch"], device)
    changed = changed_tensors(root, original)
    result["samples_s"] = samples
    result["step_ms"] = {m: median_ms(samples[m]["step"]) for m in MODES}
    result["ratio"] = {m: result["step_ms"][m] / result["step_ms"]["none"] for m in MODES}
    result["activation_s"] = {m: statistics.median(samples[m]["activation"]) for m in ("bypass", "merged")}
    result["change_ms"] = {m: median_ms(samples[m]["change"]) for m in ("bypass", "merged")}
    result["restore_exact"] = not changed
    result["changed_after_restore"] = changed[:20]
    result["total_s"] = time.perf_counter() - t0
    print("    " + " | ".join(f"{c}: {v}" for c, v in zip(COLUMNS[4:], table_row(result)[4:])), flush=True)
    if changed:  # the next set must start from the original model
        reset(root, original)
    return result


def reset(root, original: dict) -> None:
    """The model as it was built: every parameter and buffer from the host copy, and no forward hook left (a set
    that failed half-way leaves its Patcher's hooks and merged weights; this model has no hooks of its own)."""
    import torch

    with torch.no_grad():
        for key, t in chain(root.named_parameters(), root.named_buffers()):
            if key in original:
                t.copy_(original[key])
    for module in root.modules():
        module._forward_hooks.clear()
        module._forward_pre_hooks.clear()


# --------------------------------------------------------------------------------------- report

COLUMNS = ("UNet", "set", "latent", "LoRA layers", "step ms none", "step ms bypass", "step ms merged",
           "bypass/none", "merged/none", "activation s bypass", "activation s merged", "weight change ms bypass",
           "weight change ms merged", "peak MiB over none bypass", "peak MiB over none merged", "restore exact")


def table_row(r: dict) -> list[str]:
    if "error" in r:
        return [r["label"], r.get("set", ""), "", "", r["error"]] + [""] * (len(COLUMNS) - 5)
    mem, ms, act, change = r["memory"], r["step_ms"], r["activation_s"], r["change_ms"]
    return [r["label"], r["set"], f"{r['latent']}x{r['latent']}", str(r["lora_layers"]),
            *(f"{ms[m]:.1f}" for m in MODES), f"{r['ratio']['bypass']:.3f}", f"{r['ratio']['merged']:.3f}",
            f"{act['bypass']:.3f}", f"{act['merged']:.3f}", f"{change['bypass']:.1f}", f"{change['merged']:.1f}",
            *(f"{mem[m]['peak_over_none'] / MIB:.1f}" for m in ("bypass", "merged")), str(r["restore_exact"])]


def table(rows: list[dict]) -> str:
    lines = [COLUMNS, ["---"] * 4 + ["---:"] * (len(COLUMNS) - 5) + ["---"]] + [table_row(r) for r in rows]
    return "\n".join("| " + " | ".join(line) + " |" for line in lines)


def describe_machine(args: argparse.Namespace) -> str:
    import torch
    where = torch.cuda.get_device_name(args.device) if args.device.startswith("cuda") else platform.processor() or "cpu"
    return (f"python {platform.python_version()} ({sys.executable}), torch {torch.__version__}, "
            f"{args.device}: {where}")


# --------------------------------------------------------------------------------------- main

def no_cuda_reason(device: str) -> str | None:
    """Why there is no CUDA to check here, or None if ``device`` is usable."""
    if not device.startswith("cuda"):
        return None
    try:
        import torch
    except ImportError as e:
        return f"{sys.executable} cannot import torch ({e})"
    if torch.version.cuda is None:
        return f"torch {torch.__version__} in {sys.executable} is built without CUDA"
    if not torch.cuda.is_available():
        return f"torch {torch.__version__} (CUDA {torch.version.cuda}) finds no CUDA device"
    return None


def import_engine():
    """bench_engine and what it builds with, or the ImportError that says what is missing."""
    for p in (ROOT, ROOT / "tests", BENCH):
        if str(p) not in sys.path:
            sys.path.insert(0, str(p))
    import bench_engine
    return bench_engine


def missing_hint(error: ImportError) -> str:
    name = error.name or str(error)
    hint = {"ldm": " (the `ldm` package of stable-diffusion-sdkit, pure Python: put a folder holding it on "
                   "PYTHONPATH, e.g. a copy of the test venv's site-packages/ldm)"}.get(name.split(".")[0], "")
    return f"cannot import {name}{hint}: {error}"


def measure_sizes(args: argparse.Namespace) -> tuple[list[dict], int]:
    """A row per UNet size, and the worst status: a size that fails is reported and the next one measured."""
    import torch

    sizes = TINY_SIZES if args.tiny else SIZES
    try:
        engine = import_engine()
    except ImportError as e:
        why = missing_hint(e)
        print(f"engine not measured: {why}", flush=True)
        return [{"label": sizes[s].label, "set": kind, "error": f"not run: {why}"}
                for s in args.sizes for kind in args.sets], NOT_RUN
    rows, status = [], 0
    for name in args.sizes:
        try:
            rows += measure_size(sizes[name], args, engine)
        except Exception as e:  # an out-of-memory or a bug in one size: say so, measure the next
            traceback.print_exc()
            rows.append({"label": sizes[name].label,
                         "error": f"failed: {type(e).__name__}: {e}".splitlines()[0][:200]})
            gc.collect()  # the failed size's model went with the traceback: free its memory for the next
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
    if any("error" in r or not r["restore_exact"] for r in rows):
        status = FAILED
    return rows, status


def steps_to_pay(merge_s: float, bypass_extra_s: float) -> str:
    """UNet calls after which a merge has cost less than bypass would (the ``auto`` mode's choice for a new set)."""
    return "never" if bypass_extra_s <= 0 else f"{merge_s / bypass_extra_s:.0f}"


def print_report(report: dict, args: argparse.Namespace) -> None:
    on_cuda = args.device.startswith("cuda")
    print(f"\n{report['machine']}; {args.dtype}{'' if args.dtype == 'fp32' else ' under autocast'}, SDP attention, "
          f"batch {args.batch}; sets: " + "; ".join(f"{n}: " + SETS[n].format(rank=args.rank,
          lycoris_rank=args.lycoris_rank) for n in args.sets) + "; step: median of "
          f"{args.rounds}x{args.steps} synchronised steps; activation: apply + the first step's extra time; peak: "
          f"{'CUDA max allocated' if on_cuda else 'RSS high-water mark'} during activation + 2 steps minus that "
          f"of a no-LoRA step; weight change: apply at 0.5 after 1.0 in the same mode + the next step's extra\n")
    print(table(report["rows"]))
    for r in report["rows"]:
        if "checks" in r:
            c, mem = r["checks"], r["memory"]
            model, ms = r["model"], r["step_ms"]
            extra = (ms["bypass"] - ms["none"]) / 1000
            print(f"\n{r['label']}, {r['set']}: the set changes the output by {c['lora_effect_rel']:.3g} (max, relative), "
                  f"bypass vs merged {c['bypass_vs_merged_rel']:.3g}; held after activation: bypass "
                  f"{mem['bypass']['held'] / MIB:.1f} MiB, merged {mem['merged']['held'] / MIB:.1f} MiB"
                  + ("" if r["restore_exact"] else f"; NOT restored: {r['changed_after_restore']}"))
            print(f"  cost model ({model['unet_layers']} UNet layers): bypass +{model['bypass_step_extra_s'] * 1e3:.2f} ms "
                  f"a step (measured {extra * 1e3:+.2f} ms, {extra / max(1, model['unet_layers']) * 1e6:+.1f} us a layer), "
                  f"merge {model['merge_s']:.3f} s (measured activation {r['activation_s']['merged']:.3f} s); "
                  f"merging pays after {steps_to_pay(model['merge_s'], model['bypass_step_extra_s'])} steps by the "
                  f"model, {steps_to_pay(r['activation_s']['merged'], extra)} measured")
    if "tests" in report:
        print(f"\ngpu tests: {report['tests']['summary']}")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    reason = no_cuda_reason(args.device)
    if reason is not None:
        print(f"gpu_check: no CUDA here: {reason}. Nothing to check; exiting 0.")
        return 0
    import torch

    if args.device == "cpu" and args.tiny:
        torch.set_num_threads(1)  # tiny layers gain nothing from threads; on a busy machine they lose 10-20x
    t0 = time.perf_counter()
    report: dict = {"machine": describe_machine(args), "args": {k: str(v) for k, v in vars(args).items()}}
    print(f"gpu_check: {report['machine']}", flush=True)
    statuses = []
    if args.tests:
        print("\n## tests marked gpu", flush=True)
        report["tests"] = run_gpu_tests(ROOT / "tests")
        statuses.append(report["tests"]["status"])
        print(f"gpu tests: {report['tests']['summary']}", flush=True)
    print(f"\n## engine: {args.dtype}, batch {args.batch}, rank-{args.rank} LoRA, {args.rounds} rounds x "
          f"{args.steps} steps per mode", flush=True)
    report["rows"], status = measure_sizes(args)
    statuses.append(status)
    report["total_s"] = time.perf_counter() - t0

    print_report(report, args)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2, default=str))
    status = FAILED if FAILED in statuses else max(statuses)  # a failure outranks a part that could not run
    print(f"\nwrote {args.out}; {report['total_s']:.0f} s in all; "
          f"{ {0: 'all passed', FAILED: 'FAILED', NOT_RUN: 'INCOMPLETE (a part could not run)'}[status] }")
    return status


if __name__ == "__main__":
    sys.exit(main())
