"""Ragged top-k + order-preserving gather (DESIGN §4.1): the dispatcher.

The Triton kernel (`select_triton`) runs on CUDA, the torch reference (`select_ref`, with the checks
and constants both use) elsewhere; imports run one way: select -> select_triton -> select_ref."""

from __future__ import annotations

import torch

from vlmprune.kernels.dispatch import use_triton
from vlmprune.kernels.select_ref import (
    gather_rows,
    pack,
    rank,
    select_tokens_ref,
    to_device,
)

__all__ = [
    "gather_rows",
    "pack",
    "rank",
    "select_tokens",
    "select_tokens_ref",
    "to_device",
]


def select_tokens(
    scores: torch.Tensor,
    feats: torch.Tensor | None,
    k: torch.Tensor,
    valid: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Dispatcher: the Triton kernel on CUDA (when available), the torch reference elsewhere."""
    if use_triton(scores):
        from vlmprune.kernels.select_triton import select_tokens_triton

        return select_tokens_triton(scores, feats, k, valid)
    return select_tokens_ref(scores, feats, k, valid)
