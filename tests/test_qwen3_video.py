"""Qwen3-VL videos (one placeholder run per frame, a timestamp's text between, as Qwen3VLProcessor
writes them) against their oracles on a tiny random model: nothing pruned == unpatched bit for bit;
a method == the unpatched model fed only the kept tokens (each frame's run holding its own kept
tokens, the timestamps kept) at the unpruned M-RoPE ids; generate() continues at the unpruned ids;
a batch with a video, an image and a text-only row == its rows alone (with a decoder stage too);
a second chat turn's video on a pruned cache == the hand-fed conversation."""

from __future__ import annotations

import pytest
import torch

import vlmprune
from tests.test_qwen import pad_rows, placed, qwen3_outputs
from vlmprune.adapters.base import output_cache
from vlmprune.eval.tiny import (
    QWEN3_FPS,
    QWEN3_TIME,
    QWEN_IMAGE,
    QWEN_VIDEO,
    qwen_inputs,
    tiny_qwen,
)

VIDEO = ("video", (3, 4, 8))  # 3 frames of 8 tokens
ITEMS = [("image", (1, 4, 8)), VIDEO]


def inputs_of(rows, seed):
    return qwen_inputs(rows, seed=seed, family="qwen3_vl")


def oracle_call(model, inputs, kept, feats, enc) -> dict:
    """The unpatched model's kwargs for row 0 fed by hand only the kept visual tokens: every text
    token (timestamps too) and, of each item's placeholders in prompt order, those at its kept
    indices; HF's M-RoPE ids of the unpruned prompt at those columns; the kept features and the
    deepstack features gathered at the kept indices."""
    ids = inputs["input_ids"][0]
    with torch.no_grad():
        pos, _ = model.model.get_rope_index(
            inputs["input_ids"],
            mm_token_type_ids=inputs["mm_token_type_ids"],
            image_grid_thw=inputs.get("image_grid_thw"),
            video_grid_thw=inputs.get("video_grid_thw"),
            attention_mask=inputs["attention_mask"],
        )
    visual = (ids == QWEN_IMAGE) | (ids == QWEN_VIDEO)
    take = ~visual
    for places, k in zip(
        visual.nonzero()[:, 0].split([int(f.shape[0]) for f in enc.feats]), kept
    ):
        take[places[k]] = True
    cols = take.nonzero()[:, 0]
    return {
        "input_ids": ids[cols][None],
        "position_ids": pos[:, :, cols],
        "mm_encoder_outputs": qwen3_outputs(kept, feats, enc),
    }


def test_prompt_is_laid_out_as_the_processor_does():
    """Per frame `<t seconds>` (HF's mid time of the frame's 2 input frames at 2 fps), then vision
    start, its 8 pads, vision end; the whole video between the chat template's vision start / end."""
    from transformers import Qwen3VLProcessor

    ids = inputs_of([[VIDEO]], seed=1)["input_ids"][0].tolist()
    text = {v: k for k, v in QWEN3_TIME.items()}
    spelt = "".join(text.get(t, "#" if t == QWEN_VIDEO else "|") for t in ids[3:-4])
    times = Qwen3VLProcessor._calculate_timestamps(None, list(range(6)), QWEN3_FPS, 2)
    assert spelt == "|" + "".join(f"<{s:.1f} seconds>|{'#' * 8}|" for s in times) + "|"


def test_keep_all_is_bit_identical():
    model = tiny_qwen("qwen3_vl", seed=1)
    batch = pad_rows(
        [
            inputs_of([ITEMS], 2),
            inputs_of([[]], 3),
            inputs_of([[("image", (1, 4, 4))]], 4),
        ]
    )
    with torch.no_grad():
        ref = model(**batch).logits
        vlmprune.patch(model, "cls", keep=1000)
        out = model(**batch).logits
    assert torch.equal(out, ref)
    assert [[len(k) for k in row] for row in vlmprune.last_selection(model)] == [
        [8, 24],
        [],
        [4],
    ]


@pytest.mark.parametrize("method", ["cls", "divprune", "pool", "quota"])
@pytest.mark.parametrize("keep", [2, 7])
def test_method_matches_hand_fed_oracle(method, keep):
    """keep=2 over 3 frames leaves a frame with no token: its run is empty, its timestamp stays."""
    model = tiny_qwen("qwen3_vl", seed=3)
    inputs = inputs_of([ITEMS], 5)
    vlmprune.patch(model, method, keep=keep)
    with torch.no_grad():
        out = model(**inputs).logits[0]
    kept, feats, enc = placed(model, inputs)
    got = vlmprune.last_selection(model)[0]
    assert [len(k) for k in got] == [keep, keep]
    assert all(torch.equal(a, b) for a, b in zip(got, kept))
    per_frame = torch.bincount(kept[1] // 8, minlength=3)
    assert keep > 3 or (per_frame == 0).any()
    assert out.shape[0] == inputs["input_ids"].shape[1] - (8 - keep) - (24 - keep)
    vlmprune.unpatch(model)
    with torch.no_grad():
        ref = model(**oracle_call(model, inputs, kept, feats, enc)).logits[0]
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=0)


