"""End to end in a real A1111 WebUI (built-in Lora disabled): our LoRA-weight axis in the X/Y/Z plot and the
Effective Block Analyzer, through /sdapi/v1/txt2img.

Needs ``A1111_DIR`` like test_webui_e2e.py (a WebUI v1.10.x checkout with its venv, ``sd15-random`` and the test
bed's ``test_lora``). One server for the module; about ten 64x64 4-step generations.
"""
from __future__ import annotations

import base64
import io
import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from webui import BUILTIN_NAME, Generation, WebUI, checkpoint, extension_linked, psnr, same_pixels, webui_dir

pytestmark = pytest.mark.e2e

WEBUI = webui_dir()
CKPT = checkpoint(WEBUI)
LORA_DIR = WEBUI / "models" / "Lora"

BASE = "a cat"
LORA1 = "a cat <lora:test_lora:1>"
XYZ_TITLE = "x/y/z plot"
WEIGHT_AXIS = "LoRA weight"
ANALYZER_TITLE = "lora effective block analyzer"
MERGED = {"override_settings": {"lora_core_apply_mode": "merged"}}


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    if not CKPT.is_file() or not (LORA_DIR / "test_lora.safetensors").is_file():
        pytest.skip(f"{CKPT} or {LORA_DIR}/test_lora.safetensors is missing (../shared/testbed/setup.sh makes them)")
    with extension_linked(WEBUI):
        server = WebUI(WEBUI, CKPT, [BUILTIN_NAME], tmp_path_factory.mktemp("blocks"))
        yield server
        server.stop()


@pytest.fixture(scope="module")
def references(server):
    """The LoRA at 1 merged (forced), no LoRA, then the LoRA at 1 in the automatic mode: a set the previous
    generation did not use runs in bypass, as a sweep does. The no-LoRA call in between matters: A1111 keeps the last
    prompt's conditioning (its key is the prompt and the LoRA items, not how they are applied), so a call with the
    same prompt right after the merged one would reuse its TE output."""
    merged = server.txt2img(LORA1, **MERGED)
    return {"merged": merged, "base": server.txt2img(BASE), "bypass": server.txt2img(LORA1)}


def script_info(server, name: str) -> dict:
    infos = [s for s in server.get("/sdapi/v1/script-info") if s["name"] == name and not s["is_img2img"]]
    assert len(infos) == 1, f"txt2img script '{name}' is not offered"
    return infos[0]


def decode(images: list[str]) -> list[np.ndarray]:
    return [np.asarray(Image.open(io.BytesIO(base64.b64decode(i.split(",", 1)[-1]))).convert("RGB")) for i in images]


def run_script(server, prompt: str, name: str, args: list) -> tuple[list[np.ndarray], dict]:
    base = {"prompt": prompt, "negative_prompt": "", "width": 64, "height": 64, "steps": 4, "seed": 1,
            "cfg_scale": 7.0, "sampler_name": "Euler", "scheduler": "Automatic", "batch_size": 1, "n_iter": 1,
            "save_images": False, "send_images": True, "script_name": name, "script_args": args}
    res = server.post("/sdapi/v1/txt2img", base)
    return decode(res["images"]), json.loads(res["info"])


@pytest.fixture(scope="module")
def xyz_weight_sweep(server, references):
    info = script_info(server, XYZ_TITLE)
    axes = info["args"][0]["choices"]
    assert WEIGHT_AXIS in axes, f"our axis is not in the X/Y/Z plot: {axes}"
    # x type, x values, x dropdown, y (type, values, dropdown), z (...), draw legend, include lone images,
    # include sub grids, no fixed seeds, vary seeds x, y, z, margin size, csv mode
    args = [axes.index(WEIGHT_AXIS), "0, 0.5, 1", [], 0, "", [], 0, "", [], True, True, False, False,
            False, False, False, 0, False]
    images, info = run_script(server, LORA1, XYZ_TITLE, args)
    return [image for image in images if image.shape == (64, 64, 3)], images, info


def test_xyz_weight_axis_returns_one_image_per_weight(xyz_weight_sweep):
    cells, everything, info = xyz_weight_sweep
    assert len(cells) == 3, f"{len(everything)} images, of which {len(cells)} cells: {[i.shape for i in everything]}"
    assert any(image.shape[0] > 64 for image in everything), "the grid comes first"
    assert "LoRA weight" in info["infotexts"][0]


