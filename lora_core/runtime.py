"""One generation's LoRAs on one loaded model: parse, resolve, load, plan, apply; per-step schedules.

The WebUI glue calls ``activate`` with the prompt items A1111 parsed, ``step`` from its per-step callback, and
``restore`` when LoRAs are gone; everything a person must see comes back as messages, never as exceptions:
a bad item, an unknown name, a broken file or a LoRA for another model is skipped and the rest still applies.

Apply mode (``auto``): a set used with the same weights by the previous generation is merged (no per-step cost);
anything whose weights change within a pass (schedules, start/stop) runs in bypass, where a multiplier change is
free; a new set, a new weight and each cell of an X/Y/Z sweep run in bypass unless the cost model says a merge (for
a sweep: a merge per cell) costs less than bypass over the pass (large images, many steps, GPUs: ``cost``).
"""
from __future__ import annotations

import itertools
import logging
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Callable, Sequence

from torch import nn

from .cost import REMERGE, Workload, device_costs, estimate
from .errors import LoraError, LoraNotFoundError
from .library import LoraEntry, LoraLibrary
from .memory import compute_device, host_bytes_free
from .merge import param_paths
from .model_index import ModelIndex, Target
from .network import Network, load_network
from .patch import Patcher, PlanEntry
from .rows import PromptLoras, RowRouter, RowSets
from .syntax import MAX_TAGS, LoraRequest, active_at, parse_lora_items

log = logging.getLogger("lora_core")

APPLY_MODES = ("auto", "merged", "bypass")
#: bytes of full-size bypass deltas (algorithms without a low-rank form) a generation may hold, also the size of
#: the Patcher's cache of prepared deltas; lowered per device to what it can spare (``memory.MemoryPolicy``)
DEFAULT_BYPASS_BUDGET = 2 << 30
#: host memory a merge leaves free after its backups (the WebUI, the next checkpoint load)
HOST_RESERVE = 1 << 30
LayerScale = Callable[[Target], float]
#: builds the per-layer multiplier of a request (block weights); returns None (no scaling) or raises ValueError
LayerScaleFactory = Callable[[LoraRequest, Network, ModelIndex], "LayerScale | None"]

_HASH_NAME_DROP = str.maketrans("", "", ":,")


@dataclass
class ActiveLora:
    request: LoraRequest
    entry: LoraEntry
    network: Network
    layer_scale: LayerScale | None = None


@dataclass
class Activation:
    """What ``activate`` did: the LoRAs in use, the mode, the problems (one line each) and the infotext hashes."""

    active: list[ActiveLora] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    hashes: dict[str, str] = field(default_factory=dict)
    mode: str = "none"
    reason: str = ""  # why this mode (for the console)
    notes: list[str] = field(default_factory=list)  # keys a file has that were not used (for the console)
    image_hashes: list[dict[str, str]] | None = None  # per image of a batch whose images have their own LoRAs


def too_many_tags(count: int) -> str:
    """The error of a generation whose prompt has more than ``MAX_TAGS`` LoRA tags."""
    return f"{count} LoRA tags in one prompt: the first {MAX_TAGS} are used, the other {count - MAX_TAGS} are skipped"


def item_error(request: LoraRequest, problem: object) -> str:
    """The error line of a LoRA that parsed but cannot be used (unknown name, unreadable file, bad block weights)."""
    return f"<lora:{request.raw or request.name}>: {problem}"


