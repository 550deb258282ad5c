"""``<lora:...>`` (and ``<lyco:...>``) as an A1111 extra network, backed by the lora_core runtime."""
from __future__ import annotations

import logging
import random

from modules import extra_networks, shared

from lora_core.cost import Workload
from lora_core.runtime import Activation

from . import batch, embeddings, state

log = logging.getLogger("lora_core")
ERRORS_KEY = "Lora errors"
_noted: set[str] = set()
HASHES_KEY = "Lora hashes"


def _pass_steps(p, hires: bool) -> int:
    if hires:
        return int(getattr(p, "hr_second_pass_steps", 0) or getattr(p, "steps", 1) or 1)
    return int(getattr(p, "steps", 1) or 1)


def _workload(p) -> Workload | None:
    """The first pass as the sampler will run it: steps, and latent rows per UNet call (prompt and negative
    are one batch). The hires pass keeps the first pass's mode, so it needs none."""
    try:
        rows = (int(p.width) // 8) * (int(p.height) // 8) * max(1, int(getattr(p, "batch_size", 1) or 1)) * 2
        return Workload(calls=_pass_steps(p, False), rows=rows)
    except (AttributeError, TypeError, ValueError):
        return None


def _warn(message: str) -> None:
    """A popup in the UI when the generation came from the UI; API calls have no page to show it on."""
    if not state.option("lora_core_ui_warnings", True):
        return
    try:
        import gradio as gr

        gr.Warning(message)
    except Exception:  # outside a Gradio request there is nothing to show it on
        pass


def record(p, result: Activation, hires: bool, per_row: bool = False) -> None:
    """Infotext exactly as the built-in writes it (``Lora hashes``), plus ``Lora errors`` when anything failed; per
    image once a batch of the generation gave its images LoRAs of their own."""
    if state.option("lora_add_hashes_to_infotext", True):
        batch.record_per_image(p, result, len(getattr(p, "prompts", None) or [0]))
        if per_row:
            p.lora_core_per_image = True
        if getattr(p, "lora_core_per_image", False):  # A1111 calls it with each image's index
            p.extra_generation_params[HASHES_KEY] = batch.hashes_of
        else:
            if not hires or not hasattr(p, "lora_hashes"):
                p.lora_hashes = {}
            p.lora_hashes.update(result.hashes)
            if p.lora_hashes:
                p.extra_generation_params[HASHES_KEY] = ", ".join(f"{k}: {v}" for k, v in p.lora_hashes.items())
    if not result.errors:
        return
    seen = p.__dict__.setdefault("lora_core_errors", {})  # one list per generation, every batch and pass
    new = [e for e in result.errors if e not in seen]
    for error in new:
        seen[error] = None
        p.comment(f"Lora: {error}")
        print(f"[lora-core] {error}")
        _warn(f"Lora: {error}")
    p.extra_generation_params[ERRORS_KEY] = "; ".join(seen)


_said_mode: tuple[str, str] | None = None


def _say_mode(result: Activation) -> None:
    """The apply mode and why, on the console when it changes (``merged: the same LoRAs and weights as the last
    generation``; memory decisions name the device and what it could spare)."""
    global _said_mode
    said = (result.mode, result.reason)
    if result.active and said != _said_mode:
        print(f"[lora-core] {result.mode}: {result.reason}")
    _said_mode = said if result.active else None


class ExtraNetworkLoraCore(extra_networks.ExtraNetwork):
    def __init__(self):
        super().__init__("lora")
        self._unfinished = False  # activated, not yet deactivated: a generation in progress (or one that failed)

    def activate(self, p, params_list):
        runtime = state.runtime()
        runtime.bind(shared.sd_model)
        runtime.mode = state.option("lora_core_apply_mode", "auto")
        runtime.library.set_cache_size(int(state.option("lora_core_cache_size", 4)))
        runtime.set_bypass_budget(int(state.option("lora_core_bypass_memory_mb", 2048)) << 20)
        hires = bool(getattr(p, "is_hr_pass", False))
        items = [list(params.items) for params in params_list]
        if not hires:
            if self._unfinished and runtime.patcher.active:
                # an error or an interrupt stopped the last generation before deactivate: its LoRAs are still
                # on the model (and recorded in the runtime); this generation re-plans from them
                print("[lora-core] the previous generation did not finish (an error?): its LoRAs are re-planned "
                      "for this one, the model is restored where they are not wanted")
            self._unfinished = True
        errors: list[str] = []
        per_image = batch.per_image_loras(p, hires, errors)  # None: one set for the batch (A1111's parse)
        if not items and per_image is None and not runtime.patcher.active and not embeddings.registered():
            batch.install(p, False)
            return
        if not hires:  # R and U block weights are drawn per generation, reproducibly from its seed
            seeds = getattr(p, "all_seeds", None) or [getattr(p, "seed", 0)]
            state.block_weights().new_generation(random.Random(f"{seeds[0]}:{getattr(p, 'iteration', 0)}"))
        kwargs = dict(hires=hires, total_steps=_pass_steps(p, hires), sweep=state.is_sweep(p),
                      workload=None if hires else _workload(p))
        if per_image is None:
            result = runtime.activate(items, **kwargs)
        else:
            result = runtime.activate_batch(per_image, **kwargs)
        result.errors[:0] = errors
        batch.install(p, runtime.per_row)
        embeddings.sync(result.active, result.errors)
        for note in result.notes:
            if note not in _noted:  # once per file version and process, not every generation
                _noted.add(note)
                print(f"[lora-core] {note}")
        _say_mode(result)
        record(p, result, hires, runtime.per_row)

    def deactivate(self, p):
        # The set stays applied until the next generation asks for another (often the same one: no work).
        self._unfinished = False
