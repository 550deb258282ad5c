"""Textual inversions bundled in LoRA files (``bundle_emb.*``): registered with the WebUI's embedding database
while their LoRA is active, and taken out again when it is not (the built-in does the same)."""
from __future__ import annotations

from modules import sd_hijack, shared
from modules.textual_inversion import textual_inversion

from lora_core.runtime import ActiveLora

_registered: dict[str, object] = {}  # embedding name -> the Embedding we registered


def registered() -> bool:
    return bool(_registered)


def _embedding_data(vectors: dict) -> dict:
    data: dict = {}
    for name, tensor in vectors.items():
        head, _, rest = name.partition(".")
        if head == "string_to_param":
            data.setdefault("string_to_param", {})[rest] = tensor
        else:
            data[name] = tensor
    return data


def sync(active: list[ActiveLora], errors: list[str]) -> None:
    """Make the database hold exactly the bundled embeddings of ``active`` (and those it had of its own)."""
    db = sd_hijack.model_hijack.embedding_db
    wanted: dict[str, tuple[ActiveLora, dict]] = {}
    for lora in active:
        for emb_name, vectors in lora.network.embeddings.items():
            wanted[emb_name] = (lora, vectors)
    for name in [n for n in _registered if n not in wanted]:
        db.register_embedding_by_name(None, shared.sd_model, name)
        del _registered[name]
    for name, (lora, vectors) in wanted.items():
        if name in _registered:
            continue
        if name in db.word_embeddings:
            errors.append(f"<lora:{lora.request.name}>: bundled embedding '{name}' skipped: an embedding of that "
                          "name is already loaded from the embeddings folder")
            continue
        embedding = textual_inversion.create_embedding_from_data(
            _embedding_data(vectors), name, filename=f"{lora.entry.path}/{name}")
        if db.expected_shape not in (-1, embedding.shape):
            errors.append(f"<lora:{lora.request.name}>: bundled embedding '{name}' has width {embedding.shape}, "
                          f"the loaded model's text encoder {db.expected_shape}")
            continue
        db.register_embedding(embedding, shared.sd_model)
        _registered[name] = embedding
