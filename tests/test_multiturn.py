"""Multi-turn chat on a KV cache: a second turn with a new image continues the first turn's pruned
cache, its own image pruned, positions continuing as DESIGN §2 says. Oracles: the unpatched model
fed the whole conversation's kept tokens by hand (LLaVA: compact ids renumbered over the kept
tokens, original ids the unpruned ones; Qwen: `get_rope_index` of the whole unpruned conversation
at the kept columns); nothing pruned == the unpatched two-turn run bit for bit; a left-padded batch
== its rows alone."""

from __future__ import annotations

import pytest
import torch

import vlmprune
from tests.conftest import IMAGE_TOKEN, left_pad, pixels, prompt, tiny_llava
from tests.test_llava import image_features, kept_prompt
from tests.test_qwen import oracle_call, placed
from vlmprune.adapters.base import output_cache
from vlmprune.eval.tiny import (
    QWEN_END,
    QWEN_FAMILIES,
    QWEN_IMAGE,
    QWEN_START,
    QWEN_VIDEO,
    qwen_inputs,
    tiny_qwen,
)

GEN = {"max_new_tokens": 3, "min_new_tokens": 3, "do_sample": False}
LLAVA_GEN = dict(
    GEN, suppress_tokens=[IMAGE_TOKEN]
)  # a random model may "say" the placeholder token
QWEN_GEN = dict(GEN, suppress_tokens=[QWEN_IMAGE, QWEN_VIDEO, QWEN_START, QWEN_END])


def llava_oracle(
    model,
    ids: list[int],
    feats: list[torch.Tensor],
    kept: list[torch.Tensor],
    positions: str,
):
    """Logits [L', V] of the unpatched model fed the conversation `ids` with only the kept visual tokens."""
    embeds, cols = kept_prompt(model, ids, [f[k] for f, k in zip(feats, kept)], kept)
    with torch.no_grad():
        return model(
            inputs_embeds=embeds,
            position_ids=torch.tensor([cols]) if positions == "original" else None,
        ).logits[0]


@pytest.mark.parametrize("given_ids", [False, True])
@pytest.mark.parametrize("positions", ["compact", "original"])
def test_llava_two_turns_equal_the_hand_fed_conversation(positions, given_ids):
    """Turn 1 (image A), turn 2 (text, image B, text) on turn 1's cache, then a text step, each
    with or without the unpruned position ids (as generate() passes them): each call's logits ==
    the rows of the unpatched model fed the whole conversation's kept tokens."""
    model = tiny_llava(seed=1)
    a, b, step = prompt(1, seed=2), prompt(1, seed=3, before=2, after=5), [17]
    pa, pb = pixels(1, seed=4), pixels(1, seed=5)
    feats = image_features(model, pa) + image_features(model, pb)
    at = (
        (lambda start, n: {"position_ids": torch.arange(start, start + n)[None]})
        if given_ids
        else (lambda *_: {})
    )
    vlmprune.patch(model, "cls", keep=5, positions=positions)
    with torch.no_grad():
        o1 = model(
            input_ids=torch.tensor([a]),
            pixel_values=pa,
            use_cache=True,
            **at(0, len(a)),
        )
        kept = vlmprune.last_selection(model)[0]
        mask = torch.ones(1, len(a) + len(b), dtype=torch.long)
        o2 = model(
            input_ids=torch.tensor([b]),
            pixel_values=pb,
            attention_mask=mask,
            cache=output_cache(o1),
            **at(len(a), len(b)),
        )
        kept += vlmprune.last_selection(model)[0]
        mask = torch.ones(1, len(a) + len(b) + 1, dtype=torch.long)
        o3 = model(
            input_ids=torch.tensor([step]),
            attention_mask=mask,
            cache=output_cache(o2),
            **at(len(a) + len(b), 1),
        )
    assert [len(k) for k in kept] == [5, 5]
    vlmprune.unpatch(model)
    ref = llava_oracle(model, a + b + step, feats, kept, positions)
    n1, n2 = len(a) - 11, len(b) - 11
    assert (o1.logits.shape[1], o2.logits.shape[1], o3.logits.shape[1]) == (n1, n2, 1)
    got = torch.cat([o1.logits[0], o2.logits[0], o3.logits[0]])
    torch.testing.assert_close(got, ref, atol=1e-4, rtol=0)


