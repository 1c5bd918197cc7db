"""Triton implementation of VisionZip's split and merge (`vlmprune.kernels.merge`).

* `_split_kernel`, one program per image: the dominant tokens by the select kernel's radix select
  (`top_mask`), a prefix sum over the remaining tokens to mark the evenly spaced targets, and
  prefix-sum compactions writing the kept indices, the targets, the other remaining tokens and,
  per kept slot, its target number (-1 for a dominant token).
* `_assign_kernel`, one program per (image, block of other tokens): the cosine similarity of each
  to every target (float32 dot products over blocks of the metric, divided by both norms) and
  its argmax, ties to the lower target;
* `_merge_kernel`, one program per (kept slot, block of D): a dominant slot copies its feature, a
  target slot sums its own and its members' features in float32 (members found by blocks of the
  assignment) and writes the mean in the features' dtype.
Three launches instead of the reference's ~60 ops."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from vlmprune.kernels.dispatch import interpreted
from vlmprune.kernels.merge_ref import _check, keep_first, visionzip_merge_ref
from vlmprune.kernels.select_triton import (
    _FEAT_DTYPES,
    dot,
    order_keys,
    store_ascending,
    top_mask,
)

MAX_N = 8192
"""Longest row one program holds in registers; longer rows use the torch reference."""

NORM_EPS = 1e-12
"""F.normalize's default eps, which the reference uses."""


@triton.jit
def _split_kernel(
    attn_ptr,  # float32 [G, N]
    idx_ptr,  # int64 [G, ki]
    tnum_ptr,  # int64 [G, ki]: target number of each kept slot, -1 for dominant tokens
    tgt_ptr,  # int64 [G, n_ctx]
    oth_ptr,  # int64 [G, n_oth]
    nv,
    n_dom,
    n_ctx,
    n_oth,
    step,
    ki,
    s_ab,
    BLOCK_N: tl.constexpr,
):
    g = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK_N)
    live = offs < nv
    x = tl.load(attn_ptr + g * s_ab + offs, mask=live, other=0.0)
    dom = top_mask(order_keys(x, live, BLOCK_N), live, n_dom, BLOCK_N)
    rest = live & ~dom
    slot = (
        tl.cumsum(rest.to(tl.int32), axis=0) - 1
    )  # position among the remaining tokens
    target = rest & (slot % step == 0) & (slot < step * n_ctx)
    keep = dom | target
    store_ascending(idx_ptr + g * ki, keep, ki, ki, BLOCK_N)
    store_ascending(tgt_ptr + g * n_ctx, target, n_ctx, n_ctx, BLOCK_N)
    store_ascending(oth_ptr + g * n_oth, rest & ~target, n_oth, n_oth, BLOCK_N)
    kept_slot = tl.cumsum(keep.to(tl.int32), axis=0) - 1
    tnum = tl.cumsum(target.to(tl.int32), axis=0) - 1
    tl.store(
        tnum_ptr + g * ki + kept_slot,
        tl.where(target, tnum, -1).to(tl.int64),
        mask=keep,
    )


@triton.jit
def _assign_kernel(
    metric_ptr,  # [G, N, M], any float dtype
    tgt_ptr,  # int64 [G, n_ctx]
    oth_ptr,  # int64 [G, n_oth]
    grp_ptr,  # int64 [G, n_oth]: target number each other token joins
    n_ctx,
    n_oth,
    m,
    s_mb,
    s_mn,
    s_mm,
    EPS: tl.constexpr,
    BLOCK_O: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_M: tl.constexpr,
    INTERPRETED: tl.constexpr,  # see `select_triton.dot`
):
    g = tl.program_id(0).to(tl.int64)
    o = tl.program_id(1) * BLOCK_O + tl.arange(0, BLOCK_O)
    o_ok = o < n_oth
    rows_o = tl.load(oth_ptr + g * n_oth + o, mask=o_ok, other=0)
    base = metric_ptr + g * s_mb
    best = tl.full([BLOCK_O], float("-inf"), tl.float32)
    pick = tl.zeros([BLOCK_O], tl.int32)
    for c0 in range(
        0, n_ctx, BLOCK_C
    ):  # targets in ascending blocks: a later block wins only if strictly better
        c = c0 + tl.arange(0, BLOCK_C)
        c_ok = c < n_ctx
        rows_c = tl.load(tgt_ptr + g * n_ctx + c, mask=c_ok, other=0)
        dots = tl.zeros([BLOCK_O, BLOCK_C], tl.float32)
        sq_o = tl.zeros([BLOCK_O], tl.float32)
        sq_c = tl.zeros([BLOCK_C], tl.float32)
        for start in range(0, m, BLOCK_M):
            j = start + tl.arange(0, BLOCK_M)
            j_ok = j < m
            a = tl.load(
                base + rows_o[:, None] * s_mn + j[None, :] * s_mm,
                mask=o_ok[:, None] & j_ok[None, :],
                other=0.0,
            ).to(tl.float32)
            b = tl.load(
                base + rows_c[:, None] * s_mn + j[None, :] * s_mm,
                mask=c_ok[:, None] & j_ok[None, :],
                other=0.0,
            ).to(tl.float32)
            dots = dot(a, tl.trans(b), dots, "ieee", INTERPRETED)
            sq_o += tl.sum(a * a, axis=1)
            sq_c += tl.sum(b * b, axis=1)
        # F.normalize's rule: each row divided by max(norm, eps)
        norm_o = tl.maximum(tl.math.sqrt_rn(sq_o), EPS)
        norm_c = tl.maximum(tl.math.sqrt_rn(sq_c), EPS)
        sim = tl.math.div_rn(tl.math.div_rn(dots, norm_o[:, None]), norm_c[None, :])
        sim = tl.where(c_ok[None, :], sim, float("-inf"))
        top = tl.max(sim, axis=1)
        first = tl.min(
            tl.where(sim == top[:, None], c[None, :], n_ctx), axis=1
        )  # ties: the lower target
        better = top > best
        pick = tl.where(better, first, pick)
        best = tl.where(better, top, best)
    tl.store(grp_ptr + g * n_oth + o, pick.to(tl.int64), mask=o_ok)


