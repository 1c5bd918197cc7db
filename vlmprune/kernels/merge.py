"""VisionZip's split and merge (DESIGN §3, `visionzip`): the dispatcher.

The Triton kernel (`merge_triton`) runs on CUDA, the torch reference (`merge_ref`, with the checks
and constants both use) elsewhere; imports run one way: merge -> merge_triton -> merge_ref."""

from __future__ import annotations

import torch

from vlmprune.kernels.dispatch import use_triton
from vlmprune.kernels.merge_ref import visionzip_merge_ref

__all__ = ["visionzip_merge", "visionzip_merge_ref"]


def visionzip_merge(
    attn: torch.Tensor,
    metric: torch.Tensor,
    feats: torch.Tensor,
    nv: int,
    ki: int,
    n_dom: int,
    n_ctx: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Dispatcher: the Triton path on CUDA (when available), the torch reference elsewhere."""
    if use_triton(attn):
        from vlmprune.kernels.merge_triton import visionzip_merge_triton

        return visionzip_merge_triton(attn, metric, feats, nv, ki, n_dom, n_ctx)
    return visionzip_merge_ref(attn, metric, feats, nv, ki, n_dom, n_ctx)