def two_turn_generate(model, rows1, rows2, pa, pb, gen):
    """Greedy turn 1 on a left-padded batch, then turn 2 (its last token + the new prompt, the
    new prompts left-padded among themselves) on turn 1's cache with the whole conversation's mask."""
    ids1, m1 = left_pad(rows1)
    with torch.no_grad():
        g1 = model.generate(
            input_ids=ids1,
            attention_mask=m1,
            pixel_values=pa,
            return_dict_in_generate=True,
            **gen,
        )
        new1 = g1.sequences[:, ids1.shape[1] :]
        ids2, m2 = left_pad([[int(new1[i, -1])] + r for i, r in enumerate(rows2)])
        mask = torch.cat([m1, torch.ones_like(new1[:, :-1]), m2], 1)
        g2 = model.generate(
            input_ids=ids2,
            attention_mask=mask,
            pixel_values=pb,
            cache=g1.past_key_values,
            **gen,
        )
    return new1, g2[:, ids2.shape[1] :]


@pytest.mark.parametrize("positions", ["compact", "original"])
def test_llava_generate_second_turn_batch_equals_rows_and_oracle(positions):
    """generate() on turn 2 with turn 1's past_key_values: a left-padded batch of two conversations
    gives each row's tokens alone, and those are the unpatched model's greedy tokens on the
    hand-fed conversation (turn 1 + its answer + turn 2, each image's kept tokens)."""
    model = tiny_llava(seed=6)
    rows1, rows2 = (
        [prompt(1, seed=7), prompt(1, seed=8, after=7)],
        [prompt(1, seed=9, before=2), prompt(1, seed=10)],
    )
    pa, pb = pixels(2, seed=11), pixels(2, seed=12)
    vlmprune.patch(model, "cls", keep=4, positions=positions)
    batch = two_turn_generate(model, rows1, rows2, pa, pb, LLAVA_GEN)
    for i in range(2):
        new1, new2 = two_turn_generate(
            model,
            rows1[i : i + 1],
            rows2[i : i + 1],
            pa[i : i + 1],
            pb[i : i + 1],
            LLAVA_GEN,
        )
        assert torch.equal(batch[0][i], new1[0]) and torch.equal(
            batch[1][i], new2[0]
        ), i
    # the last row alone ran last: its selections are the latest of each turn
    kept2 = vlmprune.last_selection(model)[0]
    vlmprune.patch(model, "cls", keep=4, positions=positions)
    with torch.no_grad():
        model(input_ids=torch.tensor([rows1[1]]), pixel_values=pa[1:])
    kept = vlmprune.last_selection(model)[0] + kept2
    vlmprune.unpatch(model)
    feats = image_features(model, pa[1:]) + image_features(model, pb[1:])
    seq = rows1[1] + new1[0].tolist() + rows2[1]
    for _ in range(GEN["max_new_tokens"]):
        logits = llava_oracle(model, seq, feats, kept, positions)[-1]
        logits[IMAGE_TOKEN] = -float("inf")
        seq.append(int(logits.argmax()))
    assert new2[0].tolist() == seq[-GEN["max_new_tokens"] :]


