"""Resize a LoRA: truncated SVD of each module's change to a fixed or dynamic rank (sd-scripts ``resize_lora.py``).

Per LoRA module: ``M = up @ down`` (Tucker ``lora_mid`` rebuilt), ``U S Vh = svd(M)``, keep rank r (fixed, at most
``rank``, or dynamic: ``sv_ratio`` / ``sv_fro`` / ``sv_cumulative``, see ``svd``), ``up = U_r S_r``,
``down = Vh_r`` and ``alpha = scale * r``, so the scale alpha / rank, and with it the kept singular values of dW,
are unchanged. ``conv_rank`` (default ``rank``) applies to k x k convs. Modules of other algorithms (LoHa,
LoKr...) and DoRA modules are copied unchanged and listed; so are keys of no module (bundled embeddings).
The result reports, per module, the retained share of the singular values' sum and of the Frobenius norm.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Sequence

import torch

from .checks import check_output, require_device, require_dynamic, require_rank, require_ranks_fit
from .common import Progress, ToolError, dtype_of, step
from .lora_file import FileModule, infer_shape, read_lora
from .output import Saved, save_lora
from .svd import low_rank


@dataclass(frozen=True)
class ModuleResize:
    name: str
    old_rank: int
    new_rank: int
    new_alpha: float
    sum_retained: float
    fro_retained: float
    max_ratio: float


@dataclass
class ResizeResult:
    saved: Saved
    modules: list[ModuleResize] = field(default_factory=list)
    kept: list[str] = field(default_factory=list)  # modules copied unchanged, with the reason

    def report(self) -> str:
        """One line per module (sd-scripts' verbose output), then the mean Frobenius retention."""
        lines = [f"{m.name:75} | rank {m.old_rank} -> {m.new_rank}, alpha {m.new_alpha:g} | sum(S) retained: "
                 f"{m.sum_retained:.1%}, fro retained: {m.fro_retained:.1%}, max(S) ratio: {m.max_ratio:0.1f}"
                 for m in self.modules]
        if self.modules:
            mean = sum(m.fro_retained for m in self.modules) / len(self.modules)
            lines.append(f"average Frobenius norm retained: {mean:.2%} over {len(self.modules)} modules")
        lines += [f"kept unchanged: {k}" for k in self.kept]
        return "\n".join(lines)


def _resizable(module: FileModule) -> str | None:
    """Why a module is not resized, or None when it is."""
    if "lora_down.weight" not in module.params or "lora_up.weight" not in module.params:
        return "not a LoRA module"
    if "dora_scale" in module.params or "bias" in module.params:
        return "DoRA / bias: its change is not a low-rank product"
    return None


def _resize_module(module: FileModule, rank: int, conv_rank: int, dynamic: str | None, param: float | None,
                   device: str) -> tuple[dict[str, torch.Tensor], ModuleResize]:
    adapter = module.adapter()
    scale = adapter.scale or 1.0
    unscaled = module.delta(device) / scale
    is_kxk = unscaled.dim() == 4 and unscaled.shape[2] * unscaled.shape[3] > 1
    factors = low_rank(unscaled, conv_rank if is_kxk else rank, method=dynamic, param=param, device=device)
    kept = factors.retained
    new_alpha = float(scale * kept.rank)
    tensors = {"lora_up.weight": factors.up, "lora_down.weight": factors.down, "alpha": torch.tensor(new_alpha)}
    return tensors, ModuleResize(module.name, adapter.rank, kept.rank, new_alpha, kept.sum_retained,
                                 kept.fro_retained, kept.max_ratio)


def resize(lora: str | os.PathLike, output: str | os.PathLike, *, rank: int = 4, conv_rank: int | None = None,
           dynamic: str | None = None, dynamic_param: float | None = None, save_precision: str = "fp32",
           device: str = "cpu", overwrite: bool = False, progress: Progress | None = None) -> ResizeResult:
    """Write ``output``: ``lora`` with every LoRA module at the new rank (see the module docstring).

    With ``dynamic``, ``rank`` is the most any module keeps. Raises LoraFileError, ToolError.
    """
    require_dynamic(dynamic, dynamic_param)
    require_rank(rank, "the rank (--rank)")
    require_rank(conv_rank, "the conv rank (--conv-rank)")
    save_dtype = dtype_of(save_precision)
    require_device(device)
    output = check_output(output, overwrite, [lora])
    contents = read_lora(lora)
    if dynamic is None:  # a dynamic rank is at most --rank: a large one is the usual way to let it choose
        require_ranks_fit(rank, conv_rank, [shape for module in contents.modules.values()
                                            if _resizable(module) is None
                                            and (shape := infer_shape(module.name, module.params)) is not None],
                          str(contents.path))
    tensors: dict[str, torch.Tensor] = dict(contents.other)
    result_modules: list[ModuleResize] = []
    kept: list[str] = []
    for done, (name, module) in enumerate(contents.modules.items(), 1):
        reason = _resizable(module)
        if reason is None:
            params, report = _resize_module(module, rank, conv_rank or rank, dynamic, dynamic_param, device)
            result_modules.append(report)
        else:
            params = module.params
            kept.append(f"{name} ({reason})")
        tensors.update({f"{name}.{param}": value for param, value in params.items()})
        step(progress, done, len(contents.modules), "resize")
    if not result_modules:
        raise ToolError(f"{lora}: no LoRA module to resize")
    metadata = _metadata(contents.metadata, result_modules, rank, conv_rank, dynamic, dynamic_param)
    saved = save_lora(tensors, output, metadata, save_dtype=save_dtype, overwrite=overwrite)
    return ResizeResult(saved, result_modules, kept)


def _metadata(metadata: dict[str, str], modules: Sequence[ModuleResize], rank: int, conv_rank: int | None,
              dynamic: str | None, param: float | None) -> dict[str, str]:
    """sd-scripts' changes: a training comment, and the new dim / alpha ('Dynamic' when they vary)."""
    metadata = {k: v for k, v in metadata.items() if not k.startswith("sshs_")}
    old = max(m.old_rank for m in modules)
    comment = metadata.get("ss_training_comment", "")
    if dynamic is None:
        conv = "" if conv_rank in (None, rank) else f" (conv: {conv_rank})"
        metadata["ss_training_comment"] = f"dimension is resized from {old} to {rank}{conv}; {comment}"
    else:
        metadata["ss_training_comment"] = f"Dynamic resize with {dynamic}: {param} from {old}; {comment}"
    ranks = {m.new_rank for m in modules}
    alphas = {m.new_alpha for m in modules}
    metadata["ss_network_dim"] = str(ranks.pop()) if len(ranks) == 1 else "Dynamic"
    metadata["ss_network_alpha"] = str(alphas.pop()) if len(alphas) == 1 else "Dynamic"
    return metadata
