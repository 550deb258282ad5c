"""Our axes in the WebUI's X/Y/Z plot script (``scripts/xyz_grid.py``): LoRA weight, name, block-weight preset,
block values, block ID (with its value axis) and start-stop steps.

Extensions add axes by appending ``AxisOption``s to that script's module-level ``axis_options`` before its UI is
built (``before_ui``); the module is found in ``modules.scripts.scripts_data``. Each axis rewrites the
``<lora:...>`` tags of the cell's prompt (see ``lora_core.analysis``) and marks the cell as part of a sweep, so the
runtime applies its LoRAs in bypass mode, where a weight change from one cell to the next costs no re-merge, unless
a merge per cell costs less (large images and many steps, on a GPU above all: ``lora_core.runtime``).

Which LoRA an axis changes: a value may start with ``NAME:`` (``test_lora:0.5``); without it the weight and name
axes change the first LoRA of the prompt, the others every LoRA of the prompt. Values are checked (``confirm``)
before the first image, so a typo stops the plot at once with a message that names the axis and the value.
"""
from __future__ import annotations

import csv
import dataclasses
import io
import os
import types
from typing import Callable

from modules import scripts, shared

from lora_core import analysis
from lora_core.blocks import Weight, block_ids
from lora_core.errors import LoraError
from lora_core.syntax import LoraRequest, Schedule

from . import state

LABEL_WEIGHT = "LoRA weight"
LABEL_NAME = "LoRA name"
LABEL_PRESET = "LoRA block-weight preset"
LABEL_BLOCKS = "LoRA block values"
LABEL_BLOCK_ID = "LoRA block ID"
LABEL_BLOCK_ID_VALUE = "LoRA block ID value"
LABEL_STEPS = "LoRA start-stop steps"

# The block-ID axis and its value axis meet on the cell (either may be applied first); stored on the cell's copy of p.
_BLOCK_ID = "lora_core_xyz_block_id"
_BLOCK_ID_VALUE = "lora_core_xyz_block_id_value"
_PROMPT_FIELDS = ("prompt", "hr_prompt")


def model_family() -> str:
    """The loaded model's family (sd1, sd2, sdxl), binding the runtime to it."""
    runtime = state.runtime()
    runtime.bind(shared.sd_model)
    return runtime.index.family


def _edit(p, edit: Callable[[LoraRequest], LoraRequest], name: str | None, first_only: bool = False) -> None:
    """Rewrite the LoRA tags of the cell's prompt (and of its hires prompt when that names LoRAs too)."""
    p.prompt = analysis.edit_loras(p.prompt, edit, name, first_only)
    hr_prompt = getattr(p, "hr_prompt", "")
    if isinstance(hr_prompt, str) and analysis.lora_tags(hr_prompt):
        try:
            p.hr_prompt = analysis.edit_loras(hr_prompt, edit, name, first_only)
        except LookupError:
            pass  # the hires prompt names other LoRAs only: it keeps them as the person wrote them
    state.mark_sweep(p)


# ----------------------------------------------------------------------------- apply functions (p, x, xs)


def apply_weight(p, x: str, xs) -> None:
    name, text = analysis.split_target(x)
    weight = Schedule.parse(text)
    _edit(p, lambda r: analysis.with_weight(r, weight), name, first_only=name is None)


def apply_name(p, x: str, xs) -> None:
    """Swap the name of the LoRA whose name is one of the axis values (else the first LoRA of the prompt)."""
    swapped = next((tag.request.name for tag in analysis.lora_tags(p.prompt)
                    if any(tag.request.name.casefold() == str(v).casefold() for v in xs)), None)
    new_name = x.strip()
    _edit(p, lambda r: dataclasses.replace(r, name=new_name), swapped, first_only=swapped is None)


def apply_preset(p, x: str, xs) -> None:
    name, lbw = analysis.split_target(x)
    _edit(p, lambda r: dataclasses.replace(r, lbw=lbw), name)


def apply_blocks(p, x: str, xs) -> None:
    name, text = analysis.split_target(x)
    family = model_family()
    values = analysis.parse_block_assignments(text, family)
    weights_of = state.block_weights().weights_of
    _edit(p, lambda r: analysis.with_block_weights(r, values, family, weights_of), name)


