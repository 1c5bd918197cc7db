"""`vflowopt` and `quota` against plain-Python (float64, loop-level) references of their documented
rules (DESIGN §6): selections and merged features on several seeds, k in {0, 1, 7, N-1, N}, exact
ties and ragged batches; end to end on tiny LLaVA (the reference run on the eager attention weights)
and on a tiny Qwen2-VL video (pruned == the unpatched model fed the reference's tokens by hand);
QuoTA's frame budgets follow the question; `vlmprune calibrate` writes a schedule the scorer reads."""

from __future__ import annotations

import json
import math

import pytest
import torch
from typer.testing import CliRunner

import vlmprune
from tests.conftest import pixels, prompt, tiny_llava
from tests.test_llava import image_features, oracle_row
from vlmprune.kernels.pool import pool_plan
from vlmprune.scorers import EncoderInfo, Request, Signals, build_scorer

INFO = EncoderInfo(num_layers=4, feature_layer=2, has_cls=True, grid=None)
INFO_NO_CLS = EncoderInfo(num_layers=4, feature_layer=3, has_cls=False, grid=None)
TINY = 1.1754943508222875e-38


def budgets_for(k: int, counts: list[int]) -> list[int]:
    """k of the parametrised {0, 1, 7, N-1, N} for each item (N = its own count), ragged."""
    return [min(k, c) if k >= 0 else c + 1 + k for c in counts]


KS = [0, 1, 7, -2, -1]  # -2: N - 1, -1: N


def cos(a, b) -> float:
    dot = math.fsum(x * y for x, y in zip(a, b))
    return dot / math.sqrt(math.fsum(x * x for x in a) * math.fsum(y * y for y in b))


# --- vflowopt: the reference ----------------------------------------------------------------------


def ref_importance(
    A, alive: list[int], offset: int, t: float, alpha: float
) -> dict[int, float]:
    """visual index -> importance, from one head-mean graph A (lists) over the alive nodes."""
    sub = {
        i: {j: A[i][j] / math.fsum(A[i][x] for x in alive) for j in alive}
        for i in alive
    }
    received = {j: math.fsum(sub[i][j] for i in alive) / len(alive) for j in alive}
    mean = math.fsum(received.values()) / len(alive)
    glob = [i for i in alive if received[i] > t * mean] or alive
    context = {j: math.fsum(sub[i][j] for i in glob) / len(glob) for j in alive}
    vis = [j for j in alive if j >= offset]
    ent = {
        j: -math.fsum(p * math.log(p) for p in sub[j].values() if p > 0) for j in vis
    }
    top = max(ent.values())
    z = math.fsum(math.exp(e - top) for e in ent.values())
    return {j - offset: context[j] + alpha * math.exp(ent[j] - top) / z for j in vis}


def ref_vflowopt(
    graphs, c: int, offset: int, k: int, expand, t: float, alpha: float, x, recycle=True
):
    """(kept indices ascending, their features) for one item: graphs [L] of [T][T] head-mean
    attention lists, x [c][D] feature lists."""
    if k == 0:
        return [], []
    if k >= c:
        return list(range(c)), [list(r) for r in x[:c]]
    alive, first = list(range(c + offset)), None
    for j, A in enumerate(graphs):
        imp = ref_importance(A, alive, offset, t, alpha)
        first = first or imp
        vis = [v - offset for v in alive if v >= offset]
        keep = k if j == len(graphs) - 1 else min(len(vis), math.ceil(k * expand[j]))
        chosen = sorted(vis, key=lambda v: (-imp[v], v))[:keep]
        alive = list(range(offset)) + sorted(v + offset for v in chosen)
    kept = [v - offset for v in alive if v >= offset]
    if not recycle:
        return kept, [list(x[q]) for q in kept]
    members = {q: [q] for q in kept}
    for p in range(c):
        if p not in members:
            best = None
            for q in kept:  # ascending: a tie keeps the lower kept index
                s = cos(x[p], x[q])
                if best is None or s > best[0]:
                    best = (s, q)
            members[best[1]].append(p)
    out = []
    for q in kept:
        w = [max(first[m], TINY) for m in members[q]]
        out.append(
            [
                math.fsum(wi * x[m][d] for wi, m in zip(w, members[q])) / math.fsum(w)
                for d in range(len(x[0]))
            ]
        )
    return kept, out


