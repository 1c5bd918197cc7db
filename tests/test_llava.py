"""LLaVA adapter against its oracles: unpruned == unpatched bit for bit; pruned == the unpatched
model fed the kept visual tokens by hand; batched == per-sample; generate() consistent."""

from __future__ import annotations

import pytest
import torch

import vlmprune
from tests.conftest import (
    IMAGE_TOKEN,
    N_VIS,
    assert_generate_batch_equals_rows,
    batch_of_rows,
    left_pad,
    pixels,
    prompt,
    tiny_llava,
)

METHODS = ["random", "uniform", "cls"]


def gen_positions(mask: torch.Tensor) -> torch.Tensor:
    """Position ids as generate() makes them from a left-padded mask."""
    return (mask.cumsum(-1) - 1).masked_fill(mask == 0, 0)


def image_features(model, pv: torch.Tensor) -> list[torch.Tensor]:
    with torch.no_grad():
        return list(model.model.get_image_features(pixel_values=pv, return_dict=True).pooler_output)


def kept_prompt(model, ids: list[int], rows: list[torch.Tensor], kept: list[torch.Tensor]):
    """One prompt with only the kept visual tokens, by hand: its embeddings [1, L', D] (image i's
    kept places take `rows[i]`, one row per kept token) and each place's column in the prompt."""
    embed = model.get_input_embeddings()
    parts, cols, img, i = [], [], 0, 0
    while i < len(ids):
        if ids[i] == IMAGE_TOKEN:
            parts.append(rows[img])
            cols += (i + kept[img]).tolist()
            i += N_VIS
            img += 1
        else:
            parts.append(embed(torch.tensor([ids[i]])))
            cols.append(i)
            i += 1
    return torch.cat(parts)[None], cols


def oracle_row(model, ids: list[int], feats: list[torch.Tensor], kept: list[torch.Tensor], positions: str):
    """The unpatched model fed one prompt with only the kept visual tokens, built by hand."""
    embeds, cols = kept_prompt(model, ids, [f[k] for f, k in zip(feats, kept)], kept)
    position_ids = torch.tensor([cols]) if positions == "original" else None
    with torch.no_grad():
        return model(inputs_embeds=embeds, position_ids=position_ids).logits[0]


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_keep_all_is_bit_identical(attn):
    model = tiny_llava(attn)
    ids, mask = left_pad([prompt(2, seed=1), prompt(1, seed=2), prompt(0, seed=3)])
    pv = pixels(3)
    with torch.no_grad():
        ref = model(input_ids=ids, pixel_values=pv, attention_mask=mask).logits
        for method in METHODS:
            vlmprune.patch(model, method=method, keep=N_VIS)
            out = model(input_ids=ids, pixel_values=pv, attention_mask=mask).logits
            assert torch.equal(out, ref), method
            vlmprune.patch(model, method=method, keep=1000)
            assert torch.equal(model(input_ids=ids, pixel_values=pv, attention_mask=mask).logits, ref)
            vlmprune.patch(model, method=method, prune_ratio=0.0)
            assert torch.equal(model(input_ids=ids, pixel_values=pv, attention_mask=mask).logits, ref)
    sel = vlmprune.last_selection(model)
    assert [len(r) for r in sel] == [2, 1, 0]
    assert all(torch.equal(s, torch.arange(N_VIS)) for r in sel for s in r)
    assert model.config._attn_implementation == attn


@pytest.mark.parametrize("positions", ["compact", "original"])
@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("keep", [0, 1, 5])
def test_pruned_equals_hand_fed_oracle(method, positions, keep):
    model = tiny_llava()
    ids = prompt(2, seed=4)
    pv = pixels(2, seed=5)
    feats = image_features(model, pv)
    vlmprune.patch(model, method=method, keep=keep, positions=positions)
    with torch.no_grad():
        out = model(input_ids=torch.tensor([ids]), pixel_values=pv).logits[0]
    kept = vlmprune.last_selection(model)[0]
    assert [len(k) for k in kept] == [keep, keep]
    for k in kept:
        assert torch.equal(k, k.sort().values) and len(set(k.tolist())) == len(k)
    vlmprune.unpatch(model)
    ref = oracle_row(model, ids, feats, kept, positions)
    assert out.shape == ref.shape == (len(ids) - 2 * (N_VIS - keep), 100)
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=0)


