"""One query's attention row per (layer, image), for many layers at once (DESIGN §4, `cls_attention`):
the CLS query against all keys (and FlowCut's CLS value against all values, with value norms),
without the full attention map and without stacking the layers' projections.

Each row p has a query tensor and a key tensor, [I, T, D] each (heads concatenated, as the
projections give them; the query is token 0 of its tensor). Per head h, the logits are
q[i, 0, h] . k[i, t, h] in the inputs' dtype (as SDPA forms them), times `scale` for the first
`scaled` rows; the softmax over t is float32 and the rows are the head mean, [P, I, T] float32.
With `norms_from`, the L2 norms of every token of the key tensors of rows >= norms_from come
back too, [P - norms_from, I, T] float32.

`attention_rows_ref` stacks the layers and runs one GEMM with a block-diagonal query matrix;
`attention_rows` dispatches to the Triton kernel on CUDA, which reads every key tensor where it
lies (a table of their addresses) and so skips the stacked copy. Both round the logits to the
inputs' dtype; the kernel sums each dot product in float32 in its own order, so a logit can
differ from the reference's by one unit in the last place of that dtype."""

from __future__ import annotations

import torch

_HEAD_MASKS: dict[tuple, torch.Tensor] = {}


def head_mask(
    dim: int, heads: int, dtype: torch.dtype, device: torch.device
) -> torch.Tensor:
    """[dim, heads] 0/1: column h selects the channels of head h (heads concatenated)."""
    key = (dim, heads, dtype, str(device))
    if key not in _HEAD_MASKS:
        _HEAD_MASKS[key] = (
            torch.eye(heads, dtype=dtype).repeat_interleave(dim // heads, 0).to(device)
        )
    return _HEAD_MASKS[key]


def _check(queries: list[torch.Tensor], keys: list[torch.Tensor], heads: int) -> None:
    if len(queries) != len(keys) or not keys:
        raise ValueError(
            f"need one query tensor per key tensor, got {len(queries)} and {len(keys)}"
        )
    shape = keys[0].shape
    if len(shape) != 3 or shape[-1] % heads:
        raise ValueError(
            f"key tensors must be [I, T, D] with D divisible by heads={heads}, got {tuple(shape)}"
        )
    if all(t.shape == shape for t in keys) and all(q.shape == shape for q in queries):
        return  # the usual case (projections of one encoder batch), checked at a glance
    for q, k in zip(queries, keys):
        if (
            k.shape != shape
            or q.ndim != 3
            or q.shape[0] != shape[0]
            or q.shape[-1] != shape[-1]
        ):
            raise ValueError(
                f"every key tensor must be {tuple(shape)} and every query tensor [{shape[0]}, T', "
                f"{shape[-1]}]; got {tuple(q.shape)} and {tuple(k.shape)}"
            )


def softmax_mean(logits: torch.Tensor) -> torch.Tensor:
    """[P, I, T, H] logits -> [P, I, T] float32 head-mean softmax over T."""
    return torch.softmax(logits, dim=2, dtype=torch.float32).mean(-1)


def attention_rows_ref(
    queries: list[torch.Tensor],
    keys: list[torch.Tensor],
    heads: int,
    scale: float,
    scaled: int,
    norms_from: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(rows [P, I, T] float32, norms [P - norms_from, I, T] float32 or None): see the module doc."""
    _check(queries, keys, heads)
    p = len(keys)
    i, t, d = keys[0].shape
    stacked = keys[0].unsqueeze(0) if p == 1 else torch.stack(keys)  # [P, I, T, D]
    query = torch.stack([q[:, 0] for q in queries])  # [P, I, D]
    blocks = query.unsqueeze(-1) * head_mask(
        d, heads, query.dtype, query.device
    )  # [P, I, D, H]
    logits = torch.bmm(
        stacked.reshape(p * i, t, d), blocks.reshape(p * i, d, heads)
    ).view(p, i, t, heads)
    if scaled and scale != 1.0:
        logits[:scaled].mul_(scale)
    norms = None
    if norms_from is not None:
        norms = torch.linalg.vector_norm(
            stacked[norms_from:], dim=-1, dtype=torch.float32
        )
    return softmax_mean(logits), norms
