"""Per-row LoRA sets (issue 19) on an SD1.5-sized UNet with random weights: what a batch whose images have their own
LoRAs costs per sampling step, as ratios to baselines measured in the same run.

* ``batch4_sets4``: one UNet call over a batch of 4 images (8 rows: cond and uncond), each image with another LoRA
  (per-row bypass), against 4 single generations (one call of 2 rows each, in uniform bypass, as ``auto`` runs a
  new set; and in merged mode, as a steady set runs): the time per step of the batch / the sum of the 4 singles.
* per-row overhead against uniform bypass, batch of 4 images (8 rows), one LoRA:
  ``uniform``: every row the same (the float path); ``weights``: the same LoRA at weight 1 on images 1-2, 0.5 on
  images 3-4 (one ``h(x)`` per layer scaled per row); ``half``: images 3-4 without LoRA (``h`` on their rows only).

Steps are UNet calls with kohya's default targets (every Linear / 1x1 conv in the SpatialTransformers), rank 16;
activation time is left out (per-row bypass does no weight pass, like uniform bypass).

    python bench/bench_rows.py                          # CPU fp32, 8x8 latent (64x64 images), ~5 minutes
    python bench/bench_rows.py --device cuda --dtype fp16 --size 64 --repeats 20
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
from bench_engine import (DTYPES, build_model, kohya_default_targets, timed, unet_inputs,  # noqa: E402
                          unet_step)

from lora_core.io import save_safetensors  # noqa: E402
from lora_core.library import LoraLibrary  # noqa: E402
from lora_core.model_index import ModelIndex  # noqa: E402
from lora_core.rows import PromptLoras  # noqa: E402
from lora_core.runtime import LoraRuntime  # noqa: E402
from lora_factory import LoraSpec, make_kohya_lora  # noqa: E402

NAMES = ("r0", "r1", "r2", "r3")


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", choices=list(DTYPES), default="fp32")
    ap.add_argument("--size", type=int, default=8, help="latent size (8 = 64x64 images)")
    ap.add_argument("--width", type=int, default=320, help="UNet model channels (320 = SD1.5)")
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "out" / "rows.json")
    return ap.parse_args(argv)


def median_step(fn, device, repeats: int) -> float:
    fn()  # warm: hooks prepare their functions, the context memo fills
    return statistics.median(timed(fn, device) for _ in range(repeats))


def main(argv=None) -> dict:
    args = parse_args(argv)
    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    from bench_engine import sd15_unet

    root = build_model(False, 0, device, dtype, unet=lambda: sd15_unet(args.width))
    index = ModelIndex(root)
    targets = kohya_default_targets(root, index)
    folder = Path(tempfile.mkdtemp(prefix="bench-rows-"))
    for seed, name in enumerate(NAMES):
        tensors = make_kohya_lora(index, targets, LoraSpec(rank=args.rank, alpha=args.rank / 2), seed=seed)
        save_safetensors({k: v.to(torch.float16) for k, v in tensors.items()}, folder / f"{name}.safetensors")
    runtime = LoraRuntime(LoraLibrary([folder]), mode="bypass")
    runtime.bind(root)
    eight = unet_inputs(8, args.size, device, dtype, seed=1)
    two = {k: v[:2] for k, v in eight.items()}

    def per_row(prompts: list[PromptLoras]):
        result = runtime.activate_batch(prompts)
        assert not result.errors and runtime.per_row, result.errors

        def step():
            runtime.begin_cfg_step([1] * len(prompts), 8)
            unet_step(root, eight)
        return median_step(step, device, args.repeats)

    def uniform(items, inputs, mode="bypass"):
        runtime.mode = mode
        runtime.activate(items)
        if mode == "merged":
            assert runtime.activate(items).mode == "merged"
        t = median_step(lambda: unet_step(root, inputs), device, args.repeats)
        runtime.mode = "bypass"
        return t

    one = lambda name, w="1": PromptLoras(((name, w),))  # noqa: E731
    ms = {}
    ms["none_8rows"] = uniform([], eight)
    ms["batch4_sets4"] = per_row([one(n) for n in NAMES])
    ms["singles4_bypass"] = sum(uniform([[n, "1"]], two) for n in NAMES)
    ms["singles4_merged"] = sum(uniform([[n, "1"]], two, "merged") for n in NAMES)
    ms["uniform_8rows"] = uniform([["r0", "1"]], eight)
    ms["weights_8rows"] = per_row([one("r0"), one("r0"), one("r0", "0.5"), one("r0", "0.5")])
    ms["half_8rows"] = per_row([one("r0"), one("r0"), PromptLoras(), PromptLoras()])
    runtime.restore()
    ms = {k: v * 1000 for k, v in ms.items()}
    ratios = {
        "batch4_sets4 / singles4_bypass": ms["batch4_sets4"] / ms["singles4_bypass"],
        "batch4_sets4 / singles4_merged": ms["batch4_sets4"] / ms["singles4_merged"],
        "uniform_8rows / none_8rows": ms["uniform_8rows"] / ms["none_8rows"],
        "weights_8rows / uniform_8rows": ms["weights_8rows"] / ms["uniform_8rows"],
        "half_8rows / uniform_8rows": ms["half_8rows"] / ms["uniform_8rows"],
        "batch4_sets4 / uniform_8rows": ms["batch4_sets4"] / ms["uniform_8rows"],
    }
    results = {"config": {**{k: str(v) for k, v in vars(args).items()}, "targets": len(targets),
                          "torch": torch.__version__, "threads": torch.get_num_threads()},
               "ms_per_step": ms, "ratios": ratios}
    print("| step | ms |\n|---|---|")
    for k, v in ms.items():
        print(f"| {k} | {v:.1f} |")
    print("\n| ratio | value |\n|---|---|")
    for k, v in ratios.items():
        print(f"| {k} | {v:.3f} |")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=1))
    return results


if __name__ == "__main__":
    main()
