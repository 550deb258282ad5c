"""``python -m lora_core`` on bad command lines and bad files: every case ends in one ``error: ...`` line (never a
traceback) that names the option or the file at fault, with status 2 for a wrong command line and 1 for a bad
file, and leaves every file of the folder as it was (hashes before and after) with nothing written."""
from __future__ import annotations

import errno
import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import lora_core.tools
from lora_core.cli import main
from test_tools import sd1_files, write  # noqa: F401  (sd1_files is a fixture)

REPO = Path(__file__).resolve().parents[1]
USAGE, BAD_INPUT = 2, 1


def _populate(folder: Path, ckpt: Path, lora: Path) -> None:
    """The files the cases use: good inputs, inputs of the wrong kind, broken files, links."""
    folder.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(ckpt, folder / "base.safetensors")
    tuned = {k: v + 0.01 if v.is_floating_point() else v for k, v in load_file(str(ckpt)).items()}
    write(folder / "tuned.safetensors", tuned)
    shutil.copyfile(lora, folder / "lora.safetensors")
    write(folder / "unknown.safetensors", {"foo.weight": torch.ones(3, 3)})
    nan = torch.ones(4, 8)
    nan[0, 0] = float("nan")
    write(folder / "nan.safetensors", {"lora_unet_input_blocks_1_1_proj_in.lora_down.weight": nan,
                                       "lora_unet_input_blocks_1_1_proj_in.lora_up.weight": torch.ones(8, 4)})
    (folder / "trunc.safetensors").write_bytes((folder / "lora.safetensors").read_bytes()[:3000])
    (folder / "empty.safetensors").write_bytes(b"")
    torch.save({"a": torch.zeros(2)}, folder / "tensors.pt")
    torch.save({"a": Path("x")}, folder / "object.pt")  # an object the weights-only unpickler refuses
    (folder / "notes.txt").write_text("no preset here\n")
    (folder / "dir.safetensors").mkdir()
    (folder / "link.safetensors").symlink_to(folder / "lora.safetensors")
    os.link(folder / "lora.safetensors", folder / "hard.safetensors")


@pytest.fixture(scope="module")
def workdir(sd1_files, tmp_path_factory):
    _, _, ckpt, lora, _, _ = sd1_files
    folder = tmp_path_factory.mktemp("cli_errors")
    _populate(folder, ckpt, lora)
    return folder, ckpt, lora


_HASHES: dict[tuple, str] = {}


def snapshot(folder: Path) -> dict[str, str]:
    """Every entry of ``folder``: a link's target, 'dir', or the sha256 of a file (cached by inode and mtime)."""
    state = {}
    for entry in sorted(folder.iterdir()):
        if entry.is_symlink():
            state[entry.name] = "-> " + os.readlink(entry)
        elif entry.is_dir():
            state[entry.name] = "dir " + ",".join(sorted(p.name for p in entry.iterdir()))
        else:
            st = entry.stat()
            key = (str(entry), st.st_ino, st.st_size, st.st_mtime_ns)
            if key not in _HASHES:
                _HASHES[key] = hashlib.sha256(entry.read_bytes()).hexdigest()
            state[entry.name] = _HASHES[key]
    return state


@pytest.fixture
def folder(workdir):
    """The module's folder of inputs; put back as it was after a case that changed it (so one failure stays one)."""
    path, ckpt, lora = workdir
    before = snapshot(path)
    yield path
    if snapshot(path) != before:
        shutil.rmtree(path)
        _populate(path, ckpt, lora)


def run_cli(capsys, argv: list[str]) -> tuple[int, str, str]:
    try:
        code = main(argv)
    except SystemExit as exit_:  # argparse
        code = exit_.code
    captured = capsys.readouterr()
    return code, captured.out, captured.err


