"""The one runtime per WebUI process, built lazily from the WebUI's folders and settings."""
from __future__ import annotations

import os
import threading

from modules import extensions, paths, shared

from lora_core.library import LoraLibrary
from lora_core.runtime import LoraRuntime

BUILTIN_NAME = "Lora"
_lock = threading.Lock()
_runtime: LoraRuntime | None = None


def lora_roots() -> list[str]:
    """``--lora-dir`` and ``--lyco-dir-backcompat`` (defined by the built-in's preload, which always runs)."""
    opts = shared.cmd_opts
    roots = [getattr(opts, "lora_dir", None) or os.path.join(paths.models_path, "Lora"),
             getattr(opts, "lyco_dir_backcompat", None) or os.path.join(paths.models_path, "LyCORIS")]
    os.makedirs(roots[0], exist_ok=True)
    return roots


def option(name: str, default):
    return getattr(shared.opts, name, default)


def runtime() -> LoraRuntime:
    global _runtime
    with _lock:
        if _runtime is None:
            library = LoraLibrary(lora_roots(), cache_size=int(option("lora_core_cache_size", 4)))
            library.refresh()
            _runtime = LoraRuntime(library, mode=option("lora_core_apply_mode", "auto"))
        return _runtime


def builtin_lora_active() -> bool:
    """Whether the WebUI's own Lora extension is enabled in this run."""
    return any(ext.name == BUILTIN_NAME and ext.is_builtin for ext in extensions.active())
