"""Algorithms, one module each. ``ADAPTERS`` is the registry: the first whose keys are present builds the adapter."""
from __future__ import annotations

from typing import Mapping

import torch

from ..errors import UnsupportedLayerError
from .base import Adapter, LayerOp, TargetInfo, ZeroPaddedInput, narrowed_input
from .lora import LoraAdapter
from .ia3 import IA3Adapter
from .oft import OftAdapter
from .glora import GLoraAdapter
from .loha import LohaAdapter
from .lokr import LokrAdapter
from .full import FullAdapter
from .norm import NormAdapter

ADAPTERS: list[type[Adapter]] = [LoraAdapter, IA3Adapter, OftAdapter, GLoraAdapter, LohaAdapter, LokrAdapter,
                                 FullAdapter, NormAdapter]

__all__ = ["ADAPTERS", "Adapter", "LayerOp", "TargetInfo", "build_adapter", "LoraAdapter"]


def build_adapter(params: Mapping[str, torch.Tensor], target: TargetInfo) -> tuple[Adapter, list[str]]:
    """The adapter for one file module, and the parameter names it did not use (reported, never dropped).

    A delta made for the latent's 4 input channels of a layer that takes more (an inpainting or instruct-pix2pix
    UNet's first convolution: ``base.narrowed_input``) is zero-padded on the extra channels, for every algorithm."""
    try:
        return _build(params, target)
    except UnsupportedLayerError as error:
        narrow = narrowed_input(target)
        if narrow is None:
            raise
        try:
            adapter, unused = _build(params, narrow)
        except UnsupportedLayerError:
            raise error from None
        return ZeroPaddedInput(adapter, target.shape, narrow.shape[1]), unused


def _build(params: Mapping[str, torch.Tensor], target: TargetInfo) -> tuple[Adapter, list[str]]:
    for cls in ADAPTERS:
        adapter = cls.load(params, target)
        if adapter is not None:
            return adapter, sorted(set(params) - cls.keys)
    names = ", ".join(sorted(params))
    supported = ", ".join(c.algorithm for c in ADAPTERS)
    raise UnsupportedLayerError(f"{target.name}: no supported algorithm uses the keys [{names}] (supported: {supported})")
