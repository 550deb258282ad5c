"""Per-row LoRA sets (issue 19): every row of a batch gets the LoRAs of its own image or AND subprompt.

The oracle is the model merged with exactly that row's set (``W0 + sum m dW``, the Patcher's merged mode, which
the lora math tests check against sd-scripts' formulas), run on that row alone; the plain model is the oracle for
rows that have no LoRA, and there bit for bit.
"""
from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from lora_core.library import LoraLibrary
from lora_core.model_index import ModelIndex
from lora_core.rows import PromptLoras, RowRouter, RowSets, cfg_rows, prompt_loras
from lora_core.runtime import LoraRuntime
from lora_core.syntax import format_request, parse_lora_items
from lora_factory import LoraSpec, make_kohya_lora, make_lycoris, pick_targets
from test_patch_property import assert_bitwise, snapshot
from tiny_models import make_inputs, run_text_encoders, run_unet

TOL = dict(rtol=1e-4, atol=2e-5)


@pytest.fixture
def world(fresh_sd1, tmp_path):
    index = ModelIndex(fresh_sd1)
    unet = [t for t in pick_targets(index, kinds=(torch.nn.Linear, torch.nn.Conv2d)) if not index.is_text_encoder(t)]
    te = [t for t in pick_targets(index, kinds=(torch.nn.Linear,)) if index.is_text_encoder(t)][:6]
    assert any(t.module.endswith(".attn2.to_k") for t in unet)  # the cross-attention k/v path (ContextMemo) too
    save_file(make_kohya_lora(index, unet + te, LoraSpec(), seed=1), str(tmp_path / "alpha.safetensors"))
    save_file(make_kohya_lora(index, unet[::3] + te[::2], LoraSpec(rank=2), seed=2), str(tmp_path / "beta.safetensors"))
    convs = [t for t in unet if isinstance(index.modules[t.module], torch.nn.Conv2d)][:6]
    save_file(make_lycoris(index, convs, "loha", seed=3), str(tmp_path / "gamma.safetensors"))  # no low-rank form
    runtime = LoraRuntime(LoraLibrary([tmp_path]), mode="bypass")
    runtime.bind(fresh_sd1)
    return fresh_sd1, runtime, snapshot(fresh_sd1)


def _row(inputs: dict, r: int) -> dict:
    return {k: (v[r:r + 1] if isinstance(v, torch.Tensor) else v) for k, v in inputs.items()}


def _merged_row(runtime: LoraRuntime, root, inputs: dict, r: int, items: list[list[str]]) -> torch.Tensor:
    """Row ``r`` alone through the model merged with ``items`` (the oracle), then restored."""
    runtime.mode = "merged"
    try:
        result = runtime.activate(items)
        assert not result.errors and result.mode == ("merged" if items else "none")
        with torch.no_grad():
            return run_unet(root, _row(inputs, r))[0]
    finally:
        runtime.mode = "bypass"
        runtime.restore()


def _unet(root, inputs, chunk: int | None = None) -> torch.Tensor:
    with torch.no_grad():
        if chunk is None:
            return run_unet(root, inputs)
        n = inputs["x"].shape[0]
        return torch.cat([run_unet(root, {k: (v[a:a + chunk] if isinstance(v, torch.Tensor) else v)
                                          for k, v in inputs.items()}) for a in range(0, n, chunk)])


def _assert_rows_as_merged(runtime: LoraRuntime, root, inputs: dict, prompts: list, got: torch.Tensor,
                           plain: torch.Tensor) -> None:
    """Each row (cond rows of the images, then their uncond rows) equals the merged oracle of its image's set; an
    image without LoRAs is untouched, bit for bit (its rows were not computed at all)."""
    for r in range(got.shape[0]):
        items = [list(i) for i in prompts[r % len(prompts)].whole]
        if not items:
            assert torch.equal(got[r], plain[r]), r
            continue
        want = _merged_row(runtime, root, inputs, r, items)
        assert not torch.allclose(want, plain[r], **TOL), r
        assert torch.allclose(got[r], want, **TOL), r


