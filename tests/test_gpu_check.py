"""bench/gpu_check.sh and bench/gpu_check.py (issue #17): the GPU check runs here at tiny sizes on the CPU, says
"no CUDA" and exits 0 where there is none, runs exactly the tests marked gpu, and reports a missing package."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from bench import gpu_check

ROOT = Path(__file__).resolve().parents[1]
WANTED_COLUMNS = ("set", "step ms none", "step ms bypass", "step ms merged", "bypass/none", "merged/none",
                  "activation s bypass", "activation s merged", "weight change ms bypass",
                  "weight change ms merged", "peak MiB over none bypass",
                  "peak MiB over none merged", "restore exact")


def markdown_table(text: str) -> list[list[str]]:
    """The cells of the Markdown table in ``text`` (the header first, the alignment row left out)."""
    rows = [[c.strip() for c in line.strip().strip("|").split("|")] for line in text.splitlines()
            if line.startswith("| ")]
    return [r for r in rows if not all(set(c) <= set("-:") for c in r)]


def test_tiny_check_on_the_cpu_fills_every_column_and_restores_exactly(tmp_path, capsys):
    out = tmp_path / "gpu_check.json"
    status = gpu_check.main(["--device", "cpu", "--tiny", "--no-tests", "--rounds", "1", "--steps", "1",
                             "--sets", "lora,loha", "--out", str(out)])
    printed = capsys.readouterr().out
    assert status == 0, printed
    header, *rows = markdown_table(printed)
    assert set(WANTED_COLUMNS) <= set(header)
    assert [r[:2] for r in rows] == [[size, kind] for size in ("SD1.5-sized (tiny)", "SDXL-sized (tiny)")
                                     for kind in ("lora", "loha")]
    for row in rows:
        assert len(row) == len(header) and all(row), row
        assert row[header.index("restore exact")] == "True"
        assert float(row[header.index("bypass/none")]) > 0
    report = json.loads(out.read_text())
    for row in report["rows"]:
        assert row["restore_exact"] and row["lora_layers"] > 100
        assert row["checks"]["lora_effect_rel"] > 1e-2  # the LoRA is there: the timings time real work
        assert row["checks"]["bypass_vs_merged_rel"] < 1e-4  # fp32: both modes compute the same
        assert row["model"]["bypass_step_extra_s"] > 0 and row["model"]["merge_s"] > 0  # the cost model's figures
        assert "merging pays after" in printed


@pytest.mark.parametrize("torch_there, says", [(True, "finds no CUDA device"), (False, "no python imports torch")])
def test_the_launcher_says_there_is_no_cuda_and_exits_0(tmp_path, torch_there, says):
    python = sys.executable
    if not torch_there:  # this interpreter without its site-packages
        python = tmp_path / "python"
        python.write_text(f'#!/bin/sh\nexec "{sys.executable}" -S "$@"\n')
        python.chmod(0o755)
    env = {**os.environ, "GPU_CHECK_PYTHON": str(python), "CUDA_VISIBLE_DEVICES": ""}
    done = subprocess.run([str(ROOT / "bench" / "gpu_check.sh")], env=env, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("gpu_check: no CUDA here:") and says in done.stdout, done.stdout


def write_tests(folder: Path, marked_passes: bool = True) -> Path:
    tests = folder / "tests"
    tests.mkdir(exist_ok=True)
    (folder / "pytest.ini").write_text("[pytest]\nmarkers =\n    gpu: needs CUDA\n")
    (tests / "test_marked.py").write_text(
        "import pytest\n\n"
        f"@pytest.mark.gpu\ndef test_on_the_gpu():\n    assert {marked_passes}\n\n"
        "def test_not_marked():\n    assert False\n")
    (tests / "test_unmarked.py").write_text("def test_elsewhere():\n    assert False\n")
    return tests


def test_only_the_tests_marked_gpu_run_and_their_outcome_is_reported(tmp_path):
    tests = write_tests(tmp_path)
    assert gpu_check.gpu_test_files(tests) == [tests / "test_marked.py"]
    assert ROOT / "tests" / "test_gpu_check.py" not in gpu_check.gpu_test_files(ROOT / "tests")  # mark in strings
    result = gpu_check.run_gpu_tests(tests, cwd=tmp_path)
    assert result["ok"] and result["status"] == 0
    assert "1 passed" in result["summary"] and "1 deselected" in result["summary"]

    write_tests(tmp_path, marked_passes=False)
    result = gpu_check.run_gpu_tests(tests, cwd=tmp_path)
    assert not result["ok"] and result["status"] == gpu_check.FAILED and "1 failed" in result["summary"]

    (tests / "test_marked.py").unlink()
    result = gpu_check.run_gpu_tests(tests, cwd=tmp_path)
    assert result["status"] == gpu_check.NOT_RUN and "pytest.mark.gpu" in result["summary"]


def test_a_missing_ldm_is_reported_and_nothing_is_measured(tmp_path, capsys, monkeypatch):
    """A bare CUDA machine may lack stable-diffusion-sdkit: the check says which import failed, exits 2."""
    monkeypatch.delitem(sys.modules, "bench_engine", raising=False)
    monkeypatch.setitem(sys.modules, "ldm.modules.attention", None)  # `import` raises ModuleNotFoundError
    status = gpu_check.main(["--device", "cpu", "--tiny", "--no-tests", "--out", str(tmp_path / "g.json")])
    printed = capsys.readouterr().out
    assert status == gpu_check.NOT_RUN
    assert "cannot import ldm.modules.attention (the `ldm` package of stable-diffusion-sdkit" in printed
    header, *rows = markdown_table(printed)
    assert [r[:2] for r in rows] == [[size, kind] for size in ("SD1.5-sized (tiny)", "SDXL-sized (tiny)")
                                     for kind in ("lora", "loha", "lokr")]
    assert all(r[header.index("step ms none")].startswith("not run: cannot import ldm") for r in rows)


def test_a_set_that_fails_half_way_is_reported_and_the_next_starts_from_the_original(tmp_path, capsys, monkeypatch):
    """An out-of-memory in the middle of a set (here: injected after a merge and with a bypass hook still on) is
    that set's row; the next set is measured on the original model (its restore check would see the merged weights
    and its timings the leftover hooks otherwise), and the check exits 1."""
    real = gpu_check.measure_rounds
    calls = []

    def failing_once(engine, new_patcher, plans, *args):
        calls.append(1)
        if len(calls) == 1:
            new_patcher().apply(plans[0], "merged")
            new_patcher().apply(plans[1], "bypass")
            raise RuntimeError("CUDA out of memory (injected)")
        return real(engine, new_patcher, plans, *args)

    monkeypatch.setattr(gpu_check, "measure_rounds", failing_once)
    out = tmp_path / "g.json"
    status = gpu_check.main(["--device", "cpu", "--tiny", "--no-tests", "--sizes", "sd15", "--sets", "lora,loha",
                             "--rounds", "1", "--steps", "1", "--out", str(out)])
    printed = capsys.readouterr().out
    assert status == gpu_check.FAILED
    failed, measured = json.loads(out.read_text())["rows"]
    assert failed["set"] == "lora" and "injected" in failed["error"]
    assert measured["set"] == "loha" and measured["restore_exact"]
    assert measured["checks"]["lora_effect_rel"] > 1e-2 and measured["checks"]["bypass_vs_merged_rel"] < 1e-4
    assert "injected" in printed
