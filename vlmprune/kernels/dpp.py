"""Greedy MAP of a determinantal point process (DESIGN §3, `cdpruner`): the dispatcher.

The Triton kernel (`dpp_triton`) runs on CUDA, the torch reference (`dpp_ref`, with the checks
and constants both use) elsewhere; imports run one way: dpp -> dpp_triton -> dpp_ref."""

from __future__ import annotations

import torch

from vlmprune.kernels.dispatch import use_triton
from vlmprune.kernels.dpp_ref import EPS, dpp_greedy_ref

__all__ = ["EPS", "dpp_greedy", "dpp_greedy_ref"]


def dpp_greedy(kernel: torch.Tensor, ks: list[int], counts: list[int]) -> torch.Tensor:
    """Dispatcher: the Triton kernel on CUDA (when available), the torch reference elsewhere."""
    if use_triton(kernel):
        from vlmprune.kernels.dpp_triton import dpp_greedy_triton

        return dpp_greedy_triton(kernel, ks, counts)
    return dpp_greedy_ref(kernel, ks, counts)
