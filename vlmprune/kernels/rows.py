"""Attention rows of many encoder layers at once (DESIGN §4, `cls_attention`): the dispatcher.

The Triton kernel (`rows_triton`) runs on CUDA, the torch reference (`rows_ref`, with the checks
and constants both use) elsewhere; imports run one way: rows -> rows_triton -> rows_ref."""

from __future__ import annotations

import torch

from vlmprune.kernels.dispatch import use_triton
from vlmprune.kernels.rows_ref import attention_rows_ref

__all__ = ["attention_rows", "attention_rows_ref"]


def attention_rows(
    queries: list[torch.Tensor],
    keys: list[torch.Tensor],
    heads: int,
    scale: float,
    scaled: int,
    norms_from: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Dispatcher: the Triton kernel on CUDA (when available), the torch reference elsewhere."""
    if use_triton(keys[0]):
        from vlmprune.kernels.rows_triton import attention_rows_triton

        return attention_rows_triton(queries, keys, heads, scale, scaled, norms_from)
    return attention_rows_ref(queries, keys, heads, scale, scaled, norms_from)
