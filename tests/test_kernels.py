"""Kernels of DESIGN §4 against oracles: `select_tokens` and `maxmin_select` references against
plain Python loops, hand-made inputs with known answers, and the Triton kernels (run on CPU by
the Triton interpreter) against the references, bit for bit."""

from __future__ import annotations

import importlib
import math
import os
import re
import subprocess
import sys
from pathlib import Path

# The Triton interpreter must be chosen before Triton is imported. When Triton is already loaded
# (pytest's conftest imports transformers, which imports it through torch._dynamo), the Triton
# tests of this file skip here and `test_interpreter_checks_in_fresh_process` runs them in a fresh
# process with TRITON_INTERPRET=1. Run alone (`TRITON_INTERPRET=1 pytest ...`) they run here.
if "triton" not in sys.modules:
    os.environ["TRITON_INTERPRET"] = "1"

import pytest
import torch
import triton.language as tl

from tests.circle import circle
from vlmprune.kernels import flow as fl
from vlmprune.kernels import hiprune as hp
from vlmprune.kernels import maxmin as mm
from vlmprune.kernels import (
    maxmin_naive_ref,
    maxmin_select,
    maxmin_select_ref,
    select_tokens,
    select_tokens_ref,
)
from vlmprune.kernels import merge as mg

INTERPRETED = type(tl.sum).__name__ == "InterpretedFunction"
interpreted = pytest.mark.skipif(
    not INTERPRETED, reason="runs in test_interpreter_checks_in_fresh_process"
)
REPO = Path(__file__).resolve().parents[1]


def run_interpreted(test_files: list[str], expect_at_least: int) -> None:
    """Run the tests of `test_files` whose names contain 'triton' in a fresh interpreter-mode
    process; fail with its output unless they all pass."""
    env = {k: v for k, v in os.environ.items() if k != "VLMPRUNE_KERNELS"}
    env["TRITON_INTERPRET"] = "1"
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
    cmd = [
        sys.executable,
        "-m",
        "pytest",
        *test_files,
        "-p",
        "no:cacheprovider",
        "--noconftest",
        "-k",
        "triton",
    ]
    res = subprocess.run(
        cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600, check=False
    )
    out = res.stdout[-6000:] + res.stderr[-3000:]
    assert res.returncode == 0, out
    passed = re.search(r"(\d+) passed", res.stdout)
    assert (
        passed
        and int(passed.group(1)) >= expect_at_least
        and "skipped" not in res.stdout
    ), out


def _interpreted(name: str):
    """The Triton module with interpreted kernels (re-imported if it was first loaded without)."""
    mod = importlib.import_module(name)
    if not mod.can_launch(torch.zeros(1)):
        mod = importlib.reload(mod)
    assert mod.can_launch(torch.zeros(1))
    return mod


st = _interpreted("vlmprune.kernels.select_triton") if INTERPRETED else None
mt = _interpreted("vlmprune.kernels.maxmin_triton") if INTERPRETED else None
ft = _interpreted("vlmprune.kernels.flow_triton") if INTERPRETED else None
ht = _interpreted("vlmprune.kernels.hiprune_triton") if INTERPRETED else None
gt = _interpreted("vlmprune.kernels.merge_triton") if INTERPRETED else None
rt = _interpreted("vlmprune.kernels.rows_triton") if INTERPRETED else None


@pytest.mark.skipif(INTERPRETED, reason="the Triton tests run in this process")
def test_interpreter_checks_in_fresh_process():
    """This file's Triton tests and test_diversity.py's, in a fresh TRITON_INTERPRET=1 process."""
    here = Path(__file__).resolve()
    run_interpreted(
        [str(here), str(here.with_name("test_diversity.py"))], expect_at_least=86
    )


@pytest.fixture
def no_fallback(monkeypatch):
    """Make any fallback of the Triton wrappers to the torch reference an error."""

    def boom(*a, **k):
        raise AssertionError("the Triton wrapper fell back to the torch reference")

    monkeypatch.setattr(st, "select_tokens_ref", boom)
    monkeypatch.setattr(mt, "maxmin_select_ref", boom)
    monkeypatch.setattr(ft, "flowcut_select_ref", boom)
    monkeypatch.setattr(ht, "hiprune_select_ref", boom)
    monkeypatch.setattr(gt, "visionzip_merge_ref", boom)
    monkeypatch.setattr(rt, "attention_rows_ref", boom)


# ---------------------------------------------------------------------------------------------
# select_tokens


def loop_select(scores: torch.Tensor, feats, k: torch.Tensor, valid):
    """Plain-Python oracle: per row, sort the valid positions by (score desc, index asc) with NaN
    read as -inf, keep the first k, return them ascending; gather rows by hand."""
    b, n = scores.shape
    valid = [n] * b if valid is None else [min(int(v), n) for v in valid]
    picks = []
    for r in range(b):
        vals = [float(x) for x in scores[r].float()]
        vals = [-math.inf if math.isnan(x) else x for x in vals]
        ranked = sorted(range(valid[r]), key=lambda i: (-vals[i], i))
        picks.append(sorted(ranked[: min(int(k[r]), valid[r])]))
    kmax = max((len(p) for p in picks), default=0)
    idx = torch.full((b, kmax), -1, dtype=torch.long)
    for r, p in enumerate(picks):
        idx[r, : len(p)] = torch.tensor(p, dtype=torch.long)
    if feats is None:
        return idx, None
    out = torch.zeros((b, kmax, feats.shape[2]), dtype=feats.dtype)
    for r, p in enumerate(picks):
        for j, i in enumerate(p):
            out[r, j] = feats[r, i]
    return idx, out


