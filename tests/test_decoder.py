"""Decoder-stage pruning against layer-by-layer oracles written here from the unpatched model:
layers < K on the whole sequence, the reference ranking from an eager run's attention, layers >= K
by hand on the kept rows at their own position ids; KV-cache lengths; batched == rows alone;
generate() == a step-by-step oracle decode; composition with a vision stage."""

from __future__ import annotations

import pytest
import torch
from transformers.masking_utils import create_causal_mask

import vlmprune
from tests.conftest import IMAGE_TOKEN, N_VIS, left_pad, pixels, prompt, tiny_llava
from vlmprune.adapters.decoder import decoder_stack
from vlmprune.eval.tiny import QWEN_IMAGE, qwen_inputs, tiny_qwen

LAYERS = 4


def llava(attn="sdpa", seed=0):
    return tiny_llava(attn=attn, seed=seed, text_layers=LAYERS)


def llava_row(model, ids, pv):
    """(embeddings with the image features in place, position ids, visual columns per image) of one
    LLaVA prompt, as the unpatched model builds them."""
    with torch.no_grad():
        feats = list(model.model.get_image_features(pixel_values=pv, return_dict=True).pooler_output)
        embeds = model.get_input_embeddings()(torch.tensor([ids]))
    cols = (torch.tensor(ids) == IMAGE_TOKEN).nonzero()[:, 0]
    embeds[0, cols] = torch.cat(feats)
    return embeds, torch.arange(len(ids))[None], list(cols.split(N_VIS))


