"""Completion of ``<lora:`` tags and the live check, in a real browser (Debian's chromium, headless, driven by
Playwright) against a running WebUI with the SD1.5 checkpoint of the test bed.

Typing ``<lora:te`` offers ``test_lora`` (not the SDXL files: the SD-version filter), Enter completes it, the arrows
choose; keys after ``:`` and presets after ``lbw=``; ordinary text never opens the list; Ctrl+Up still edits a
weight; a misspelled name shows the generation's own ``Lora errors`` line within a second, a correct prompt shows
nothing; the dark theme has its own colours. The route answers bad input with 400 and a message. Screenshots of
the completion and the warning go to ``LORA_CORE_SCREENSHOTS`` (default /tmp; ``docs`` for the README).

Needs ``A1111_DIR`` (as the e2e suite), ``/usr/bin/chromium`` (or ``CHROMIUM``) and ``pip install playwright``.
The server gets a data folder of its own (``--data-dir``, models from the test bed).
"""
from __future__ import annotations

import json
import os
import shutil
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from browser import BUILTIN_NAME, CHROMIUM, CKPT, WEBUI, WebUI, private_data_dir, sync_api  # noqa: E402

pytestmark = pytest.mark.e2e
SHOTS = Path(os.environ.get("LORA_CORE_SCREENSHOTS", "/tmp"))
TIMEOUT_MS = 120_000
PROMPT = "#txt2img_prompt textarea"
LIST = "#lora_core_complete"
CHECK = "#txt2img_prompt_lora_core_check"


LORAS = [("test_lora", "test_lora"), ("test_loha", "test_loha"), ("test_lokr", "test_lokr"),
         ("test_lora_sdxl", "test_lora_sdxl"), ("test_lora", "styles/ink"), ("test_lokr", "set_on_card")]
"""(test bed file, ours); set_on_card gets a card sidecar that says SDXL: the filter follows the card"""


