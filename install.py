"""Run by the WebUI's launcher at start-up. lora-core needs only packages the WebUI already ships (torch,
safetensors, gradio, numpy, Pillow), so this installs nothing; it only says if one is missing."""
import importlib.util

_missing = [m for m in ("torch", "safetensors", "gradio", "numpy", "PIL") if importlib.util.find_spec(m) is None]
if _missing:
    print(f"[lora-core] missing packages the WebUI should provide: {', '.join(_missing)}")
