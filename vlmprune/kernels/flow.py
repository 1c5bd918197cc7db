"""FlowCut's progressive selection (DESIGN §3, `flowcut`): the dispatcher.

The Triton kernel (`flow_triton`) runs on CUDA, the torch reference (`flow_ref`, with the checks
and constants both use) elsewhere; imports run one way: flow -> flow_triton -> flow_ref."""

from __future__ import annotations

import torch

from vlmprune.kernels.dispatch import use_triton
from vlmprune.kernels.flow_ref import FlowSchedule, flowcut_select_ref

__all__ = ["FlowSchedule", "flowcut_select", "flowcut_select_ref"]


def flowcut_select(
    attn: torch.Tensor,
    sem: torch.Tensor | None,
    dens: torch.Tensor | None,
    k: torch.Tensor,
    valid: torch.Tensor,
    schedule: FlowSchedule,
) -> torch.Tensor:
    """Dispatcher: the Triton kernel on CUDA (when available), the torch reference elsewhere."""
    if use_triton(attn):
        from vlmprune.kernels.flow_triton import flowcut_select_triton

        return flowcut_select_triton(attn, sem, dens, k, valid, schedule)
    return flowcut_select_ref(attn, sem, dens, k, valid, schedule)
