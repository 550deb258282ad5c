"""Time to read the LoRA tags of large and hostile prompts (issue #21): ``parse_prompt`` and
``analysis.lora_tags`` on prompts of a given size, one shape per row, next to A1111's own extra-network
regex on the same text for reference (A1111 runs it on every prompt before our code sees one).

Each measurement runs in a child process with a time limit, so a quadratic case shows as "> LIMIT s" instead of
blocking the run. Prints a Markdown table; no timing is asserted anywhere.

    .venv/bin/python bench/bench_syntax.py                      # 1 MB prompts
    .venv/bin/python bench/bench_syntax.py --size 240000 --only unterminated
"""
from __future__ import annotations

import argparse
import multiprocessing
import re
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

A1111_RE = re.compile(r"<(\w+):([^>]+)>")  # modules/extra_networks.py


def _repeat(unit: str, size: int, head: str = "", tail: str = "") -> str:
    count = max(1, (size - len(head) - len(tail)) // len(unit))
    return head + unit * count + tail


SHAPES: dict[str, Callable[[int], str]] = {
    # the case: `<lora:` again and again, never closed
    "unterminated": lambda n: _repeat("<lora:", n),
    # many ordinary tags, as a long pasted prompt would have them
    "many tags": lambda n: _repeat("a photo, <lora:style_01:0.6:lbw=MIDD>, ", n),
    # as many different short tags as fit (nothing can be shared between them)
    "distinct tags": lambda n: "".join(f"<lora:a{i}:1>" for i in range(n // 12)),
    # tags of the most items a tag may have, every item a problem
    "full tags": lambda n: _repeat("<lora:n" + ":k=1" * 250 + ">", n),
    # one tag with a huge number of ':' items (warnings for every item beyond DYN)
    "one tag, empty items": lambda n: _repeat(":", n, "<lora:name", ">"),
    "one tag, unknown keys": lambda n: _repeat(":k=1", n, "<lora:name", ">"),
    # a quote that never closes, over many items
    "unclosed quote": lambda n: _repeat(":b", n, '<lora:"a', ">"),
    # inline lbwe directives over many items (they are joined back)
    "lbwe directives": lambda n: _repeat("IN05:attn:0.5,", n, "<lora:name:lbwe=", "IN05:attn:1>"),
    # a long digit run that is not a number (regex backtracking)
    "digit run": lambda n: _repeat("1", n, "<lora:name:", "x>"),
    "long schedule": lambda n: _repeat("1@0,", n, "<lora:name:", "1@1>"),
    "lbw list": lambda n: _repeat("1,", n, "<lora:name:lbw=", "1>"),
    # tags of other networks and text between them
    "other networks": lambda n: _repeat("<hypernet:h:1> text <lora:>", n),
    "tiny other tags": lambda n: _repeat("<h:1>", n),
}


def _functions() -> dict[str, Callable[[str], object]]:
    from lora_core.analysis import lora_tags
    from lora_core.syntax import parse_prompt
    return {
        "parse_prompt": parse_prompt,
        "analysis.lora_tags": lora_tags,
        "A1111 regex": lambda prompt: [m.group(2).split(":") for m in A1111_RE.finditer(prompt)],
    }


def _measure(function: str, shape: str, size: int, repeats: int, queue: multiprocessing.Queue) -> None:
    prompt = SHAPES[shape](size)
    run = _functions()[function]
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        run(prompt)
        times.append(time.perf_counter() - started)
    queue.put(statistics.median(times))


def measure(function: str, shape: str, size: int, repeats: int, limit: float) -> float | None:
    """The median time in seconds, or None past ``limit``."""
    queue: multiprocessing.Queue = multiprocessing.Queue()
    child = multiprocessing.Process(target=_measure, args=(function, shape, size, repeats, queue))
    child.start()
    child.join(limit)
    if child.is_alive():
        child.terminate()
        child.join()
        return None
    return queue.get() if not queue.empty() else float("nan")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=1_000_000, help="prompt size in characters (default 1 MB)")
    parser.add_argument("--repeats", type=int, default=5, help="runs per cell; the median is shown")
    parser.add_argument("--limit", type=float, default=30.0, help="seconds before a cell is given up")
    parser.add_argument("--only", action="append", choices=sorted(SHAPES), help="only these shapes")
    parser.add_argument("--functions", nargs="+", choices=sorted(_functions()), default=None)
    args = parser.parse_args()
    functions = args.functions or list(_functions())
    print(f"prompt size {args.size:,} characters, median of {args.repeats} runs, limit {args.limit:g} s\n")
    print("| shape | " + " | ".join(functions) + " |")
    print("|---|" + "---:|" * len(functions))
    for shape in args.only or SHAPES:
        cells = []
        for function in functions:
            seconds = measure(function, shape, args.size, args.repeats, args.limit)
            cells.append(f"> {args.limit:g} s" if seconds is None else f"{seconds * 1000:.1f} ms")
        print(f"| {shape} | " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
