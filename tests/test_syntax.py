"""Tests of lora_core.syntax: table tests per form, skip/ignore rules, schedules, fuzz, round trip."""
from __future__ import annotations

import math
import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lora_core.schedule import parse_number
from lora_core.syntax import (
    Keyframe,
    LoraRequest,
    ParseResult,
    Schedule,
    active_at,
    MAX_ITEMS,
    MAX_TAGS,
    MAX_WARNINGS,
    format_name,
    format_number,
    format_request,
    name_problem,
    parse_lora_items,
    parse_prompt,
)
from lora_core.tags import find_tags

C = Schedule.constant


def examples(count: int) -> settings:
    """At least ``count`` examples, or the profile's number when that is more (HYPOTHESIS_PROFILE=fuzz)."""
    return settings(max_examples=max(count, settings.default.max_examples))
LIST17 = "1,0,0,0,1,1,1,1,1,1,1,1,0,0,0,0,0"


def parse(text: str) -> ParseResult:
    """As A1111 hands us the text between '<lora:' and '>'."""
    return parse_lora_items(text.split(":"))


def request_of(text: str) -> LoraRequest:
    result = parse(text)
    assert result.request is not None, result.warnings
    return result.request


def items_of(tag: str) -> list[str]:
    assert tag.startswith("<lora:") and tag.endswith(">")
    return tag[len("<lora:"):-1].split(":")


# ----------------------------------------------------------------------------- accepted forms

