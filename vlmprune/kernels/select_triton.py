"""Triton implementation of the ragged top-k + order-preserving gather (DESIGN §4.1).

Same contract as `vlmprune.kernels.select.select_tokens_ref`, bit for bit on indices and gathered
rows. Two kernels:

* `_select_kernel`, one program per row. Each score, read as float32, becomes an order-preserving
  uint32 key (NaN is read as -inf and -0.0 as +0.0, so that keys compare exactly like the
  reference's sort; tokens at positions >= valid get key 0, below every real key). The k-th
  largest key T is found by a radix select: from the most significant digit down, T's next digit
  is the largest d for which at least k keys are >= the candidate (T so far with digit d), the
  candidates of one digit counted in one reduction (4-bit digits: 8 passes). No sort. Then a prefix-sum
  compaction keeps every key > T plus the (k - #{key > T}) lowest-index keys == T, and writes
  their positions in ascending order; slots k..kmax-1 get -1. The key map and the selection
  (`order_keys`, `top_mask`) are `@triton.jit` helpers the FlowCut kernel shares.
* `_gather_kernel`, one program per (output row, block of D): copies feats[b, idx[b, j]] or writes
  zeros for padding. Feature dtype is kept (a bitwise copy).

Inputs the kernels do not take (CPU tensors outside `TRITON_INTERPRET=1`, rows longer than
`MAX_N`, unusual feature dtypes) go to the torch reference."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from vlmprune.kernels.dispatch import interpreted
from vlmprune.kernels.select_ref import _check, select_tokens_ref, to_device

MAX_N = 16384
"""Longest row one program holds in registers; longer rows use the torch reference."""

_FEAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


@triton.jit
def row_budget(k_ptr, valid_ptr, row, n, HAS_VALID: tl.constexpr):
    """(valid tokens, k clipped to them) of one row: valid_ptr[row] clamped to [0, n] (n without
    HAS_VALID), k_ptr[row] capped at it. Shared by the selection and the max-min kernels."""
    vb = n
    if HAS_VALID:
        vb = tl.minimum(tl.maximum(tl.load(valid_ptr + row).to(tl.int32), 0), n)
    kb = tl.minimum(tl.load(k_ptr + row).to(tl.int32), vb)
    return vb, kb


@triton.jit
def order_keys(x, live, BLOCK_N: tl.constexpr):
    """float32 [BLOCK_N] -> uint32 keys that compare as the values do (NaN read as -inf, -0.0 as
    +0.0); entries that are not `live` get 0, below every live key."""
    u = x.to(tl.uint32, bitcast=True)
    sign = tl.full([BLOCK_N], 0x80000000, tl.uint32)
    nan_as = tl.full([BLOCK_N], 0xFF800000, tl.uint32)  # -inf
    zero = tl.full([BLOCK_N], 0, tl.uint32)
    absmask = tl.full([BLOCK_N], 0x7FFFFFFF, tl.uint32)
    expmask = tl.full([BLOCK_N], 0x7F800000, tl.uint32)
    ones = tl.full(
        [BLOCK_N], 0xFFFFFFFF, tl.uint32
    )  # u ^ ones, not ~u: Triton 3.8's interpreter fails on ~uint32
    u = tl.where((u & absmask) > expmask, nan_as, u)  # NaN -> -inf
    u = tl.where(u == sign, zero, u)  # -0.0 -> +0.0
    # order-preserving map: negatives flip all bits, non-negatives set the sign bit
    key = tl.where((u & sign) != zero, u ^ ones, u | sign)
    return tl.where(live, key, zero)


@triton.jit
def kth_key(key, kb, BITS: tl.constexpr, DIGITS: tl.constexpr):
    """The kb-th largest key T, BITS bits a pass from the top (DIGITS = 2^BITS): T's next digit is
    the largest d whose candidate (T so far, digit d) still has at least kb keys >= it; all
    DIGITS candidates of a pass are counted in one reduction, so 32 / BITS serial passes."""
    digit = tl.arange(0, DIGITS).to(tl.uint32)
    thr = tl.full([1], 0, tl.uint32)
    for p in tl.static_range(32 // BITS):
        shift = 32 - BITS * (p + 1)
        cand = thr | (
            digit << shift
        )  # ascending; cand[0] = thr itself always has >= kb keys
        cnt = tl.sum((key[None, :] >= cand[:, None]).to(tl.int32), axis=1)
        best = tl.sum((cnt >= kb).to(tl.int32), axis=0) - 1
        thr = thr | (best.to(tl.uint32) << shift)
    return thr


@triton.jit
def top_mask(key, live, kb, BLOCK_N: tl.constexpr):
    """The kb live entries with the largest keys, ties to the lower index: a radix select of the
    kb-th largest key T (`kth_key`: 4-bit digits while a [16, BLOCK_N] count fits the registers,
    else 2-bit; no sort), then every key > T and the lowest-index keys == T."""
    if BLOCK_N <= 2048:
        thr = kth_key(key, kb, 4, 16)
    else:
        thr = kth_key(key, kb, 2, 4)
    t = tl.broadcast_to(thr, [BLOCK_N])
    above = live & (key > t)
    n_above = tl.sum(above.to(tl.int32), axis=0)
    equal = live & (key == t)
    eq_rank = tl.cumsum(equal.to(tl.int32), axis=0)
    # (kb > 0 needs no test: with kb = 0, T ends at 0xFFFFFFFF, above every key, and nothing is > or == T)
    return above | (equal & (eq_rank <= kb - n_above))


@triton.jit
def dot(a, b, acc, PRECISION: tl.constexpr, INTERPRETED: tl.constexpr):
    """acc + a @ b, float32 ([M, K] x [K, N]): exact products (any input dtype), float32 sums.
    On the GPU `tl.dot` (on the tensor cores for 16-bit inputs; PRECISION "ieee" keeps float32
    inputs off TF32). Under Triton's interpreter a product and a sum along K instead: there
    `tl.dot` is numpy's matmul, which multiplies bfloat16 as raw bits and may round two equal
    columns differently, while the kernels' ties must stay exact."""
    if INTERPRETED:
        out = acc + tl.sum(
            a.to(tl.float32)[:, :, None] * b.to(tl.float32)[None, :, :], axis=1
        )
    else:
        out = tl.dot(a, b, acc, input_precision=PRECISION)
    return out