def tied_graph(t: int, seed: int, a: int, b: int, temp: float = 2.0) -> torch.Tensor:
    """[t, t] row-softmax attention of random logits in which nodes a and b have the same row and
    column (so every importance term ties exactly between them)."""
    z = (
        torch.randn(
            t, t, generator=torch.Generator().manual_seed(seed), dtype=torch.float64
        )
        * temp
    )
    z[:, b] = z[:, a]
    z[b, :] = z[a, :]
    return torch.softmax(z, -1).float()


def vflow_signals(
    counts: list[int], offset: int, layers: list[int], seed: int, info: EncoderInfo
):
    """Ragged items (zero padding beyond each count), per layer a head-mean graph [I, 1, T, T] with
    visual tokens 2 and 5 tied (their features differ)."""
    n = max(counts)
    g = torch.Generator().manual_seed(seed)
    feats = torch.randn(len(counts), n, 6, generator=g)
    s = Signals(
        n_valid=torch.tensor(counts),
        grid=(1, n),
        info=info,
        features=feats,
        counts=tuple(counts),
        grids=tuple((1, c) for c in counts),
    )
    for li, layer in enumerate(layers):
        graph = torch.zeros(len(counts), 1, n + offset, n + offset)
        for i, c in enumerate(counts):
            graph[i, 0, : c + offset, : c + offset] = tied_graph(
                c + offset, seed * 31 + li * 7 + i, 2 + offset, 5 + offset
            )
        s.attn_graph[layer] = graph
    return s


@pytest.mark.parametrize("offset, info", [(1, INFO), (0, INFO_NO_CLS)])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_vflowopt_equals_the_reference_on_ragged_batches(offset, info, seed):
    counts = [12, 9, 12]
    fl = info.feature_layer
    layers = [fl - 2, fl]
    s = vflow_signals(counts, offset, layers, seed, info)
    options = [
        {},
        {"threshold": 1.5, "alpha": 0.5, "expand": [2.0]},
        {"threshold": 1.2, "alpha": 2.0, "recycle": False},
    ]
    for opts in options:
        scorer = build_scorer("vflowopt", **opts)
        assert scorer.needs(info) == Request(
            features=True, attn_graph=tuple(layers), attn_graph_heads="mean"
        )
        for k in KS:
            ks = budgets_for(k, counts)
            sel = scorer.select(s, torch.tensor(ks))
            for i, (c, ki) in enumerate(zip(counts, ks)):
                graphs = [
                    s.attn_graph[layer][i, 0, : c + offset, : c + offset]
                    .double()
                    .tolist()
                    for layer in layers
                ]
                kept, out = ref_vflowopt(
                    graphs,
                    c,
                    offset,
                    ki,
                    opts.get("expand", [1 / 0.6011]),
                    opts.get("threshold", 35.0),
                    opts.get("alpha", 0.0),
                    s.features[i].double().tolist(),
                    opts.get("recycle", True),
                )
                got = sel.indices[i]
                assert got[:ki].tolist() == kept and (got[ki:] == -1).all(), (
                    opts,
                    k,
                    i,
                )
                torch.testing.assert_close(
                    sel.features[i, :ki].double(),
                    torch.tensor(out, dtype=torch.float64).view(ki, 6),
                    rtol=1e-5,
                    atol=1e-6,
                )
                assert (sel.features[i, ki:] == 0).all()