ACCEPTED = [
    # README / built-in forms
    ("name:0.7", dict(name="name", te=C(0.7), unet=C(0.7))),
    ("name", dict(te=C(1), unet=C(1), dyn=None, lbw=None, lbwe=None, x=1.0, start=None, stop=None)),
    ("name:0.5:0.8", dict(te=C(0.5), unet=C(0.8))),
    ("name:0.5:0.8:16", dict(te=C(0.5), unet=C(0.8), dyn=16)),
    ("name:te=0.3:unet=0.9:dyn=8", dict(te=C(0.3), unet=C(0.9), dyn=8)),
    ("name:0.5:te=0.3", dict(te=C(0.3), unet=C(0.3))),  # named wins; UNET defaults to the final TE
    ("name:unet=0.2:0.6", dict(te=C(0.6), unet=C(0.2))),  # named items do not shift positions
    ("name::0.5", dict(te=C(1), unet=C(0.5))),  # empty positional = default
    ("name:0.5:", dict(te=C(0.5), unet=C(0.5))),
    ("name:-1", dict(te=C(-1), unet=C(-1))),
    ("name:.5", dict(te=C(0.5))),
    ("name:1e-1", dict(te=C(0.1))),
    ("name:+2", dict(te=C(2))),
    ("name: 0.25 ", dict(te=C(0.25))),
    ("TE=0.4", dict(name="TE=0.4", te=C(1))),  # items[0] is always the name
    ("name:TE=0.4", dict(te=C(0.4))),  # keys are case-insensitive
    ('"my lora":0.5', dict(name="my lora", te=C(0.5))),
    ('"a:b":0.5', dict(name="a:b", te=C(0.5))),
    ('" spaced ":1', dict(name="spaced")),
    ('  plain  :1', dict(name="plain")),
    ('"a : b":1', dict(name="a : b", te=C(1))),  # white space inside the quotes is kept, also before a ':'
    ('"x":1', dict(name="x")),
    ('""x":1', dict(name='"x')),
    # LBW
    ("name:1:1:lbw=MIDD:stop=12", dict(te=C(1), unet=C(1), lbw="MIDD", stop=12.0, start=None)),
    ("name:w=OUTD", dict(lbw="OUTD")),
    ("name:lbw=" + LIST17, dict(lbw=LIST17)),
    ("name:lbw= 1, 0.5 ,R,U,X,X+0.2,X-0.1,r,x - 1,0,0,0,0,0,0,0,0",
     dict(lbw="1,0.5,R,U,X,X+0.2,X-0.1,R,X-1,0,0,0,0,0,0,0,0")),
    ("name:lbw=" + ",".join(["1"] * 12), dict(lbw=",".join(["1"] * 12))),
    ("name:lbw=" + ",".join(["1"] * 20), dict(lbw=",".join(["1"] * 20))),
    ("name:lbw=" + ",".join(["0.5"] * 26), dict(lbw=",".join(["0.5"] * 26))),
    ("name:lbw=" + LIST17 + ":x=0.5", dict(x=0.5)),
    ("name:1:lbw=MIDD:lbwe=ATTNON", dict(lbw="MIDD", lbwe="ATTNON")),
    ("name:lbwe=IN05-OUT05:attn:0.8", dict(lbwe="IN05-OUT05:attn:0.8", te=C(1))),
    ("name:lbwe=IN05-OUT05:attn:0.8,BASE:attn:0.5:stop=10",
     dict(lbwe="IN05-OUT05:attn:0.8,BASE:attn:0.5", stop=10.0)),
    ("name:lbwe=NOT  in01 OUT11:NOT attn1  proj:0:0.7", dict(lbwe="NOT IN01 OUT11:NOT attn1 proj:0", te=C(0.7))),
    ("name:lbwe=:attn:1", dict(lbwe=":attn:1")),
    ("name:lbwe=IN00-IN11::1", dict(lbwe="IN00-IN11::1")),
    ("name:0.5:lbwe=IN05:attn:0.8:0.3", dict(lbwe="IN05:attn:0.8", te=C(0.5), unet=C(0.3))),
    ("name:start=5", dict(start=5.0, stop=None)),
    ("name:start=5:stop=10", dict(start=5.0, stop=10.0)),
    ("name:step=5-10", dict(start=5.0, stop=10.0)),
    ("name:step=0.25-0.75", dict(start=0.25, stop=0.75)),
    ("name:step=1e-1-2E+1", dict(start=0.1, stop=20.0)),  # the '-' of an exponent is not the range's
    ("name:step=5-", dict(start=5.0, stop=None)),
    ("name:step=-10", dict(start=None, stop=10.0)),
    ("name:stop=0.5", dict(stop=0.5)),
    # loractl
    ("name:1@0,0.5@10", dict(te=Schedule((Keyframe(1, 0), Keyframe(0.5, 10))))),
    ("name:1@0,0@0.5", dict(te=Schedule((Keyframe(1, 0), Keyframe(0, 0.5))))),
    ("name:1~0;0@0.5", dict(te=Schedule((Keyframe(1, 0), Keyframe(0, 0.5))))),
    ("name:1:0@5,1@6", dict(te=C(1), unet=Schedule((Keyframe(0, 5), Keyframe(1, 6))))),
    ("name:te=1:unet=0@0,1@1", dict(te=C(1), unet=Schedule((Keyframe(0, 0), Keyframe(1, 1))))),
    ("name:0.7@5", dict(te=C(0.7))),  # one keyframe is a constant
    ("name:1@0,1@10", dict(te=C(1))),  # equal weights are a constant
    ("name:0.5:hr=1.0", dict(te=C(0.5), hr_te=C(1), hr_unet=C(1))),
    ("name:hr=0.6:hrte=0.5", dict(hr_te=C(0.5), hr_unet=C(0.6))),
    ("name:hrte=0.5:hr=0.6", dict(hr_te=C(0.5), hr_unet=C(0.6))),  # specific wins whatever the order
    ("name:hrunet=0@0,1@1", dict(hr_te=None, hr_unet=Schedule((Keyframe(0, 0), Keyframe(1, 1))))),
]


@pytest.mark.parametrize("text, expected", ACCEPTED, ids=[case[0] for case in ACCEPTED])
def test_accepted_forms(text, expected):
    result = parse(text)
    assert result.request is not None, result.warnings
    assert result.warnings == ()
    for key, value in expected.items():
        assert getattr(result.request, key) == value, key
    assert result.request.raw == text


def test_non_string_items_as_a1111_passes_the_default_multiplier():
    # extra_networks_lora.activate appends ExtraNetworkParams(items=[name, <float option>]).
    assert parse_lora_items(["name", 0.8]).request == LoraRequest("name", te=C(0.8))