class LoraRuntime:
    def __init__(self, library: LoraLibrary, mode: str = "auto",
                 layer_scale_factory: LayerScaleFactory | None = None, bypass_budget: int = DEFAULT_BYPASS_BUDGET):
        self.library = library
        self.mode = mode
        self.bypass_budget = bypass_budget
        self.layer_scale_factory = layer_scale_factory
        self.index: ModelIndex | None = None
        self.patcher: Patcher | None = None
        self._model_token = ""
        self._tokens = itertools.count()
        self._active: list[ActiveLora] = []
        self._hires = False
        self._applied_mode = "none"
        self._last_set: tuple | None = None  # (files, weights) of the last generation, for `auto`
        self._rescanned = False  # the folders were re-scanned for an unknown name in this generation
        self._router: RowRouter | None = None  # per-row sets of this pass (None: every row alike)
        self._slot_of: dict[int, int] = {}  # id(ActiveLora) -> its per-row slot

    def set_bypass_budget(self, nbytes: int) -> None:
        """Bytes of full-size bypass deltas a generation may hold (and the size of the prepared-delta cache)."""
        self.bypass_budget = max(0, int(nbytes))
        if self.patcher is not None:
            self.patcher.cache.budget = self.bypass_budget

    # ------------------------------------------------------------------ the model
    @property
    def root(self) -> nn.Module | None:
        return None if self.index is None else self.index.root

    def bind(self, root: nn.Module) -> None:
        """Use ``root`` from now on (a model switch): restore the previous model first if it is another one."""
        if self.index is not None and self.index.root is root:
            return
        if self.patcher is not None:
            self.patcher.restore()
        self._new_index(root)

    def model_reloaded(self, root: nn.Module) -> None:
        """The host replaced the weights of ``root`` in place (checkpoint switch into the same object).

        The backups are of the old weights, so they must not be written back: hooks are removed and the
        backups dropped, and the index is rebuilt (the host may have re-wrapped the text encoders).
        """
        if self.patcher is not None:
            self.patcher.forget()
        self._new_index(root)

    def _new_index(self, root: nn.Module) -> None:
        self.index = ModelIndex(root)
        self.patcher = Patcher(self.index, cache_budget=self.bypass_budget)
        self._model_token = f"model{next(self._tokens)}"
        self._active = []
        self._applied_mode = "none"
        self._last_set = None
        self.library.clear_cache()

    # ------------------------------------------------------------------ a generation
    def activate(self, items_list: Sequence[Sequence[str]], *, hires: bool = False,
                 total_steps: int | None = None, sweep: bool = False,
                 workload: Workload | None = None) -> Activation:
        """Apply the LoRAs of one generation (or of its hires pass); never raises for bad input.

        ``workload`` (the pass's UNet calls and rows) lets ``auto`` merge a new set at once where merging costs
        less than bypass over the pass (large images, many steps); without it a new set runs in bypass.
        """
        result = Activation()
        if self.index is None or self.patcher is None:
            result.errors.append("no model is loaded")
            return result
        active: list[ActiveLora] = []
        self._rescanned = False
        if len(items_list) > MAX_TAGS:
            result.errors.append(too_many_tags(len(items_list)))
        for items in items_list[:MAX_TAGS]:
            found = self._prepare(items, result)
            if found is not None:
                active.append(found)
        self._uniform_rows()
        self._active = active
        self._hires = hires
        self.patcher.new_generation()
        mode, result.reason = self._choose_mode(active, sweep, workload)
        self._apply(active, mode, 0, total_steps or 1, result)
        result.active = list(self._active)
        result.mode = self._applied_mode
        result.hashes = _hashes(result.active)
        return result

    def activate_batch(self, prompts: Sequence[PromptLoras], *, hires: bool = False, total_steps: int | None = None,
                       sweep: bool = False, workload: Workload | None = None) -> Activation:
        """Apply the LoRAs of a batch whose images (or ``AND`` subprompts) have their own (see ``rows``).

        A batch whose prompts all carry the same tags, none scoped to a subprompt, is ``activate``: merged mode stays
        available. Otherwise every LoRA of the batch runs in bypass with a per-row slot; the Patcher weights each
        row by its image's set (``RowSets``), the UNet's rows through ``begin_cfg_step``, the text encoders' through
        ``text_rows``. ``result.image_hashes`` lists each image's LoRAs.
        """
        if not prompts:
            return self.activate([], hires=hires, total_steps=total_steps, sweep=sweep, workload=workload)
        if all(p == prompts[0] for p in prompts) and not prompts[0].has_scoped:
            result = self.activate([list(i) for i in prompts[0].whole], hires=hires, total_steps=total_steps,
                                   sweep=sweep, workload=workload)
            result.image_hashes = [dict(result.hashes) for _ in prompts]
            return result
        result = Activation()
        if self.index is None or self.patcher is None:
            result.errors.append("no model is loaded")
            return result
        distinct: list[tuple[str, ...]] = []
        for p in prompts:
            for items in (*p.whole, *(i for scoped in p.scoped for i in scoped)):
                if items not in distinct:
                    distinct.append(items)
        if len(distinct) > MAX_TAGS:
            result.errors.append(f"{len(distinct)} different LoRA tags in one batch: the first {MAX_TAGS} are used, "
                                 f"the other {len(distinct) - MAX_TAGS} are skipped")
        self._rescanned = False
        active: list[ActiveLora] = []
        slot_by_items: dict[tuple[str, ...], int] = {}
        for items in distinct[:MAX_TAGS]:
            found = self._prepare(list(items), result)
            if found is not None:
                slot_by_items[items] = len(active)
                active.append(found)
        sets = RowSets.of(prompts, slot_by_items, len(active))
        self._uniform_rows()
        self._active = active
        self._slot_of = {id(lora): slot for slot, lora in enumerate(active)}
        self._router = RowRouter(sets)
        self._hires = hires
        self._last_set = None  # the next uniform generation is a new set
        self.patcher.new_generation()
        result.reason = ("the images of the batch have different LoRAs" if any(p.whole != prompts[0].whole
                                                                                for p in prompts)
                         else "a LoRA acts on one AND subprompt") + " (per-row bypass)"
        self._apply(active, "bypass", 0, total_steps or 1, result)
        self.patcher.set_rows(self._router.default)
        self.patcher.route_rows(self._unet(), self._router.rows_of_call)
        result.active = list(self._active)
        result.mode = self._applied_mode
        result.hashes = _hashes(result.active)
        kept = {id(lora) for lora in self._active}
        result.image_hashes = [_hashes([active[s] for s in sets.uses(i) if id(active[s]) in kept])
                               for i in range(len(prompts))]
        return result

    @property
    def per_row(self) -> bool:
        """Whether this pass weights rows by their image's (or subprompt's) set."""
        return self._router is not None and bool(self._active)

    def begin_cfg_step(self, counts: Sequence[int], rows: int) -> bool:
        """A CFG denoiser step over ``rows`` rows for images of ``counts[i]`` subprompts: the UNet calls until the
        next step take their rows' weights from this layout. False when the layout is not the expected one (the
        calls then get the first image's set)."""
        return self._router is not None and self._router.begin_step(counts, rows)

    def row_set(self, image: int, subprompt: int | None = None) -> frozenset:
        """What acts on a row of image ``image`` (subprompt None: its uncond rows), hashable: equal for rows that
        compute alike (the WebUI glue merges equal texts of one set)."""
        if self._router is None:
            return frozenset()
        return frozenset(self._router.sets.of_row(image, subprompt).items())

    @contextmanager
    def text_rows(self, image: int, subprompt: int | None = None):
        """Within: the text encoders compute with image ``image``'s set (with ``subprompt``'s scoped LoRAs; None:
        the negative prompt, whose rows follow the image's whole-prompt set)."""
        if self._router is None or self.patcher is None:
            yield
            return
        self.patcher.set_rows(self._router.text(image, subprompt))
        try:
            yield
        finally:
            self.patcher.set_rows(self._router.default)

    def _uniform_rows(self) -> None:
        self._router = None
        self._slot_of = {}
        if self.patcher is not None:
            self.patcher.unroute()

    def _unet(self) -> nn.Module:
        prefix = next(c.prefix for c in self.index.components if c.kind == "unet")
        return self.index.root.get_submodule(prefix.rstrip("."))

    def step(self, step: int, total_steps: int) -> None:
        """Called before each sampling step: updates scheduled multipliers (free in bypass mode)."""
        if self.patcher is None or not self._active or self._applied_mode != "bypass":
            return
        if all(lora.request.is_static() for lora in self._active):
            return
        self.patcher.apply(self._plan(self._active, step, total_steps), "bypass", self._te_mode())

    def restore(self) -> None:
        self._active = []
        self._applied_mode = "none"
        self._router = None
        self._slot_of = {}
        if self.patcher is not None:
            self.patcher.restore()

    # ------------------------------------------------------------------ internals
    def _prepare(self, items: Sequence[str], result: Activation) -> ActiveLora | None:
        parsed = parse_lora_items(list(items))
        result.errors.extend(parsed.warnings)
        request = parsed.request
        if request is None:
            return None
        try:
            entry = self.resolve(request.name)
            network = self.load(entry)
            scale = self._layer_scale(request, network)
        except (LoraError, ValueError) as e:
            result.errors.append(item_error(request, e))
            return None
        except Exception as e:  # a bug or an odd file must not stop the generation; say what it was
            log.exception("lora-core: unexpected error preparing %s", request.raw or request.name)
            result.errors.append(item_error(request, f"unexpected {type(e).__name__}: {e}"))
            return None
        report = network.report
        if report.unmatched or report.unknown or report.unused or report.problems:
            result.notes.append(f"{entry.path}: {report.summary()}")
        return ActiveLora(request, entry, network, scale)

    def _layer_scale(self, request: LoraRequest, network: Network) -> LayerScale | None:
        """The request's block weights. Bad ones (an unknown preset or block, a list of the wrong length) raise
        ValueError: the LoRA is skipped with that error, like any other malformed item (a typo must not give an
        image the person did not ask for)."""
        if self.layer_scale_factory is None or not (request.lbw or request.lbwe):
            return None
        return self.layer_scale_factory(request, network, self.index)

    def resolve(self, name: str) -> LoraEntry:
        """The entry of a name; the folders are re-scanned (once per generation) when the name is not known yet."""
        try:
            return self.library.resolve(name)
        except LoraNotFoundError:
            if self._rescanned:
                raise
            self._rescanned = True
            self.library.refresh()  # a file added since the last scan is found without a restart
            return self.library.resolve(name)

    def load(self, entry: LoraEntry) -> Network:
        """The file mapped onto the bound model, through the library's LRU cache (a changed file is re-read)."""
        if self.index is None:
            raise LoraError("no model is loaded")
        index = self.index
        return self.library.load(entry, lambda e: load_network(e.path, index, name=e.name), kind=self._model_token)

    def _choose_mode(self, active: list[ActiveLora], sweep: bool,
                     workload: Workload | None = None) -> tuple[str, str]:
        """The mode and why. ``auto``: bypass until a set proves steady, then merged.

        - weights that change within a pass (schedules, start/stop): bypass, where a multiplier change is free;
        - a set of files and weights not used by the previous generation (a new LoRA, a new weight, switching
          back and forth): bypass, whose cost is a few percent per step on a CPU and 30-90% on a GPU, where that
          costs less over the pass than a merge (small images, few steps: see ``cost``), else merged at once;
        - a cell of a sweep (X/Y/Z plot, block analyzer; ``sweep``): the same, with a merge priced as a re-merge
          (``cost.REMERGE``: the previous cell's weights are written back first); never "steady";
        - the same files and weights as the previous generation: merged, so every later generation has no
          per-step cost;
        - the hires pass keeps the first pass's mode when its set is the same;
        - memory: bypass of deltas without a factored form (a grouped conv, a norm layer, MultiheadAttention...) holds
          full-size deltas on the device that computes; beyond what it can spare (``Patcher.device_budget``) such
          a set is merged instead. A merge keeps the originals of the touched weights in host memory: where the
          host has not that much to spare, bypass it is (deltas beyond the budget are then computed per call).
        """
        if self.mode in ("merged", "bypass"):
            return self.mode, "set in the settings"
        files = tuple((lora.entry.path, lora.request.dyn, lora.request.lbw, lora.request.lbwe) for lora in active)
        weights = tuple(lora.request.pass_weights(self._hires) for lora in active)
        key = (files, weights)
        if self._hires:
            same = key == self._last_set and self._applied_mode != "none"
            mode = self._applied_mode if same else "bypass"
            reason = "the first pass's mode" if same else "the hires pass has its own LoRAs or weights"
        else:
            previous, self._last_set = self._last_set, key
            static = all(lora.request.is_static() for lora in active)
            if static and not sweep and key == previous:
                mode, reason = "merged", "the same LoRAs and weights as the last generation"
            elif static and active and workload is not None and self._merging_is_cheaper(active, workload, sweep):
                mode, reason = "merged", (f"a merge {'per cell ' if sweep else ''}costs less than bypass over "
                                          f"{workload.calls} steps at this size")
            else:
                mode = "bypass"
                reason = ("weights change within the generation" if not static
                          else "a sweep: a multiplier change costs nothing" if sweep
                          else "a new set of LoRAs or weights")
        if not active:
            return mode, reason
        device = compute_device(self.index.root.parameters())
        if mode == "bypass":
            dense = sum(lora.network.dense_bypass_bytes(self.index, lora.request.dyn) for lora in active)
            budget = self.patcher.device_budget(device)
            if dense > budget:
                mode = "merged"
                reason = (f"bypass would hold {dense / 2**20:.0f} MiB of full-size deltas, {device} can spare "
                          f"{budget / 2**20:.0f} MiB")
        if mode == "merged":
            need = self._backup_bytes(active)
            free = host_bytes_free()
            if free is not None and need > free - HOST_RESERVE:
                mode = "bypass"
                reason = (f"merging would keep {need / 2**20:.0f} MiB of original weights in host memory, "
                          f"{max(0, free - HOST_RESERVE) / 2**20:.0f} MiB are free")
        return mode, reason

    def _backup_bytes(self, active: list[ActiveLora]) -> int:
        """Host bytes a merge of this set would add in backups (float8 layers stay in bypass; so do text encoders in
        ``auto``; a layer that holds a merge already has its backup): at most the touched weights and biases,
        counted once per layer."""
        te_bypass = self._te_mode() == "bypass"
        seen: set[str] = set()
        total = 0
        for lora in active:
            for target in lora.network.adapters:
                if target.module in seen or target.module not in self.index.modules:
                    continue
                seen.add(target.module)
                if te_bypass and self.index.is_text_encoder(target) or self.patcher.backed_up(target.module):
                    continue
                for owner, attr in param_paths(self.index.modules[target.module]).values():
                    t = getattr(owner, attr, None)
                    if t is not None and t.element_size() > 1:
                        total += t.numel() * t.element_size()
        return total

    def _merging_is_cheaper(self, active: list[ActiveLora], workload: Workload, again: bool = False) -> bool:
        """Whether merging this set costs less than bypass over ``workload``; ``again``: a re-merge (a sweep)."""
        costs = [c for lora in active for c in lora.network.unet_costs(self.index, lora.request.dyn)]
        weight = next(self.index.root.parameters(), None)
        device = weight.device if weight is not None else None
        if not costs or device is None:
            return False
        bypass, merge = estimate(costs, workload, device_costs(device))
        return merge * (REMERGE if again else 1.0) < bypass

    def _te_mode(self) -> str | None:
        """``auto`` keeps text-encoder layers in bypass: they run once per prompt, a merge would only cost."""
        return "bypass" if self.mode == "auto" else None

    def _plan(self, active: list[ActiveLora], step: int, total_steps: int) -> list[PlanEntry]:
        plan: list[PlanEntry] = []
        for lora in active:
            te_s, unet_s = lora.request.pass_weights(self._hires)
            on = active_at(lora.request, step, total_steps)
            te = te_s.value_at(0, total_steps)  # the text encoders run once, before the first step
            unet = unet_s.value_at(step, total_steps) if on else 0.0
            plan.extend(lora.network.plan(self.index, te, unet, lora.request.dyn, lora.layer_scale,
                                          self._slot_of.get(id(lora))))
        return plan

    def _apply(self, active: list[ActiveLora], mode: str, step: int, total: int, result: Activation) -> None:
        try:
            self.patcher.apply(self._plan(active, step, total), mode, self._te_mode())
            self._applied_mode = mode if active else "none"
            return
        except LoraError as e:
            first_error = e
        # something in the set cannot be applied (e.g. non-finite weights): find which, apply the rest
        kept: list[ActiveLora] = []
        for lora in active:
            try:
                self.patcher.apply(self._plan(kept + [lora], step, total), mode, self._te_mode())
                kept.append(lora)
            except LoraError as e:
                result.errors.append(item_error(lora.request, e))
        if len(kept) == len(active):
            result.errors.append(str(first_error))
        self.patcher.apply(self._plan(kept, step, total), mode, self._te_mode())
        self._active = kept
        self._applied_mode = mode if kept else "none"


def _hashes(active: Sequence[ActiveLora]) -> dict[str, str]:
    """Infotext ``Lora hashes`` as the built-in writes them: name (without ``:`` and ``,``) -> short hash."""
    return {lora.request.name.translate(_HASH_NAME_DROP): lora.entry.shorthash for lora in active
            if lora.entry.shorthash}
