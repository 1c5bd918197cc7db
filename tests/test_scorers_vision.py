"""`vtc_cls`, `visionzip`, `hiprune` and `flowcut` (DESIGN §3, §6) against plain-Python references
written from the papers' rules, on signals taken from a tiny random CLIP vision tower run in eager
attention (the same quantities the adapter collects, computed here from the layer modules)."""

from __future__ import annotations

import functools
import math

import pytest
import torch
from transformers import CLIPVisionConfig, CLIPVisionModel

from vlmprune.scorers import EncoderInfo, Request, Signals, available_methods, build_scorer, scorer_class, scorer_options

LAYERS, FEATURE_LAYER, HEADS, GRID = 6, 4, 4, (4, 4)
N = GRID[0] * GRID[1]
INFO = EncoderInfo(num_layers=LAYERS, feature_layer=FEATURE_LAYER, has_cls=True, grid=GRID)
INFO_NO_CLS = EncoderInfo(num_layers=32, feature_layer=31, has_cls=False, grid=GRID)
N_VALID = [N, 11, N]  # image 1 is ragged: its last 5 rows are padding junk
SEEDS = [0, 1, 2]
KS = [0, 1, 7, N - 1, N]
GAP = 1e-6  # a reference decision closer than this would be ambiguous in float32: bad test data


@functools.lru_cache(maxsize=None)
def clip_signals(seed: int) -> Signals:
    """Signals of 3 images from a random 6-layer CLIP (hidden 32, 4 heads, 28 px, patch 7 ->
    16 patches + CLS), with every per-layer signal the four scorers can ask for."""
    cfg = CLIPVisionConfig(
        hidden_size=32, intermediate_size=64, num_attention_heads=HEADS, num_hidden_layers=LAYERS,
        image_size=28, patch_size=7, initializer_factor=5.0, attn_implementation="eager",
    )
    torch.manual_seed(seed)
    model = CLIPVisionModel(cfg).eval()
    g = torch.Generator().manual_seed(100 + seed)
    pixels = torch.randn(len(N_VALID), 3, 28, 28, generator=g)
    w1, w2 = torch.randn(32, 48, generator=g) / 6, torch.randn(48, 24, generator=g) / 7
    with torch.no_grad():
        out = model(pixel_values=pixels, output_attentions=True, output_hidden_states=True)
        s = Signals(n_valid=torch.tensor(N_VALID), grid=GRID, info=INFO)
        # LLaVA "default" strategy: the feature layer's output without CLS, through a 2-layer MLP projector
        s.features = torch.nn.functional.gelu(out.hidden_states[FEATURE_LAYER + 1][:, 1:] @ w1) @ w2
        for l, layer in enumerate(model.encoder.layers):
            x = layer.layer_norm1(out.hidden_states[l])
            k, v = layer.self_attn.k_proj(x), layer.self_attn.v_proj(x)
            s.cls_attn[l] = out.attentions[l][:, :, 0, 1:].mean(1)
            s.keys[l] = k
            s.value_norms[l] = v.norm(dim=-1)
            vh = v.view(v.shape[0], v.shape[1], HEADS, -1).transpose(1, 2)  # [I, H, T, d]
            s.cls_value_attn[l] = torch.softmax(vh[:, :, :1] @ vh.transpose(2, 3), dim=-1)[:, :, 0, 1:].mean(1)
    # junk in the padding rows of image 1: the scorers must never look at it
    nv = N_VALID[1]
    s.features[1, nv:] = 50.0
    for l in range(LAYERS):
        s.cls_attn[l][1, nv:] = 1.0
        s.cls_value_attn[l][1, nv:] = 1.0
        s.value_norms[l][1, nv + 1 :] = 1e3
        s.keys[l][1, nv + 1 :] = s.keys[l][1, 1]
    return s


def top(scores: dict[int, float], k: int) -> list[int]:
    """The k highest-scoring keys (ties to the lower index), checking the cut is not a near-tie."""
    order = sorted(scores, key=lambda j: (-scores[j], j))
    if 0 < k < len(order):
        assert scores[order[k - 1]] - scores[order[k]] > GAP, "ambiguous test data"
    return order[:k]


def kept(sel) -> list[list[int]]:
    return [[j for j in r if j >= 0] for r in sel.indices.tolist()]


