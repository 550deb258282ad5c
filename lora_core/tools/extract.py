"""Extract a LoRA from two checkpoints: ``dW = tuned - base`` per module, truncated SVD (sd-scripts
``extract_lora_from_models.py``).

Modules: those sd-scripts' LoRA network makes: in the text encoders, the attention projections and MLP layers
of every encoder layer; in the UNet, the Linear/Conv2d layers of every transformer (``proj_in``/``proj_out``,
``attn1``/``attn2`` q/k/v/out, ``ff``); with a ``conv_rank``, also the res blocks' layers (3x3 convs at
``conv_rank``, time embedding projection and 1x1 skip at ``rank``) and the down/upsampling convs. The rank is at
most the layer's in and out channels. Factors are clamped at the ``clamp_quantile`` of their values (sd-scripts:
0.99; None: no clamp), alpha = the module's rank (scale 1). The text encoders are left out when no weight of
theirs differs by more than ``min_diff`` (sd-scripts: "Text encoder is same. Extract U-Net only.").

Written as sd-scripts writes it, so A1111's built-in Lora loads it: kohya names (SD1/SD2 UNet diffusers-style,
SDXL compvis-style, ``names``), ``ss_network_module/dim/alpha/args``, ``ss_base_model_version``, modelspec,
``sshs_*`` hashes. Memory: the two checkpoints are read a layer at a time; only the factors are kept.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

import torch
from torch import nn

from ..keymap import resolve_module
from ..model_index import Target
from .checkpoint import CheckpointIndex, CheckpointReader
from .checks import check_output, require_clamp, require_device, require_finite, require_rank, require_ranks_fit
from .common import Progress, ToolError, dtype_of, same_family, step
from .names import UNET, canonical_module
from .output import Saved, modelspec, network_metadata, save_lora
from .svd import Retained, low_rank

_TE_MODULE = re.compile(r"text_model_encoder_layers_\d+_(self_attn_(q|k|v|out)_proj|mlp_fc[12])")
_UNET_TRANSFORMER = re.compile(r"(input_blocks\.\d+|middle_block|output_blocks\.\d+)\.1\."
                               r"(proj_in|proj_out|transformer_blocks\.\d+\.(attn[12]\.(to_q|to_k|to_v|to_out\.0)|"
                               r"ff\.net\.(0\.proj|2)))")
_UNET_CONV = re.compile(r"(input_blocks\.\d+\.0|middle_block\.[02]|output_blocks\.\d+\.0)\."
                        r"(in_layers\.2|out_layers\.3|skip_connection|emb_layers\.1)|input_blocks\.\d+\.0\.op|"
                        r"output_blocks\.\d+\.[12]\.conv")


@dataclass
class ExtractResult:
    saved: Saved
    family: str
    text_encoder: bool  # whether the text encoders were included
    text_encoder_max_diff: float
    modules: dict[str, Retained] = field(default_factory=dict)


def _te_names(index: CheckpointIndex) -> dict[Target, str]:
    """Text-encoder targets sd-scripts trains, by their HF-CLIP kohya name (``lora_te_`` / ``lora_te1_`` / ``_te2_``)."""
    names: dict[Target, str] = {}
    for name, target in index.kohya_names():
        component = index.component(target)
        prefix = component.kohya_prefixes[0]
        if component.kind == "te" and name.startswith(prefix) and _TE_MODULE.fullmatch(name[len(prefix):]):
            names.setdefault(target, name)
    return names


def _unet_names(index: CheckpointIndex, conv: bool) -> dict[Target, str]:
    names: dict[Target, str] = {}
    for module_name, module in index.modules.items():
        if not isinstance(module, (nn.Linear, nn.Conv2d)):
            continue
        target = Target(module_name)
        try:
            component = index.component(target)
        except KeyError:  # outside the UNet and the text encoders
            continue
        path = module_name[len(component.prefix):]
        if component.kind == "unet" and (_UNET_TRANSFORMER.fullmatch(path) or (conv and _UNET_CONV.fullmatch(path))):
            names[target] = canonical_module(UNET + path.replace(".", "_"), index.family)
    return names


def _target_shape(index: CheckpointIndex, target: Target) -> tuple[int, ...]:
    """The weight shape of one target (its rows of ``in_proj_weight`` for q/k/v)."""
    where = index.weight_key(target)
    shape = index.shapes[where.key]
    return shape if where.rows is None else (where.rows.stop - where.rows.start, *shape[1:])


def extract_targets(index: CheckpointIndex, conv: bool) -> dict[Target, str]:
    """Target -> the module name the extracted LoRA gives it (text encoders first, as sd-scripts orders them)."""
    names = {**_te_names(index), **_unet_names(index, conv)}
    for target, name in names.items():  # the names must read back to the same layers
        if resolve_module(name, index) != target:
            raise AssertionError(f"extract: {name} does not map back to {target}")
    return names


def _require_same_layout(base: CheckpointReader, tuned: CheckpointReader, targets: Iterable[Target]) -> None:
    """Every weight to extract has one shape in both checkpoints (not, e.g., a model and its inpainting twin)."""
    for target in targets:
        key = base.index.weight_key(target).key
        if key not in tuned or tuned.shape(key) != base.shape(key):
            found = f"has shape {tuned.shape(key)}" if key in tuned else "is missing"
            raise ToolError(f"{tuned.path}: not a fine-tune of the base {base.path}: its '{key}' {found}, the "
                            f"base's is {base.shape(key)}")


class _Differences:
    """``tuned - base`` (float32) of one target at a time, reading each checkpoint tensor once in a row."""

    def __init__(self, base: CheckpointReader, tuned: CheckpointReader):
        self.base, self.tuned = base, tuned
        self._cached: tuple[str, torch.Tensor] | None = None

    def __call__(self, target: Target) -> torch.Tensor:
        where = self.base.index.weight_key(target)
        if self._cached is None or self._cached[0] != where.key:
            self._cached = (where.key, self.tuned.get(where.key).float() - self.base.get(where.key).float())
        return where.of(self._cached[1])


def extract(base: str | os.PathLike, tuned: str | os.PathLike, output: str | os.PathLike, *, rank: int = 4,
            conv_rank: int | None = None, clamp_quantile: float | None = 0.99, min_diff: float = 0.01,
            v_parameterization: bool | None = None, save_precision: str = "fp32", device: str = "cpu",
            include_modelspec: bool = True, title: str | None = None, overwrite: bool = False,
            progress: Progress | None = None) -> ExtractResult:
    """Write ``output``: a LoRA that takes ``base`` to (approximately) ``tuned``. See the module docstring.

    ``v_parameterization`` only sets metadata (default: True for SD2, as sd-scripts). Raises LoraFileError,
    FamilyMismatchError (checkpoints of different families), ToolError.
    """
    require_rank(rank, "the rank (--rank)")
    require_rank(conv_rank, "the conv rank (--conv-rank)")
    require_clamp(clamp_quantile)
    require_finite(min_diff, "the text encoders' minimum difference (--min-diff)", minimum=0)
    save_dtype = dtype_of(save_precision)
    require_device(device)
    output = check_output(output, overwrite, [base, tuned])
    with CheckpointReader(base) as base_reader, CheckpointReader(tuned) as tuned_reader:
        base_reader.require_model("the base")
        tuned_reader.require_model("the tuned model")
        family = same_family([(base_reader.path, base_reader.family), (tuned_reader.path, tuned_reader.family)])
        index = base_reader.index
        targets = extract_targets(index, conv_rank is not None)
        require_ranks_fit(rank, conv_rank, [_target_shape(index, t) for t in targets], str(base_reader.path))
        _require_same_layout(base_reader, tuned_reader, targets)
        difference = _Differences(base_reader, tuned_reader)
        te_targets = [t for t in targets if index.is_text_encoder(t)]
        te_max = max((float(difference(t).abs().max()) for t in te_targets), default=0.0)
        include_te = te_max > min_diff
        chosen = [t for t in targets if include_te or not index.is_text_encoder(t)]
        tensors: dict[str, torch.Tensor] = {}
        retained: dict[str, Retained] = {}
        for done, target in enumerate(chosen, 1):
            delta = difference(target)
            is_kxk = delta.dim() == 4 and delta.shape[2] * delta.shape[3] > 1
            wanted = conv_rank if is_kxk and conv_rank is not None else rank
            factors = low_rank(delta, min(wanted, delta.shape[0], delta.shape[1]), clamp_quantile=clamp_quantile,
                               device=device)
            name = targets[target]
            tensors[f"{name}.lora_up.weight"] = factors.up
            tensors[f"{name}.lora_down.weight"] = factors.down
            tensors[f"{name}.alpha"] = torch.tensor(float(factors.retained.rank))
            retained[name] = factors.retained
            step(progress, done, len(chosen), "extract")
    v = (family == "sd2") if v_parameterization is None else v_parameterization
    network_args = {"conv_dim": str(conv_rank), "conv_alpha": str(float(conv_rank))} if conv_rank else {}
    metadata = network_metadata(family, str(rank), str(float(rank)), network_args, v)
    if include_modelspec:
        metadata.update(modelspec(family, title or Path(output).stem, v_parameterization=v))
    saved = save_lora(tensors, output, metadata, save_dtype=save_dtype, overwrite=overwrite)
    return ExtractResult(saved, family, include_te, te_max, retained)