def test_xyz_weight_zero_is_the_no_lora_image(xyz_weight_sweep, references):
    cells, _, _ = xyz_weight_sweep
    assert np.array_equal(cells[0], references["base"].pixels.astype(np.uint8))


def test_xyz_weight_one_is_the_lora_image(xyz_weight_sweep, references):
    """The sweep runs in bypass (at 64x64 and 4 steps on the CPU a re-merge per cell would cost more): pixel for pixel
    the bypass image of <lora:test_lora:1>, and within float rounding of the merged one."""
    cells, _, _ = xyz_weight_sweep
    assert np.array_equal(cells[2], references["bypass"].pixels.astype(np.uint8))
    merged = Generation(_png(cells[2]), {})
    assert psnr(merged, references["merged"]) >= 40
    assert not same_pixels(references["merged"], references["base"]), "the LoRA must change the image"


def test_xyz_half_weight_is_a_third_image(xyz_weight_sweep):
    cells, _, _ = xyz_weight_sweep
    assert not np.array_equal(cells[1], cells[0]) and not np.array_equal(cells[1], cells[2])


def _png(pixels: np.ndarray) -> bytes:
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format="PNG")
    return out.getvalue()


def find(grid: np.ndarray, cell: np.ndarray) -> list[tuple[int, int]]:
    """Top-left corners where ``cell`` appears in ``grid`` exactly."""
    h, w = cell.shape[:2]
    hits = []
    for y in range(grid.shape[0] - h + 1):
        for x in np.flatnonzero((grid[y, : grid.shape[1] - w + 1] == cell[0, 0]).all(axis=1)):
            if np.array_equal(grid[y:y + h, x:x + w], cell):
                hits.append((int(x), y))
    return hits


@pytest.fixture(scope="module")
def analyzer_run(server, references):
    info = script_info(server, ANALYZER_TITLE)
    labels = [arg["label"] for arg in info["args"]]
    assert len(labels) == 7, labels
    # LoRA (all), range, blocks, threshold, seeds, diff colour, swap X-Y
    return run_script(server, LORA1, ANALYZER_TITLE, ["", "0,1", "IN00, M00, OUT11", 0, 1, "black", False])


def test_analyzer_returns_a_labelled_grid_of_three_blocks(analyzer_run, references):
    images, info = analyzer_run
    assert len(images) == 1, "one grid per seed"
    grid = images[0]
    # three rows (diff | image | reference) of 64x64 cells, plus the labels
    assert grid.shape[0] >= 3 * 64 + 10 and grid.shape[1] >= 3 * 64 + 10
    # the reference (every block at 1) is the plain LoRA image, in bypass: once per row, in one column; IN00 at 0
    # is that image too (test_lora has no layer in IN00), in the image column of the first row
    corners = find(grid, references["bypass"].pixels.astype(np.uint8))
    columns = Counter(x for x, _ in corners)
    assert len(corners) == 4 and sorted(columns.values()) == [1, 3], corners
    reference_x = columns.most_common(1)[0][0]
    [(image_x, image_y)] = [(x, y) for x, y in corners if x != reference_x]
    assert image_x < reference_x and image_y == min(y for _, y in corners)


def test_analyzer_reports_the_difference_of_each_block(analyzer_run):
    """test_lora has no layer in IN00 (the input conv): setting it to 0 changes nothing; M00 and OUT11 hold
    attention layers it trains: with threshold 0 they change some pixel channels."""
    _, info = analyzer_run
    summary = info["extra_generation_params"]["Block analysis"]
    percents = dict(part.split(": ") for part in summary.split(", "))
    assert list(percents) == ["IN00", "M00", "OUT11"]
    assert percents["IN00"] == "0.000%"
    assert float(percents["M00"].rstrip("%")) > 0 and float(percents["OUT11"].rstrip("%")) > 0
    assert "Block analysis" in info["infotexts"][0]
    assert "threshold 0" in info["extra_generation_params"]["Block analysis settings"]


def test_inspect_returns_block_norms(server):
    norms = server.get("/lora-core/v1/inspect?name=test_lora")["block_norms"]
    assert norms["IN00"] == 0 and norms["M00"] > 0 and norms["BASE"] > 0
    assert [b for b in norms if b != "OTHER"][:3] == ["BASE", "IN00", "IN01"] and len(norms) >= 26
