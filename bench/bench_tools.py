"""Peak memory of the tools on a real-size checkpoint: ``merge-into`` (and ``add-difference``) as a ratio to the
checkpoint's size, measured with ``/usr/bin/time -v`` (maximum resident set size of the whole process).

Each command runs in its own process through the CLI, the way a person runs it; a process that only imports
``lora_core`` and torch gives the baseline. Defaults: the testbed's random SD1.5 checkpoint (2 GB fp16) and its
test LoRA.

    python bench/bench_tools.py                      # merge-into, then add-difference
    python bench/bench_tools.py --only merge-into --keep

Needs about 2x the checkpoint's size free on disk, and refuses to start with less than ``--min-free-gb`` of
memory available (other processes share the machine). Results are printed and written as JSON
(default ``bench/out/tools.json``).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TESTBED = Path("/work/testbed/webui/models")
CHECKPOINT = TESTBED / "Stable-diffusion" / "sd15-random.safetensors"
LORA = TESTBED / "Lora" / "test_lora.safetensors"


def available_gb() -> float:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) / 2 ** 20
    return float("nan")


def timed(argv: list[str]) -> dict:
    """Run ``argv`` under /usr/bin/time -v: exit status, wall seconds, peak RSS (bytes), output tail."""
    start = time.perf_counter()
    done = subprocess.run(["/usr/bin/time", "-v", *argv], capture_output=True, text=True, cwd=REPO)
    wall = time.perf_counter() - start
    match = re.search(r"Maximum resident set size \(kbytes\): (\d+)", done.stderr)
    if done.returncode != 0 or match is None:
        raise SystemExit(f"failed ({done.returncode}): {' '.join(argv)}\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}")
    return {"argv": argv, "wall_s": round(wall, 2), "peak_rss_bytes": int(match.group(1)) * 1024,
            "stdout_tail": done.stdout.strip().splitlines()[-1:]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", type=Path, default=CHECKPOINT)
    parser.add_argument("--lora", type=Path, default=LORA)
    parser.add_argument("--only", choices=("merge-into", "add-difference"))
    parser.add_argument("--workdir", type=Path, help="where the outputs go (default: a new temporary folder)")
    parser.add_argument("--keep", action="store_true", help="keep the written checkpoints")
    parser.add_argument("--min-free-gb", type=float, default=10.0)
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "out" / "tools.json")
    args = parser.parse_args()

    free = available_gb()
    if free < args.min_free_gb:
        raise SystemExit(f"only {free:.1f} GB of memory available (< {args.min_free_gb}); try again later")
    size = args.checkpoint.stat().st_size
    python = sys.executable
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="bench_tools_"))
    workdir.mkdir(parents=True, exist_ok=True)

    results = {"checkpoint": str(args.checkpoint), "checkpoint_bytes": size, "lora": str(args.lora),
               "memory_available_gb_at_start": round(free, 1), "python": platform.python_version(),
               "cpu_count": os.cpu_count(), "runs": {}}
    results["runs"]["baseline (import lora_core.tools + cli)"] = timed(
        [python, "-c", "import torch, lora_core.tools, lora_core.cli"])
    commands = {
        "merge-into": [python, "-m", "lora_core", "merge-into", str(args.checkpoint), f"{args.lora}:0.8",
                       "-o", str(workdir / "merged.safetensors"), "--overwrite", "--quiet"],
        "add-difference": [python, "-m", "lora_core", "add-difference", str(args.checkpoint), str(args.checkpoint),
                           str(args.checkpoint), "-o", str(workdir / "difference.safetensors"), "-m", "0.5",
                           "--overwrite", "--quiet"],
    }
    for name, argv in commands.items():
        if args.only and name != args.only:
            continue
        run = timed(argv)
        run["peak_rss_over_checkpoint"] = round(run["peak_rss_bytes"] / size, 3)
        results["runs"][name] = run
    if not args.keep:
        for path in workdir.glob("*.safetensors"):
            path.unlink()

    baseline = results["runs"]["baseline (import lora_core.tools + cli)"]["peak_rss_bytes"]
    print(f"checkpoint {args.checkpoint.name}: {size / 2 ** 30:.2f} GiB; baseline process {baseline / 2 ** 30:.2f} GiB")
    for name, run in results["runs"].items():
        ratio = run.get("peak_rss_over_checkpoint")
        print(f"{name:42} peak RSS {run['peak_rss_bytes'] / 2 ** 30:6.2f} GiB"
              + (f" = {ratio:.3f} x checkpoint" if ratio is not None else "") + f"  ({run['wall_s']} s)")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2))
    print(f"written {args.out}")


if __name__ == "__main__":
    main()
