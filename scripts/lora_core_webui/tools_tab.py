"""The "LoRA Tools" tab: merge LoRAs into a checkpoint, merge LoRAs, extract, resize, add difference, inspect.

Every sub-tab calls the same ``lora_core.tools`` function as ``python -m lora_core``; this module only turns the
form into arguments and the result into text. Checkpoints are written into the WebUI's checkpoint folder, LoRAs into
its first LoRA folder (names may hold subfolders); an existing file is replaced only when "Overwrite" is ticked.

Jobs go through the WebUI's queue (``call_queue.wrap_gradio_gpu_call``), so a merge never runs beside a generation,
and the tool's ``progress(done, total, what)`` drives the WebUI progress bar through ``shared.state`` (one job whose
"sampling steps" are the tool's steps). A LoraError (or a bad value) ends as a line of text in the result box, never
as a traceback. After a write the LoRA library or the checkpoint list is refreshed, with the tab's dropdowns.
"""
from __future__ import annotations

import html
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import gradio as gr
import torch
from PIL import Image

from modules import call_queue, sd_models, shared
from modules.ui_common import create_refresh_button
from modules.ui_components import FormRow

from lora_core import tools
from lora_core.errors import LoraError
from lora_core.tools.common import COMPUTE_PRECISIONS, SAVE_PRECISIONS
from lora_core.tools.merge_loras import MODES
from lora_core.tools.svd import DYNAMIC_METHODS

from . import state

ELEM = "lora_core_tools"
TITLE = "LoRA Tools"
NO_MODEL = "None (from the file alone)"
NO_DYNAMIC = "none (fixed rank)"
CHECKPOINT, LORA = "checkpoint", "lora"
ITEMS_HELP = ("One LoRA per line: name:ratio[:blocks], blocks being a preset name or 12/17/20/26 weights "
              "(e.g. my_lora:0.8 or my_lora:1:MIDD). Pick from the list to add a line.")
MODE_NOTES = {
    "sum": "sum (sd-scripts' merge_lora.py): needs equal ranks; it is an <b>approximation</b> of using the LoRAs "
           "together (the products have cross terms up_i·down_j), and a ratio acts on both factors (0.5 alone "
           "gives 0.25·dW) unless 'same to strength' is ticked.",
    "concat": "concat: the ranks add up and each part keeps its own scale; exactly the LoRAs applied together.",
    "svd": "svd: per module, the sum of ratio·dW, then a truncated SVD to the new rank; exact when the rank reaches "
           "the sum of the ranks and nothing is clamped.",
}


# ----------------------------------------------------------------------------- files and names


def checkpoint_choices() -> list[str]:
    return sd_models.checkpoint_tiles()


def lora_choices() -> list[str]:
    library = state.runtime().library
    return sorted({library.prompt_name(entry) for entry in library.entries}, key=str.casefold)


def checkpoint_file(title: str | None) -> str:
    if not title:
        raise tools.ToolError("choose a checkpoint")
    info = sd_models.checkpoints_list.get(title) or sd_models.get_closet_checkpoint_match(title)
    if info is None:
        raise tools.ToolError(f"no checkpoint '{title}' (refresh the list)")
    return info.filename


def lora_file(name: str | None) -> Path:
    if not name:
        raise tools.ToolError("choose a LoRA")
    return state.runtime().library.resolve(name).path


def checkpoint_folder() -> str:
    """Where the WebUI's own merger writes: ``--ckpt-dir`` or models/Stable-diffusion."""
    return shared.cmd_opts.ckpt_dir or sd_models.model_path


def lora_folder() -> str:
    return state.lora_roots()[0]


