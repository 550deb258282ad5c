"""An index of the layers a LoRA can target in one loaded model, under the names A1111 gives them.

A1111 v1.10 holds a Stable Diffusion model as one module tree:
- UNet: ``model.diffusion_model.*`` (ldm / sgm ``UNetModel``);
- SD1: ``cond_stage_model.wrapped.transformer.text_model.*`` (HF ``CLIPTextModel``);
- SD2: ``cond_stage_model.wrapped.model.transformer.resblocks.*`` (OpenCLIP, q/k/v inside
  ``attn.in_proj_weight`` of an ``nn.MultiheadAttention``);
- SDXL: ``conditioner.embedders.0.wrapped.transformer.*`` (CLIP-L) and
  ``conditioner.embedders.1.wrapped.model.*`` (OpenCLIP bigG);
- SDXL refiner: one text encoder, ``conditioner.embedders.0.wrapped.model.*`` (OpenCLIP bigG, which kohya and
  diffusers call text encoder 2: ``lora_te2_``, ``text_encoder_2.``), and a UNet of other widths and blocks;
- SD3 (``SD3Inferencer``): the MMDiT at ``model.diffusion_model.*`` (``joint_blocks.{i}.{x,context}_block``,
  whose ``attn.qkv`` is one fused Linear: its q, k and v rows are targets of their own, as the built-in splits
  them), text encoders ``text_encoders.clip_l.transformer.*``, ``text_encoders.clip_g.transformer.*`` (both
  HF-CLIP layout: ``lora_te1_``, ``lora_te2_``) and ``text_encoders.t5xxl.transformer.*`` (``lora_te3_``).
``.wrapped`` is inserted by A1111's hijack; trees without it (a checkpoint as ldm builds it) are accepted too.

The index is built once per loaded model (per instance: nothing here touches torch classes) and answers:
which module a kohya-style name means, whether it belongs to a text encoder or the UNet, and the
weight view of a target (a q/k/v slice of ``in_proj_weight`` included).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import torch
from torch import nn

from .families import FAMILIES

SUPPORTED_TYPES = (nn.Linear, nn.Conv2d, nn.GroupNorm, nn.LayerNorm, nn.MultiheadAttention)
MHA_PARTS = ("q", "k", "v")
#: SD3's fused attention input (A1111's ``QkvLinear``): rows q, k, v of one Linear, named ``..._attn_qkv``
FUSED_QKV_SUFFIX = ".attn.qkv"
#: the UNet's first convolution: its input channels beyond the latent's 4 tell an inpainting / pix2pix model
CONV_IN = "model.diffusion_model.input_blocks.0.0"
_VARIANTS = {9: "inpaint", 8: "pix2pix"}


@dataclass(frozen=True, order=True)
class Target:
    """A patchable weight: a module, and for ``nn.MultiheadAttention`` which projection (q, k, v or out)."""

    module: str
    part: str | None = None

    def __str__(self) -> str:
        return self.module if self.part is None else f"{self.module}[{self.part}]"


@dataclass(frozen=True)
class Component:
    """One sub-model (UNet or a text encoder): where it sits in the tree and how kohya names it."""

    kind: str  # 'unet' or 'te'
    prefix: str  # dotted path of the component root, ending with '.'
    kohya_prefixes: tuple[str, ...]  # e.g. ('lora_te1_',)
    style: str  # 'compvis', 'hf_clip' or 'open_clip'


def _first_present(names: set[str], candidates: tuple[str, ...]) -> str | None:
    for c in candidates:
        if c.rstrip(".") in names:
            return c
    return None


def detect_components(module_names: set[str]) -> tuple[str, list[Component]]:
    """Find the family and the components from the module names of the tree."""
    comps: list[Component] = []
    if "model.diffusion_model" in module_names:
        comps.append(Component("unet", "model.diffusion_model.", ("lora_unet_",), "compvis"))
    if "model.diffusion_model.joint_blocks" in module_names:
        for name, kohya, style in (("clip_l", "lora_te1_", "hf_clip"), ("clip_g", "lora_te2_", "hf_clip"),
                                   ("t5xxl", "lora_te3_", "t5")):
            prefix = f"text_encoders.{name}.transformer."
            if prefix.rstrip(".") in module_names:
                comps.append(Component("te", prefix, (kohya,), style))
        return "sd3", comps
    if "conditioner.embedders.0" in module_names:
        encoders = []
        for i in (0, 1):
            base = f"conditioner.embedders.{i}."
            hf = _first_present(module_names, (base + "wrapped.transformer.", base + "transformer."))
            oc = _first_present(module_names, (base + "wrapped.model.", base + "model."))
            if hf is not None:
                encoders.append((hf, "hf_clip"))
            elif oc is not None:
                encoders.append((oc, "open_clip"))
        # the refiner's only text encoder is OpenCLIP bigG, the base model's second: kohya's and diffusers' te2
        family = "sdxl_refiner" if [style for _, style in encoders] == ["open_clip"] else "sdxl"
        kohya_names = ("lora_te2_",) if family == "sdxl_refiner" else ("lora_te1_", "lora_te2_")
        comps += [Component("te", prefix, (kohya,), style) for (prefix, style), kohya in zip(encoders, kohya_names)]
        return family, comps
    hf = _first_present(module_names, ("cond_stage_model.wrapped.transformer.", "cond_stage_model.transformer."))
    oc = _first_present(module_names, ("cond_stage_model.wrapped.model.", "cond_stage_model.model."))
    if hf is not None:
        # some SD1 files name the single encoder te1 (A1111 accepts that too)
        comps.append(Component("te", hf, ("lora_te_", "lora_te1_"), "hf_clip"))
        return "sd1", comps
    if oc is not None:
        # diffusers' kohya conversion names any single encoder te1 (`text_encoder.` -> `lora_te1_`)
        comps.append(Component("te", oc, ("lora_te_", "lora_te1_"), "open_clip"))
        return "sd2", comps
    return "unknown", comps


_OPEN_CLIP_TO_HF = (
    ("transformer_resblocks_", "text_model_encoder_layers_"),
    ("_mlp_c_fc", "_mlp_fc1"),
    ("_mlp_c_proj", "_mlp_fc2"),
    ("_ln_1", "_layer_norm1"),
    ("_ln_2", "_layer_norm2"),
)


def _open_clip_hf_name(underscored: str) -> str | None:
    """HF-CLIP style name (what kohya writes) of an OpenCLIP module, or None if it has no HF counterpart."""
    if underscored == "ln_final":
        return "text_model_final_layer_norm"
    if not underscored.startswith("transformer_resblocks_"):
        return None
    out = underscored
    for a, b in _OPEN_CLIP_TO_HF:
        out = out.replace(a, b)
    if out.endswith("_attn"):
        return out[: -len("_attn")] + "_self_attn"
    if out.endswith("_attn_out_proj"):
        return None  # handled as the 'out' part of the MultiheadAttention
    return out


class ModelIndex:
    """The patchable layers of one loaded model instance."""

    def __init__(self, root: nn.Module):
        self.root = root
        self.modules: dict[str, nn.Module] = {}
        for name, mod in root.named_modules():
            if isinstance(mod, SUPPORTED_TYPES):
                self.modules[name] = mod
        all_names = {name for name, _ in root.named_modules()}
        self.family, self.components = detect_components(all_names)
        conv_in = self.modules.get(CONV_IN)
        #: 'inpaint' or 'pix2pix' when the UNet takes conditioning channels besides the latent, else None
        self.variant = _VARIANTS.get(conv_in.in_channels) if isinstance(conv_in, nn.Conv2d) else None
        self._kohya: dict[str, Target] = {}
        self._component_of: dict[str, Component] = {}
        self._build_lookup()

    # ------------------------------------------------------------------ lookup
    def _component_for(self, name: str) -> Component | None:
        for comp in self.components:
            if name.startswith(comp.prefix):
                return comp
        return None

    def _build_lookup(self) -> None:
        mha_out = {name + ".out_proj" for name, m in self.modules.items() if isinstance(m, nn.MultiheadAttention)}
        for name, mod in self.modules.items():
            comp = self._component_for(name)
            if comp is None:
                continue
            self._component_of[name] = comp
            rel = name[len(comp.prefix):].replace(".", "_")
            keys: list[tuple[str, Target]] = []
            if name in mha_out:
                owner = name[: -len(".out_proj")]
                keys.append((rel, Target(owner, "out")))
            elif isinstance(mod, nn.MultiheadAttention):
                for p in MHA_PARTS:
                    keys.append((f"{rel}_{p}_proj", Target(name, p)))
                keys.append((f"{rel}_out_proj", Target(name, "out")))
            else:
                keys.append((rel, Target(name)))
                if self.is_fused_qkv(name):  # the whole fused Linear (kohya) or each of its q/k/v rows
                    keys += [(f"{rel}_{p}_proj", Target(name, p)) for p in MHA_PARTS]
            for sub, target in keys:
                names = [sub]
                if comp.style == "open_clip":
                    hf = _open_clip_hf_name(sub if not sub.endswith(("_q_proj", "_k_proj", "_v_proj", "_out_proj"))
                                            else sub.rsplit("_", 2)[0])
                    if hf is not None:
                        if target.part is not None:
                            hf = f"{hf}_{target.part}_proj"
                        names.append(hf)
                # transformers 5 dropped CLIPTextModel's `text_model` level: PEFT/diffusers files written with it
                # name `encoder.layers...` what transformers 4 (and A1111) call `text_model.encoder.layers...`
                names += [n[len("text_model_"):] for n in names if n.startswith("text_model_")]
                for kohya in comp.kohya_prefixes:
                    for n in names:
                        self._kohya.setdefault(kohya + n, target)

    def is_fused_qkv(self, name: str) -> bool:
        """Whether a module is SD3's fused q/k/v Linear (A1111's ``QkvLinear``)."""
        mod = self.modules.get(name)
        return (self.family == "sd3" and isinstance(mod, nn.Linear) and name.endswith(FUSED_QKV_SUFFIX)
                and mod.out_features % 3 == 0)

    def rows(self, target: Target) -> slice | None:
        """The rows of the module's packed weight a q/k/v target changes (``in_proj_weight`` of a
        MultiheadAttention, or a fused qkv Linear's weight); None for a whole weight."""
        if target.part not in MHA_PARTS:
            return None
        mod = self.modules[target.module]
        d = mod.embed_dim if isinstance(mod, nn.MultiheadAttention) else mod.out_features // 3
        i = MHA_PARTS.index(target.part)
        return slice(i * d, (i + 1) * d)

    def lookup(self, kohya_name: str) -> Target | None:
        """The target a kohya-style module name (``lora_unet_...``, ``lora_te1_...``) means in this model."""
        return self._kohya.get(kohya_name)

    def kohya_names(self) -> Iterator[tuple[str, Target]]:
        return iter(self._kohya.items())

    # ------------------------------------------------------------------ facts about targets
    def component(self, target: Target) -> Component:
        return self._component_of[target.module]

    def is_text_encoder(self, target: Target) -> bool:
        return self.component(target).kind == "te"

    def module(self, target: Target) -> nn.Module:
        return self.modules[target.module]

    def weight(self, target: Target) -> torch.Tensor:
        """The weight a target changes (a view into ``in_proj_weight`` for q/k/v)."""
        mod = self.modules[target.module]
        if isinstance(mod, nn.MultiheadAttention):
            if target.part == "out":
                return mod.out_proj.weight
            return mod.in_proj_weight[self.rows(target)]
        rows = self.rows(target)
        return mod.weight if rows is None else mod.weight[rows]

    def weight_shape(self, target: Target) -> tuple[int, ...]:
        return tuple(self.weight(target).shape)
