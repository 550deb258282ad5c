"""The "LoRA Block Weight" tab: the block-weight presets (list, slider editor, add / overwrite / delete, the whole
file to edit, save and reload, import of LBW's ``lbwpresets.txt``) and the static block-influence chart of a LoRA.

The presets file is ``state.presets_path()`` (the WebUI's data folder, so it survives updates; the defaults of SPEC
§4 are written on first run). Every action reads the file afresh and writes it back at once, so edits made
elsewhere (a text editor, another browser tab) are never overwritten by a stale copy; generations pick the new
file up by themselves (``state.block_weights()`` re-reads it when it changes).

The editor's weights text is the source of truth: a slider writes its number into it; ``R``, ``U`` and ``X+n``
values stay as written (their slider shows 1 and names the value in its label).
"""
from __future__ import annotations

import html

import gradio as gr
import pandas as pd

from modules import shared

from lora_core.blocks import PresetBook, Weight, block_ids, block_norms, import_lbw_presets
from lora_core.errors import LoraError
from lora_core.families import family_name
from lora_core.syntax import format_number

from . import state

FORMS = {"17 (SD1/SD2)": ("sd1", 17), "26 (SD1/SD2)": ("sd1", 26), "12 (SDXL)": ("sdxl", 12), "20 (SDXL)": ("sdxl", 20)}
FORM_OF_LENGTH = {length: label for label, (_, length) in FORMS.items()}
DEFAULT_FORM = "17 (SD1/SD2)"
MAX_BLOCKS = 26
SLIDER_MIN, SLIDER_MAX, SLIDER_STEP = -1.0, 2.0, 0.05
ELEM = "lora_core_lbw"


# ----------------------------------------------------------------------------- editor helpers


def _tokens(text: str) -> list[str]:
    return [token.strip() for token in (text or "").split(",")] if (text or "").strip() else []


def _form_ids(form: str) -> tuple[str, ...]:
    family, length = FORMS.get(form, FORMS[DEFAULT_FORM])
    return block_ids(family, length)


def _slider_value(token: str) -> tuple[float, bool]:
    """(the slider position of a weight, whether the slider shows it exactly)."""
    try:
        weight = Weight.parse(token)
    except ValueError:
        return 1.0, False
    if weight.kind != "number":
        return 1.0, False
    return min(max(weight.number, SLIDER_MIN), SLIDER_MAX), SLIDER_MIN <= weight.number <= SLIDER_MAX


def slider_updates(form: str, text: str) -> list[dict]:
    ids, tokens = _form_ids(form), _tokens(text)
    updates = []
    for i in range(MAX_BLOCKS):
        if i >= len(ids):
            updates.append(gr.update(visible=False))
            continue
        token = tokens[i] if i < len(tokens) else "1"
        value, exact = _slider_value(token)
        updates.append(gr.update(visible=True, value=value, label=ids[i] if exact else f"{ids[i]} ({token})"))
    return updates


def convert_weights(text: str, form: str) -> str:
    """The weights of ``text`` in ``form``: blocks kept by id within a family (blocks a short form does not name are
    0, as LBW reads it); across families, or for a list of another length, all 1."""
    family, length = FORMS[form]
    tokens = _tokens(text)
    if len(tokens) == length:
        return ",".join(tokens)
    old = next((FORMS[label] for label in FORMS if FORMS[label][1] == len(tokens)), None)
    if old is None or (old[0] == "sdxl") != (family == "sdxl"):
        return ",".join(["1"] * length)
    by_block = dict(zip(block_ids(old[0], old[1]), tokens))
    full = dict.fromkeys(block_ids(family), "0")
    full.update(by_block)
    return ",".join(full[block] for block in block_ids(family, length))


def _book() -> PresetBook:
    state.block_weights()  # writes the defaults on first run
    return PresetBook.load(state.presets_path())


def _file_text() -> str:
    return _book().text()


def _status(message: str, error: bool = False) -> str:
    colour = "var(--error-text-color, #c00)" if error else "inherit"
    return f"<span style='color:{colour}'>{html.escape(message)}</span>"


def _problems(book: PresetBook) -> str:
    return (" Not read: " + "; ".join(book.problems)) if book.problems else ""


# ----------------------------------------------------------------------------- handlers


def select_preset(name: str):
    preset = _book().get(name or "") if name else None
    if preset is None:
        return [gr.update(), gr.update(), gr.update(), *[gr.update()] * MAX_BLOCKS]
    text = ",".join(str(w) for w in preset.weights)
    form = FORM_OF_LENGTH[len(preset.weights)]
    return [preset.name, form, text, *slider_updates(form, text)]


