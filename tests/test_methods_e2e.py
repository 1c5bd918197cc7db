"""Every registered vision-stage method through the adapter's oracles: pruned logits == the
unpatched model fed the kept (or merged) visual tokens by hand; batched generate == per row."""

from __future__ import annotations

import pytest
import torch

import vlmprune
from vlmprune.adapters.base import run_scorer
from vlmprune.scorers import Scorer, scorer_class
from tests.conftest import assert_generate_batch_equals_rows, pixels, prompt, tiny_llava
from tests.test_llava import image_features, oracle_row

VISION_METHODS = [m for m in vlmprune.available_methods() if scorer_class(m).stage == "vision"]


def placed_features(model, pv, kept, ids):
    """What belongs at the kept places: the scorer's merged features for merging methods,
    else the original features at the kept indices."""
    feats = image_features(model, pv)
    adapter = model._vlmprune_adapter
    with torch.no_grad():
        inputs = {"input_ids": torch.tensor([ids]), "pixel_values": pv}
        prompt_ = adapter.read_prompt(inputs)
        signals = adapter.prefill_signals(prompt_, adapter.encode(inputs, prompt_))
        k = torch.tensor([len(s) for s in kept])
        idx, out = run_scorer(adapter.stage.scorer, signals, signals.features, k)
    for i, sel in enumerate(kept):
        assert torch.equal(idx[i][idx[i] >= 0], sel)
    return [torch.zeros_like(f).index_copy_(0, sel, out[i, : len(sel)]) for i, (f, sel) in enumerate(zip(feats, kept))]


@pytest.mark.parametrize("method", VISION_METHODS)
@pytest.mark.parametrize("keep", [1, 6])
def test_method_matches_hand_fed_oracle(method, keep):
    model = tiny_llava(seed=3)
    ids = prompt(2, seed=13)
    pv = pixels(2, seed=14)
    vlmprune.patch(model, method=method, keep=keep)
    with torch.no_grad():
        out = model(input_ids=torch.tensor([ids]), pixel_values=pv).logits[0]
    kept = vlmprune.last_selection(model)[0]
    assert [len(k) for k in kept] == [keep, keep]
    feats = placed_features(model, pv, kept, ids)
    vlmprune.unpatch(model)
    ref = oracle_row(model, ids, feats, kept, "compact")
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=0)


@pytest.mark.parametrize("method", VISION_METHODS)
def test_method_batched_generate_equals_rows_alone(method):
    model = tiny_llava(seed=4)
    vlmprune.patch(model, method=method, keep=5)
    assert_generate_batch_equals_rows(model, [2, 0, 1], seed=15, new_tokens=4)


@pytest.mark.parametrize("method", VISION_METHODS)
def test_selection_pads_ragged_budgets_with_zeros_and_gathers_full_ones(method):
    """Budgets [4, 1]: image 1's row ends in -1 indices with zero features; equal budgets [3, 3]
    leave nothing to mask (the gather then skips it). Kept slots hold the features at the kept
    indices (merging methods: their own features)."""
    model = tiny_llava(seed=3)
    pv = pixels(2, seed=14)
    vlmprune.patch(model, method=method, keep=4)
    adapter = model._vlmprune_adapter
    scorer = adapter.stage.scorer
    merging = type(scorer).merges
    with torch.no_grad():
        inputs = {"input_ids": torch.tensor([prompt(2, seed=13)]), "pixel_values": pv}
        prompt_ = adapter.read_prompt(inputs)
        signals = adapter.prefill_signals(prompt_, adapter.encode(inputs, prompt_))
        if type(scorer).select is not Scorer.select:  # `merges` says whether its Selection carries features
            assert (scorer.select(signals, torch.tensor([4, 1])).features is not None) == merging
        for budgets in ([4, 1], [3, 3]):
            idx, out = run_scorer(adapter.stage.scorer, signals, signals.features, torch.tensor(budgets))
            assert idx.shape == (2, max(budgets)) and out.shape == (2, max(budgets), signals.features.shape[-1])
            for i, n in enumerate(budgets):
                assert (idx[i, :n] >= 0).all() and (idx[i, n:] == -1).all(), (budgets, idx)
                assert (out[i, n:] == 0).all()
                assert merging or torch.equal(out[i, :n], signals.features[i, idx[i, :n]])