def qwen_row(model, inputs):
    """The same for one Qwen prompt: HF's M-RoPE ids of the prompt, images in prompt order."""
    with torch.no_grad():
        feats = torch.cat(list(model.model.get_image_features(inputs["pixel_values"], inputs["image_grid_thw"],
                                                              return_dict=True).pooler_output))
        embeds = model.get_input_embeddings()(inputs["input_ids"])
        pos, _ = model.model.get_rope_index(inputs["input_ids"], mm_token_type_ids=inputs["mm_token_type_ids"],
                                            image_grid_thw=inputs["image_grid_thw"])
    ids = inputs["input_ids"][0]
    cols = (ids == QWEN_IMAGE).nonzero()[:, 0]
    embeds[0, cols] = feats
    sizes = (inputs["image_grid_thw"].prod(-1) // 4).tolist()
    return embeds, pos, list(cols.split(sizes))


def run_layers(model, hidden, position_ids, layers, cache=None):
    """Decoder layers `layers` by hand on one row (no padding), with the causal mask HF makes."""
    stack = decoder_stack(model)
    pe = stack.rotary_emb(hidden, position_ids)
    first = layers[0]
    mask = create_causal_mask(stack.config, hidden, None, cache=cache, layer_idx=first)
    for i in layers:
        hidden = stack.layers[i](hidden, attention_mask=mask, position_embeddings=pe,
                                 position_ids=position_ids if position_ids.ndim == 2 else None, cache=cache)
    return hidden


def head(model, hidden):
    stack = decoder_stack(model)
    return model.lm_head(stack.norm(hidden))


def eager_last_row(model_eager, kwargs, layer):
    """Head-mean attention of the last position in decoder layer `layer`, from an eager run."""
    with torch.no_grad():
        out = model_eager(**kwargs, output_attentions=True)
    return out.attentions[layer][0].float().mean(0)[-1]


def oracle(model, embeds, position_ids, visual, keep, k_layer, ranking):
    """Layers < K on everything, then the kept rows (top `keep` of `ranking` per image) to the end."""
    with torch.no_grad():
        h = run_layers(model, embeds, position_ids, range(k_layer))
    chosen = [cols[ranking[cols].topk(min(keep, len(cols))).indices.sort().values] for cols in visual]
    drop = torch.cat([c for c in visual]) if visual else torch.zeros(0, dtype=torch.long)
    keepcols = torch.ones(embeds.shape[1], dtype=torch.bool)
    keepcols[drop] = False
    for c in chosen:
        keepcols[c] = True
    cols = keepcols.nonzero()[:, 0]
    pos = position_ids[..., cols]
    with torch.no_grad():
        h = run_layers(model, h[:, cols], pos, range(k_layer, LAYERS))
        logits = head(model, h)[0]
    return logits, [(c[:, None] == v[None]).nonzero()[:, 1] for c, v in zip(chosen, visual)], cols


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_fastv_llava_equals_layerwise_oracle(attn):
    model, eager = llava(attn, seed=1), llava("eager", seed=1)
    ids, pv = prompt(2, seed=3), pixels(2, seed=4)
    k_layer, keep = 2, 5
    embeds, pos, visual = llava_row(model, ids, pv)
    ranking = eager_last_row(eager, dict(input_ids=torch.tensor([ids]), pixel_values=pv), k_layer - 1)
    ref, ref_sel, _ = oracle(model, embeds, pos, visual, keep, k_layer, ranking)
    vlmprune.patch(model, "fastv", layer=k_layer, keep=keep)
    with torch.no_grad():
        out = model(input_ids=torch.tensor([ids]), pixel_values=pv, use_cache=True)
    torch.testing.assert_close(out.logits[0], ref, atol=1e-4, rtol=0)
    for got, want in zip(vlmprune.last_selection(model)[0], ref_sel):
        assert torch.equal(got, want)
    # the KV cache: layers < K hold every token, layers >= K only the kept ones
    lengths = [out.cache.layers[i].keys.shape[2] for i in range(LAYERS)]
    assert lengths == [len(ids)] * k_layer + [len(ids) - 2 * (N_VIS - keep)] * (LAYERS - k_layer)


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen2_5_vl"])
def test_fastv_qwen_equals_layerwise_oracle_at_mrope_ids(family):
    model = tiny_qwen(family, seed=2, text_layers=LAYERS)
    eager = tiny_qwen(family, attn="eager", seed=2, text_layers=LAYERS)
    inputs = qwen_inputs([[("image", (1, 8, 12)), ("image", (1, 4, 8))]], seed=5)
    k_layer, keep = 2, 4
    embeds, pos, visual = qwen_row(model, inputs)
    ranking = eager_last_row(eager, inputs, k_layer - 1)
    ref, ref_sel, _ = oracle(model, embeds, pos, visual, keep, k_layer, ranking)
    vlmprune.patch(model, "fastv", layer=k_layer, keep=keep)
    with torch.no_grad():
        out = model(**inputs).logits[0]
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=0)
    for got, want in zip(vlmprune.last_selection(model)[0], ref_sel):
        assert torch.equal(got, want)


def test_fastv_text_query_averages_the_rows_after_the_images():
    model, eager = llava(seed=6), llava("eager", seed=6)
    ids, pv = prompt(1, seed=7, after=5), pixels(1, seed=8)
    k_layer, keep = 1, 6
    embeds, pos, visual = llava_row(model, ids, pv)
    with torch.no_grad():
        att = eager(input_ids=torch.tensor([ids]), pixel_values=pv, output_attentions=True).attentions[k_layer - 1]
    after = int(visual[-1][-1]) + 1
    ranking = att[0].float().mean(0)[after:].mean(0)
    ref, ref_sel, _ = oracle(model, embeds, pos, visual, keep, k_layer, ranking)
    vlmprune.patch(model, "fastv", layer=k_layer, keep=keep, query="text")
    with torch.no_grad():
        out = model(input_ids=torch.tensor([ids]), pixel_values=pv).logits[0]
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=0)
    assert torch.equal(vlmprune.last_selection(model)[0][0], ref_sel[0])


