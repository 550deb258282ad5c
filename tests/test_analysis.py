"""Sweeps and block analysis (lora_core.analysis): prompt edits for the X/Y/Z axes, block selections, the analyzer's
diff math and its labelled grid."""
from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from lora_core import analysis
from lora_core.analysis import (
    BlockDiff, analyzer_grid, analyzer_lbw, difference, diff_image, edit_loras, expand_weight_values,
    full_form_weights, images_needed, labelled_grid, lora_tags, parse_block_assignments, parse_range, parse_steps,
    percent_summary, percent_table, select_blocks, split_target, with_block_weights, with_weight,
)
from lora_core.blocks import BLOCK_IDS_12, BLOCK_IDS_17, BLOCK_IDS_20, BLOCK_IDS_26, BlockWeights, PresetBook
from lora_core.syntax import MAX_TAGS, Schedule, parse_lora_items

WEIGHTS_OF = BlockWeights(PresetBook.default()).weights_of


def request_of(tag_text: str):
    return parse_lora_items(tag_text[len("<lora:"):-1].split(":")).request


# ----------------------------------------------------------------------------- prompt edits


def test_edit_changes_only_the_named_lora_and_keeps_the_rest_of_the_prompt():
    prompt = "a cat, <lora:a:0.7:lbw=MIDD> (b:1.2) <lyco:b:0.3:0.4> end"
    out = edit_loras(prompt, lambda r: with_weight(r, Schedule.constant(0.5)), "b")
    assert out == "a cat, <lora:a:0.7:lbw=MIDD> (b:1.2) <lyco:b:0.5> end"
    out = edit_loras(prompt, lambda r: with_weight(r, Schedule.constant(0)), "A")  # names match case-insensitively
    assert out.startswith("a cat, <lora:a:0:lbw=MIDD> (b:1.2)")
    assert request_of("<lora:a:0:lbw=MIDD>").lbw == "MIDD"


def test_edit_every_or_first_lora_and_missing_lora():
    prompt = "<lora:a:1> x <lora:b:1>"
    half = lambda r: with_weight(r, Schedule.constant(0.5))  # noqa: E731
    assert edit_loras(prompt, half) == "<lora:a:0.5> x <lora:b:0.5>"
    assert edit_loras(prompt, half, first_only=True) == "<lora:a:0.5> x <lora:b:1>"
    with pytest.raises(LookupError, match="<lora:c:"):
        edit_loras(prompt, half, "c")
    with pytest.raises(LookupError):
        edit_loras("no loras <lora:a:abc>", half)  # a malformed tag is not edited


def test_lora_tags_are_the_tags_the_runtime_applies():
    # the same tags A1111 finds (none after the last '>'), and only those that parse (here: not a tag of more
    # items than a LoRA tag may have, nor one with an unknown key, both skipped by the runtime)
    prompt = "<lora:a:1> <lora:b" + ":" * 1000 + "> <lora:c:foo=1> <lyco:d:0.5> <lora:e:1" + "<lora:" * 1000
    assert [(tag.network, tag.request.name) for tag in lora_tags(prompt)] == [("lora", "a"), ("lyco", "d")]
    many = "".join(f"<lora:a{i}:1>" for i in range(MAX_TAGS + 5))
    assert [tag.request.name for tag in lora_tags(many)] == [f"a{i}" for i in range(MAX_TAGS)]


def test_edited_tag_parses_back_to_the_edited_request():
    prompt = '<lora:"my:lora":1:0.5:lbw=1,0,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1:start=2:hr=0.3>'
    out = edit_loras(prompt, lambda r: with_weight(r, Schedule.constant(0.25)), "my:lora")
    [tag] = lora_tags(out)
    assert tag.request.name == "my:lora" and tag.request.te == tag.request.unet == Schedule.constant(0.25)
    assert tag.request.lbw.startswith("1,0,1") and tag.request.start == 2 and tag.request.hr_te == Schedule.constant(0.3)


def test_split_target():
    assert split_target(" 0.5 ") == (None, "0.5")
    assert split_target("test_lora:0.5") == ("test_lora", "0.5")
    assert split_target('"a:b": MIDD') == ("a:b", "MIDD")
    assert split_target("IN05-OUT05=0") == (None, "IN05-OUT05=0")
    with pytest.raises(ValueError, match="empty"):
        split_target(":0.5")


def test_weight_ranges_expand_like_the_xyz_plot():
    assert expand_weight_values(["0", " 0.5", "1"]) == ["0", "0.5", "1"]
    assert expand_weight_values(["0-1 [5]"]) == ["0", "0.25", "0.5", "0.75", "1"]
    assert expand_weight_values(["0-1 (+0.3)"]) == ["0", "0.3", "0.6", "0.9"]
    assert expand_weight_values(["1-0 (+0.5)", "-1"]) == ["1", "0.5", "0", "-1"]
    assert expand_weight_values(["x:0-2", ""]) == ["x:0", "x:1", "x:2"]
    assert expand_weight_values(["1@0,0@10"]) == ["1@0,0@10"]  # a schedule is not a range


