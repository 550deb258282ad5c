"""What a LoRA file holds, without the WebUI: family, algorithms, rank/alpha per module, metadata, hashes, and its
influence per block (``||dW||_F`` summed per block, at multiplier 1), optionally drawn as a bar chart (Pillow).

Without a model the deltas come from the file alone (``lora_file``), which covers every algorithm whose change
does not depend on the layer's weight; the others are listed under ``needs_model``. With ``model`` (a checkpoint)
the file is mapped exactly as the runtime maps it and every algorithm counts (``blocks.block_of``).
"""
from __future__ import annotations

import hashlib
import importlib.util
import os
from collections import Counter
from pathlib import Path
from typing import Any, Iterable, Mapping

import torch

from ..families import family_name
from ..blocks import OTHER, block_ids, block_of
from ..errors import FamilyMismatchError, LoraFileError, UnsupportedLayerError
from ..io import SAFETENSORS_SUFFIX, model_hash
from ..network import load_network
from .checkpoint import LEGACY_HASH_LENGTH, LEGACY_HASH_OFFSET, CheckpointReader
from .checks import require_writable_folder, same_file
from .common import FamiliesDifferError, ToolError, UsageError
from .lora_file import read_lora
from .names import block_of_name


def legacy_hash(path: str | os.PathLike) -> str:
    """sd-webui-additional-networks' old hash of a file: sha256 of its 64 KiB at 1 MiB, first 8 hex digits."""
    with open(path, "rb") as file:
        file.seek(LEGACY_HASH_OFFSET)
        return hashlib.sha256(file.read(LEGACY_HASH_LENGTH)).hexdigest()[:8]


def _empty_norms(family: str | None) -> dict[str, float]:
    return dict.fromkeys(block_ids(family), 0.0) if family in ("sd1", "sd2", "sdxl") else {}


def _norms_from_file(contents) -> tuple[dict[str, float], list[str]]:
    norms, needs_model = _empty_norms(contents.family), []
    with torch.no_grad():
        for name, module in contents.modules.items():
            try:
                delta = module.delta()
            except UnsupportedLayerError:
                needs_model.append(name)
                continue
            block = block_of_name(name)
            norms[block] = norms.get(block, 0.0) + float(torch.linalg.vector_norm(delta))
    return norms, needs_model


def _norms_on_model(path: Path, model: str | os.PathLike) -> dict[str, float]:
    with CheckpointReader(model) as reader:
        reader.require_model("the model (--model)")
        index = reader.index
        try:
            network = load_network(path, index)
        except FamilyMismatchError as e:
            raise FamiliesDifferError(e.path, e.file_family, str(model), index.family) from None
        norms = _empty_norms(index.family)
        with torch.no_grad():
            for target, adapter in network.adapters.items():
                where = index.weight_key(target)
                delta = adapter.delta_weight(where.of(reader.get(where.key)).float())
                block = block_of(index, target)
                norms[block] = norms.get(block, 0.0) + float(torch.linalg.vector_norm(delta))
    return norms


def _module_row(module) -> dict[str, Any]:
    return {"name": module.name, "algorithm": module.algorithm, "rank": module.rank, "alpha": module.alpha,
            "block": block_of_name(module.name)}


def inspect_lora(path: str | os.PathLike, model: str | os.PathLike | None = None) -> dict[str, Any]:
    """A plain-data description of a LoRA file (see the module docstring). Raises LoraFileError (also for a
    checkpoint or any file with no LoRA module, saying what it is), FamilyMismatchError (with ``model`` of another
    family)."""
    path = Path(path)
    contents = read_lora(path)
    modules = [_module_row(m) for m in contents.modules.values()]
    stored = contents.metadata.get("sshs_model_hash")
    computed = model_hash(path)
    info: dict[str, Any] = {
        "path": str(path),
        "family": contents.family,
        "algorithms": dict(Counter(m["algorithm"] for m in modules)),
        "ranks": dict(Counter(m["rank"] for m in modules)),
        "alphas": dict(Counter(m["alpha"] for m in modules)),
        "modules": modules,
        "other_keys": sorted(contents.other),
        "metadata": contents.metadata,
        "hashes": {"model_hash": computed, "shorthash": computed[:12], "legacy_hash": legacy_hash(path),
                   "sshs_model_hash": stored, "sshs_matches": None if stored is None else stored == computed}
        if path.suffix.lower() == SAFETENSORS_SUFFIX else {"model_hash": computed, "shorthash": computed[:12]},
    }
    if model is None:
        info["block_norms"], info["needs_model"] = _norms_from_file(contents)
    else:
        info["block_norms"], info["needs_model"] = _norms_on_model(path, model), []
    return info