def check_shape(sel, ks: list[int]):
    eff = [min(k, n) for k, n in zip(ks, N_VALID)]
    assert sel.indices.dtype == torch.long and sel.indices.shape == (len(ks), max(eff))
    for r, e in zip(kept(sel), eff):
        assert len(r) == e and r == sorted(r) and len(set(r)) == e


def k_cases():
    return [[k] * len(N_VALID) for k in KS] + [[1, 7, N - 1], [N, 0, 3]]


# --- registry, options, requests -------------------------------------------------------------


def test_registered_with_metadata():
    assert {"vtc_cls", "visionzip", "hiprune", "flowcut"} <= set(available_methods())
    for name in ("vtc_cls", "visionzip", "hiprune", "flowcut"):
        cls = scorer_class(name)
        assert cls.name == name and cls.stage == "vision" and cls.__doc__
        assert "2024" in cls.paper or "2025" in cls.paper
    assert scorer_options("vtc_cls") == {"layers": None}
    assert scorer_options("visionzip") == {"layer": None, "contextual_ratio": 10 / 64, "similarity": "keys"}
    assert scorer_options("hiprune") == {"alpha": 0.1, "object_layer": None}
    assert scorer_options("flowcut") == {
        "num_flow_layers": None, "end_layer": None, "attn_weight": 1.0, "semantic_weight": 1.0,
        "use_value_norm": True, "momentum": 0.5, "prune_every": 2,
    }


@pytest.mark.parametrize(
    "name, kwargs, error, words",
    [
        ("vtc_cls", {"layers": 3}, TypeError, ["3", "layers"]),
        ("vtc_cls", {"layers": []}, TypeError, ["[]"]),
        ("vtc_cls", {"layers": [1, "2"]}, TypeError, ["'2'"]),
        ("vtc_cls", {"layers": [True]}, TypeError, ["True"]),
        ("visionzip", {"similarity": "values"}, ValueError, ["'values'", "keys", "features"]),
        ("visionzip", {"contextual_ratio": 1.5}, ValueError, ["1.5", "[0, 1]"]),
        ("visionzip", {"contextual_ratio": "0.1"}, TypeError, ["'0.1'"]),
        ("visionzip", {"layer": 2.0}, TypeError, ["2.0"]),
        ("hiprune", {"alpha": -0.1}, ValueError, ["-0.1", "[0, 1]"]),
        ("hiprune", {"object_layer": 0}, ValueError, ["0", "1-based"]),
        ("hiprune", {"object_layer": "9"}, TypeError, ["'9'"]),
        ("flowcut", {"momentum": 1.0}, ValueError, ["1.0", "[0, 1)"]),
        ("flowcut", {"prune_every": 0}, ValueError, ["0", ">= 1"]),
        ("flowcut", {"num_flow_layers": 0}, ValueError, ["0"]),
        ("flowcut", {"attn_weight": 0, "semantic_weight": 0}, ValueError, ["both"]),
        ("flowcut", {"use_value_norm": 1}, TypeError, ["1", "True or False"]),
        ("flowcut", {"alpha": 0.1}, TypeError, ["'alpha'", "momentum"]),
    ],
)
def test_bad_kwargs(name, kwargs, error, words):
    with pytest.raises(error) as err:
        build_scorer(name, **kwargs)
    for w in words:
        assert w in str(err.value), (w, str(err.value))


def test_layers_out_of_range_raise_at_needs():
    with pytest.raises(ValueError, match="layers=7"):
        build_scorer("vtc_cls", layers=[7]).needs(INFO)
    with pytest.raises(ValueError, match="object_layer=7"):
        build_scorer("hiprune", object_layer=7).needs(INFO)
    with pytest.raises(ValueError, match="layer=-7"):
        build_scorer("visionzip", layer=-7).needs(INFO)
    with pytest.raises(ValueError, match="CLS"):
        build_scorer("flowcut").needs(INFO_NO_CLS)