def test_vflowopt_ties_go_to_the_lower_index_and_global_tokens_matter():
    """Tokens 2 and 5 tie exactly: a budget that takes one of them takes 2. A graph where token 0
    receives most attention (a global token) ranks by what token 0 attends to, unlike the mean."""
    s = vflow_signals([12], 0, [1, 3], 4, INFO_NO_CLS)
    imp = ref_importance(
        s.attn_graph[3][0, 0].double().tolist(), list(range(12)), 0, 35.0, 0.0
    )
    order = sorted(range(12), key=lambda v: (-imp[v], v))
    k = order.index(2) + 1  # the budget whose last pick is the tie
    sel = build_scorer("vflowopt", layers=[3]).select(s, torch.tensor([k]))
    assert 2 in sel.indices[0].tolist() and 5 not in sel.indices[0].tolist()
    a = torch.full((6, 6), 0.02)
    a[:, 0], a[:, 1] = (
        0.9,
        0.3,
    )  # every token attends to token 0 (the one global token at threshold 2), then 1
    a[0] = torch.tensor([0.1, 0.05, 0.05, 0.6, 0.1, 0.1])
    a = a / a.sum(-1, keepdim=True)
    g = Signals(
        n_valid=torch.tensor([6]),
        grid=(1, 6),
        info=INFO_NO_CLS,
        features=torch.randn(1, 6, 3),
        counts=(6,),
    )
    g.attn_graph[3] = a[None, None]
    got = build_scorer("vflowopt", layers=[3], threshold=2.0, recycle=False).select(
        g, torch.tensor([2])
    )
    assert got.indices[0].tolist() == [
        0,
        3,
    ]  # token 0 and the token the global token attends to most
    plain = build_scorer("vflowopt", layers=[3], threshold=1e9, recycle=False).select(
        g, torch.tensor([2])
    )
    assert plain.indices[0].tolist() == [
        0,
        1,
    ]  # no global token: the mean received attention


def test_vflowopt_options_and_schedule_file(tmp_path):
    assert build_scorer("vflowopt").cuts(INFO) == ((0, 2), (1 / 0.6011,))
    assert build_scorer("vflowopt", layers=[-1]).cuts(INFO) == ((3,), ())
    for kwargs, err, match in [
        ({"layers": [2, 1]}, ValueError, "strictly ascending"),
        ({"expand": [0.5]}, ValueError, r"\[1, inf\)"),
        ({"expand": [1.0, 2.0]}, ValueError, "non-increasing"),
        ({"alpha": -1}, ValueError, "alpha"),
        ({"recycle": 1}, TypeError, "recycle"),
        ({"layers": 2}, TypeError, "layers"),
        ({"schedule": str(tmp_path / "none.json")}, ValueError, "none.json"),
    ]:
        with pytest.raises(err, match=match):
            build_scorer("vflowopt", **kwargs).cuts(INFO)
    with pytest.raises(ValueError, match="one factor per cut"):
        build_scorer("vflowopt", expand=[2.0, 1.5]).cuts(INFO)
    path = tmp_path / "s.json"
    path.write_text(
        json.dumps(
            {
                "layers": [1, 3],
                "expand": [3.0],
                "threshold": 4.5,
                "alpha": 0.25,
                "score": 1,
            }
        )
    )
    scorer = build_scorer("vflowopt", schedule=str(path), threshold=9.0)
    assert scorer.cuts(INFO) == ((1, 3), (3.0,)) and (
        scorer.threshold,
        scorer.alpha,
    ) == (4.5, 0.25)
    path.write_text("[1, 2]")
    with pytest.raises(ValueError, match="none of the keys"):
        build_scorer("vflowopt", schedule=str(path))


# --- quota: the reference ---------------------------------------------------------------------------


def ref_relevance(x, text) -> list[float]:
    """CDPruner's documented token relevance: mean cosine to the text tokens, min-max normalised."""
    raw = (
        [math.fsum(cos(v, e) for e in text) / len(text) for v in x]
        if text
        else [0.0] * len(x)
    )
    lo, hi = min(raw), max(raw)
    return (
        [(r - lo + 1e-6) / (hi - lo) for r in raw]
        if text and hi > lo
        else [1.0] * len(x)
    )