def change_form(form: str, text: str):
    text = convert_weights(text, form)
    return [text, *slider_updates(form, text)]


def slider_moved(index: int):
    def moved(form: str, text: str, value: float) -> str:
        ids = _form_ids(form)
        tokens = (_tokens(text) + ["1"] * len(ids))[:len(ids)]
        tokens[index] = format_number(round(float(value), 4))
        return ",".join(tokens)
    return moved


def weights_edited(form: str, text: str):
    """The text was typed in: the form follows its length; the sliders follow the values."""
    tokens = _tokens(text)
    if len(tokens) in FORM_OF_LENGTH and len(tokens) != FORMS[form][1]:
        form = FORM_OF_LENGTH[len(tokens)]
    message = ""
    for position, token in enumerate(tokens, 1):
        try:
            Weight.parse(token)
        except ValueError as e:
            message = _status(f"Value {position}: {e}", error=True)
            break
    return [form, message, *slider_updates(form, text)]


def save_preset(name: str, text: str):
    try:
        book = _book()
        preset = book.set(name or "", text or "")
        book.save(state.presets_path())
    except (ValueError, OSError) as e:
        return gr.update(), gr.update(), _status(f"Not saved: {e}", error=True)
    message = f"Saved preset {preset.name} ({len(preset.weights)} values) to {state.presets_path()}"
    return gr.update(choices=book.names(), value=preset.name), book.text(), _status(message)


def delete_preset(name: str):
    book = _book()
    if not name or not book.remove(name):
        return gr.update(), gr.update(), _status(f"No preset named '{name or ''}'", error=True)
    try:
        book.save(state.presets_path())
    except OSError as e:
        return gr.update(), gr.update(), _status(f"Not deleted: {e}", error=True)
    return gr.update(choices=book.names(), value=None), book.text(), _status(f"Deleted preset {name}")


def reload_presets():
    book = _book()
    message = f"Read {len(book.presets)} presets from {state.presets_path()}." + _problems(book)
    return gr.update(choices=book.names()), book.text(), _status(message, error=bool(book.problems))


def save_file(text: str):
    book = PresetBook.parse(text or "")
    try:
        book.save(state.presets_path())
    except OSError as e:
        return gr.update(), _status(f"Not saved: {e}", error=True)
    message = f"Saved {len(book.presets)} presets to {state.presets_path()}." + _problems(book)
    return gr.update(choices=book.names()), _status(message, error=bool(book.problems))


def import_presets(upload, path: str):
    source = getattr(upload, "name", None) or (upload if isinstance(upload, str) else None) or (path or "").strip()
    if not source:
        return gr.update(), gr.update(), _status("Choose an lbwpresets.txt to upload, or give its path", error=True)
    book = _book()
    try:
        names, problems = import_lbw_presets(book, source)
        book.save(state.presets_path())
    except (OSError, UnicodeDecodeError) as e:
        return gr.update(), gr.update(), _status(f"Not imported: {e}", error=True)
    message = f"Imported {len(names)} presets ({', '.join(names) or 'none'})."
    if problems:
        message += " Not imported: " + "; ".join(problems)
    return gr.update(choices=book.names()), book.text(), _status(message, error=bool(problems))


# ----------------------------------------------------------------------------- block influence


def lora_choices() -> list[str]:
    library = state.runtime().library
    return sorted({library.prompt_name(entry) for entry in library.entries}, key=str.casefold)


def empty_chart() -> pd.DataFrame:
    return pd.DataFrame({"block": pd.Series(dtype=str), "influence": pd.Series(dtype=float)})


def influence(name: str) -> tuple[dict[str, float], str]:
    """Block norms of LoRA ``name`` on the loaded model; raises LoraError / ValueError."""
    runtime = state.runtime()
    runtime.bind(shared.sd_model)
    entry = runtime.library.resolve(name)
    norms = block_norms(runtime.load(entry), runtime.index)
    return norms, runtime.index.family


def show_influence(name: str):
    if not name:
        return empty_chart(), _status("Choose a LoRA", error=True)
    try:
        norms, family = influence(name)
    except (LoraError, ValueError) as e:
        return empty_chart(), _status(str(e), error=True)
    total = sum(norms.values())
    top = sorted(norms.items(), key=lambda item: item[1], reverse=True)[:3]
    shares = ", ".join(f"{block} {value / total:.0%}" for block, value in top if value) if total else "none"
    message = (f"{name} on the loaded {family_name(family)} model: sum of |dW| per block, at weight 1 "
               f"(no image generated). Largest: {shares}.")
    frame = pd.DataFrame({"block": list(norms), "influence": [round(v, 6) for v in norms.values()]})
    return frame, _status(message)


