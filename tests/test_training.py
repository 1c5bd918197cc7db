"""Training through a pruned forward: the loss and the gradients (projector, vision tower) equal
those of the oracle, the unpatched model fed the kept (or merged) visual tokens by hand."""

from __future__ import annotations

import pytest
import torch

import vlmprune
from tests.conftest import IMAGE_TOKEN, N_VIS, pixels, prompt, tiny_llava
from tests.test_llava import kept_prompt
from vlmprune.adapters.base import run_scorer


def grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("method", ["cls", "divprune", "visionzip"])
def test_llava_loss_and_gradients_equal_the_oracle(method):
    model = tiny_llava(seed=40)
    model.train()
    ids, pv = prompt(2, seed=41), pixels(2, seed=42)
    labels = torch.tensor([ids]).masked_fill(torch.tensor([ids]) == IMAGE_TOKEN, -100)
    vlmprune.patch(model, method, keep=5)
    loss = model(input_ids=torch.tensor([ids]), pixel_values=pv, labels=labels).loss
    loss.backward()
    got = grads(model)
    kept = vlmprune.last_selection(model)[0]
    adapter = model._vlmprune_adapter
    model.zero_grad()
    # the oracle: the features (with their graph) at the kept places, by hand
    inputs = {"input_ids": torch.tensor([ids]), "pixel_values": pv}
    prompt_ = adapter.read_prompt(inputs)
    signals = adapter.prefill_signals(prompt_, adapter.encode(inputs, prompt_))
    idx, placed = run_scorer(adapter.stage.scorer, signals, signals.features, torch.tensor([5, 5]))
    vlmprune.unpatch(model)
    for img, sel in enumerate(kept):
        assert torch.equal(idx[img][: len(sel)], sel)
    embeds, cols = kept_prompt(model, ids, [placed[img, : len(sel)] for img, sel in enumerate(kept)], kept)
    ref = model(inputs_embeds=embeds, labels=labels[:, cols]).loss
    ref.backward()
    want = grads(model)
    torch.testing.assert_close(loss, ref, atol=1e-5, rtol=0)
    assert got.keys() == want.keys() and any("multi_modal_projector" in n for n in got)
    for name in want:
        torch.testing.assert_close(got[name], want[name], atol=1e-5, rtol=1e-4, msg=name)


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen2_5_vl"])
def test_qwen_pruned_forward_trains_the_merger_and_tower(family):
    """A pruned Qwen forward with labels backpropagates into the merger and the vision blocks, and
    its loss equals the oracle's (the logits oracle of tests/test_qwen.py, labels at kept columns)."""
    from tests.test_qwen import oracle_call, placed
    from vlmprune.eval.tiny import qwen_inputs, tiny_qwen

    model = tiny_qwen(family, seed=43)
    model.train()
    items = [("image", (1, 8, 8)), ("image", (1, 4, 8))]
    inputs = qwen_inputs([items], seed=44)
    labels = inputs["input_ids"].masked_fill(inputs["mm_token_type_ids"] > 0, -100)
    vlmprune.patch(model, "cls", keep=4)
    loss = model(**inputs, labels=labels).loss
    loss.backward()
    g = grads(model)
    assert any("merger" in n for n in g) and any("visual.blocks.0" in n for n in g)
    kept, feats, enc = placed(model, inputs)
    vlmprune.unpatch(model)
    with torch.no_grad():
        call = oracle_call(model, inputs, items, kept, feats, enc)
        ids = inputs["input_ids"][0]
        keep = torch.ones(len(ids), dtype=torch.bool)
        starts = (ids == 95).nonzero()[:, 0]
        keep[starts] = False
        for cols, k in zip(starts.split([16, 8]), kept):
            keep[cols[k]] = True
        ref = model(**call, labels=labels[:, keep]).loss
    torch.testing.assert_close(loss.detach(), ref, atol=1e-5, rtol=0)


def test_lora_fine_tuning_through_a_pruned_forward():
    """The README's PEFT recipe: LoRA on the decoder's q/v and a trainable projector, on a patched
    model; one step lowers the loss of the pruned forward and trains only LoRA and the projector."""
    peft = pytest.importorskip("peft")
    model = tiny_llava(seed=45)
    vlmprune.patch(model, "divprune", keep=5)
    lora = peft.get_peft_model(model, peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"],
                                                      modules_to_save=["multi_modal_projector"]))
    lora.train()
    ids, pv = torch.tensor([prompt(1, seed=46)]), pixels(1, seed=47)
    labels = ids.masked_fill(ids == IMAGE_TOKEN, -100)
    opt = torch.optim.SGD([p for p in lora.parameters() if p.requires_grad], lr=0.5)
    first = lora(input_ids=ids, pixel_values=pv, labels=labels)
    assert first.logits.shape[1] == ids.shape[1] - (N_VIS - 5)  # the forward was pruned
    first.loss.backward()
    trained = {n for n, p in lora.named_parameters() if p.grad is not None}
    assert trained and all("lora_" in n or "multi_modal_projector" in n for n in trained)
    opt.step()
    assert lora(input_ids=ids, pixel_values=pv, labels=labels).loss < first.loss
