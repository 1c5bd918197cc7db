"""Triton implementation of HiPrune's selection (`vlmprune.kernels.hiprune`).

`_hiprune_kernel` runs one program per image with its N tokens in registers: the anchors by the
select kernel's radix select (`top_mask`), then the anchors one by one by descending attention
(an argmax per anchor, ties to the lower index), each trying its four neighbours in order while
fewer than m tokens are chosen, then the registers by a second radix select over the tokens not
chosen, and the prefix-sum compaction of the kept positions. One launch replaces the
reference's ~50 torch ops."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from vlmprune.kernels.dispatch import interpreted
from vlmprune.kernels.hiprune_ref import _check, hiprune_select_ref
from vlmprune.kernels.select_ref import to_device
from vlmprune.kernels.select_triton import (
    order_keys,
    row_budget,
    store_ascending,
    top_mask,
)

MAX_N = 8192
"""Longest row one program holds in registers; longer rows use the torch reference."""


@triton.jit
def _try_neighbour(chosen, count, r, c, h, w, vb, m, offs):
    """Choose token (r, c) if it is inside the grid, valid, not chosen yet and fewer than m are
    chosen: (chosen [BLOCK_N] int32, count)."""
    nb = r * w + c
    usable = (r >= 0) & (r < h) & (c >= 0) & (c < w) & (nb < vb) & (count < m)
    hit = offs == nb
    taken = tl.sum(tl.where(hit, chosen, 0), axis=0) > 0
    new = usable & (taken == 0)
    return tl.where(hit & new, 1, chosen), count + new.to(tl.int32)


@triton.jit
def _hiprune_kernel(
    obj_ptr,  # float32 [I, N]: object-layer attention
    reg_ptr,  # float32 [I, N]: register-layer attention
    k_ptr,  # int64 [I]
    valid_ptr,  # int64 [I]
    m_ptr,  # int64 [I]: anchor + buffer slots
    idx_ptr,  # int64 [I, kmax]
    n,
    h,
    w,
    s_ob,
    s_rb,
    s_ib,
    kmax,
    BLOCK_N: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK_N)
    vb, kb = row_budget(k_ptr, valid_ptr, b, n, True)
    live = offs < vb
    keep = live
    if kb < vb:
        m = tl.load(m_ptr + b).to(tl.int32)
        n_anchor = (m + 4) // 5
        key = order_keys(
            tl.load(obj_ptr + b * s_ob + offs, mask=live, other=0.0), live, BLOCK_N
        )
        anchors = top_mask(key, live, n_anchor, BLOCK_N)
        chosen = anchors.to(tl.int32)
        count = n_anchor
        left = anchors.to(tl.int32)  # anchors whose buffers are still to be tried
        none = tl.full([BLOCK_N], 0, tl.uint32)
        for _ in range(n_anchor):
            best = tl.max(tl.where(left != 0, key, none), axis=0)
            pos = tl.min(tl.where((left != 0) & (key == best), offs, BLOCK_N), axis=0)
            left = tl.where(offs == pos, 0, left)
            r = pos // w
            c = pos % w
            chosen, count = _try_neighbour(
                chosen, count, r - 1, c, h, w, vb, m, offs
            )  # NEIGHBOURS order
            chosen, count = _try_neighbour(chosen, count, r, c - 1, h, w, vb, m, offs)
            chosen, count = _try_neighbour(chosen, count, r, c + 1, h, w, vb, m, offs)
            chosen, count = _try_neighbour(chosen, count, r + 1, c, h, w, vb, m, offs)
        free = live & (chosen == 0)
        reg = tl.load(reg_ptr + b * s_rb + offs, mask=live, other=0.0)
        keep = (chosen != 0) | top_mask(
            order_keys(reg, free, BLOCK_N), free, kb - count, BLOCK_N
        )
    store_ascending(idx_ptr + b * s_ib, keep, kb, kmax, BLOCK_N)


def can_launch(t: torch.Tensor) -> bool:
    """CUDA tensors, or CPU tensors when this module was imported under TRITON_INTERPRET=1."""
    return t.is_cuda or (t.device.type == "cpu" and interpreted(_hiprune_kernel))


def hiprune_select_triton(
    obj: torch.Tensor,
    reg: torch.Tensor,
    ks: list[int],
    counts: list[int],
    slots: list[int],
    grid: tuple[int, int],
) -> torch.Tensor:
    """`hiprune_select_ref` in one launch (the host lists go over in one pinned asynchronous copy)."""
    _check(obj, reg, ks, counts, slots, grid)
    i, n = obj.shape
    if i == 0 or n == 0 or n > MAX_N or not can_launch(obj) or reg.device != obj.device:
        return hiprune_select_ref(obj, reg, ks, counts, slots, grid)
    kmax = max(ks)
    dev = obj.device
    idx = torch.empty((i, kmax), dtype=torch.long, device=dev)
    if kmax == 0:
        return idx
    host = to_device([ks, counts, slots], dev)  # [3, I]
    obj, reg = obj.float().contiguous(), reg.float().contiguous()
    block = max(16, triton.next_power_of_2(n))
    _hiprune_kernel[(i,)](
        obj,
        reg,
        host[0],
        host[1],
        host[2],
        idx,
        n,
        grid[0],
        grid[1],
        obj.stride(0),
        reg.stride(0),
        idx.stride(0),
        kmax,
        BLOCK_N=block,
        num_warps=4 if block <= 1024 else 8,
    )
    return idx