def test_unet_defaults_to_te_in_the_constructor():
    schedule = Schedule((Keyframe(0, 0), Keyframe(1, 1)))
    assert LoraRequest("n", te=schedule).unet == schedule


# ----------------------------------------------------------------------------- skipped LoRAs

SKIPPED = [
    ("name:abc", "'abc' is not a weight"),
    ("name:1:abc", "'abc' is not a weight"),
    ("name:1:MIDD", "lbw=MIDD"),  # old LBW positional preset: we say where it goes
    (":1", "no LoRA name"),
    ('"":1', "no LoRA name"),
    ('"open:1', "no closing quote"),
    ("name:dyn=x", "dyn 'x'"),
    ("name:dyn=0", "dyn '0'"),
    ("name:dyn=1.5", "dyn '1.5'"),
    ("name:1:1:2.5", "dyn '2.5'"),
    ("name:1@0,garbage", "keyframe 'garbage'"),
    ("name:1@-1", "keyframe '1@-1'"),
    ("name:1@0,", "keyframe ''"),
    ("name:1@2@3", "keyframe '1@2@3'"),
    ("name:nan", "'nan' is not a weight"),
    ("name:inf", "'inf' is not a weight"),
    ("name:1e999", "'1e999' is not a weight"),
    ("name:1_0", "'1_0' is not a weight"),
    ("name:lbw=1,2,3", "3 values"),
    ("name:lbw=0.5", "one number"),
    ("name:lbw=" + LIST17[:-1] + "Q", "'Q' is not a number"),
    ("name:lbw=" + LIST17[:-1] + "X*2", "'X*2' is not a number"),
    ("name:lbwe=IN05:attn", "not BLOCKS:ELEMENTS:RATIO"),
    ("name:lbwe=IN05:attn:abc", "ratio 'abc'"),
    ("name:lbwe=IN05:attn:0.5,FOO:attn:1", "blocks 'FOO'"),
    ("name:lbwe=A,B", "neither one preset name"),
    ("name:x=abc", "'abc' is not a number"),
    ("name:start=-1", "'-1' is not a step"),
    ("name:stop=abc", "'abc' is not a step"),
    ("name:step=5", "step '5'"),
    ("name:step=a-b", "step 'a-b'"),
    ("name:step=-", "step '-'"),
    ("name:hr=abc", "'abc' is not a weight"),
    ("name:hrte=1@", "keyframe '1@'"),
    ("name:hrunet=x", "'x' is not a weight"),
    # one rule: an item that cannot be read skips the LoRA (A1111 ignores unknown keys; a typo would change the image)
    ("name:0.5:foo=1", "unknown key 'foo'"),
    ("name:stpo=10", "unknown key 'stpo'"),
    ("name:=5", "unknown key ''"),
    ("name:1:1:8:9", "only 3 positional values (TE:UNET:DYN) are read"),
    ("name:lbwe=IN12:attn:0", "'IN12' is not a block id"),
    ("name:lbwe=IN03-IN13:attn:0", "'IN03-IN13' is not a block id"),
    ("name:lbwe=BASE M01:attn:0", "'M01' is not a block id"),
    ("name:dyn=" + "9" * 5000, "dyn '999"),
    ("name:step=1-2-3", "step '1-2-3'"),
    ("name:lbw=" + LIST17[:-1] + "X+-1", "'X+-1' is not a number"),
    ("name:lbw=" + LIST17[:-1] + "RR", "'RR' is not a number"),
    ("name:" + ",".join(["1@0"] * 300), "has 300 keyframes; at most 256"),
]


@pytest.mark.parametrize("text, problem", SKIPPED, ids=[c[0][:40] for c in SKIPPED])
def test_malformed_values_skip_the_lora_with_a_warning_naming_item_and_problem(text, problem):
    result = parse(text)
    assert result.request is None
    assert len(result.warnings) == 1, result.warnings
    warning = result.warnings[0]
    assert problem in warning
    assert "skipped" in warning
    name = text.split(":")[0].strip('"')
    if name and not text.startswith('"open'):
        assert f'LoRA "{name}"' in warning


