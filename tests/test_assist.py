"""lora_core.assist: the live check says what the generation says (the runtime is the oracle), completion lists.

The check and ``LoraRuntime.activate`` run on the same tiny real SD1 model and the same files; for every prompt
the messages the check gives are the ``errors`` the generation gives, in the same order.
"""
from __future__ import annotations

import json
import os
import random

import pytest
import torch
from safetensors.torch import save_file

from lora_core import assist
from lora_core.assist import NEGATIVE_NOTE, PromptChecker, check_payload, completion_lists, name_choices
from lora_core.blocks import BlockWeights
from lora_core.library import LoraLibrary
from lora_core.model_index import ModelIndex
from lora_core.runtime import LoraRuntime
from lora_core.syntax import KNOWN_KEYS, MAX_TAGS
from lora_core.tags import find_tags
from lora_factory import LoraSpec, make_kohya_lora, pick_targets


@pytest.fixture
def world(fresh_sd1, tmp_path):
    index = ModelIndex(fresh_sd1)
    targets = pick_targets(index, kinds=(torch.nn.Linear,), limit_per_kind=3)
    lora = make_kohya_lora(index, targets, LoraSpec(), seed=1)
    root = tmp_path / "Lora"
    (root / "styles").mkdir(parents=True)
    (root / "a").mkdir()
    (root / "b").mkdir()
    save_file(lora, str(root / "alpha.safetensors"),
              metadata={"ss_output_name": "alpha_alias", "ss_base_model_version": "sd_v1"})
    save_file(lora, str(root / "styles" / "ink.safetensors"))
    save_file(lora, str(root / "for_xl.safetensors"), metadata={"ss_base_model_version": "sdxl_base_v1-0"})
    save_file({"lora_unet_no_such_layer.lora_down.weight": torch.ones(2, 4),
               "lora_unet_no_such_layer.lora_up.weight": torch.ones(4, 2)}, str(root / "fits_nothing.safetensors"))
    (root / "broken.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    save_file(lora, str(root / "a" / "twin.safetensors"))
    save_file(lora, str(root / "b" / "twin.safetensors"))
    save_file(lora, str(root / "with colon.safetensors"), metadata={"ss_output_name": "with: colon"})
    library = LoraLibrary([root])
    library.refresh()
    runtime = LoraRuntime(library, layer_scale_factory=BlockWeights())
    runtime.bind(fresh_sd1)
    yield runtime, root
    runtime.restore()


def generation_errors(runtime: LoraRuntime, prompt: str) -> list[str]:
    """What a generation of ``prompt`` puts in ``Lora errors``: the items as A1111 hands them over."""
    tags = assist._generation_order(list(find_tags(prompt)))
    return runtime.activate([tag.text.split(":") for tag in tags]).errors


def check_messages(checker: PromptChecker, prompt: str) -> list[str]:
    answer = checker.check(prompt)
    by_start = {item["start"]: item for item in answer["items"]}
    ordered = assist._generation_order(list(find_tags(prompt)))
    return [message for tag in ordered for message in by_start[tag.start]["messages"]]


PROMPTS = [
    "a cat <lora:alpha:0.7>",
    "<lora:alpha_alias:1> and <lora:ink:0.5:0.2>",
    "<lora:alpah:1>",  # a typo: not found, with a suggestion
    "<lora:alpha:0,7>",  # a bad number
    "<lora:alpha:1:lbw=MIDDD>",  # an unknown preset
    "<lora:alpha:1:lbw=MIDD> <lora:alpha:1:lbw=1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1>",  # 20 values: SDXL only
    "<lora:alpha:1:lbwe=ATTNDEEPOFF> <lora:alpha:1:lbwe=NOPE>",
    "<lora:for_xl:1>",  # another family
    "<lora:fits_nothing:1>",
    "<lora:broken:1>",
    "<lora:twin:1>",  # two files, one name
    "<lora:alpha:1:stpo=10>",  # an unknown key
    "<lora:alpha:1:start=10:stop=5>",  # kept, with a warning
    "<lora:alpha:1:te=0.5:te=0.6>",
    "<lyco:ink:1> <lora:alpah:1> <lyco:nope:1> <lora:alpha:1>",  # lyco after lora, as A1111 orders them
    '<lora:"with: colon":1> <lora:"unclosed:1>',
    "no tags here, (emphasis:1.2) <not a tag>",
]


@pytest.mark.parametrize("prompt", PROMPTS)
def test_the_check_says_what_the_generation_says(world, prompt):
    runtime, _ = world
    checker = PromptChecker(runtime)
    said = check_messages(checker, prompt)
    assert said == generation_errors(runtime, prompt)
    for item in checker.check(prompt)["items"]:
        assert item["status"] in ("ok", "warning", "skipped")
        assert (item["status"] == "ok") == (not item["messages"])


def test_statuses_and_spans(world):
    runtime, _ = world
    prompt = "🐱 <lora:alpha:1> <lora:alpah:1> <lora:alpha:1:start=10:stop=5>"
    answer = PromptChecker(runtime).check(prompt)
    assert answer["model_family"] == "sd1"
    assert [item["status"] for item in answer["items"]] == ["ok", "skipped", "warning"]
    utf16 = prompt.encode("utf-16-le")
    for item in answer["items"]:  # JavaScript's String.slice(start, end)
        assert utf16[2 * item["start"]:2 * item["end"]].decode("utf-16-le") == item["text"]
    assert answer["items"][0]["start"] == 3  # the cat is two UTF-16 code units
    assert "did you mean: 'alpha'" in answer["items"][1]["messages"][0]
    assert answer["items"][1]["messages"][0].startswith("<lora:alpah:1>: no LoRA named 'alpah'")


def test_family_mismatch_names_both_families(world):
    runtime, root = world
    [item] = PromptChecker(runtime).check("<lora:for_xl:1>")["items"]
    assert item["status"] == "skipped"
    assert item["messages"] == [f"<lora:for_xl:1>: {root / 'for_xl.safetensors'}: this LoRA is for SDXL, the "
                                "loaded model is SD1.x"]


def test_negative_prompt_tags_are_noted_not_checked(world):
    runtime, _ = world
    answer = PromptChecker(runtime).check("ugly, <lora:alpah:1>", negative=True)
    assert [(item["status"], item["messages"]) for item in answer["items"]] == [("ignored", [NEGATIVE_NOTE])]


def test_more_tags_than_a_generation_reads(world):
    runtime, _ = world
    prompt = " ".join(f"<lora:alpha:{i % 3}>" for i in range(MAX_TAGS + 2))
    items = PromptChecker(runtime).check(prompt)["items"]
    assert [item["status"] for item in items] == ["ok"] * MAX_TAGS + ["skipped"] * 2
    assert items[-1]["messages"] == generation_errors(runtime, prompt)  # the generation's one line about them


def test_no_model_bound_checks_names_and_presets(tmp_path, fresh_sd1):
    index = ModelIndex(fresh_sd1)
    save_file(make_kohya_lora(index, pick_targets(index, limit_per_kind=1)), str(tmp_path / "alpha.safetensors"))
    library = LoraLibrary([tmp_path])
    library.refresh()
    checker = PromptChecker(LoraRuntime(library, layer_scale_factory=BlockWeights()))
    answer = checker.check("<lora:alpha:1:lbw=1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1> <lora:alpha:1:lbw=NOPE>")
    assert answer["model_family"] is None
    # the length needs the model's family; the preset name does not
    assert [item["status"] for item in answer["items"]] == ["ok", "skipped"]


def test_a_file_added_later_is_found_by_a_rescan_at_most_every_few_seconds(world):
    runtime, root = world
    now = [100.0]
    checker = PromptChecker(runtime, rescan_interval_s=2.0, clock=lambda: now[0])
    assert checker.check("<lora:late:1>")["items"][0]["status"] == "skipped"  # re-scanned: not there
    (root / "late.safetensors").write_bytes((root / "alpha.safetensors").read_bytes())
    now[0] += 1.0
    assert checker.check("<lora:late:1>")["items"][0]["status"] == "skipped"  # too soon for another scan
    now[0] += 1.5
    assert checker.check("<lora:late:1>")["items"][0]["status"] == "ok"
    assert generation_errors(runtime, "<lora:late:1>") == []


def test_the_check_draws_no_random_block_weight(world):
    runtime, _ = world
    rng = random.Random(7)
    runtime.layer_scale_factory.new_generation(rng)
    before = rng.getstate()
    lbw = ",".join(["R"] * 17)
    assert PromptChecker(runtime).check(f"<lora:alpha:1:lbw={lbw}>")["items"][0]["status"] == "ok"
    assert rng.getstate() == before


def test_a_changed_file_is_checked_again(world):
    runtime, root = world
    checker = PromptChecker(runtime)
    assert checker.check("<lora:ink:1>")["items"][0]["status"] == "ok"
    ink = root / "styles" / "ink.safetensors"
    stat = ink.stat()
    ink.write_bytes((root / "for_xl.safetensors").read_bytes())
    os.utime(ink, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))  # a new version even where the clock is coarse
    runtime.library.refresh()
    [item] = checker.check("<lora:ink:1>")["items"]
    assert item["status"] == "skipped" and "for SDXL" in item["messages"][0]