def test_steps():
    assert parse_steps("5-10") == (5, 10)
    assert parse_steps("5-") == (5, None) and parse_steps("-10") == (None, 10) and parse_steps("3") == (3, None)
    assert parse_steps("0.25-0.75") == (0.25, 0.75)
    for bad in ("-", "a-3", "1-x", ""):
        with pytest.raises(ValueError):
            parse_steps(bad)


# ----------------------------------------------------------------------------- blocks


def test_select_blocks_ids_ranges_forms_and_not():
    assert select_blocks("IN05", "sd1") == ["IN05"]
    assert select_blocks("OUT02-IN10", "sd1") == ["IN10", "IN11", "M00", "OUT00", "OUT01", "OUT02"]
    assert select_blocks("m00, in01 base", "sd2") == ["BASE", "IN01", "M00"]
    assert select_blocks("17ALL", "sd1") == list(BLOCK_IDS_17)
    assert select_blocks("ALL", "sd1") == list(BLOCK_IDS_26) and select_blocks("26ALL", "sd1") == list(BLOCK_IDS_26)
    assert select_blocks("12ALL", "sdxl") == list(BLOCK_IDS_12) and select_blocks("ALL", "sdxl") == list(BLOCK_IDS_20)
    assert select_blocks("NOT IN01-IN11", "sd1") == ["BASE", "IN00", "M00", *(f"OUT{i:02d}" for i in range(12))]
    assert select_blocks("NOT 17ALL", "sd1") == ["IN00", "IN03", "IN06", "IN09", "IN10", "IN11", "OUT00", "OUT01",
                                                 "OUT02"]


@pytest.mark.parametrize("spec, family, message", [
    ("IN09", "sdxl", "IN09"), ("12ALL", "sd1", "no 12-block form"), ("17ALL", "sdxl", "no 17-block form"),
    ("IN01-IN02-IN03", "sd1", "IN01-IN02-IN03"), ("", "sd1", "no blocks"), ("NOT", "sd1", "no blocks"),
    ("MID", "sd1", "MID"),
])
def test_select_blocks_errors(spec, family, message):
    with pytest.raises(ValueError, match=message):
        select_blocks(spec, family)


def test_block_assignments():
    assert parse_block_assignments("IN05=0.5", "sd1") == {"IN05": "0.5"}
    got = parse_block_assignments("IN04-IN05 = 0 ; M00=r; NOT IN00-OUT10=X+0.5", "sd1")
    assert got == {"IN04": "0", "IN05": "0", "M00": "R", "BASE": "X+0.5", "OUT11": "X+0.5"}
    for bad in ("IN05", "IN05=abc", ";", "IN99=1"):
        with pytest.raises(ValueError):
            parse_block_assignments(bad, "sd1")


def test_full_form_weights_expand_short_lists_and_presets():
    assert full_form_weights(None, "sd1", WEIGHTS_OF) == dict.fromkeys(BLOCK_IDS_26, "1")
    midd = full_form_weights("MIDD", "sd1", WEIGHTS_OF)  # 17-form: the 9 blocks it does not name get 0 (LBW)
    assert list(midd) == list(BLOCK_IDS_26)
    assert [b for b, v in midd.items() if v == "1"] == ["BASE", "IN05", "IN07", "IN08", "M00", "OUT03", "OUT04",
                                                        "OUT05", "OUT06"]
    xl = full_form_weights("1,R,0,0,0,0,0,0,0,0,0,X-0.5", "sdxl", WEIGHTS_OF)
    assert list(xl) == list(BLOCK_IDS_20) and xl["IN04"] == "R" and xl["OUT05"] == "X-0.5" and xl["IN00"] == "0"
    with pytest.raises(ValueError):
        full_form_weights("NO_SUCH_PRESET", "sd1", WEIGHTS_OF)
    with pytest.raises(ValueError):
        full_form_weights("MIDD", "sdxl", WEIGHTS_OF)  # 17 values do not fit SDXL


def test_block_weights_written_into_the_request_resolve_as_asked():
    request = request_of("<lora:a:1:lbw=MIDD>")
    edited = with_block_weights(request, {"IN05": "0.5", "OUT11": "2"}, "sd1", WEIGHTS_OF)
    resolved = dict(zip(BLOCK_IDS_26, (w.resolve(1.0, None) for w in WEIGHTS_OF(edited.lbw))))
    expected = {b: float(v) for b, v in full_form_weights("MIDD", "sd1", WEIGHTS_OF).items()}
    expected.update(IN05=0.5, OUT11=2.0)
    assert resolved == expected
    assert request_of(edit_loras("<lora:a:1:lbw=MIDD>", lambda r: edited)) == edited


def test_analyzer_weights_and_range():
    assert analyzer_lbw("sd1", None, 0, 1) == ",".join(["1"] * 26)
    lbw = analyzer_lbw("sdxl", "M00", 0, 0.5).split(",")
    assert len(lbw) == 20 and lbw[BLOCK_IDS_20.index("M00")] == "0" and lbw.count("0.5") == 19
    assert parse_range("0, 1") == (0, 1) and parse_range("-0.5,1.5") == (-0.5, 1.5)
    for bad in ("0", "0,1,2", "a,1", "nan,1"):
        with pytest.raises(ValueError):
            parse_range(bad)