def output_path(folder: str, name: str, overwrite: bool) -> Path:
    """``folder/name.safetensors``; ``name`` may hold subfolders (made as needed) but may not leave ``folder``.
    An existing file is refused here already, in the words of this form (the tools refuse it too)."""
    name = (name or "").strip()
    if not name:
        raise tools.ToolError("give the output file a name")
    relative = Path(name if name.lower().endswith(".safetensors") else name + ".safetensors")
    if relative.is_absolute() or ".." in relative.parts:
        raise tools.ToolError(f"'{name}': give a name inside {folder} (subfolders are fine, '..' is not)")
    path = Path(folder) / relative
    if path.exists() and not overwrite:
        raise tools.ToolError(f"{path} already exists; tick 'Overwrite' to replace it")
    path.parent.mkdir(parents=True, exist_ok=True)
    return path


def item_lines(text: str) -> list[str]:
    return [line.strip() for line in (text or "").splitlines() if line.strip()]


def add_item(choice: str | None, text: str):
    """A LoRA picked from the list becomes a ``name:1`` line of the items box; the list is cleared again."""
    if not choice:
        return gr.update(), gr.update()
    return "\n".join([*item_lines(text), f"{choice}:1"]), gr.update(value=None)


def device_choices() -> list[str]:
    choices = ["cpu"]
    if torch.cuda.is_available():
        choices.append("cuda")
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        choices.append("mps")
    return choices


def optional_rank(value: float | None) -> int | None:
    """A rank box: 0 or empty means 'none' (the tool's default)."""
    return int(value) if value else None


def clamp_of(quantile: float | None, no_clamp: bool) -> float | None:
    return None if no_clamp or quantile is None else float(quantile)


# ----------------------------------------------------------------------------- progress and results


class ProgressBar:
    """A tool's ``progress(done, total, what)`` shown on the WebUI's bar: one job of ``total`` steps."""

    def __call__(self, done: int, total: int, what: str) -> None:
        if shared.state.interrupted:
            raise tools.ToolError("interrupted; nothing was written")
        shared.state.job_count = 1
        shared.state.sampling_steps = total
        shared.state.sampling_step = done
        shared.state.textinfo = f"{what}: {done}/{total}"


def result_html(text: str, error: bool = False) -> str:
    colour = "var(--error-text-color, #c00)" if error else "inherit"
    return (f"<pre style='white-space:pre-wrap;max-height:40em;overflow:auto;color:{colour}'>"
            f"{html.escape(text)}</pre>")


def saved_text(saved: tools.Saved) -> str:
    return f"Saved {saved.path}\nsshs_model_hash {saved.shorthash}…, sshs_legacy_hash {saved.legacy_hash}"


def progress_js(panel: str) -> str:
    """The WebUI's progress bar over ``panel`` for this job: a task id in the first (hidden) input, as its merger."""
    return ("function(){var id=randomId();requestProgress(id,gradioApp().getElementById('" + panel + "'),null,"
            "function(){});var args=Array.from(arguments);args[0]=id;return args;}")


# ----------------------------------------------------------------------------- the tools


def run_merge_into(checkpoint, items, save_precision, compute_precision, device, name, overwrite, *, progress):
    output = output_path(checkpoint_folder(), name, overwrite)
    result = tools.merge_into(checkpoint_file(checkpoint), item_lines(items), output,
                              save_precision=save_precision, compute_precision=compute_precision, device=device,
                              presets=state.block_weights().presets, lora_dirs=state.lora_roots(),
                              overwrite=overwrite, progress=progress)
    lines = [f"{m.name} at {m.ratio:g}" + (f", blocks {m.blocks}" if m.blocks else "") + f": {m.layers} layers "
             f"changed ({m.report})" for m in result.loras]
    return "\n".join([*lines, f"{result.family.upper()} checkpoint. " + saved_text(result.saved)])