# ----------------------------------------------------------------------------- the request


@pytest.mark.parametrize("body, problem", [
    (b"\xff\xfe{", "not UTF-8"),
    (b"{prompt: 1", "not JSON"),
    (b"[1, 2]", "must be a JSON object"),
    (b"{}", "'prompt' must be a string, not missing"),
    (b'{"prompt": 5}', "'prompt' must be a string, not int"),
    (b'{"prompt": "x", "negative": "yes"}', "'negative' must be true or false"),
    (None, "must be a JSON object"),
])
def test_bad_requests_get_400_and_a_message(world, body, problem):
    status, answer = check_payload(PromptChecker(world[0]), body)
    assert status == 400 and problem in answer["detail"]


def test_a_good_request_as_bytes_text_or_object(world):
    checker = PromptChecker(world[0])
    for body in (b'{"prompt": "<lora:alpah:1>"}', '{"prompt": "<lora:alpah:1>"}', {"prompt": "<lora:alpah:1>"}):
        status, answer = check_payload(checker, body)
        assert status == 200 and answer["items"][0]["status"] == "skipped"
    status, answer = check_payload(checker, {"prompt": "<lora:alpah:1>", "negative": True})
    assert status == 200 and answer["items"][0]["status"] == "ignored"
    json.dumps(answer)  # plain JSON