def test_generate_equals_stepwise_oracle_decode():
    """Greedy generate() == the oracle decoded by hand: layers < K over the whole cached prompt,
    layers >= K over the kept rows only, the new tokens at the unpruned positions."""
    from transformers import DynamicCache

    model, eager = llava(seed=9), llava("eager", seed=9)
    ids, pv = prompt(2, seed=10), pixels(2, seed=11)
    k_layer, keep, steps = 2, 3, 5
    embeds, pos, visual = llava_row(model, ids, pv)
    ranking = eager_last_row(eager, dict(input_ids=torch.tensor([ids]), pixel_values=pv), k_layer - 1)
    _, _, cols = oracle(model, embeds, pos, visual, keep, k_layer, ranking)
    cache = DynamicCache(config=decoder_stack(model).config)
    with torch.no_grad():
        h = run_layers(model, embeds, pos, range(k_layer), cache)
        h = run_layers(model, h[:, cols], pos[:, cols], range(k_layer, LAYERS), cache)
        tok, ref = head(model, h)[0, -1].argmax(), []
        for t in range(steps):
            ref.append(int(tok))
            x = model.get_input_embeddings()(tok.view(1, 1))
            p = torch.tensor([[len(ids) + t]])
            x = run_layers(model, x, p, range(k_layer), cache)
            x = run_layers(model, x, p, range(k_layer, LAYERS), cache)
            tok = head(model, x)[0, -1].argmax()
    vlmprune.patch(model, "fastv", layer=k_layer, keep=keep)
    with torch.no_grad():
        out = model.generate(input_ids=torch.tensor([ids]), pixel_values=pv, max_new_tokens=steps,
                             min_new_tokens=steps, do_sample=False)
    assert out[0, len(ids):].tolist() == ref


CONFIGS = {
    "fastv": ("fastv", dict(layer=2, keep=3)),
    "pdrop": ("pdrop", dict(layers=[1, 3], ratio=0.5, keep=1)),
    "exit": ("exit", dict(layer=2, keep=1)),
    "exit threshold": ("exit", dict(threshold=0.45, keep=0)),  # row 0 leaves at layer 2, row 1 stays
    "dart": ("dart", dict(keep=5, pivot_image=2, pivot_text=3)),
    "transprune": ("transprune", dict(layers=[1, 3], ratios=[0.5], keep=2)),
    "divprune+fastv": ([("divprune", {"keep": 8}), ("fastv", {"layer": 2, "keep": 3})], {}),
}


@pytest.mark.parametrize("name", list(CONFIGS))
def test_llava_left_padded_batch_generates_as_rows_alone(name):
    model = llava(seed=12)
    method, kwargs = CONFIGS[name]
    vlmprune.patch(model, method, **kwargs)
    rows = [prompt(2, seed=13), prompt(1, seed=14, after=7), prompt(0, seed=15)]
    pvs = [pixels(2, seed=16), pixels(1, seed=17), None]
    ids, mask = left_pad(rows)
    gen = dict(max_new_tokens=5, min_new_tokens=5, do_sample=False)
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=mask, pixel_values=torch.cat(pvs[:2]), **gen)
        for i, row in enumerate(rows):
            kw = {"pixel_values": pvs[i]} if pvs[i] is not None else {}
            alone = model.generate(input_ids=torch.tensor([row]), **kw, **gen)[0, len(row):]
            assert torch.equal(out[i, ids.shape[1]:], alone), (name, i)


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen2_5_vl", "qwen3_vl"])
def test_qwen_batch_with_decoder_stage_generates_as_rows_alone(family):
    from tests.test_qwen import pad_rows

    model = tiny_qwen(family, seed=18, text_layers=LAYERS)
    rows = [[("image", (1, 8, 12))], [("image", (1, 4, 8)), ("image", (1, 8, 8))], []]
    if family != "qwen3_vl":
        rows.append([("video", (2, 4, 8))])
    singles = [qwen_inputs([row], seed=30 + i) for i, row in enumerate(rows)]
    batch = pad_rows(singles)
    layer = 3 if family == "qwen3_vl" else 2  # the tiny Qwen3-VL adds deepstack features after layers 0, 1
    vlmprune.patch(model, [("cls", {"keep": 6}), ("fastv", {"layer": layer, "keep": 2})])
    gen = dict(max_new_tokens=4, min_new_tokens=4, do_sample=False)
    with torch.no_grad():
        out = model.generate(**batch, **gen)[:, batch["input_ids"].shape[1]:]
        assert [[len(k) for k in r] for r in vlmprune.last_selection(model)] == [[2] * len(r) for r in rows]
        assert [[len(k) for k in r] for r in vlmprune.last_selection(model, stage=0)] == [[6] * len(r) for r in rows]
        for i, single in enumerate(singles):
            alone = model.generate(**single, **gen)[0, single["input_ids"].shape[1]:]
            assert torch.equal(out[i], alone), (i, out[i], alone)