def test_generate_continues_at_unpruned_ids():
    """Greedy generate() == the oracle decoded step by step at the unpruned model's next ids."""
    model = tiny_qwen("qwen3_vl", seed=6)
    inputs = inputs_of([ITEMS], 7)
    vlmprune.patch(model, "divprune", prune_ratio=0.75)
    steps = 5
    with torch.no_grad():
        new = model.generate(
            **inputs, max_new_tokens=steps, min_new_tokens=steps, do_sample=False
        )[0, -steps:]
    kept, feats, enc = placed(model, inputs)
    assert [len(k) for k in kept] == [2, 6]
    vlmprune.unpatch(model)
    with torch.no_grad():
        full, _ = model.model.get_rope_index(
            inputs["input_ids"],
            mm_token_type_ids=inputs["mm_token_type_ids"],
            image_grid_thw=inputs["image_grid_thw"],
            video_grid_thw=inputs["video_grid_thw"],
        )
        nxt = int(full.max()) + 1
        o = model(**oracle_call(model, inputs, kept, feats, enc), use_cache=True)
        ref, cache, tok = [], o.cache, o.logits[0, -1].argmax()
        for t in range(steps):
            ref.append(int(tok))
            o = model(
                input_ids=tok.view(1, 1),
                position_ids=torch.full((3, 1, 1), nxt + t),
                cache=cache,
                use_cache=True,
            )
            cache, tok = o.cache, o.logits[0, -1].argmax()
    assert ref == new.tolist()


def assert_batch_generates_as_rows_alone(
    model, seed: int, kept: list[list[int]]
) -> None:
    """A video row (with an image), an image row and a text-only row, left padded: each item keeps
    `kept`, and greedy generate() of the batch gives each row's tokens alone."""
    rows = [ITEMS, [("image", (1, 8, 8))], []]
    singles = [inputs_of([row], seed + i) for i, row in enumerate(rows)]
    batch = pad_rows(singles)
    gen = {"max_new_tokens": 4, "min_new_tokens": 4, "do_sample": False}
    with torch.no_grad():
        out = model.generate(**batch, **gen)[:, batch["input_ids"].shape[1] :]
        assert [[len(k) for k in r] for r in vlmprune.last_selection(model)] == kept
        for i, single in enumerate(singles):
            alone = model.generate(**single, **gen)[0, single["input_ids"].shape[1] :]
            assert torch.equal(out[i], alone), (i, out[i], alone)


@pytest.mark.parametrize("method", ["cls", "quota"])
def test_left_padded_batch_generates_as_rows_alone(method):
    model = tiny_qwen("qwen3_vl", seed=8)
    vlmprune.patch(model, method, prune_ratio=0.75)
    assert_batch_generates_as_rows_alone(model, 20, [[2, 6], [4], []])


@pytest.mark.parametrize(
    "stages",
    [
        [("fastv", {"layer": 3, "keep": 2, "query": "text"})],
        [("cls", {"keep": 6}), ("fastv", {"layer": 3, "keep": 2})],
    ],
)
def test_decoder_stage_batch_generates_as_rows_alone(stages):
    """A decoder stage (after the tiny model's deepstack layers 0, 1) sees the video's tokens, not
    its timestamps: kept 2 per item, batched == rows alone; alone and after a vision stage."""
    model = tiny_qwen("qwen3_vl", seed=18, text_layers=4)
    vlmprune.patch(model, stages)
    assert_batch_generates_as_rows_alone(model, 30, [[2, 2], [2], []])


def test_second_turn_video_equals_the_conversation():
    """Turn 2's video on turn 1's pruned cache (an image): each call's logits == the rows of the
    unpatched model fed the whole conversation's kept tokens at its unpruned M-RoPE ids."""
    model = tiny_qwen("qwen3_vl", seed=20)
    first, second = inputs_of([[("image", (1, 8, 8))]], 21), inputs_of([[VIDEO]], 22)
    vlmprune.patch(model, "cls", keep=5)
    l1, l2 = first["input_ids"].shape[1], second["input_ids"].shape[1]
    with torch.no_grad():
        o1 = model(**first, use_cache=True)
        sel = vlmprune.last_selection(model)[0]
        mask = torch.ones(1, l1 + l2, dtype=torch.long)
        o2 = model(**dict(second, attention_mask=mask), cache=output_cache(o1))
        sel += vlmprune.last_selection(model)[0]
    ids = torch.cat([first["input_ids"], second["input_ids"]], 1)
    whole = {
        **first,
        **second,
        "input_ids": ids,
        "attention_mask": torch.ones_like(ids),
    }
    whole["mm_token_type_ids"] = torch.cat(
        [first["mm_token_type_ids"], second["mm_token_type_ids"]], 1
    )
    kept, feats, enc = placed(model, whole)
    assert [len(k) for k in kept] == [5, 5] and all(
        torch.equal(a, b) for a, b in zip(sel, kept)
    )
    vlmprune.unpatch(model)
    with torch.no_grad():
        ref = model(**oracle_call(model, whole, kept, feats, enc)).logits[0]
    assert (o1.logits.shape[1], o2.logits.shape[1]) == (l1 - 11, l2 - 19)
    torch.testing.assert_close(
        torch.cat([o1.logits[0], o2.logits[0]]), ref, atol=1e-4, rtol=0
    )
