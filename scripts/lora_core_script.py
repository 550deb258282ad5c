"""sd-webui-lora-core: the WebUI's entry point into this extension. It only registers callbacks; the logic lives
in ``lora_core`` (no WebUI imports) and the thin glue package ``scripts/lora_core_webui``."""
import sys
from pathlib import Path

_HERE = Path(__file__).resolve().parent
for _path in (str(_HERE.parent), str(_HERE)):  # lora_core/ and scripts/lora_core_webui/ become importable
    if _path not in sys.path:
        sys.path.insert(0, _path)

from lora_core_webui import callbacks  # noqa: E402

callbacks.register()
