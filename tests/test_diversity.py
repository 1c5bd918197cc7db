"""`divprune` and `kcenter` scorers (DESIGN §3) against hand-made features with known answers,
the max-min reference, and (through the public API) a tiny LLaVA."""

from __future__ import annotations

import pytest
import torch

from tests.circle import circle

from vlmprune.kernels.maxmin import maxmin_select_ref
from vlmprune.scorers import EncoderInfo, Request, Signals, available_methods, build_scorer, scorer_class, scorer_options

INFO = EncoderInfo(num_layers=24, feature_layer=22, has_cls=True, grid=(4, 4))
INFO_NO_CLS = EncoderInfo(num_layers=32, feature_layer=31, has_cls=False, grid=(4, 4))


def expected_order(dirs: list[int], first: int) -> list[int]:
    """First 8 picks by hand, starting from token `first`: the opposite direction (d = 2), the two
    at 90 degrees (tied at d = 1: lower index first), then the four diagonals (tied at 1 - cos 45:
    by index); each direction is represented by its lowest-index token."""
    low = {a: min(i for i, x in enumerate(dirs) if x == a) for a in set(dirs)}
    a = dirs[first]
    quarter = sorted([low[(a + 2) % 8], low[(a + 6) % 8]])
    diag = sorted(low[(a + o) % 8] for o in (1, 3, 5, 7))
    return [first, low[(a + 4) % 8], *quarter, *diag]