def test_nothing_pruned_second_turn_is_bit_identical():
    """keep >= every image's tokens: both turns of a left-padded batch == the unpatched model's."""
    model = tiny_llava(seed=13)
    rows1, rows2 = (
        [prompt(1, seed=14), prompt(0, seed=15, after=9)],
        [prompt(1, seed=16), prompt(1, seed=17, before=6)],
    )
    pa, pb = pixels(1, seed=18), pixels(2, seed=19)
    ids1, m1 = left_pad(rows1)
    ids2, m2 = left_pad(rows2)
    mask = torch.cat([m1, m2], 1)
    runs = []
    for patched in (False, True):
        if patched:
            vlmprune.patch(model, "cls", keep=1000)
        with torch.no_grad():
            o1 = model(
                input_ids=ids1, attention_mask=m1, pixel_values=pa, use_cache=True
            )
            o2 = model(
                input_ids=ids2,
                attention_mask=mask,
                pixel_values=pb,
                cache=output_cache(o1),
            )
        runs.append((o1.logits, o2.logits))
    assert torch.equal(runs[0][0], runs[1][0]) and torch.equal(runs[0][1], runs[1][1])


def conversation(first: dict, middle: list[int], second: dict) -> dict:
    """One-row Qwen inputs of a whole conversation: turn 1's prompt, `middle` tokens, turn 2's prompt."""
    ids = torch.cat(
        [
            first["input_ids"],
            torch.tensor([middle], dtype=torch.long),
            second["input_ids"],
        ],
        1,
    )
    return {
        "input_ids": ids,
        "attention_mask": torch.ones_like(ids),
        "mm_token_type_ids": (ids == QWEN_IMAGE).int() + 2 * (ids == QWEN_VIDEO).int(),
        "pixel_values": torch.cat([first["pixel_values"], second["pixel_values"]]),
        "image_grid_thw": torch.cat(
            [first["image_grid_thw"], second["image_grid_thw"]]
        ),
    }


ITEMS = [
    ("image", (1, 8, 8)),
    ("image", (1, 4, 8)),
]  # turn 1's image (16 tokens), turn 2's (8)


@pytest.mark.parametrize("family", QWEN_FAMILIES)
def test_qwen_two_turns_equal_the_conversation_at_its_mrope_ids(family):
    """Turn 2's image on turn 1's pruned cache, then a text step: the logits of each call == the
    rows of the unpatched model fed the whole conversation's kept tokens at the M-RoPE ids of the
    whole unpruned conversation (its `get_rope_index`), and the selections are the conversation's."""
    model = tiny_qwen(family, seed=20)
    first, second = (
        qwen_inputs([[ITEMS[0]]], seed=21),
        qwen_inputs([[ITEMS[1]]], seed=22),
    )
    vlmprune.patch(model, "cls", keep=5)
    l1, l2 = first["input_ids"].shape[1], second["input_ids"].shape[1]
    with torch.no_grad():
        o1 = model(**first, use_cache=True)
        sel = vlmprune.last_selection(model)[0]
        o2 = model(
            **dict(second, attention_mask=torch.ones(1, l1 + l2, dtype=torch.long)),
            cache=output_cache(o1),
        )
        sel += vlmprune.last_selection(model)[0]
        o3 = model(
            input_ids=torch.tensor([[17]]),
            attention_mask=torch.ones(1, l1 + l2 + 1, dtype=torch.long),
            cache=output_cache(o2),
        )
    whole = conversation(first, [], second)
    kept, feats, enc = placed(model, whole)
    assert all(torch.equal(a, b) for a, b in zip(sel, kept)) and [
        len(k) for k in kept
    ] == [5, 5]
    vlmprune.unpatch(model)
    call = oracle_call(model, whole, ITEMS, kept, feats, enc)
    with_step = append_token(model, call, 17)
    with torch.no_grad():
        ref = model(**with_step).logits[0]
    assert (o1.logits.shape[1], o2.logits.shape[1]) == (l1 - 11, l2 - 3)
    got = torch.cat([o1.logits[0], o2.logits[0], o3.logits[0]])
    torch.testing.assert_close(got, ref, atol=1e-4, rtol=0)


