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


def private_data_dir(tmp_path_factory) -> Path:
    """A WebUI data folder of the test's own with this checkout in its extensions (``--data-dir``): the server
    needs no e2e lock and never touches the test bed's settings or presets. Skips without the checkpoint."""
    if not CKPT.is_file():
        pytest.skip(f"{CKPT} is missing (../shared/testbed/setup.sh makes it)")
    data = tmp_path_factory.mktemp("data")
    (data / "extensions").mkdir()
    (data / "extensions" / EXTENSION_NAME).symlink_to(ROOT)
    return data