def run_merge_loras(items, mode, rank, conv_rank, clamp, no_clamp, same_to_strength, save_precision, device,
                    title, with_modelspec, name, overwrite, *, progress):
    result = tools.merge_loras(item_lines(items), output_path(lora_folder(), name, overwrite), mode=mode,
                               rank=optional_rank(rank), conv_rank=optional_rank(conv_rank),
                               clamp_quantile=clamp_of(clamp, no_clamp), same_to_strength=same_to_strength,
                               save_precision=save_precision, device=device, presets=state.block_weights().presets,
                               lora_dirs=state.lora_roots(), title=title or None, include_modelspec=with_modelspec,
                               overwrite=overwrite, progress=progress)
    ranks = ", ".join(f"rank {r}: {n}" for r, n in result.ranks.items())
    lines = [f"{result.mode} merge: {result.modules} modules ({ranks})"]
    if result.mode == "sum":
        lines.append("Note: a sum merge approximates using the LoRAs together (cross terms up_i·down_j).")
    if result.dropped:
        lines.append(f"Not carried over (keys of no module): {', '.join(result.dropped)}")
    return "\n".join([*lines, saved_text(result.saved)])


def run_extract(base, tuned, rank, conv_rank, clamp, no_clamp, min_diff, v_parameterization, save_precision, device,
                title, with_modelspec, name, overwrite, *, progress):
    result = tools.extract(checkpoint_file(base), checkpoint_file(tuned), output_path(lora_folder(), name, overwrite),
                           rank=int(rank or 0), conv_rank=optional_rank(conv_rank),
                           clamp_quantile=clamp_of(clamp, no_clamp), min_diff=float(min_diff or 0.0),
                           v_parameterization=True if v_parameterization else None, save_precision=save_precision,
                           device=device, include_modelspec=with_modelspec, title=title or None,
                           overwrite=overwrite, progress=progress)
    encoder = "included" if result.text_encoder else "left out (it differs by at most min diff)"
    kept = sum(r.fro_retained for r in result.modules.values()) / max(len(result.modules), 1)
    return (f"{result.family.upper()}: {len(result.modules)} modules, text encoder {encoder} "
            f"(max |dW| {result.text_encoder_max_diff:.4g}); Frobenius norm kept on average {kept:.2%}\n"
            + saved_text(result.saved))


def run_resize(lora, rank, conv_rank, dynamic, dynamic_param, save_precision, device, name, overwrite, *, progress):
    method = None if dynamic in (None, NO_DYNAMIC) else dynamic
    result = tools.resize(lora_file(lora), output_path(lora_folder(), name, overwrite), rank=int(rank or 0),
                          conv_rank=optional_rank(conv_rank), dynamic=method,
                          dynamic_param=None if method is None else dynamic_param, save_precision=save_precision,
                          device=device, overwrite=overwrite, progress=progress)
    return saved_text(result.saved) + "\n\n" + result.report()


def run_add_difference(a, b, c, multiplier, blocks, save_precision, compute_precision, device, name, overwrite, *,
                       progress):
    result = tools.add_difference(checkpoint_file(a), checkpoint_file(b), checkpoint_file(c),
                                  output_path(checkpoint_folder(), name, overwrite), multiplier=float(multiplier),
                                  blocks=(blocks or "").strip() or None, presets=state.block_weights().presets,
                                  save_precision=save_precision, compute_precision=compute_precision, device=device,
                                  overwrite=overwrite, progress=progress)
    copied = f"\n{len(result.from_a)} tensors taken from A unchanged (B or C lacks them or shapes them otherwise)" \
        if result.from_a else ""
    return saved_text(result.saved) + copied


def run_inspect(lora, checkpoint):
    """The report and the block chart of a LoRA; errors as text (this writes nothing, so it needs no queue)."""
    try:
        path = lora_file(lora)
        info = tools.inspect_lora(path, None if checkpoint in (None, "", NO_MODEL) else checkpoint_file(checkpoint))
        with tempfile.TemporaryDirectory() as folder:
            chart = tools.render_block_chart(info["block_norms"], Path(folder) / "chart.png", title=path.name)
            image = Image.open(chart)
            image.load()
    except (LoraError, ValueError, OSError) as e:
        return None, result_html(f"Error: {e}", error=True)
    return image, result_html(tools.format_report(info))


# ----------------------------------------------------------------------------- the tab


