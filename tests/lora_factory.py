"""Random LoRA state dicts for the tiny models, written the way kohya's sd-scripts names them.

Names come from the model index (kohya style: ``lora_unet_<compvis path>``, ``lora_te_<HF CLIP path>``), so
these files exercise the math, not the naming; the naming is proven against third-party writers (PEFT /
diffusers) in test_keymap.py.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterable

import torch
from torch import nn

from lora_core.model_index import ModelIndex, Target


@dataclass(frozen=True)
class LoraSpec:
    rank: int = 4
    alpha: float | None = 2.0
    tucker: bool = False  # lora_mid for k x k convs
    dora: bool = False
    dora_on_out: bool = False
    bias: bool = False
    scale_key: float | None = None
    dtype: torch.dtype = torch.float32
    std: float = 0.2


def kohya_names_of(index: ModelIndex) -> dict[Target, str]:
    """The kohya module name of every target the index names (the first it knows; prefers the file-style TE and
    ``lora_unet_`` names), in one pass: files for thousands of layers are made with one lookup each."""
    first: dict[Target, str] = {}
    preferred: dict[Target, str] = {}
    for name, target in index.kohya_names():
        first.setdefault(target, name)
        if "text_model" in name or name.startswith("lora_unet_"):
            preferred.setdefault(target, name)
    return {**first, **preferred}


def kohya_name_of(index: ModelIndex, target: Target) -> str:
    """The kohya module name of one target (``kohya_names_of``)."""
    return kohya_names_of(index)[target]


def pick_targets(index: ModelIndex, kinds: Iterable[type] = (nn.Linear, nn.Conv2d, nn.MultiheadAttention),
                 limit_per_kind: int | None = None) -> list[Target]:
    seen: dict[type, int] = {}
    out = []
    for name, mod in index.modules.items():
        kind = next((k for k in kinds if isinstance(mod, k)), None)
        if kind is None or name.endswith("out_proj") and isinstance(index.modules.get(name[:-9]), nn.MultiheadAttention):
            continue
        if limit_per_kind is not None and seen.get(kind, 0) >= limit_per_kind:
            continue
        seen[kind] = seen.get(kind, 0) + 1
        if isinstance(mod, nn.MultiheadAttention):
            out += [Target(name, p) for p in ("q", "k", "v", "out")]
        else:
            out.append(Target(name))
    return out


def lora_tensors(weight_shape: tuple[int, ...], spec: LoraSpec, gen: torch.Generator) -> dict[str, torch.Tensor]:
    out_dim, in_dim = weight_shape[0], weight_shape[1]
    kernel = tuple(weight_shape[2:])
    r = spec.rank

    def rnd(*shape):
        return (torch.randn(*shape, generator=gen) * spec.std).to(spec.dtype)

    t: dict[str, torch.Tensor] = {}
    if kernel and math.prod(kernel) > 1 and spec.tucker:
        t["lora_down.weight"] = rnd(r, in_dim, 1, 1)
        t["lora_mid.weight"] = rnd(r, r, *kernel)
        t["lora_up.weight"] = rnd(out_dim, r, 1, 1)
    elif kernel:
        t["lora_down.weight"] = rnd(r, in_dim, *kernel)
        t["lora_up.weight"] = rnd(out_dim, r, 1, 1)
    else:
        t["lora_down.weight"] = rnd(r, in_dim)
        t["lora_up.weight"] = rnd(out_dim, r)
    if spec.alpha is not None:
        t["alpha"] = torch.tensor(float(spec.alpha))
    if spec.scale_key is not None:
        t["scale"] = torch.tensor(float(spec.scale_key))
    if spec.dora:
        if spec.dora_on_out:
            t["dora_scale"] = (torch.rand(out_dim, *([1] * (len(weight_shape) - 1)), generator=gen) + 0.5).to(spec.dtype)
        else:
            t["dora_scale"] = (torch.rand(1, in_dim, *([1] * len(kernel)), generator=gen) + 0.5).to(spec.dtype)
    if spec.bias:
        t["bias"] = rnd(*weight_shape)
    return t


def make_kohya_lora(index: ModelIndex, targets: Iterable[Target], spec: LoraSpec = LoraSpec(),
                    seed: int = 0) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    sd: dict[str, torch.Tensor] = {}
    names = kohya_names_of(index)
    for target in targets:
        name = names[target]
        for k, v in lora_tensors(index.weight_shape(target), spec, gen).items():
            sd[f"{name}.{k}"] = v
    return sd


def expected_delta(tensors: dict[str, torch.Tensor], weight: torch.Tensor, dyn: int | None = None) -> torch.Tensor:
    """dW at multiplier 1 from SPEC §6, written independently of lora_core (the oracle of the math tests)."""
    up = tensors["lora_up.weight"].double()
    down = tensors["lora_down.weight"].double()
    mid = tensors.get("lora_mid.weight")
    r = down.shape[0]
    k = r if dyn is None else dyn
    up2 = up.reshape(up.shape[0], -1)[:, :k]
    down2 = down.reshape(r, -1)[:k]
    if mid is not None:
        m = mid.double()[:k, :k]
        dw = torch.zeros(weight.shape, dtype=torch.float64)
        for i in range(m.shape[2]):
            for j in range(m.shape[3]):
                dw[:, :, i, j] = up2 @ m[:, :, i, j] @ down2
    else:
        dw = (up2 @ down2).reshape(weight.shape)
    if "bias" in tensors:
        dw = dw + tensors["bias"].double().reshape(weight.shape)
    if "scale" in tensors:
        s = float(tensors["scale"])
    else:
        a = float(tensors["alpha"]) if "alpha" in tensors else 0.0
        s = a / r if a != 0 else 1.0
    dw = dw * s
    if "dora_scale" in tensors:
        w0 = weight.double()
        merged = w0 + dw
        mag = tensors["dora_scale"].double()
        if mag.shape[0] == 1 and mag.dim() >= 2:
            norm = torch.stack([merged[:, j].norm() for j in range(merged.shape[1])]).reshape(mag.shape)
        else:
            norm = torch.stack([merged[i].norm() for i in range(merged.shape[0])]).reshape(mag.shape)
        dw = merged * mag / norm - w0
    return dw


def _divisor(n: int, near: int) -> int:
    """A divisor of n close to ``near`` (1 if n is prime)."""
    return min((d for d in range(1, n + 1) if n % d == 0), key=lambda d: (abs(d - near), d))


def lycoris_tensors(kind: str, weight_shape: tuple[int, ...], gen: torch.Generator, rank: int = 4,
                    std: float = 0.05) -> dict[str, torch.Tensor]:
    """Random non-zero tensors in the key layout LyCORIS writes, for property tests over every algorithm
    (the algorithms' math is proven against lycoris-lora itself in test_lycoris_a/b.py)."""
    out_dim = weight_shape[0]
    rest = math.prod(weight_shape[1:])

    def rnd(*shape):
        return torch.randn(*shape, generator=gen) * std

    if kind == "loha":
        return {"hada_w1_a": rnd(out_dim, rank), "hada_w1_b": rnd(rank, rest) * 10,
                "hada_w2_a": rnd(out_dim, rank), "hada_w2_b": rnd(rank, rest) * 10, "alpha": torch.tensor(2.0)}
    if kind == "lokr":
        a, c = _divisor(out_dim, 4), _divisor(rest, 4)
        return {"lokr_w1": rnd(a, c) * 10, "lokr_w2_a": rnd(out_dim // a, rank), "lokr_w2_b": rnd(rank, rest // c),
                "alpha": torch.tensor(float(rank))}
    if kind == "full":
        return {"diff": rnd(*weight_shape)}
    if kind == "ia3":
        return {"weight": rnd(out_dim)}
    if kind == "norm":
        return {"w_norm": rnd(out_dim), "b_norm": rnd(out_dim)}
    if kind == "oft":
        b = _divisor(out_dim, 8)
        return {"oft_blocks": rnd(out_dim // b, b, b), "alpha": torch.tensor(0.0)}
    raise ValueError(kind)


def make_lycoris(index: ModelIndex, targets: Iterable[Target], kind: str, seed: int = 0,
                 rank: int = 4) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    sd: dict[str, torch.Tensor] = {}
    names = kohya_names_of(index)
    for target in targets:
        for k, v in lycoris_tensors(kind, index.weight_shape(target), gen, rank=rank).items():
            sd[f"{names[target]}.{k}"] = v
    return sd


def assert_both_modes_give(index: ModelIndex, net, target: Target, run, want: torch.Tensor, m: float,
                           tag: object = "", tolerance: float = 1e-5) -> None:
    """Bypass and merged each make ``run()`` (the layer's output) equal ``want`` within ``tolerance`` relative,
    and the weight is back bit for bit afterwards."""
    from lora_core.patch import Patcher

    base = index.weight(target).detach().clone()
    with Patcher(index) as patcher:
        for mode in ("bypass", "merged"):
            patcher.apply(net.plan(index, te=m, unet=m), mode)
            got = run()
            err = float((got.double() - want.double()).norm() / want.double().norm().clamp_min(1e-30))
            assert err < tolerance, (tag, mode, m, err)
    assert torch.equal(index.weight(target), base)
