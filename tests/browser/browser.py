"""What the browser tests share: the WebUI of ``A1111_DIR``, Debian's chromium (``CHROMIUM``, default
/usr/bin/chromium) and Playwright; a test module that imports this is skipped, saying which is missing."""
from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "e2e"))
from webui import BUILTIN_NAME, EXTENSION_NAME, ROOT, WebUI, checkpoint, webui_dir  # noqa: E402,F401

WEBUI = webui_dir("the browser test")
CHROMIUM = os.environ.get("CHROMIUM", "/usr/bin/chromium")
if not Path(CHROMIUM).exists():
    pytest.skip(f"no chromium at {CHROMIUM} (set CHROMIUM)", allow_module_level=True)
sync_api = pytest.importorskip("playwright.sync_api", reason="pip install playwright")
CKPT = checkpoint(WEBUI)
