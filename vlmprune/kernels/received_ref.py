"""Received attention (DESIGN §4.4, for encoders without CLS): for every token of a sequence, the
head- and query-mean softmax attention it receives, from one layer's q and k.

`received_attention_ref` chunks the queries (the full T x T map never exists at once, but each
chunk's [I, H, chunk, T] float32 logits do); `received_attention` dispatches to the Triton kernel
(`received_triton.py`) on CUDA, which never writes a logit: one pass per query block finds each
query's log-sum-exp, a second per key block sums exp(logit - lse) over all queries."""

from __future__ import annotations

import torch


def _check(q: torch.Tensor, k: torch.Tensor, heads: int) -> None:
    if q.ndim != 3 or k.shape != q.shape or q.shape[-1] % heads:
        raise ValueError(
            f"q and k must both be [I, T, H*d] with H={heads} dividing the last dim, got "
            f"{tuple(q.shape)} and {tuple(k.shape)}"
        )


def received_attention_ref(
    q: torch.Tensor, k: torch.Tensor, heads: int, scale: float, chunk: int = 1024
) -> torch.Tensor:
    """[I, T] float32: the mean over heads and queries of softmax(q k^T * scale) per key token;
    q, k [I, T, H*d] (heads concatenated)."""
    _check(q, k, heads)
    i, t, _ = q.shape
    qh = q.unflatten(-1, (heads, -1)).transpose(1, 2)  # [I, H, T, d]
    kh = k.unflatten(-1, (heads, -1)).transpose(1, 2)
    total = torch.zeros(i, t, dtype=torch.float32, device=q.device)
    for s in range(0, t, chunk):
        logits = torch.matmul(qh[:, :, s : s + chunk], kh.transpose(2, 3)) * scale
        total += torch.softmax(logits, dim=-1, dtype=torch.float32).sum(dim=(1, 2))
    return total / (heads * t)
