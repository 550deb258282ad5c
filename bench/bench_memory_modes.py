"""Host memory (RSS) of a real WebUI with a LoRA, per memory/precision flag, ours against the built-in (issue #17).

For each model (SD1.5, SDXL), flag set (none, ``--lowvram``, ``--medvram``, FP8 storage) and system, one server:
two plain warm-up generations, then RSS before; a LoRA generation (ours: bypass, a new set); the same again (ours:
merged where the host can hold the backups); plain again. Growth is RSS after each against RSS before; the peak is
VmHWM after ``clear_refs``. The test bed's own files: ``test_lora`` (SD1.5, 264 layers) and ``test_lora_sdxl_full``
(SDXL, 986 layers). The built-in runs SDXL in its functional mode (its merge mode is OOM-killed on 24 GB: see the
test bed's README), SD1.5 in its default merge mode. On this CPU-only machine the "device" is the host: VRAM
figures need a GPU (``bench/gpu_check.sh``).

    A1111_DIR=$TESTBED/webui .venv/bin/python bench/bench_memory_modes.py --out bench/out/memory_modes.json
"""
from __future__ import annotations

import argparse
import json
import os
import re
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "bench"), str(ROOT / "tests" / "e2e")]

from bench_webui import reset_peak, rss  # noqa: E402
from webui import BUILTIN_NAME, EXTENSION_NAME, WebUI, extension_linked  # noqa: E402

MODELS = {"sd15": ("sd15-random.safetensors", "test_lora"), "sdxl": ("sdxl-random.safetensors", "test_lora_sdxl_full")}
FLAGS = {"none": ([], {}), "lowvram": (["--lowvram"], {}), "medvram": (["--medvram"], {}),
         "fp8": ([], {"fp8_storage": "Enable"})}
MiB = 1 << 20


def measure(webui: Path, model: str, flag: str, system: str, workdir: Path) -> dict:
    ckpt_name, lora = MODELS[model]
    args, settings = FLAGS[flag]
    settings = dict(settings, lora_functional=system == "builtin" and model == "sdxl")
    disabled = [EXTENSION_NAME] if system == "builtin" else [BUILTIN_NAME]
    server = WebUI(webui, webui / "models" / "Stable-diffusion" / ckpt_name, disabled, workdir, extra_args=args,
                   overrides=settings)
    try:
        pid = server.proc.pid
        for _ in range(2):
            server.txt2img("a cat")
        before = rss(pid)["VmRSS"]
        reset_peak(pid)
        out = {"rss_plain_mib": before / MiB}
        for label, prompt in (("first", f"a cat <lora:{lora}:1>"), ("again", f"a cat <lora:{lora}:1>"),
                              ("plain_after", "a cat")):
            g = server.txt2img(prompt)
            now = rss(pid)
            out[label] = {"growth_mib": (now["VmRSS"] - before) / MiB, "peak_mib": (now["VmHWM"] - before) / MiB,
                          "errors": g.params.get("Lora errors")}
        out["modes"] = re.findall(r"\[lora-core\] ((?:bypass|merged): [^\n]*)", server.log.read_text(errors="replace"))
        return out
    finally:
        server.stop()


def table(results: dict) -> str:
    lines = ["| model | flags | system | RSS plain (MiB) | +first LoRA gen | +same again | peak over plain | "
             "+plain after |", "|---|---|---|---:|---:|---:|---:|---:|"]
    for key, r in results.items():
        if "error" in r:
            lines.append(f"| {key.replace('/', ' | ')} | error: {r['error'][:80]} |")
            continue
        lines.append(f"| {key.replace('/', ' | ')} | {r['rss_plain_mib']:.0f} | {r['first']['growth_mib']:+.0f} | "
                     f"{r['again']['growth_mib']:+.0f} | {r['again']['peak_mib']:+.0f} | "
                     f"{r['plain_after']['growth_mib']:+.0f} |")
    return "\n".join(lines)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--a1111", default=os.environ.get("A1111_DIR"))
    ap.add_argument("--models", default="sd15,sdxl")
    ap.add_argument("--flags", default="none,lowvram,medvram,fp8")
    ap.add_argument("--sdxl-flags", default="none,fp8", help="flag sets for SDXL (17 GB per server here)")
    ap.add_argument("--systems", default="builtin,ours")
    ap.add_argument("--out", default=str(ROOT / "bench" / "out" / "memory_modes.json"))
    a = ap.parse_args(argv)
    if not a.a1111:
        sys.exit("set A1111_DIR or --a1111 to a WebUI checkout with its venv (../shared/testbed/ builds one)")
    webui = Path(a.a1111).resolve()
    workdir = Path(tempfile.mkdtemp(prefix="lora-core-memory-"))
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    results: dict = {}
    with extension_linked(webui):
        for model in a.models.split(","):
            for flag in (a.sdxl_flags if model == "sdxl" else a.flags).split(","):
                for system in a.systems.split(","):
                    key = f"{model}/{flag}/{system}"
                    t0 = time.time()
                    try:
                        results[key] = measure(webui, model, flag, system, workdir)
                    except Exception as e:  # one failed server does not lose the others' figures
                        results[key] = {"error": f"{type(e).__name__}: {e}"}
                    print(f"{key}: {time.time() - t0:.0f} s {json.dumps(results[key])[:300]}", flush=True)
                    out.write_text(json.dumps(results, indent=1))
    text = table(results)
    print(text)
    out.write_text(json.dumps({"results": results, "table": text}, indent=1))
    return results


if __name__ == "__main__":
    main()
