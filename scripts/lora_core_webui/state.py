"""The one runtime per WebUI process, built lazily from the WebUI's folders and settings."""
from __future__ import annotations

import os
import threading

from modules import extensions, paths, shared

from lora_core.assist import PromptChecker
from lora_core.blocks import BlockWeights, PresetBook
from lora_core.library import LoraLibrary
from lora_core.runtime import LoraRuntime

BUILTIN_NAME = "Lora"
_lock = threading.Lock()
_runtime: LoraRuntime | None = None
_checker: PromptChecker | None = None
_block_weights: BlockWeights | None = None
_presets_stamp: tuple[float, int] | None = None


def lora_roots() -> list[str]:
    """``--lora-dir`` and ``--lyco-dir-backcompat`` (defined by the built-in's preload, which always runs)."""
    opts = shared.cmd_opts
    roots = [getattr(opts, "lora_dir", None) or os.path.join(paths.models_path, "Lora"),
             getattr(opts, "lyco_dir_backcompat", None) or os.path.join(paths.models_path, "LyCORIS")]
    os.makedirs(roots[0], exist_ok=True)
    return roots


def option(name: str, default):
    return getattr(shared.opts, name, default)


def presets_path() -> str:
    """The block-weight presets file: in the WebUI's data folder, so it survives updates of the extension."""
    return os.path.join(paths.data_path, "lora-core", "lbwpresets.txt")


def block_weights() -> BlockWeights:
    """The block-weight hook, with the presets file re-read when it changed on disk (first run: the defaults)."""
    global _block_weights, _presets_stamp
    path = presets_path()
    if not os.path.exists(path):
        PresetBook.default().save(path)
    st = os.stat(path)
    stamp = (st.st_mtime, st.st_size)
    if _block_weights is None:
        _block_weights = BlockWeights(PresetBook.load(path))
    elif stamp != _presets_stamp:
        _block_weights.presets = PresetBook.load(path)
    _presets_stamp = stamp
    return _block_weights


SWEEP_ATTRIBUTE = "lora_core_sweep"


def mark_sweep(p) -> None:
    """Mark ``p`` as one cell of a sweep (X/Y/Z plot, block analyzer): its LoRAs are applied in bypass mode, where a
    weight change from one cell to the next costs nothing (no re-merge), unless the cost model says a merge per cell
    costs less than bypass over the cell's steps. Set on the cell's copy of ``p`` only."""
    setattr(p, SWEEP_ATTRIBUTE, True)


def is_sweep(p) -> bool:
    return bool(getattr(p, SWEEP_ATTRIBUTE, False))


def runtime() -> LoraRuntime:
    global _runtime
    with _lock:
        if _runtime is None:
            library = LoraLibrary(lora_roots(), cache_size=int(option("lora_core_cache_size", 4)))
            library.refresh()
            _runtime = LoraRuntime(library, mode=option("lora_core_apply_mode", "auto"),
                                   layer_scale_factory=block_weights())
        return _runtime


def checker() -> PromptChecker:
    """The live check of the prompt boxes, over the one runtime."""
    global _checker
    current = runtime()
    with _lock:
        if _checker is None or _checker.runtime is not current:
            _checker = PromptChecker(current)
        return _checker


def builtin_lora_active() -> bool:
    """Whether the WebUI's own Lora extension is enabled in this run."""
    return any(ext.name == BUILTIN_NAME and ext.is_builtin for ext in extensions.active())
