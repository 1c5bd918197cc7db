"""The ViT signal hooks (`vlmprune.adapters.vit.collect`) against the same quantities read off an
eager-attention run of the tower: every signal kind, more layers than one stacked batch holds
(`FLUSH_LAYERS`), and the tower's own output untouched, under SDPA and eager attention."""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import CLIPVisionConfig, CLIPVisionModel

from vlmprune.adapters import vit
from vlmprune.adapters.llava import vit_layers
from vlmprune.scorers import Request
from vlmprune.scorers.base import RowTable, layer_rows

LAYERS, HEADS = vit.FLUSH_LAYERS + 3, 4


def tower(attn: str) -> CLIPVisionModel:
    cfg = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_attention_heads=HEADS, num_hidden_layers=LAYERS,
                           image_size=28, patch_size=7, initializer_factor=5.0, attn_implementation=attn)
    torch.manual_seed(0)
    return CLIPVisionModel(cfg).eval()


def reference(pixels: torch.Tensor) -> dict[str, dict[int, torch.Tensor]]:
    """Each signal of each layer from the eager model's attention weights and its own modules."""
    model = tower("eager")
    out = model(pixel_values=pixels, output_attentions=True, output_hidden_states=True)
    ref: dict[str, dict[int, torch.Tensor]] = {n: {} for n in ("cls_attn", "received_attn", "keys", "value_norms",
                                                                "cls_value_attn")}
    for l, layer in enumerate(vit_layers(model)):
        x = layer.layer_norm1(out.hidden_states[l])
        k, v = layer.self_attn.k_proj(x), layer.self_attn.v_proj(x)
        ref["cls_attn"][l] = out.attentions[l][:, :, 0].mean(1)
        ref["received_attn"][l] = out.attentions[l].mean(dim=(1, 2))
        ref["keys"][l] = k
        ref["value_norms"][l] = v.norm(dim=-1)
        vh = v.view(v.shape[0], v.shape[1], HEADS, -1).transpose(1, 2)
        ref["cls_value_attn"][l] = torch.softmax(vh[:, :, :1] @ vh.transpose(2, 3), dim=-1)[:, :, 0].mean(1)
    return ref


@pytest.mark.parametrize("attn, flush_bytes, flush_layers, first_batch", [
    ("sdpa", vit.FLUSH_BYTES, vit.FLUSH_LAYERS, vit.FLUSH_LAYERS), ("eager", vit.FLUSH_BYTES, vit.FLUSH_LAYERS, vit.FLUSH_LAYERS),
    ("sdpa", 40_000, vit.FLUSH_LAYERS, 3), ("sdpa", vit.FLUSH_BYTES, 1, 1)])
def test_collected_signals_equal_the_eager_attention(attn, flush_bytes, flush_layers, first_batch, monkeypatch):
    """The tower has FLUSH_LAYERS + 3 layers: two batches by default. flush_bytes=40,000: a layer
    holds 19,584 bytes of q, k, v (3 images x 17 tokens x 32 float32 each), so a batch ends every
    three layers; flush_layers=1: every layer is a batch, the first settled as soon as it has run."""
    monkeypatch.setattr(vit, "FLUSH_BYTES", flush_bytes)
    monkeypatch.setattr(vit, "FLUSH_LAYERS", flush_layers)
    everything = tuple(range(LAYERS))
    request = Request(cls_attn=everything, cls_value_attn=everything[1:], received_attn=(0, LAYERS - 1),
                      keys=(2, 5), value_norms=everything[::2])
    model = tower(attn)
    hooks = vit.SignalHooks(vit_layers(model), request)
    for seed in (1, 2):  # twice through the same hooks: what a batch reads is worked out at the first call
        pixels = torch.randn(3, 3, 28, 28, generator=torch.Generator().manual_seed(seed))
        with torch.no_grad():
            plain = model(pixel_values=pixels).last_hidden_state
            with hooks.capture() as got:
                hooked = model(pixel_values=pixels).last_hidden_state
            ref = reference(pixels)
        assert torch.equal(plain, hooked)  # the hooks only read
        for name in ("cls_attn", "cls_value_attn", "received_attn", "keys", "value_norms"):
            table = getattr(got, name)
            assert sorted(table) == list(getattr(request, name)), name
            for layer, value in table.items():
                torch.testing.assert_close(value, ref[name][layer], atol=1e-5, rtol=1e-4, msg=f"{name} layer {layer}")
            layers = sorted(table)  # read back stacked, as scorers do: the same rows
            torch.testing.assert_close(layer_rows(table, layers), torch.stack([ref[name][i] for i in layers]),
                                       atol=1e-5, rtol=1e-4, msg=name)
        # the first batch's CLS rows come as one stacked tensor, read back without a copy
        assert isinstance(got.cls_attn, RowTable) and got.cls_attn.stacked.shape[0] == first_batch
        # nothing is left pending or held once the encoder has run
        assert got.cls_attn[LAYERS - 1].shape == (3, 17)
        assert not any(kept for sinks in hooks.sinks.values() for _, kept in sinks)