def test_every_problem_of_a_skipped_lora_is_reported():
    result = parse("name:abc:dyn=x:lbw=1,2")
    assert result.request is None
    assert [("'abc'" in w, "dyn 'x'" in w, "2 values" in w) for w in result.warnings] == [
        (True, False, False), (False, True, False), (False, False, True)
    ]


# ----------------------------------------------------------------------------- ignored items

IGNORED = [
    ("name:te=", dict(te=C(1)), ["item 'te=': empty value"]),
    ("name:te=0.3:te=0.6", dict(te=C(0.6)), ["item 'te=0.3': 'te' is given again later; the later one wins"]),
    ("name:lbw=MIDD:w=OUTD", dict(lbw="OUTD"), ["the later one wins"]),
    ("name:1:1:8:", dict(dyn=8), ["item '': empty item after DYN; ignored"]),
    ("name:start=3:step=5-10", dict(start=5.0, stop=10.0), ["item 'start=3': 'step=5-10' also sets start"]),
    ("name:start=10:stop=5", dict(start=10.0, stop=5.0), ["never acts"]),
]


@pytest.mark.parametrize("text, expected, problems", IGNORED, ids=[c[0] for c in IGNORED])
def test_ignorable_items_keep_the_lora_with_one_warning_each(text, expected, problems):
    result = parse(text)
    assert result.request is not None
    for key, value in expected.items():
        assert getattr(result.request, key) == value
    assert len(result.warnings) == len(problems), result.warnings
    for warning, problem in zip(result.warnings, problems):
        assert problem in warning
        assert warning.startswith('LoRA "name"')


def test_empty_item_list():
    result = parse_lora_items([])
    assert result.request is None and "no LoRA name" in result.warnings[0]


def test_a_tag_of_too_many_items_is_skipped_with_one_warning():
    result = parse_lora_items(["name", *[""] * 500_000])
    assert result.request is None
    assert result.warnings == (f"<lora:name:…>: the tag has 500,001 items (values between ':'); "
                               f"a LoRA tag has at most {MAX_ITEMS}; the LoRA is skipped",)
    [(tag, from_prompt)] = parse_prompt("a cat <lora:name" + ":" * 500_000 + ">")
    assert from_prompt == result
    assert parse_lora_items(["name", "1", *[""] * (MAX_ITEMS - 5)]).request is not None


def test_warnings_are_capped_per_lora_and_the_rest_counted():
    result = parse("name:" + ":".join(["te=x"] * 20))  # 19 times 'given again later', then the value is bad
    assert result.request is None
    assert len(result.warnings) == MAX_WARNINGS + 1
    assert all("given again later" in w for w in result.warnings[:-1])
    assert result.warnings[-1] == f'LoRA "name": {20 - MAX_WARNINGS} more problems, not listed; the LoRA is skipped'
    kept = parse("name:1:1:8" + ":" * 20)
    assert kept.request is not None and len(kept.warnings) == MAX_WARNINGS + 1
    assert kept.warnings[-1] == f'LoRA "name": {20 - MAX_WARNINGS} more problems, not listed; the LoRA is kept'


def test_messages_quote_at_most_a_short_piece_of_a_long_item():
    result = parse("name:" + "x" * 100_000)
    assert result.request is None and len(result.warnings) == 1 and len(result.warnings[0]) < 300


# ----------------------------------------------------------------------------- names