def _apply_block_id(p) -> None:
    name, spec = getattr(p, _BLOCK_ID)
    family = model_family()
    values = dict.fromkeys(analysis.select_blocks(spec, family), getattr(p, _BLOCK_ID_VALUE, "0"))
    weights_of = state.block_weights().weights_of
    _edit(p, lambda r: analysis.with_block_weights(r, values, family, weights_of), name)


def apply_block_id(p, x: str, xs) -> None:
    """Set the blocks named by ``x`` to the value of the "LoRA block ID value" axis (0 without one)."""
    setattr(p, _BLOCK_ID, analysis.split_target(x))
    _apply_block_id(p)


def apply_block_id_value(p, x: str, xs) -> None:
    setattr(p, _BLOCK_ID_VALUE, str(Weight.parse(x)))
    if getattr(p, _BLOCK_ID, None) is not None:
        _apply_block_id(p)
    else:
        state.mark_sweep(p)


def apply_steps(p, x: str, xs) -> None:
    name, text = analysis.split_target(x)
    start, stop = analysis.parse_steps(text)
    _edit(p, lambda r: dataclasses.replace(r, start=start, stop=stop), name)


# ----------------------------------------------------------------------------- checks, choices, values


def _confirm(label: str, apply: Callable, check: Callable[[str], None] | None = None) -> Callable:
    """A confirm function: every value is tried on a stand-in of the cell before the plot starts."""
    def confirm(p, xs) -> None:
        for x in xs:
            trial = types.SimpleNamespace(**{f: getattr(p, f, "") for f in _PROMPT_FIELDS})
            try:
                if check is not None:
                    check(x)
                apply(trial, x, xs)
            except (LookupError, ValueError, LoraError) as e:
                message = e.args[0] if isinstance(e, LookupError) and e.args else e
                raise RuntimeError(f"X/Y/Z plot, {label} '{x}': {message}") from None
    return confirm


def _check_lora_exists(x: str) -> None:
    runtime = state.runtime()
    try:
        runtime.library.resolve(x.strip())
    except LoraError:
        runtime.library.refresh()
        runtime.library.resolve(x.strip())


def _check_preset(x: str) -> None:
    _, lbw = analysis.split_target(x)
    weights = state.block_weights().weights_of(lbw)
    block_ids(model_family(), len(weights))  # the length must fit the loaded model


def lora_names() -> list[str]:
    library = state.runtime().library
    return sorted({library.prompt_name(entry) for entry in library.entries}, key=str.casefold)


def preset_names() -> list[str]:
    return state.block_weights().presets.names()


def _csv_values(text: str) -> list[str]:
    return [value.strip() for row in csv.reader(io.StringIO(text or ""), skipinitialspace=True) for value in row]


def prepare_weight(text: str) -> list[str]:
    """Ranges as in the plot's number axes: ``0-1 [5]``, ``0-1 (+0.25)``."""
    return analysis.expand_weight_values(_csv_values(text))


# ----------------------------------------------------------------------------- registration


def xyz_module():
    """The WebUI's X/Y/Z plot script module, or None when it is not loaded."""
    for data in scripts.scripts_data:
        if os.path.basename(data.path) == "xyz_grid.py" and hasattr(data.module, "axis_options"):
            return data.module
    return None


def _axes(axis_option: type) -> list:
    def axis(label, apply, check=None, **kwargs):
        return axis_option(label, str, apply, confirm=_confirm(label, apply, check), **kwargs)

    return [
        axis(LABEL_WEIGHT, apply_weight, prepare=prepare_weight),
        axis(LABEL_NAME, apply_name, _check_lora_exists, choices=lora_names),
        axis(LABEL_PRESET, apply_preset, _check_preset, choices=preset_names),
        axis(LABEL_BLOCKS, apply_blocks),
        axis(LABEL_BLOCK_ID, apply_block_id),
        axis(LABEL_BLOCK_ID_VALUE, apply_block_id_value),
        axis(LABEL_STEPS, apply_steps),
    ]


def add_axes() -> None:
    """Append our axes to the X/Y/Z plot (once; ``before_ui`` runs again on every UI reload)."""
    module = xyz_module()
    if module is None:
        print("[lora-core] the X/Y/Z plot script is not loaded: the LoRA axes are not offered")
        return
    present = {option.label for option in module.axis_options}
    module.axis_options.extend(a for a in _axes(module.AxisOption) if a.label not in present)
