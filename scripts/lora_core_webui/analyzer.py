"""The Effective Block Analyzer: a txt2img script (in the Script dropdown) that shows which blocks of a LoRA change
the image (SPEC §8, LBW's behaviour; the math and the grid are ``lora_core.analysis``).

Per seed: one reference image with every block at Range[1], then one image per block with only that block at
Range[0]; each compared with the reference. Output: one labelled grid per seed (diff | image | reference per block,
``Diff: x%``) and the table of % difference per block in the generation parameters (``Block analysis``, the mean
over the seeds) and in the comments (per seed). The cells are a sweep: bypass mode, where nothing is re-merged
between them, unless a merge per cell costs less (large images, many steps, GPUs).
"""
from __future__ import annotations

import dataclasses
import random
import sys
from copy import copy
from pathlib import Path

import gradio as gr

from modules import images, processing, scripts, shared

from lora_core import analysis
from lora_core.syntax import format_number

from . import state
from .xyz import model_family

TITLE = "LoRA Effective Block Analyzer"
ANALYSIS_KEY = "Block analysis"


class EffectiveBlockAnalyzer(scripts.Script):
    def title(self):
        return TITLE

    def show(self, is_img2img):
        return not is_img2img

    def ui(self, is_img2img):
        with gr.Group(elem_id=self.elem_id("group")):
            lora = gr.Textbox(label="LoRA to analyse (empty: every LoRA of the prompt)", elem_id=self.elem_id("lora"))
            with gr.Row():
                value_range = gr.Textbox(label="Range: test value, reference value", value="0,1",
                                         elem_id=self.elem_id("range"))
                threshold = gr.Number(label="Difference threshold (0-255)", value=analysis.DEFAULT_THRESHOLD,
                                      precision=0, elem_id=self.elem_id("threshold"))
                seeds = gr.Number(label="Number of seeds", value=1, precision=0, elem_id=self.elem_id("seeds"))
            blocks = gr.Textbox(label="Blocks: ALL, 12ALL, 17ALL, 20ALL, 26ALL, ids, ranges (IN05-OUT05), NOT ...",
                                value="ALL", elem_id=self.elem_id("blocks"))
            with gr.Row():
                colour = gr.Radio(label="Diff image colour", choices=["black", "white"], value="black",
                                  elem_id=self.elem_id("colour"))
                swap = gr.Checkbox(label="Swap X-Y (one column per block)", value=False, elem_id=self.elem_id("swap"))
        return [lora, value_range, blocks, threshold, seeds, colour, swap]

    def run(self, p, lora, value_range, blocks, threshold, seeds, colour, swap):
        processing.fix_seed(p)
        family = model_family()
        chosen = analysis.select_blocks(blocks or "ALL", family)
        test, reference = analysis.parse_range(value_range or "0,1")
        name = (lora or "").strip() or None
        analysis.edit_loras(p.prompt, lambda r: r, name)  # LookupError: the prompt has no such LoRA
        threshold = float(analysis.DEFAULT_THRESHOLD if threshold is None else threshold)
        seed_list = [int(p.seed)] + [random.randrange(4294967294) for _ in range(max(1, int(seeds or 1)) - 1)]
        shared.state.job_count = analysis.images_needed(len(seed_list), len(chosen))
        font = images.get_font(max(10, min(p.width, p.height) // 10))

        grids, percents, done_seeds, summary_cell = [], [], [], None
        for seed in seed_list:
            reference_cell = _generate(p, seed, name, analysis.analyzer_lbw(family, None, test, reference))
            if reference_cell is None:
                break
            reference_image = reference_cell.images[0]
            results = []
            for block in chosen:
                cell = _generate(p, seed, name, analysis.analyzer_lbw(family, block, test, reference))
                if cell is None:
                    break
                percent, diff = analysis.difference(cell.images[0], reference_image, threshold)
                results.append(analysis.BlockDiff(block, cell.images[0], analysis.diff_image(diff, colour), percent))
            if len(results) < len(chosen):
                break  # interrupted: only whole grids are shown
            grids.append(analysis.analyzer_grid(results, reference_image, format_number(test),
                                                f"reference ({format_number(reference)})", bool(swap), font))
            percents.append([result.percent for result in results])
            done_seeds.append(seed)
            summary_cell = reference_cell.p

        if not grids:
            return processing.Processed(p, [], p.seed, "")
        summary = copy(summary_cell)
        summary.extra_generation_params = {
            **summary_cell.extra_generation_params, "Script": TITLE,
            ANALYSIS_KEY: analysis.percent_summary(chosen, percents),
            "Block analysis settings": f"range {format_number(test)},{format_number(reference)}; "
                                       f"threshold {format_number(threshold)}; seeds {len(done_seeds)}",
        }
        summary.comments = {analysis.percent_table(chosen, percents, done_seeds): 1}
        infotext = processing.create_infotext(summary, summary.all_prompts, summary.all_seeds, summary.all_subseeds)
        if shared.opts.grid_save and not getattr(p, "do_not_save_grid", False):
            for grid, seed in zip(grids, done_seeds):
                images.save_image(grid, p.outpath_grids, "block_analysis", seed=seed, prompt=p.prompt,
                                  extension=shared.opts.grid_format, info=infotext, grid=True, p=p)
        return processing.Processed(summary, grids, done_seeds[0], infotext, infotexts=[infotext] * len(grids))


@dataclasses.dataclass
class _Cell:
    p: processing.StableDiffusionProcessing
    images: list


def _generate(p, seed: int, name: str | None, lbw: str) -> _Cell | None:
    """One image of ``p``'s prompt with the block weights ``lbw`` on the analysed LoRA(s); None when interrupted."""
    if shared.state.interrupted or shared.state.stopping_generation:
        return None
    cell = copy(p)
    cell.styles = list(p.styles)
    cell.extra_generation_params = dict(p.extra_generation_params)
    cell.prompt = analysis.edit_loras(p.prompt, lambda r: dataclasses.replace(r, lbw=lbw), name)
    cell.seed, cell.batch_size, cell.n_iter = seed, 1, 1
    state.mark_sweep(cell)
    processed = processing.process_images(cell)
    if not processed.images:
        raise RuntimeError(f"the analyzer's image for lbw={lbw} failed (see the console)")
    return _Cell(cell, processed.images)


def register_script() -> None:
    """Offer the analyzer in the Script dropdown of txt2img.

    The WebUI builds its scripts from ``scripts.scripts_data`` (the ``Script`` classes it found in the files of
    every ``scripts/`` folder) when the UI is built; our class lives in this package, so it is added to that list
    in ``before_ui`` (once: the list is rebuilt on a UI reload, and so is this entry).
    """
    if any(data.script_class is EffectiveBlockAnalyzer for data in scripts.scripts_data):
        return
    root = Path(__file__).resolve().parents[2]
    scripts.scripts_data.append(scripts.ScriptClassData(
        EffectiveBlockAnalyzer, str(root / "scripts" / "lora_core_script.py"), str(root),
        sys.modules[EffectiveBlockAnalyzer.__module__]))