# ----------------------------------------------------------------------------- the tab


def on_ui_tabs():
    book = _book()
    with gr.Blocks(analytics_enabled=False) as tab:
        with gr.Row(equal_height=False):
            with gr.Column(scale=1, min_width=320):
                gr.HTML(f"<p>Presets file: <code>{html.escape(state.presets_path())}</code></p>")
                preset = gr.Dropdown(label="Preset", choices=book.names(), value=None, elem_id=f"{ELEM}_preset")
                name = gr.Textbox(label="Name", elem_id=f"{ELEM}_name")
                form = gr.Radio(label="Form (number of blocks) and model family", choices=list(FORMS),
                                value=DEFAULT_FORM, elem_id=f"{ELEM}_form")
                weights = gr.Textbox(label="Weights (numbers, R, U, X, X+0.2)", value=",".join(["1"] * 17),
                                     elem_id=f"{ELEM}_weights")
                with gr.Row():
                    save = gr.Button("Add / overwrite", variant="primary", elem_id=f"{ELEM}_save")
                    delete = gr.Button("Delete", elem_id=f"{ELEM}_delete")
                    reload = gr.Button("Reload file", elem_id=f"{ELEM}_reload")
                status = gr.HTML(elem_id=f"{ELEM}_status")
            with gr.Column(scale=2):
                with gr.Column(elem_id=f"{ELEM}_sliders"):
                    initial = slider_updates(DEFAULT_FORM, ",".join(["1"] * 17))
                    sliders = [gr.Slider(minimum=SLIDER_MIN, maximum=SLIDER_MAX, step=SLIDER_STEP,
                                         value=update.get("value", 1.0), label=update.get("label", ""),
                                         visible=update.get("visible", False), elem_id=f"{ELEM}_slider_{i}")
                               for i, update in enumerate(initial)]
        with gr.Accordion("Presets file", open=False):
            file_text = gr.Textbox(label="lbwpresets.txt (NAME:w1,...,wn per line; other lines are comments)",
                                   value=book.text(), lines=12, elem_id=f"{ELEM}_file")
            save_all = gr.Button("Save file", elem_id=f"{ELEM}_save_file")
        with gr.Accordion("Import LBW presets", open=False):
            with gr.Row():
                upload = gr.File(label="lbwpresets.txt", file_types=[".txt"], elem_id=f"{ELEM}_import_file")
                path = gr.Textbox(label="or its path", placeholder="extensions/sd-webui-lora-block-weight/scripts/"
                                  "lbwpresets.txt", elem_id=f"{ELEM}_import_path")
            do_import = gr.Button("Import", elem_id=f"{ELEM}_import")
        with gr.Accordion("Block influence of a LoRA (no image generation)", open=True):
            with gr.Row():
                chart_lora = gr.Dropdown(label="LoRA", choices=lora_choices(), elem_id=f"{ELEM}_chart_lora")
                refresh = gr.Button("Refresh list", elem_id=f"{ELEM}_chart_refresh")
                compute = gr.Button("Show influence", variant="primary", elem_id=f"{ELEM}_chart_compute")
            chart_info = gr.HTML(elem_id=f"{ELEM}_chart_info")
            chart = gr.BarPlot(empty_chart(), x="block", y="influence", title="Sum of |dW| per block",
                               tooltip=["block", "influence"], x_label_angle=-45, height=320, width=720,
                               elem_id=f"{ELEM}_chart")

        preset.change(select_preset, [preset], [name, form, weights, *sliders], show_progress=False)
        form.input(change_form, [form, weights], [weights, *sliders], show_progress=False)
        for i, slider in enumerate(sliders):
            slider.input(slider_moved(i), [form, weights, slider], [weights], show_progress=False)
        weights.blur(weights_edited, [form, weights], [form, status, *sliders], show_progress=False)
        weights.submit(weights_edited, [form, weights], [form, status, *sliders], show_progress=False)
        save.click(save_preset, [name, weights], [preset, file_text, status])
        delete.click(delete_preset, [preset], [preset, file_text, status])
        reload.click(reload_presets, [], [preset, file_text, status])
        save_all.click(save_file, [file_text], [preset, status])
        do_import.click(import_presets, [upload, path], [preset, file_text, status])
        refresh.click(lambda: gr.update(choices=lora_choices()), [], [chart_lora])
        compute.click(show_influence, [chart_lora], [chart, chart_info])
    return [(tab, "LoRA Block Weight", ELEM)]
