"""Triton implementation of VisionZip's split and merge (`vlmprune.kernels.merge`).

* `_split_kernel`, one program per image: the dominant tokens by the select kernel's radix select
  (`top_mask`), a prefix sum over the remaining tokens to mark the evenly spaced targets, and
  prefix-sum compactions writing the kept indices, the targets, the other remaining tokens and,
  per kept slot, its target number (-1 for a dominant token).
* between them, torch: the cosine similarity of every other token to every target (one batched
  GEMM of the gathered metric rows) and its argmax;
* `_merge_kernel`, one program per (kept slot, block of D): a dominant slot copies its feature, a
  target slot sums its own and its members' features in float32 (members found by blocks of the
  assignment) and writes the mean in the features' dtype.
Three launches and a GEMM instead of the reference's ~60 ops."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from vlmprune.kernels.dispatch import interpreted
from vlmprune.kernels.merge import _check, keep_first, visionzip_merge_ref
from vlmprune.kernels.select_triton import _FEAT_DTYPES, order_keys, store_ascending, top_mask

MAX_N = 8192
"""Longest row one program holds in registers; longer rows use the torch reference."""


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
    slot = tl.cumsum(rest.to(tl.int32), axis=0) - 1  # position among the remaining tokens
    target = rest & (slot % step == 0) & (slot < step * n_ctx)
    keep = dom | target
    store_ascending(idx_ptr + g * ki, keep, ki, ki, BLOCK_N)
    store_ascending(tgt_ptr + g * n_ctx, target, n_ctx, n_ctx, BLOCK_N)
    store_ascending(oth_ptr + g * n_oth, rest & ~target, n_oth, n_oth, BLOCK_N)
    kept_slot = tl.cumsum(keep.to(tl.int32), axis=0) - 1
    tnum = tl.cumsum(target.to(tl.int32), axis=0) - 1
    tl.store(tnum_ptr + g * ki + kept_slot, tl.where(target, tnum, -1).to(tl.int64), mask=keep)


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
    vals = tl.load(base + src * s_fn + offs_d * s_fd, mask=in_d, other=0.0).to(tl.float32)
    if t >= 0:
        cnt = vals * 0.0 + 1.0  # per lane, so the loop carries one type
        for start in range(0, n_oth, BLOCK_O):
            o = start + tl.arange(0, BLOCK_O)
            member = tl.load(grp_ptr + g * n_oth + o, mask=o < n_oth, other=-1) == t
            rows = tl.load(oth_ptr + g * n_oth + o, mask=member, other=0)
            block = tl.load(base + rows[:, None] * s_fn + offs_d[None, :] * s_fd, mask=member[:, None] & in_d[None, :],
                            other=0.0)
            vals += tl.sum(block.to(tl.float32), axis=0)
            cnt += tl.sum(member.to(tl.float32), axis=0)
        vals = vals / cnt
    tl.store(out_ptr + (g * ki + j) * d + offs_d, vals.to(out_ptr.dtype.element_ty), mask=in_d)


def can_launch(t: torch.Tensor) -> bool:
    """CUDA tensors, or CPU tensors when this module was imported under TRITON_INTERPRET=1."""
    return t.is_cuda or (t.device.type == "cpu" and interpreted(_split_kernel))


def visionzip_merge_triton(attn: torch.Tensor, metric: torch.Tensor, feats: torch.Tensor, nv: int, ki: int,
                           n_dom: int, n_ctx: int) -> tuple[torch.Tensor, torch.Tensor]:
    """`visionzip_merge_ref` in two launches around the similarity GEMM (no host sync)."""
    _check(attn, metric, feats, nv, ki, n_dom, n_ctx)
    g, n = attn.shape
    if ki >= nv:
        return keep_first(feats, ki)
    if (g == 0 or n > MAX_N or n_ctx == 0 or not can_launch(attn) or feats.dtype not in _FEAT_DTYPES
            or not attn.device == metric.device == feats.device):
        return visionzip_merge_ref(attn, metric, feats, nv, ki, n_dom, n_ctx)
    dev = attn.device
    n_oth = nv - ki
    idx, tnum = (torch.empty((g, ki), dtype=torch.long, device=dev) for _ in range(2))
    targets = torch.empty((g, n_ctx), dtype=torch.long, device=dev)
    others = torch.empty((g, n_oth), dtype=torch.long, device=dev)
    attn = attn.float().contiguous()
    block = max(16, triton.next_power_of_2(n))
    _split_kernel[(g,)](attn, idx, tnum, targets, others, nv, n_dom, n_ctx, n_oth, (nv - n_dom) // n_ctx, ki,
                        attn.stride(0), BLOCK_N=block, num_warps=4 if block <= 1024 else 8)
    m = metric.shape[-1]
    sim = metric.gather(1, others[..., None].expand(-1, -1, m)) @ metric.gather(
        1, targets[..., None].expand(-1, -1, m)).transpose(1, 2)
    group = sim.argmax(dim=2)  # [G, n_oth], first maximum: lower target number
    d = feats.shape[-1]
    out = torch.empty((g, ki, d), dtype=feats.dtype, device=dev)
    if d > 0:
        block_d = min(512, max(16, triton.next_power_of_2(d)))
        _merge_kernel[(g * ki, triton.cdiv(d, block_d))](
            feats, idx, tnum, others, group, out, ki, n_oth, d, feats.stride(0), feats.stride(1), feats.stride(2),
            BLOCK_O=16, BLOCK_D=block_d, num_warps=4)
    return idx, out