@triton.jit
def store_ascending(out, keep, kb, kmax, BLOCK_N: tl.constexpr):
    """Write the positions where `keep` is set (kb of them) to out[0..kb-1] in ascending order, a
    prefix-sum compaction, and -1 to out[kb..kmax-1]."""
    offs = tl.arange(0, BLOCK_N)
    pos = tl.cumsum(keep.to(tl.int32), axis=0) - 1
    tl.store(out + pos, offs.to(tl.int64), mask=keep)
    tl.store(
        out + offs, tl.full([BLOCK_N], -1, tl.int64), mask=(offs >= kb) & (offs < kmax)
    )


@triton.jit
def _select_kernel(
    scores_ptr,  # float32 / float16 / bfloat16 [B, N], any strides
    k_ptr,  # integer [B]
    valid_ptr,  # integer [B] (read when HAS_VALID)
    idx_ptr,  # int64 [B, kmax]
    n,
    stride_sb,
    stride_sn,
    stride_i,
    kmax,
    HAS_VALID: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK_N)
    vb, kb = row_budget(k_ptr, valid_ptr, row, n, HAS_VALID)
    live = offs < vb

    x = tl.load(
        scores_ptr + row * stride_sb + offs * stride_sn, mask=live, other=0.0
    ).to(tl.float32)
    take = top_mask(order_keys(x, live, BLOCK_N), live, kb, BLOCK_N)
    store_ascending(idx_ptr + row * stride_i, take, kb, kmax, BLOCK_N)