@dataclass
class _Tool:
    key: str
    run: Callable[..., str]
    writes: str  # CHECKPOINT or LORA
    inputs: list
    button: gr.Button
    result: gr.HTML


@dataclass
class _Builder:
    """Builds the sub-tabs, remembering the dropdowns a write must refresh and the buttons to wire at the end."""

    checkpoints: list = field(default_factory=list)
    loras: list = field(default_factory=list)
    tools: list[_Tool] = field(default_factory=list)

    def checkpoint(self, label: str, elem: str, track: bool = True, extra: tuple[str, ...] = ()) -> gr.Dropdown:
        with FormRow():
            dropdown = gr.Dropdown([*extra, *checkpoint_choices()], label=label, elem_id=f"{ELEM}_{elem}",
                                   value=extra[0] if extra else None)
            create_refresh_button(dropdown, sd_models.list_models,
                                  lambda: {"choices": [*extra, *checkpoint_choices()]}, f"{ELEM}_{elem}_refresh")
        if track:
            self.checkpoints.append(dropdown)
        return dropdown

    def lora(self, label: str, elem: str) -> gr.Dropdown:
        with FormRow():
            dropdown = gr.Dropdown(lora_choices(), label=label, elem_id=f"{ELEM}_{elem}")
            create_refresh_button(dropdown, lambda: state.runtime().library.refresh(),
                                  lambda: {"choices": lora_choices()}, f"{ELEM}_{elem}_refresh")
        self.loras.append(dropdown)
        return dropdown

    def items(self, key: str) -> gr.Textbox:
        pick = self.lora("Add a LoRA", f"{key}_pick")
        items = gr.Textbox(label="LoRAs", lines=4, info=ITEMS_HELP, placeholder="my_lora:0.8",
                           elem_id=f"{ELEM}_{key}_items")
        pick.change(add_item, [pick, items], [items, pick], show_progress=False)
        return items

    @staticmethod
    def precision(key: str, save_default: str, compute: bool) -> list:
        with FormRow():
            fields = [gr.Radio(list(SAVE_PRECISIONS), value=save_default, label="Save precision",
                               elem_id=f"{ELEM}_{key}_save_precision")]
            if compute:
                fields.append(gr.Radio(list(COMPUTE_PRECISIONS), value="fp32", label="Compute precision",
                                       elem_id=f"{ELEM}_{key}_compute_precision"))
            fields.append(gr.Dropdown(device_choices(), value="cpu", label="Device", allow_custom_value=True,
                                      elem_id=f"{ELEM}_{key}_device"))
        return fields

    @staticmethod
    def clamp(key: str) -> list:
        with FormRow():
            return [gr.Number(0.99, label="Clamp quantile", elem_id=f"{ELEM}_{key}_clamp"),
                    gr.Checkbox(False, label="No clamp (keep every value)", elem_id=f"{ELEM}_{key}_no_clamp")]

    @staticmethod
    def modelspec(key: str) -> list:
        with gr.Accordion("Metadata", open=False), FormRow():
            return [gr.Textbox(label="Title (modelspec.title; default: the file name)", elem_id=f"{ELEM}_{key}_title"),
                    gr.Checkbox(True, label="Write modelspec", elem_id=f"{ELEM}_{key}_modelspec")]

    def finish(self, key: str, run: Callable[..., str], writes: str, inputs: list, button_label: str) -> None:
        """The output name and overwrite box, the button, and the result panel (where the progress bar shows)."""
        folder = checkpoint_folder() if writes == CHECKPOINT else lora_folder()
        with FormRow():
            name = gr.Textbox(label=f"Output name (saved into {folder})", placeholder="name or sub/folder/name",
                              elem_id=f"{ELEM}_{key}_name")
            overwrite = gr.Checkbox(False, label="Overwrite", elem_id=f"{ELEM}_{key}_overwrite")
        button = gr.Button(button_label, variant="primary", elem_id=f"{ELEM}_{key}_run")
        with gr.Group(elem_id=f"{ELEM}_{key}_panel"):
            result = gr.HTML(elem_id=f"{ELEM}_{key}_result")
        self.tools.append(_Tool(key, run, writes, [*inputs, name, overwrite], button, result))

    def wire(self, task_id: gr.Textbox) -> None:
        for tool in self.tools:
            tool.button.click(fn=self._handler(tool), _js=progress_js(f"{ELEM}_{tool.key}_panel"),
                              inputs=[task_id, *tool.inputs], outputs=[*self.checkpoints, *self.loras, tool.result])

    def _handler(self, tool: _Tool):
        unchanged = [gr.update() for _ in (*self.checkpoints, *self.loras)]

        def handle(_task_id: str, *values):
            try:
                text = tool.run(*values, progress=ProgressBar())
            except (LoraError, ValueError, OSError) as e:
                return [*unchanged, result_html(f"Error: {e}", error=True)]
            if tool.writes == CHECKPOINT:
                sd_models.list_models()
                updates = [gr.update(choices=checkpoint_choices()) for _ in self.checkpoints]
                updates += [gr.update() for _ in self.loras]
            else:
                state.runtime().library.refresh()
                updates = [gr.update() for _ in self.checkpoints]
                updates += [gr.update(choices=lora_choices()) for _ in self.loras]
            return [*updates, result_html(text)]

        return call_queue.wrap_gradio_gpu_call(handle, extra_outputs=unchanged)