def test_needs():
    clip_l = EncoderInfo(num_layers=24, feature_layer=22, has_cls=True, grid=(24, 24))
    assert build_scorer("vtc_cls").needs(clip_l) == Request(cls_attn=tuple(range(12, 23)))
    assert build_scorer("vtc_cls").needs(INFO) == Request(cls_attn=(3, 4))
    assert build_scorer("vtc_cls", layers=[-1, 0, 2]).needs(INFO) == Request(cls_attn=(0, 2, 5))
    assert build_scorer("vtc_cls").needs(INFO_NO_CLS) == Request(received_attn=tuple(range(16, 32)))
    assert build_scorer("visionzip").needs(clip_l) == Request(features=True, cls_attn=(22,), keys=(22,))
    assert build_scorer("visionzip", similarity="features", layer=-1).needs(clip_l) == Request(features=True, cls_attn=(23,))
    assert build_scorer("hiprune").needs(clip_l) == Request(cls_attn=(8, 22))  # object layer 9 (1-based)
    assert build_scorer("hiprune").needs(INFO_NO_CLS) == Request(received_attn=(15, 31))  # 16 (1-based)
    assert build_scorer("hiprune", object_layer=2).needs(INFO) == Request(cls_attn=(1, 4))
    span = tuple(range(22))
    assert build_scorer("flowcut").needs(clip_l) == Request(cls_attn=span, cls_value_attn=span, value_norms=span)
    assert build_scorer("flowcut", num_flow_layers=4, semantic_weight=0).needs(clip_l) == Request(
        cls_attn=(18, 19, 20, 21), value_norms=(18, 19, 20, 21)
    )
    assert build_scorer("flowcut", end_layer=-1, num_flow_layers=2, use_value_norm=False).needs(clip_l) == Request(
        cls_attn=(22, 23), cls_value_attn=(22, 23)
    )
    merged = Request(cls_value_attn=(1, 3)).merge(Request(cls_value_attn=(2, 3), keys=(0,)))
    assert merged == Request(cls_value_attn=(1, 2, 3), keys=(0,))


def test_signals_match_the_contract():
    """The test's signals are the eager attention rows the adapter must reproduce."""
    s = clip_signals(0)
    assert s.cls_attn[2].shape == (3, N) and s.keys[2].shape == (3, N + 1, 32)
    assert s.value_norms[2].shape == (3, N + 1) and s.cls_value_attn[2].shape == (3, N)
    # softmax rows over all T tokens: the CLS attention over patches sums to < 1 (CLS column dropped)
    assert (s.cls_attn[0][0].sum() < 1) and (s.cls_attn[0][0].sum() > 0.5)


# --- vtc_cls ---------------------------------------------------------------------------------


def vtc_reference(s: Signals, layers: list[int], i: int, k: int) -> list[int]:
    n = N_VALID[i]
    scores = {j: sum(float(s.cls_attn[l][i, j]) for l in layers) / len(layers) for j in range(n)}
    return sorted(top(scores, min(k, n)))


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("layers", [None, [0, 2, -1], [1]])
def test_vtc_cls_matches_reference(seed, layers):
    s = clip_signals(seed)
    scorer = build_scorer("vtc_cls", layers=layers)
    used = [3, 4] if layers is None else [l % LAYERS for l in layers]
    for ks in k_cases():
        sel = scorer.select(s, torch.tensor(ks))
        check_shape(sel, ks)
        assert kept(sel) == [vtc_reference(s, used, i, k) for i, k in enumerate(ks)], ks


def test_vtc_cls_ensemble_differs_from_single_layer():
    """The mean over layers is not the feature layer's ranking (the ensemble matters)."""
    s = clip_signals(0)
    k = torch.tensor([7, 7, 7])
    assert kept(build_scorer("vtc_cls", layers=[0, 1, 2, 3, 4]).select(s, k)) != kept(build_scorer("cls").select(s, k))


# --- visionzip -------------------------------------------------------------------------------


def cosine(a: list[float], b: list[float]) -> float:
    dot = sum(x * y for x, y in zip(a, b))
    return dot / (math.sqrt(sum(x * x for x in a)) * math.sqrt(sum(y * y for y in b)))