SPECIAL = [float("nan"), -0.0, 0.0, float("inf"), float("-inf"), 1e-40, -1e-40, 3.0]


def ragged_case(
    seed: int,
    b: int = 4,
    n_max: int = 40,
    d: int = 8,
    dtype=torch.float32,
    ties: bool = True,
):
    """Scores with ties (integer values), NaN, +-0, +-inf and subnormals; k in {0, valid, > valid,
    random}; valid in [0, N]."""
    g = torch.Generator().manual_seed(seed)
    n = int(torch.randint(1, n_max + 1, (1,), generator=g))
    if ties:
        scores = torch.randint(-3, 4, (b, n), generator=g).float()
    else:
        scores = torch.randn(b, n, generator=g)
    special = torch.tensor(SPECIAL)
    hit = torch.rand(b, n, generator=g) < 0.2
    scores[hit] = special[
        torch.randint(0, len(SPECIAL), (int(hit.sum()),), generator=g)
    ]
    valid = torch.randint(0, n + 1, (b,), generator=g)
    valid[0] = n
    k = torch.randint(0, n + 1, (b,), generator=g)
    k[0] = 0
    if b > 1:
        k[1] = valid[1]
    if b > 2:
        k[2] = valid[2] + 3
    feats = torch.randn(b, n, d, generator=g).to(dtype)
    return scores, feats, k, valid


@pytest.mark.parametrize("seed", range(6))
def test_select_ref_matches_python_loop(seed):
    scores, feats, k, valid = ragged_case(seed, ties=seed % 2 == 0)
    idx, out = select_tokens_ref(scores, feats, k, valid)
    exp_idx, exp_out = loop_select(scores, feats, k, valid)
    assert torch.equal(idx, exp_idx)
    assert torch.equal(out, exp_out)


def test_select_ref_known_answers():
    nan = float("nan")
    scores = torch.tensor(
        [
            [1.0, 3.0, 3.0, 2.0, 3.0, 0.0],  # ties at the threshold: lower indices win
            [nan, -1.0, nan, -0.0, 0.0, 5.0],  # NaN lowest; -0 == +0 -> index order
            [9.0, 9.0, 9.0, 9.0, 9.0, 9.0],  # valid = 3: positions 3..5 never chosen
        ]
    )
    idx, _ = select_tokens_ref(
        scores, None, torch.tensor([2, 4, 5]), torch.tensor([6, 6, 3])
    )
    assert idx.tolist() == [[1, 2, -1, -1], [1, 3, 4, 5], [0, 1, 2, -1]]


@interpreted
@pytest.mark.parametrize("seed", range(8))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_select_triton_matches_ref(seed, dtype, no_fallback):
    scores, feats, k, valid = ragged_case(100 + seed, dtype=dtype, ties=seed % 2 == 0)
    idx, out = st.select_tokens_triton(scores, feats, k, valid)
    exp_idx, exp_out = select_tokens_ref(scores, feats, k, valid)
    assert idx.dtype == torch.long and out.dtype == dtype
    assert torch.equal(idx, exp_idx)
    assert torch.equal(out, exp_out)
    assert torch.equal(idx, loop_select(scores, feats, k, valid)[0])


@interpreted
def test_select_triton_edge_cases(no_fallback):
    g = torch.Generator().manual_seed(7)
    # all k = 0: empty results of the right shapes
    s = torch.randn(3, 10, generator=g)
    f = torch.randn(3, 10, 4, generator=g).half()
    idx, out = st.select_tokens_triton(s, f, torch.zeros(3, dtype=torch.long), None)
    assert idx.shape == (3, 0) and out.shape == (3, 0, 4) and out.dtype == torch.float16
    # feats None, all-NaN row, all-equal row, valid = 0 row, fp16 scores, no valid given
    s = torch.randn(4, 33, generator=g)
    s[0] = float("nan")
    s[1] = 2.5
    k = torch.tensor([5, 7, 4, 40])
    for valid in (None, torch.tensor([33, 20, 0, 31])):
        idx, out = st.select_tokens_triton(s.half(), None, k, valid)
        assert out is None
        assert torch.equal(idx, select_tokens_ref(s.half(), None, k, valid)[0])
    idx, _ = st.select_tokens_triton(s, None, k, torch.tensor([33, 20, 0, 31]))
    assert idx[0, :5].tolist() == [0, 1, 2, 3, 4] and idx[1, :7].tolist() == list(
        range(7)
    )
    assert (
        (idx[2] == -1).all()
        and idx[3, :31].tolist() == list(range(31))
        and (idx[3, 31:] == -1).all()
    )
    # a strided (non-contiguous) feature view gathers the same rows
    base = torch.randn(2, 6, 17, generator=g)
    f = base.transpose(1, 2)  # [2, 17, 6], strides (102, 1, 17)
    s = torch.randn(2, 17, generator=g)
    k = torch.tensor([3, 17])
    idx, out = st.select_tokens_triton(s, f, k, None)
    exp_idx, exp_out = select_tokens_ref(s, f, k, None)
    assert torch.equal(idx, exp_idx) and torch.equal(out, exp_out)