def pad_batch(parts: list[torch.Tensor], fill: float = 50.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Stack ragged images; padding rows are junk far from everything (must never be chosen)."""
    n = max(p.shape[0] for p in parts)
    out = torch.full((len(parts), n, parts[0].shape[1]), fill)
    out[..., 1] = -fill
    for i, p in enumerate(parts):
        out[i, : p.shape[0]] = p
    return out, torch.tensor([p.shape[0] for p in parts])


def signals(feats, n_valid, info=INFO, attn=None, layer=None) -> Signals:
    s = Signals(n_valid=n_valid, grid=(1, feats.shape[1]), info=info, features=feats)
    if attn is not None:
        layer = info.feature_layer if layer is None else layer
        (s.cls_attn if info.has_cls else s.received_attn)[layer] = attn
    return s


def rows(idx: torch.Tensor) -> list[list[int]]:
    return [[i for i in r if i >= 0] for r in idx.tolist()]


def test_registered_with_metadata():
    assert {"divprune", "kcenter"} <= set(available_methods())
    for name in ("divprune", "kcenter"):
        cls = scorer_class(name)
        assert cls.name == name and cls.stage == "vision"
        assert cls.__doc__ and "2025" in cls.paper
    assert scorer_options("divprune") == {}
    assert scorer_options("kcenter") == {"layer": None}


@pytest.mark.parametrize(
    "name, kwargs, words",
    [
        ("kcenter", {"layer": "3"}, ["'3'", "layer"]),
        ("kcenter", {"layer": 2.0}, ["2.0"]),
        ("kcenter", {"layer": True}, ["True"]),
        ("kcenter", {"seed": 0}, ["'seed'", "layer"]),
        ("divprune", {"layer": 3}, ["'layer'", "divprune"]),
    ],
)
def test_bad_kwargs_raise_type_error(name, kwargs, words):
    with pytest.raises(TypeError) as err:
        build_scorer(name, **kwargs)
    for w in words:
        assert w in str(err.value), (w, str(err.value))


def test_needs():
    assert build_scorer("divprune").needs(INFO) == Request(features=True)
    assert build_scorer("kcenter").needs(INFO) == Request(features=True, cls_attn=(22,))
    assert build_scorer("kcenter", layer=-1).needs(INFO) == Request(features=True, cls_attn=(23,))
    assert build_scorer("kcenter", layer=5).needs(INFO) == Request(features=True, cls_attn=(5,))
    assert build_scorer("kcenter").needs(INFO_NO_CLS) == Request(features=True, received_attn=(31,))


def test_divprune_known_answer_ragged_batch():
    x0, d0 = circle([1, 3, 2, 3, 2, 2, 3, 2], seed=0)  # direction 0 has no twin: first pick
    x1, d1 = circle([1, 2, 2, 2, 2, 2, 2, 2], seed=5)
    x2, d2 = circle([1, 2, 2, 2, 2, 2, 2, 2], seed=6)
    feats, n_valid = pad_batch([x0, x1, x2])
    lone = [d.index(0) for d in (d0, d1, d2)]
    k = torch.tensor([8, 4, 0])
    sel = build_scorer("divprune").select(signals(feats, n_valid), k)
    assert sel.features is None and sel.indices.dtype == torch.long
    assert sel.indices.shape == (3, 8)
    assert rows(sel.indices) == [
        sorted(expected_order(d0, lone[0])),
        sorted(expected_order(d1, lone[1])[:4]),
        [],
    ]
    # the 8 kept tokens of image 0 are 8 distinct directions
    assert sorted(d0[i] for i in rows(sel.indices)[0]) == list(range(8))
    # each image alone gives the same answer as inside the batch
    for i, x in enumerate([x0, x1]):
        alone = build_scorer("divprune").select(signals(x[None], torch.tensor([x.shape[0]])), k[i : i + 1])
        assert rows(alone.indices)[0] == rows(sel.indices)[i]


def test_divprune_matches_reference_on_random_features():
    g = torch.Generator().manual_seed(0)
    feats = torch.randn(3, 30, 16, generator=g).bfloat16()
    n_valid, k = torch.tensor([30, 17, 25]), torch.tensor([9, 17, 40])
    sel = build_scorer("divprune").select(signals(feats, n_valid), k)
    assert torch.equal(sel.indices, maxmin_select_ref(feats, k, n_valid))
    assert sel.indices.shape == (3, 25) and (sel.indices[1, 17:] == -1).all()


@pytest.mark.parametrize("info", [INFO, INFO_NO_CLS])
def test_kcenter_seeded_by_top_attention(info):
    x0, d0 = circle([2, 3, 2, 2, 3, 2, 2, 2], seed=3)
    x1, d1 = circle([2, 2, 2, 2, 2, 2, 2, 2], seed=4)
    feats, n_valid = pad_batch([x0, x1])
    seeds = [max(i for i, a in enumerate(d0) if a == 2), max(i for i, a in enumerate(d1) if a == 5)]
    attn = torch.rand(2, feats.shape[1], generator=torch.Generator().manual_seed(0)) * 0.5
    attn[0, seeds[0]], attn[1, seeds[1]] = 0.9, 0.9
    attn[0, 3 if seeds[0] != 3 else 4] = float("nan")  # NaN counts as lowest
    attn[1, feats.shape[1] - 1] = 5.0  # a padding position: never the seed
    assert n_valid[1] < feats.shape[1]
    scorer = build_scorer("kcenter")
    s = signals(feats, n_valid, info=info, attn=attn)
    assert scorer.seed(s).tolist() == seeds
    sel = scorer.select(s, torch.tensor([8, 6]))
    assert rows(sel.indices) == [sorted(expected_order(d0, seeds[0])), sorted(expected_order(d1, seeds[1])[:6])]
    assert torch.equal(sel.indices, maxmin_select_ref(feats, torch.tensor([8, 6]), n_valid, torch.tensor(seeds)))


def test_kcenter_seed_ties_and_layer():
    feats = torch.randn(2, 6, 4, generator=torch.Generator().manual_seed(1))
    attn = torch.tensor([[0.5] * 6, [float("nan"), 0.2, 0.7, 0.7, 0.1, 0.7]])
    scorer = build_scorer("kcenter", layer=-3)  # layer 21 of 24
    s = signals(feats, torch.tensor([6, 6]), attn=attn, layer=21)
    assert scorer.seed(s).tolist() == [0, 2]  # ties: lower index
    with pytest.raises(ValueError, match="cls_attn of layer 22"):
        build_scorer("kcenter").select(s, torch.tensor([2, 2]))


def test_k_zero_empty_rows_and_empty_batch():
    feats = torch.randn(2, 5, 3, generator=torch.Generator().manual_seed(2))
    attn = torch.rand(2, 5, generator=torch.Generator().manual_seed(3))
    for name in ("divprune", "kcenter"):
        sc = build_scorer(name)
        assert sc.select(signals(feats, torch.tensor([5, 0]), attn=attn), torch.tensor([0, 3])).indices.shape == (2, 0)
        got = sc.select(signals(feats, torch.tensor([5, 0]), attn=attn), torch.tensor([5, 3])).indices
        assert got.tolist() == [[0, 1, 2, 3, 4], [-1] * 5]
        empty = signals(torch.zeros(0, 5, 3), torch.zeros(0, dtype=torch.long), attn=torch.zeros(0, 5))
        assert sc.select(empty, torch.zeros(0, dtype=torch.long)).indices.shape == (0, 0)


def test_scorers_triton_path_matches_torch(monkeypatch):
    """Run by test_kernels' interpreter subprocess (TRITON_INTERPRET=1 from the start)."""
    import triton.language as tl

    if type(tl.sum).__name__ != "InterpretedFunction":
        pytest.skip("runs in test_kernels.py::test_interpreter_checks_in_fresh_process")
    import vlmprune.kernels.maxmin_triton as mt

    monkeypatch.setattr(mt, "maxmin_select_ref", lambda *a, **k: pytest.fail("fell back to the reference"))
    g = torch.Generator().manual_seed(4)
    feats = torch.randn(3, 20, 8, generator=g).sign()  # many exact ties
    n_valid, k = torch.tensor([20, 11, 16]), torch.tensor([7, 11, 3])
    attn = torch.rand(3, 20, generator=g)
    for name in ("divprune", "kcenter"):
        s = signals(feats, n_valid, attn=attn)
        monkeypatch.setenv("VLMPRUNE_KERNELS", "torch")
        want = build_scorer(name).select(s, k).indices
        monkeypatch.setenv("VLMPRUNE_KERNELS", "triton")
        assert torch.equal(build_scorer(name).select(s, k).indices, want), name


def test_tiny_llava_end_to_end():
    """Through the public API: the kept tokens are the max-min picks of the image features, and
    kcenter starts from the token `cls` ranks first."""
    import vlmprune
    from tests.conftest import N_VIS, pixels, prompt, tiny_llava

    model = tiny_llava()
    ids, pv = torch.tensor([prompt(2, seed=1)]), pixels(2, seed=1)
    with torch.no_grad():
        feats = list(model.model.get_image_features(pixel_values=pv, return_dict=True).pooler_output)
        stacked = torch.stack(feats)
        vlmprune.patch(model, method="divprune", keep=5)
        model(input_ids=ids, pixel_values=pv)
        got = vlmprune.last_selection(model)[0]
        want = maxmin_select_ref(stacked, torch.tensor([5, 5]))
        assert [g.tolist() for g in got] == want.tolist()
        vlmprune.patch(model, method="cls", keep=1)
        model(input_ids=ids, pixel_values=pv)
        top = torch.cat(vlmprune.last_selection(model)[0])
        vlmprune.patch(model, method="kcenter", prune_ratio=0.5)
        logits = model(input_ids=ids, pixel_values=pv).logits
        got = vlmprune.last_selection(model)[0]
    want = maxmin_select_ref(stacked, torch.tensor([N_VIS // 2] * 2), first=top)
    assert [g.tolist() for g in got] == want.tolist()
    assert all(int(t) in g.tolist() for t, g in zip(top, got))
    assert logits.shape[1] == ids.shape[1] - 2 * (N_VIS - N_VIS // 2)
    vlmprune.unpatch(model)