def ref_budgets(w: list[float], caps: list[int], k: int) -> list[int]:
    """Water-filling by one pass over the frames in order of cap / weight, then largest remainders."""
    k = min(k, sum(caps))
    left, total, quota = k, math.fsum(w), [0.0] * len(w)
    free = sorted(range(len(w)), key=lambda f: caps[f] / w[f])
    while free and left * w[free[0]] / total >= caps[free[0]]:
        f = free.pop(0)
        quota[f], left, total = float(caps[f]), left - caps[f], total - w[f]
    for f in free:
        quota[f] = left * w[f] / total
    out = [math.floor(q) for q in quota]
    for f in sorted(range(len(w)), key=lambda f: (out[f] - quota[f], f))[
        : k - sum(out)
    ]:
        out[f] += 1
    return out


def ref_quota(
    x, text, frames: int, grid, k: int, power=2.0, min_score=0.1, within="pool"
):
    """(kept indices ascending, features, frame budgets) for one item."""
    c = len(x)
    r = ref_relevance(x, text)
    size = c // frames
    means = [math.fsum(r[f * size : (f + 1) * size]) / size for f in range(frames)]
    lo, hi = min(means), max(means)
    s = (
        [min_score + (1 - min_score) * (m - lo) / (hi - lo) for m in means]
        if hi > lo
        else [1.0] * frames
    )
    b = ref_budgets([v**power for v in s], [size] * frames, k)
    fh, w = grid[0] // frames, grid[1]
    idx, out = [], []
    for f, bf in enumerate(b):
        if bf == 0:
            continue
        lo_ = f * size
        if bf >= size:
            cells = [[j] for j in range(size)]
            anchors = list(range(size))
        elif within == "pool":
            anchors_t, table, _ = pool_plan(fh, w, bf, "centre")
            anchors = anchors_t.tolist()
            cells = [[j for j in row if j >= 0] for row in table.tolist()]
        else:
            anchors = sorted(sorted(range(size), key=lambda j: (-r[lo_ + j], j))[:bf])
            cells = [[j] for j in anchors]
        idx += [lo_ + a for a in anchors]
        out += [
            [
                math.fsum(x[lo_ + j][d] for j in cell) / len(cell)
                for d in range(len(x[0]))
            ]
            for cell in cells
        ]
    return idx, out, b


def quota_signals(seed: int) -> Signals:
    """A 3-frame 2x3 video, a 3x4 image and a 2-frame 2x2 video (padded to 18 tokens); frames 0 and 2
    of the first video are copies (their budgets tie), tokens 0 and 1 of its frame 1 too."""
    g = torch.Generator().manual_seed(seed)
    counts, frames, grids = [18, 12, 8], (3, 1, 2), ((6, 3), (3, 4), (4, 2))
    feats = torch.randn(3, 18, 5, generator=g)
    feats[0, 12:18] = feats[0, 0:6]
    feats[0, 7] = feats[0, 6]
    text = torch.randn(3, 4, 5, generator=g)
    s = Signals(
        n_valid=torch.tensor(counts),
        grid=(1, 18),
        info=INFO_NO_CLS,
        features=feats,
        counts=tuple(counts),
        grids=grids,
        frames=frames,
    )
    s.text_embeds, s.text_counts = text, (4, 2, 3)
    return s


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
@pytest.mark.parametrize("within", ["pool", "top"])
def test_quota_equals_the_reference_on_ragged_batches(seed, within):
    s = quota_signals(seed)
    counts = list(s.counts)
    for opts in (
        {"within": within},
        {"within": within, "power": 1.0, "min_score": 0.5},
    ):
        scorer = build_scorer("quota", **opts)
        assert scorer.needs(INFO) == Request(features=True, text_embeds=True)
        for k in KS:
            ks = budgets_for(k, counts)
            sel = scorer.select(s, torch.tensor(ks))
            _, budgets = scorer.budgets(s, torch.tensor(ks))
            for i, (c, ki) in enumerate(zip(counts, ks)):
                x = s.features[i, :c].double().tolist()
                text = s.text_embeds[i, : s.text_counts[i]].double().tolist()
                kept, out, b = ref_quota(
                    x,
                    text,
                    s.frames[i],
                    s.grids[i],
                    ki,
                    opts.get("power", 2.0),
                    opts.get("min_score", 0.1),
                    within,
                )
                assert budgets[i] == b and sum(b) == ki, (k, i, budgets[i], b)
                assert (
                    sel.indices[i, :ki].tolist() == kept
                    and (sel.indices[i, ki:] == -1).all()
                )
                torch.testing.assert_close(
                    sel.features[i, :ki].double(),
                    torch.tensor(out, dtype=torch.float64).view(ki, 5),
                    rtol=1e-5,
                    atol=1e-6,
                )


