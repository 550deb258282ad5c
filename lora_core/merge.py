"""Merged values: ``W0 + sum_i m_i dW_i`` (and biases) of one layer, computed before anything is written."""
from __future__ import annotations

from typing import TYPE_CHECKING, Callable, Sequence

import torch
from torch import nn

from .model_index import ModelIndex

if TYPE_CHECKING:
    from .patch import PlanEntry


def param_paths(module: nn.Module) -> dict[str, tuple[nn.Module, str]]:
    """The parameters a plan may change, by path: (owner module, attribute)."""
    if isinstance(module, nn.MultiheadAttention):
        return {"in_proj_weight": (module, "in_proj_weight"), "in_proj_bias": (module, "in_proj_bias"),
                "out_proj.weight": (module.out_proj, "weight"), "out_proj.bias": (module.out_proj, "bias")}
    return {"weight": (module, "weight"), "bias": (module, "bias")}


def bias_of(index: ModelIndex, target) -> torch.Tensor | None:
    """The bias a target's delta adds to (a slice of ``in_proj_bias`` for q/k/v)."""
    module = index.modules[target.module]
    if isinstance(module, nn.MultiheadAttention):
        if target.part == "out":
            return module.out_proj.bias
        return None if module.in_proj_bias is None else module.in_proj_bias[index.rows(target)]
    bias = getattr(module, "bias", None)
    rows = index.rows(target)  # a q/k/v part of SD3's fused qkv Linear
    return bias if bias is None or rows is None else bias[rows]


def merged_values(index: ModelIndex, module: nn.Module, entries: Sequence["PlanEntry"],
                  multipliers: Sequence[float], device: torch.device,
                  live: Callable[[str, torch.Tensor], bool] | None = None) -> dict[str, torch.Tensor]:
    """``W0 + sum_i m_i dW_i`` (and biases) per parameter path, float32 on ``device``.

    Deltas are accumulated straight into one float32 copy of each parameter (``Adapter.add_delta``, a fused
    ``addmm_`` for plain LoRA and LoHa, a broadcast ``addcmul_`` for LoKr): merging is bound by memory passes over
    the touched weights. The weights read are the layer's current ones, which the caller has restored to the
    originals. ``live(path, tensor)`` true: accumulate into the parameter itself (the caller has backed it up).
    """
    paths = param_paths(module)
    out: dict[str, torch.Tensor] = {}

    def buffer(path: str) -> torch.Tensor:
        if path not in out:
            owner, attr = paths[path]
            current = getattr(owner, attr)
            if current is not None and live is not None and live(path, current.detach()):
                out[path] = current.detach()
            elif current is not None:  # contiguous whatever the layer's layout (--opt-channelslast): the
                # fused adds view it as a matrix; writing it back restores the layout
                out[path] = current.detach().to(device=device, dtype=torch.float32, copy=True,
                                                memory_format=torch.contiguous_format)
            else:  # a bias the layer does not have yet: one value per output row of its weight
                rows = 3 * module.embed_dim if path == "in_proj_bias" else owner.weight.shape[0]
                out[path] = torch.zeros(rows, dtype=torch.float32, device=device)
        return out[path]

    for entry, m in zip(entries, multipliers):
        if m == 0:
            continue
        target = entry.target
        base = index.weight(target).detach()
        db = entry.adapter.delta_bias(bias_of(index, target), device)
        rows = index.rows(target)  # q/k/v rows of a packed weight (MultiheadAttention, SD3's fused qkv)
        if isinstance(module, nn.MultiheadAttention) and target.part != "out":
            weight_view = buffer("in_proj_weight")[rows]
            bias_view = None if db is None else buffer("in_proj_bias")[rows]
        else:
            prefix = "out_proj." if isinstance(module, nn.MultiheadAttention) else ""
            weight_view = buffer(prefix + "weight")
            bias_view = None if db is None else buffer(prefix + "bias")
            if rows is not None:  # rows of a contiguous matrix: contiguous, as add_delta wants
                weight_view = weight_view[rows]
                bias_view = None if bias_view is None else bias_view[rows]
        entry.adapter.add_delta(weight_view, base.to(device), m, entry.dyn)
        if db is not None:
            bias_view.add_(db.to(device), alpha=m)
    return out