def format_report(info: Mapping[str, Any]) -> str:
    """A human-readable summary of :func:`inspect_lora`'s result."""
    family = (f"{family_name(info['family'])} ({info['family']})" if info["family"] else
              "unknown (neither its metadata nor its key names say SD1, SD2, SDXL, SDXL refiner or SD3)")
    lines = [f"file:       {info['path']}", f"family:     {family}",
             f"algorithms: {info['algorithms']}", f"ranks:      {info['ranks']}", f"alphas:     {info['alphas']}",
             f"modules:    {len(info['modules'])}"]
    hashes = info["hashes"]
    lines.append(f"hash:       {hashes['model_hash']} (short {hashes['shorthash']})")
    if "legacy_hash" in hashes:
        lines.append(f"legacy:     {hashes['legacy_hash']}; sshs_model_hash in metadata: "
                     f"{hashes['sshs_model_hash'] or 'none'}" +
                     ("" if hashes["sshs_matches"] is None else f" ({'matches' if hashes['sshs_matches'] else 'STALE'})"))
    lines.append("metadata:   " + (", ".join(f"{k}={v[:60]}" for k, v in sorted(info["metadata"].items())
                                             if k != "ss_tag_frequency") or "none"))
    norms = info["block_norms"]
    if norms:
        top = max(norms.values()) or 1.0
        lines.append("block influence (sum of ||dW|| per block):")
        lines += [f"  {block:6} {value:12.4f} {'#' * round(40 * value / top)}" for block, value in norms.items()]
    if info["needs_model"]:
        lines.append(f"not counted without --model: {len(info['needs_model'])} modules (e.g. {info['needs_model'][0]})")
    for module in info["modules"]:
        lines.append(f"  {module['name']:80} {module['algorithm']:6} rank {module['rank']} alpha {module['alpha']}")
    return "\n".join(lines)


def check_chart_path(path: str | os.PathLike, inputs: Iterable[str | os.PathLike | None] = ()) -> Path:
    """Refuse, before any work, a chart path that is not .png, is one of ``inputs``, or cannot be written; and
    a missing Pillow."""
    path = Path(path)
    if path.suffix.lower() != ".png":
        raise UsageError(f"{path}: the chart is a PNG file; give a name ending in .png")
    for source in inputs:
        if source is not None and same_file(path, source):
            raise UsageError(f"{path}: the chart would replace an input ({source})")
    if path.is_dir():
        raise LoraFileError(path, "is a directory")
    require_writable_folder(path.parent)
    if importlib.util.find_spec("PIL") is None:
        raise ToolError("drawing the chart needs Pillow (pip install pillow)")
    return path


def render_block_chart(norms: Mapping[str, float], path: str | os.PathLike, title: str = "") -> Path:
    """A bar chart of block influence as a PNG (Pillow only)."""
    from PIL import Image, ImageDraw

    blocks = [b for b in norms if b != OTHER or norms[b]]
    bar, gap, left, top, bottom = 22, 6, 60, 30, 60
    width = left + len(blocks) * (bar + gap) + 20
    height = 320
    image = Image.new("RGB", (max(width, 240), height), "white")
    draw = ImageDraw.Draw(image)
    draw.text((10, 8), title or "block influence (sum of ||dW||)", fill="black")
    peak = max((norms[b] for b in blocks), default=0.0) or 1.0
    area = height - top - bottom
    draw.line([(left - 4, top), (left - 4, top + area)], fill="gray")
    draw.text((4, top - 4), f"{peak:.3g}", fill="gray")
    draw.text((4, top + area - 8), "0", fill="gray")
    for i, block in enumerate(blocks):
        x = left + i * (bar + gap)
        h = round(area * norms[block] / peak)
        color = (70, 110, 200) if block != "BASE" else (200, 120, 60)
        draw.rectangle([x, top + area - h, x + bar, top + area], fill=color)
        label = Image.new("RGB", (50, 14), "white")
        ImageDraw.Draw(label).text((0, 0), block, fill="black")
        image.paste(label.rotate(90, expand=True), (x + 4, top + area + 4))
    path = Path(path)
    image.save(path, format="PNG")
    return path
