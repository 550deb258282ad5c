"""Start a real A1111 WebUI (the checkout in ``A1111_DIR`` with its venv) on CPU with ``--api``, and talk to it.

Each server gets its own settings file (``--ui-settings-file``), so the suite never edits the WebUI's config.json;
the set of disabled extensions is what tells the built-in Lora run from ours.
"""
from __future__ import annotations

import base64
import fcntl
import io
import json
import os
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
from PIL import Image

EXTENSION_NAME = "sd-webui-lora-core"
BUILTIN_NAME = "Lora"
ROOT = Path(__file__).resolve().parents[2]


def webui_dir(what: str = "the end-to-end suite") -> Path:
    """``$A1111_DIR``; without it the calling test module is skipped, saying how to get one."""
    a1111 = os.environ.get("A1111_DIR")
    if not a1111:
        import pytest

        pytest.skip(f"A1111_DIR is not set: {what} needs a WebUI checkout with its venv (build one offline with "
                    "../shared/testbed/setup.sh, then A1111_DIR=$TESTBED/webui)", allow_module_level=True)
    return Path(a1111).resolve()


def checkpoint(webui: Path) -> Path:
    """The random-weight checkpoint the test bed puts into the WebUI (``A1111_CKPT`` names another one)."""
    return webui / "models" / "Stable-diffusion" / os.environ.get("A1111_CKPT", "sd15-random.safetensors")


_linked = 0  # nesting depth of extension_linked in this process


@contextmanager
def extension_linked(webui: Path) -> Iterator[None]:
    """This checkout in the WebUI's extensions folder while the block runs.

    Several checkouts of this repository (git worktrees) may test against one WebUI: the block holds an
    exclusive lock on the WebUI's extensions folder, and points the link at this checkout for its duration, so a
    server never loads another checkout's code. Nested blocks in one process share the lock.
    """
    global _linked
    link = webui / "extensions" / EXTENSION_NAME
    lock = None
    if _linked == 0:
        lock = open(webui / "extensions" / ".lora-core-e2e.lock", "w")
        fcntl.flock(lock, fcntl.LOCK_EX)  # waits for another checkout's run to finish
    _linked += 1
    made = False
    try:
        if link.is_symlink() and link.resolve() != ROOT:
            link.unlink()  # left by another checkout's run
        if not link.exists():
            link.symlink_to(ROOT)
            made = True
        yield
    finally:
        _linked -= 1
        if made and link.is_symlink():
            link.unlink()
        if lock is not None:
            lock.close()


