"""Greedy MAP inference of a determinantal point process (CDPruner, DESIGN §3 `cdpruner`): the torch
reference, checks and constants.

For a positive semi-definite kernel L [N, N] over an image's n valid tokens, the greedy MAP picks,
k times, the token j that most increases log det(L_S) of the chosen set S. With Chen et al.'s
incremental Cholesky update (NeurIPS 2018) this is O(k^2 N): d2[i] = L[i, i] is the gain of token i
alone; after picking j, e = (L[j, :] - c_S[:, j] . c_S) / sqrt(d2[j]) becomes a new row of c and
d2 -= e^2, so d2[i] is always det(L_{S+i}) / det(L_S).

Pinned choices: the pick is the largest gain among the unpicked valid tokens, ties to the lower
index; a gain at or below `EPS` times the largest diagonal entry counts as 0 (the kernel's rank is
spent: numerically the remaining gains are rounding noise), so once no gain is above it the
remaining picks take the unpicked tokens in index order and leave d2 unchanged (e = 0). NaN gains
count as 0. Returns the picks sorted ascending, -1 padded to max(ks). ks >= n keeps every token.

`dpp_greedy_ref` does all images at once in torch ops (~10 per pick); `dpp_greedy` dispatches to
the Triton kernel (`dpp_triton.py`, one program per image, one launch) on CUDA."""

from __future__ import annotations

import torch

from vlmprune.kernels.select_ref import to_device

EPS = 1e-6
"""Gains at or below EPS * max_i L[i, i] count as 0."""


def _check(kernel: torch.Tensor, ks: list[int], counts: list[int]) -> None:
    if kernel.ndim != 3 or kernel.shape[1] != kernel.shape[2]:
        raise ValueError(
            f"dpp_greedy: kernel must be [B, N, N], got {tuple(kernel.shape)}"
        )
    b, n, _ = kernel.shape
    if len(ks) != b or len(counts) != b:
        raise ValueError(
            f"dpp_greedy: need one k and one count per image ({b}), got {ks} and {counts}"
        )
    if any(not 0 <= c <= n for c in counts) or any(k < 0 for k in ks):
        raise ValueError(
            f"dpp_greedy: need 0 <= count <= {n} and k >= 0, got counts {counts}, ks {ks}"
        )


def dpp_greedy_ref(
    kernel: torch.Tensor, ks: list[int], counts: list[int]
) -> torch.Tensor:
    """[B, max(ks)] kept indices (ascending, -1 padded): greedy MAP of the DPP with kernel [B, N, N]
    (float32) over each image's first counts[b] tokens, min(ks[b], counts[b]) picks."""
    _check(kernel, ks, counts)
    b, n, _ = kernel.shape
    device = kernel.device
    ks = [min(k, c) for k, c in zip(ks, counts)]
    kmax = max(ks, default=0)
    out = torch.full((b, kmax), -1, dtype=torch.long, device=device)
    if kmax == 0 or n == 0:
        return out
    L = kernel.float()
    pos = torch.arange(n, device=device)
    valid = pos[None, :] < to_device(counts, device)[:, None]
    d2 = torch.diagonal(L, dim1=1, dim2=2).clone()
    floor = EPS * d2.masked_fill(~valid, float("-inf")).amax(dim=1, keepdim=True).clamp(
        min=0
    )  # [B, 1]
    free = valid.clone()
    c = torch.zeros(kmax, b, n, dtype=torch.float32, device=device)
    rows = torch.arange(b, device=device)
    active_at = to_device(ks, device)
    picks = torch.full((kmax, b), -1, dtype=torch.long, device=device)
    for t in range(kmax):
        active = t < active_at  # [B]
        gain = torch.where(d2 > floor, d2, torch.zeros_like(d2)).nan_to_num(nan=0.0)
        gain = gain.masked_fill(~free, float("-inf"))
        j = gain.argmax(
            dim=1
        )  # ties: the lower index; all gains 0: the first free token
        dj = d2[rows, j]
        grow = active & (dj > floor[:, 0])
        num = L[rows, j] - torch.einsum("tb,tbn->bn", c[:t, rows, j], c[:t])
        e = torch.where(
            grow[:, None],
            num / dj.clamp(min=torch.finfo(torch.float32).tiny).sqrt()[:, None],
            torch.zeros_like(num),
        )
        c[t] = e
        d2 = d2 - e * e
        free[rows, j] = free[rows, j] & ~active
        picks[t] = torch.where(active, j, -1)
    chosen = picks.t()
    chosen = torch.where(chosen < 0, n, chosen).sort(dim=1).values
    return torch.where(chosen >= n, -1, chosen)