def _merge_into_tab(ui: _Builder) -> None:
    checkpoint = ui.checkpoint("Checkpoint", "merge_into_checkpoint")
    items = ui.items("merge_into")
    ui.finish("merge_into", run_merge_into, CHECKPOINT,
              [checkpoint, items, *ui.precision("merge_into", "fp16", compute=True)], "Merge into checkpoint")


def _merge_loras_tab(ui: _Builder) -> None:
    items = ui.items("merge_loras")
    mode = gr.Radio(list(MODES), value="svd", label="Mode", elem_id=f"{ELEM}_merge_loras_mode")
    note = gr.HTML(f"<p>{MODE_NOTES['svd']}</p>", elem_id=f"{ELEM}_merge_loras_note")
    mode.change(lambda m: f"<p>{MODE_NOTES[m]}</p>", [mode], [note], show_progress=False)
    with FormRow():
        rank = gr.Number(8, precision=0, label="Rank (svd)", elem_id=f"{ELEM}_merge_loras_rank")
        conv_rank = gr.Number(0, precision=0, label="Conv rank (svd; 0: the rank)",
                              elem_id=f"{ELEM}_merge_loras_conv_rank")
    clamp = ui.clamp("merge_loras")
    same = gr.Checkbox(False, label="Same to strength (sum: a ratio acts once)", elem_id=f"{ELEM}_merge_loras_same")
    precision = ui.precision("merge_loras", "fp32", compute=False)
    ui.finish("merge_loras", run_merge_loras, LORA,
              [items, mode, rank, conv_rank, *clamp, same, *precision, *ui.modelspec("merge_loras")], "Merge LoRAs")


def _extract_tab(ui: _Builder) -> None:
    base = ui.checkpoint("Base checkpoint", "extract_base")
    tuned = ui.checkpoint("Tuned checkpoint", "extract_tuned")
    with FormRow():
        rank = gr.Number(8, precision=0, label="Rank", elem_id=f"{ELEM}_extract_rank")
        conv_rank = gr.Number(0, precision=0, label="Conv rank (0: no res-block convs)",
                              elem_id=f"{ELEM}_extract_conv_rank")
        min_diff = gr.Number(0.01, label="Min diff (text encoder left out below)", elem_id=f"{ELEM}_extract_min_diff")
    clamp = ui.clamp("extract")
    v_param = gr.Checkbox(False, label="v-parameterization (metadata; SD2 always)", elem_id=f"{ELEM}_extract_v")
    precision = ui.precision("extract", "fp32", compute=False)
    ui.finish("extract", run_extract, LORA,
              [base, tuned, rank, conv_rank, *clamp, min_diff, v_param, *precision, *ui.modelspec("extract")],
              "Extract LoRA")