def test_cls_matches_eager_attention_topk():
    model = tiny_llava("eager")
    pv = pixels(3, seed=7)
    with torch.no_grad():
        att = model.model.vision_tower(pv, output_attentions=True).attentions[-2]
    score = att[:, :, 0, 1:].mean(1)  # CLS row, head mean, patches only
    for k in (1, 4, 9, 15):
        vlmprune.patch(model, method="cls", keep=k)
        ids = torch.tensor([prompt(3, seed=8)])
        with torch.no_grad():
            model(input_ids=ids, pixel_values=pv)
        got = vlmprune.last_selection(model)[0]
        for i in range(3):
            want = score[i].topk(k).indices.sort().values
            assert torch.equal(got[i], want), (k, i)
    assert model.config.vision_config._attn_implementation == "eager"


def test_cls_does_not_switch_sdpa_model_to_eager():
    model = tiny_llava("sdpa")
    vlmprune.patch(model, method="cls", keep=4)
    with torch.no_grad():
        model(input_ids=torch.tensor([prompt(1)]), pixel_values=pixels(1))
    assert model.config._attn_implementation == "sdpa"
    assert model.config.vision_config._attn_implementation == "sdpa"
    assert model.config.text_config._attn_implementation == "sdpa"


def test_uniform_and_random_selections():
    model = tiny_llava()
    vlmprune.patch(model, method="uniform", keep=4)
    with torch.no_grad():
        model(input_ids=torch.tensor([prompt(1)]), pixel_values=pixels(1))
    # 2 x 2 lattice of cell centres on the 4 x 4 grid: rows/cols 1 and 3
    assert vlmprune.last_selection(model)[0][0].tolist() == [5, 7, 13, 15]
    picks = []
    for seed in (0, 0, 1):
        vlmprune.patch(model, method="random", keep=6, seed=seed)
        with torch.no_grad():
            model(input_ids=torch.tensor([prompt(2)]), pixel_values=pixels(2))
        picks.append(vlmprune.last_selection(model)[0])
    want = torch.rand(N_VIS, generator=torch.Generator().manual_seed(0)).topk(6).indices.sort().values
    assert torch.equal(picks[0][0], want) and torch.equal(picks[0][1], want)
    assert torch.equal(picks[1][0], picks[0][0])
    assert not torch.equal(picks[2][0], picks[0][0])


@pytest.mark.parametrize("positions", ["compact", "original"])
def test_batched_forward_equals_per_sample(positions):
    model = tiny_llava()
    n_img = [2, 0, 1]
    rows, pv_rows = batch_of_rows(n_img, seed=10)
    vlmprune.patch(model, method="cls", keep=3, positions=positions)
    ids, mask = left_pad(rows)
    with torch.no_grad():
        batch = model(
            input_ids=ids, attention_mask=mask, pixel_values=torch.cat(pv_rows), position_ids=gen_positions(mask)
        ).logits
        sel_batch = vlmprune.last_selection(model)
        for i, row in enumerate(rows):
            kwargs = {"pixel_values": pv_rows[i]} if n_img[i] else {}
            alone = model(input_ids=torch.tensor([row]), **kwargs).logits[0]
            torch.testing.assert_close(batch[i, -alone.shape[0]:], alone, atol=1e-5, rtol=0)
            if n_img[i]:
                assert all(torch.equal(a, b) for a, b in zip(sel_batch[i], vlmprune.last_selection(model)[0]))
    assert [len(r) for r in sel_batch] == n_img


@pytest.mark.parametrize("positions", ["compact", "original"])
def test_generate_left_padded_batch_equals_rows_alone(positions):
    model = tiny_llava()
    vlmprune.patch(model, method="cls", keep=4, positions=positions)
    assert_generate_batch_equals_rows(model, [0, 2, 1], seed=30, new_tokens=6)


