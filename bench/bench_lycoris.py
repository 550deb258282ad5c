"""LyCORIS in the engine (issue #22): the test bed's LoHa/LoKr on an SD1.5-sized UNet, in process, no WebUI.

For LoHa, LoKr and the stack LoRA + LoHa + LoKr(-0.4) (the test bed's ``models/Lora/test_*`` files, full LyCORIS
preset, UNet layers only): the UNet step (batch 2, 8x8 latent = a 64x64 image) in bypass against the plain step
next to it, and the merge (``Patcher.apply(..., "merged")``) against the built-in's recipe run in the same process
(per layer: a copy of the weight as backup, the dense delta, ``weight += m * delta``). Merges run in two rounds and
the second is reported (the first in a process pays for growing the heap by the size of the backups).

    MALLOC_ARENA_MAX=1 MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=1099511627776 \\
        .venv/bin/python bench/bench_lycoris.py --lora-dir $TESTBED/webui/models/Lora --threads 1

One thread: on the shared 2-core test bed, two threads made every small kernel wait for a descheduled thread
(timings came in multiples of the scheduler's slice).
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "bench"), str(ROOT / "tests")]

from bench_engine import build_model, unet_inputs, unet_step  # noqa: E402
from lora_core.model_index import ModelIndex  # noqa: E402
from lora_core.network import load_network  # noqa: E402
from lora_core.patch import Patcher  # noqa: E402

SETS = {"loha": {"test_loha": 0.8}, "lokr": {"test_lokr": 0.8},
        "stack": {"test_lora": 0.8, "test_loha": 0.8, "test_lokr": -0.4}}


def builtin_recipe(index: ModelIndex, plan) -> dict:
    """What A1111's built-in does per layer: back the weight up, form the dense delta, add it (LyCORIS's own
    products: ``(w1a w1b) * (w2a w2b)``, ``kron(w1, w2)``)."""
    backups = {}
    with torch.no_grad():
        for e in plan:
            w = index.weight(e.target)
            backups.setdefault(e.target.module, w.to("cpu", copy=True))
            a = e.adapter
            if a.algorithm == "loha":
                up = (a.w1a.float() @ a.w1b.float().reshape(a.w1b.shape[0], -1)) * \
                     (a.w2a.float() @ a.w2b.float().reshape(a.w2b.shape[0], -1))
                up = up.reshape(w.shape) * a.scale
            elif a.algorithm == "lokr":
                w1, w2 = a._w1(w.device, torch.float32), a._w2(w.device, torch.float32)
                up = torch.kron(w1.reshape(*w1.shape, *[1] * (w2.dim() - w1.dim())), w2).reshape(w.shape) * a.scale
            else:
                up = a.delta_weight(w)
            w.copy_((w + up * e.multiplier).to(w.dtype))
    return backups


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--lora-dir", type=Path, required=True, help="folder with test_lora/test_loha/test_lokr")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    root = build_model(False, 0, torch.device("cpu"), torch.float32)
    index = ModelIndex(root)
    inputs = unet_inputs(2, 8, torch.device("cpu"), torch.float32, 0)
    nets = {n: load_network(args.lora_dir / f"{n}.safetensors", index) for s in SETS.values() for n in s}

    def plan_of(weights):
        return [e for n, m in weights.items() for e in nets[n].plan(index, m, m) if not index.is_text_encoder(e.target)]

    def step() -> float:
        times = []
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            unet_step(root, inputs)
            times.append(time.perf_counter() - t0)
        return statistics.median(times)

    unet_step(root, inputs)
    rows = []
    for label, weights in SETS.items():
        plan = plan_of(weights)
        plain = step()
        patcher = Patcher(index)
        patcher.apply(plan, "bypass")
        unet_step(root, inputs)  # prepares the factored forms
        bypass = step()
        held = patcher.cache.bytes
        patcher.restore()
        plain = (plain + step()) / 2
        rows.append(f"| {label} bypass step | {len(plan)} layers | {plain * 1e3:.0f} ms | {bypass * 1e3:.0f} ms "
                    f"| {bypass / plain:.3f} | factors held {held / 2**20:.0f} MiB |")
    for rnd in range(2):
        for label, weights in SETS.items():
            plan = plan_of(weights)
            patcher = Patcher(index)
            t0 = time.perf_counter()
            patcher.apply(plan, "merged")
            ours = time.perf_counter() - t0
            patcher.restore()
            t0 = time.perf_counter()
            backups = builtin_recipe(index, plan)
            builtin = time.perf_counter() - t0
            with torch.no_grad():
                for name, original in backups.items():
                    index.modules[name].weight.copy_(original)
            del backups
            if rnd == 1:
                rows.append(f"| {label} merge | {len(plan)} layers | built-in recipe {builtin:.2f} s | ours {ours:.2f} s "
                            f"| {ours / builtin:.3f} | |")
    print(f"# SD1.5-sized UNet, CPU, {args.threads} thread(s), batch 2, 8x8 latent\n")
    print("| figure | layers | baseline | ours | ratio | |\n|---|---|---:|---:|---:|---|")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