def test_quota_budget_rules():
    assert ref_budgets([1.0, 4.0, 0.01], [4, 4, 4], 7) == [
        3,
        4,
        0,
    ]  # frame 1 capped, its excess to 0 and 2
    s = quota_signals(0)
    _, b = build_scorer("quota").budgets(s, torch.tensor([9, 5, 8]))
    assert (
        b[0][0] - b[0][2] in (0, 1) and b[1] == [5] and sum(b[2]) == 8
    )  # copied frames: a tie (remainder to 0)
    s.text_embeds = torch.zeros(
        3, 0, 5
    )  # no text: every frame scored 1, budgets as even as integers allow
    _, b = build_scorer("quota").budgets(s, torch.tensor([7, 5, 3]))
    assert b == [[3, 2, 2], [5], [2, 1]]
    with pytest.raises(ValueError, match=r"within must be one of \['pool', 'top'\]"):
        build_scorer("quota", within="mean")
    with pytest.raises(ValueError, match=r"min_score must be in \(0, 1\]"):
        build_scorer("quota", min_score=0.0)
    s.frames = (4, 1, 2)
    with pytest.raises(
        ValueError, match="grid 6x3 of item 0 does not hold its 18 tokens in 4 frames"
    ):
        build_scorer("quota").budgets(s, torch.tensor([7, 5, 3]))


# --- end to end ------------------------------------------------------------------------------------


def test_vflowopt_llava_equals_the_reference_on_eager_attention_and_the_hand_fed_oracle():
    """Tiny LLaVA, two images: the reference on the eager model's attention weights of layers 0 and
    2 picks the kept tokens and their recycled features; the patched logits equal the unpatched
    model fed them by hand."""
    model, eager = tiny_llava(seed=5), tiny_llava(attn="eager", seed=5)
    pv = pixels(2, seed=6)
    ids = prompt(2, seed=13)
    feats = image_features(model, pv)
    with torch.no_grad():
        att = eager.model.vision_tower(pv, output_attentions=True).attentions
    vlmprune.patch(model, "vflowopt", keep=5, threshold=1.5, alpha=0.5)
    with torch.no_grad():
        out = model(input_ids=torch.tensor([ids]), pixel_values=pv).logits[0]
    kept = vlmprune.last_selection(model)[0]
    placed = []
    for i, f in enumerate(feats):
        graphs = [att[layer][i].float().mean(0).double().tolist() for layer in (0, 2)]
        want, rows = ref_vflowopt(
            graphs, 16, 1, 5, [1 / 0.6011], 1.5, 0.5, f.double().tolist()
        )
        assert kept[i].tolist() == want
        placed.append(
            torch.zeros_like(f).index_copy_(
                0, kept[i], torch.tensor(rows, dtype=f.dtype)
            )
        )
    vlmprune.unpatch(model)
    torch.testing.assert_close(
        out, oracle_row(model, ids, placed, kept, "compact"), atol=1e-4, rtol=0
    )


