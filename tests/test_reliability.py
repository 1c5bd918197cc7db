"""Where Hugging Face models go, a patched model goes: static caches (generate()'s 4-D masks) and
a compiled decoder give the tokens of the dynamic, eager patched model."""

from __future__ import annotations

import pytest
import torch

import vlmprune
from tests.conftest import left_pad, pixels, prompt, tiny_llava
from vlmprune.eval.tiny import qwen_inputs, tiny_qwen

GEN = dict(max_new_tokens=6, min_new_tokens=6, do_sample=False)
STAGES = {"cls": ("cls", {"keep": 5}), "fastv": ("fastv", {"layer": 2, "keep": 5}),
          "cls+fastv": ([("cls", {"keep": 6}), ("fastv", {"layer": 2, "keep": 3})], {})}


@pytest.mark.parametrize("name", list(STAGES))
def test_llava_static_cache_generates_the_dynamic_tokens(name):
    model = tiny_llava(seed=60, text_layers=4)
    ids, mask = left_pad([prompt(1, seed=61), prompt(1, seed=62, after=8), prompt(0, seed=63)])
    pv = pixels(2, seed=64)
    method, kwargs = STAGES[name]
    vlmprune.patch(model, method, **kwargs)
    with torch.no_grad():
        dynamic = model.generate(input_ids=ids, attention_mask=mask, pixel_values=pv, **GEN)
        static = model.generate(input_ids=ids, attention_mask=mask, pixel_values=pv, cache_implementation="static", **GEN)
    assert torch.equal(dynamic, static)


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen2_5_vl", "qwen3_vl"])
def test_qwen_static_cache_generates_the_dynamic_tokens(family):
    from tests.test_qwen import pad_rows

    model = tiny_qwen(family, seed=65, text_layers=4)
    batch = pad_rows([qwen_inputs([[("image", (1, 8, 8))]], seed=66), qwen_inputs([[]], seed=67)])
    vlmprune.patch(model, [("cls", {"keep": 6}), ("fastv", {"layer": 3, "keep": 3})])
    with torch.no_grad():
        dynamic = model.generate(**batch, **GEN)
        static = model.generate(**batch, cache_implementation="static", **GEN)
    assert torch.equal(dynamic, static)


def test_compiled_forward_generates_the_eager_tokens():
    """`model.forward = torch.compile(model.forward)` on a patched model: the pruning step runs
    outside the graph (a graph break) and the model's own forward is compiled."""
    model = tiny_llava(seed=68, text_layers=4)
    ids, mask = left_pad([prompt(1, seed=69), prompt(1, seed=70, after=8)])
    pv = pixels(2, seed=71)
    vlmprune.patch(model, [("cls", {"keep": 6}), ("fastv", {"layer": 2, "keep": 3})])
    with torch.no_grad():
        eager = model.generate(input_ids=ids, attention_mask=mask, pixel_values=pv, **GEN)
        model.forward = torch.compile(model.forward)
        compiled = model.generate(input_ids=ids, attention_mask=mask, pixel_values=pv, **GEN)
    assert torch.equal(eager, compiled)
    adapter = model._vlmprune_adapter
    assert getattr(adapter, "_compiled", None) is not None  # the model's forward went through torch.compile