def test_generate_matches_manual_decode_oracle():
    """Greedy tokens of the patched model == greedy decoding of the unpatched model fed the kept
    tokens by hand (compact positions), step by step without a cache."""
    model = tiny_llava()
    ids = prompt(1, seed=50)
    pv = pixels(1, seed=51)
    feats = image_features(model, pv)
    vlmprune.patch(model, method="cls", keep=5)
    with torch.no_grad():
        out = model.generate(input_ids=torch.tensor([ids]), pixel_values=pv, max_new_tokens=5, do_sample=False,
                             min_new_tokens=5)[0, len(ids):]
    kept = vlmprune.last_selection(model)[0]
    vlmprune.unpatch(model)
    seq = list(ids)
    for _ in range(5):
        seq.append(int(oracle_row(model, seq, feats, kept, "compact")[-1].argmax()))
    assert out.tolist() == seq[len(ids):]


def test_labels_loss_equals_oracle():
    model = tiny_llava()
    ids = prompt(1, seed=60)
    labels = torch.tensor([[-100 if t == IMAGE_TOKEN else t for t in ids]])
    pv = pixels(1, seed=61)
    vlmprune.patch(model, method="cls", keep=3)
    with torch.no_grad():
        loss = model(input_ids=torch.tensor([ids]), pixel_values=pv, labels=labels).loss
    kept = vlmprune.last_selection(model)[0]
    feats = image_features(model, pv)
    vlmprune.unpatch(model)
    logits = oracle_row(model, ids, feats, kept, "compact")
    text_labels = torch.tensor([t for t in labels[0].tolist() if t != -100])
    n_text_before = ids.index(IMAGE_TOKEN)
    pruned_labels = torch.cat([text_labels[:n_text_before], torch.full((3,), -100), text_labels[n_text_before:]])
    want = torch.nn.functional.cross_entropy(logits[:-1], pruned_labels[1:], ignore_index=-100)
    torch.testing.assert_close(loss, want, atol=1e-5, rtol=0)


def test_prune_ratio_rounds_kept_count():
    model = tiny_llava()
    for ratio, kept in [(0.5, 8), (0.75, 4), (0.9, 2), (0.97, 0)]:  # round(16 * (1 - r))
        vlmprune.patch(model, method="cls", prune_ratio=ratio)
        with torch.no_grad():
            model(input_ids=torch.tensor([prompt(1)]), pixel_values=pixels(1))
        assert len(vlmprune.last_selection(model)[0][0]) == kept


def test_full_feature_strategy_counts_cls_token():
    model = tiny_llava(strategy="full")
    ids = prompt(1, n_vis=N_VIS + 1)
    pv = pixels(1)
    feats = image_features(model, pv)
    assert feats[0].shape[0] == N_VIS + 1
    vlmprune.patch(model, method="cls", keep=4)
    with torch.no_grad():
        out = model(input_ids=torch.tensor([ids]), pixel_values=pv).logits
    assert out.shape[1] == len(ids) - (N_VIS + 1 - 4)


def test_bad_prefill_inputs_are_clear_errors_and_prune_nothing():
    """Embeddings without ids, a mask of another shape, a token count the images do not give:
    each a ValueError naming the values, raised before any pruning."""
    model = tiny_llava()
    vlmprune.patch(model, method="cls", keep=4)
    ids = torch.tensor([prompt(1)])
    with torch.no_grad():
        with pytest.raises(ValueError, match="needs input_ids"):
            model(inputs_embeds=model.get_input_embeddings()(ids), pixel_values=pixels(1))
        n = ids.shape[1]
        with pytest.raises(ValueError, match=rf"2-D attention_mask shaped like input_ids \(1, {n}\).*\(1, 1, {n}, {n}\)"):
            model(input_ids=ids, attention_mask=torch.ones(1, 1, n, n, dtype=torch.long), pixel_values=pixels(1))
        with pytest.raises(ValueError, match=rf"holds {2 * N_VIS} image tokens but the images give {N_VIS}"):
            model(input_ids=torch.tensor([prompt(2)]), pixel_values=pixels(1))
        model(input_ids=ids, pixel_values=pixels(1))  # the model still works after the errors
    assert vlmprune.last_selection(model)[0][0].numel() == 4