def test_quota_qwen_video_budgets_follow_the_question_and_match_the_oracle():
    """Tiny Qwen2-VL, one 4-frame video (2x2 tokens a frame) and the same pixels under two questions:
    the frame budgets differ, each is the reference's on the adapter's features and text embeddings,
    and the pruned logits equal the unpatched model fed the reference's pooled tokens by hand."""
    from tests.test_qwen import oracle_logits
    from vlmprune.eval.tiny import qwen_inputs, tiny_qwen

    model = tiny_qwen("qwen2_vl", seed=3)
    items = [("video", (4, 4, 4))]
    first = qwen_inputs([items], seed=5, after=6)
    second = dict(first, input_ids=first["input_ids"].clone())
    second["input_ids"][0, -6:] = torch.randint(
        3, 90, (6,), generator=torch.Generator().manual_seed(99)
    )
    vlmprune.patch(model, "quota", keep=6)
    adapter = model._vlmprune_adapter
    seen = []
    for inputs in (first, second):
        with torch.no_grad():
            out = model(**inputs).logits[0]
            prompt_ = adapter.read_prompt(inputs)
            enc = adapter.encode(inputs, prompt_)
            signals = adapter.prefill_signals(prompt_, enc)
        assert signals.frames == (4,) and signals.grids == ((8, 2),)
        x = signals.features[0].double().tolist()
        text = signals.text_embeds[0, : signals.text_counts[0]].double().tolist()
        kept, rows, b = ref_quota(x, text, 4, (8, 2), 6)
        assert adapter.stage.scorer.budgets(signals, torch.tensor([6]))[1] == [b]
        assert vlmprune.last_selection(model)[0][0].tolist() == kept
        seen.append(b)
        vlmprune.unpatch(model)
        feats = [torch.tensor(rows, dtype=signals.features.dtype)]
        ref = oracle_logits(model, inputs, items, [torch.tensor(kept)], feats, enc)
        torch.testing.assert_close(out, ref, atol=1e-4, rtol=0)
        vlmprune.patch(model, "quota", keep=6)
        adapter = model._vlmprune_adapter
    assert seen[0] != seen[1], seen


def test_calibrate_writes_a_schedule_the_scorer_reads(tmp_path):
    """`vlmprune calibrate` on the tiny LLaVA (2 random images, 3 trials): the file's best score is
    the mean cosine of the last-token states that its schedule gives, recomputed here; the first
    trial is the defaults; `schedule=` reads it back."""
    from vlmprune.cli import app
    from vlmprune.eval.calibrate import last_token_states
    from vlmprune.eval.sweep import DEFAULT_PROMPT, load_vlm, random_images

    path = tmp_path / "schedule.json"
    res = CliRunner().invoke(
        app,
        [
            "calibrate",
            "--model",
            "tiny",
            "--keep",
            "8",
            "--limit",
            "2",
            "--trials",
            "3",
            "--device",
            "cpu",
            "--out",
            str(path),
        ],
    )
    assert res.exit_code == 0, res.output
    data = json.loads(path.read_text())
    scores = [t["score"] for t in data["trials"]]
    assert len(scores) == 3 and data["score"] == max(scores)
    assert (data["trials"][0]["threshold"], data["trials"][0]["alpha"]) == (35.0, 0.0)
    vlm = load_vlm("tiny", device="cpu")
    inputs = vlm.inputs(
        [it.image for it in random_images(2, vlm.image_size).items()],
        [DEFAULT_PROMPT] * 2,
    )
    reference = last_token_states(vlm.model, [inputs])
    vlmprune.patch(vlm.model, "vflowopt", keep=8, schedule=str(path))
    scorer = vlm.model._vlmprune_adapter.stage.scorer
    assert (
        scorer.threshold,
        scorer.alpha,
        list(scorer.cuts(vlm.model._vlmprune_adapter.info)[0]),
    ) == (data["threshold"], data["alpha"], data["layers"])
    pruned = last_token_states(vlm.model, [inputs])
    got = float(torch.nn.functional.cosine_similarity(pruned, reference, dim=-1).mean())
    assert got == pytest.approx(data["score"], abs=1e-6)
    bad = CliRunner().invoke(
        app, ["calibrate", "--method", "cls", "--model", "tiny", "--out", str(path)]
    )
    assert bad.exit_code == 2 and "allowed: ['vflowopt']" in bad.output