@interpreted
def test_select_triton_long_row(no_fallback):
    """A row long enough for a multi-warp program (any-res sizes use the same code)."""
    g = torch.Generator().manual_seed(3)
    s = torch.randint(0, 50, (2, 700), generator=g).float()
    f = torch.randn(2, 700, 3, generator=g).bfloat16()
    k, valid = torch.tensor([64, 200]), torch.tensor([700, 650])
    idx, out = st.select_tokens_triton(s, f, k, valid)
    exp_idx, exp_out = select_tokens_ref(s, f, k, valid)
    assert torch.equal(idx, exp_idx) and torch.equal(out, exp_out)


@interpreted
@pytest.mark.parametrize(
    "n", [300, 2100]
)  # 4-bit digits (8 passes); 2-bit digits past 2048 tokens
def test_select_triton_radix_digits(n, no_fallback):
    """Scores that differ only in their last bits (a few ulps apart, ties included), of both signs
    and around zero: the k-th largest key is found digit by digit down to the lowest."""
    g = torch.Generator().manual_seed(n)
    ulps = torch.randint(0, 40, (4, n), generator=g, dtype=torch.int32)
    base = torch.tensor([1.0, -3.0, 2.0**-130, 1e30]).view(
        torch.int32
    )  # normal, negative, subnormal, large
    s = (base[:, None] + ulps).view(torch.float32)
    s[2, ::7] = -s[2, ::7]  # subnormals of both signs
    k, valid = torch.tensor([1, n // 3, n - 5, n]), torch.tensor([n, n - 1, n, n // 2])
    idx, _ = st.select_tokens_triton(s, None, k, valid)
    assert torch.equal(idx, select_tokens_ref(s, None, k, valid)[0])
    assert torch.equal(idx, loop_select(s, None, k, valid)[0])


@interpreted
def test_select_dispatcher_triton(monkeypatch):
    args = ragged_case(5)
    check_dispatcher(
        monkeypatch,
        st,
        "select_tokens_triton",
        select_tokens,
        args,
        select_tokens_ref(*args),
    )


def check_dispatcher(monkeypatch, module, name, dispatcher, args, expected):
    """VLMPRUNE_KERNELS=torch does not call the Triton function, =triton calls it, auto on CPU
    tensors does not (the call count stays at 1); every mode returns the reference's exact answer."""
    calls = []
    real = getattr(module, name)
    monkeypatch.setattr(
        module, name, lambda *a, **kw: calls.append(1) or real(*a, **kw)
    )
    want = expected if isinstance(expected, tuple) else (expected,)
    for mode, n_calls in (("torch", 0), ("triton", 1), ("auto", 1)):
        monkeypatch.setenv("VLMPRUNE_KERNELS", mode)
        got = dispatcher(*args)
        got = got if isinstance(got, tuple) else (got,)
        assert len(got) == len(want) and all(
            torch.equal(g, w) for g, w in zip(got, want)
        ), mode
        assert len(calls) == n_calls, mode


# ---------------------------------------------------------------------------------------------
# maxmin_select


def loop_maxmin(x: torch.Tensor, k: int, valid: int, first: int | None = None):
    """Plain-Python oracle on the full float64 distance matrix of one image: returns the picks in
    selection order and the smallest non-zero gap between the best and second-best candidate
    (exact ties, such as two mutual nearest neighbours for the first pick, go to the lower index)."""
    rows = [[float(v) for v in x[i].double()] for i in range(valid)]
    norms = [math.sqrt(sum(v * v for v in r)) for r in rows]
    d = [
        [
            1.0 - sum(a * b for a, b in zip(ri, rj)) / (ni * nj)
            for rj, nj in zip(rows, norms)
        ]
        for ri, ni in zip(rows, norms)
    ]
    gap = math.inf

    def best(values: dict[int, float]) -> int:
        nonlocal gap
        ranked = sorted(values.items(), key=lambda kv: (-kv[1], kv[0]))
        if len(ranked) > 1 and ranked[0][1] != ranked[1][1]:
            gap = min(gap, ranked[0][1] - ranked[1][1])
        return ranked[0][0]

    if k == 0:
        return [], gap
    if first is None:
        first = best(
            {
                i: min((d[i][j] for j in range(valid) if j != i), default=math.inf)
                for i in range(valid)
            }
        )
    picks = [first]
    while len(picks) < k:
        picks.append(
            best(
                {i: min(d[s][i] for s in picks) for i in range(valid) if i not in picks}
            )
        )
    return picks, gap


@pytest.mark.parametrize("seed", range(4))
def test_maxmin_ref_matches_python_loop(seed):
    g = torch.Generator().manual_seed(seed)
    n, dim = 24, 16
    x = torch.randn(2, n, dim, generator=g)
    valid = torch.tensor([n, n - 5])
    first = torch.tensor([int(torch.randint(0, n, (1,), generator=g)), 3])
    for k in (1, 7, n - 1, n):
        kk = torch.tensor([k, k])
        for fst in (None, first):
            idx, order = maxmin_select_ref(x, kk, valid, fst, return_order=True)
            for b in range(2):
                v = int(valid[b])
                exp, gap = loop_maxmin(
                    x[b], min(k, v), v, None if fst is None else int(fst[b])
                )
                assert gap > 1e-5  # no float32-vs-float64 near ties in this data
                got = order[b][order[b] >= 0].tolist()
                assert got == exp, (k, b, fst)
                assert idx[b][idx[b] >= 0].tolist() == sorted(exp)
                assert (idx[b][len(exp) :] == -1).all() and (
                    order[b][len(exp) :] == -1
                ).all()


def test_cosine_distance_matches_float64():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 9, 12, generator=g).bfloat16()
    x[1, 4] = 0  # zero vector: distance 1 to everything
    d = mm.cosine_distance(x)
    xd = x.double()
    nd = xd / xd.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    exp = 1 - nd @ nd.transpose(1, 2)
    assert d.dtype == torch.float32 and torch.allclose(d.double(), exp, atol=1e-6)
    assert torch.equal(d[1, 4], torch.ones(9)) and torch.equal(
        d[1, :, 4], torch.ones(9)
    )


def circle_expected(dirs: list[int], first_dir: int) -> list[int]:
    """The first 8 picks, derived by hand: from a start direction a, the opposite one (d = 2),
    then the two at 90 degrees (d = 1, a tie: lower index first), then the four diagonals (each
    at 1 - cos 45 from its nearest pick, a tie: by lowest index); every direction is represented
    by its lowest-index token."""
    low = {a: min(i for i, x in enumerate(dirs) if x == a) for a in set(dirs)}
    a = first_dir
    quarter = sorted([low[(a + 2) % 8], low[(a + 6) % 8]])
    diag = sorted(low[(a + o) % 8] for o in (1, 3, 5, 7))
    return [low[a], low[(a + 4) % 8], *quarter, *diag]


@pytest.mark.parametrize("seed", range(3))
def test_maxmin_circle_divprune_known_answer(seed):
    copies = [
        1,
        3,
        2,
        3,
        2,
        2,
        3,
        2,
    ]  # direction 0 alone: the only token with no twin -> first
    x, dirs = circle(copies, seed)
    n = len(dirs)
    exp = circle_expected(dirs, 0)
    idx, order = maxmin_select_ref(x[None], torch.tensor([n]), return_order=True)
    order = order[0].tolist()
    assert order[:8] == exp
    # no duplicate before all 8 directions are taken; afterwards only duplicates remain
    assert sorted(dirs[i] for i in order[:8]) == list(range(8))
    assert idx[0].tolist() == list(range(n))
    idx8 = maxmin_select_ref(x[None], torch.tensor([8]))
    assert idx8[0].tolist() == sorted(exp)
    assert torch.equal(maxmin_naive_ref(x[None], torch.tensor([8])), idx8)


def test_maxmin_circle_kcenter_known_answer():
    x, dirs = circle([2, 3, 2, 2, 3, 2, 2, 2], seed=4)
    start = max(
        i for i, a in enumerate(dirs) if a == 2
    )  # a duplicate, not the lowest index
    _, order = maxmin_select_ref(
        x[None], torch.tensor([8]), first=torch.tensor([start]), return_order=True
    )
    exp = circle_expected(dirs, 2)
    assert order[0].tolist() == [start, *exp[1:]]


def test_maxmin_valid_padding_and_batch_invariance():
    x, dirs = circle([1, 2, 2, 2, 2, 2, 2, 2], seed=1)
    n = len(dirs)
    junk = torch.full((5, x.shape[1]), 7.0)  # padding that would be far from everything
    junk[:, 0] = -100.0
    batch = torch.stack(
        [torch.cat([x, junk]), torch.cat([x[:9], torch.zeros(n + 5 - 9, x.shape[1])])]
    )
    idx = maxmin_select_ref(batch, torch.tensor([10, 30]), torch.tensor([n, 9]))
    assert idx.shape == (2, 10)
    assert (
        (idx[0] < n).all()
        and (idx[1][idx[1] >= 0] < 9).all()
        and (idx[1, 9:] == -1).all()
    )
    assert torch.equal(idx[0], maxmin_select_ref(x[None], torch.tensor([10]))[0])
    assert torch.equal(idx[1, :9], torch.arange(9))


def test_maxmin_errors():
    x = torch.randn(2, 5, 3)
    with pytest.raises(ValueError, match="first"):
        maxmin_select_ref(
            x, torch.tensor([2, 2]), torch.tensor([5, 3]), first=torch.tensor([0, 3])
        )
    with pytest.raises(ValueError, match=r"\[-1, 2\]"):
        maxmin_select_ref(x, torch.tensor([-1, 2]))
    with pytest.raises(ValueError, match="B, N, D"):
        maxmin_select_ref(x[0], torch.tensor([1]))
    # k = 0 rows accept any first; empty batches give [0, 0]
    assert maxmin_select_ref(
        x, torch.tensor([0, 0]), first=torch.tensor([9, 9])
    ).shape == (2, 0)
    assert maxmin_select_ref(
        torch.zeros(0, 5, 3), torch.zeros(0, dtype=torch.long)
    ).shape == (0, 0)


def maxmin_case(
    seed: int, b: int = 3, n_max: int = 40, d: int = 6, dtype=torch.float32
):
    g = torch.Generator().manual_seed(seed)
    n = int(torch.randint(2, n_max + 1, (1,), generator=g))
    x = torch.randn(b, n, d, generator=g)
    if seed % 2:  # coarse values: many exact duplicates and distance ties
        x = x.sign()
    valid = torch.randint(0, n + 1, (b,), generator=g)
    valid[0] = n
    k = torch.randint(0, n + 1, (b,), generator=g)
    k[0] = n
    if b > 1:
        k[1] = valid[1] + 2
    if b > 2:
        k[2] = 0 if seed % 3 == 0 else 1
    first = (torch.rand(b, generator=g) * valid.clamp(min=1)).long()
    return x.to(dtype), k, valid, first


@interpreted
@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("seeded", [False, True])
def test_maxmin_triton_matches_ref(seed, seeded, no_fallback):
    x, k, valid, first = maxmin_case(
        seed, dtype=torch.bfloat16 if seed % 3 == 1 else torch.float32
    )
    fst = first if seeded else None
    idx, order = mt.maxmin_select_triton(x, k, valid, fst, return_order=True)
    exp_idx, exp_order = mm.maxmin_select_ref(x, k, valid, fst, return_order=True)
    assert torch.equal(idx, exp_idx) and torch.equal(order, exp_order)
    assert torch.equal(idx, maxmin_naive_ref(x, k, valid, fst))


@interpreted
def test_maxmin_triton_circle_and_edges(no_fallback):
    x, dirs = circle([1, 3, 2, 3, 2, 2, 3, 2], seed=2)
    _, order = mt.maxmin_select_triton(x[None], torch.tensor([8]), return_order=True)
    assert order[0].tolist() == circle_expected(dirs, 0)
    # all k = 0, a single valid token, valid = 0
    assert mt.maxmin_select_triton(x[None], torch.tensor([0])).shape == (1, 0)
    x2 = torch.randn(3, 7, 4, generator=torch.Generator().manual_seed(1))
    k, valid = torch.tensor([3, 3, 2]), torch.tensor([1, 0, 7])
    for fst in (None, torch.tensor([0, 0, 6])):
        got = mt.maxmin_select_triton(x2, k, valid, fst, return_order=True)
        exp = mm.maxmin_select_ref(x2, k, valid, fst, return_order=True)
        assert torch.equal(got[0], exp[0]) and torch.equal(got[1], exp[1])
        assert got[0][0].tolist() == [0, -1] and got[0][1].tolist() == [-1, -1]


@interpreted
def test_maxmin_triton_long_row(no_fallback):
    g = torch.Generator().manual_seed(11)
    x = torch.randn(1, 600, 8, generator=g).bfloat16()
    k = torch.tensor([24])
    assert torch.equal(mt.maxmin_select_triton(x, k), mm.maxmin_select_ref(x, k))


@interpreted
def test_maxmin_dispatcher_triton(monkeypatch):
    args = maxmin_case(3)
    check_dispatcher(
        monkeypatch,
        mt,
        "maxmin_select_triton",
        maxmin_select,
        args,
        maxmin_select_ref(*args),
    )


# ---------------------------------------------------------------------------------------------
# flowcut_select


def flow_case(seed: int):
    """Per-layer signals of a ragged batch (one image with no valid token, one with fewer than k),
    skewed like attention; cut patterns of prune_every 1 / 2 / 3; optional terms; a NaN."""
    g = torch.Generator().manual_seed(seed)
    n_layers, b, n = 3 + seed % 5, 4, [7, 40, 300][seed % 3]
    attn = torch.rand(n_layers, b, n, generator=g) ** 4
    sem = torch.rand(n_layers, b, n, generator=g) if seed % 4 != 1 else None
    dens = torch.rand(n_layers, b, n, generator=g) * 3 if seed % 4 != 2 else None
    if seed % 2:
        attn[0, 0, 1] = float("nan")
    valid = torch.tensor([n, n // 2 + 1, 0, n])
    k = torch.tensor([1, n, 2, max(1, n // 5)])
    every = 1 + seed % 3
    rpl = tuple(
        n_layers - 1 - j if (n_layers - 1 - j) % every == 0 else None
        for j in range(n_layers)
    )
    weights = (1.0, 1.0, 0.5) if seed % 3 else (0.7, 1.9, 0.3)
    return attn, sem, dens, k, valid, fl.FlowSchedule(rpl, *weights)


@interpreted
@pytest.mark.parametrize("seed", range(8))
def test_flowcut_triton_matches_ref(seed, no_fallback):
    case = flow_case(seed)
    got = ft.flowcut_select_triton(*case)
    exp = fl.flowcut_select_ref(*case)
    assert torch.equal(got, exp), (got, exp)
    k, valid = case[3], case[4]
    assert [int((r >= 0).sum()) for r in got] == torch.minimum(k, valid).tolist()


@interpreted
def test_flowcut_dispatcher_triton(monkeypatch):
    case = flow_case(2)
    check_dispatcher(
        monkeypatch,
        ft,
        "flowcut_select_triton",
        fl.flowcut_select,
        case,
        fl.flowcut_select_ref(*case),
    )


def test_flowcut_ref_errors():
    attn = torch.rand(3, 2, 5)
    k, valid = torch.tensor([1, 2]), torch.tensor([5, 5])
    with pytest.raises(ValueError, match="rpl"):
        fl.flowcut_select_ref(
            attn, None, None, k, valid, fl.FlowSchedule((None, 1, None))
        )
    with pytest.raises(ValueError, match="sem"):
        fl.flowcut_select_ref(
            attn, torch.rand(3, 2, 4), None, k, valid, fl.FlowSchedule((None, None, 0))
        )


# ---------------------------------------------------------------------------------------------
# hiprune_select


def hiprune_case(seed: int):
    """Object / register attention with ties and a NaN on grids of several shapes; images with
    no valid token, fewer valid tokens than the grid, k = 0, k = valid (kept whole), and slot
    shares from none to all of k (anchors whose buffers overlap, fall off the grid or run out)."""
    g = torch.Generator().manual_seed(seed)
    h, w = [(4, 5), (1, 7), (6, 6), (24, 24), (3, 1)][seed % 5]
    n, b = h * w, 5
    obj = (
        torch.randint(0, 4, (b, n), generator=g).float()
        if seed % 2
        else torch.rand(b, n, generator=g)
    )
    reg = (
        torch.randint(0, 3, (b, n), generator=g).float()
        if seed % 3
        else torch.rand(b, n, generator=g)
    )
    obj[0, 0] = float("nan")
    counts = [n, int(torch.randint(0, n + 1, (1,), generator=g)), 0, n, n]
    ks = [
        min(c, int(x))
        for c, x in zip(counts, torch.randint(0, n + 1, (b,), generator=g))
    ]
    ks[3], ks[4] = n, min(n, 1 + seed)
    alpha = [0.1, 0.5, 1.0, 0.3][seed % 4]
    slots = [min(k, math.floor(alpha * k + 0.5)) for k in ks]
    return obj, reg, ks, counts, slots, (h, w)


def loop_hiprune(obj, reg, ks, counts, slots, grid):
    """Plain-Python oracle of DESIGN's hiprune rule, image by image."""
    h, w = grid
    out = []
    for i, (k, nv, m) in enumerate(zip(ks, counts, slots)):
        if k >= nv:
            out.append(list(range(nv)))
            continue

        def by(x, i=i, nv=nv):  # this image's ranking
            vals = [-math.inf if math.isnan(float(v)) else float(v) for v in x[i]]
            return sorted(range(nv), key=lambda j: (-vals[j], j))  # noqa: B023 (vals is this call's)

        anchors = by(obj)[: math.ceil(m / 5)]
        chosen = list(anchors)
        for a in anchors:
            r, c = divmod(a, w)
            for dr, dc in hp.NEIGHBOURS:
                t = (r + dr) * w + c + dc
                if (
                    len(chosen) < m
                    and 0 <= r + dr < h
                    and 0 <= c + dc < w
                    and t < nv
                    and t not in chosen
                ):
                    chosen.append(t)
        chosen += [j for j in by(reg) if j not in chosen][: k - len(chosen)]
        out.append(sorted(chosen))
    idx = torch.full((len(ks), max(ks, default=0)), -1, dtype=torch.long)
    for i, p in enumerate(out):
        idx[i, : len(p)] = torch.tensor(p, dtype=torch.long)
    return idx


@pytest.mark.parametrize("seed", range(10))
def test_hiprune_ref_matches_python_loop(seed):
    case = hiprune_case(seed)
    assert torch.equal(hp.hiprune_select_ref(*case), loop_hiprune(*case))


@interpreted
@pytest.mark.parametrize("seed", range(10))
def test_hiprune_triton_matches_ref(seed, no_fallback):
    case = hiprune_case(seed)
    got = ht.hiprune_select_triton(*case)
    assert torch.equal(got, hp.hiprune_select_ref(*case)), (got, case[2:])


@interpreted
def test_hiprune_dispatcher_triton(monkeypatch):
    case = hiprune_case(3)
    check_dispatcher(
        monkeypatch,
        ht,
        "hiprune_select_triton",
        hp.hiprune_select,
        case,
        hp.hiprune_select_ref(*case),
    )


def test_hiprune_ref_errors():
    obj = torch.rand(2, 6)
    with pytest.raises(ValueError, match="grid 2x2"):
        hp.hiprune_select_ref(obj, obj, [1, 1], [6, 6], [0, 0], (2, 2))
    with pytest.raises(ValueError, match=r"\(k, count, slots\) = \[\(3, 6, 4\)\]"):
        hp.hiprune_select_ref(obj, obj, [1, 3], [6, 6], [0, 4], (2, 3))


# ---------------------------------------------------------------------------------------------
# visionzip_merge


def visionzip_case(seed: int, dtype=torch.float32):
    """G images sharing (nv, ki): attention with ties and a NaN, metric rows with duplicates (ties
    in the similarity), nv below N, contextual shares from one token to all of ki."""
    g = torch.Generator().manual_seed(seed)
    n, d = [(12, 8), (40, 24), (576, 64)][seed % 3]
    b = 3
    attn = (
        torch.randint(0, 5, (b, n), generator=g).float()
        if seed % 2
        else torch.rand(b, n, generator=g)
    )
    attn[0, 2] = float("nan")
    metric = torch.randn(
        b, n, 40, generator=g
    )  # wider than one block of the assignment kernel
    metric[:, 1::3] = metric[
        :, 0:1
    ]  # duplicates: equal similarities, the lower target wins
    feats = (torch.randn(b, n, d, generator=g) * 3).to(dtype)
    nv = n - seed % 4
    ki = [1, 5, nv // 3, nv - 1][seed % 4]
    n_ctx = [1, max(1, ki // 2), ki, max(1, ki // 7)][(seed // 4) % 4]
    return attn, metric, feats, nv, ki, ki - n_ctx, n_ctx


def check_merge(got, exp):
    """Indices exactly; features to float32 rounding (members summed in another order)."""
    assert torch.equal(got[0], exp[0]), (got[0], exp[0])
    assert got[1].dtype == exp[1].dtype
    tol = 1e-6 if exp[1].dtype == torch.float32 else 1e-2
    torch.testing.assert_close(got[1].float(), exp[1].float(), rtol=tol, atol=tol)


@interpreted
@pytest.mark.parametrize("seed", range(12))
def test_visionzip_triton_matches_ref(seed, no_fallback):
    case = visionzip_case(seed, torch.bfloat16 if seed % 5 == 4 else torch.float32)
    got = gt.visionzip_merge_triton(*case)
    exp = mg.visionzip_merge_ref(*case)
    check_merge(got, exp)
    # the dominant tokens (the top n_dom by attention) are plain copies: bit-identical to their features
    attn, metric, feats, nv, _, n_dom, _ = case
    dom = mg.visionzip_merge_ref(attn, metric, feats, nv, n_dom, n_dom, 0)[0]
    for i in range(attn.shape[0]):
        slots = [
            j for j, t in enumerate(got[0][i].tolist()) if t in set(dom[i].tolist())
        ]
        assert len(slots) == n_dom
        assert torch.equal(got[1][i, slots], feats[i, got[0][i, slots]])


@interpreted
def test_visionzip_triton_ties_across_target_blocks(no_fallback):
    """140 targets (three blocks of the assignment kernel); the 10 other tokens equal targets 5, 70
    and 130 exactly: all must join target 5 (the lowest), and its merged feature is the mean of 11."""
    g = torch.Generator().manual_seed(0)
    n = 160
    attn = torch.zeros(2, n)
    attn[:, 150:] = (
        1.0  # dominant: 150..159; remaining 0..149, targets 0..139, others 140..149
    )
    metric = torch.randn(2, n, 24, generator=g)
    metric[:, [5, 70, 130, *range(140, 150)]] = torch.randn(2, 1, 24, generator=g)
    feats = torch.randn(2, n, 8, generator=g)
    got = gt.visionzip_merge_triton(attn, metric, feats, n, 150, 10, 140)
    check_merge(got, mg.visionzip_merge_ref(attn, metric, feats, n, 150, 10, 140))
    assert got[0][:, :140].tolist() == [list(range(140))] * 2
    torch.testing.assert_close(
        got[1][:, 5], torch.cat([feats[:, 5:6], feats[:, 140:150]], 1).mean(1)
    )


@interpreted
def test_visionzip_dispatcher_triton(monkeypatch):
    case = visionzip_case(5)
    calls = []
    real = gt.visionzip_merge_triton
    monkeypatch.setattr(
        gt, "visionzip_merge_triton", lambda *a: calls.append(1) or real(*a)
    )
    exp = mg.visionzip_merge_ref(*case)
    for mode, n_calls in (("torch", 0), ("triton", 1), ("auto", 1)):
        monkeypatch.setenv("VLMPRUNE_KERNELS", mode)
        check_merge(mg.visionzip_merge(*case), exp)
        assert len(calls) == n_calls, mode


def test_visionzip_ref_errors():
    attn, metric, feats = torch.rand(2, 6), torch.rand(2, 6, 3), torch.rand(2, 6, 4)
    with pytest.raises(ValueError, match="n_dom=2, n_ctx=3"):
        mg.visionzip_merge_ref(attn, metric, feats, 6, 4, 2, 3)
    with pytest.raises(ValueError, match="must agree"):
        mg.visionzip_merge_ref(attn, metric[:, :5], feats, 6, 4, 2, 2)


# ---------------------------------------------------------------------------------------------
# attention_rows (CLS rows of many layers)


def rows_case(
    seed: int,
    dtype: torch.dtype,
    p: int = 5,
    i: int = 3,
    t: int = 37,
    d: int = 32,
    gain: float = 1.0,
):
    """p layers' query and key tensors [I, T, D] (own tensors, as the projections give them)."""
    g = torch.Generator().manual_seed(seed)
    queries = [torch.randn(i, t, d, generator=g).mul(gain).to(dtype) for _ in range(p)]
    keys = [torch.randn(i, t, d, generator=g).mul(1 + r).to(dtype) for r in range(p)]
    return queries, keys


def loop_rows(queries, keys, heads, scale, scaled):
    """Plain loops: per row, image and head, softmax over tokens of q0 . k_t (float64), head mean."""
    out = torch.zeros(len(keys), *keys[0].shape[:2], dtype=torch.float64)
    hd = keys[0].shape[-1] // heads
    for p, (q, k) in enumerate(zip(queries, keys)):
        for i in range(k.shape[0]):
            for h in range(heads):
                qh, kh = (
                    q[i, 0, h * hd : (h + 1) * hd].double(),
                    k[i, :, h * hd : (h + 1) * hd].double(),
                )
                logits = kh @ qh * (scale if p < scaled else 1.0)
                out[p, i] += torch.softmax(logits, 0) / heads
    return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_attention_rows_ref_equals_the_loops(dtype):
    from vlmprune.kernels.rows import attention_rows_ref

    queries, keys = rows_case(0, dtype)
    probs, norms = attention_rows_ref(
        queries, keys, heads=4, scale=0.35, scaled=2, norms_from=3
    )
    # bfloat16: logits up to ~30 here are rounded to steps of 1/8, as SDPA's would be
    tol = (
        {"atol": 1e-6, "rtol": 1e-5}
        if dtype == torch.float32
        else {"atol": 2e-2, "rtol": 0.1}
    )
    torch.testing.assert_close(
        probs.double(), loop_rows(queries, keys, 4, 0.35, 2), **tol
    )
    torch.testing.assert_close(
        norms, torch.stack([k.float().norm(dim=-1) for k in keys[3:]]), **tol
    )


@interpreted
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(
    "seed, heads, scaled, norms_from, t, d, gain",
    [
        (0, 4, 2, 3, 37, 32, 1.0),
        (1, 2, 5, None, 37, 32, 1.0),
        (2, 8, 0, 0, 37, 32, 1.0),
        # several token blocks, heads of 128 channels; logits kept small (|l| < ~4)
        # so that a bfloat16 logit one unit off moves its probability by < 1%
        (5, 2, 1, 1, 100, 256, 0.05),
        (6, 32, 3, 2, 70, 128, 0.5),  # 32 heads of 4 channels each
        (
            7,
            16,
            2,
            1,
            2100,
            64,
            0.5,
        ),  # a [T, H] block too big for one softmax program: torch's softmax
    ],
)
def test_attention_rows_triton_matches_ref(
    seed, heads, scaled, norms_from, t, d, gain, dtype, no_fallback
):
    from vlmprune.kernels.rows import attention_rows_ref

    queries, keys = rows_case(seed, dtype, t=t, d=d, gain=gain)
    got, got_norms = rt.attention_rows_triton(
        queries, keys, heads, 0.35, scaled, norms_from
    )
    exp, exp_norms = attention_rows_ref(queries, keys, heads, 0.35, scaled, norms_from)
    # float32: the dot products are summed in another order; bfloat16: a logit may round to the
    # neighbouring bfloat16 value
    tol = (
        {"atol": 1e-6, "rtol": 1e-5}
        if dtype == torch.float32
        else {"atol": 1e-2, "rtol": 5e-2}
    )
    torch.testing.assert_close(got, exp, **tol)
    assert got.shape == (5, 3, t)
    torch.testing.assert_close(got.sum(-1), torch.ones(5, 3), atol=1e-5, rtol=0)
    if norms_from is None:
        assert got_norms is None and exp_norms is None
    else:
        torch.testing.assert_close(got_norms, exp_norms, atol=1e-5, rtol=1e-5)
        assert got_norms.shape == (5 - norms_from, 3, t)


@interpreted
def test_attention_rows_triton_falls_back_for_mixed_layouts():
    """A key tensor with another layout (a transposed view) goes to the reference, same answer."""
    from vlmprune.kernels.rows import attention_rows_ref

    queries, keys = rows_case(3, torch.float32, p=2)
    keys[1] = keys[1].transpose(0, 1).contiguous().transpose(0, 1)
    got, _ = rt.attention_rows_triton(queries, keys, 4, 0.5, 1)
    exp, _ = attention_rows_ref(queries, keys, 4, 0.5, 1)
    assert torch.equal(got, exp)


@interpreted
def test_attention_rows_dispatcher_triton(monkeypatch):
    from vlmprune.kernels import rows

    queries, keys = rows_case(4, torch.float32, p=3)
    calls = []
    real = rt.attention_rows_triton
    monkeypatch.setattr(
        rt, "attention_rows_triton", lambda *a, **kw: calls.append(1) or real(*a, **kw)
    )
    exp, _ = rows.attention_rows_ref(queries, keys, 4, 0.5, 2)
    for mode, n_calls in (("torch", 0), ("triton", 1), ("auto", 1)):
        monkeypatch.setenv("VLMPRUNE_KERNELS", mode)
        got, _ = rows.attention_rows(queries, keys, 4, 0.5, 2)
        torch.testing.assert_close(got, exp, atol=1e-6, rtol=1e-5)
        assert len(calls) == n_calls, mode


@interpreted
def test_collected_signals_triton_equal_the_eager_attention(monkeypatch, no_fallback):
    """The ViT hooks with the rows kernel (VLMPRUNE_KERNELS=triton): the eager tower's signals."""
    from tests.test_vit_signals import LAYERS, reference, tower
    from vlmprune.adapters import vit
    from vlmprune.adapters.llava import vit_layers
    from vlmprune.scorers import Request

    monkeypatch.setenv("VLMPRUNE_KERNELS", "triton")
    pixels = torch.randn(2, 3, 28, 28, generator=torch.Generator().manual_seed(5))
    every = tuple(range(LAYERS))
    request = Request(cls_attn=every, cls_value_attn=every[1:], value_norms=every[::2])
    model = tower("sdpa")
    with torch.no_grad():
        with vit.collect(vit_layers(model), request) as got:
            model(pixel_values=pixels)
        ref = reference(pixels)
    for name in ("cls_attn", "cls_value_attn", "value_norms"):
        assert sorted(getattr(got, name)) == list(getattr(request, name)), name
        for layer, value in getattr(got, name).items():
            torch.testing.assert_close(
                value,
                ref[name][layer],
                atol=1e-5,
                rtol=1e-4,
                msg=f"{name} layer {layer}",
            )
