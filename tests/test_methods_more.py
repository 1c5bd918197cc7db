"""`pool`, `zero_tprune` and `cdpruner` against oracles written from their documented rules (DESIGN §3,
§6): block means at the documented anchors, weighted PageRank by plain power iteration and by the
stationary distribution, a DPP's greedy MAP by explicit determinants; the attention graph the
adapters tap (LLaVA, every Qwen family) against the eager attention weights of that layer; the
DPP's Triton kernel (under the Triton interpreter) against its torch reference."""

from __future__ import annotations

import os
import sys
from pathlib import Path

# The Triton interpreter must be chosen before Triton is imported (see tests/test_kernels.py); when
# it is already loaded, the Triton tests here run in `test_interpreter_checks_in_fresh_process`.
if "triton" not in sys.modules:
    os.environ["TRITON_INTERPRET"] = "1"

import itertools  # noqa: E402
import math  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
import triton.language as tl  # noqa: E402

import vlmprune  # noqa: E402
from vlmprune.kernels import dpp as dp  # noqa: E402
from vlmprune.kernels.graph import attention_graph_ref, pagerank_ref  # noqa: E402
from vlmprune.kernels.pool import pool_plan  # noqa: E402
from vlmprune.scorers import EncoderInfo, Request, Signals, available_methods, build_scorer  # noqa: E402
from vlmprune.scorers.cdpruner import CDPrunerScorer, conditional_kernel, relevance  # noqa: E402

INTERPRETED = type(tl.sum).__name__ == "InterpretedFunction"
interpreted = pytest.mark.skipif(not INTERPRETED, reason="runs in test_interpreter_checks_in_fresh_process")
INFO = EncoderInfo(num_layers=4, feature_layer=2, has_cls=True, grid=(4, 4))
INFO_NO_CLS = EncoderInfo(num_layers=4, feature_layer=3, has_cls=False, grid=None)


def signals(feats: torch.Tensor, counts: list[int], grids: list[tuple[int, int]], info: EncoderInfo = INFO) -> Signals:
    n = feats.shape[1]
    grid = grids[0] if all(g == grids[0] for g in grids) and grids[0][0] * grids[0][1] == n else (1, n)
    return Signals(n_valid=torch.tensor(counts), grid=grid, info=info, features=feats, counts=tuple(counts),
                   grids=tuple(grids))


def select(method: str, s: Signals, ks: list[int], **kwargs):
    sel = build_scorer(method, **kwargs).select(s, torch.tensor(ks))
    return sel.indices, sel.features


# --- pool -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("anchor", ["centre", "first"])
def test_pool_4x4_to_4_is_2x2_block_means_at_the_top_left(anchor):
    """Even 2x2 blocks: the centre anchor is the upper-left of the central four, the top-left."""
    x = torch.randn(1, 16, 5, generator=torch.Generator().manual_seed(0))
    idx, out = select("pool", signals(x, [16], [(4, 4)]), [4], anchor=anchor)
    assert idx.tolist() == [[0, 2, 8, 10]]
    blocks = [[0, 1, 4, 5], [2, 3, 6, 7], [8, 9, 12, 13], [10, 11, 14, 15]]
    torch.testing.assert_close(out[0], torch.stack([x[0, b].mean(0) for b in blocks]), rtol=0, atol=1e-6)


def test_pool_6x6_to_4_centre_and_first_anchors():
    x = torch.randn(1, 36, 3, generator=torch.Generator().manual_seed(1))
    blocks = [[r * 6 + c for r in range(r0, r0 + 3) for c in range(c0, c0 + 3)] for r0 in (0, 3) for c0 in (0, 3)]
    means = torch.stack([x[0, b].mean(0) for b in blocks])
    for anchor, want in (("centre", [7, 10, 25, 28]), ("first", [0, 3, 18, 21])):
        idx, out = select("pool", signals(x, [36], [(6, 6)]), [4], anchor=anchor)
        assert idx.tolist() == [want]
        torch.testing.assert_close(out[0], means, rtol=0, atol=1e-6)


