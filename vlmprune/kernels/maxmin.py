"""Greedy max-min diversity selection (DESIGN §4.3: DivPrune, seeded k-center): the dispatcher.

The Triton kernel (`maxmin_triton`) runs on CUDA, the torch reference (`maxmin_ref`, with the checks
and constants both use) elsewhere; imports run one way: maxmin -> maxmin_triton -> maxmin_ref."""

from __future__ import annotations

import torch

from vlmprune.kernels.dispatch import use_triton
from vlmprune.kernels.maxmin_ref import (
    NORM_EPS2,
    cosine_distance,
    maxmin_naive_ref,
    maxmin_select_ref,
)

__all__ = [
    "NORM_EPS2",
    "cosine_distance",
    "maxmin_naive_ref",
    "maxmin_select",
    "maxmin_select_ref",
]


def maxmin_select(
    feats: torch.Tensor,
    k: torch.Tensor | int,
    valid: torch.Tensor | None = None,
    first: torch.Tensor | None = None,
    *,
    return_order: bool = False,
):
    """Dispatcher: the Triton kernel on CUDA (when available), the torch reference elsewhere."""
    if use_triton(feats):
        from vlmprune.kernels.maxmin_triton import maxmin_select_triton

        return maxmin_select_triton(feats, k, valid, first, return_order=return_order)
    return maxmin_select_ref(feats, k, valid, first, return_order=return_order)