# (id, arguments with {d} for the folder and {o} for a fresh output, status, words the message must hold)
CASES = [
    # issue #21
    ("merge-loras clamp 5", "merge-loras {d}/lora.safetensors --rank 2 --clamp-quantile 5 -o {o}", USAGE,
     "--clamp-quantile"),
    ("extract clamp 5", "extract --base {d}/base.safetensors --tuned {d}/tuned.safetensors --clamp-quantile 5 -o {o}",
     USAGE, "--clamp-quantile"),
    ("merge-into over its checkpoint", "merge-into {d}/base.safetensors {d}/lora.safetensors "
     "-o {d}/base.safetensors --overwrite", USAGE, "the output is also an input"),
    ("merge-into over its lora", "merge-into {d}/base.safetensors {d}/lora.safetensors -o {d}/lora.safetensors "
     "--overwrite", USAGE, "the output is also an input"),
    ("resize over its input", "resize {d}/lora.safetensors --rank 2 -o {d}/lora.safetensors --overwrite", USAGE,
     "the output is also an input"),
    ("merge-loras over an input", "merge-loras {d}/lora.safetensors --mode sum -o {d}/lora.safetensors --overwrite",
     USAGE, "the output is also an input"),
    ("extract over tuned", "extract --base {d}/base.safetensors --tuned {d}/tuned.safetensors "
     "-o {d}/tuned.safetensors --overwrite", USAGE, "the output is also an input"),
    ("add-difference over A", "add-difference {d}/base.safetensors {d}/tuned.safetensors {d}/base.safetensors "
     "-o {d}/base.safetensors --overwrite", USAGE, "the output is also an input"),
    ("output symlink to input", "resize {d}/lora.safetensors --rank 2 -o {d}/link.safetensors --overwrite", USAGE,
     "the output is also an input"),
    ("output hard link to input", "resize {d}/lora.safetensors --rank 2 -o {d}/hard.safetensors --overwrite", USAGE,
     "the output is also an input"),
    ("input symlink to output", "resize {d}/link.safetensors --rank 2 -o {d}/lora.safetensors --overwrite", USAGE,
     "the output is also an input"),
    ("add-difference lora as B", "add-difference {d}/base.safetensors {d}/lora.safetensors {d}/base.safetensors "
     "-o {o}", BAD_INPUT, "lora.safetensors: is a LoRA"),
    ("resize dynamic param -1", "resize {d}/lora.safetensors --dynamic sv_ratio --dynamic-param -1 -o {o}", USAGE,
     "--dynamic-param"),
    ("output folder missing", "resize {d}/lora.safetensors --rank 2 -o {d}/missing/x.safetensors", BAD_INPUT,
     "missing: the output folder does not exist"),
    ("inspect a checkpoint", "inspect {d}/base.safetensors", BAD_INPUT, "base.safetensors: is a checkpoint"),
    ("inspect an unknown file", "inspect {d}/unknown.safetensors", BAD_INPUT,
     "unknown.safetensors: is not a LoRA: none of its 1 keys"),
    # inputs of the wrong kind
    ("extract lora as base", "extract --base {d}/lora.safetensors --tuned {d}/base.safetensors -o {o}", BAD_INPUT,
     "lora.safetensors: is a LoRA"),
    ("extract lora as tuned", "extract --base {d}/base.safetensors --tuned {d}/lora.safetensors -o {o}", BAD_INPUT,
     "lora.safetensors: is a LoRA"),
    ("extract unknown as tuned", "extract --base {d}/base.safetensors --tuned {d}/unknown.safetensors -o {o}",
     BAD_INPUT, "unknown.safetensors: is not an SD1, SD2 or SDXL checkpoint"),
    ("merge-into lora as checkpoint", "merge-into {d}/lora.safetensors {d}/lora.safetensors -o {o}", BAD_INPUT,
     "lora.safetensors: is a LoRA"),
    ("merge-into checkpoint as lora", "merge-into {d}/base.safetensors {d}/base.safetensors -o {o}", BAD_INPUT,
     "base.safetensors: is a checkpoint"),
    ("merge-loras checkpoint", "merge-loras {d}/base.safetensors --rank 2 -o {o}", BAD_INPUT,
     "base.safetensors: is a checkpoint"),
    ("resize checkpoint", "resize {d}/base.safetensors -o {o}", BAD_INPUT, "base.safetensors: is a checkpoint"),
    ("resize tensors.pt", "resize {d}/tensors.pt -o {o}", BAD_INPUT, "tensors.pt: is not a LoRA"),
    ("inspect lora as model", "inspect {d}/lora.safetensors --model {d}/lora.safetensors", BAD_INPUT,
     "lora.safetensors: is a LoRA"),
    ("add-difference unknown", "add-difference {d}/unknown.safetensors {d}/unknown.safetensors "
     "{d}/unknown.safetensors -o {o}", BAD_INPUT, "unknown.safetensors: is not an SD1, SD2 or SDXL checkpoint"),
    # broken or missing files
    ("missing input", "resize {d}/nope.safetensors -o {o}", BAD_INPUT, "nope.safetensors: file not found"),
    ("directory as input", "resize {d}/dir.safetensors -o {o}", BAD_INPUT, "dir.safetensors: is a directory"),
    ("directory as checkpoint", "extract --base {d}/dir.safetensors --tuned {d}/base.safetensors -o {o}", BAD_INPUT,
     "dir.safetensors: is a directory"),
    ("empty file", "resize {d}/empty.safetensors -o {o}", BAD_INPUT, "empty.safetensors: file is empty"),
    ("truncated file", "merge-into {d}/trunc.safetensors {d}/lora.safetensors -o {o}", BAD_INPUT,
     "trunc.safetensors: not a valid safetensors file or truncated"),
    ("pickle with an object", "resize {d}/object.pt -o {o}", BAD_INPUT, "object.pt: pickle refused"),
    ("NaN in a lora", "merge-loras {d}/lora.safetensors {d}/nan.safetensors --rank 2 -o {o}", BAD_INPUT,
     "nan.safetensors: tensor 'lora_unet_input_blocks_1_1_proj_in.lora_down.weight' contains NaN"),
    ("text file as lora", "resize {d}/notes.txt -o {o}", BAD_INPUT, "notes.txt: unknown file type '.txt'"),
    ("presets folder", "merge-loras {d}/lora.safetensors --mode sum --presets {d} -o {o}", BAD_INPUT,
     "is a directory, not a presets file"),
    ("presets without a preset", "merge-into {d}/base.safetensors {d}/lora.safetensors --presets {d}/notes.txt "
     "-o {o}", BAD_INPUT, "notes.txt: holds no block-weight preset"),
    ("presets binary", "merge-loras {d}/lora.safetensors --mode sum --presets {d}/base.safetensors -o {o}",
     BAD_INPUT, "base.safetensors: not a block-weight presets file"),
    ("lora-dir missing", "merge-loras lora --lora-dir {d}/nowhere --mode sum -o {o}", BAD_INPUT,
     "nowhere: the LoRA folder (--lora-dir) does not exist"),
    ("lora name not found", "merge-loras nosuch --lora-dir {d} --mode sum -o {o}", BAD_INPUT,
     "nor a LoRA of that name in"),
    # outputs
    ("output exists", "resize {d}/lora.safetensors --rank 2 -o {d}/tuned.safetensors", BAD_INPUT,
     "tuned.safetensors: already exists"),
    ("output .ckpt", "resize {d}/lora.safetensors --rank 2 -o {d}/out.ckpt", BAD_INPUT,
     "out.ckpt: the output must be a .safetensors file"),
    ("output is a folder", "resize {d}/lora.safetensors --rank 2 -o {d}/dir.safetensors --overwrite", BAD_INPUT,
     "dir.safetensors: is a directory"),
    ("output under a file", "resize {d}/lora.safetensors --rank 2 -o {d}/lora.safetensors/x.safetensors",
     BAD_INPUT, "lora.safetensors: is not a folder"),
    ("output folder unwritable", "resize {d}/lora.safetensors --rank 2 -o /proc/x.safetensors", BAD_INPUT,
     "/proc: "),
    ("missing -o", "resize {d}/lora.safetensors", USAGE, "required: -o/--output"),
    ("chart not png", "inspect {d}/lora.safetensors --plot {d}/lora.safetensors", USAGE, "the chart is a PNG"),
    ("chart folder missing", "inspect {d}/lora.safetensors --plot {d}/missing/c.png", BAD_INPUT,
     "missing: the output folder does not exist"),
    # values
    ("negative rank", "resize {d}/lora.safetensors --rank -3 -o {o}", USAGE, "the rank (--rank) must be"),
    ("zero conv rank", "merge-loras {d}/lora.safetensors --rank 2 --conv-rank 0 -o {o}", USAGE,
     "the conv rank (--conv-rank) must be"),
    ("rank not a number", "resize {d}/lora.safetensors --rank abc -o {o}", USAGE, "--rank: invalid int value"),
    ("resize rank above every layer", "resize {d}/lora.safetensors --rank 100000 -o {o}", USAGE,
     "larger than any layer"),
    ("extract rank above every layer", "extract --base {d}/base.safetensors --tuned {d}/tuned.safetensors "
     "--rank 99999 -o {o}", USAGE, "larger than any layer"),
    ("svd rank above every layer", "merge-loras {d}/lora.safetensors --rank 99999 -o {o}", USAGE,
     "larger than any layer"),
    ("NaN ratio", "merge-loras {d}/lora.safetensors:nan --rank 2 -o {o}", USAGE, "the ratio must be a finite number"),
    ("Inf ratio", "merge-into {d}/base.safetensors {d}/lora.safetensors:inf -o {o}", USAGE,
     "the ratio must be a finite number"),
    ("NaN multiplier", "add-difference {d}/base.safetensors {d}/tuned.safetensors {d}/base.safetensors -m nan -o {o}",
     USAGE, "the multiplier (--multiplier) must be a finite number"),
    ("overflowing multiplier", "add-difference {d}/base.safetensors {d}/tuned.safetensors {d}/base.safetensors "
     "-m 1e30 -o {o} --quiet", BAD_INPUT, "the result is not finite"),  # found while writing: no progress bar
    ("overflowing ratio", "merge-into {d}/base.safetensors {d}/lora.safetensors:1e39 -o {o} --quiet", BAD_INPUT,
     "the result is not finite"),
    ("NaN min-diff", "extract --base {d}/base.safetensors --tuned {d}/tuned.safetensors --min-diff nan -o {o}", USAGE,
     "--min-diff"),
    ("negative min-diff", "extract --base {d}/base.safetensors --tuned {d}/tuned.safetensors --min-diff -1 -o {o}",
     USAGE, "--min-diff) must be at least 0"),
    ("sv_fro above 1", "resize {d}/lora.safetensors --dynamic sv_fro --dynamic-param 2 -o {o}", USAGE,
     "above 0 and at most 1"),
    ("dynamic param alone", "resize {d}/lora.safetensors --dynamic-param 2 -o {o}", USAGE,
     "--dynamic-param) needs a dynamic method"),
    ("dynamic without param", "resize {d}/lora.safetensors --dynamic sv_ratio -o {o}", USAGE, "needs its parameter"),
    ("rank with sum", "merge-loras {d}/lora.safetensors --mode sum --rank 4 -o {o}", USAGE,
     "--rank only applies to --mode svd"),
    ("clamp and no-clamp", "merge-loras {d}/lora.safetensors --rank 2 --no-clamp --clamp-quantile 0.9 -o {o}", USAGE,
     "contradict"),
    ("unknown device", "merge-loras {d}/lora.safetensors --rank 2 --device bogus -o {o}", USAGE,
     "unknown device 'bogus'"),
    ("absent device", "merge-into {d}/base.safetensors {d}/lora.safetensors --device cuda:99 -o {o}", USAGE,
     "device 'cuda:99'"),
    ("unknown block preset", "merge-into {d}/base.safetensors {d}/lora.safetensors:0.5:NOPE -o {o}", USAGE,
     "lbw preset 'NOPE'"),
    ("short block list", "add-difference {d}/base.safetensors {d}/tuned.safetensors {d}/base.safetensors "
     "--blocks 1,2 -o {o}", USAGE, "has 2 values"),
    ("bad metadata", "merge-loras {d}/lora.safetensors --mode sum --metadata novalue -o {o}", USAGE,
     "--metadata takes KEY=VALUE"),
    ("bad precision", "resize {d}/lora.safetensors --save-precision fp8 -o {o}", USAGE, "--save-precision"),
    ("unknown command", "bogus", USAGE, "invalid choice: 'bogus'"),
]