@triton.jit
def _gather_kernel(
    feats_ptr,
    idx_ptr,
    out_ptr,
    kmax,
    d,
    s_fb,
    s_fn,
    s_fd,
    s_ib,
    s_ob,
    s_ok,
    BLOCK_D: tl.constexpr,
):
    pid = tl.program_id(0)
    b = (pid // kmax).to(tl.int64)
    j = (pid % kmax).to(tl.int64)
    offs_d = tl.program_id(1).to(tl.int64) * BLOCK_D + tl.arange(0, BLOCK_D)
    in_d = offs_d < d
    src = tl.load(idx_ptr + b * s_ib + j)
    # vector-shaped mask: the interpreter mis-types (bool tensor & bool scalar)
    keep = (tl.full([BLOCK_D], 0, tl.int64) + src) >= 0
    src = tl.maximum(src, 0)
    vals = tl.load(
        feats_ptr + b * s_fb + src * s_fn + offs_d * s_fd, mask=in_d & keep, other=0
    )
    tl.store(out_ptr + b * s_ob + j * s_ok + offs_d, vals, mask=in_d)


def can_launch(t: torch.Tensor) -> bool:
    """Whether Triton can run on this tensor's device: CUDA, or CPU under TRITON_INTERPRET=1
    (read when this module was imported)."""
    return t.is_cuda or (t.device.type == "cpu" and interpreted(_select_kernel))


def _select_warps(block: int) -> int:
    return 4 if block <= 1024 else 8 if block <= 4096 else 16


def _host_lists(
    k: torch.Tensor, valid: torch.Tensor | None
) -> tuple[list[int], list[int] | None]:
    """k and valid as Python lists with one device-to-host transfer."""
    if valid is not None and valid.device == k.device and k.device.type != "cpu":
        both = torch.stack([k.to(torch.long), valid.to(torch.long)]).tolist()
        return both[0], both[1]
    return k.tolist(), None if valid is None else valid.tolist()


def select_tokens_triton(
    scores: torch.Tensor,
    feats: torch.Tensor | None,
    k: torch.Tensor,
    valid: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Keep the k[b] highest scores among the first valid[b] tokens of each row (Triton).

    Returns idx [B, kmax] (ascending, -1 padded) and feats gathered at idx (zero padded, or None
    when feats is None), kmax = max(k clipped to valid). Ties go to the lower index, NaN counts
    as -inf (lowest), positions >= valid[b] are never chosen. One device-to-host transfer (k and
    valid, for kmax and the k >= 0 check), then two kernel launches."""
    if (
        scores.ndim != 2
        or k.shape != scores.shape[:1]
        or (valid is not None and valid.shape != k.shape)
        or (feats is not None and feats.shape[:2] != scores.shape)
    ):
        _check(scores, feats, k, valid)  # raises the reference's error
    b, n = scores.shape
    if (
        b == 0
        or n == 0
        or n > MAX_N
        or not can_launch(scores)
        or (
            feats is not None
            and (feats.dtype not in _FEAT_DTYPES or feats.device != scores.device)
        )
    ):
        return select_tokens_ref(scores, feats, k, valid)
    k_host, valid_host = _host_lists(k, valid)
    if min(k_host) < 0:
        raise ValueError(f"k must be >= 0, got {k_host}")
    vh = [n] * b if valid_host is None else [max(0, min(v, n)) for v in valid_host]
    kmax = max(min(a, v) for a, v in zip(k_host, vh))
    dev = scores.device
    idx = torch.empty((b, kmax), dtype=torch.long, device=dev)
    if kmax > 0:
        if scores.dtype not in (torch.float32, torch.float16, torch.bfloat16):
            scores = scores.float()
        k_dev = to_device(k, dev)
        valid_dev = None if valid is None else to_device(valid, dev)
        block = max(16, triton.next_power_of_2(n))
        _select_kernel[(b,)](
            scores,
            k_dev,
            k_dev if valid_dev is None else valid_dev,
            idx,
            n,
            scores.stride(0),
            scores.stride(1),
            idx.stride(0),
            kmax,
            HAS_VALID=valid_dev is not None,
            BLOCK_N=block,
            num_warps=_select_warps(block),
        )
    if feats is None:
        return idx, None
    d = feats.shape[2]
    out = torch.empty((b, kmax, d), dtype=feats.dtype, device=dev)
    if kmax > 0 and d > 0:
        block_d = min(1024, max(16, triton.next_power_of_2(d)))
        grid = (b * kmax, triton.cdiv(d, block_d))
        _gather_kernel[grid](
            feats,
            idx,
            out,
            kmax,
            d,
            feats.stride(0),
            feats.stride(1),
            feats.stride(2),
            idx.stride(0),
            out.stride(0),
            out.stride(1),
            BLOCK_D=block_d,
            num_warps=4 if block_d >= 512 else 2,
        )
    return idx, out
