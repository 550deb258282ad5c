"""Truncated SVD of a weight change into LoRA factors, as sd-scripts' extract / resize / svd-merge do it.

``dW`` (out, in[, k, k]) is viewed as the matrix (out, in * k * k), ``U S Vh`` its SVD; rank r keeps
``up = U_r diag(S_r)`` (out, r[, 1, 1]) and ``down = Vh_r`` (r, in[, k, k]). The optional clamp limits both factors
to ``[-q, q]`` with q the given quantile (sd-scripts: 0.99) of their values together; it trades a little accuracy
for smaller outliers (fp16 files). Dynamic ranks follow sd-scripts' ``resize_lora.py``: ``sv_ratio`` keeps the
singular values above ``S[0] / param``, ``sv_cumulative`` the first whose sum reaches ``param`` of the total,
``sv_fro`` those whose Frobenius norm reaches ``param`` of the total; each then keeps one more, is at least 2 and
at most the given rank (1 for a zero matrix).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

MIN_SV = 1e-6
# each dynamic method's parameter: what it means and its valid range (low, high, whether low itself is valid)
DYNAMIC_PARAMS = {"sv_ratio": ("the largest singular value over the smallest kept", 1.0, math.inf, True),
                  "sv_fro": ("the share of the Frobenius norm kept", 0.0, 1.0, False),
                  "sv_cumulative": ("the share of the sum of singular values kept", 0.0, 1.0, False)}
DYNAMIC_METHODS = tuple(DYNAMIC_PARAMS)
_TORCH_QUANTILE_LIMIT = 2 ** 24  # torch.quantile refuses larger inputs


@dataclass(frozen=True)
class Retained:
    """How much of a change a rank keeps: sum of singular values, Frobenius norm, and S[0] / S[r-1]."""

    rank: int
    sum_retained: float
    fro_retained: float
    max_ratio: float


@dataclass
class LowRank:
    up: torch.Tensor
    down: torch.Tensor
    retained: Retained


def quantile(values: torch.Tensor, q: float) -> torch.Tensor:
    """``torch.quantile`` (linear interpolation) for inputs of any size."""
    flat = values.reshape(-1)
    if flat.numel() <= _TORCH_QUANTILE_LIMIT:
        return torch.quantile(flat, q)
    position = q * (flat.numel() - 1)
    lo, hi = math.floor(position), math.ceil(position)
    low = flat.kthvalue(lo + 1).values
    high = flat.kthvalue(hi + 1).values if hi != lo else low
    return low + (high - low) * (position - lo)


def _index_clamp(index: int, n: int) -> int:
    return max(1, min(index, n - 1))


def select_rank(s: torch.Tensor, max_rank: int, method: str | None = None, param: float | None = None) -> int:
    """The rank to keep of singular values ``s`` (descending): ``max_rank``, or dynamic (module docstring)."""
    n = s.numel()
    if method is None:
        rank = max_rank
    elif method == "sv_ratio":
        rank = _index_clamp(int((s > s[0] / param).sum()), n) + 1
    elif method == "sv_cumulative":
        cumulative = torch.cumsum(s, 0) / s.sum()
        rank = _index_clamp(int(torch.searchsorted(cumulative, torch.tensor(param, dtype=s.dtype))) + 1, n) + 1
    elif method == "sv_fro":
        squared = s.pow(2)
        cumulative = torch.cumsum(squared, 0) / squared.sum()
        rank = _index_clamp(int(torch.searchsorted(cumulative, torch.tensor(param ** 2, dtype=s.dtype))) + 1, n) + 1
    else:
        raise ValueError(f"unknown dynamic method '{method}' (choose from {', '.join(DYNAMIC_METHODS)})")
    if float(s[0]) <= MIN_SV:
        return 1
    return max(1, min(rank, max_rank, n))


def retained(s: torch.Tensor, rank: int) -> Retained:
    s = s.double()
    total, fro = float(s.abs().sum()), float(s.pow(2).sum().sqrt())
    kept = s[:rank]
    last = float(kept[-1]) if kept.numel() else 0.0
    return Retained(rank, float(kept.abs().sum()) / total if total else 1.0,
                    float(kept.pow(2).sum().sqrt()) / fro if fro else 1.0,
                    float(s[0]) / last if last else math.inf)


def low_rank(delta: torch.Tensor, max_rank: int, *, clamp_quantile: float | None = None,
             method: str | None = None, param: float | None = None,
             device: torch.device | str = "cpu") -> LowRank:
    """LoRA factors of ``delta`` (float32 results on the CPU) at ``max_rank`` or a dynamic rank."""
    shape = tuple(delta.shape)
    matrix = delta.to(device=device, dtype=torch.float32).reshape(shape[0], -1)
    u, s, vh = torch.linalg.svd(matrix, full_matrices=False)
    rank = select_rank(s, max_rank, method, param)
    up = u[:, :rank] * s[:rank]
    down = vh[:rank]
    if clamp_quantile is not None:
        high = quantile(torch.cat([up.reshape(-1), down.reshape(-1)]), clamp_quantile)
        up, down = up.clamp(-high, high), down.clamp(-high, high)
    if len(shape) == 4:
        up = up.reshape(shape[0], rank, 1, 1)
        down = down.reshape(rank, *shape[1:])
    return LowRank(up.cpu().contiguous(), down.cpu().contiguous(), retained(s.cpu(), rank))