@contextmanager
def helper_extension(webui: Path, name: str, scripts: dict[str, str]) -> Iterator[None]:
    """A temporary extension ``name`` (``scripts``: file name -> source, in its scripts/ folder) linked into the
    WebUI while the block runs (and this checkout with it, under the lock of ``extension_linked``)."""
    import shutil
    import tempfile

    folder = Path(tempfile.mkdtemp(prefix="lora-core-helper-")) / name
    (folder / "scripts").mkdir(parents=True)
    for file, source in scripts.items():
        (folder / "scripts" / file).write_text(source)
    link = webui / "extensions" / name
    with extension_linked(webui):
        if link.is_symlink():
            link.unlink()  # left by an interrupted run
        link.symlink_to(folder)
        try:
            yield
        finally:
            link.unlink()
            shutil.rmtree(folder.parent, ignore_errors=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Generation:
    png: bytes
    info: dict

    @property
    def pixels(self) -> np.ndarray:
        return np.asarray(Image.open(io.BytesIO(self.png)).convert("RGB")).astype(np.float64)

    @property
    def infotext(self) -> str:
        return self.info.get("infotexts", [""])[0]

    @property
    def params(self) -> dict:
        return self.info.get("extra_generation_params", {})


def same_pixels(a: Generation, b: Generation) -> bool:
    """Byte-for-byte image equality (the PNG files differ anyway: they carry the prompt and infotext)."""
    return bool(np.array_equal(a.pixels, b.pixels))


def psnr(a: Generation, b: Generation) -> float:
    mse = float(((a.pixels - b.pixels) ** 2).mean())
    return float("inf") if mse == 0 else 10 * np.log10(255.0 ** 2 / mse)


class WebUI:
    """One server process; ``disabled`` are extension names (folder names) to turn off for this run."""

    def __init__(self, a1111_dir: Path, ckpt: Path, disabled: list[str], workdir: Path, extra_args: list[str] = (),
                 overrides: dict | None = None, env: dict | None = None):
        self.dir = a1111_dir
        self.port = free_port()
        self.log = workdir / f"webui-{self.port}.log"
        settings = json.loads((a1111_dir / "config.json").read_text()) if (a1111_dir / "config.json").exists() else {}
        settings.update({"disabled_extensions": disabled, "disable_all_extensions": "none",
                         "auto_launch_browser": "Disable", "live_previews_enable": False,
                         "show_progress_every_n_steps": -1, "lora_functional": False,
                         # The test bed's random checkpoint has an identity final layer norm in its text encoder
                         # (weight 1, bias 0), so every cond has a mean within rounding of 0. A1111's "Original"
                         # emphasis rescales by original_mean / new_mean: where the float32 mean is exactly 0.0
                         # that is 0/0 and the sampler stops with a NansException (found with a random rank-32 TE
                         # LoRA at 0.8: ours rounded to 0.0, the built-in to 4.8e-9). "No norm" is the same
                         # computation without that rescale: for prompts without (emphasis) it gives the same
                         # images, and no NaN. Real checkpoints have a non-zero final bias; they never get there.
                         "emphasis": "No norm", **(overrides or {})})
        self.settings_file = workdir / f"config-{self.port}.json"
        self.settings_file.write_text(json.dumps(settings, indent=1))
        python = a1111_dir / "venv" / "bin" / "python"
        env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_DATASETS_OFFLINE="1",
                   GRADIO_ANALYTICS_ENABLED="False", DO_NOT_TRACK="1", PYTHONUNBUFFERED="1", **(env or {}))
        hf_home = a1111_dir.parent / "hf_home"
        if "HF_HOME" not in os.environ and hf_home.is_dir():
            env["HF_HOME"] = str(hf_home)  # the test bed's offline CLIP tokenizer/config
        cmd = [str(python), "launch.py", "--skip-prepare-environment", "--skip-install", "--skip-torch-cuda-test",
               "--skip-version-check", "--skip-python-version-check", "--use-cpu", "all", "--no-half",
               "--precision", "full", "--no-download-sd-model", "--ckpt", str(ckpt), "--api",
               "--server-name", "127.0.0.1", "--port", str(self.port),
               "--ui-settings-file", str(self.settings_file), *extra_args]
        self.proc = subprocess.Popen(cmd, cwd=a1111_dir, env=env, stdout=open(self.log, "wb"),
                                     stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
        self._wait()

    def _wait(self, timeout: float = 900) -> None:
        # A request that reaches the app before A1111 adds its middleware kills the server: poll only after
        # the log says "Startup time:".
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the WebUI died at start; log {self.log}:\n{self.log_tail()}")
            if b"Startup time:" in self.log.read_bytes():
                try:
                    self.get("/sdapi/v1/options")
                    return
                except OSError:
                    pass
            time.sleep(1)
        self.stop()
        raise RuntimeError(f"the WebUI did not start in {timeout} s; log {self.log}")

    def log_tail(self, n: int = 60) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-n:])

    def _request(self, method: str, path: str, body: dict | None = None, timeout: float = 1800):
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(f"http://127.0.0.1:{self.port}{path}", data=data, method=method,
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=timeout) as r:
            raw = r.read()
        return json.loads(raw) if raw else None

    def get(self, path: str):
        return self._request("GET", path)

    def post(self, path: str, body: dict | None = None):
        return self._request("POST", path, body or {})

    def txt2img(self, prompt: str, *, size: int = 64, steps: int = 4, seed: int = 1, **extra) -> Generation:
        payload = {"prompt": prompt, "negative_prompt": "", "width": size, "height": size, "steps": steps,
                   "seed": seed, "cfg_scale": 7.0, "sampler_name": "Euler", "scheduler": "Automatic",
                   "batch_size": 1, "n_iter": 1, "save_images": False, "send_images": True, **extra}
        res = self.post("/sdapi/v1/txt2img", payload)
        return Generation(base64.b64decode(res["images"][0].split(",", 1)[-1]), json.loads(res["info"]))

    def txt2img_all(self, payload: dict) -> tuple[list[Generation], dict]:
        base = {"negative_prompt": "", "width": 64, "height": 64, "steps": 4, "seed": 1, "cfg_scale": 7.0,
                "sampler_name": "Euler", "scheduler": "Automatic", "save_images": False, "send_images": True}
        res = self.post("/sdapi/v1/txt2img", {**base, **payload})
        info = json.loads(res["info"])
        return [Generation(base64.b64decode(i.split(",", 1)[-1]), info) for i in res["images"]], info

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