def test_images_needed_is_seeds_times_blocks_times_two_minus_shared_references():
    for seeds in (1, 3):
        for blocks in (1, 3, 26):
            shared = seeds * (blocks - 1)  # each seed's blocks share one reference
            assert images_needed(seeds, blocks) == seeds * blocks * 2 - shared


# ----------------------------------------------------------------------------- image math


def test_difference_counts_channels_strictly_above_the_threshold():
    reference = np.zeros((2, 2, 3), np.uint8)
    image = reference.copy()
    image[0, 0] = [20, 21, 255]  # 20 is not above 20; 21 and 255 are
    image[1, 1, 0] = 30
    percent, diff = difference(Image.fromarray(image), Image.fromarray(reference))
    assert percent == pytest.approx(3 / 12 * 100)
    assert diff.dtype == np.uint8 and diff[0, 0].tolist() == [20, 21, 255]
    assert difference(reference, image)[0] == percent  # symmetric, no uint8 wrap-around
    assert difference(image, reference, threshold=0)[0] == pytest.approx(4 / 12 * 100)
    assert difference(image, image)[0] == 0
    with pytest.raises(ValueError, match="sizes"):
        difference(image, np.zeros((3, 2, 3), np.uint8))


def test_diff_image_colours():
    diff = np.array([[[0, 10, 255]]], np.uint8)
    assert np.asarray(diff_image(diff)).tolist() == [[[0, 10, 255]]]
    assert np.asarray(diff_image(diff, "white")).tolist() == [[[255, 245, 0]]]
    with pytest.raises(ValueError):
        diff_image(diff, "red")


def solid(value: int, size: int = 16) -> Image.Image:
    return Image.new("RGB", (size, size), (value, value, value))


def find(grid: Image.Image, cell: Image.Image) -> list[tuple[int, int]]:
    """Top-left corners where ``cell`` appears in ``grid`` exactly."""
    g, c = np.asarray(grid), np.asarray(cell)
    h, w = c.shape[:2]
    return [(x, y) for y in range(g.shape[0] - h + 1) for x in range(g.shape[1] - w + 1)
            if np.array_equal(g[y:y + h, x:x + w], c)]


def test_labelled_grid_places_cells_and_draws_labels():
    cells = [[solid(10), solid(60)], [solid(110), solid(160)], [solid(210), solid(30)]]
    grid = labelled_grid(cells, ["a", "b"], ["row one", "row two", "row three"])
    [(x00, y00)] = find(grid, cells[0][0])
    [(x01, y01)] = find(grid, cells[0][1])
    [(x10, y10)] = find(grid, cells[1][0])
    assert y01 == y00 and x10 == x00 and x01 > x00 and y10 > y00
    assert x00 > 0 and y00 > 0  # room for the row and column labels
    pixels = np.asarray(grid)
    assert (pixels[:y00, :] < 128).any(), "column labels are drawn above the cells"
    assert (pixels[:, :x00] < 128).any(), "row labels are drawn left of the cells"
    assert grid.size[1] >= 3 * 16 and grid.size[0] >= 2 * 16


def test_labelled_grid_errors():
    with pytest.raises(ValueError):
        labelled_grid([], [], [])
    with pytest.raises(ValueError):
        labelled_grid([[solid(0)], [solid(0), solid(0)]], ["a"], ["x", "y"])
    with pytest.raises(ValueError):
        labelled_grid([[solid(0)]], ["a", "b"], ["x"])
    with pytest.raises(ValueError):
        labelled_grid([[solid(0), solid(0, 8)]], ["a", "b"], ["x"])


def test_analyzer_grid_rows_per_block_or_swapped():
    reference = solid(200)
    results = [BlockDiff("IN01", solid(10 + i), diff_image(np.zeros((16, 16, 3), np.uint8)), 12.3456)
               for i in range(3)]
    grid = analyzer_grid(results, reference, "0", "reference (1)")
    swapped = analyzer_grid(results, reference, "0", "reference (1)", swap=True)
    corners = find(grid, reference)
    assert len(corners) == 3 and len({x for x, _ in corners}) == 1  # one reference per row, in one column
    swapped_corners = find(swapped, reference)
    assert len(swapped_corners) == 3 and len({y for _, y in swapped_corners}) == 1  # one row of references
    [(xi, yi)] = find(grid, results[1].image)
    assert xi < corners[0][0]  # image left of the reference
    assert analysis.percent_label(12.3456) == "Diff: 12.346%"


def test_percent_table_and_summary():
    table = percent_table(["IN00", "M00"], [[0.0, 10.0], [0.0, 20.0]], [11, 22])
    lines = table.splitlines()
    assert lines[0] == "block | seed 11 | seed 22 | mean"
    assert lines[2] == "IN00 | 0.000% | 0.000% | 0.000%" and lines[3] == "M00 | 10.000% | 20.000% | 15.000%"
    assert percent_summary(["IN00", "M00"], [[0.0, 10.0], [0.0, 20.0]]) == "IN00: 0.000%, M00: 15.000%"
