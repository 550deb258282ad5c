"""Registration with the WebUI: the extra network, model changes, per-step schedules, settings, API, paste."""
from __future__ import annotations

import re

import gradio as gr
from fastapi import FastAPI, HTTPException, Request
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool

from modules import extra_networks, script_callbacks, shared

from lora_core import assist, inspect
from lora_core.errors import LoraError

from . import analyzer, batch, lbw_tab, state, tools_tab, xyz
from .extra_network import ExtraNetworkLoraCore

SECTION = ("lora_core", "LoRA (lora-core)")


def register() -> None:
    script_callbacks.on_before_ui(before_ui)
    script_callbacks.on_model_loaded(model_loaded)
    script_callbacks.on_cfg_denoiser(cfg_denoiser)
    script_callbacks.on_app_started(app_started)
    script_callbacks.on_infotext_pasted(infotext_pasted)
    script_callbacks.on_ui_settings(ui_settings)
    script_callbacks.on_script_unloaded(unloaded)
    script_callbacks.on_ui_tabs(lbw_tab.on_ui_tabs)
    script_callbacks.on_ui_tabs(tools_tab.on_ui_tabs)


_network = None


def register_network() -> None:
    """Make ``lora`` and ``lyco`` ours. Called in ``before_ui`` and again at ``app_started``: the built-in Lora, when
    enabled, registers its own in ``before_ui`` and callback order is not guaranteed, so the last word must be ours;
    the built-in then is never asked to apply anything."""
    global _network
    if _network is None:
        _network = ExtraNetworkLoraCore()
    extra_networks.register_extra_network(_network)
    extra_networks.register_extra_network_alias(_network, "lyco")


def before_ui() -> None:
    register_network()
    xyz.add_axes()  # the X/Y/Z plot builds its axis list into its UI: add ours first
    analyzer.register_script()
    if not state.builtin_lora_active():
        from modules import ui_extra_networks

        from .cards import ExtraNetworksPageLoraCore

        ui_extra_networks.register_page(ExtraNetworksPageLoraCore())


def model_loaded(sd_model) -> None:
    runtime = state.runtime()
    if runtime.root is sd_model:
        runtime.model_reloaded(sd_model)  # new weights in the same object: our backups are stale
    else:
        runtime.bind(sd_model)  # another object: the previous one is restored first


_said_layout: list = []


def cfg_denoiser(params) -> None:
    denoiser = getattr(params, "denoiser", None)
    step = getattr(denoiser, "step", None)
    total = getattr(denoiser, "total_steps", None)
    if step is None or not total:  # A1111's sampling_step lags one step behind; the denoiser's counter does not
        step, total = params.sampling_step, params.total_sampling_steps
    runtime = state.runtime()
    runtime.step(int(step), int(total))
    if runtime.per_row and not batch.cfg_step(runtime, denoiser, int(params.x.shape[0])) and not _said_layout:
        _said_layout.append(True)
        print("[lora-core] this sampler's batch layout is not the CFG denoiser's: every row of this batch gets the "
              "first prompt's LoRAs (as the built-in does)")


def unloaded() -> None:
    state.runtime().restore()


def ui_settings() -> None:
    opts = shared.opts
    opts.add_option("lora_core_apply_mode", shared.OptionInfo(
        "auto", "How LoRAs are applied", gr.Radio, {"choices": ["auto", "merged", "bypass"]}, section=SECTION,
    ).info("auto: bypass for a new LoRA or weight (no wait before the first step), merged from the second "
           "generation with the same LoRAs and weights (no per-step cost), bypass while weights change within a run "
           "(schedules, start/stop, sweeps); every mode restores the model exactly"))
    opts.add_option("lora_core_cache_size", shared.OptionInfo(
        4, "LoRA files kept loaded in memory", gr.Number, {"precision": 0}, section=SECTION))
    opts.add_option("lora_core_bypass_memory_mb", shared.OptionInfo(
        2048, "Memory for full-size bypass deltas (MB)", gr.Number, {"precision": 0}, section=SECTION,
    ).info("LoHa, LoKr on convolutions, DoRA, IA3, OFT have no low-rank form: in bypass they hold a delta as big "
           "as the layer; a set that needs more than this is merged instead"))
    opts.add_option("lora_core_ui_warnings", shared.OptionInfo(
        True, "Show LoRA problems as popups (they are always in the generation parameters)", section=SECTION))
    if state.builtin_lora_active():
        return
    # The built-in defines these; with it disabled, the cards page and infotext still read them: offer them here.
    section = ("extra_networks", "Extra Networks")
    opts.add_option("lora_preferred_name", shared.OptionInfo(
        "Alias from file", "Name a LoRA in the prompt by its", gr.Radio,
        {"choices": ["Alias from file", "Filename"]}, section=section))
    opts.add_option("lora_add_hashes_to_infotext", shared.OptionInfo(True, "Write the LoRA hashes into the generation parameters", section=section))
    opts.add_option("lora_show_all", shared.OptionInfo(
        False, "Show every LoRA card, also those made for another model family", section=section))
    opts.add_option("lora_hide_unknown_for_versions", shared.OptionInfo(
        [], "Hide LoRA cards of unknown family when this model family is loaded", gr.CheckboxGroup,
        {"choices": ["SD1", "SD2", "SDXL"]}, section=section))