def append_token(model, call: dict, token: int) -> dict:
    """An oracle call (`oracle_call`) with one more text token at the next M-RoPE id."""
    pos = call["position_ids"]
    out = dict(
        call,
        position_ids=torch.cat([pos, torch.full((3, 1, 1), int(pos.max()) + 1)], 2),
    )
    ids = torch.tensor([[token]])
    if "input_ids" in call:
        out["input_ids"] = torch.cat([call["input_ids"], ids], 1)
    else:
        out["inputs_embeds"] = torch.cat(
            [call["inputs_embeds"], model.get_input_embeddings()(ids)], 1
        )
    return out


def test_second_turn_errors_are_clear():
    """A decoder stage on a later turn with an image, and a later turn given the whole conversation's
    ids (its mask then has the wrong length for the pruned cache): one-line ValueErrors."""
    model = tiny_llava(seed=23)
    a, b = prompt(1, seed=24), prompt(1, seed=25)
    vlmprune.patch(model, "fastv", layer=1, keep=4)
    with torch.no_grad():
        cache = output_cache(
            model(input_ids=torch.tensor([a]), pixel_values=pixels(1), use_cache=True)
        )
        with pytest.raises(
            ValueError,
            match="decoder stages in a call with images that continues a non-empty KV cache",
        ):
            model(input_ids=torch.tensor([b]), pixel_values=pixels(1), cache=cache)
        vlmprune.patch(model, "cls", keep=4)
        cache = output_cache(
            model(input_ids=torch.tensor([a]), pixel_values=pixels(1), use_cache=True)
        )
        whole, past = torch.tensor([a + b]), len(a) - 12
        with pytest.raises(
            ValueError,
            match=rf"attention_mask has {whole.shape[1]} columns.*should have "
            rf"{whole.shape[1] + 12}",
        ):  # generate() slices at the pruned length
            model(
                input_ids=whole[:, past:],
                pixel_values=pixels(1),
                attention_mask=torch.ones_like(whole),
                cache=cache,
            )


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen3_vl"])
def test_qwen_generate_second_turn_equals_greedy_oracle(family):
    """generate() on turn 2 with turn 1's cache (generate()'s own ids for the new image are HF's
    text-rule ids: vlmprune computes the conversation's): its tokens == greedy decoding of the
    unpatched model fed the conversation's kept tokens, each new token at the next M-RoPE id."""
    model = tiny_qwen(family, seed=26)
    first, second = (
        qwen_inputs([[ITEMS[0]]], seed=27),
        qwen_inputs([[ITEMS[1]]], seed=28),
    )
    vlmprune.patch(model, "cls", keep=5)
    with torch.no_grad():
        g1 = model.generate(**first, return_dict_in_generate=True, **QWEN_GEN)
        new1 = g1.sequences[0, first["input_ids"].shape[1] :].tolist()
        ids = torch.tensor([new1[-1:] + second["input_ids"][0].tolist()])
        mask = torch.ones(
            1,
            first["input_ids"].shape[1] + len(new1) + second["input_ids"].shape[1],
            dtype=torch.long,
        )
        g2 = model.generate(
            input_ids=ids,
            attention_mask=mask,
            pixel_values=second["pixel_values"],
            image_grid_thw=second["image_grid_thw"],
            cache=g1.past_key_values,
            return_dict_in_generate=True,
            output_logits=True,
            **QWEN_GEN,
        )
    whole = conversation(first, new1, second)
    kept, feats, enc = placed(model, whole)
    vlmprune.unpatch(model)
    call, tokens = oracle_call(model, whole, ITEMS, kept, feats, enc), []
    for step in range(GEN["max_new_tokens"]):
        with torch.no_grad():
            logits = model(**call).logits[0, -1]
        torch.testing.assert_close(
            g2.logits[step][0], logits, atol=1e-4, rtol=0
        )  # each step at its M-RoPE id
        logits[QWEN_GEN["suppress_tokens"]] = -float("inf")
        tokens.append(int(logits.argmax()))
        call = append_token(model, call, tokens[-1])
    assert g2.sequences[0, ids.shape[1] :].tolist() == tokens