def _resize_tab(ui: _Builder) -> None:
    lora = ui.lora("LoRA", "resize_lora")
    with FormRow():
        rank = gr.Number(4, precision=0, label="Rank (dynamic: the most kept)", elem_id=f"{ELEM}_resize_rank")
        conv_rank = gr.Number(0, precision=0, label="Conv rank (0: the rank)", elem_id=f"{ELEM}_resize_conv_rank")
    with FormRow():
        dynamic = gr.Dropdown([NO_DYNAMIC, *DYNAMIC_METHODS], value=NO_DYNAMIC, label="Dynamic method",
                              elem_id=f"{ELEM}_resize_dynamic")
        param = gr.Number(0.9, label="Dynamic parameter (sv_ratio: a ratio; sv_fro, sv_cumulative: a share 0..1)",
                          elem_id=f"{ELEM}_resize_dynamic_param")
    ui.finish("resize", run_resize, LORA,
              [lora, rank, conv_rank, dynamic, param, *ui.precision("resize", "fp32", compute=False)], "Resize")


def _add_difference_tab(ui: _Builder) -> None:
    gr.HTML("<p>Writes A + M · (B − C); with block weights, M per block (text encoders: BASE).</p>")
    a = ui.checkpoint("A", "difference_a")
    b = ui.checkpoint("B", "difference_b")
    c = ui.checkpoint("C", "difference_c")
    multiplier = gr.Slider(-1.0, 2.0, value=1.0, step=0.05, label="Multiplier M", elem_id=f"{ELEM}_difference_m")
    blocks = gr.Textbox(label="Block weights for M (optional: a preset name or 12/17/20/26 values)",
                        elem_id=f"{ELEM}_difference_blocks")
    ui.finish("difference", run_add_difference, CHECKPOINT,
              [a, b, c, multiplier, blocks, *ui.precision("difference", "fp16", compute=True)], "Add difference")


def _inspect_tab(ui: _Builder) -> None:
    lora = ui.lora("LoRA", "inspect_lora")
    model = ui.checkpoint("Map onto checkpoint (counts every algorithm)", "inspect_model", track=False,
                          extra=(NO_MODEL,))
    button = gr.Button("Inspect", variant="primary", elem_id=f"{ELEM}_inspect_run")
    with FormRow(equal_height=False):
        report = gr.HTML(elem_id=f"{ELEM}_inspect_report")
        chart = gr.Image(label="Block influence (sum of ||dW|| per block)", type="pil", interactive=False,
                         elem_id=f"{ELEM}_inspect_chart")
    button.click(run_inspect, [lora, model], [chart, report])


SUB_TABS = [("Merge into checkpoint", _merge_into_tab), ("Merge LoRAs", _merge_loras_tab), ("Extract", _extract_tab),
            ("Resize", _resize_tab), ("Add difference", _add_difference_tab), ("Inspect", _inspect_tab)]


def on_ui_tabs():
    ui = _Builder()
    with gr.Blocks(analytics_enabled=False) as tab:
        task_id = gr.Textbox(visible=False, elem_id=f"{ELEM}_task_id")
        with gr.Tabs(elem_id=f"{ELEM}_tabs"):
            for label, build in SUB_TABS:
                with gr.Tab(label, elem_id=f"{ELEM}_{build.__name__.strip('_').removesuffix('_tab')}"):
                    build(ui)
        ui.wire(task_id)
    for component in tab.blocks.values():
        # The WebUI saves defaults in ui-config.json by tab and label, and labels repeat across the sub-tabs
        # ("Rank", "Save precision"...): the first sub-tab's default would become every sub-tab's.
        component.do_not_save_to_config = True
    return [(tab, TITLE, ELEM)]