def app_started(_demo, app: FastAPI) -> None:
    register_network()
    if not state.builtin_lora_active():  # the built-in serves these when it is enabled
        @app.get("/sdapi/v1/loras")
        async def get_loras():
            return [inspect.listing(entry) for entry in state.runtime().library.entries]

        @app.post("/sdapi/v1/refresh-loras")
        async def refresh_loras():
            state.runtime().library.refresh()

    @app.get("/lora-core/v1/inspect")
    def inspect_lora(name: str):
        try:
            return inspect.describe(state.runtime(), name)
        except LoraError as e:
            raise HTTPException(status_code=404, detail=str(e)) from e

    @app.post("/lora-core/v1/check")
    async def check_prompt(request: Request):
        """The live check of the prompt boxes: ``{"prompt": "...", "negative": false}`` -> per-tag spans, status and
        the messages a generation would put in ``Lora errors``; a malformed body gets 400 and a message."""
        body = await request.body()
        status, answer = await run_in_threadpool(_check, body)
        return JSONResponse(answer, status_code=status)

    @app.get("/lora-core/v1/completions")
    def completions():
        """What completion offers: LoRA names (SD-version filter as on the cards), presets, keys."""
        weights = state.block_weights()
        return assist.completion_lists(
            state.runtime().library, weights.presets.names(), list(weights.elemental),
            prefer_filename=state.option("lora_preferred_name", "Alias from file") == "Filename",
            hidden=_hidden_for_model())


def _check(body: bytes):
    state.block_weights()  # the presets file re-read if it changed, as a generation does
    return assist.check_payload(state.checker(), body)


def _hidden_for_model():
    """The cards' SD-version filter for the model the runtime is bound to (None: show all)."""
    from .cards import UNKNOWN, VERSION_LABELS, hidden_for_model

    index = state.runtime().index
    if state.option("lora_show_all", False) or index is None or index.family not in VERSION_LABELS:
        return None
    model_version = VERSION_LABELS[index.family]

    def hidden(entry) -> bool:
        sidecar = extra_networks.get_user_metadata(str(entry.path))  # the card's own choice wins, as on the cards
        chosen = sidecar.get("sd version") if isinstance(sidecar, dict) else None
        version = chosen if chosen in VERSION_LABELS.values() else VERSION_LABELS.get(entry.sd_version, UNKNOWN)
        return hidden_for_model(version, model_version)

    return hidden


_LORA_NAME = re.compile(r"<lora:([^:>]+):")


def infotext_pasted(_infotext: str, params: dict) -> None:
    """Pasted parameters name LoRAs as their writer had them: map them back through ``Lora hashes``."""
    if state.builtin_lora_active() or not params.get("Lora hashes") or "Prompt" not in params:
        return
    hashes = {}
    for part in str(params["Lora hashes"]).split(","):
        name, _, short = part.partition(":")
        if short.strip():
            hashes[name.strip()] = short.strip()
    library = state.runtime().library

    def replace(m: re.Match) -> str:
        short = hashes.get(m.group(1))
        entry = library.by_hash(short) if short else None
        return m.group(0) if entry is None else f"<lora:{library.prompt_name(entry)}:"

    params["Prompt"] = _LORA_NAME.sub(replace, params["Prompt"])