@pytest.mark.parametrize("grid, k, cells, centre", [
    # 4x4 to 3: gh = round(sqrt(3)) = 2 bands of rows; band 0 gets 3//2 = 1 cell, band 1 gets 2
    ((4, 4), 3, [[0, 1, 2, 3, 4, 5, 6, 7], [8, 9, 12, 13], [10, 11, 14, 15]], [1, 8, 10]),
    # 2x6 to 5: gh = round(sqrt(5 * 2 / 6)) = 1 band, cut at columns 0, 1, 2, 3, 4, 6
    ((2, 6), 5, [[0, 6], [1, 7], [2, 8], [3, 9], [4, 5, 10, 11]], [0, 1, 2, 3, 4]),
    # 3x3 to 2: gh = round(sqrt(2)) = 1 band; cut at column 1 (= 1 * 3 // 2)
    ((3, 3), 2, [[0, 3, 6], [1, 2, 4, 5, 7, 8]], [3, 4]),
])
def test_pool_budget_that_is_no_product_of_grid_sides(grid, k, cells, centre):
    h, w = grid
    x = torch.randn(1, h * w, 4, generator=torch.Generator().manual_seed(2))
    idx, out = select("pool", signals(x, [h * w], [grid]), [k])
    assert idx.tolist() == [centre]
    torch.testing.assert_close(out[0], torch.stack([x[0, c].mean(0) for c in cells]), rtol=0, atol=1e-6)
    idx, _ = select("pool", signals(x, [h * w], [grid]), [k], anchor="first")
    assert idx.tolist() == [[c[0] for c in cells]]