def visionzip_reference(s: Signals, i: int, k: int, ratio: float, layer: int, similarity: str):
    """(kept indices, {index: feature row}) by the VisionZip rule, in float64 loops."""
    n = N_VALID[i]
    feats = [[float(x) for x in s.features[i, j]] for j in range(n)]
    if k >= n:
        return list(range(n)), dict(enumerate(feats))
    contextual = math.floor(k * ratio + 0.5)
    dominant = top({j: float(s.cls_attn[layer][i, j]) for j in range(n)}, k - contextual)
    out = {j: feats[j] for j in dominant}
    if contextual:
        rest = [j for j in range(n) if j not in dominant]
        step = len(rest) // contextual
        targets = [rest[c * step] for c in range(contextual)]
        if similarity == "keys":  # key row j + 1: the CLS key is row 0
            vec = lambda j: [float(x) for x in s.keys[layer][i, j + 1]]  # noqa: E731
        else:
            vec = lambda j: feats[j]  # noqa: E731
        groups = {t: [t] for t in targets}
        for j in rest:
            if j in targets:
                continue
            sims = [cosine(vec(j), vec(t)) for t in targets]
            best = max(range(contextual), key=lambda c: (sims[c], -c))
            if contextual > 1:
                second = sorted(sims)[-2]
                assert sims[best] - second > GAP, "ambiguous test data"
            groups[targets[best]].append(j)
        for t, members in groups.items():
            out[t] = [sum(feats[m][d] for m in members) / len(members) for d in range(len(feats[0]))]
    return sorted(out), out


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize(
    "similarity, ratio, layer",
    [("keys", 10 / 64, None), ("features", 10 / 64, None), ("keys", 0.5, 3), ("features", 0.3, -1), ("keys", 0.45, None)],
)
def test_visionzip_matches_reference(seed, similarity, ratio, layer):
    s = clip_signals(seed)
    scorer = build_scorer("visionzip", similarity=similarity, contextual_ratio=ratio, layer=layer)
    lyr = FEATURE_LAYER if layer is None else layer % LAYERS
    # k = 9 at ratio 0.45: 5 dominant, 4 targets among 11 remaining (step 2: 0, 2, 4, 6)
    for ks in k_cases() + [[9, 9, 9], [12, 5, 10]]:
        sel = scorer.select(s, torch.tensor(ks))
        check_shape(sel, ks)
        assert sel.features is not None and sel.features.shape[:2] == sel.indices.shape
        for i, k in enumerate(ks):
            idx, feats = visionzip_reference(s, i, k, ratio, lyr, similarity)
            assert kept(sel)[i] == idx, (ks, i)
            want = torch.tensor([feats[j] for j in idx], dtype=torch.float32).reshape(len(idx), s.features.shape[2])
            torch.testing.assert_close(sel.features[i, : len(idx)], want, rtol=1e-5, atol=1e-5)
            assert (sel.features[i, len(idx) :] == 0).all()


def test_visionzip_merges_into_contextual_tokens():
    """Merging really happens for k < N: some kept rows differ from the original features."""
    s = clip_signals(1)
    sel = build_scorer("visionzip", contextual_ratio=0.5).select(s, torch.tensor([8, 8, 8]))
    for i in range(3):
        idx = kept(sel)[i]
        assert not torch.equal(sel.features[i, :8], s.features[i, idx])


def test_visionzip_by_hand():
    """6 tokens on a line; dominant = the 2 highest CLS attention (0 and 4); the rest 1, 2, 3, 5
    with 2 targets at step 4 // 2 = 2: tokens 1 and 3; 2 is closest to 3, 5 to 1."""
    f = torch.tensor([[5.0, 5.0], [1.0, 0.0], [0.1, 1.0], [0.0, 1.0], [-5.0, 5.0], [1.0, 0.2]])
    attn = torch.tensor([0.9, 0.1, 0.2, 0.3, 0.8, 0.05])
    s = Signals(n_valid=torch.tensor([6]), grid=(1, 6), info=EncoderInfo(2, 1, True, (1, 6)), features=f[None])
    s.cls_attn[1] = attn[None]
    sel = build_scorer("visionzip", contextual_ratio=0.5, similarity="features").select(s, torch.tensor([4]))
    assert kept(sel) == [[0, 1, 3, 4]]
    want = torch.stack([f[0], (f[1] + f[5]) / 2, (f[3] + f[2]) / 2, f[4]])
    torch.testing.assert_close(sel.features[0], want)
    # one contextual token: every remaining token merges into token 1
    sel = build_scorer("visionzip", contextual_ratio=1 / 3, similarity="features").select(s, torch.tensor([3]))
    assert kept(sel) == [[0, 1, 4]]
    torch.testing.assert_close(sel.features[0, 1], (f[1] + f[2] + f[3] + f[5]) / 4)