def place(source: Path, target: Path) -> None:
    """A hard link where the file system allows one (the library refuses links that lead out of its folders)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(source, target)
    except OSError:
        shutil.copyfile(source, target)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    data = private_data_dir(tmp_path_factory)
    loras = data / "Lora"  # a LoRA folder of our own: the names offered do not depend on what else the test bed has
    for name, ours in LORAS:
        place(WEBUI / "models" / "Lora" / f"{name}.safetensors", loras / f"{ours}.safetensors")
    (loras / "set_on_card.json").write_text(json.dumps({"sd version": "SDXL"}))
    server = WebUI(WEBUI, CKPT, [BUILTIN_NAME], tmp_path_factory.mktemp("browser"),
                   extra_args=["--data-dir", str(data), "--models-dir", str(WEBUI / "models"),
                               "--lora-dir", str(loras), "--lyco-dir-backcompat", str(data / "LyCORIS")])
    deadline = time.monotonic() + 600  # the WebUI loads the checkpoint in the background after it starts
    while server.post("/lora-core/v1/check", {"prompt": ""})["model_family"] is None:
        if time.monotonic() > deadline:
            server.stop()
            pytest.fail(f"the checkpoint was not loaded in 600 s; log {server.log}")
        time.sleep(1)
    yield server
    server.stop()
    shutil.rmtree(data, ignore_errors=True)


def open_page(browser, server, query: str = ""):
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    page.set_default_timeout(TIMEOUT_MS)
    page.goto(f"http://127.0.0.1:{server.port}/{query}", wait_until="domcontentloaded")
    page.wait_for_function("() => document.body.dataset.loraCore === 'ready'")
    return page


@pytest.fixture(scope="module")
def browser(server):
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, headless=True,
                                             args=["--no-sandbox", "--disable-gpu"])
        yield browser
        browser.close()


@pytest.fixture(scope="module")
def page(browser, server):
    page = open_page(browser, server)
    yield page
    page.close()


def type_into(page, text: str, selector: str = PROMPT):
    box = page.locator(selector)
    box.fill("")
    box.focus()
    page.keyboard.type(text)
    return box


def offered(page) -> list[str]:
    page.locator(LIST).wait_for(state="visible")
    return page.locator(f"{LIST} .lora-core-option").evaluate_all("items => items.map(item => item.dataset.value)")


def shot(page, name: str, *selectors: str) -> Path:
    """A screenshot of the region that holds ``selectors`` (and a margin), small enough for the README."""
    boxes = [page.locator(selector).first.bounding_box() for selector in selectors]
    left = max(0, min(b["x"] for b in boxes) - 12)
    top = max(0, min(b["y"] for b in boxes) - 12)
    right = max(b["x"] + b["width"] for b in boxes) + 12
    bottom = max(b["y"] + b["height"] for b in boxes) + 12
    path = SHOTS / name
    path.parent.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(path), clip={"x": left, "y": top, "width": min(right - left, 1000),
                                          "height": bottom - top})
    return path


def post_raw(server, body: bytes) -> tuple[int, dict]:
    request = urllib.request.Request(f"http://127.0.0.1:{server.port}/lora-core/v1/check", data=body, method="POST",
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


# ----------------------------------------------------------------------------- the routes


def test_check_route_answers_bad_input_with_a_message(server):
    for body, problem in ((b"{not json", "not JSON"), (b'{"prompt": 3}', "'prompt' must be a string"),
                          (b"\xff", "not UTF-8")):
        status, answer = post_raw(server, body)
        assert status == 400 and problem in answer["detail"], (status, answer)
    status, answer = post_raw(server, json.dumps({"prompt": "a cat <lora:test_lora:1> <lora:test_lora_sdxl:1>"})
                              .encode())
    assert status == 200 and answer["model_family"] == "sd1"
    assert [item["status"] for item in answer["items"]] == ["ok", "skipped"]
    assert "this LoRA is for SDXL, the loaded model is SD1.x" in answer["items"][1]["messages"][0]


def test_completions_route_respects_the_sd_version_filter(server):
    lists = server.get("/lora-core/v1/completions")
    names = [entry["name"] for entry in lists["names"]]
    assert {"test_lora", "test_loha", "test_lokr"} <= set(names)
    assert "test_lora_sdxl" not in names and "set_on_card" not in names
    status, answer = post_raw(server, b'{"prompt": "<lora:set_on_card:1>"}')  # hidden, but usable: an SD1 file
    assert status == 200 and answer["items"][0]["status"] == "ok"
    assert "MIDD" in lists["lbw_presets"] and "lbw" in [entry["key"] for entry in lists["keys"]]


# ----------------------------------------------------------------------------- completion


def test_typing_a_tag_offers_names_and_enter_completes(page):
    type_into(page, "a cat, <lora:te")
    names = offered(page)
    assert "test_lora" in names and "test_lora_sdxl" not in names, names
    assert "ink" not in names, names  # "te" is in ".safetensors", which is no part of a name
    shot(page, "completion.png", PROMPT, LIST)
    page.locator(f"{LIST} .lora-core-option", has_text="test_lora").first.wait_for()
    while page.locator(f"{LIST} .lora-core-option.selected").get_attribute("data-value") != "test_lora":
        page.keyboard.press("ArrowDown")
    page.keyboard.press("Enter")
    box = page.locator(PROMPT)
    assert box.input_value() == "a cat, <lora:test_lora:1>"
    assert page.locator(LIST).is_hidden()
    # the weight is selected: typing replaces it
    page.keyboard.type("0.6")
    assert box.input_value() == "a cat, <lora:test_lora:0.6>"


def test_arrows_choose_and_escape_closes(page):
    type_into(page, "<lora:test_lo")
    names = offered(page)
    assert names[:3] == ["test_loha", "test_lokr", "test_lora"], names
    page.keyboard.press("ArrowDown")
    page.keyboard.press("ArrowDown")
    page.keyboard.press("ArrowUp")
    assert page.locator(f"{LIST} .lora-core-option.selected").get_attribute("data-value") == "test_lokr"
    page.keyboard.press("Escape")
    assert page.locator(LIST).is_hidden()
    assert page.locator(PROMPT).input_value() == "<lora:test_lo"
    page.keyboard.type("r")  # typing opens it again
    assert offered(page) == ["test_lora"]
    page.keyboard.press("Tab")
    assert page.locator(PROMPT).input_value() == "<lora:test_lora:1>"


def test_a_subfolder_finds_its_loras(page):
    type_into(page, "<lora:styles/")
    assert offered(page) == ["ink"]
    assert "styles/ink.safetensors" in page.locator(f"{LIST} .lora-core-option .lora-core-detail").inner_text()
    page.keyboard.press("Enter")
    assert page.locator(PROMPT).input_value() == "<lora:ink:1>"


def test_keys_after_a_colon_and_presets_after_lbw(page):
    type_into(page, "<lora:test_lora:1:")
    keys = offered(page)
    assert keys[:3] == ["te=", "unet=", "dyn="] and "lbw=" in keys and "step=" in keys
    page.keyboard.type("lb")
    assert offered(page) == ["lbw=", "lbwe="]
    page.keyboard.press("Enter")  # lbw= , and the presets open at once
    assert page.locator(PROMPT).input_value() == "<lora:test_lora:1:lbw="
    assert "MIDD" in offered(page)
    page.keyboard.type("MID")
    presets = offered(page)
    assert presets[0].startswith("MID") and "ALL" not in presets
    page.keyboard.press("Enter")
    assert page.locator(PROMPT).input_value() == f"<lora:test_lora:1:lbw={presets[0]}"


def test_ordinary_text_keeps_the_list_closed(page):
    page.evaluate("""() => {
        window.loraCoreListSeen = false;
        window.loraCoreWatch = setInterval(() => {
            const list = document.querySelector('#lora_core_complete');
            if (list && list.style.display !== 'none') window.loraCoreListSeen = true;
        }, 5);
    }""")
    type_into(page, "a photo of a cat: (sitting:1.2), [dog|fox], <hypernet:x:1> 0.5 lbw=MIDD\nte=1 <embedding> ok")
    seen = page.evaluate("() => { clearInterval(window.loraCoreWatch); return window.loraCoreListSeen; }")
    assert not seen
    assert page.locator(LIST).is_hidden()


def test_ctrl_up_still_edits_the_weight_of_a_lora(page):
    box = type_into(page, "<lora:test_lora:1>")
    page.keyboard.press("ArrowLeft")  # inside the tag
    page.keyboard.press("Control+ArrowUp")
    assert box.input_value() == "<lora:test_lora:1.05>"
    page.keyboard.press("Control+ArrowDown")
    page.keyboard.press("Control+ArrowDown")
    assert box.input_value() == "<lora:test_lora:0.95>"
    assert page.locator(LIST).is_hidden()


# ----------------------------------------------------------------------------- the live check


def test_a_misspelled_name_is_warned_within_a_second_with_the_generation_s_words(page, server):
    type_into(page, "a cat, <lora:test_lroa:0.8>")
    started = time.monotonic()
    warning = page.locator(f"{CHECK} .lora-core-check-item.lora-core-skipped", has_text="test_lroa")
    warning.wait_for(state="visible", timeout=1000)
    elapsed = time.monotonic() - started
    message = warning.locator(".lora-core-message").inner_text()
    assert "no LoRA named 'test_lroa'" in message and "did you mean: 'test_lora'" in message, message
    shot(page, "live-check.png", PROMPT, CHECK)
    generation = server.txt2img("a cat, <lora:test_lroa:0.8>")
    assert generation.params.get("Lora errors") == message, (generation.params, message)
    print(f"warning shown {elapsed * 1000:.0f} ms after the last key")
    warning.click()  # selects the tag in the box
    span = page.evaluate("() => { const t = document.querySelector('#txt2img_prompt textarea');"
                         " return t.value.slice(t.selectionStart, t.selectionEnd); }")
    assert span == "<lora:test_lroa:0.8>"


def test_a_correct_prompt_shows_nothing(page):
    type_into(page, "a cat, <lora:test_lroa:0.8>")
    page.locator(f"{CHECK} .lora-core-check-item").first.wait_for(state="visible")
    correct = "a cat, <lora:test_lora:0.8> <lora:test_loha:0.5:lbw=MIDD>"
    with page.expect_response(lambda response: response.url.endswith("/lora-core/v1/check")
                              and correct in (response.request.post_data or "")) as answered:
        type_into(page, correct)
    assert answered.value.ok
    page.wait_for_timeout(200)
    assert page.locator(CHECK).is_hidden()
    assert page.locator(f"{CHECK} .lora-core-check-item").count() == 0


def test_bad_items_and_negative_prompt_tags_are_marked(page):
    type_into(page, "<lora:test_lora:0,7> <lora:test_lora:1:lbw=MIDDD> <lora:test_lora_sdxl:1>")
    items = page.locator(f"{CHECK} .lora-core-check-item.lora-core-skipped")
    items.filter(has_text="test_lora_sdxl").wait_for(state="visible")
    texts = items.all_inner_texts()
    assert len(texts) == 3
    assert "'0,7'" in texts[0] and "MIDDD" in texts[1] and "for SDXL" in texts[2], texts
    type_into(page, "ugly, <lora:test_lora:1>", "#txt2img_neg_prompt textarea")
    page.locator("#txt2img_neg_prompt_lora_core_check .lora-core-ignored").wait_for(state="visible")


def test_dark_theme_has_its_own_colours(browser, server, page):
    type_into(page, "<lora:test_lroa:1>")
    light_item = page.locator(f"{CHECK} .lora-core-check-item", has_text="test_lroa")
    light_item.wait_for(state="visible")
    light = light_item.evaluate("item => getComputedStyle(item).backgroundColor")
    dark_page = open_page(browser, server, "?__theme=dark")
    try:
        assert dark_page.evaluate("() => document.body.classList.contains('dark')")
        type_into(dark_page, "<lora:te")
        assert "test_lora" in offered(dark_page)
        dark_list = dark_page.locator(LIST).evaluate("list => getComputedStyle(list).backgroundColor")
        type_into(dark_page, "<lora:test_lroa:1>")
        dark_item = dark_page.locator(f"{CHECK} .lora-core-check-item", has_text="test_lroa")
        dark_item.wait_for(state="visible")
        dark = dark_item.evaluate("item => getComputedStyle(item).backgroundColor")
    finally:
        dark_page.close()
    assert light == "rgb(254, 226, 226)" and dark == "rgb(69, 10, 10)", (light, dark)
    assert dark_list == "rgb(31, 41, 55)"