def test_composition_is_the_decoder_stage_over_the_vision_stage_kept_tokens():
    """divprune keeps 8 per image; fastv then ranks those 8 (in the vision-pruned sequence) and
    keeps 3: last_selection maps them back to the original numbering, inside stage 0's."""
    model = llava(seed=19)
    ids, pv = prompt(2, seed=20), pixels(2, seed=21)
    vlmprune.patch(model, [("divprune", {"keep": 8}), ("fastv", {"layer": 2, "keep": 3})])
    with torch.no_grad():
        out = model(input_ids=torch.tensor([ids]), pixel_values=pv, use_cache=True)
    first, final = vlmprune.last_selection(model, stage=0)[0], vlmprune.last_selection(model, stage=1)[0]
    assert [len(f) for f in first] == [8, 8] and [len(f) for f in final] == [3, 3]
    assert all(set(b.tolist()) <= set(a.tolist()) for a, b in zip(first, final))
    assert all(torch.equal(a, b) for a, b in zip(final, vlmprune.last_selection(model)[0]))
    n1 = len(ids) - 2 * (N_VIS - 8)
    assert [out.cache.layers[i].keys.shape[2] for i in range(LAYERS)] == [n1, n1, n1 - 10, n1 - 10]


def test_keep_all_at_a_decoder_stage_is_bit_identical():
    model = llava(seed=22)
    ids, mask = left_pad([prompt(2, seed=23), prompt(0, seed=24)])
    pv = pixels(2, seed=25)
    with torch.no_grad():
        ref = model(input_ids=ids, attention_mask=mask, pixel_values=pv).logits
        vlmprune.patch(model, "fastv", layer=2, keep=N_VIS)
        out = model(input_ids=ids, attention_mask=mask, pixel_values=pv).logits
    assert torch.equal(out, ref)


def test_decoder_stage_errors_are_clear():
    model = llava()
    with pytest.raises(ValueError, match=r"layer 9.*0\.\.3"):
        vlmprune.patch(model, "fastv", layer=9, keep=4)
    with pytest.raises(ValueError, match="query must be one of"):
        vlmprune.patch(model, "fastv", query="first", keep=4)
    with pytest.raises(ValueError, match="deepstack"):
        vlmprune.patch(tiny_qwen("qwen3_vl", text_layers=LAYERS), "fastv", layer=1, keep=4)  # deepstack after 0, 1
    vlmprune.patch(model, "fastv", layer=2, keep=4)
    with torch.no_grad():
        model(input_ids=torch.tensor([prompt(1)]), pixel_values=pixels(1))
    with pytest.raises(ValueError, match="stage must be an int in 0..0"):
        vlmprune.last_selection(model, stage=1)


