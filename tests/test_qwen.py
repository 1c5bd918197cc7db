"""Qwen2-VL / Qwen2.5-VL / Qwen3-VL adapter against its oracles (tiny random models on CPU):
nothing pruned == unpatched bit for bit; every vision method == the unpatched model fed only the
kept tokens by hand at the original M-RoPE ids; generate() == a step-by-step oracle decode at the
unpruned model's ids; a left-padded batch == its rows alone; `cls` == an eager reference."""

from __future__ import annotations

import copy

import pytest
import torch

import vlmprune
from vlmprune.adapters.base import run_scorer
from vlmprune.adapters.qwen2_vl import QwenVLAdapter
from vlmprune.eval.tiny import PAD, QWEN_FAMILIES, QWEN_IMAGE, QWEN_VIDEO, qwen_inputs, tiny_qwen
from vlmprune.scorers import scorer_class
from vlmprune.tables import support_text

VISION_METHODS = [m for m in vlmprune.available_methods() if scorer_class(m).stage == "vision"]
CLASSES = {"qwen2_vl": "Qwen2VLForConditionalGeneration", "qwen2_5_vl": "Qwen2_5_VLForConditionalGeneration",
           "qwen3_vl": "Qwen3VLForConditionalGeneration"}


def family_items(family: str) -> list[tuple[str, tuple[int, int, int]]]:
    """Two images of different sizes and (not on Qwen3-VL: test_qwen3_video.py) a two-frame video, in one row."""
    items = [("image", (1, 8, 12)), ("image", (1, 4, 8))]
    return items + ([] if family == "qwen3_vl" else [("video", (2, 8, 8))])


def n_tokens(item) -> int:
    t, h, w = item[1]
    return t * h * w // 4


