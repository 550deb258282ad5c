"""The "LoRA Block Weight" tab in a real browser (Debian's chromium, headless, driven by Playwright) against a
running WebUI: open the tab, move a slider, save a preset, find it in the presets file and in the list; show the
block-influence chart; screenshot the tab (``LBW_SCREENSHOT``, default /tmp/lbw-tab.png).

Needs ``A1111_DIR`` (as the e2e suite), ``/usr/bin/chromium`` (or ``CHROMIUM``) and ``pip install playwright``.
The server gets a data folder of its own (``--data-dir``, models from the test bed), so the presets file starts
from the defaults and the test bed's is never touched.
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from browser import BUILTIN_NAME, CHROMIUM, CKPT, WEBUI, WebUI, private_data_dir, sync_api  # noqa: E402

pytestmark = pytest.mark.e2e
SCREENSHOT = Path(os.environ.get("LBW_SCREENSHOT", "/tmp/lbw-tab.png"))
PRESET = "BROWSER_TEST"
TIMEOUT_MS = 120_000


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    data = private_data_dir(tmp_path_factory)
    server = WebUI(WEBUI, CKPT, [BUILTIN_NAME], tmp_path_factory.mktemp("browser"),
                   extra_args=["--data-dir", str(data), "--models-dir", str(WEBUI / "models")])
    server.data = data
    yield server
    server.stop()
    shutil.rmtree(data, ignore_errors=True)


@pytest.fixture(scope="module")
def page(server):
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, headless=True,
                                             args=["--no-sandbox", "--disable-gpu"])
        page = browser.new_page(viewport={"width": 1500, "height": 1100})
        page.set_default_timeout(TIMEOUT_MS)
        page.goto(f"http://127.0.0.1:{server.port}/", wait_until="domcontentloaded")
        page.get_by_role("button", name="LoRA Block Weight", exact=True).click()
        page.locator("#tab_lora_core_lbw").wait_for(state="visible")
        yield page
        browser.close()


def text_field(page, elem_id: str):
    return page.locator(f"#{elem_id} textarea, #{elem_id} input[type=text]").first


def test_defaults_written_on_first_run(server, page):
    presets = server.data / "lora-core" / "lbwpresets.txt"
    assert presets.is_file()
    assert presets.read_text().splitlines()[:2] == ["NONE:0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0",
                                                    "ALL:1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1"]


def test_slider_then_save_preset(server, page):
    text_field(page, "lora_core_lbw_name").fill(PRESET)
    # the 5th slider of the 17-form is IN05; click the middle of its track (range -1..2: about 0.5)
    slider = page.locator("#lora_core_lbw_slider_4")
    assert "IN05" in slider.inner_text()
    track = slider.locator("input[type=range]")
    box = track.bounding_box()
    track.click(position={"x": box["width"] / 2, "y": box["height"] / 2})
    number = slider.locator("input[type=number]")
    weights = text_field(page, "lora_core_lbw_weights")
    page.wait_for_function("() => document.querySelector('#lora_core_lbw_weights textarea').value.split(',')[4] != '1'")
    value = float(number.input_value())
    assert 0.3 <= value <= 0.7, value
    tokens = weights.input_value().split(",")
    assert len(tokens) == 17 and float(tokens[4]) == pytest.approx(value) and tokens.count("1") == 16

    page.locator("#lora_core_lbw_save").click()
    page.locator("#lora_core_lbw_status").get_by_text(f"Saved preset {PRESET}").wait_for()
    lines = (server.data / "lora-core" / "lbwpresets.txt").read_text().splitlines()
    assert f"{PRESET}:{','.join(tokens)}" in lines
    assert lines[0].startswith("NONE:"), "the other presets are kept"

    dropdown = page.locator("#lora_core_lbw_preset")
    assert dropdown.locator("input").input_value() == PRESET
    dropdown.locator("input").click()
    options = dropdown.locator("ul.options li")
    options.first.wait_for()
    names = options.evaluate_all("items => items.map(item => item.dataset.value)")
    assert PRESET in names and "MIDD" in names, names
    page.keyboard.press("Escape")


def test_block_influence_chart_and_screenshot(server, page):
    lora = page.locator("#lora_core_lbw_chart_lora")
    lora.locator("input").click()
    lora.locator("ul.options li", has_text="test_lora").first.click()
    page.locator("#lora_core_lbw_chart_compute").click()
    page.locator("#lora_core_lbw_chart_info").get_by_text("Largest:").wait_for()
    page.locator("#lora_core_lbw_chart canvas, #lora_core_lbw_chart svg").first.wait_for()
    SCREENSHOT.parent.mkdir(parents=True, exist_ok=True)
    page.locator("#tab_lora_core_lbw").screenshot(path=str(SCREENSHOT))
    assert SCREENSHOT.stat().st_size > 10_000