@triton.jit
def _merge_kernel(
    feats_ptr,  # [G, N, D]
    idx_ptr,  # int64 [G, ki]
    tnum_ptr,  # int64 [G, ki]
    oth_ptr,  # int64 [G, n_oth]
    grp_ptr,  # int64 [G, n_oth]: target number each other token joins
    out_ptr,  # [G, ki, D], feats' dtype
    ki,
    n_oth,
    d,
    s_fb,
    s_fn,
    s_fd,
    BLOCK_O: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    pid = tl.program_id(0)
    g = (pid // ki).to(tl.int64)
    j = (pid % ki).to(tl.int64)
    offs_d = tl.program_id(1).to(tl.int64) * BLOCK_D + tl.arange(0, BLOCK_D)
    in_d = offs_d < d
    base = feats_ptr + g * s_fb
    src = tl.load(idx_ptr + g * ki + j)
    t = tl.load(tnum_ptr + g * ki + j)
    vals = tl.load(base + src * s_fn + offs_d * s_fd, mask=in_d, other=0.0).to(
        tl.float32
    )
    if t >= 0:
        cnt = vals * 0.0 + 1.0  # per lane, so the loop carries one type
        for start in range(0, n_oth, BLOCK_O):
            o = start + tl.arange(0, BLOCK_O)
            member = tl.load(grp_ptr + g * n_oth + o, mask=o < n_oth, other=-1) == t
            rows = tl.load(oth_ptr + g * n_oth + o, mask=member, other=0)
            block = tl.load(
                base + rows[:, None] * s_fn + offs_d[None, :] * s_fd,
                mask=member[:, None] & in_d[None, :],
                other=0.0,
            )
            vals += tl.sum(block.to(tl.float32), axis=0)
            cnt += tl.sum(member.to(tl.float32), axis=0)
        vals = vals / cnt
    tl.store(
        out_ptr + (g * ki + j) * d + offs_d,
        vals.to(out_ptr.dtype.element_ty),
        mask=in_d,
    )


def can_launch(t: torch.Tensor) -> bool:
    """CUDA tensors, or CPU tensors when this module was imported under TRITON_INTERPRET=1."""
    return t.is_cuda or (t.device.type == "cpu" and interpreted(_split_kernel))


def visionzip_merge_triton(
    attn: torch.Tensor,
    metric: torch.Tensor,
    feats: torch.Tensor,
    nv: int,
    ki: int,
    n_dom: int,
    n_ctx: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """`visionzip_merge_ref` in two launches around the similarity GEMM (no host sync)."""
    _check(attn, metric, feats, nv, ki, n_dom, n_ctx)
    g, n = attn.shape
    if ki >= nv:
        return keep_first(feats, ki)
    if (
        g == 0
        or n > MAX_N
        or n_ctx == 0
        or not can_launch(attn)
        or feats.dtype not in _FEAT_DTYPES
        or not attn.device == metric.device == feats.device
    ):
        return visionzip_merge_ref(attn, metric, feats, nv, ki, n_dom, n_ctx)
    dev = attn.device
    n_oth = nv - ki
    idx, tnum = (torch.empty((g, ki), dtype=torch.long, device=dev) for _ in range(2))
    targets = torch.empty((g, n_ctx), dtype=torch.long, device=dev)
    others = torch.empty((g, n_oth), dtype=torch.long, device=dev)
    attn = attn.float().contiguous()
    block = max(16, triton.next_power_of_2(n))
    _split_kernel[(g,)](
        attn,
        idx,
        tnum,
        targets,
        others,
        nv,
        n_dom,
        n_ctx,
        n_oth,
        (nv - n_dom) // n_ctx,
        ki,
        attn.stride(0),
        BLOCK_N=block,
        num_warps=4 if block <= 1024 else 8,
    )
    m = metric.shape[-1]
    group = torch.empty((g, n_oth), dtype=torch.long, device=dev)
    if n_oth > 0:
        block_c = min(64, max(16, triton.next_power_of_2(n_ctx)))
        block_o = 32
        _assign_kernel[(g, triton.cdiv(n_oth, block_o))](
            metric,
            targets,
            others,
            group,
            n_ctx,
            n_oth,
            m,
            metric.stride(0),
            metric.stride(1),
            metric.stride(2),
            EPS=NORM_EPS,
            BLOCK_O=block_o,
            BLOCK_C=block_c,
            BLOCK_M=32,
            INTERPRETED=interpreted(_assign_kernel),
            num_warps=4,
        )
    d = feats.shape[-1]
    out = torch.empty((g, ki, d), dtype=feats.dtype, device=dev)
    if d > 0:
        block_d = min(512, max(16, triton.next_power_of_2(d)))
        _merge_kernel[(g * ki, triton.cdiv(d, block_d))](
            feats,
            idx,
            tnum,
            others,
            group,
            out,
            ki,
            n_oth,
            d,
            feats.stride(0),
            feats.stride(1),
            feats.stride(2),
            BLOCK_O=16,
            BLOCK_D=block_d,
            num_warps=4,
        )
    return idx, out