@pytest.mark.parametrize("name, problem", [
    ("a>b", "contains '>'"),
    ("a\x01b", "control character U+0001"),
    ("0\r:", "control character U+000D"),  # hypothesis found it: '\r' was stripped inside the quotes
    ("tab\there", "control character U+0009"),
    ("x\x85y", "control character U+0085"),
    ("bad\udcff", "U+DCFF, half of a surrogate pair"),  # a file name that is not valid UTF-8 (surrogateescape)
    (" lead", "white space"),
    ("trail ", "white space"),
    ("", "empty"),
    ('a":b', "'\"' before a ':'"),
    ('":b', "'\"' before a ':'"),
])
def test_names_no_prompt_can_carry_are_refused_by_format_and_skipped_by_the_parser(name, problem):
    assert problem in name_problem(name)
    with pytest.raises(ValueError, match="cannot be written in a prompt"):
        format_name(name)
    with pytest.raises(ValueError):
        format_request(LoraRequest(name))
    result = parse_lora_items([name, "1"])
    if name.strip() == name:  # else the parser reads the stripped name, as A1111 does
        assert result.request is None and result.warnings


@pytest.mark.parametrize("name, written", [
    ("plain", "plain"), ("a:b", '"a:b"'), ("a : b", '"a : b"'), ('"x', '""x"'), ('"', '"""'), ('a"b', 'a"b'),
    ('a" x:b', '"a" x:b"'), ("a<b", "a<b"), ("é ü", "é ü"), ("a\u2028b", "a\u2028b"),
])
def test_names_that_can_be_written_round_trip(name, written):
    assert name_problem(name) is None
    assert format_name(name) == written
    assert parse_lora_items(items_of(format_request(LoraRequest(name)))).request == LoraRequest(name)


@examples(500)
@given(st.one_of(st.text(), st.text(alphabet=' :"<>\r\nab')))
def test_every_name_round_trips_or_is_refused(name):
    problem = name_problem(name)
    if problem is not None:
        with pytest.raises(ValueError, match="cannot be written"):
            format_name(name)
        return
    tag = format_request(LoraRequest(name, te=C(0.5)))
    [(found, result)] = parse_prompt(f"a cat, {tag}")
    assert found == tag and result.request == LoraRequest(name, te=C(0.5)) and result.warnings == ()


# ----------------------------------------------------------------------------- schedules


def schedule(text: str) -> Schedule:
    return Schedule.parse(text)


@pytest.mark.parametrize(
    "text, total, expected",
    [
        # SPEC example: keyframes weight@step, linear between, constant outside.
        ("1@0,0.5@10", 20, {0: 1.0, 5: 0.75, 10: 0.5, 15: 0.5, 19: 0.5}),
        ("0.5@5,1@10", 30, {0: 0.5, 5: 0.5, 8: 0.8, 15: 1.0}),
        # loractl's own test vectors (absolute steps since the last is > 1).
        ("0.75@0;0.5@3;1@6", 30, {0: 0.75, 3: 0.5, 6: 1.0, 9: 1.0}),
        # A fraction f is step f * (total - 1): 0.5 of 21 steps is step 10.
        ("1@0,0@0.5", 21, {0: 1.0, 5: 0.5, 10: 0.0, 20: 0.0}),
        # loractl: every step <= 1, so 1 is the last step.
        ("0@0,1@1", 11, {0: 0.0, 5: 0.5, 10: 1.0}),
        # Mixed: 0.5 is a fraction (step 5 of 11), 10 is absolute.
        ("1@0.5,0@10", 11, {0: 1.0, 5: 1.0, 8: 0.4, 10: 0.0}),
        # Written order does not matter.
        ("0.5@10,1@0", 20, {5: 0.75}),
        # Same step twice: a jump, the later-written holds from there.
        ("0@5,1@5", 20, {4: 0.0, 5: 1.0, 6: 1.0}),
        ("-1@0,1@4", 10, {1: -0.5, 3: 0.5}),
        ("0.7", 20, {0: 0.7, 19: 0.7}),
    ],
)
def test_schedule_values(text, total, expected):
    parsed = schedule(text)
    for step, value in expected.items():
        assert parsed.value_at(step, total) == pytest.approx(value, abs=1e-12), step


def test_schedule_in_a_one_step_pass_does_not_divide_by_zero():
    assert schedule("0@0,1@1").value_at(0, 1) == 1.0
    assert schedule("0@0,1@0.5").value_at(0, 0) == 1.0