def pad_rows(rows: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Single-row inputs joined into one left-padded batch (pixels and grids in row order)."""
    width = max(r["input_ids"].shape[1] for r in rows)
    out: dict[str, list[torch.Tensor]] = {}
    for r in rows:
        gap = width - r["input_ids"].shape[1]
        for name in ("input_ids", "attention_mask", "mm_token_type_ids"):
            value = r[name]
            fill = PAD if name == "input_ids" else 0
            out.setdefault(name, []).append(torch.cat([torch.full((1, gap), fill, dtype=value.dtype), value], 1))
        for name in ("pixel_values", "image_grid_thw", "pixel_values_videos", "video_grid_thw"):
            if name in r:
                out.setdefault(name, []).append(r[name])
    return {k: torch.cat(v) for k, v in out.items()}


def placed(model, inputs):
    """(kept indices per item, the features the adapter places there) in prompt order, from the
    patched model's own scorer on the encoder's signals (merging methods: their merged features)."""
    adapter = model._vlmprune_adapter
    with torch.no_grad():
        prompt_ = adapter.read_prompt(inputs)
        enc = adapter.encode(inputs, prompt_)
        signals = adapter.prefill_signals(prompt_, enc)
        k = torch.tensor([adapter.config.kept(int(f.shape[0])) for f in enc.feats])
        idx, out = run_scorer(adapter.stage.scorer, signals, signals.features, k)
    kept = [idx[i][idx[i] >= 0] for i in range(len(enc.feats))]
    return kept, [out[i, : len(kept[i])] for i in range(len(kept))], enc


def oracle_call(model, inputs, items, kept, feats, enc) -> dict:
    """The kwargs of the unpatched model fed one prompt with only the kept visual tokens, by hand: the prompt's
    columns of the kept tokens, HF's own M-RoPE ids of the unpruned prompt at those columns, and
    the kept features written into the embeddings (Qwen3-VL: handed over with its deepstack
    features gathered at the kept indices, as HF's forward adds them)."""
    ids = inputs["input_ids"][0]
    with torch.no_grad():
        pos, _ = model.model.get_rope_index(
            inputs["input_ids"], mm_token_type_ids=inputs["mm_token_type_ids"],
            image_grid_thw=inputs.get("image_grid_thw"), video_grid_thw=inputs.get("video_grid_thw"),
            attention_mask=inputs["attention_mask"])
    cols, at, item = [], 0, 0
    while at < len(ids):
        if int(ids[at]) in (QWEN_IMAGE, QWEN_VIDEO):
            cols += (at + kept[item]).tolist()
            at += n_tokens(items[item])
            item += 1
        else:
            cols.append(at)
            at += 1
    cols = torch.tensor(cols)
    new_ids, position_ids = ids[cols][None], pos[:, :, cols]
    with torch.no_grad():
        if model.config.model_type == "qwen3_vl":
            return dict(input_ids=new_ids, position_ids=position_ids, mm_encoder_outputs=qwen3_outputs(kept, feats, enc))
        embeds = model.get_input_embeddings()(new_ids)
        visual = (new_ids[0] == QWEN_IMAGE) | (new_ids[0] == QWEN_VIDEO)
        embeds[0, visual] = torch.cat(feats)
        return dict(inputs_embeds=embeds, position_ids=position_ids)


def qwen3_outputs(kept, feats, enc) -> dict:
    """Qwen3-VL's encoder outputs by kind holding only the kept tokens: their (or merged) features
    and the deepstack features gathered at the kept indices, as HF's forward adds them."""
    mm = {}
    for kind in ("image", "video"):
        order = [i for i, k in enumerate(enc.kinds) if k == kind]
        if order:
            out = copy.copy(enc.outputs[kind])
            out.pooler_output = tuple(feats[i] for i in order)
            out.deepstack_features = [tuple(layer[enc.index[i]][kept[i]] for i in order)
                                      for layer in enc.outputs[kind].deepstack_features]
            mm[kind] = out
    return mm


def oracle_logits(model, inputs, items, kept, feats, enc) -> torch.Tensor:
    with torch.no_grad():
        return model(**oracle_call(model, inputs, items, kept, feats, enc)).logits[0]


@pytest.mark.parametrize("family", QWEN_FAMILIES)
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_keep_all_is_bit_identical(family, attn):
    model = tiny_qwen(family, attn=attn, seed=1)
    batch = pad_rows([qwen_inputs([family_items(family)], seed=2), qwen_inputs([[]], seed=3),
                      qwen_inputs([[("image", (1, 4, 4))]], seed=4)])
    with torch.no_grad():
        ref = model(**batch).logits
        vlmprune.patch(model, "cls", keep=1000)
        out = model(**batch).logits
    assert torch.equal(out, ref)
    assert [[len(k) for k in row] for row in vlmprune.last_selection(model)] == \
        [[n_tokens(i) for i in family_items(family)], [], [4]]


@pytest.mark.parametrize("family", QWEN_FAMILIES)
@pytest.mark.parametrize("method", VISION_METHODS)
def test_method_matches_hand_fed_oracle(family, method):
    """Every registered vision method on every family: == the oracle, or the documented error."""
    model = tiny_qwen(family, seed=3)
    items = family_items(family)
    inputs = qwen_inputs([items], seed=5)
    documented = support_text(method, QwenVLAdapter)[family]  # the README's method x family table
    try:
        vlmprune.patch(model, method, keep=5)
    except ValueError as e:  # unsupported pair: a clear error naming the method, the family and what works
        assert repr(method) in str(e) and CLASSES[family] in str(e) and "'cls'" in str(e)
        assert documented == "unsupported", f"{method} should run on {family}: {e}"
        return
    assert documented != "unsupported"
    with torch.no_grad():
        out = model(**inputs).logits[0]
    kept, feats, enc = placed(model, inputs)
    assert [[len(k) for k in row] for row in vlmprune.last_selection(model)] == [[5] * len(items)]
    for a, b in zip(vlmprune.last_selection(model)[0], kept):
        assert torch.equal(a, b)
    vlmprune.unpatch(model)
    ref = oracle_logits(model, inputs, items, kept, feats, enc)
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=0)


@pytest.mark.parametrize("family", QWEN_FAMILIES)
def test_generate_equals_stepwise_oracle_at_unpruned_ids(family):
    """Greedy generate() of the patched model, and a manual decode with the patched forward (no
    position ids given: the model's rope_deltas must continue at the unpruned ids), equal the
    oracle decoded step by step at the ids the unpruned model would use."""
    model = tiny_qwen(family, seed=6)
    items = family_items(family)
    inputs = qwen_inputs([items], seed=7)
    vlmprune.patch(model, "divprune", prune_ratio=0.75)
    steps = 5
    with torch.no_grad():
        gen = model.generate(**inputs, max_new_tokens=steps, min_new_tokens=steps, do_sample=False)
        new = gen[0, inputs["input_ids"].shape[1]:]
        out = model(**inputs, use_cache=True)
        manual, cache = [], out.cache
        tok = out.logits[0, -1].argmax()
        for _ in range(steps):
            manual.append(int(tok))
            step = model(input_ids=tok.view(1, 1), cache=cache, use_cache=True)
            cache, tok = step.cache, step.logits[0, -1].argmax()
    assert manual == new.tolist()
    kept, feats, enc = placed(model, inputs)
    vlmprune.unpatch(model)
    with torch.no_grad():
        full, _ = model.model.get_rope_index(inputs["input_ids"], mm_token_type_ids=inputs["mm_token_type_ids"],
                                             image_grid_thw=inputs.get("image_grid_thw"),
                                             video_grid_thw=inputs.get("video_grid_thw"))
        nxt = int(full.max()) + 1  # the unpruned model's next id, in all three dims
        o = model(**oracle_call(model, inputs, items, kept, feats, enc), use_cache=True)
        ref, cache, tok = [], o.cache, o.logits[0, -1].argmax()
        for t in range(steps):
            ref.append(int(tok))
            o = model(input_ids=tok.view(1, 1), position_ids=torch.full((3, 1, 1), nxt + t), cache=cache, use_cache=True)
            cache, tok = o.cache, o.logits[0, -1].argmax()
    assert ref == new.tolist()


@pytest.mark.parametrize("family", QWEN_FAMILIES)
@pytest.mark.parametrize("method", ["cls", "divprune", "uniform", "visionzip"])
def test_left_padded_batch_generates_as_rows_alone(family, method):
    """Two image sizes, a two-image row, a text-only row and (not Qwen3-VL) a video row."""
    model = tiny_qwen(family, seed=8)
    rows = [[("image", (1, 8, 12))], [("image", (1, 4, 8)), ("image", (1, 8, 8))], []]
    if family != "qwen3_vl":
        rows.append([("video", (2, 4, 8))])
    singles = [qwen_inputs([row], seed=20 + i) for i, row in enumerate(rows)]
    batch = pad_rows(singles)
    vlmprune.patch(model, method, keep=3)
    gen = dict(max_new_tokens=4, min_new_tokens=4, do_sample=False)
    with torch.no_grad():
        out = model.generate(**batch, **gen)[:, batch["input_ids"].shape[1]:]
        assert [[len(k) for k in r] for r in vlmprune.last_selection(model)] == [[3] * len(r) for r in rows]
        for i, single in enumerate(singles):
            alone = model.generate(**single, **gen)[0, single["input_ids"].shape[1]:]
            assert torch.equal(out[i], alone), (i, out[i], alone)


def eager_block_weights(model, call: str, pixels: torch.Tensor, thw: torch.Tensor, layer: int) -> list[torch.Tensor]:
    """The softmax weights of vision block `layer`, [H, n, n] per attended sequence in the blocks'
    order, as the model's own eager attention computes them (captured from the modeling module's
    eager function while `model.model.<call>` encodes)."""
    import sys

    visual = model.model.visual
    module = sys.modules[type(visual.blocks[layer].attn).__module__]
    target, weights = visual.blocks[layer].attn, []
    original = module.eager_attention_forward

    def spy(mod, *args, **kwargs):
        out, w = original(mod, *args, **kwargs)
        if mod is target:
            weights.append(w[0].float())
        return out, w

    module.eager_attention_forward = spy
    try:
        with torch.no_grad():
            getattr(model.model, call)(pixels, thw)
    finally:
        module.eager_attention_forward = original
    return weights


def received_reference(model, inputs, layer):
    """Eager reference for `cls`: the softmax weights of vision block `layer` (`eager_block_weights`)
    averaged over heads and queries within each attended sequence, pooled over each 2x2 merge group
    (in the merger's output order), per image."""
    visual = model.model.visual
    weights = eager_block_weights(model, "get_image_features", inputs["pixel_values"], inputs["image_grid_thw"], layer)
    per_patch = torch.cat([w.mean(dim=(0, 1)) for w in weights])  # [S] in the blocks' order
    groups = per_patch.view(-1, 4).mean(1)
    if hasattr(visual, "fullatt_block_indexes"):
        from transformers.vision_utils import get_vision_window_index

        window, _ = get_vision_window_index(inputs["image_grid_thw"], visual.spatial_merge_size, visual.window_size,
                                            visual.patch_size)
        groups = groups[torch.argsort(window)]
    sizes = (inputs["image_grid_thw"].prod(-1) // 4).tolist()
    return list(groups.split(sizes))


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen2_5_vl"])
def test_cls_is_top_k_of_eager_received_attention(family):
    """`cls` keeps the top-k of the received attention of the last full-attention block (Qwen2.5-VL:
    the last of fullatt_block_indexes, block 3 of the tiny model, not window block 2)."""
    eager = tiny_qwen(family, attn="eager", seed=9)
    model = tiny_qwen(family, seed=9)
    inputs = qwen_inputs([[("image", (1, 8, 12)), ("image", (1, 8, 8))]], seed=10)
    layer = 3
    assert model.config.vision_config.depth == 4
    vlmprune.patch(model, "cls", keep=6)
    assert model._vlmprune_adapter.info.feature_layer == layer
    with torch.no_grad():
        model(**inputs)
    for got, scores in zip(vlmprune.last_selection(model)[0], received_reference(eager, inputs, layer)):
        assert torch.equal(got, scores.topk(6).indices.sort().values)


@pytest.mark.parametrize("family", QWEN_FAMILIES)
def test_prune_ratio_counts_each_item_and_keep_zero_removes_all(family):
    model = tiny_qwen(family, seed=11)
    items = family_items(family)
    inputs = qwen_inputs([items], seed=12)
    vlmprune.patch(model, "random", prune_ratio=0.5)
    with torch.no_grad():
        out = model(**inputs).logits
    sizes = [n_tokens(i) for i in items]
    assert [len(k) for k in vlmprune.last_selection(model)[0]] == [round(n * 0.5) for n in sizes]
    assert out.shape[1] == inputs["input_ids"].shape[1] - sum(n - round(n * 0.5) for n in sizes)
    vlmprune.patch(model, "cls", keep=0)
    with torch.no_grad():
        out = model(**inputs).logits
    assert out.shape[1] == inputs["input_ids"].shape[1] - sum(sizes)


def test_compact_positions_is_a_clear_error():
    model = tiny_qwen("qwen2_vl")
    with pytest.raises(ValueError, match=r"positions='compact'.*\['original'\]"):
        vlmprune.patch(model, "cls", keep=4, positions="compact")
    assert not vlmprune.is_patched(model)


def test_supported_models_lists_the_qwen_families():
    assert {"qwen2_vl", "qwen2_5_vl", "qwen3_vl"} <= set(vlmprune.supported_models())