def test_a_layer_whose_projection_did_not_run_is_an_error_naming_it():
    model = tower("sdpa")
    hooks = vit.SignalHooks(vit_layers(model), Request(cls_attn=(1,), value_norms=(1,)))
    with pytest.raises(ValueError, match="encoder layer 1 ran without calling k_proj"):
        with hooks.capture():
            pass  # the encoder never ran
    pixels = torch.randn(1, 3, 28, 28)
    with torch.no_grad(), hooks.capture() as got:  # and the hooks work again after the error
        model(pixel_values=pixels)
    assert got.cls_attn[1].shape == got.value_norms[1].shape == (1, 17)


def test_attention_without_projections_is_refused():
    class Fused(torch.nn.Module):  # one qkv linear, as some towers have
        def __init__(self):
            super().__init__()
            self.qkv = torch.nn.Linear(8, 24)

    class Layer(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.self_attn = Fused()

    with pytest.raises(ValueError, match="k_proj module"):
        with vit.collect(torch.nn.ModuleList([Layer()]), Request(cls_attn=(0,))):
            pass


def forward_hooks(model: torch.nn.Module) -> int:
    """Forward hooks plus taps (a `forward` set on the instance, see `vit.tap`) over the modules."""
    return sum(len(m._forward_hooks) + ("forward" in m.__dict__) for m in model.modules())


def test_taps_are_on_the_modules_only_while_a_capture_runs():
    model = tower("sdpa")
    pixels = torch.randn(2, 3, 28, 28, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():  # transformers installs its own output-capturing hooks at the first forward
        model(pixel_values=pixels)
    before = forward_hooks(model)
    hooks = vit.SignalHooks(vit_layers(model), Request(cls_attn=(0, 3), value_norms=(1,), vision_hidden=(2,)))
    assert forward_hooks(model) == before  # made, not put on
    with torch.no_grad():
        plain = model(pixel_values=pixels).last_hidden_state
        with hooks.capture() as first:
            # q, k of layers 0 and 3; v of layer 1; layer 2's output; layer 0's output (plans the batches)
            assert forward_hooks(model) == before + 7
            model(pixel_values=pixels)
        assert forward_hooks(model) == before and hooks.active is None
        with hooks.capture() as second:
            model(pixel_values=pixels[:1])
        assert torch.equal(model(pixel_values=pixels).last_hidden_state, plain)
    assert forward_hooks(model) == before
    assert all(not kept for sinks in hooks.sinks.values() for _, kept in sinks)  # nothing held after a capture
    assert sorted(first.cls_attn) == [0, 3] and sorted(first.value_norms) == [1] and sorted(first.vision_hidden) == [2]
    assert first.cls_attn[3].shape == (2, 17) and second.cls_attn[3].shape == (1, 17)  # one Collected per capture
    torch.testing.assert_close(second.cls_attn[3], first.cls_attn[3][:1])
    with pytest.raises(RuntimeError, match="boom"), torch.no_grad():
        with hooks.capture():
            model(pixel_values=pixels)
            raise RuntimeError("boom")
    assert forward_hooks(model) == before and hooks.active is None  # an error inside takes the taps off too


def test_patched_model_leaves_no_taps_between_calls():
    import vlmprune
    from tests.conftest import pixels as tiny_pixels, prompt, tiny_llava

    model = tiny_llava("sdpa")
    with torch.no_grad():  # transformers installs its own output-capturing hooks at the first forward
        model(input_ids=torch.tensor([prompt(1)]), pixel_values=tiny_pixels(1))
    before = forward_hooks(model)
    vlmprune.patch(model, method="vtc_cls", keep=4)
    with torch.no_grad():
        model(input_ids=torch.tensor([prompt(1)]), pixel_values=tiny_pixels(1))
        hooks = model._vlmprune_adapter._hooks
        assert forward_hooks(model) == before + 1 and len(hooks.taps) > 0  # + the patched model's forward
        model(input_ids=torch.tensor([prompt(1)]), pixel_values=tiny_pixels(1))
    assert model._vlmprune_adapter._hooks is hooks  # made once per patch
    vlmprune.unpatch(model)
    assert forward_hooks(model) == before


def test_capture_skip_drops_the_first_tokens_of_attention_rows_only():
    """skip=1 (LLaVA's CLS): the rows are the full rows without token 0, not a softmax over the rest."""
    model = tower("sdpa")
    pixels = torch.randn(2, 3, 28, 28, generator=torch.Generator().manual_seed(3))
    request = Request(cls_attn=(1,), cls_value_attn=(1,), received_attn=(2,), value_norms=(1,), keys=(2,))
    hooks = vit.SignalHooks(vit_layers(model), request)
    with torch.no_grad():
        with hooks.capture() as full:
            model(pixel_values=pixels)
        with hooks.capture(skip=1) as cut:
            model(pixel_values=pixels)
    for name in ("cls_attn", "cls_value_attn", "received_attn"):
        layer = next(iter(getattr(request, name)))
        assert torch.equal(getattr(cut, name)[layer], getattr(full, name)[layer][:, 1:]), name
        assert getattr(cut, name)[layer].sum(-1).lt(1 - 1e-3).all(), name  # CLS's share is missing, not renormalised
    assert torch.equal(cut.value_norms[1], full.value_norms[1]) and cut.value_norms[1].shape == (2, 17)
    assert torch.equal(cut.keys[2], full.keys[2])


def test_tap_hands_over_each_output_unchanged_and_restores_the_forward():
    lin = torch.nn.Linear(3, 2)
    x = torch.randn(4, 3, generator=torch.Generator().manual_seed(6))
    exp, seen = lin(x), []
    handle = vit.tap(lin, seen.append)
    assert torch.equal(lin(x), exp) and len(seen) == 1 and torch.equal(seen[0], exp)
    twin = copy.deepcopy(lin)  # a deep copy computes with its own weights, not the original's
    with torch.no_grad():
        twin.weight.mul_(2)
    assert torch.equal(twin(x), x @ twin.weight.T + twin.bias) and torch.equal(lin(x), exp)
    seen.clear()
    lin(x)
    handle.remove()
    assert "forward" not in lin.__dict__ and torch.equal(lin(x), exp) and len(seen) == 1
    # a forward already set on the instance (accelerate's hooks do this) is wrapped, then put back
    own = lambda t: t * 2  # noqa: E731
    lin.forward = own
    handle = vit.tap(lin, seen.append)
    assert torch.equal(lin(x), x * 2) and torch.equal(seen[-1], x * 2)
    handle.remove()
    assert lin.forward is own