def test_schedule_constant_and_text():
    assert schedule("1@0,0.5@10").is_constant is False
    assert schedule("2").is_constant is True
    assert schedule("0.3@4,0.3@9") == C(0.3)
    assert str(schedule("1@0, 0.50@10.0")) == "1@0,0.5@10"
    assert str(C(0.25)) == "0.25"


def test_schedule_rejects_bad_keyframes_at_construction():
    with pytest.raises(ValueError):
        Schedule(())
    with pytest.raises(ValueError):
        Schedule((Keyframe(1, -1), Keyframe(0, 3)))
    with pytest.raises(ValueError):
        Schedule((Keyframe(math.nan, 0), Keyframe(0, 3)))


finite = st.floats(min_value=-1e6, max_value=1e6, allow_nan=False)
steps = st.one_of(st.floats(min_value=0, max_value=1), st.integers(min_value=0, max_value=200).map(float))
keyframes = st.builds(Keyframe, finite, steps)
schedules = st.one_of(finite.map(C), st.lists(keyframes, min_size=2, max_size=6).map(lambda k: Schedule(tuple(k))))


@given(schedules, st.integers(min_value=-5, max_value=300), st.integers(min_value=0, max_value=300))
def test_schedule_value_stays_between_its_keyframe_weights(parsed, step, total):
    weights = [k.weight for k in parsed.keyframes]
    value = parsed.value_at(step, total)
    assert min(weights) - 1e-6 <= value <= max(weights) + 1e-6


@given(finite, finite, st.integers(min_value=1, max_value=100), st.integers(min_value=0, max_value=100))
def test_two_keyframe_schedule_is_linear(first, last, end, step):
    parsed = Schedule((Keyframe(first, 0.0), Keyframe(last, float(end) + 1)))
    expected = first + (last - first) * min(step, end + 1) / (end + 1)
    assert parsed.value_at(step, 1000) == pytest.approx(expected, rel=1e-9, abs=1e-6)


# ----------------------------------------------------------------------------- start / stop


@pytest.mark.parametrize(
    "text, total, active, inactive",
    [
        ("name", 20, [0, 19], []),
        ("name:stop=12", 20, [0, 11], [12, 19]),
        ("name:start=5", 20, [5, 19], [0, 4]),
        ("name:step=5-10", 20, [5, 9], [4, 10]),
        ("name:stop=0.5", 21, [0, 9], [10, 20]),
        ("name:start=0.25", 21, [5, 20], [0, 4]),
        ("name:step=0.25-0.75", 21, [5, 14], [4, 15]),
        ("name:start=0:stop=1", 20, [0], [1]),  # >= 1 is a step index for start/stop
    ],
)
def test_active_at(text, total, active, inactive):
    request = request_of(text)
    assert all(active_at(request, s, total) for s in active)
    assert not any(active_at(request, s, total) for s in inactive)


def test_is_static_and_pass_weights():
    assert request_of("name:0.7:hr=0.3").is_static()
    assert not request_of("name:1@0,0@1").is_static()
    assert not request_of("name:1:hrunet=1@0,0@1").is_static()
    assert not request_of("name:stop=10").is_static()
    assert not request_of("name:start=0.1").is_static()
    request = request_of("name:0.5:0.6:hrte=0.9")
    assert request.pass_weights(hires=False) == (C(0.5), C(0.6))
    assert request.pass_weights(hires=True) == (C(0.9), C(0.6))
    assert request_of("name:0.5:hr=1").pass_weights(True) == (C(1), C(1))


# ----------------------------------------------------------------------------- prompts


def test_parse_prompt_finds_lora_and_lyco_tags_in_order():
    prompt = 'a cat <lora:a:0.5>, <hypernet:h:1> <lyco:"b c":1:lbw=MIDD> <lora:bad:x> <LORA:up:1>'
    found = parse_prompt(prompt)
    assert [tag for tag, _ in found] == ["<lora:a:0.5>", '<lyco:"b c":1:lbw=MIDD>', "<lora:bad:x>"]
    assert found[0][1].request == LoraRequest("a", te=C(0.5))
    assert found[1][1].request == LoraRequest("b c", lbw="MIDD")
    assert found[2][1].request is None and found[2][1].warnings