def test_a_failing_check_answers_with_the_error_not_a_crash(world, monkeypatch):
    checker = PromptChecker(world[0])

    def broken(*_args, **_kwargs):
        raise RuntimeError("boom")

    monkeypatch.setattr(checker, "_check_tag", broken)
    status, answer = check_payload(checker, {"prompt": "<lora:alpha:1>"})
    assert status == 200 and answer["items"] == [] and "RuntimeError: boom" in answer["error"]


# ----------------------------------------------------------------------------- completion


def test_names_offer_aliases_paths_and_leave_out_unreachable_files(world):
    runtime, _ = world
    choices = {choice["name"]: choice for choice in name_choices(runtime.library)}
    assert "alpha_alias" in choices and "alpha" not in choices  # the alias reaches only this file
    assert choices["alpha_alias"]["file"] == "alpha" and choices["alpha_alias"]["version"] == "sd1"
    assert choices["ink"]["path"] == "styles/ink.safetensors"
    assert choices["for_xl"]["version"] == "sdxl"
    assert "twin" not in choices  # two files share the name: no prompt reaches either
    assert choices["with: colon"]["insert"] == '"with: colon"'
    for choice in choices.values():  # every name offered is one the runtime resolves
        assert runtime.library.resolve(choice["name"]).name == choice["file"]
    names = [choice["name"] for choice in name_choices(runtime.library, prefer_filename=True)]
    assert "alpha" in names and "alpha_alias" not in names
    hidden = name_choices(runtime.library, hidden=lambda entry: entry.sd_version == "sdxl")
    assert "for_xl" not in [choice["name"] for choice in hidden] and len(hidden) == len(choices) - 1


def test_completion_lists_keys_and_presets(world):
    runtime, _ = world
    weights = BlockWeights()
    lists = completion_lists(runtime.library, weights.presets.names(), list(weights.elemental))
    assert [entry["key"] for entry in lists["keys"]] == list(KNOWN_KEYS)
    assert all(entry["help"] for entry in lists["keys"])
    assert "MIDD" in lists["lbw_presets"] and "ATTNDEEPOFF" in lists["lbwe_presets"]
    json.dumps(lists)
