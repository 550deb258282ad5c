"""sd-webui-lora-core: load, map and apply LoRA (and LyCORIS) networks to Stable Diffusion models.

The library imports nothing from the WebUI and has no side effects at import; `scripts/` is the thin glue.
"""
__version__ = "0.1.0"
