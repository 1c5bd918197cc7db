"""HiPrune's selection (DESIGN §3, `hiprune`): the dispatcher.

The Triton kernel (`hiprune_triton`) runs on CUDA, the torch reference (`hiprune_ref`, with the checks
and constants both use) elsewhere; imports run one way: hiprune -> hiprune_triton -> hiprune_ref."""

from __future__ import annotations

import torch

from vlmprune.kernels.dispatch import use_triton
from vlmprune.kernels.hiprune_ref import NEIGHBOURS, hiprune_select_ref

__all__ = ["NEIGHBOURS", "hiprune_select", "hiprune_select_ref"]


def hiprune_select(
    obj: torch.Tensor,
    reg: torch.Tensor,
    ks: list[int],
    counts: list[int],
    slots: list[int],
    grid: tuple[int, int],
) -> torch.Tensor:
    """Dispatcher: the Triton kernel on CUDA (when available), the torch reference elsewhere."""
    if use_triton(obj):
        from vlmprune.kernels.hiprune_triton import hiprune_select_triton

        return hiprune_select_triton(obj, reg, ks, counts, slots, grid)
    return hiprune_select_ref(obj, reg, ks, counts, slots, grid)
