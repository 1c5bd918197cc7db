"""Triton implementation of greedy max-min diversity selection (DESIGN §4.3).

Same contract and same answers (bit for bit) as `vlmprune.kernels.maxmin.maxmin_select_ref`:

1. the symmetric Gram sum s = G + G^T comes from one batched GEMM (`gram_sum`, cuBLAS), shared
   with the reference; the kernels compute the cosine distance from it on the fly,
   d[i, j] = 1 - (0.5 s[i, j]) / (n_i n_j) with n_i = sqrt(max(0.5 s[i, i], eps)), with IEEE
   division and square root: the very float32 values of the reference's `distance_from_gram_sum`;
2. DivPrune's first pick needs min_{j != i} d(i, j) for every i: `_rowmin_kernel`, a tiled row-min
   over an (image, block of rows) grid (skipped when `first` is given);
3. `_greedy_kernel`, one program per image, runs the whole k-step loop in registers: a running
   min vector over the image's N tokens, an argmax (ties to the lower index) per step, one row
   of s loaded per step; at the end a prefix-sum compaction writes the picks in ascending order,
   and the picks in selection order are written as it goes.

Rows longer than `MAX_N` tokens, or tensors Triton cannot run on, use the torch reference."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from vlmprune.kernels.dispatch import interpreted
from vlmprune.kernels.maxmin_ref import NORM_EPS2, gram_sum, maxmin_select_ref
from vlmprune.kernels.select_ref import to_device
from vlmprune.kernels.select_triton import row_budget, store_ascending

MAX_N = 8192
"""Longest row the greedy program holds in registers; longer rows use the torch reference."""


@triton.jit
def _norms(base, idx, mask, s_dr, EPS2: tl.constexpr):
    """n_i = sqrt(max(0.5 s[i, i], EPS2)) for the tokens idx (IEEE square root)."""
    diag = tl.load(base + idx.to(tl.int64) * (s_dr + 1), mask=mask, other=1.0)
    return tl.math.sqrt_rn(tl.maximum(0.5 * diag, EPS2))


@triton.jit
def _rowmin_kernel(
    gram_ptr,  # float32 [B, N, N]: s = G + G^T
    valid_ptr,  # integer [B] (read when HAS_VALID)
    rowmin_ptr,  # float32 [B, N]
    n,
    s_db,
    s_dr,
    HAS_VALID: tl.constexpr,
    EPS2: tl.constexpr,
    BR: tl.constexpr,
    BC: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    rows = tl.program_id(1) * BR + tl.arange(0, BR)
    vb = n
    if HAS_VALID:
        vb = tl.minimum(tl.maximum(tl.load(valid_ptr + b).to(tl.int32), 0), n)
    base = gram_ptr + b * s_db
    row_ok = rows < vb
    n_rows = _norms(base, rows, row_ok, s_dr, EPS2)
    acc = tl.full([BR], float("inf"), tl.float32)
    for c0 in range(0, vb, BC):
        cols = c0 + tl.arange(0, BC)
        col_ok = cols < vb
        n_cols = _norms(base, cols, col_ok, s_dr, EPS2)
        m = row_ok[:, None] & col_ok[None, :] & (rows[:, None] != cols[None, :])
        s2 = tl.load(
            base + rows[:, None].to(tl.int64) * s_dr + cols[None, :], mask=m, other=0.0
        )
        d = 1.0 - tl.math.div_rn(0.5 * s2, n_rows[:, None] * n_cols[None, :])
        acc = tl.minimum(acc, tl.min(tl.where(m, d, float("inf")), axis=1))
    tl.store(rowmin_ptr + b * n + rows, acc, mask=rows < n)


@triton.jit
def _greedy_kernel(
    gram_ptr,  # float32 [B, N, N]: s = G + G^T
    rowmin_ptr,  # float32 [B, N] (read when HAS_FIRST is false)
    first_ptr,  # integer [B] (read when HAS_FIRST is true)
    k_ptr,  # integer [B]
    valid_ptr,  # integer [B] (read when HAS_VALID)
    order_ptr,  # int64 [B, kmax]
    idx_ptr,  # int64 [B, kmax]
    n,
    kmax,
    s_db,
    s_dr,
    s_ob,
    s_ib,
    HAS_FIRST: tl.constexpr,
    HAS_VALID: tl.constexpr,
    EPS2: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK_N)
    vb, kb = row_budget(k_ptr, valid_ptr, b, n, HAS_VALID)
    live = offs < vb
    base = gram_ptr + b * s_db
    order = order_ptr + b * s_ob
    neg_inf = tl.full([BLOCK_N], float("-inf"), tl.float32)
    norms = _norms(base, offs, live, s_dr, EPS2)

    if HAS_FIRST:
        p = tl.load(first_ptr + b).to(tl.int32)
    else:
        rm = tl.load(rowmin_ptr + b * n + offs, mask=live, other=float("-inf"))
        p = tl.argmax(rm, axis=0, tie_break_left=True).to(tl.int32)
    p = tl.minimum(
        p, vb - 1
    )  # k = 0 rows (valid = 0), or an unchecked device `first`: keep it in bounds
    p = tl.maximum(p, 0)

    if kb > 0:
        tl.store(order, p.to(tl.int64))
    chosen = (offs == p) & live
    s2 = tl.load(base + p.to(tl.int64) * s_dr + offs, mask=live, other=0.0)
    n_p = _norms(base, p, True, s_dr, EPS2)
    mind = 1.0 - tl.math.div_rn(0.5 * s2, n_p * norms)
    for t in range(1, kb):
        cand = tl.where(chosen | (offs >= vb), neg_inf, mind)
        p = tl.argmax(cand, axis=0, tie_break_left=True).to(tl.int32)
        tl.store(order + t, p.to(tl.int64))
        chosen = chosen | (offs == p)
        s2 = tl.load(base + p.to(tl.int64) * s_dr + offs, mask=live, other=0.0)
        n_p = _norms(base, p, True, s_dr, EPS2)
        mind = tl.minimum(mind, 1.0 - tl.math.div_rn(0.5 * s2, n_p * norms))

    chosen = chosen & ((tl.full([BLOCK_N], 0, tl.int32) + kb) > 0)
    store_ascending(idx_ptr + b * s_ib, chosen, kb, kmax, BLOCK_N)
    tl.store(
        order + offs,
        tl.full([BLOCK_N], -1, tl.int64),
        mask=(offs >= kb) & (offs < kmax),
    )


def can_launch(t: torch.Tensor) -> bool:
    """CUDA tensors, or CPU tensors when this module was imported under TRITON_INTERPRET=1."""
    return t.is_cuda or (t.device.type == "cpu" and interpreted(_greedy_kernel))


def _warps(block: int) -> int:
    return 2 if block <= 256 else 4 if block <= 2048 else 8


def _host_values(k: torch.Tensor | int, valid, first, b: int, n: int):
    """k (as a tensor) and k clipped to valid as a Python list, validated like the reference's
    `_prepare` (same errors). k and valid are read with at most one device-to-host transfer (none
    when both are on the host, as the scorers pass them); `first` is checked only when it is on
    the host: a device-resident `first` (a scorer's own argmax) is trusted, and the kernel clamps
    it into the valid range instead of waiting for the device."""
    if isinstance(k, int) and not isinstance(k, bool):
        k = torch.full((b,), k, dtype=torch.long)
    if not isinstance(k, torch.Tensor):
        raise TypeError(f"k must be an int or a LongTensor [B], got {k!r}")
    for name, t in (("k", k), ("valid", valid), ("first", first)):
        if t is not None and t.shape != (b,):
            raise ValueError(f"{name} must be [B] = [{b}], got shape {tuple(t.shape)}")
    if valid is not None and k.device == valid.device and k.device.type != "cpu":
        k_h, valid_h = torch.stack([k.to(torch.long), valid.to(torch.long)]).tolist()
    else:
        k_h, valid_h = k.tolist(), valid.tolist() if valid is not None else [n] * b
    if min(k_h, default=0) < 0:
        raise ValueError(f"k must be >= 0, got {k_h}")
    valid_h = [max(0, min(v, n)) for v in valid_h]
    k_h = [min(a, v) for a, v in zip(k_h, valid_h)]
    if first is not None and first.device.type == "cpu":
        first_h = first.tolist()
        if any(a > 0 and not 0 <= f < v for a, f, v in zip(k_h, first_h, valid_h)):
            raise ValueError(
                f"first must index a valid token (0 <= first < valid), got first={first_h} with valid={valid_h}"
            )
    return k, k_h


def maxmin_select_triton(
    feats: torch.Tensor,
    k: torch.Tensor | int,
    valid: torch.Tensor | None = None,
    first: torch.Tensor | None = None,
    *,
    return_order: bool = False,
):
    """Greedy max-min diversity selection (Triton). Same arguments and results as
    `maxmin_select_ref`: idx [B, kmax] ascending, -1 padded; with `return_order=True` also the
    picks in selection order. One device-to-host transfer (k, valid, first: kmax and checks),
    the distance GEMM, then one or two kernel launches."""
    b, n = feats.shape[:2] if feats.ndim == 3 else (0, 0)
    if (
        feats.ndim != 3
        or b == 0
        or n == 0
        or n > MAX_N
        or not can_launch(feats)
        or not feats.is_floating_point()
    ):
        return maxmin_select_ref(feats, k, valid, first, return_order=return_order)
    k, k_h = _host_values(k, valid, first, b, n)
    kmax = max(k_h)
    dev = feats.device
    order, idx = torch.empty((2, b, kmax), dtype=torch.long, device=dev).unbind(0)
    if kmax == 0:
        return (idx, order) if return_order else idx
    k = to_device(k, dev)
    valid = None if valid is None else to_device(valid, dev)
    first = None if first is None else to_device(first, dev)
    gram = gram_sum(feats)
    if first is None:
        rowmin = torch.empty((b, n), dtype=torch.float32, device=dev)
        br, bc = 32, 128
        _rowmin_kernel[(b, triton.cdiv(n, br))](
            gram,
            k if valid is None else valid,
            rowmin,
            n,
            gram.stride(0),
            gram.stride(1),
            HAS_VALID=valid is not None,
            EPS2=NORM_EPS2,
            BR=br,
            BC=bc,
            num_warps=4,
        )
    else:
        rowmin = gram  # unused
    block = max(16, triton.next_power_of_2(n))
    _greedy_kernel[(b,)](
        gram,
        rowmin,
        k if first is None else first,
        k,
        k if valid is None else valid,
        order,
        idx,
        n,
        kmax,
        gram.stride(0),
        gram.stride(1),
        order.stride(0),
        idx.stride(0),
        HAS_FIRST=first is not None,
        HAS_VALID=valid is not None,
        EPS2=NORM_EPS2,
        BLOCK_N=block,
        num_warps=_warps(block),
    )
    return (idx, order) if return_order else idx
