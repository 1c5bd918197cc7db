"""Triton implementation of `vlmprune.kernels.received.received_attention`.

Two passes over the [T, T] logits of each (image, head), neither of which stores them:
`_lse_kernel` (a program per block of queries) keeps a running max and sum of exp over the key
blocks and writes each query's log-sum-exp; `_colsum_kernel` (a program per block of keys) sums
exp(logit - lse) over every query block, i.e. the attention each key receives from all queries.
Logits are float32 dot products of the inputs (tl.dot), scaled; padded rows and columns (beyond T,
or beyond the head dim) are masked."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from vlmprune.kernels.dispatch import interpreted
from vlmprune.kernels.received_ref import _check, received_attention_ref


@triton.jit
def _lse_kernel(
    q_ptr,
    k_ptr,
    lse_ptr,
    t,
    d,
    scale,
    stride_g,
    stride_t,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    gh = tl.program_id(0)  # (image, head): q/k rows of [T, d] at gh * stride_g
    rows = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    dims = tl.arange(0, BLOCK_D)
    q = tl.load(
        q_ptr + gh * stride_g + rows[:, None] * stride_t + dims[None, :],
        mask=(rows[:, None] < t) & (dims[None, :] < d),
        other=0.0,
    ).to(tl.float32)
    m = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    s = tl.zeros((BLOCK_M,), tl.float32)
    for start in range(0, t, BLOCK_N):
        cols = start + tl.arange(0, BLOCK_N)
        k = tl.load(
            k_ptr + gh * stride_g + cols[:, None] * stride_t + dims[None, :],
            mask=(cols[:, None] < t) & (dims[None, :] < d),
            other=0.0,
        ).to(tl.float32)
        logits = tl.dot(q, tl.trans(k)) * scale
        logits = tl.where(cols[None, :] < t, logits, float("-inf"))
        new_m = tl.maximum(m, tl.max(logits, axis=1))
        s = s * tl.exp(m - new_m) + tl.sum(tl.exp(logits - new_m[:, None]), axis=1)
        m = new_m
    tl.store(lse_ptr + gh * t + rows, m + tl.log(s), mask=rows < t)


@triton.jit
def _colsum_kernel(
    q_ptr,
    k_ptr,
    lse_ptr,
    out_ptr,
    t,
    d,
    scale,
    stride_g,
    stride_t,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    gh = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    dims = tl.arange(0, BLOCK_D)
    k = tl.load(
        k_ptr + gh * stride_g + cols[:, None] * stride_t + dims[None, :],
        mask=(cols[:, None] < t) & (dims[None, :] < d),
        other=0.0,
    ).to(tl.float32)
    acc = tl.zeros((BLOCK_N,), tl.float32)
    for start in range(0, t, BLOCK_M):
        rows = start + tl.arange(0, BLOCK_M)
        q = tl.load(
            q_ptr + gh * stride_g + rows[:, None] * stride_t + dims[None, :],
            mask=(rows[:, None] < t) & (dims[None, :] < d),
            other=0.0,
        ).to(tl.float32)
        lse = tl.load(lse_ptr + gh * t + rows, mask=rows < t, other=float("inf"))
        p = tl.exp(
            tl.dot(q, tl.trans(k)) * scale - lse[:, None]
        )  # rows beyond T: exp(-inf) = 0
        acc += tl.sum(p, axis=0)
    tl.store(out_ptr + gh * t + cols, acc, mask=cols < t)


def can_launch(t: torch.Tensor) -> bool:
    """CUDA tensors, or CPU tensors when this module was imported under TRITON_INTERPRET=1."""
    return t.is_cuda or (t.device.type == "cpu" and interpreted(_lse_kernel))


def received_attention_triton(
    q: torch.Tensor, k: torch.Tensor, heads: int, scale: float
) -> torch.Tensor:
    """`received_attention_ref` in two Triton passes (see the module doc); [I, T] float32."""
    _check(q, k, heads)
    if not can_launch(q):
        return received_attention_ref(q, k, heads, scale)
    i, t, width = q.shape
    d = width // heads
    # [I * H, T, d] contiguous per (image, head)
    qh = q.unflatten(-1, (heads, d)).transpose(1, 2).contiguous().view(i * heads, t, d)
    kh = k.unflatten(-1, (heads, d)).transpose(1, 2).contiguous().view(i * heads, t, d)
    block_d = max(16, triton.next_power_of_2(d))
    block = 64 if block_d <= 128 else 32
    lse = torch.empty(i * heads, t, dtype=torch.float32, device=q.device)
    out = torch.empty(i * heads, t, dtype=torch.float32, device=q.device)
    grid = (i * heads, triton.cdiv(t, block))
    _lse_kernel[grid](
        qh,
        kh,
        lse,
        t,
        d,
        float(scale),
        t * d,
        d,
        BLOCK_M=block,
        BLOCK_N=block,
        BLOCK_D=block_d,
    )
    _colsum_kernel[grid](
        qh,
        kh,
        lse,
        out,
        t,
        d,
        float(scale),
        t * d,
        d,
        BLOCK_M=block,
        BLOCK_N=block,
        BLOCK_D=block_d,
    )
    return out.view(i, heads, t).sum(1) / (heads * t)
