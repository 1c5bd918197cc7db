"""Triton implementation of the DPP greedy MAP (`vlmprune.kernels.dpp`).

`_dpp_kernel` runs one program per image with the gains d2 of its N tokens in registers: per pick,
an argmax (ties to the lower index, gains at or below the floor read as 0), one row of the kernel
and the earlier rows of c (kept in a global scratch [B, kmax, N]) give the new row
e = (L[j] - sum_s c[s, j] c[s]) / sqrt(d2[j]) (IEEE division and square root), d2 -= e^2; at the
end a prefix-sum compaction writes the picks ascending. One launch instead of the reference's
~10 torch ops per pick. The sum over earlier rows runs in another order than the reference's
einsum, so gains agree to float32 rounding and picks agree unless two gains are that close.
Rows longer than `MAX_N` tokens, or tensors Triton cannot run on, use the torch reference."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from vlmprune.kernels.dispatch import interpreted
from vlmprune.kernels.dpp_ref import EPS, _check, dpp_greedy_ref
from vlmprune.kernels.select_ref import to_device
from vlmprune.kernels.select_triton import row_budget, store_ascending

MAX_N = 8192
"""Longest row one program holds in registers; longer rows use the torch reference."""


@triton.jit
def _dpp_kernel(
    l_ptr,  # float32 [B, N, N]
    k_ptr,  # int64 [B]
    valid_ptr,  # int64 [B]
    c_ptr,  # float32 [B, kmax, N] scratch
    idx_ptr,  # int64 [B, kmax]
    n,
    s_lb,
    s_lr,
    s_cb,
    kmax,
    EPS_: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK_N)
    vb, kb = row_budget(k_ptr, valid_ptr, b, n, True)
    live = offs < vb
    base = l_ptr + b * s_lb
    cb = c_ptr + b * s_cb
    d2 = tl.load(base + offs.to(tl.int64) * (s_lr + 1), mask=live, other=0.0)
    floor = EPS_ * tl.maximum(tl.max(tl.where(live, d2, float("-inf")), axis=0), 0.0)
    free = live
    chosen = tl.zeros([BLOCK_N], dtype=tl.int32)
    for t in range(kb):
        gain = tl.where(d2 > floor, d2, 0.0)
        gain = tl.where(free, gain, float("-inf"))
        best = tl.max(gain, axis=0)
        j = tl.min(tl.where(free & (gain == best), offs, BLOCK_N), axis=0)
        dj = tl.sum(tl.where(offs == j, d2, 0.0), axis=0)
        acc = tl.load(base + j.to(tl.int64) * s_lr + offs, mask=live, other=0.0)
        for s in range(t):
            row = tl.load(cb + s * n + offs, mask=live, other=0.0)
            acc = acc - tl.load(cb + s * n + j) * row
        root = tl.math.sqrt_rn(tl.where(dj > floor, dj, 1.0).to(tl.float32))
        e = tl.where(dj > floor, tl.math.div_rn(acc, root), 0.0)
        tl.store(cb + t * n + offs, e, mask=live)
        tl.debug_barrier()  # the row is read back (its entry j by every thread) at the next picks
        d2 = d2 - e * e
        free = free & (offs != j)
        chosen = tl.where(offs == j, 1, chosen)
    store_ascending(idx_ptr + b * kmax, chosen != 0, kb, kmax, BLOCK_N)


def can_launch(t: torch.Tensor) -> bool:
    """CUDA tensors, or CPU tensors when this module was imported under TRITON_INTERPRET=1."""
    return t.is_cuda or (t.device.type == "cpu" and interpreted(_dpp_kernel))


def dpp_greedy_triton(
    kernel: torch.Tensor, ks: list[int], counts: list[int]
) -> torch.Tensor:
    """`dpp_greedy_ref` in one launch (the host lists go over in one asynchronous copy)."""
    _check(kernel, ks, counts)
    b, n, _ = kernel.shape
    if b == 0 or n == 0 or n > MAX_N or not can_launch(kernel):
        return dpp_greedy_ref(kernel, ks, counts)
    ks = [min(k, c) for k, c in zip(ks, counts)]
    kmax = max(ks)
    dev = kernel.device
    idx = torch.empty((b, kmax), dtype=torch.long, device=dev)
    if kmax == 0:
        return idx
    host = to_device([ks, counts], dev)
    lk = kernel.float()
    if lk.stride(2) != 1:
        lk = lk.contiguous()
    scratch = torch.empty((b, kmax, n), dtype=torch.float32, device=dev)
    block = max(16, triton.next_power_of_2(n))
    _dpp_kernel[(b,)](
        lk,
        host[0],
        host[1],
        scratch,
        idx,
        n,
        lk.stride(0),
        lk.stride(1),
        scratch.stride(0),
        kmax,
        EPS_=EPS,
        BLOCK_N=block,
        num_warps=4 if block <= 1024 else 8,
    )
    return idx