SETS = [
    "a cat <lora:alpha:1>",
    "a cat",
    "a dog <lora:alpha:0.5> <lora:beta:-1> <lora:gamma:0.8>",
]


@pytest.mark.parametrize("chunk", [None, 3, 2], ids=["batch_cond_uncond", "chunks_of_batch", "odd_chunks"])
def test_each_image_gets_its_own_set_on_cond_and_uncond_rows(world, chunk):
    root, runtime, original = world
    prompts = [prompt_loras(p) for p in SETS]
    result = runtime.activate_batch(prompts)
    assert not result.errors and result.mode == "bypass" and runtime.per_row
    assert [sorted(h) for h in result.image_hashes] == [["alpha"], [], ["alpha", "beta", "gamma"]]
    assert_bitwise(root, original)  # bypass writes no weight
    inputs = make_inputs(root, "sd1", batch=6, seed=4)  # cond rows of images 0, 1, 2, then their uncond rows
    assert runtime.begin_cfg_step([1, 1, 1], 6)
    got = _unet(root, inputs, chunk)
    runtime.restore()
    plain = _unet(root, inputs, chunk)  # the same calls (kernels may round differently per batch size)
    _assert_rows_as_merged(runtime, root, inputs, prompts, got, plain)
    assert_bitwise(root, original)


def test_text_encoders_run_per_set(world):
    root, runtime, original = world
    inputs = make_inputs(root, "sd1", batch=1, seed=5)
    plain = run_text_encoders(root, inputs)["te"]
    runtime.activate([["alpha", "0.7"]])
    alpha = run_text_encoders(root, inputs)["te"]
    assert not torch.allclose(alpha, plain, **TOL)
    runtime.activate_batch([prompt_loras("x <lora:alpha:0.7>"), prompt_loras("y")])
    with runtime.text_rows(1):
        assert torch.equal(run_text_encoders(root, inputs)["te"], plain)
    with runtime.text_rows(0):
        assert torch.allclose(run_text_encoders(root, inputs)["te"], alpha, **TOL)
    with runtime.text_rows(0, None):  # the negative prompt of image 0 follows image 0's set
        assert torch.allclose(run_text_encoders(root, inputs)["te"], alpha, **TOL)


def test_one_lora_at_two_weights_is_computed_once_per_layer(world):
    root, runtime, original = world
    prompts = [prompt_loras("a <lora:alpha:1>"), prompt_loras("a <lora:alpha:0.25>")]
    runtime.activate_batch(prompts)
    patcher = runtime.patcher
    layer = next(l for l in patcher._layers.values() if isinstance(l.module, torch.nn.Linear)
                 and not runtime.index.is_text_encoder(l.entries[0].target) and not l.context)
    assert len(layer.entries) == 2 and {e.slot for e in layer.entries} == {0, 1}
    runtime.begin_cfg_step([1, 1], 4)
    patcher.set_rows(runtime._router.rows_of_call(4))
    x = torch.zeros(4, layer.module.in_features)
    terms = patcher._terms(layer, patcher._prepare(layer, x)[0], 4)
    assert len(terms) == 1 and terms[0][1] == (1.0, 0.25, 1.0, 0.25)  # one h(x), weighted per row
    patcher.set_rows(runtime._router.default)
    inputs = make_inputs(root, "sd1", batch=4, seed=6)
    runtime.begin_cfg_step([1, 1], 4)
    got = _unet(root, inputs)
    runtime.restore()
    for r, weight in enumerate(["1", "0.25", "1", "0.25"]):
        assert torch.allclose(got[r], _merged_row(runtime, root, inputs, r, [["alpha", weight]]), **TOL), r


