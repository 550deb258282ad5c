"""Our extension against the built-in Lora and against no LoRA, in a real A1111 WebUI on CPU, through its API.

One run starts two servers per system, one after the other (the built-in with our extension disabled, ours with
the built-in disabled): one for times (a-d, with page-fault-free allocator settings, see ``STABLE_MALLOC``) and one
for memory (e, default allocator), on the same checkpoint, with the same LoRA files and requests, and measures:

a. activation: the extra time of the first generation with a LoRA never used before (1 and 5 LoRAs);
b. weight change: the extra time of a generation whose only change is one LoRA's weight;
c. steady state: per-step time with the same LoRA set as the previous generation (from 4- and N-step runs);
d. an X/Y/Z sweep of 6 weights against an X/Y/Z run of six plain generations;
e. RSS growth of the server after activation, and over switch cycles between two LoRAs;
f. LyCORIS (the test bed's own files, full LyCORIS preset: ``test_loha``, ``test_lokr``, and the kohya
   ``test_lora``): the extra time of switching from a plain generation to LoHa, to LoKr, and to the stack
   LoRA + LoHa + LoKr at -0.4; an X/Y/Z sweep of 6 LoHa weights against six plain generations; per-step time with
   that stack as the previous generation's set (steady) against no LoRA. ``--lycoris-only`` measures f alone
   (one server per system).

Every figure is a ratio of medians taken in this run (extra times are against the same server's plain
generations). The LoRAs are random kohya-style files of the given rank on every attention/feed-forward layer of
the UNet and every text-encoder layer sd-scripts trains, written for the checkpoint's shapes.

    A1111_DIR=$TESTBED/webui .venv/bin/python bench/bench_webui.py --out bench/out/webui.json
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests" / "e2e")]

from lora_core.tools.checkpoint import CheckpointReader  # noqa: E402
from lora_core.tools.extract import extract_targets  # noqa: E402
from webui import BUILTIN_NAME, EXTENSION_NAME, WebUI, helper_extension  # noqa: E402

XYZ = "x/y/z plot"
SWEEP_VALUES = "1, 0, 0.2, 0.4, 0.6, 0.8"  # the prompt holds the first one (Prompt S/R replaces it)
PLAIN_WORDS = "cat, dog, fox, owl, cow, pig"
PROMPT = "a cat"
#: f: the test bed's LyCORIS files (models/Lora), each switched to from a plain generation
LYCORIS_SETS = {"loha": "<lora:test_loha:0.8>", "lokr": "<lora:test_lokr:0.8>",
                "stack": "<lora:test_lora:0.8> <lora:test_loha:0.8> <lora:test_lokr:-0.4>"}
#: glibc malloc settings of the server that measures times. With the defaults, the CPU convolutions' per-call
#: weight reorders (up to 118 MB each) come from fresh mmaps or from free heap space depending on what the process
#: freed before: on the test bed one UNet step took 470k-680k page faults (about 1.9-2.7 GB) or none, 1.6 s or 0.8 s,
#: and a plain generation after a restore (freed backups leave such space) ran 1.6x faster than one on a fresh
#: server, so a LoRA-against-no-LoRA ratio measured the allocator's history. One arena, no mmap, no trim: every
#: generation runs without page faults (A1111's webui.sh preloads TCMalloc for the same reason; this machine has
#: none). Memory (figure e) is measured on a second server with the defaults, as a user has it.
STABLE_MALLOC = {"MALLOC_ARENA_MAX": "1", "MALLOC_MMAP_MAX_": "0", "MALLOC_TRIM_THRESHOLD_": str(1 << 40)}
#: A helper extension linked into the WebUI while the bench runs: the time of every denoiser call (the UNet on cond
#: and uncond, with whatever hooks the LoRA system added; not the text encoder, not the activation), printed to the
#: server's log. The per-step figures from 12- minus 4-step generations carry the noise of whole generations (on
#: the 2-core test bed up to +-15% of a step); these are one sample per step. Each line also gives the call's
#: process CPU seconds (all threads; less moved by other tenants of a shared host than the wall clock) and how many
#: UNet modules carry a forward hook during it (0 where the weights hold the LoRAs: the plain model's operations).
STEP_TIMER_NAME = "lora-core-bench-step-timer"
STEP_TIMER_MARK = "[lora-core-bench] unet call "
STEP_TIMER = f'''"""Bench helper of sd-webui-lora-core (bench/bench_webui.py): times each denoiser call."""
import time

import torch

from modules import script_callbacks, shared

_started = [0.0, 0.0]


def _sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _before(params):
    _sync()
    _started[:] = [time.perf_counter(), time.process_time()]


def _hooked():
    unet = getattr(getattr(shared.sd_model, "model", None), "diffusion_model", None)
    if unet is None:
        return -1
    return sum(1 for m in unet.modules() if m._forward_hooks or m._forward_pre_hooks)


def _after(params):
    _sync()
    wall, cpu = time.perf_counter() - _started[0], time.process_time() - _started[1]
    print(f"{STEP_TIMER_MARK}{{wall:.6f}} cpu {{cpu:.6f}} hooked {{_hooked()}}", flush=True)


script_callbacks.on_cfg_denoiser(_before)
script_callbacks.on_cfg_denoised(_after)
'''


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--a1111", default=os.environ.get("A1111_DIR"), help="WebUI checkout with its venv")
    ap.add_argument("--ckpt", default="sd15-random.safetensors", help="checkpoint in models/Stable-diffusion")
    ap.add_argument("--systems", default="builtin,ours")
    ap.add_argument("--rank", type=int, default=32)
    ap.add_argument("--reps", type=int, default=3, help="repetitions of each timed generation")
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--long-steps", type=int, default=12, help="second step count for the per-step time")
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--cycles", type=int, default=100, help="switch cycles (A then B) for our RSS")
    ap.add_argument("--builtin-cycles", type=int, default=20)
    ap.add_argument("--sweep-pairs", type=int, default=6, help="X/Y/Z weight sweeps, each paired with a plain one")
    ap.add_argument("--steady-pairs", type=int, default=6,
                    help="f: pairs of step-timed blocks (LyCORIS stack, steady / no LoRA), in ABBA order")
    ap.add_argument("--sweep-only", action="store_true",
                    help="only figure d (one server per system): e.g. at a size where the UNet, not the fixed costs of "
                         "a generation, dominates (--size 256 --steps 10)")
    ap.add_argument("--lycoris-only", action="store_true",
                    help="only figure f (LyCORIS: switches, a LoHa weight sweep, steady state; one server per system)")
    ap.add_argument("--out", default=str(ROOT / "bench" / "out" / "webui.json"))
    ap.add_argument("--malloc", choices=("stable", "default"), default="stable",
                    help="allocator settings of the server that measures times (figures a-d); see STABLE_MALLOC")
    ap.add_argument("--reuse", help="results JSON of an earlier run: its systems not measured now are reported")
    ap.add_argument("--report", help="only print (and rewrite) the table of this results JSON")
    return ap.parse_args(argv)


# ----------------------------------------------------------------------------- LoRA files


def write_lora(reader: CheckpointReader, targets: dict, path: Path, rank: int, seed: int) -> int:
    """A random kohya LoRA (fp16, alpha = rank / 2) on ``targets``; returns the bytes of the weights it touches."""
    gen = torch.Generator().manual_seed(seed)
    tensors, touched = {}, 0
    for target, name in targets.items():
        shape = reader.index.weight_shape(target)
        out_dim, in_dim = shape[0], int(torch.tensor(shape[1:]).prod())
        down = torch.randn(rank, in_dim, generator=gen) / in_dim ** 0.5
        up = torch.randn(out_dim, rank, generator=gen) * (0.1 / rank ** 0.5)  # ~5% of a random weight: 5 stay finite
        tensors[f"{name}.lora_down.weight"] = down.reshape(rank, *shape[1:2], *([1] * (len(shape) - 2))).half() \
            if len(shape) == 4 else down.half()
        tensors[f"{name}.lora_up.weight"] = up.reshape(out_dim, rank, *([1] * (len(shape) - 2))).half()
        tensors[f"{name}.alpha"] = torch.tensor(rank / 2, dtype=torch.float16)
        touched += out_dim * in_dim * 4  # the server runs in float32 (--no-half)
    save_file(tensors, str(path), metadata={"ss_base_model_version": "sd_v1", "ss_network_dim": str(rank),
                                             "ss_network_alpha": str(rank / 2)})
    return touched


def make_files(webui: Path, ckpt: Path, rank: int, names: list[str]) -> tuple[Path, dict]:
    folder = webui / "models" / "Lora" / "lora-core-bench"
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    with CheckpointReader(ckpt) as reader:
        targets = {t: n for t, n in extract_targets(reader.index, conv=False).items()}
        info = {}
        roles = sorted({name.split("_", 1)[1] for name in names})
        for name in names:
            # the same role gets the same random weights in every system (`ours_s` = `builtin_s`), so that both
            # compute the same images
            seed = roles.index(name.split("_", 1)[1])
            touched = write_lora(reader, targets, folder / f"{name}.safetensors", rank, seed)
            info[name] = {"bytes": (folder / f"{name}.safetensors").stat().st_size, "touched_bytes": touched,
                          "layers": len(targets)}
    return folder, info


# ----------------------------------------------------------------------------- measuring


def rss(pid: int) -> dict:
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            fields[key] = int(value.split()[0]) * 1024
    return fields


def reset_peak(pid: int) -> None:
    Path(f"/proc/{pid}/clear_refs").write_text("5")


class Runner:
    def __init__(self, server: WebUI, args: argparse.Namespace, system: str):
        self.server, self.args, self.system = server, args, system
        self.log: list[dict] = []

    def gen(self, prompt: str, steps: int | None = None, tag: str = "") -> float:
        if tag and tag != "cycle":
            print(f"{self.system}: {tag} {prompt[:70]}", flush=True)
        start = self.server.log.stat().st_size
        t0 = time.perf_counter()
        g = self.server.txt2img(prompt, size=self.args.size, steps=steps or self.args.steps)
        seconds = time.perf_counter() - t0
        errors = g.params.get("Lora errors")
        if errors:
            raise RuntimeError(f"{self.system}: {prompt}: {errors}")
        self.log.append({"tag": tag, "prompt": prompt, "steps": steps or self.args.steps, "s": seconds,
                         **self.unet_calls(start)})
        return seconds

    def unet_calls(self, start: int) -> dict:
        """The step timer's lines since byte ``start`` of the server's log: ``unet_calls`` (wall seconds), and
        where the timer gives them ``unet_cpu`` (process CPU seconds) and ``unet_hooked`` (hooked UNet modules)."""
        with open(self.server.log, "rb") as f:
            f.seek(start)
            text = f.read().decode("utf-8", "replace")
        fields = [line.split(STEP_TIMER_MARK, 1)[1].split() for line in text.splitlines() if STEP_TIMER_MARK in line]
        out: dict = {"unet_calls": [float(f[0]) for f in fields]}
        if fields and all(len(f) >= 5 for f in fields):
            out["unet_cpu"] = [float(f[2]) for f in fields]
            out["unet_hooked"] = [int(f[4]) for f in fields]
        return out

    def xyz(self, prompt: str, axis: str, values: str) -> float:
        info = [s for s in self.server.get("/sdapi/v1/script-info") if s["name"] == XYZ and not s["is_img2img"]][0]
        axes = info["args"][0]["choices"]
        args = [axes.index(axis), values, [], 0, "", [], 0, "", [], True, True, False, False,
                False, False, False, 0, False]
        payload = {"prompt": prompt, "width": self.args.size, "height": self.args.size, "steps": self.args.steps,
                   "batch_size": 1, "n_iter": 1, "script_name": XYZ, "script_args": args}
        start = self.server.log.stat().st_size
        t0 = time.perf_counter()
        images, info = self.server.txt2img_all(payload)
        seconds = time.perf_counter() - t0
        if len(images) != 7:
            raise RuntimeError(f"{self.system}: X/Y/Z gave {len(images)} images, not a grid and 6 cells")
        if "Lora errors" in info.get("extra_generation_params", {}):
            raise RuntimeError(f"{self.system}: {info['extra_generation_params']['Lora errors']}")
        self.log.append({"tag": "xyz", "prompt": prompt, "axis": axis, "values": values, "s": seconds,
                         **self.unet_calls(start)})
        return seconds


def lora(name: str, weight: float = 0.8) -> str:
    return f"<lora:{name}:{weight:g}>"


def warm_up(r: Runner) -> None:
    for _ in range(4):  # a fresh server's first generations are slow
        r.gen(PROMPT, tag="warmup")


def measure_time(server: WebUI, args: argparse.Namespace, system: str) -> dict:
    """Figures a to d, on a server whose allocator does not page-fault (see ``STABLE_MALLOC``)."""
    r = Runner(server, args, system)
    out: dict = {"samples": {}}
    s = out["samples"]
    warm_up(r)
    s["plain"] = [r.gen(PROMPT, tag="plain") for _ in range(5)]

    # a. activation, first use of each file; a plain generation before each, the second of two is a sample
    s["activation_1"], s["activation_5"] = [], []
    for i in range(args.reps):
        r.gen(PROMPT)
        s["plain"].append(r.gen(PROMPT, tag="plain"))
        s["activation_1"].append(r.gen(f"{PROMPT} {lora(f'{system}_a1_{i}')}", tag="activation_1"))
    for i in range(args.reps):
        r.gen(PROMPT)
        s["plain"].append(r.gen(PROMPT, tag="plain"))
        five = " ".join(lora(f"{system}_a5_{i}_{j}", 0.3) for j in range(5))
        s["activation_5"].append(r.gen(f"{PROMPT} {five}", tag="activation_5"))

    # b. weight change: the same file three times at one weight (steady), then another weight. Any system runs the
    # text encoder again for the prompt and the negative prompt (A1111 caches conds by prompt and extra-network
    # weights): about 0.33 s of the extra on the test bed, measured inside the server (see bench/README.md)
    s["weight_change"] = []
    name = f"{system}_w"
    for i in range(args.reps):
        r.gen(f"{PROMPT} {lora(name, 0.8)}")
        r.gen(f"{PROMPT} {lora(name, 0.8)}")  # ours merges here: the sample below is against a generation after it
        r.gen(f"{PROMPT} {lora(name, 0.8)}", tag="steady")
        s["weight_change"].append(r.gen(f"{PROMPT} {lora(name, 0.5 + 0.05 * i)}", tag="weight_change"))

    # c. steady state: per-step time from N-step minus 4-step generations, each right after one of its kind
    # (the same LoRA set as the previous generation), in blocks LoRA / none / LoRA / none against drift
    name = f"{system}_s"
    for label in ("lora", "none"):
        s[f"steady_{label}_short"], s[f"steady_{label}_long"] = [], []
    for label, prompt in (("lora", f"{PROMPT} {lora(name)}"), ("none", PROMPT)) * 2:
        r.gen(prompt)
        r.gen(prompt)
        for _ in range(args.reps):
            s[f"steady_{label}_short"].append(r.gen(prompt, tag=f"steady_{label}_short"))
            s[f"steady_{label}_long"].append(r.gen(prompt, args.long_steps, tag=f"steady_{label}_long"))

    measure_sweep(r, args, system, s)
    measure_lycoris(r, args, system, s)
    out["log"] = r.log
    return out


def measure_lycoris(r: Runner, args: argparse.Namespace, system: str, s: dict) -> None:
    """f. Switching to LyCORIS sets, a LoHa weight sweep and the steady state with a LyCORIS stack."""
    for key, tags in LYCORIS_SETS.items():  # first use of each file outside the samples
        r.gen(f"{PROMPT} {tags}")
    for i in range(args.reps):
        for key, tags in LYCORIS_SETS.items():
            r.gen(PROMPT)
            s["plain"].append(r.gen(PROMPT, tag="plain"))
            s.setdefault(f"switch_{key}", []).append(r.gen(f"{PROMPT} {tags}", tag=f"switch_{key}"))
    measure_sweep(r, args, system, s, name="test_loha", prefix="lyco_")
    stack = f"{PROMPT} {LYCORIS_SETS['stack']}"
    for label in ("lyco", "lnone"):
        s[f"steady_{label}_short"], s[f"steady_{label}_long"] = [], []
    for label, prompt in (("lyco", stack), ("lnone", PROMPT)) * 2:
        r.gen(prompt)
        r.gen(prompt)
        for _ in range(args.reps):
            s[f"steady_{label}_short"].append(r.gen(prompt, tag=f"steady_{label}_short"))
            s[f"steady_{label}_long"].append(r.gen(prompt, args.long_steps, tag=f"steady_{label}_long"))
    # the same state timed by the step timer in more, shorter blocks, each pair of blocks next to each other
    # (ABBA): the machine's speed drifts by more than the figure over minutes, neighbours share the drift
    for i in range(args.steady_pairs):
        pair = (("lyco", stack), ("lnone", PROMPT)) if i % 2 == 0 else (("lnone", PROMPT), ("lyco", stack))
        for label, prompt in pair:
            r.gen(prompt)
            r.gen(prompt)  # the stack's first generation is bypass (a new set), this one merged (steady)
            for _ in range(args.reps):
                r.gen(prompt, tag="steady_block")
                r.log[-1].update(label=label, block=2 * i + (label != pair[0][0]))


def measure_lycoris_only(server: WebUI, args: argparse.Namespace, system: str) -> dict:
    r = Runner(server, args, system)
    out: dict = {"samples": {}}
    warm_up(r)
    out["samples"]["plain"] = [r.gen(PROMPT, tag="plain") for _ in range(3)]
    measure_lycoris(r, args, system, out["samples"])
    out["log"] = r.log
    return out


def measure_sweep(r: Runner, args: argparse.Namespace, system: str, s: dict, name: str | None = None,
                  prefix: str = "") -> None:
    """d. X/Y/Z: six weights of one (already loaded) LoRA against six plain prompts."""
    name = name or f"{system}_x"
    r.gen(f"{PROMPT} {lora(name, 1)}")
    weight_axis = "LoRA weight" if system == "ours" else "Prompt S/R"  # the built-in has no weight axis
    sweep, plain = f"{prefix}sweep", f"{prefix}sweep_plain"
    s[sweep], s[plain] = [], []
    for i in range(args.sweep_pairs):  # pairs in ABBA order: a drift of the machine's speed cancels out
        order = (sweep, plain) if i % 2 == 0 else (plain, sweep)
        for kind in order:
            s[kind].append(r.xyz(f"{PROMPT} {lora(name, 1)}", weight_axis, SWEEP_VALUES) if kind == sweep
                           else r.xyz(PROMPT, "Prompt S/R", PLAIN_WORDS))


def measure_sweep_only(server: WebUI, args: argparse.Namespace, system: str) -> dict:
    r = Runner(server, args, system)
    out: dict = {"samples": {}}
    warm_up(r)
    out["samples"]["plain"] = [r.gen(PROMPT, tag="plain") for _ in range(3)]
    measure_sweep(r, args, system, out["samples"])
    out["log"] = r.log
    return out


def measure_memory(server: WebUI, args: argparse.Namespace, system: str) -> dict:
    """Figure e, on a server with the allocator as a user has it: RSS after activation and over switch cycles."""
    r = Runner(server, args, system)
    pid = server.proc.pid
    out: dict = {}
    warm_up(r)
    out["rss_plain"] = rss_before = rss(pid)["VmRSS"]
    reset_peak(pid)
    name = f"{system}_m"
    r.gen(f"{PROMPT} {lora(name)}", tag="activation")
    after = rss(pid)
    out["rss_activation_first"] = {"growth": after["VmRSS"] - rss_before, "peak": after["VmHWM"] - rss_before}
    r.gen(f"{PROMPT} {lora(name)}", tag="steady")  # ours merges here
    after = rss(pid)
    out["rss_activation_steady"] = {"growth": after["VmRSS"] - rss_before, "peak": after["VmHWM"] - rss_before}

    # switch cycles between two files: RSS after the first 10 and at the end
    cycles = args.cycles if system == "ours" else args.builtin_cycles
    a, b = f"{PROMPT} {lora(f'{system}_cA')}", f"{PROMPT} {lora(f'{system}_cB')}"
    marks = {}
    for i in range(cycles):
        r.gen(a, 1, tag="cycle")
        r.gen(b, 1, tag="cycle")
        if i + 1 in (10, cycles):
            marks[i + 1] = rss(pid)["VmRSS"]
    out["rss_cycles"] = {"cycles": cycles, "after_10": marks.get(10), "at_end": marks.get(cycles),
                         "growth_10_to_end": marks[cycles] - marks[10] if cycles > 10 else None}
    out["memory_log"] = r.log
    return out


# ----------------------------------------------------------------------------- the report


def med(xs: list[float]) -> float:
    return statistics.median(xs)


def paired_extra(log: list[dict], tag: str) -> list[float]:
    """Each ``tag`` generation minus the generation just before it (a plain one for activations, the same LoRA at
    its steady weight for weight changes): the machine's speed drifts over a run, neighbours share it."""
    return [entry["s"] - log[i - 1]["s"] for i, entry in enumerate(log) if entry["tag"] == tag and i > 0]


