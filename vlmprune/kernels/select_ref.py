"""Ragged top-k + order-preserving gather (DESIGN §4.1): the torch reference, checks and constants."""

from __future__ import annotations

import torch


def _check(
    scores: torch.Tensor,
    feats: torch.Tensor | None,
    k: torch.Tensor,
    valid: torch.Tensor | None,
):
    if scores.ndim != 2:
        raise ValueError(f"scores must be [B, N], got shape {tuple(scores.shape)}")
    if feats is not None and feats.shape[:2] != scores.shape:
        raise ValueError(
            f"feats {tuple(feats.shape)} must be [B, N, D] with [B, N] = {tuple(scores.shape)}"
        )
    if k.shape != scores.shape[:1]:
        raise ValueError(
            f"k must be [B] = [{scores.shape[0]}], got shape {tuple(k.shape)}"
        )
    if (k < 0).any():
        raise ValueError(f"k must be >= 0, got {k.tolist()}")
    if valid is not None and valid.shape != k.shape:
        raise ValueError(f"valid must be [B], got shape {tuple(valid.shape)}")


def effective_k(
    scores: torch.Tensor, k: torch.Tensor, valid: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(k clipped to the valid count, valid count) per row, as int64 on the scores' device."""
    n = scores.shape[1]
    valid = torch.full_like(k, n) if valid is None else valid
    valid = valid.to(device=scores.device, dtype=torch.long).clamp(max=n)
    return torch.minimum(k.to(device=scores.device, dtype=torch.long), valid), valid


def to_device(values, device, dtype: torch.dtype = torch.long) -> torch.Tensor:
    """Host values (a list or a CPU tensor) on `device`, without waiting for it: to a CUDA device
    through a pinned staging copy sent asynchronously (a plain `.to()` from pageable memory
    synchronises the stream, which on the host-bound scoring path costs more than the copy)."""
    t = (
        values
        if isinstance(values, torch.Tensor)
        else torch.tensor(values, dtype=dtype)
    )
    device = torch.device(device)
    if device.type != "cuda" or t.device.type != "cpu":
        return t.to(device)
    row = t.tolist() if t.ndim == 1 and t.numel() <= 64 else []
    if row and row.count(row[0]) == len(
        row
    ):  # the usual case: one value per image (k, a count)
        return torch.full(
            t.shape, row[0], dtype=t.dtype, device=device
        )  # a fill: no staging copy
    return t.pin_memory().to(device, non_blocking=True)


def gather_rows(
    feats: torch.Tensor, idx: torch.Tensor, padded: bool = True
) -> torch.Tensor:
    """feats[b, idx[b, j]] with zeros where idx is -1 (padding); `padded=False` promises there is
    none (every row full, known on the host), which saves three launches."""
    safe = idx.clamp(min=0) if padded else idx
    out = torch.gather(feats, 1, safe.unsqueeze(-1).expand(-1, -1, feats.shape[-1]))
    return out.masked_fill((idx < 0).unsqueeze(-1), 0) if padded else out


def rank(scores: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
    """Per row, all N token indices ordered: allowed tokens first by descending score (ties to
    the lower index, NaN lowest), then the disallowed ones. [I, N] long."""
    s = scores.float().nan_to_num(nan=float("-inf"))
    order = torch.sort(s, dim=1, descending=True, stable=True).indices
    ok = allowed.gather(1, order).to(torch.int8)
    return order.gather(1, torch.sort(ok, dim=1, descending=True, stable=True).indices)


def pack(keep: torch.Tensor, width: int | None = None) -> torch.Tensor:
    """[I, N] bool mask -> [I, width] ascending indices, padded with -1. `width` defaults to the
    largest count (a host sync); pass it when every row's count is known."""
    n = keep.shape[1]
    kmax = (
        width if width is not None else int(keep.sum(1).max()) if keep.shape[0] else 0
    )
    pos = torch.arange(n, device=keep.device).expand_as(keep)
    idx = torch.sort(torch.where(keep, pos, n), dim=1).values[:, :kmax]
    return idx.masked_fill(idx == n, -1)


def select_tokens_ref(
    scores: torch.Tensor,
    feats: torch.Tensor | None,
    k: torch.Tensor,
    valid: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Keep the k[b] highest scores among the first valid[b] tokens of each row.

    Returns idx [B, kmax] (ascending, -1 padded) and feats gathered at idx (zero padded), where
    kmax = max(k). Ties go to the lower index; NaN counts as lowest."""
    _check(scores, feats, k, valid)
    k, valid = effective_k(scores, k, valid)
    b, n = scores.shape
    kmax = int(k.max()) if b else 0
    s = scores.float().nan_to_num(
        nan=float("-inf"), posinf=float("inf"), neginf=float("-inf")
    )
    pos = torch.arange(n, device=scores.device)
    s = s.masked_fill(pos[None, :] >= valid[:, None], float("-inf"))
    # stable descending sort: among equal scores the lower index comes first
    order = torch.sort(s, dim=1, descending=True, stable=True).indices[:, :kmax]
    rank = torch.arange(kmax, device=scores.device)
    order = order.masked_fill(rank[None, :] >= k[:, None], n)
    idx = torch.sort(order, dim=1).values
    idx = idx.masked_fill(idx == n, -1)
    out = gather_rows(feats, idx) if feats is not None else None
    return idx, out
