"""Public API of DESIGN §1: errors name the bad value and the allowed ones; a failed patch leaves
the model untouched; patch/unpatch/pruning restore exactly."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

import vlmprune
from vlmprune.scorers import base as scorer_base
from tests.conftest import N_VIS, pixels, prompt, tiny_llava


def run(model, n_images=1, seed=0):
    with torch.no_grad():
        return model(input_ids=torch.tensor([prompt(n_images, seed=seed)]), pixel_values=pixels(n_images, seed)).logits


def test_available_methods_and_models():
    methods = vlmprune.available_methods()
    assert methods == sorted(methods)
    assert {"random", "uniform", "cls"} <= set(methods)
    assert "llava" in vlmprune.supported_models()


@pytest.mark.parametrize(
    "kwargs, exc, words",
    [
        (dict(method="nope", keep=4), ValueError, ["'nope'", "cls", "random"]),
        (dict(method="cls"), ValueError, ["exactly one", "keep=None", "prune_ratio=None"]),
        (dict(method="cls", keep=4, prune_ratio=0.5), ValueError, ["exactly one", "keep=4", "prune_ratio=0.5"]),
        (dict(method="cls", keep=-1), ValueError, ["-1", ">= 0"]),
        (dict(method="cls", keep=2.5), TypeError, ["2.5"]),
        (dict(method="cls", prune_ratio=1.0), ValueError, ["1.0", "[0, 1)"]),
        (dict(method="cls", prune_ratio=-0.1), ValueError, ["-0.1", "[0, 1)"]),
        (dict(method="random", keep=4, sed=3), TypeError, ["'sed'", "seed"]),
        (dict(method="cls", keep=4, positions="middle"), ValueError, ["'middle'", "compact", "original"]),
        (dict(method="cls", keep=4, layer=9), ValueError, ["layer=9", "0..3"]),
    ],
)
def test_errors_name_value_and_allowed(kwargs, exc, words):
    model = tiny_llava()
    ref = run(model)
    with pytest.raises(exc) as err:
        vlmprune.patch(model, **kwargs)
    for w in words:
        assert w in str(err.value), (w, str(err.value))
    assert not vlmprune.is_patched(model)
    assert "forward" not in model.__dict__
    assert torch.equal(run(model), ref)


def test_unsupported_model_lists_supported():
    cfg = LlamaConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, vocab_size=50)
    model = LlamaForCausalLM(cfg)
    with pytest.raises(ValueError) as err:
        vlmprune.patch(model, method="cls", keep=4)
    msg = str(err.value)
    assert "supported" in msg and "llava" in msg and "LlamaForCausalLM" in msg
    assert "forward" not in model.__dict__


def test_missing_signal_is_reported(monkeypatch):
    """A scorer that needs a signal the encoder cannot give (CLS attention on an encoder
    without CLS) is refused at patch time with the signal named."""

    class NeedsCls(scorer_base.Scorer):
        name = "needs_cls_test"

        def needs(self, info):
            return scorer_base.Request(cls_attn=(info.feature_layer,))

    monkeypatch.setitem(scorer_base._REGISTRY, "needs_cls_test", NeedsCls)
    model = tiny_llava()
    vlmprune.patch(model, method="needs_cls_test", keep=4)  # CLIP has a CLS token: fine
    vlmprune.unpatch(model)
    tower = model.model.vision_tower
    del getattr(tower, "vision_model", tower).embeddings.class_embedding
    with pytest.raises(ValueError) as err:
        vlmprune.patch(model, method="needs_cls_test", keep=4)
    assert "'cls_attn'" in str(err.value) and "received_attn" in str(err.value)


def test_unpatch_restores_bit_identical_and_is_idempotent():
    model, fresh = tiny_llava(), tiny_llava()
    vlmprune.unpatch(model)  # no-op on an unpatched model
    vlmprune.patch(model, method="cls", keep=3)
    pruned = run(model, 2)
    assert pruned.shape[1] == len(prompt(2)) - 2 * (N_VIS - 3)
    vlmprune.unpatch(model)
    vlmprune.unpatch(model)
    assert not vlmprune.is_patched(model)
    assert "forward" not in model.__dict__ and "get_image_features" not in model.model.__dict__
    assert torch.equal(run(model, 2), run(fresh, 2))


def test_patch_twice_replaces_config_without_double_wrapping():
    model = tiny_llava()
    vlmprune.patch(model, method="cls", keep=3)
    first_forward = model.forward
    vlmprune.patch(model, method="uniform", keep=5)
    assert model.forward is first_forward
    assert model.forward.__wrapped__.__func__ is type(model).forward
    run(model)
    assert len(vlmprune.last_selection(model)[0][0]) == 5
    vlmprune.unpatch(model)
    assert "forward" not in model.__dict__


def test_failed_repatch_keeps_previous_config():
    model = tiny_llava()
    vlmprune.patch(model, method="cls", keep=3)
    with pytest.raises(ValueError):
        vlmprune.patch(model, method="cls", keep=-3)
    run(model)
    assert len(vlmprune.last_selection(model)[0][0]) == 3


def test_pruning_context_restores_previous_state():
    model = tiny_llava()
    ref = run(model)
    with vlmprune.pruning(model, method="cls", keep=2):
        run(model)
        assert len(vlmprune.last_selection(model)[0][0]) == 2
    assert not vlmprune.is_patched(model)
    assert torch.equal(run(model), ref)
    vlmprune.patch(model, method="uniform", keep=6)
    with vlmprune.pruning(model, method="cls", keep=2):
        pass
    run(model)
    assert len(vlmprune.last_selection(model)[0][0]) == 6


def test_last_selection_errors():
    model = tiny_llava()
    with pytest.raises(ValueError, match="not patched"):
        vlmprune.last_selection(model)
    vlmprune.patch(model, method="cls", keep=2)
    with pytest.raises(ValueError, match="no forward"):
        vlmprune.last_selection(model)


def test_method_list_of_stages():
    model = tiny_llava()
    vlmprune.patch(model, method=[("random", {"seed": 3})], keep=4)
    run(model)
    want = torch.rand(N_VIS, generator=torch.Generator().manual_seed(3)).topk(4).indices.sort().values
    assert torch.equal(vlmprune.last_selection(model)[0][0], want)
    with pytest.raises(TypeError, match="stage"):
        vlmprune.patch(model, method=[("random", 3)], keep=4)


def test_features_from_unpatched_encoder_are_refused_for_signal_methods():
    """mm_encoder_outputs computed before patching carry no CLS attention: refuse, never guess."""
    model = tiny_llava()
    pv = pixels(1)
    with torch.no_grad():
        enc = model.model.get_image_features(pixel_values=pv, return_dict=True)
    vlmprune.patch(model, method="cls", keep=4)
    with pytest.raises(ValueError, match="before the model was patched"):
        model(input_ids=torch.tensor([prompt(1)]), mm_encoder_outputs={"image": enc})
    vlmprune.patch(model, method="uniform", keep=4)  # needs no encoder signal: fine
    with torch.no_grad():
        out = model(input_ids=torch.tensor([prompt(1)]), mm_encoder_outputs={"image": enc})
    assert out.logits.shape[1] == len(prompt(1)) - (N_VIS - 4)


def test_image_token_count_mismatch():
    model = tiny_llava()
    vlmprune.patch(model, method="cls", keep=4)
    with pytest.raises(ValueError, match="image tokens"):
        model(input_ids=torch.tensor([prompt(1)]), pixel_values=pixels(2))


def test_stack_padded_pads_ragged_rows_with_zeros_at_the_end():
    from vlmprune.adapters.base import stack_padded

    a, b = torch.arange(6.0).view(3, 2), torch.arange(10.0, 14.0).view(2, 2)
    out = stack_padded([a, b])
    assert out.shape == (2, 3, 2)
    assert torch.equal(out[0], a) and torch.equal(out[1, :2], b) and torch.equal(out[1, 2], torch.zeros(2))
    v1, v2 = torch.arange(3.0), torch.arange(5.0)  # 1-D rows (attention rows)
    assert torch.equal(stack_padded([v1, v2]), torch.tensor([[0.0, 1, 2, 0, 0], [0, 1, 2, 3, 4]]))
    assert torch.equal(stack_padded([a, a + 1]), torch.stack([a, a + 1]))