def test_scope_subprompt_acts_on_its_subprompt_only(world):
    """``A AND B <lora:alpha:1:scope=subprompt>``: the plain prompt except through B's rows (text encoder and
    UNet cond row); A's cond row and the uncond row are the plain model's, bit for bit."""
    root, runtime, original = world
    prompt = prompt_loras("a castle AND a dragon <lora:alpha:1:scope=subprompt>")
    assert prompt.whole == () and prompt.scoped == ((), (("alpha", "1", "scope=subprompt"),))
    result = runtime.activate_batch([prompt])
    assert not result.errors and runtime.per_row and result.image_hashes == [{"alpha": result.hashes["alpha"]}]
    tokens = make_inputs(root, "sd1", batch=1, seed=7)
    te_plain = run_text_encoders(root, tokens)["te"]
    with runtime.text_rows(0, 0):
        assert torch.equal(run_text_encoders(root, tokens)["te"], te_plain)  # A
    with runtime.text_rows(0, None):
        assert torch.equal(run_text_encoders(root, tokens)["te"], te_plain)  # the negative prompt
    with runtime.text_rows(0, 1):
        te_b = run_text_encoders(root, tokens)["te"]  # B
    inputs = make_inputs(root, "sd1", batch=3, seed=8)  # rows: cond A, cond B, uncond
    runtime.begin_cfg_step([2], 3)
    got = _unet(root, inputs)
    runtime.restore()
    plain = _unet(root, inputs)
    assert torch.equal(got[0], plain[0]) and torch.equal(got[2], plain[2])
    runtime.mode = "merged"
    runtime.activate([["alpha", "1"]])
    te_merged = run_text_encoders(root, tokens)["te"]
    runtime.mode = "bypass"
    runtime.restore()
    assert torch.allclose(te_b, te_merged, **TOL) and not torch.allclose(te_b, te_plain, **TOL)
    want = _merged_row(runtime, root, inputs, 1, [["alpha", "1"]])
    assert torch.allclose(got[1], want, **TOL) and not torch.allclose(got[1], plain[1], **TOL)
    assert_bitwise(root, original)


def test_default_scope_acts_on_every_row_like_the_builtin(world):
    root, runtime, original = world
    prompt = prompt_loras("a castle AND a dragon <lora:alpha:1>")
    assert prompt.whole == (("alpha", "1"),) and not prompt.has_scoped
    runtime.mode = "auto"
    result = runtime.activate_batch([prompt, prompt])  # uniform: the one-set path, merged still possible
    assert not runtime.per_row and result.mode == "bypass" and result.image_hashes[0] == result.hashes
    assert runtime.activate_batch([prompt, prompt]).mode == "merged"
    runtime.restore()
    assert_bitwise(root, original)


def test_calls_outside_the_layout_get_the_first_images_set(world):
    root, runtime, original = world
    runtime.activate_batch([prompt_loras("a <lora:alpha:1>"), prompt_loras("b")])
    inputs = make_inputs(root, "sd1", batch=2, seed=9)
    assert not runtime.begin_cfg_step([1, 1], 5)  # not A1111's layout: every call gets the default
    got = _unet(root, inputs)
    assert runtime._router.unplaced == 1
    runtime.restore()
    for r in range(2):
        assert torch.allclose(got[r], _merged_row(runtime, root, inputs, r, [["alpha", "1"]]), **TOL)


def test_schedules_update_per_row_multipliers(world):
    root, runtime, original = world
    runtime.activate_batch([prompt_loras("a <lora:alpha:0@0,1@9>"), prompt_loras("b <lora:beta:1>")], total_steps=10)
    inputs = make_inputs(root, "sd1", batch=4, seed=10)
    runtime.step(0, 10)
    runtime.begin_cfg_step([1, 1], 4)
    first = _unet(root, inputs)
    runtime.step(9, 10)
    runtime.begin_cfg_step([1, 1], 4)
    last = _unet(root, inputs)
    runtime.restore()
    plain = _unet(root, inputs)
    assert torch.equal(first[0], plain[0]) and torch.equal(first[2], plain[2])  # alpha at weight 0
    for r in range(4):
        items = [["alpha", "1"]] if r % 2 == 0 else [["beta", "1"]]
        assert torch.allclose(last[r], _merged_row(runtime, root, inputs, r, items), **TOL), r