@pytest.mark.parametrize("argv, status, words", [case[1:] for case in CASES], ids=[case[0] for case in CASES])
def test_bad_command_lines_end_in_one_line_and_change_nothing(argv, status, words, folder, capsys):
    output = folder / "out.safetensors"
    before = snapshot(folder)
    code, out, err = run_cli(capsys, [part.format(d=folder, o=output) for part in argv.split()])
    assert (code, out) == (status, "")
    assert err.startswith("error: ") and err.count("\n") == 1 and words in err, err
    assert ".tmp" not in err and "Traceback" not in err
    assert snapshot(folder) == before  # no input changed, nothing (output, temporary file) was left


def test_a_file_system_error_while_writing_names_the_output(folder, capsys, monkeypatch):
    def disk_full(tensors, path, *args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", str(Path(path).parent / ".out.x1y2.tmp"))

    monkeypatch.setattr(lora_core.tools.output, "save_safetensors", disk_full)
    output = folder / "out.safetensors"
    code, _, err = run_cli(capsys, ["resize", str(folder / "lora.safetensors"), "--rank", "2", "-o", str(output),
                                    "--quiet"])
    assert code == BAD_INPUT and err == f"error: {output}: could not be written (No space left on device)\n"


def test_an_interrupt_is_one_line_too(folder, capsys, monkeypatch):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(lora_core.tools, "resize", interrupted)
    argv = ["resize", str(folder / "lora.safetensors"), "-o", str(folder / "o.safetensors")]
    try:
        code, _, err = run_cli(capsys, argv)
    except KeyboardInterrupt:  # uncaught, it would stop pytest too
        pytest.fail("Ctrl-C ended in a traceback")
    assert code == 130 and err == "error: interrupted; nothing was written\n"


def test_inspect_says_why_the_family_is_unknown(folder, capsys):
    lora = write(folder.parent / "te_only.safetensors",
                 {"lora_te_text_model_encoder_layers_0_mlp_fc1.lora_down.weight": torch.ones(2, 32),
                  "lora_te_text_model_encoder_layers_0_mlp_fc1.lora_up.weight": torch.ones(128, 2)})
    code, out, _ = run_cli(capsys, ["inspect", str(lora)])
    assert code == 0 and "modules:    1" in out
    assert "family:     unknown (neither its metadata nor its key names say SD1, SD2, SDXL, SDXL refiner or SD3)" in out


@pytest.mark.parametrize("argv, status, words", [(["--help"], 0, "merge-into"),
                                                 (["resize"], USAGE, "required: lora, -o/--output")])
def test_the_launcher_runs_from_any_directory(tmp_path, argv, status, words):
    done = subprocess.run([sys.executable, str(REPO / "lora-core.py"), *argv], capture_output=True, text=True,
                          cwd=tmp_path, timeout=120)
    assert done.returncode == status
    assert words in (done.stdout + done.stderr) and "Traceback" not in done.stderr