def test_visionzip_default_split_is_54_to_10():
    from vlmprune.scorers.merge import split_budget

    assert [split_budget(k, 10 / 64) for k in (64, 128, 192, 1, 3, 4, 7)] == [
        (54, 10), (108, 20), (162, 30), (1, 0), (3, 0), (3, 1), (6, 1)
    ]


# --- hiprune ---------------------------------------------------------------------------------


def hiprune_reference(s: Signals, i: int, k: int, alpha: float, obj: int, reg: int) -> list[int]:
    n = N_VALID[i]
    if k >= n:
        return list(range(n))
    h, w = GRID
    m = min(k, math.floor(alpha * k + 0.5))
    anchors = top({j: float(s.cls_attn[obj][i, j]) for j in range(n)}, math.ceil(m / 5)) if m else []
    chosen = list(anchors)
    for a in anchors:
        # 4-neighbourhood from the coordinates, in raster (index) order
        near = sorted(j for j in range(n) if abs(j // w - a // w) + abs(j % w - a % w) == 1)
        for j in near:
            if len(chosen) < m and j not in chosen:
                chosen.append(j)
    rest = {j: float(s.cls_attn[reg][i, j]) for j in range(n) if j not in chosen}
    return sorted(chosen + top(rest, k - len(chosen)))


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("alpha, object_layer", [(0.1, None), (0.5, 2), (1.0, 3), (0.3, 6)])
def test_hiprune_matches_reference(seed, alpha, object_layer):
    s = clip_signals(seed)
    scorer = build_scorer("hiprune", alpha=alpha, object_layer=object_layer)
    obj = (object_layer or 2) - 1  # default for 6 layers: floor(6 * 9 / 24 + 0.5) = 2 (1-based)
    for ks in k_cases():
        sel = scorer.select(s, torch.tensor(ks))
        check_shape(sel, ks)
        assert sel.features is None
        assert kept(sel) == [hiprune_reference(s, i, k, alpha, obj, FEATURE_LAYER) for i, k in enumerate(ks)], ks


def test_hiprune_by_hand():
    """4x4 grid, alpha = 1: anchor = argmax of the object layer (token 5), buffers its
    neighbours 1, 4, 6, 9; with k = 7 the last 2 slots are registers: the top output-layer
    attention outside the chosen ones (15, then 0)."""
    obj = torch.full((16,), 0.01)
    obj[5], obj[10] = 0.5, 0.4
    reg = torch.linspace(0.1, 0.2, 16).flip(0)  # token 0 highest ... 15 lowest
    reg[15] = 0.9
    s = Signals(n_valid=torch.tensor([16]), grid=(4, 4), info=EncoderInfo(4, 3, True, (4, 4)))
    s.cls_attn[0], s.cls_attn[3] = obj[None], reg[None]
    sel = build_scorer("hiprune", alpha=1.0, object_layer=1).select(s, torch.tensor([7]))
    # m = 7: ceil(7/5) = 2 anchors (5, 10); buffers of 5 (1, 4, 6, 9) then of 10 (6 taken, 9 taken: 11)
    assert kept(sel) == [[1, 4, 5, 6, 9, 10, 11]]
    sel = build_scorer("hiprune", alpha=5 / 7, object_layer=1).select(s, torch.tensor([7]))
    # m = 5: anchor 5 and its 4 buffers, then registers 15 and 0
    assert kept(sel) == [[0, 1, 4, 5, 6, 9, 15]]


# --- flowcut ---------------------------------------------------------------------------------


def flowcut_reference(
    s: Signals, i: int, k: int, span: list[int], wa: float, ws: float, use_d: bool, mom: float, every: int,
    cuts: list[int],
) -> list[int]:
    """FlowCut's progressive rule in float64 loops; records every intermediate cut in `cuts`."""
    n = N_VALID[i]
    k = min(k, n)
    alive = list(range(n))
    end = span[-1]
    flow: dict[int, float] = {}
    for l in span:
        a = {j: float(s.cls_attn[l][i, j]) for j in alive}
        sv = {j: float(s.cls_value_attn[l][i, j]) for j in alive}
        ta, tv = sum(a.values()), sum(sv.values())
        for j in alive:
            score = wa * a[j] / ta + ws * sv[j] / tv
            if use_d:
                score *= float(s.value_norms[l][i, j + 1])
            flow[j] = score if l == span[0] else mom * flow[j] + (1 - mom) * score
        rpl = end - l
        if rpl % every:
            continue
        if rpl == 0:
            n_keep = k
        else:
            m = len(alive)
            entropy = -sum(a[j] / ta * math.log(a[j] / ta) for j in alive)
            x = (m - k) / math.sqrt(rpl) * (1 - (entropy / math.log(m)) ** 2) + 0.5
            assert abs(x - round(x)) > 1e-4, "ambiguous test data"
            cut = max(0, math.floor(x))
            cuts.append(cut)
            n_keep = max(m - cut, k)
        alive = top({j: flow[j] for j in alive}, min(n_keep, len(alive)))
    return sorted(alive)


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize(
    "kwargs, span",
    [
        ({}, [0, 1, 2, 3]),
        ({"end_layer": -1, "num_flow_layers": 4, "prune_every": 1, "momentum": 0.25}, [2, 3, 4, 5]),
        ({"attn_weight": 2.0, "semantic_weight": 0.0, "use_value_norm": False, "end_layer": 4, "prune_every": 1}, [0, 1, 2, 3, 4]),
        ({"semantic_weight": 3.0, "num_flow_layers": 3, "prune_every": 1}, [1, 2, 3]),
    ],
)
def test_flowcut_matches_reference(seed, kwargs, span):
    s = clip_signals(seed)
    scorer = build_scorer("flowcut", **kwargs)
    opts = {**scorer_options("flowcut"), **kwargs}
    cuts: list[int] = []
    for ks in k_cases():
        sel = scorer.select(s, torch.tensor(ks))
        check_shape(sel, ks)
        want = [
            flowcut_reference(s, i, k, span, opts["attn_weight"], opts["semantic_weight"], opts["use_value_norm"],
                              opts["momentum"], opts["prune_every"], cuts)
            for i, k in enumerate(ks)
        ]
        assert kept(sel) == want, ks
    assert any(c > 0 for c in cuts), "the progressive (adaptive) cuts were never exercised"


def test_flowcut_earlier_cuts_are_final():
    """A token cut at an intermediate layer never comes back, even if it would win at the end:
    token 0 has the lowest score in layer 0 (cut there, entropy low) and the highest afterwards."""
    n, layers = 8, 3
    s = Signals(n_valid=torch.tensor([n]), grid=(1, n), info=EncoderInfo(layers + 1, layers, True, (1, n)))
    for l in range(layers):
        a = torch.tensor([0.001, 0.9, 0.01, 0.02, 0.03, 0.04, 0.05, 0.06]) if l == 0 else torch.tensor(
            [0.9, 0.01, 0.01, 0.01, 0.01, 0.01, 0.01, 0.01]
        )
        s.cls_attn[l] = a[None]
    scorer = build_scorer("flowcut", semantic_weight=0.0, use_value_norm=False, momentum=0.0, prune_every=1)
    sel = scorer.select(s, torch.tensor([2]))
    assert 0 not in kept(sel)[0]
    # with only the last layer (no earlier cut) token 0 is kept
    last_only = build_scorer("flowcut", semantic_weight=0.0, use_value_norm=False, momentum=0.0, num_flow_layers=1)
    sel = last_only.select(s, torch.tensor([2]))
    assert 0 in kept(sel)[0]


def test_missing_signal_is_a_clear_error():
    s = clip_signals(0)
    bare = Signals(n_valid=s.n_valid, grid=s.grid, info=INFO, features=s.features, cls_attn=dict(s.cls_attn))
    with pytest.raises(ValueError, match="cls_value_attn of layer 0 is missing"):
        build_scorer("flowcut").select(bare, torch.tensor([3, 3, 3]))
    with pytest.raises(ValueError, match="keys of layer 4 are missing"):
        build_scorer("visionzip").select(bare, torch.tensor([3, 3, 3]))
    with pytest.raises(ValueError, match="cls_attn of layer 0 is missing"):
        empty = Signals(n_valid=s.n_valid, grid=s.grid, info=INFO)
        build_scorer("vtc_cls", layers=[0]).select(empty, torch.tensor([3, 3, 3]))


def test_batch_equals_alone():
    """Each image gives the same answer alone as inside the batch, for every scorer."""
    s = clip_signals(2)
    ks = torch.tensor([5, 9, 2])
    for name in ("vtc_cls", "visionzip", "hiprune", "flowcut"):
        scorer = build_scorer(name)
        both = scorer.select(s, ks)
        for i in range(3):
            one = Signals(n_valid=s.n_valid[i : i + 1], grid=s.grid, info=INFO, features=s.features[i : i + 1])
            for table in ("cls_attn", "keys", "value_norms", "cls_value_attn"):
                setattr(one, table, {l: t[i : i + 1] for l, t in getattr(s, table).items()})
            alone = scorer.select(one, ks[i : i + 1])
            assert kept(alone)[0] == kept(both)[i], name
            if both.features is not None:
                torch.testing.assert_close(alone.features[0, : ks[i]], both.features[i, : ks[i]])


def test_stack_rows_is_torch_stack_and_a_view_where_the_rows_lie_evenly():
    from vlmprune.scorers.base import stack_rows

    whole = torch.randn(6, 3, 9, generator=torch.Generator().manual_seed(4))
    cases = {
        "unbound": (list(whole), True),  # HF's list(features)
        "sliced rows of a slice": (list(whole[1:5, :, 1:]), True),  # the flush's rows, CLS left out
        "every other row": ([whole[i] for i in (0, 2, 4)], True),
        "reordered": ([whole[i] for i in (2, 0, 1)], False),
        "repeated": ([whole[1], whole[1]], False),
        "uneven": ([whole[i] for i in (0, 1, 3)], False),
        "other tensors": ([whole[0].clone(), whole[1].clone()], False),
        "one row": ([whole[2]], True),
        "one row of its own": ([whole[2].clone()], True),
    }
    for name, (rows, view) in cases.items():
        got = stack_rows(rows)
        assert torch.equal(got, torch.stack(rows)), name
        assert (got.data_ptr() == rows[0].data_ptr()) == view, name
    got = stack_rows(list(whole[1:5, :, 1:]))
    whole[2, 0, 1] = 123.0  # a view: sees the tensor it came from
    assert got[1, 0, 0] == 123.0


def test_layer_rows_reads_a_row_table_back_as_a_view_and_sees_entries_replaced_since():
    from vlmprune.scorers.base import RowTable, layer_rows

    whole = torch.randn(5, 3, 9, generator=torch.Generator().manual_seed(5))
    layers = (2, 4, 6, 8, 10)
    cases = {
        "all": (layers, True),
        "every other": ((2, 6, 10), True),
        "one": ((8,), True),
        "uneven": ((2, 4, 8), False),
        "reordered": ((4, 2), False),
    }
    for name, (wanted, view) in cases.items():
        table = RowTable(whole, layers)
        got = layer_rows(table, wanted)
        assert torch.equal(got, torch.stack([whole[layers.index(i)] for i in wanted])), name
        assert (got.data_ptr() == table[wanted[0]].data_ptr() and got._base is whole) == view, name
    table = RowTable(whole, layers)
    table[6] = torch.zeros(3, 9)  # replaced after the fact: read as it is now, not from the stacked form
    table[12] = torch.ones(3, 9)  # and one added
    for wanted in (layers, (6,), (8, 10, 12)):
        assert torch.equal(layer_rows(table, wanted), torch.stack([table[i] for i in wanted])), wanted
    assert list(table) == [2, 4, 6, 8, 10, 12] and len(table) == 6 and torch.equal(table[6], torch.zeros(3, 9))
    del table[4], table[12]  # a dict in every other way
    assert list(table) == [2, 6, 8, 10] and 4 not in table and dict(table)[8].equal(whole[3])
    with pytest.raises(KeyError):
        del table[4]
    assert torch.equal(layer_rows({1: whole[0], 3: whole[2]}, (3, 1)), whole[[2, 0]])  # a plain dict