def test_parse_prompt_reads_at_most_max_tags_and_says_so():
    prompt = "".join(f"<lora:a{i}:1> " for i in range(MAX_TAGS + 50))
    found = parse_prompt(prompt)
    assert len(found) == MAX_TAGS + 1
    assert [r.request.name for _, r in found[:-1]] == [f"a{i}" for i in range(MAX_TAGS)]
    tag, last = found[-1]
    assert tag == f"<lora:a{MAX_TAGS}:1>" and last.request is None
    assert last.warnings == (f"<lora:a{MAX_TAGS}:1>: a prompt may have at most {MAX_TAGS} LoRA tags; this one and"
                             " every one after it are skipped",)
    assert len(parse_prompt(prompt[:prompt.index(f"<lora:a{MAX_TAGS}:")])) == MAX_TAGS


def test_parse_prompt_without_tags():
    assert parse_prompt("") == []
    assert parse_prompt("<lora:>") == []  # A1111's regex needs at least one character
    assert parse_prompt(None) == []


# ----------------------------------------------------------------------------- fuzz

FRAGMENTS = ["<lora:", "<lyco:", ">", ":", "=", "@", "~", ",", ";", '"', " ", "-", ".", "0.5", "1", "12", "1e-1",
             "te", "unet", "dyn", "lbw", "w", "lbwe", "x", "start", "stop", "step", "hr", "hrte", "hrunet",
             "MIDD", "IN05", "OUT05", "BASE", "NOT", "attn", "R", "U", "X", "X+0.2", "name", "\n", "\r", "<", "<a:",
             "<hypernet:", "<LORA:", "é"]
prompt_like = st.lists(st.sampled_from(FRAGMENTS), max_size=40).map("".join)
A1111_RE = re.compile(r"<(\w+):([^>]+)>")  # modules/extra_networks.py, written here independently


@examples(500)
@given(st.one_of(st.text(), prompt_like))
def test_tags_are_found_exactly_as_a1111_finds_them(prompt):
    expected = [(m.start(), m.end(), m.group(1), m.group(2)) for m in A1111_RE.finditer(prompt)
                if m.group(1) in ("lora", "lyco")]
    assert [(t.start, t.end, t.network, t.text) for t in find_tags(prompt)] == expected
    assert [tag for tag, _ in parse_prompt(prompt)] == [prompt[start:end] for start, end, _, _ in expected]


def test_find_tags_reads_nothing_after_the_last_close():
    prompt = "<lora:a:1> <lora:b" + "<lora:" * 1000
    assert [t.text for t in find_tags(prompt)] == ["a:1"]
    assert list(find_tags(None)) == [] and list(find_tags("no tags")) == []


NUMBER_SPEC = re.compile(r"\s*[+-]?(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?\s*")  # the grammar (quadratic as a regex)


@examples(500)
@given(st.one_of(st.text(alphabet="0123456789.eE+- \tx_", max_size=12), st.text(max_size=8)))
def test_numbers_follow_their_grammar(text):
    try:
        value = parse_number(text)
    except ValueError:
        value = None
    if NUMBER_SPEC.fullmatch(text) and math.isfinite(float(text.strip())):  # float() alone keeps '\x1f' at the ends
        assert value == float(text.strip())
    else:
        assert value is None


def check_result(result: ParseResult) -> None:
    assert isinstance(result, ParseResult)
    assert isinstance(result.warnings, tuple)
    assert all(isinstance(w, str) and w for w in result.warnings)
    request = result.request
    if request is None:
        assert result.warnings, "a skipped LoRA always says why"
        return
    assert isinstance(request, LoraRequest)
    assert isinstance(request.name, str) and request.name == request.name.strip() and request.name
    for sched in (request.te, request.unet, request.hr_te, request.hr_unet):
        assert sched is None or isinstance(sched, Schedule)
    assert request.dyn is None or (isinstance(request.dyn, int) and request.dyn >= 1)
    assert math.isfinite(request.x)
    assert all(v is None or (math.isfinite(v) and v >= 0) for v in (request.start, request.stop))


