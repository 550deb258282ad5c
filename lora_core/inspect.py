"""What a LoRA file is and how it fits the loaded model, as plain data (for the API, the UI and the CLI)."""
from __future__ import annotations

from collections import Counter
from typing import Any

from .blocks import block_norms
from .errors import LoraFileError
from .families import family_name
from .library import LoraEntry
from .runtime import LoraRuntime


def listing(entry: LoraEntry) -> dict[str, Any]:
    """One entry as the built-in's ``/sdapi/v1/loras`` gives it."""
    try:
        metadata = entry.metadata
    except LoraFileError:
        metadata = {}
    return {"name": entry.name, "alias": entry.alias, "path": str(entry.path), "metadata": metadata}


def describe(runtime: LoraRuntime, name: str) -> dict[str, Any]:
    """Family, algorithms, ranks, alphas, layer counts and the fate of every key, for the loaded model.

    Raises LoraError (not found, unreadable, wrong family, nothing matches)."""
    entry = runtime.resolve(name)
    info: dict[str, Any] = listing(entry)
    info.update(hash=entry.hash, shorthash=entry.shorthash, sd_version=entry.sd_version)
    index = runtime.index
    if index is None:
        info["model_family"] = None
        return info
    # the families as a person reads them: 'SDXL', 'SD1.x inpainting', 'SDXL refiner', 'SD3'
    info.update(model_variant=index.variant, model_family_name=family_name(index.family, index.variant))
    network = runtime.load(entry)
    adapters = network.adapters
    te = sum(1 for t in adapters if index.is_text_encoder(t))
    report = network.report
    info.update(
        family=network.family,
        family_name=family_name(network.family) if network.family else None,
        model_family=index.family,
        algorithms=network.algorithms(),
        # JSON object keys must be strings (the WebUI serialises with orjson, which refuses others)
        ranks={str(k): n for k, n in Counter(getattr(a, "rank", None) for a in adapters.values()).items()},
        scales={str(k): n for k, n in Counter(round(getattr(a, "scale", 1.0), 6)
                                              for a in adapters.values()).items()},
        layers={"total": len(adapters), "te": te, "unet": len(adapters) - te},
        keys={"total": report.total, "used": len(report.used), "unmatched": report.unmatched,
              "unknown": report.unknown, "unused": report.unused, "problems": report.problems},
        embeddings=sorted(network.embeddings),
        block_norms=block_norms(network, index),  # the LoRA's influence per block: sum of ||dW|| at weight 1
    )
    return info
