"""End to end in a real A1111 WebUI: the files the tools write load as the WebUI expects them to.

(a) ``extract`` (rank 8, ``sd15-random-tuned`` minus ``sd15-random``) writes a LoRA that the built-in Lora and ours
    turn into the same image (PSNR >= 45 dB).
(b) ``merge_into`` (``sd15-random`` + ``test_lora:0.8``, fp16) writes a checkpoint whose image equals the base
    checkpoint's with ``<lora:test_lora:0.8>`` (PSNR >= 40 dB), under the built-in Lora and under ours.

Needs ``A1111_DIR`` like test_webui_e2e.py, plus the tuned checkpoint the test bed builds next to the WebUI
(``$A1111_DIR/../build/sd15-random-tuned.safetensors``). Two servers, one after the other (the built-in's, then
ours); each generates with the base checkpoint, then switches to the merged one through ``/sdapi/v1/options``.
A server starts only when the machine has ``MIN_FREE_GB`` of memory available (others may be running servers).
"""
from __future__ import annotations

import shutil
import tempfile
import time
from pathlib import Path

import pytest

from webui import BUILTIN_NAME, EXTENSION_NAME, WebUI, checkpoint, extension_linked, psnr, same_pixels, webui_dir

pytestmark = pytest.mark.e2e

WEBUI = webui_dir()

from lora_core.tools import extract, merge_into  # noqa: E402  (after the skip: torch is slow to import)

CKPT = checkpoint(WEBUI)
CKPT_DIR = CKPT.parent
TUNED = WEBUI.parent / "build" / "sd15-random-tuned.safetensors"
LORA_DIR = WEBUI / "models" / "Lora"
TOOLS_DIR = LORA_DIR / "lora-core-e2e-tools"
EXTRACTED = TOOLS_DIR / "e2e_extracted.safetensors"
MERGED = CKPT_DIR / "lora-core-e2e-merged.safetensors"
MERGE_RATIO = 0.8
MIN_FREE_GB = 12
MEMORY_WAIT_S = 1800

BASE = "a cat"
WITH_EXTRACTED = f"a cat <lora:{EXTRACTED.stem}:1>"
WITH_LORA = f"a cat <lora:test_lora:{MERGE_RATIO}>"
ON_MERGED = "merged checkpoint, no LoRA"


def available_gb() -> float:
    with open("/proc/meminfo") as meminfo:
        fields = dict(line.split(":", 1) for line in meminfo)
    return int(fields["MemAvailable"].split()[0]) / 2 ** 20


def wait_for_memory() -> None:
    deadline = time.time() + MEMORY_WAIT_S
    while available_gb() < MIN_FREE_GB:
        if time.time() > deadline:
            pytest.fail(f"less than {MIN_FREE_GB} GB of memory available for {MEMORY_WAIT_S} s; no server started")
        time.sleep(10)


@pytest.fixture(scope="module")
def written():
    """The extracted LoRA and the merged checkpoint, written once by the library; removed at the end."""
    for needed in (CKPT, TUNED, LORA_DIR / "test_lora.safetensors"):
        if not needed.is_file():
            pytest.skip(f"{needed} is missing (../shared/testbed/setup.sh makes it)")
    TOOLS_DIR.mkdir(exist_ok=True)
    try:
        extracted = extract(CKPT, TUNED, EXTRACTED, rank=8, overwrite=True)
        merged = merge_into(CKPT, [f"{LORA_DIR / 'test_lora.safetensors'}:{MERGE_RATIO}"], MERGED,
                            save_precision="fp16", overwrite=True)
        with extension_linked(WEBUI):
            yield {"extract": extracted, "merge": merged}
    finally:
        shutil.rmtree(TOOLS_DIR, ignore_errors=True)
        MERGED.unlink(missing_ok=True)


@pytest.fixture(scope="module")
def workdir():
    """Logs and settings of the servers; not pytest's tmp_path, which pytest prunes under running servers."""
    path = Path(tempfile.mkdtemp(prefix="lora-core-e2e-tools-"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


def generate_all(server: WebUI) -> dict:
    """Base checkpoint: no LoRA, the extracted LoRA, test_lora at the merge ratio; then the merged checkpoint."""
    images = {prompt: server.txt2img(prompt) for prompt in (BASE, WITH_EXTRACTED, WITH_LORA)}
    server.post("/sdapi/v1/options", {"sd_model_checkpoint": MERGED.name})
    assert MERGED.stem in server.get("/sdapi/v1/options")["sd_model_checkpoint"]
    images[ON_MERGED] = server.txt2img(BASE)
    return images


def run_server(disabled: str, workdir: Path, also=None) -> dict:
    wait_for_memory()
    server = WebUI(WEBUI, CKPT, [disabled], workdir)
    try:
        images = generate_all(server)
        if also is not None:
            images.update(also(server))
        return images
    finally:
        server.stop()


def tools_tab(server: WebUI) -> dict:
    """Whether the LoRA Tools tab and its sub-tabs were built, and whether building it logged an error."""
    config = server.get("/config")
    ids = {c.get("props", {}).get("elem_id") for c in config.get("components", [])}
    return {"tab_ids": ids, "log": server.log.read_text(errors="replace")}


@pytest.fixture(scope="module")
def builtin(written, workdir):
    return run_server(EXTENSION_NAME, workdir)


@pytest.fixture(scope="module")
def ours(written, builtin, workdir):
    return run_server(BUILTIN_NAME, workdir, also=tools_tab)


def test_the_tools_wrote_what_was_asked(written):
    ranks = {r.rank for r in written["extract"].modules.values()}
    assert written["extract"].family == "sd1" and max(ranks) == 8 and min(ranks) >= 1
    merged = written["merge"].loras
    assert len(merged) == 1 and merged[0].ratio == MERGE_RATIO and merged[0].layers == 264  # test_lora's layers


def test_extracted_lora_changes_the_image(builtin, ours):
    for images in (builtin, ours):
        assert "Lora errors" not in images[WITH_EXTRACTED].infotext
        assert not same_pixels(images[WITH_EXTRACTED], images[BASE]), "the extracted LoRA must change the image"


def test_extracted_lora_same_image_in_builtin_and_ours(builtin, ours):
    value = psnr(ours[WITH_EXTRACTED], builtin[WITH_EXTRACTED])
    print(f"extracted LoRA, ours vs built-in: PSNR {value:.2f} dB")
    assert value >= 45, f"extracted LoRA: PSNR {value:.1f} dB between ours and the built-in"


@pytest.mark.parametrize("which", ["builtin", "ours"])
def test_merged_checkpoint_is_base_plus_lora(builtin, ours, which):
    images = {"builtin": builtin, "ours": ours}[which]
    assert MERGED.stem in images[ON_MERGED].infotext, "the merged checkpoint must be the one loaded"
    assert not same_pixels(images[WITH_LORA], images[BASE])
    value = psnr(images[ON_MERGED], images[WITH_LORA])
    print(f"merged checkpoint vs base + <lora:test_lora:{MERGE_RATIO}> ({which}): PSNR {value:.2f} dB")
    assert value >= 40, f"{which}: merged checkpoint vs base + LoRA, PSNR {value:.1f} dB"


def test_tools_tab_is_built(ours):
    expected = {"lora_core_tools_tabs", "lora_core_tools_merge_into_run", "lora_core_tools_merge_loras_run",
                "lora_core_tools_extract_run", "lora_core_tools_resize_run", "lora_core_tools_difference_run",
                "lora_core_tools_inspect_run"}
    assert expected <= ours["tab_ids"]
    assert "tools_tab.py" not in ours["log"], "building the tab logged an error"
