"""Received attention (DESIGN §4.4, for encoders without CLS): the dispatcher.

The Triton kernel (`received_triton`) runs on CUDA, the torch reference (`received_ref`, with the checks
and constants both use) elsewhere; imports run one way: received -> received_triton -> received_ref."""

from __future__ import annotations

import torch

from vlmprune.kernels.dispatch import use_triton
from vlmprune.kernels.received_ref import received_attention_ref

__all__ = ["received_attention", "received_attention_ref"]


def received_attention(
    q: torch.Tensor, k: torch.Tensor, heads: int, scale: float
) -> torch.Tensor:
    """Dispatcher: the Triton kernels on CUDA (when available), the torch reference elsewhere."""
    if use_triton(q):
        from vlmprune.kernels.received_triton import (
            can_launch,
            received_attention_triton,
        )

        if can_launch(q):
            return received_attention_triton(q, k, heads, scale)
    return received_attention_ref(q, k, heads, scale)
