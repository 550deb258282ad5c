"""``python -m lora_core``: every command's help, a run of each, and errors as one line with exit status 1."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from lora_core.cli import main
from lora_core.io import addnet_hash, read_metadata
from test_tools import SD1_LAYERS, sd1_files, write  # noqa: F401  (sd1_files is a fixture)

COMMANDS = ("merge-into", "merge-loras", "extract", "resize", "add-difference", "inspect")


@pytest.fixture(scope="module")
def files(sd1_files):
    _, _, ckpt, lora, _, folder = sd1_files
    return folder, ckpt, lora


def run(capsys, *argv) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_has_help(command, capsys):
    with pytest.raises(SystemExit) as exit_:
        main([command, "--help"])
    assert exit_.value.code == 0
    text = capsys.readouterr().out
    assert text.startswith(f"usage: python -m lora_core {command}")
    if command != "inspect":
        assert "--output" in text and "--overwrite" in text


def test_module_entry_point_lists_the_commands():
    done = subprocess.run([sys.executable, "-m", "lora_core", "--help"], capture_output=True, text=True,
                          cwd=Path(__file__).resolve().parents[1], timeout=120)
    assert done.returncode == 0
    assert all(command in done.stdout for command in COMMANDS)


def test_merge_into_with_block_weights_then_refuses_to_overwrite(files, tmp_path, capsys):
    folder, ckpt, _ = files
    out = tmp_path / "merged.safetensors"
    code, text, _ = run(capsys, "merge-into", ckpt, "lora:0.5:OUTALL", "--lora-dir", folder, "-o", out,
                        "--save-precision", "fp32", "--quiet")
    assert code == 0 and "wrote" in text and "blocks OUTALL" in text
    assert read_metadata(out)["sshs_model_hash"] == addnet_hash(out)
    before = out.read_bytes()
    code, _, err = run(capsys, "merge-into", ckpt, "lora:0.5", "--lora-dir", folder, "-o", out, "--quiet")
    assert code == 1 and err.startswith("error: ") and "already exists" in err and out.read_bytes() == before
    code, _, _ = run(capsys, "merge-into", ckpt, "lora:0.5", "--lora-dir", folder, "-o", out, "--quiet",
                     "--overwrite")
    assert code == 0 and out.read_bytes() != before


def test_lora_commands_run(files, tmp_path, capsys):
    _, ckpt, lora = files
    code, text, _ = run(capsys, "resize", lora, "-o", tmp_path / "r2.safetensors", "--rank", "2", "--verbose",
                        "--quiet")
    assert code == 0 and "rank 4 -> 2" in text and "average Frobenius" in text
    code, text, _ = run(capsys, "merge-loras", f"{lora}:0.5", tmp_path / "r2.safetensors", "--mode", "concat",
                        "-o", tmp_path / "c.safetensors", "--metadata", "ss_output_name=combo", "--quiet")
    assert code == 0 and "ranks {6:" in text
    assert read_metadata(tmp_path / "c.safetensors")["ss_output_name"] == "combo"
    code, text, _ = run(capsys, "merge-loras", lora, lora, "--mode", "sum", "-o", tmp_path / "s.safetensors", "--quiet")
    assert code == 0 and "approximates" in text
    code, text, _ = run(capsys, "extract", "--base", ckpt, "--tuned", ckpt, "-o", tmp_path / "x.safetensors",
                        "--rank", "2", "--quiet")
    assert code == 0 and "text encoder left out" in text
    assert all(float(t.abs().max()) == 0 for k, t in load_file(str(tmp_path / "x.safetensors")).items()
               if k.endswith("lora_up.weight"))  # no change: up = U S = 0


def test_add_difference_and_inspect(files, tmp_path, capsys):
    _, ckpt, lora = files
    out = tmp_path / "d.safetensors"
    code, _, _ = run(capsys, "add-difference", ckpt, ckpt, ckpt, "-o", out, "-m", "0.5", "--save-precision", "fp32",
                     "--quiet")
    assert code == 0
    assert all(torch.equal(a, b) for a, b in zip(load_file(str(out)).values(), load_file(str(ckpt)).values()))
    code, text, _ = run(capsys, "inspect", lora, "--json", "--plot", tmp_path / "chart.png")
    info = json.loads(text)
    assert code == 0 and info["family"] == "sd1" and info["ranks"] == {"4": len(SD1_LAYERS)}
    assert (tmp_path / "chart.png").stat().st_size > 0
    code, text, _ = run(capsys, "inspect", lora, "--model", ckpt)
    assert code == 0 and "block influence" in text and "OUT11" in text


def test_errors_are_one_line(files, sdxl_model, tmp_path, capsys):
    _, ckpt, lora = files
    code, _, err = run(capsys, "resize", tmp_path / "missing.safetensors", "-o", tmp_path / "o.safetensors")
    assert code == 1 and "file not found" in err and err.count("\n") == 1
    code, _, err = run(capsys, "merge-loras", lora, "--mode", "svd", "-o", tmp_path / "o.safetensors")
    assert code == 2 and "needs the new rank" in err  # a usage error
    xl = write(tmp_path / "xl.safetensors", {"lora_te2_text_model_encoder_layers_0_mlp_fc1.lora_down.weight":
                                             torch.zeros(2, 48),
                                             "lora_te2_text_model_encoder_layers_0_mlp_fc1.lora_up.weight":
                                             torch.zeros(192, 2)})
    code, _, err = run(capsys, "merge-into", ckpt, xl, "-o", tmp_path / "o.safetensors")
    assert code == 1 and "SDXL" in err and "SD1" in err
    assert not (tmp_path / "o.safetensors").exists()