def rotate_half(x):
    return torch.cat((-x[..., x.shape[-1] // 2:], x[..., : x.shape[-1] // 2]), dim=-1)


def rotary_qk(model, layer, h_in, position_ids):
    """Decoder layer `layer`'s queries [H, L, d] and keys [Hkv, L, d] of one row (input `h_in`),
    rotary applied, written out by hand."""
    stack = decoder_stack(model)
    attn = stack.layers[layer].self_attn
    x = stack.layers[layer].input_layernorm(h_in)[0]
    heads, kv = stack.config.num_attention_heads, stack.config.num_key_value_heads
    d = x.shape[-1] // heads
    cos, sin = (t[0] for t in stack.rotary_emb(h_in, position_ids))
    q = attn.q_proj(x).view(-1, heads, d).transpose(0, 1)
    k = attn.k_proj(x).view(-1, kv, d).transpose(0, 1)
    return q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin


def attention_rows(model, layer, h_in, position_ids, rows):
    """Head-mean softmax attention of decoder layer `layer` (input `h_in`, one row, causal) from
    the query positions `rows`, written out by hand: [len(rows), L]."""
    q, k = rotary_qk(model, layer, h_in, position_ids)
    k = k.repeat_interleave(q.shape[0] // k.shape[0], 0)
    logits = (q[:, rows] @ k.transpose(1, 2)) * q.shape[-1] ** -0.5
    causal = torch.arange(q.shape[1])[None, :] > torch.as_tensor(rows)[:, None]
    return torch.softmax(logits.masked_fill(causal, float("-inf")), -1).mean(0)


def progressive_oracle(model, embeds, pos, visual, cuts, rank, at=0, on_cut=None):
    """Layers by hand with several cuts: before layer K, each image keeps keep(n, n0) of its tokens
    by `rank(K, h, pos, visual_cols)` ([L] scores over the current columns, from the input of layer
    K - `at`); `on_cut(cols)` follows each cut. Returns the logits and each image's final kept
    indices (original numbering)."""
    h, layer, n0 = embeds, 0, [len(v) for v in visual]
    orig = [torch.arange(len(v)) for v in visual]
    for k_layer, keep in cuts:
        with torch.no_grad():
            h = run_layers(model, h, pos, range(layer, k_layer - at)) if k_layer - at > layer else h
            scores = rank(k_layer, h, pos, visual)
            h = run_layers(model, h, pos, range(k_layer - at, k_layer)) if at else h
        layer = k_layer
        keepcols = torch.ones(h.shape[1], dtype=torch.bool)
        chosen = []
        for v, o, first in zip(visual, orig, n0):
            top = scores[v].topk(keep(len(v), first)).indices.sort().values
            keepcols[v] = False
            keepcols[v[top]] = True
            chosen.append((v[top], o[top]))
        cols = keepcols.nonzero()[:, 0]
        if on_cut is not None:
            on_cut(cols)
        new_index = torch.full((h.shape[1],), -1)
        new_index[cols] = torch.arange(len(cols))
        visual = [new_index[c] for c, _ in chosen]
        orig = [o for _, o in chosen]
        h, pos = h[:, cols], pos[..., cols]
    with torch.no_grad():
        h = run_layers(model, h, pos, range(layer, LAYERS))
        return head(model, h)[0], orig


def test_pdrop_two_cuts_equals_progressive_oracle():
    """Two cuts (before layers 1 and 3), each keeping half of every image's remaining tokens by the
    last row of the layer before's attention."""
    model = llava(seed=26)
    ids, pv = prompt(2, seed=27), pixels(2, seed=28)
    embeds, pos, visual = llava_row(model, ids, pv)

    def rank(k_layer, h_prev, pos_, vis):
        return attention_rows(model, k_layer - 1, h_prev, pos_, [h_prev.shape[1] - 1])[0]

    ref, ref_sel = progressive_oracle(model, embeds, pos, visual, [(1, lambda n, n0: n // 2), (3, lambda n, n0: n // 2)],
                                      rank, at=1)
    vlmprune.patch(model, "pdrop", layers=[1, 3], ratio=0.5, keep=1)
    with torch.no_grad():
        out = model(input_ids=torch.tensor([ids]), pixel_values=pv).logits[0]
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=0)
    assert all(torch.equal(a, b) for a, b in zip(vlmprune.last_selection(model)[0], ref_sel))


@pytest.mark.parametrize("ttv_only", [False, True])
def test_transprune_equals_progressive_oracle(ttv_only, monkeypatch):
    """TTV from every watched module's input and output (hooks on the unpatched model), IGA from
    layer K's own attention of the text after the image, per-image normalised sum, two cuts."""
    monkeypatch.setitem(globals(), "LAYERS", 6)
    model = tiny_llava(seed=29, text_layers=6)
    ids, pv = prompt(1, seed=30, after=5), pixels(1, seed=31)
    embeds, pos, visual = llava_row(model, ids, pv)
    stack = decoder_stack(model)
    ttv_layers, ttv = (1, 2, 3), {}

    def watch(i, which):
        def hook(module, args, kwargs, out):
            x = (args[0] if args else kwargs["hidden_states"]).float()
            y = (out[0] if isinstance(out, tuple) else out).float()
            e = torch.exp(1 - torch.nn.functional.cosine_similarity(x, y, dim=-1))
            ttv[i, which] = (y.norm(dim=-1) / x.norm(dim=-1) * e / e.sum())[0]
        return hook

    def follow(cols):  # the TTV terms of earlier layers go on with the kept columns
        for key in ttv:
            ttv[key] = ttv[key][cols]

    def rank(k_layer, h, pos_, vis):
        acc = sum((w for (i, _), w in ttv.items() if i < k_layer), torch.zeros(h.shape[1]))
        after = int(max(int(v.max()) for v in vis)) + 1
        iga = attention_rows(model, k_layer, h, pos_, list(range(after, h.shape[1]))).mean(0)
        scores = torch.zeros(h.shape[1])
        for v in vis:
            scores[v] = acc[v] / (acc[v].sum() + 1e-8) + (0 if ttv_only else iga[v] / (iga[v].sum() + 1e-8))
        return scores

    hooks = [stack.layers[i].self_attn.register_forward_hook(watch(i, 0), with_kwargs=True) for i in ttv_layers]
    hooks += [stack.layers[i].mlp.register_forward_hook(watch(i, 1), with_kwargs=True) for i in ttv_layers]
    try:
        ref, ref_sel = progressive_oracle(model, embeds, pos, visual, [(2, lambda n, n0: n0 // 2), (4, lambda n, n0: 3)],
                                          rank, on_cut=follow)
    finally:
        for hk in hooks:
            hk.remove()
    vlmprune.patch(model, "transprune", layers=[2, 4], ratios=[0.5], ttv_layers=list(ttv_layers), keep=3,
                   ttv_only=ttv_only)
    with torch.no_grad():
        out = model(input_ids=torch.tensor([ids]), pixel_values=pv).logits[0]
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=0)
    assert all(torch.equal(a, b) for a, b in zip(vlmprune.last_selection(model)[0], ref_sel))


def test_labels_with_a_decoder_stage_give_the_oracle_loss_and_gradients():
    """Training through a fastv cut: the loss is the causal LM loss of the oracle's logits (the kept
    rows) against the labels of their columns, and gradients reach the projector."""
    model = llava(seed=32)
    model.train()
    ids, pv = prompt(2, seed=33), pixels(2, seed=34)
    labels = torch.tensor([ids]).masked_fill(torch.tensor([ids]) == IMAGE_TOKEN, -100)
    eager = llava("eager", seed=32)
    embeds, pos, visual = llava_row(model, ids, pv)
    ranking = eager_last_row(eager, dict(input_ids=torch.tensor([ids]), pixel_values=pv), 1)
    logits, _, cols = oracle(model, embeds.detach(), pos, visual, 4, 2, ranking)
    want = torch.nn.functional.cross_entropy(logits[:-1].float(), labels[0, cols][1:], ignore_index=-100)
    vlmprune.patch(model, "fastv", layer=2, keep=4)
    out = model(input_ids=torch.tensor([ids]), pixel_values=pv, labels=labels)
    torch.testing.assert_close(out.loss, want, atol=1e-5, rtol=0)
    out.loss.backward()
    assert model.model.multi_modal_projector.linear_1.weight.grad.abs().sum() > 0


def test_decoder_defaults_scale_with_the_depth():
    """pdrop's 8/16/24, transprune's 7/9/12 (and its TTV span) and exit's 16 are pinned on a
    32-layer decoder; on another depth they scale (strictly ascending, within 1..depth-1)."""
    from vlmprune.scorers import build_scorer

    assert build_scorer("pdrop").for_depth(32).layers == (8, 16, 24)
    assert build_scorer("pdrop").for_depth(4).layers == (1, 2, 3)
    tp = build_scorer("transprune").for_depth(16)
    assert tp.layers == (4, 5, 6) and tp.ttv_layers == (3, 4, 5)
    assert build_scorer("transprune").for_depth(32).layers == (7, 9, 12)
    assert build_scorer("transprune", layers=[1, 2, 3]).for_depth(8).layers == (1, 2, 3)  # given: kept
    assert build_scorer("exit").for_depth(4).layer == 2 and build_scorer("exit").for_depth(32).layer == 16
    with pytest.raises(ValueError, match="3 cuts do not fit a decoder of 3 layers"):
        build_scorer("pdrop").for_depth(3)
    model = llava(seed=35)
    vlmprune.patch(model, "transprune", keep=2)
    assert [p.layer for p in model._vlmprune_adapter.decoder.points] == [1, 2, 3]


def key_l1_norms(model, layer, h_in, position_ids):
    """[L] the L1 norm of each token's rotary key in decoder layer `layer` (input `h_in`, one row)."""
    return rotary_qk(model, layer, h_in, position_ids)[1].abs().sum((0, 2))


def dart_reference(hn, norms, visual, text, k, n_img=4, n_txt=4):
    """DART's rule in plain Python on one row: `hn` [L, D] the final-normed hidden states, `norms`
    [L] key norms; per image its `visual` columns, the row's instruction columns `text`; exactly k
    kept: the top image pivots, then pivot by pivot (prompt order) its share of the least similar."""
    top = lambda cols, m: sorted(sorted(cols, key=lambda c: (-float(norms[c]), c))[:m])  # noqa: E731
    out = []
    for vis in visual:
        vis = vis.tolist()
        if k <= n_img:
            out.append(top(vis, k))
            continue
        pivots = top(vis, n_img) + top(text, n_txt)
        kept, rest = set(pivots[:n_img]), k - n_img
        for j, p in enumerate(pivots):
            share = rest // len(pivots) + (1 if j < rest % len(pivots) else 0)
            cand = [c for c in vis if c not in kept]
            sims = sorted(cand, key=lambda c: (float(torch.cosine_similarity(hn[p], hn[c], dim=0)), c))
            kept |= set(sims[:share])
        out.append(sorted(kept))
    return out


@pytest.mark.parametrize("keep", [3, 7, 13])
def test_dart_equals_pivot_duplication_oracle(keep):
    """Two images in one row, layer K=2: pivots from layer 1's key norms, duplicates by cosine of
    the final-normed hidden states entering layer 2; the rest of the layers on the kept rows."""
    model = llava(seed=36)
    ids, pv = prompt(2, seed=37, after=6), pixels(2, seed=38)
    embeds, pos, visual = llava_row(model, ids, pv)
    stack = decoder_stack(model)
    with torch.no_grad():  # a final norm that is not the identity (a random init leaves it ones)
        stack.norm.weight.copy_(torch.rand(stack.norm.weight.shape, generator=torch.Generator().manual_seed(0)) + 0.5)
        h1 = run_layers(model, embeds, pos, range(1))
        norms = key_l1_norms(model, 1, h1, pos)
        h2 = run_layers(model, h1, pos, range(1, 2))
        text = list(range(int(visual[-1].max()) + 1, len(ids)))
        kept = dart_reference(stack.norm(h2)[0].float(), norms, visual, text, keep)
        keepcols = torch.ones(len(ids), dtype=torch.bool)
        for vis, kk in zip(visual, kept):
            keepcols[vis] = False
            keepcols[kk] = True
        cols = keepcols.nonzero()[:, 0]
        ref = head(model, run_layers(model, h2[:, cols], pos[:, cols], range(2, LAYERS)))[0]
    vlmprune.patch(model, "dart", keep=keep)
    with torch.no_grad():
        out = model(input_ids=torch.tensor([ids]), pixel_values=pv).logits[0]
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=0)
    want = [torch.tensor(kk) - int(vis[0]) for vis, kk in zip(visual, kept)]
    assert [g.tolist() for g in vlmprune.last_selection(model)[0]] == [w.tolist() for w in want]


def test_exit_threshold_each_image_leaves_where_the_prompt_stops_looking():
    """threshold: before each layer K >= 2, an image's tokens all leave once the last prompt token's
    layer K-1 attention mass on them is below t. t sits between the two images' masses at layer 1,
    so one image leaves before layer 2 and the other follows the rule on its own."""
    model = llava(seed=39)
    ids, pv = prompt(2, seed=40), pixels(2, seed=41)
    embeds, pos, visual = llava_row(model, ids, pv)
    with torch.no_grad():
        h = run_layers(model, embeds, pos, range(1))
        first = attention_rows(model, 1, h, pos, [len(ids) - 1])[0]
    masses = sorted(float(first[v].sum()) for v in visual)
    t = sum(masses) / 2
    # the reference, layer by layer: the images below t leave
    with torch.no_grad():
        h, cur, lengths = run_layers(model, embeds, pos, range(1)), torch.arange(len(ids)), [len(ids)] * 2
        for k_layer in range(2, LAYERS):
            p = pos[:, cur]
            row = attention_rows(model, k_layer - 1, h, p, [len(cur) - 1])[0]
            h = run_layers(model, h, p, range(k_layer - 1, k_layer))
            keep = torch.ones(len(cur), dtype=torch.bool)
            for v in visual:
                at = torch.isin(cur, v)
                if at.any() and row[at].sum() < t:
                    keep &= ~at
            h, cur = h[:, keep], cur[keep]
            lengths.append(len(cur))
        ref = head(model, run_layers(model, h, pos[:, cur], range(LAYERS - 1, LAYERS)))[0]
    assert lengths[2] == len(ids) - N_VIS  # one image left before layer 2
    vlmprune.patch(model, "exit", threshold=t, keep=0)
    with torch.no_grad():
        out = model(input_ids=torch.tensor([ids]), pixel_values=pv, use_cache=True)
    torch.testing.assert_close(out.logits[0], ref, atol=1e-4, rtol=0)
    assert [out.cache.layers[i].keys.shape[2] for i in range(LAYERS)] == lengths


def test_a_stage_list_with_only_a_decoder_stage_equals_the_method_form():
    """[("fastv", {"keep": 3})]: no vision stage, so every visual token enters the decoder."""
    model = llava(seed=42)
    ids, pv = torch.tensor([prompt(2, seed=43)]), pixels(2, seed=44)
    outs = []
    for spec, kw in ((["fastv"], {}), ("fastv", {"keep": 3})):
        vlmprune.patch(model, [("fastv", {"keep": 3})] if spec == ["fastv"] else spec, **kw)
        with torch.no_grad():
            outs.append(model(input_ids=ids, pixel_values=pv).logits)
        assert [len(k) for k in vlmprune.last_selection(model)[0]] == [3, 3]
    assert torch.equal(outs[0], outs[1])


@pytest.mark.parametrize("family", ["qwen2_5_vl", "qwen3_vl"])
def test_dart_on_qwen_batch_generates_as_rows_alone(family):
    """DART's signals on M-RoPE decoders (rotary keys of layer K-1, the instruction's hidden states):
    a left-padded batch with two images in a row and a text-only row == each row alone."""
    from tests.test_qwen import pad_rows

    model = tiny_qwen(family, seed=45, text_layers=LAYERS)
    rows = [[("image", (1, 8, 12))], [("image", (1, 4, 8)), ("image", (1, 8, 8))], []]
    singles = [qwen_inputs([row], seed=46 + i) for i, row in enumerate(rows)]
    batch = pad_rows(singles)
    vlmprune.patch(model, "dart", layer=3, keep=6, pivot_image=2)
    gen = dict(max_new_tokens=3, min_new_tokens=3, do_sample=False)
    with torch.no_grad():
        out = model.generate(**batch, **gen)[:, batch["input_ids"].shape[1]:]
        assert [[len(k) for k in r] for r in vlmprune.last_selection(model)] == [[6], [6, 6], []]
        for i, single in enumerate(singles):
            assert torch.equal(out[i], model.generate(**single, **gen)[0, single["input_ids"].shape[1]:]), i