@examples(300)
@given(st.one_of(st.text(), prompt_like))
def test_fuzz_parse_prompt_never_raises(prompt):
    found = parse_prompt(prompt)
    assert isinstance(found, list)
    for tag, result in found:
        assert isinstance(tag, str) and tag in prompt
        check_result(result)


item_lists = st.lists(st.one_of(st.text(max_size=30), prompt_like, st.floats(), st.integers()), max_size=12)


@examples(500)
@given(item_lists)
def test_fuzz_parse_lora_items_never_raises_and_canonical_form_is_stable(items):
    result = parse_lora_items(items)
    check_result(result)
    if result.request is not None:
        again = parse_lora_items(items_of(format_request(result.request)))
        assert again.request == result.request
        assert again.warnings == ()


# ----------------------------------------------------------------------------- round trip

names = st.text(min_size=1, max_size=20).map(str.strip).filter(lambda name: name_problem(name) is None)
preset_names = st.from_regex(r"[A-Za-z][A-Za-z0-9_.]{0,8}", fullmatch=True)
lbw_values = st.one_of(
    st.sampled_from(["R", "U", "X", "X+0.2", "X-0.1"]),
    finite.map(format_number),
)
lbw_lists = st.sampled_from([12, 17, 20, 26]).flatmap(
    lambda n: st.lists(lbw_values, min_size=n, max_size=n).map(",".join)
)
block_specs = st.lists(st.sampled_from(["BASE", "IN00", "IN05-OUT05", "M00", "OUT11", "IN01-IN08"]), max_size=3).map(
    " ".join
) | st.sampled_from(["NOT IN05", "NOT BASE M00"])
elements = st.lists(st.sampled_from(["attn", "attn1", "proj", "ff", "NOT"]), max_size=3).map(" ".join)
directives = st.tuples(block_specs, elements, finite.map(format_number)).map(":".join)
lbwes = preset_names | st.lists(directives, min_size=1, max_size=3).map(",".join)
step_values = st.floats(min_value=0, max_value=1e4, allow_nan=False)

requests = st.builds(
    LoraRequest,
    name=names,
    te=schedules,
    unet=st.none() | schedules,
    dyn=st.none() | st.integers(min_value=1, max_value=1024),
    lbw=st.none() | preset_names | lbw_lists,
    lbwe=st.none() | lbwes,
    x=finite,
    start=st.none() | step_values,
    stop=st.none() | step_values,
    hr_te=st.none() | schedules,
    hr_unet=st.none() | schedules,
)


@examples(300)
@given(requests)
def test_format_then_parse_round_trips(request):
    tag = format_request(request)
    result = parse_lora_items(items_of(tag))
    assert result.request == request, (tag, result.warnings)
    assert not any(w.endswith(("; the LoRA is skipped", "; ignored")) for w in result.warnings)  # a name may say so
    found = parse_prompt(f"a photo, {tag}, detailed")
    assert [(t, r.request) for t, r in found] == [(tag, request)]
    assert format_request(result.request) == tag


@pytest.mark.parametrize(
    "text, canonical",
    [
        ("name:0.7", "<lora:name:0.7>"),
        ("name:1:1:lbw=MIDD:stop=12", "<lora:name:1:lbw=MIDD:stop=12>"),
        ('"my lora":0.5', "<lora:my lora:0.5>"),
        ('"a:b":0.5:1.0', '<lora:"a:b":0.5:1>'),
        ("n:te=0.5@0;1@1:hr=0.2:dyn=4:x=2", "<lora:n:0.5@0,1@1:dyn=4:x=2:hr=0.2>"),
        ("n:hrte=0.1", "<lora:n:1:hrte=0.1>"),
    ],
)
def test_canonical_text(text, canonical):
    assert format_request(request_of(text)) == canonical
    assert format_request(request_of(text), network="lyco") == "<lyco:" + canonical[len("<lora:"):]