def test_pool_plan_partitions_every_grid_into_exactly_k_cells():
    for h, w in [(1, 1), (1, 7), (7, 1), (2, 3), (4, 4), (5, 3), (3, 8), (6, 6)]:
        for k in range(1, h * w + 1):
            for anchor in ("centre", "first"):
                anchors, table, sizes = pool_plan(h, w, k, anchor)
                members = [[t for t in row if t >= 0] for row in table.tolist()]
                assert len(members) == k and sorted(itertools.chain(*members)) == list(range(h * w))
                assert sizes.tolist() == [len(m) for m in members]
                assert anchors.tolist() == sorted(set(anchors.tolist()))  # ascending, distinct
                for a, m in zip(anchors.tolist(), members):
                    rows, cols = {t // w for t in m}, {t % w for t in m}
                    assert len(m) == len(rows) * len(cols)  # a rectangle of whole rows and columns
                    want = (min(rows), min(cols)) if anchor == "first" else \
                        ((min(rows) + max(rows)) // 2, (min(cols) + max(cols)) // 2)
                    assert divmod(a, w) == want
                band_cells = {}
                for m in members:
                    band_cells.setdefault(min(t // w for t in m), []).append(m)
                if k % len(band_cells) == 0 and h % len(band_cells) == 0:
                    assert len(set(sizes.tolist())) == 1 or w % (k // len(band_cells))  # even blocks where they fit


def test_pool_keeps_all_unchanged_none_at_zero_and_each_image_its_own_grid():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(3, 16, 4, generator=g)
    x[1, 6:] = 99.0  # padding of a 2x3 image: never read
    s = signals(x, [16, 6, 16], [(4, 4), (2, 3), (4, 4)])
    idx, out = select("pool", s, [16, 6, 0])
    assert idx[0].tolist() == list(range(16)) and idx[1].tolist() == list(range(6)) + [-1] * 10
    assert (idx[2] == -1).all() and torch.equal(out[0], x[0]) and torch.equal(out[1, :6], x[1, :6])
    assert (out[1, 6:] == 0).all() and (out[2] == 0).all()
    idx, out = select("pool", s, [4, 2, 3])
    for i, (grid, k) in enumerate([((4, 4), 4), ((2, 3), 2), ((4, 4), 3)]):
        n = grid[0] * grid[1]
        alone_idx, alone = select("pool", signals(x[i : i + 1, :n].clone(), [n], [grid]), [k])
        assert torch.equal(idx[i, :k], alone_idx[0]) and (idx[i, k:] == -1).all()
        torch.testing.assert_close(out[i, :k], alone[0], rtol=0, atol=0)
        assert (out[i, k:] == 0).all()
    assert idx[1, :2].tolist() == [0, 1]  # 2x3 to 2: columns [0, 1) and [1, 3); centres (0, 0), (0, 1)
    torch.testing.assert_close(out[1, 1], x[1, [1, 2, 4, 5]].mean(0), rtol=0, atol=1e-6)


def test_pool_refuses_a_grid_that_does_not_cover_the_tokens_and_bad_anchor():
    x = torch.randn(1, 6, 2)
    with pytest.raises(ValueError, match=r"grid 2x2 of image 0 does not cover its 6"):
        select("pool", signals(x, [6], [(2, 2)]), [2])
    with pytest.raises(ValueError, match=r"anchor must be one of \['centre', 'first'\]"):
        build_scorer("pool", anchor="middle")


# --- zero_tprune --------------------------------------------------------------------------------------


def stochastic(shape, seed: int, temp: float = 1.0) -> torch.Tensor:
    logits = torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return torch.softmax(logits * temp, -1)


def power_iteration(a: np.ndarray, iterations: int) -> np.ndarray:
    """WPR by plain loops in float64: s_{t+1}[j] = sum_i a[i, j] s_t[i], from 1/n."""
    n = a.shape[0]
    s = [1.0 / n] * n
    for _ in range(iterations):
        s = [sum(a[i, j] * s[i] for i in range(n)) for j in range(n)]
    return np.array(s)


def test_pagerank_is_the_power_iteration_and_converges_to_the_stationary_distribution():
    a = stochastic((2, 7, 7), seed=4, temp=2.0)
    graph = torch.zeros(2, 9, 9, dtype=torch.float64)
    graph[0, :7, :7], graph[1, :5, :5] = a[0], stochastic((5, 5), seed=5)
    got = pagerank_ref(graph.float(), [7, 5], 30)
    for b, n in enumerate([7, 5]):
        np.testing.assert_allclose(got[b, :n].numpy(), power_iteration(graph[b, :n, :n].numpy(), 30), rtol=1e-5)
        assert (got[b, n:] == 0).all()
        w, v = np.linalg.eig(graph[b, :n, :n].numpy().T)  # stationary: left eigenvector of eigenvalue 1
        pi = np.real(v[:, np.argmin(abs(w - 1))])
        np.testing.assert_allclose(got[b, :n].numpy(), pi / pi.sum(), atol=1e-6)
    assert torch.equal(pagerank_ref(graph.float(), [7, 5], 0)[1], torch.tensor([0.2] * 5 + [0.0] * 4))


def zero_tprune_oracle(graph: torch.Tensor, n: int, offset: int, iterations=30, p=2.0, band=(0.1, 10.0)) -> np.ndarray:
    """The documented rule for one image in float64: WPR per head over its n + offset nodes, heads
    with Var(m * s_h) outside band x the lower-median head's left out, power mean of the rest, the
    patch tokens' scores."""
    m = n + offset
    scores = [power_iteration(graph[h, :m, :m].double().numpy(), iterations) for h in range(graph.shape[0])]
    var = [float(np.var(m * s)) for s in scores]
    med = sorted(var)[(len(var) - 1) // 2]
    kept = [s for s, v in zip(scores, var) if band is None or med <= 0 or band[0] * med <= v <= band[1] * med]
    agg = np.mean([s**p for s in kept], axis=0) ** (1 / p)
    return agg[offset:]


def graph_signals(graph: torch.Tensor, counts: list[int], n: int, info: EncoderInfo = INFO) -> Signals:
    s = signals(torch.zeros(graph.shape[0], n, 2), counts, [(1, c) for c in counts], info)
    s.attn_graph[info.feature_layer] = graph
    return s


def test_zero_tprune_filters_flat_and_peaked_heads_and_takes_the_rms():
    """Heads 0-2: ordinary random attention; head 3: uniform (variance 0, filtered); head 4: every
    token attends to token 5 (all mass there: peaked, filtered). CLS at 0; image 1 has 6 of 8
    patches (zero rows and columns beyond)."""
    n, t = 8, 9
    graph = torch.zeros(2, 5, t, t)
    for i, valid in enumerate([9, 7]):
        graph[i, :3, :valid, :valid] = stochastic((3, valid, valid), seed=10 + i, temp=1.5).float()
        graph[i, 3, :valid, :valid] = 1.0 / valid
        graph[i, 4, :valid, 5] = 1.0
    s = graph_signals(graph, [8, 6], n)
    scorer = build_scorer("zero_tprune")
    got = scorer.score(s)
    for i, c in enumerate([8, 6]):
        want = zero_tprune_oracle(graph[i], c, 1)
        np.testing.assert_allclose(got[i, :c].numpy(), want, rtol=1e-5)
        # the same as the RMS of heads 0-2 alone: 3 and 4 were filtered
        np.testing.assert_allclose(want, zero_tprune_oracle(graph[i, :3], c, 1, band=None), rtol=1e-12)
    idx, _ = select("zero_tprune", s, [3, 3])
    for i, c in enumerate([8, 6]):
        want = zero_tprune_oracle(graph[i], c, 1)
        assert idx[i].tolist() == sorted(np.argsort(-want, kind="stable")[:3].tolist())
    # plain mean, no filter: head 4's sink (patch 4 = node 5) wins
    no_filter = build_scorer("zero_tprune", emphasis=1.0, head_filter=None).score(s)
    np.testing.assert_allclose(no_filter[0].numpy(), zero_tprune_oracle(graph[0], 8, 1, p=1.0, band=None), rtol=1e-5)
    assert int(no_filter[0].argmax()) == 4


def test_zero_tprune_without_cls_node_and_on_head_mean_graph():
    n = 6
    graph = stochastic((1, 2, n + 1, n + 1), seed=20).float()
    s = graph_signals(graph, [n], n)
    sub = graph[0, :, 1:, 1:] / graph[0, :, 1:, 1:].sum(-1, keepdim=True)
    got = build_scorer("zero_tprune", with_cls=False, iterations=12).score(s)
    np.testing.assert_allclose(got[0].numpy(), zero_tprune_oracle(sub, n, 0, iterations=12), rtol=1e-5)
    mean = graph.mean(1, keepdim=True)
    s_mean = graph_signals(mean, [n], n)
    scorer = build_scorer("zero_tprune", heads="mean")
    assert scorer.needs(INFO) == Request(attn_graph=(2,), attn_graph_heads="mean")
    np.testing.assert_allclose(scorer.score(s_mean)[0].numpy(), power_iteration(mean[0, 0].double().numpy(), 30)[1:],
                               rtol=1e-5)
    # no CLS (Qwen): the graph is over the visual tokens
    s_q = graph_signals(graph[:, :, 1:, 1:] / graph[:, :, 1:, 1:].sum(-1, keepdim=True), [n], n, INFO_NO_CLS)
    np.testing.assert_allclose(build_scorer("zero_tprune").score(s_q)[0].numpy(), zero_tprune_oracle(sub, n, 0),
                               rtol=1e-5)


def test_zero_tprune_options_and_requests():
    assert build_scorer("zero_tprune").needs(INFO) == Request(attn_graph=(2,))
    assert build_scorer("zero_tprune", layer=-1).needs(INFO) == Request(attn_graph=(3,))
    for kwargs, err in [({"iterations": 0}, ValueError), ({"heads": "max"}, ValueError),
                        ({"emphasis": 0.5}, ValueError), ({"head_filter": (2.0, 3.0)}, ValueError),
                        ({"head_filter": 0.1}, TypeError), ({"layer": 1.0}, TypeError), ({"with_cls": 1}, TypeError)]:
        with pytest.raises(err):
            build_scorer("zero_tprune", **kwargs)
    with pytest.raises(ValueError, match="layer=7"):
        build_scorer("zero_tprune", layer=7).needs(INFO)
    a, b = Request(attn_graph=(1,), attn_graph_heads="mean"), Request(attn_graph=(3,))
    assert a.merge(b) == Request(attn_graph=(1, 3)) and a.merge(Request(features=True)).attn_graph_heads == "mean"
    assert Request(text_embeds=True).merge(Request()).text_embeds and Request().merge(Request()) == Request()


def test_attention_graph_pools_groups_and_builds_in_chunks():
    g = torch.Generator().manual_seed(6)
    q, k = torch.randn(2, 12, 8, generator=g), torch.randn(2, 12, 8, generator=g)
    full = torch.softmax((q.view(2, 12, 2, 4).transpose(1, 2) @ k.view(2, 12, 2, 4).permute(0, 2, 3, 1)) * 0.5, -1)
    torch.testing.assert_close(attention_graph_ref(q, k, 2, 0.5, chunk_bytes=1), full, rtol=0, atol=1e-6)
    pooled = attention_graph_ref(q, k, 2, 0.5, group=4, chunk_bytes=1)
    want = full.view(2, 2, 3, 4, 3, 4).sum(-1).mean(3)
    torch.testing.assert_close(pooled, want, rtol=0, atol=1e-6)
    torch.testing.assert_close(pooled.sum(-1), torch.ones(2, 2, 3), rtol=0, atol=1e-6)
    torch.testing.assert_close(attention_graph_ref(q, k, 2, 0.5, group=4, mean_heads=True), want.mean(1, keepdim=True))


# --- the adapters' attention graph against eager attention ---------------------------------------------


@pytest.mark.parametrize("heads", ["each", "mean"])
def test_llava_attn_graph_is_the_eager_attention_of_the_layer(heads):
    from vlmprune.eval.tiny import tiny_llava

    from tests.conftest import pixels

    model, eager = tiny_llava(seed=5), tiny_llava(attn="eager", seed=5)
    pv = pixels(2, seed=6)
    vlmprune.patch(model, "zero_tprune", keep=5, layer=1, heads=heads)
    adapter = model._vlmprune_adapter
    with torch.no_grad():
        feats = list(model.model.get_image_features(pixel_values=pv, return_dict=True).pooler_output)
        got = adapter.signals_for(feats).attn_graph[1]
        ref = eager.model.vision_tower(pv, output_attentions=True).attentions[1].float()  # [I, H, 17, 17]
    ref = ref if heads == "each" else ref.mean(1, keepdim=True)
    torch.testing.assert_close(got, ref, rtol=0, atol=2e-6)
    assert model.config.vision_config._attn_implementation == "sdpa"
    # end to end: the kept tokens are the top-5 of the oracle's scores on the eager graph
    ids = torch.tensor([[5, 6] + [99] * 16 + [7] + [99] * 16 + [8, 9]])
    with torch.no_grad():
        model(input_ids=ids, pixel_values=pv)
    for i, kept in enumerate(vlmprune.last_selection(model)[0]):
        if heads == "each":
            want = zero_tprune_oracle(ref[i], 16, 1)
        else:
            want = power_iteration(ref[i, 0].double().numpy(), 30)[1:]
        assert kept.tolist() == sorted(np.argsort(-want, kind="stable")[:5].tolist())


def eager_group_graphs(model, call: str, pixels: torch.Tensor, thw: torch.Tensor, layer: int) -> list[torch.Tensor]:
    """Per item, [H, N, N]: block `layer`'s softmax weights as the model's own eager attention
    computes them (captured from the modeling module's eager function, one call per attended
    sequence, in the blocks' order), put together block-diagonally over all patches, summed over
    key merge groups and averaged over query groups, in the merger's output order."""
    from tests.test_qwen import eager_block_weights

    visual = model.model.visual
    weights = eager_block_weights(model, call, pixels, thw, layer)
    s = int(thw.prod(-1).sum())
    heads = weights[0].shape[0]
    full = torch.zeros(heads, s, s)
    at = 0
    for w in weights:
        full[:, at : at + w.shape[1], at : at + w.shape[1]] = w
        at += w.shape[1]
    assert at == s
    groups = full.view(heads, s // 4, 4, s // 4, 4).sum(-1).mean(2)
    if hasattr(visual, "fullatt_block_indexes"):
        from transformers.vision_utils import get_vision_window_index

        window, _ = get_vision_window_index(thw, visual.spatial_merge_size, visual.window_size, visual.patch_size)
        order = torch.argsort(window)
        groups = groups[:, order][:, :, order]
    sizes = (thw.prod(-1) // 4).tolist()
    out, start = [], 0
    for n in sizes:
        out.append(groups[:, start : start + n, start : start + n])
        inside = groups[:, start : start + n, start : start + n].sum()
        assert groups[:, start : start + n].sum() == pytest.approx(inside)  # no attention leaves the item
        start += n
    return out


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen2_5_vl", "qwen3_vl"])
def test_qwen_attn_graph_is_the_eager_attention_pooled_to_merge_groups(family):
    """Images of two sizes (and, but on Qwen3-VL, a two-frame video: per-frame attention); on
    Qwen2.5-VL also window block 2 (windows, window-permuted order)."""
    from vlmprune.eval.tiny import qwen_inputs, tiny_qwen

    eager, model = tiny_qwen(family, attn="eager", seed=9), tiny_qwen(family, seed=9)
    items = [("image", (1, 8, 12)), ("image", (1, 4, 8))] + ([] if family == "qwen3_vl" else [("video", (2, 8, 8))])
    inputs = qwen_inputs([items], seed=10)
    layers = [3, 2] if family == "qwen2_5_vl" else [3]
    for layer in layers:
        vlmprune.patch(model, "zero_tprune", keep=5, layer=layer)
        adapter = model._vlmprune_adapter
        calls = [("get_image_features", "pixel_values", "image_grid_thw")]
        if family != "qwen3_vl":
            calls.append(("get_video_features", "pixel_values_videos", "video_grid_thw"))
        for call, px, grid in calls:
            with torch.no_grad():
                out = getattr(model.model, call)(inputs[px], inputs[grid], return_dict=True)
                thw = inputs[grid]
                got = adapter.signals_for(list(out.pooler_output), adapter.token_grids(thw)).attn_graph[layer]
            want = eager_group_graphs(eager, call, inputs[px], thw, layer)
            assert got.shape[0] == len(want) and got.shape[1] == 4
            for i, w in enumerate(want):
                n = w.shape[-1]
                torch.testing.assert_close(got[i, :, :n, :n], w, rtol=0, atol=2e-6)
                assert (got[i, :, n:] == 0).all() and (got[i, :, :, n:] == 0).all()
            if call == "get_video_features":  # two frames attend apart: a block-diagonal graph
                n = want[0].shape[-1] // 2
                assert (got[0, :, :n, n:] == 0).all() and (got[0, :, n:, :n] == 0).all()
        vlmprune.unpatch(model)


# --- cdpruner ------------------------------------------------------------------------------------------


def greedy_logdet(L: np.ndarray, k: int, eps: float = dp.EPS) -> list[int]:
    """Greedy MAP by explicit determinants (float64): each pick maximises det(L_{S+j}) / det(L_S);
    a gain at or below eps * max diag counts as 0 (ties: lower index)."""
    n = L.shape[0]
    floor = eps * max(L[i, i] for i in range(n))
    chosen: list[int] = []
    base = 1.0
    for _ in range(k):
        gains = {}
        for j in range(n):
            if j not in chosen:
                sub = chosen + [j]
                g = np.linalg.det(L[np.ix_(sub, sub)]) / base
                gains[j] = g if g > floor else 0.0
        best = max(gains.values())
        j = min(i for i, g in gains.items() if g == best)
        chosen.append(j)
        base = np.linalg.det(L[np.ix_(chosen, chosen)]) if best > 0 else base
    return sorted(chosen)


def random_kernel(seed: int, n: int, d: int = 6) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.nn.functional.normalize(torch.randn(n, d, generator=g), dim=-1)
    r = torch.rand(n, generator=g) + 0.1
    return (r[:, None] * (x @ x.T) * r[None, :]).double()


def gains_are_clear(L: np.ndarray, k: int, gap: float = 1e-4) -> bool:
    """No pick of the greedy oracle is decided by a margin below `gap` (bad test data otherwise)."""
    chosen: list[int] = []
    for _ in range(k):
        base = np.linalg.det(L[np.ix_(chosen, chosen)]) if chosen else 1.0
        g = sorted(((np.linalg.det(L[np.ix_(chosen + [j], chosen + [j])]) / base, j) for j in range(len(L))
                    if j not in chosen), reverse=True)
        if len(g) > 1 and g[0][0] - g[1][0] < gap:
            return False
        chosen.append(g[0][1])
    return True


def test_dpp_greedy_ref_is_the_greedy_of_explicit_determinants():
    cases = 0
    for seed in range(12):
        n = 5 + seed % 5
        L = random_kernel(seed, n)
        k = 1 + seed % n
        if not gains_are_clear(L.numpy(), min(k, 6)):
            continue
        got = dp.dpp_greedy_ref(L.float()[None], [k], [n])
        assert got[0].tolist() == greedy_logdet(L.numpy(), k), seed
        cases += 1
    assert cases >= 8


def test_dpp_greedy_ragged_batch_and_spent_rank():
    """Image 0: rank-2 features (d = 2), so after two picks every gain is spent: the rest of the
    budget takes the free tokens in index order. Image 1: 4 valid of 6 (junk beyond)."""
    g = torch.Generator().manual_seed(7)
    x = torch.nn.functional.normalize(torch.randn(6, 2, generator=g), dim=-1)
    L = torch.zeros(2, 6, 6)
    L[0] = x @ x.T
    L[1] = random_kernel(8, 6).float()
    L[1, 4:, :] = 50.0
    L[1, :, 4:] = 50.0
    got = dp.dpp_greedy_ref(L, [5, 3], [6, 4])
    first_two = greedy_logdet(L[0].double().numpy(), 2)
    rest = [i for i in range(6) if i not in first_two][:3]
    assert got[0].tolist() == sorted(first_two + rest)
    assert got[1].tolist() == greedy_logdet(L[1, :4, :4].double().numpy(), 3) + [-1, -1]
    assert dp.dpp_greedy_ref(L, [9, 0], [6, 4]).tolist() == [list(range(6)), [-1] * 6]


def test_relevance_and_kernel_follow_the_documented_formula():
    g = torch.Generator().manual_seed(11)
    feats, text = torch.randn(2, 5, 4, generator=g), torch.randn(2, 3, 4, generator=g)
    text[1, 2] = 100.0  # padding of image 1's text (2 of 3 real): never read
    r = relevance(feats, text, [5, 4], [3, 2])
    for i, (n, m) in enumerate([(5, 3), (4, 2)]):
        x = feats[i, :n].double() / feats[i, :n].double().norm(dim=-1, keepdim=True)
        t = text[i, :m].double() / text[i, :m].double().norm(dim=-1, keepdim=True)
        raw = (x @ t.T).mean(1)
        want = (raw - raw.min() + 1e-6) / (raw.max() - raw.min())
        torch.testing.assert_close(r[i, :n].double(), want, rtol=1e-5, atol=1e-6)
        neg = relevance(feats[i : i + 1, :n], text[i : i + 1, :m], [n], [m], negate=True)[0].double()
        torch.testing.assert_close(neg, (-raw - (-raw).min() + 1e-6) / (raw.max() - raw.min()), rtol=1e-5, atol=1e-6)
        th = relevance(feats[i : i + 1, :n], text[i : i + 1, :m], [n], [m], theta=0.75)[0].double()
        torch.testing.assert_close(th, torch.exp(1.5 * want), rtol=1e-5, atol=1e-6)
    assert r[1, 4] == 0
    assert torch.equal(relevance(feats, text, [5, 4], [0, 2])[0], torch.ones(5))  # no text: unconditional
    L = conditional_kernel(feats, r)
    x = torch.nn.functional.normalize(feats[0], dim=-1)
    torch.testing.assert_close(L[0], r[0][:, None] * (x @ x.T) * r[0][None, :], rtol=1e-6, atol=1e-6)


def test_cdpruner_selects_the_greedy_map_of_the_conditional_kernel():
    g = torch.Generator().manual_seed(12)
    feats, text = torch.randn(2, 8, 6, generator=g), torch.randn(2, 4, 6, generator=g)
    s = signals(feats, [8, 7], [(2, 4), (1, 7)])
    s.text_embeds, s.text_counts = text, (4, 3)
    sel = CDPrunerScorer().select(s, torch.tensor([3, 4]))
    assert sel.features is None
    for i, (n, m, k) in enumerate([(8, 4, 3), (7, 3, 4)]):
        x = feats[i, :n].double() / feats[i, :n].double().norm(dim=-1, keepdim=True)
        t = text[i, :m].double() / text[i, :m].double().norm(dim=-1, keepdim=True)
        raw = (x @ t.T).mean(1)
        r = (raw - raw.min() + 1e-6) / (raw.max() - raw.min())
        L = (r[:, None] * (x @ x.T) * r[None, :]).numpy()
        assert gains_are_clear(L, k)
        got = sel.indices[i]
        assert got[got >= 0].tolist() == greedy_logdet(L, k)
    s.text_embeds = None
    with pytest.raises(ValueError, match="text_embeds"):
        CDPrunerScorer().select(s, torch.tensor([3, 4]))
    with pytest.raises(ValueError, match=r"theta must be in \[0, 1\)"):
        CDPrunerScorer(theta=1.0)


def test_adapters_hand_cdpruner_the_rows_text_after_the_images():
    """`text_embeds` of each image: the input embeddings of its row's attended text after the row's
    last visual token (LLaVA: a left-padded batch, a two-image row), zero-padded to the longest."""
    from tests.conftest import IMAGE_TOKEN, left_pad, pixels, prompt
    from vlmprune.eval.tiny import tiny_llava

    model = tiny_llava()
    assert "cdpruner" in available_methods()
    rows = [prompt(2, seed=1, after=3), prompt(1, seed=2, after=6)]
    ids, mask = left_pad(rows)
    vlmprune.patch(model, "cdpruner", keep=4)
    adapter = model._vlmprune_adapter
    prompt_ = adapter.read_prompt({"input_ids": ids, "attention_mask": mask})
    with torch.no_grad():
        enc = adapter.encode({"input_ids": ids, "pixel_values": pixels(3)}, prompt_)
        signals = adapter.prefill_signals(prompt_, enc)
        embed = model.get_input_embeddings()
        for image, row in [(0, 0), (1, 0), (2, 1)]:
            r = rows[row]
            last = max(i for i, t in enumerate(r) if t == IMAGE_TOKEN)
            want = embed(torch.tensor(r[last + 1:]))
            m = len(r) - last - 1
            assert signals.text_counts[image] == m
            assert torch.equal(signals.text_embeds[image, :m], want)
            assert (signals.text_embeds[image, m:] == 0).all()


# --- Triton twin of the DPP greedy (interpreter) ------------------------------------------------------


def test_interpreter_checks_in_fresh_process():
    """This file's Triton tests in a fresh TRITON_INTERPRET=1 process (see tests/test_kernels.py)."""
    from tests.test_kernels import run_interpreted

    run_interpreted([str(Path(__file__).resolve())], expect_at_least=2)


@interpreted
def test_dpp_triton_matches_reference():
    import importlib

    mod = importlib.import_module("vlmprune.kernels.dpp_triton")
    assert mod.can_launch(torch.zeros(1))
    for seed in range(6):
        g = torch.Generator().manual_seed(seed)
        b, n = 3, 5 + 7 * seed
        feats = torch.randn(b, n, 8, generator=g)
        counts = [n, max(1, n - 3), n // 2]
        ks = [min(n, 1 + seed * 2), 3, n]
        r = torch.rand(b, n, generator=g) + 0.05
        L = conditional_kernel(feats, r)
        assert torch.equal(mod.dpp_greedy_triton(L, ks, counts), dp.dpp_greedy_ref(L, ks, counts)), seed


@interpreted
def test_dpp_triton_spent_rank_and_zero_budget():
    import importlib

    mod = importlib.import_module("vlmprune.kernels.dpp_triton")
    g = torch.Generator().manual_seed(3)
    x = torch.nn.functional.normalize(torch.randn(2, 9, 2, generator=g), dim=-1)
    L = conditional_kernel(x, torch.ones(2, 9))  # rank 2: picks beyond the second take index order
    for ks in ([6, 0], [9, 2], [1, 1]):
        assert torch.equal(mod.dpp_greedy_triton(L, ks, [9, 7]), dp.dpp_greedy_ref(L, ks, [9, 7]))
    assert math.isclose(float(L[0].diagonal().max()), 1.0, rel_tol=1e-6)
