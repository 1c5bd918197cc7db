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


def test_disk_offloaded_model_prunes_as_the_model_in_memory(tmp_path):
    """accelerate's device_map with two decoder layers offloaded to disk (their weights loaded by
    hooks at call time): a vision stage and a decoder stage (whose wrappers sit on an offloaded
    layer) give the logits and tokens of the same weights in memory."""
    from transformers import LlavaForConditionalGeneration

    model = tiny_llava(seed=72, text_layers=4)
    model.save_pretrained(tmp_path / "m")
    where = {"model.vision_tower": "cpu", "model.multi_modal_projector": "cpu", "lm_head": "cpu",
             "model.language_model.embed_tokens": "cpu", "model.language_model.norm": "cpu",
             "model.language_model.rotary_emb": "cpu", "model.language_model.layers.0": "cpu",
             "model.language_model.layers.1": "disk", "model.language_model.layers.2": "disk",
             "model.language_model.layers.3": "cpu"}
    offloaded = LlavaForConditionalGeneration.from_pretrained(tmp_path / "m", device_map=where,
                                                              offload_folder=tmp_path / "off").eval()
    ids, pv = torch.tensor([prompt(2, seed=73)]), pixels(2, seed=74)
    for method, kwargs in [("cls", {"keep": 5}), ("fastv", {"layer": 2, "keep": 5})]:
        vlmprune.patch(model, method, **kwargs)
        vlmprune.patch(offloaded, method, **kwargs)
        with torch.no_grad():
            a, b = model(input_ids=ids, pixel_values=pv).logits, offloaded(input_ids=ids, pixel_values=pv).logits
            assert a.shape[1] == ids.shape[1] - 2 * 11 or method == "fastv"
            assert torch.equal(a, b)
            assert torch.equal(model.generate(input_ids=ids, pixel_values=pv, **GEN),
                               offloaded.generate(input_ids=ids, pixel_values=pv, **GEN))