def unet_figures(log: list[dict], label: str) -> dict:
    """From the step timer (absent in results of runs before it): the median denoiser call in the steady
    generations with the stack and without LoRA, and per X/Y/Z run the median call and the time outside the calls
    (text encoder, activation, VAE, the grid), each against the plain run next to it."""
    def steady(kind: str, field: str) -> list:  # one field of the step timer over the steady generations of a kind
        return [v for e in log if e["tag"].startswith(f"steady_{kind}_") for v in e.get(field, [])]

    calls = {k: steady(k, "unet_calls") for k in (label, "lnone")}
    if not all(calls.values()):
        return {}
    out = {"unet_lyco_s": med(calls[label]), "unet_lnone_s": med(calls["lnone"])}
    out["unet_steady_ratio"] = out["unet_lyco_s"] / out["unet_lnone_s"]
    cpu = {k: steady(k, "unet_cpu") for k in (label, "lnone")}
    if all(cpu.values()):
        out["unet_steady_cpu_ratio"] = med(cpu[label]) / med(cpu["lnone"])
    hooked = steady(label, "unet_hooked")
    if hooked:  # 0: the steady stack ran the plain model's operations (merged weights, no hook)
        out["steady_hooked_max"] = max(hooked)
    blocks: dict[int, dict] = {}
    for e in log:
        if e["tag"] == "steady_block" and e.get("unet_calls"):
            block = blocks.setdefault(e["block"], {"label": e["label"], "calls": [], "cpu": []})
            block["calls"] += e["unet_calls"]
            block["cpu"] += e.get("unet_cpu", [])
    pairs = [(blocks[2 * i], blocks[2 * i + 1]) for i in range(len(blocks) // 2)
             if 2 * i in blocks and 2 * i + 1 in blocks]
    for key, figure in (("calls", "unet_steady_pair_ratio"), ("cpu", "unet_steady_cpu_pair_ratio")):
        if pairs and all(a[key] and b[key] for a, b in pairs):  # per pair of neighbours: the stack's / the plain's
            out[figure] = med([med(a[key]) / med(b[key]) if a["label"] == label else med(b[key]) / med(a[key])
                               for a, b in pairs])
    runs = [e for e in log if e["tag"] == "xyz" and e.get("unet_calls") and "test_loha" in e["prompt"]]
    plain = [e for e in log if e["tag"] == "xyz" and e.get("unet_calls") and "<lora:" not in e["prompt"]]
    if runs and plain:
        for field, figure in (("unet_calls", "sweep_unet_call_ratio"), ("unet_cpu", "sweep_unet_cpu_ratio")):
            if all(e.get(field) for e in runs + plain):
                out[figure] = med([med(e[field]) for e in runs]) / med([med(e[field]) for e in plain])
        out["sweep_outside_s"] = med([e["s"] - sum(e["unet_calls"]) for e in runs])
        out["sweep_plain_outside_s"] = med([e["s"] - sum(e["unet_calls"]) for e in plain])
    return out


def derive(system: dict, args: argparse.Namespace) -> dict:
    s = system["samples"]
    t0 = med(s["plain"])
    log = system["log"]

    def per_step(label: str) -> float:  # each long generation against the short one just before it
        pairs = zip(s[f"steady_{label}_short"], s[f"steady_{label}_long"])
        return med([(long - short) / (args.long_steps - args.steps) for short, long in pairs])

    lyco = {}
    if "lyco_sweep" in s:  # figure f
        lyco = {**{f"switch_{k}_extra_s": med(paired_extra(log, f"switch_{k}")) for k in LYCORIS_SETS},
                "lyco_sweep_s": med(s["lyco_sweep"]), "lyco_sweep_plain_s": med(s["lyco_sweep_plain"]),
                "lyco_sweep_ratio": med([a / b for a, b in zip(s["lyco_sweep"], s["lyco_sweep_plain"])]),
                "step_lyco_s": per_step("lyco"), "step_lnone_s": per_step("lnone")}
        lyco["lyco_steady_step_ratio"] = lyco["step_lyco_s"] / lyco["step_lnone_s"]
        lyco.update(unet_figures(log, "lyco"))
    if "sweep" not in s:  # --lycoris-only
        return {"plain_s": t0, **lyco}
    sweep = {"sweep_s": med(s["sweep"]), "sweep_plain_s": med(s["sweep_plain"]),
             "sweep_ratio": med([a / b for a, b in zip(s["sweep"], s["sweep_plain"])])}
    if "activation_1" not in s:  # --sweep-only
        return {"plain_s": t0, **sweep}

    step_lora, step_none = per_step("lora"), per_step("none")
    return {"plain_s": t0,
            "activation_1_extra_s": med(paired_extra(log, "activation_1")),
            "activation_5_extra_s": med(paired_extra(log, "activation_5")),
            "weight_change_extra_s": med(paired_extra(log, "weight_change")),
            "step_lora_s": step_lora, "step_none_s": step_none, "steady_step_ratio": step_lora / step_none,
            **sweep, **lyco}


def report(results: dict, files: dict, args: argparse.Namespace) -> str:
    systems = [k for k in ("builtin", "ours") if k in results]
    d = results["derived"]
    lines = [f"# WebUI bench: random SD1.5, {args.size}x{args.size}, Euler, {args.steps} steps, CPU; "
             f"rank-{args.rank} LoRA on {next(iter(files.values()))['layers']} layers, "
             f"{next(iter(files.values()))['bytes'] / 2**20:.1f} MiB file", "",
             "| figure | " + " | ".join(systems) + (" | ours / built-in |" if len(systems) == 2 else " |"),
             "|---|" + "---:|" * (len(systems) + (len(systems) == 2))]

    def row(label: str, key: str, fmt: str = "{:.3f}", ratio: bool = True) -> None:
        if all(key not in d[k] for k in systems):  # not measured (--sweep-only)
            return
        cells = [fmt.format(d[k][key]) if key in d[k] else "n/a" for k in systems]  # n/a: a reused older run
        if len(systems) == 2:
            both = all(key in d[k] for k in systems)
            cells.append(f"{d['ours'][key] / d['builtin'][key]:.3f}" if both and ratio and d["builtin"][key] else "")
        lines.append(f"| {label} | " + " | ".join(cells) + " |")

    row("plain generation (s)", "plain_s", ratio=False)
    row("activation, 1 new LoRA: extra s", "activation_1_extra_s")
    row("activation, 5 new LoRAs: extra s", "activation_5_extra_s")
    row("weight change: extra s", "weight_change_extra_s")
    row("steady per-step s, LoRA", "step_lora_s", "{:.4f}", ratio=False)
    row("steady per-step s, no LoRA", "step_none_s", "{:.4f}", ratio=False)
    row("steady per-step, LoRA / no LoRA", "steady_step_ratio", ratio=False)
    row("X/Y/Z 6 weights (s)", "sweep_s", "{:.2f}", ratio=False)
    row("X/Y/Z 6 plain (s)", "sweep_plain_s", "{:.2f}", ratio=False)
    row("X/Y/Z 6 weights / 6 plain", "sweep_ratio", ratio=False)
    row("switch to LoHa: extra s", "switch_loha_extra_s")
    row("switch to LoKr: extra s", "switch_lokr_extra_s")
    row("switch to LoRA + LoHa + LoKr(-0.4): extra s", "switch_stack_extra_s")
    row("X/Y/Z 6 LoHa weights (s)", "lyco_sweep_s", "{:.2f}", ratio=False)
    row("X/Y/Z 6 plain, next to it (s)", "lyco_sweep_plain_s", "{:.2f}", ratio=False)
    row("X/Y/Z 6 LoHa weights / 6 plain", "lyco_sweep_ratio", ratio=False)
    row("steady per-step s, LoRA + LoHa + LoKr", "step_lyco_s", "{:.4f}", ratio=False)
    row("steady per-step s, no LoRA, next to it", "step_lnone_s", "{:.4f}", ratio=False)
    row("steady per-step, LyCORIS stack / no LoRA", "lyco_steady_step_ratio", ratio=False)
    row("step timer: steady UNet call s, LoRA + LoHa + LoKr", "unet_lyco_s", "{:.4f}", ratio=False)
    row("step timer: steady UNet call s, no LoRA", "unet_lnone_s", "{:.4f}", ratio=False)
    row("step timer: steady UNet call, LyCORIS stack / no LoRA", "unet_steady_ratio", ratio=False)
    row("step timer: steady UNet call, stack / no LoRA, median of ABBA block pairs", "unet_steady_pair_ratio",
        ratio=False)
    row("step timer: steady UNet call CPU s, stack / no LoRA", "unet_steady_cpu_ratio", ratio=False)
    row("step timer: steady UNet call CPU s, stack / no LoRA, median of ABBA block pairs",
        "unet_steady_cpu_pair_ratio", ratio=False)
    row("step timer: most hooked UNet modules in a steady call with the stack", "steady_hooked_max", "{}",
        ratio=False)
    row("step timer: X/Y/Z UNet call, LoHa / plain", "sweep_unet_call_ratio", ratio=False)
    row("step timer: X/Y/Z UNet call CPU s, LoHa / plain", "sweep_unet_cpu_ratio", ratio=False)
    row("step timer: X/Y/Z outside the UNet s, LoHa", "sweep_outside_s", "{:.2f}", ratio=False)
    row("step timer: X/Y/Z outside the UNet s, plain", "sweep_plain_outside_s", "{:.2f}", ratio=False)
    if any("rss_cycles" not in results[k] for k in systems):  # --sweep-only, --lycoris-only
        return "\n".join(lines)
    f = next(iter(files.values()))
    budget = 1.5 * f["bytes"] + f["touched_bytes"]
    lines += ["", f"RSS (MiB; budget for activation = 1.5 x file + touched weights = {budget / 2**20:.0f}):", ""]
    for k in systems:
        res = results[k]
        first, steady, cyc = res["rss_activation_first"], res["rss_activation_steady"], res["rss_cycles"]
        lines.append(f"- {k}: first generation +{first['growth'] / 2**20:.0f} (peak +{first['peak'] / 2**20:.0f}); "
                     f"second (steady) +{steady['growth'] / 2**20:.0f} (peak +{steady['peak'] / 2**20:.0f}); "
                     f"{cyc['cycles']} switch cycles: {(cyc['growth_10_to_end'] or 0) / 2**20:+.0f} "
                     f"from cycle 10 to the end")
    return "\n".join(lines)


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.report:
        results = json.loads(Path(args.report).read_text())
        for key in ("steps", "long_steps", "size", "rank"):
            setattr(args, key, results["config"][key])
        results["derived"] = {k: derive(results[k], args) for k in ("builtin", "ours") if k in results}
        results["table"] = report(results, {"file": results["files"]}, args)
        Path(args.report).write_text(json.dumps(results, indent=1))
        print(results["table"])
        return results
    if not args.a1111:
        sys.exit("set A1111_DIR or --a1111 to a WebUI checkout with its venv (../shared/testbed/ builds one)")
    webui = Path(args.a1111).resolve()
    ckpt = webui / "models" / "Stable-diffusion" / args.ckpt
    systems = args.systems.split(",")
    names = []
    for system in systems:
        names += [f"{system}_a1_{i}" for i in range(args.reps)]
        names += [f"{system}_a5_{i}_{j}" for i in range(args.reps) for j in range(5)]
        names += [f"{system}_{x}" for x in ("w", "s", "x", "m", "cA", "cB")]
    if args.lycoris_only:  # the test bed's own files; one kohya file only for the table's header
        names = [f"{systems[0]}_x"]
    folder, files = make_files(webui, ckpt, args.rank, names)
    workdir = Path(tempfile.mkdtemp(prefix="lora-core-bench-"))
    results = {"config": {k: v for k, v in vars(args).items()}, "files": next(iter(files.values())),
               "started": time.strftime("%Y-%m-%d %H:%M:%S")}
    if args.reuse:
        earlier = json.loads(Path(args.reuse).read_text())
        for system in ("builtin", "ours"):
            if system not in systems and system in earlier:
                results[system] = {**earlier[system], "from": f"{args.reuse}, started {earlier.get('started')}"}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    try:
        # this checkout in extensions/ while the servers run, and the step timer beside it
        with helper_extension(webui, STEP_TIMER_NAME, {"step_timer.py": STEP_TIMER}):
            for system in systems:
                disabled = [EXTENSION_NAME] if system == "builtin" else [BUILTIN_NAME]
                t0 = time.time()
                parts = (("time", STABLE_MALLOC if args.malloc == "stable" else {}, measure_time),
                         ("memory", {}, measure_memory))
                if args.sweep_only:
                    parts = (("sweep", parts[0][1], measure_sweep_only),)
                if args.lycoris_only:
                    parts = (("lycoris", parts[0][1], measure_lycoris_only),)
                for part, env, run in parts:
                    server = WebUI(webui, ckpt, disabled, workdir, env=env)
                    try:
                        results.setdefault(system, {}).update(run(server, args, system))
                    except Exception as e:
                        results[f"{system}_error"] = f"{part}: {type(e).__name__}: {e}; server log {server.log}"
                        raise
                    finally:
                        server.stop()
                        out.write_text(json.dumps(results, indent=1))  # what was measured so far survives a failure
                results[system]["wall_s"] = time.time() - t0
                print(f"{system}: done in {results[system]['wall_s']:.0f} s", flush=True)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    results["derived"] = {k: derive(results[k], args) for k in ("builtin", "ours") if k in results}
    text = report(results, files, args)
    results["table"] = text
    out.write_text(json.dumps(results, indent=1))
    print(text)
    return results


if __name__ == "__main__":
    main()