def test_cfg_layouts():
    assert cfg_rows([2, 1], 5) == [(0, 0), (0, 1), (1, 0), (0, None), (1, None)]
    assert cfg_rows([1, 1], 6) == [(0, 0), (1, 0), (0, None), (1, None), (0, None), (1, None)]  # edit model
    assert cfg_rows([1, 1], 3) is None
    sets = RowSets.of([prompt_loras("a <lora:x:1> AND b <lora:y:1:scope=subprompt>"), PromptLoras()],
                      {("x", "1"): 0, ("y", "1", "scope=subprompt"): 1}, 2)
    router = RowRouter(sets)
    assert router.begin_step([2, 1], 5)
    assert router.rows_of_call(2) == [(1.0, 0.0), (1.0, 1.0)]
    assert router.rows_of_call(3) == [(0.0, 0.0), (1.0, 0.0), (0.0, 0.0)]
    assert router.rows_of_call(1) == ((1.0, 0.0),) and router.unplaced == 1  # past the layout: the default
    assert router.text(0, 1) == ((1.0, 1.0),) and router.text(0) == ((1.0, 0.0),)


def test_prompt_loras_split():
    p = prompt_loras("a <lora:x:1> AND b <lora:y:0.5:scope=subprompt> <lora:z:1> AND c <lyco:w:1:scope=subprompt>")
    assert p.whole == (("x", "1"), ("z", "1"))
    assert p.scoped == ((), (("y", "0.5", "scope=subprompt"),), (("w", "1", "scope=subprompt"),))
    assert p.unscoped().whole == (("x", "1"), ("z", "1"), ("y", "0.5", "scope=subprompt"), ("w", "1", "scope=subprompt"))
    assert prompt_loras("ANDROID <lora:x:1:scope=subprompt>").scoped == ((("x", "1", "scope=subprompt"),),)
    assert prompt_loras("a <lora:AND:1:scope=subprompt> AND b").scoped == ((("AND", "1", "scope=subprompt"),), ())


def test_scope_syntax():
    request = parse_lora_items(["x", "1", "scope=subprompt"]).request
    assert request.scope == "subprompt"
    assert parse_lora_items(["x", "1"]).request.scope == "prompt"
    assert format_request(request) == "<lora:x:1:scope=subprompt>"
    assert parse_lora_items(format_request(request)[6:-1].split(":")).request == request
    bad = parse_lora_items(["x", "1", "scope=image"])
    assert bad.request is None and "scope" in bad.warnings[0]


def test_forms_that_read_the_layer_output_take_only_their_rows(world, tmp_path):
    """IA3 and OFT compute their delta from the layer's output over the whole batch (before any term is added); a
    per-row term over some of the rows takes those rows of it. Image 1 has no LoRA, so the other images' rows are
    picked out of the batch."""
    root, runtime, original = world
    index = runtime.index
    linears = [t for t in pick_targets(index, kinds=(torch.nn.Linear,)) if not index.is_text_encoder(t)
               and not t.module.endswith((".attn2.to_k", ".attn2.to_v"))][:8]
    save_file(make_lycoris(index, linears[:4], "ia3", seed=7), str(tmp_path / "delta.safetensors"))
    save_file(make_lycoris(index, linears[4:], "oft", seed=8), str(tmp_path / "epsilon.safetensors"))
    runtime.library.refresh()
    sets = ["a <lora:delta:0.8>", "a", "a <lora:epsilon:1> <lora:delta:-0.5>"]
    prompts = [prompt_loras(p) for p in sets]
    result = runtime.activate_batch(prompts)
    assert not result.errors and result.mode == "bypass" and runtime.per_row
    inputs = make_inputs(root, "sd1", batch=6, seed=9)
    assert runtime.begin_cfg_step([1, 1, 1], 6)
    got = _unet(root, inputs)
    runtime.restore()
    plain = _unet(root, inputs)
    _assert_rows_as_merged(runtime, root, inputs, prompts, got, plain)
    assert_bitwise(root, original)
