"""Each prompt of a batch its own LoRAs (issue 19): the A1111 side of ``lora_core.rows``.

A1111 gives an extra network the tags of the first prompt of a batch only (``extra_networks.parse_prompts``). Here
the batch's raw prompts (``p.all_prompts``, as another extension's ``process()`` may have rewritten them) are read
again; when they differ in their tags, or a tag is ``scope=subprompt``, the runtime weights rows per image:

- conds: A1111's text-encoder cache keys on the first prompt's tags and its cond builder merges equal texts, so
  for such a batch ``p.get_conds_with_caching`` computes each subprompt (and negative prompt) with its own image's
  set, merging only texts of the same set, and nothing is cached across generations;
- UNet: the ``cfg_denoiser`` callback hands the runtime each step's row layout (``begin_cfg_step``);
- infotext: ``Lora hashes`` per image (a callable A1111 calls with the image's index).
"""
from __future__ import annotations

from modules import devices, extra_networks, prompt_parser, shared

from lora_core.rows import PromptLoras, prompt_loras, subprompt_count
from lora_core.runtime import Activation, LoraRuntime

_CACHES = ("cached_c", "cached_uc", "cached_hr_c", "cached_hr_uc")
COUNTS = "lora_core_counts"  # {hires: subprompts per image} of the conds computed here
HASHES = "lora_core_image_hashes"  # {index of the image in the generation: {name: hash}}


def raw_prompts(p, hires: bool) -> list[str] | None:
    """The raw prompts of the current batch, or None when they cannot be matched to the prompts A1111 parsed
    (a script rewrote ``p.prompts`` itself): then the batch keeps A1111's first-prompt tags."""
    source = getattr(p, "all_hr_prompts" if hires else "all_prompts", None)
    parsed = getattr(p, "hr_prompts" if hires else "prompts", None)
    size = int(getattr(p, "batch_size", 1) or 1)
    first = int(getattr(p, "iteration", 0) or 0) * size
    if not source or not parsed:
        return None
    raw = list(source[first:first + size])
    if len(raw) != len(parsed) or any(extra_networks.parse_prompt(r)[0] != s for r, s in zip(raw, parsed)):
        return None
    return raw


def per_image_loras(p, hires: bool, errors: list[str]) -> list[PromptLoras] | None:
    """Each image's tags when the batch needs rows of its own (prompts differ in tags, or a subprompt scope);
    None for one set for all (A1111's parse stands)."""
    raw = raw_prompts(p, hires)
    if raw is None:
        return None
    loras = [prompt_loras(r) for r in raw]
    if all(x == loras[0] for x in loras) and not loras[0].has_scoped:
        return None
    parsed = getattr(p, "hr_prompts" if hires else "prompts")
    for i, pl in enumerate(loras):
        if pl.has_scoped and len(pl.scoped) != subprompt_count(parsed[i]):
            errors.append(f"prompt {i + 1}: its AND subprompts could not be matched once the tags were removed; "
                          "scope=subprompt acts on the whole prompt")
            loras[i] = pl.unscoped()
    return loras


def install(p, on: bool) -> None:
    """Per-set conds for this batch (``on``), or A1111's own cached ones back."""
    if on:
        for name in _CACHES:  # private caches: A1111's shared ones key on the first prompt's tags only
            if hasattr(type(p), name):
                setattr(p, name, [None, None])
        p.get_conds_with_caching = lambda *args, **kwargs: conds_per_set(p, *args, **kwargs)
        return
    if "get_conds_with_caching" in vars(p):
        del p.get_conds_with_caching
        for name in _CACHES:
            if hasattr(type(p), name):
                setattr(p, name, getattr(type(p), name))


def conds_per_set(p, function, required_prompts, steps, caches, extra_network_data, hires_steps=None):
    """``get_conds_with_caching`` for a batch with rows of its own: every (sub)prompt through the text encoders with
    its image's set; A1111's for any other batch."""
    from .state import runtime as current

    runtime = current()
    if not runtime.per_row:
        return type(p).get_conds_with_caching(p, function, required_prompts, steps, caches, extra_network_data,
                                              hires_steps)
    old = shared.opts.use_old_scheduling
    with devices.autocast():
        if function is prompt_parser.get_multicond_learned_conditioning:
            conds = _multicond(runtime, required_prompts, steps, hires_steps, old)
            p.__dict__.setdefault(COUNTS, {})[hires_steps is not None] = [len(b) for b in conds.batch]
            return conds
        return _uncond(runtime, function, required_prompts, steps, hires_steps, old)


def _encode(runtime: LoraRuntime, done: dict, text: str, image: int, subprompt, like, steps, hires_steps, old,
            function=prompt_parser.get_learned_conditioning):
    key = (text, runtime.row_set(image, subprompt))
    if key not in done:
        with runtime.text_rows(image, subprompt):
            done[key] = function(shared.sd_model, prompt_parser.SdConditioning([text], copy_from=like), steps,
                                 hires_steps, old)[0]
    return done[key]


def _multicond(runtime: LoraRuntime, prompts, steps, hires_steps, old):
    """A1111's multicond (``prompt_parser.get_multicond_learned_conditioning``), each subprompt with its set."""
    done: dict = {}
    batch = []
    for i, prompt in enumerate(prompts):
        parts = []
        for j, sub in enumerate(prompt_parser.re_AND.split(prompt)):
            match = prompt_parser.re_weight.search(sub)
            text, weight = match.groups() if match is not None else (sub, 1.0)
            weight = float(weight) if weight is not None else 1.0
            schedules = _encode(runtime, done, text, i, j, prompts, steps, hires_steps, old)
            parts.append(prompt_parser.ComposableScheduledPromptConditioning(schedules, weight))
        batch.append(parts)
    return prompt_parser.MulticondLearnedConditioning(shape=(len(prompts),), batch=batch)


def _uncond(runtime: LoraRuntime, function, prompts, steps, hires_steps, old):
    """Negative prompts: each with its image's whole-prompt set (the built-in applies it to the whole model)."""
    done: dict = {}
    return [_encode(runtime, done, text, i, None, prompts, steps, hires_steps, old, function)
            for i, text in enumerate(prompts)]


def cfg_step(runtime: LoraRuntime, denoiser, rows: int) -> bool:
    """The step's row layout for the runtime (per-row batches only); False when it was not the expected one."""
    p = getattr(denoiser, "p", None)
    counts = (getattr(p, COUNTS, None) or {}).get(bool(getattr(p, "is_hr_pass", False)))
    return bool(counts) and runtime.begin_cfg_step(counts, rows)


def record_per_image(p, result: Activation, size: int) -> None:
    """Each image's ``Lora hashes``; once a batch of this generation had rows of its own, the infotext reads them
    per image."""
    hashes = p.__dict__.setdefault(HASHES, {})
    first = int(getattr(p, "iteration", 0) or 0) * int(getattr(p, "batch_size", 1) or 1)
    per_image = result.image_hashes or [result.hashes] * size
    for k, h in enumerate(per_image):
        hashes.setdefault(first + k, {}).update(h)


def hashes_of(p, index: int = 0, **_) -> str | None:
    found = getattr(p, HASHES, {}).get(index)
    return ", ".join(f"{k}: {v}" for k, v in found.items()) if found else None
