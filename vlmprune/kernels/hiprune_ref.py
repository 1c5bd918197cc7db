"""HiPrune's selection (DESIGN §3, `hiprune`): the torch reference, checks and constants.

Per image with budget k < n_valid and m anchor + buffer slots: the ceil(m / 5) anchors are the
top tokens of the object layer's attention `obj`; going through them by descending attention,
their 4-neighbours on the h x w grid (up, left, right, down) that are inside the grid, valid and
not chosen yet join until m tokens are chosen; the remaining k - chosen slots are the top tokens
of the register layer's attention `reg` among those not chosen. Ties go to the lower index, NaN
counts lowest; k >= n_valid keeps every valid token.

`hiprune_select_ref` does this for all images at once in torch ops (~50 of them, with no host
loop); `hiprune_select` dispatches to the Triton kernel (`hiprune_triton.py`, one program per
image) on CUDA. Both make the same comparisons only, so they agree exactly."""

from __future__ import annotations

import math

import torch

from vlmprune.kernels.select_ref import pack, rank, to_device

NEIGHBOURS = ((-1, 0), (0, -1), (0, 1), (1, 0))
"""(row, column) steps of an anchor's buffers, in the order they are taken: up, left, right, down."""


def _check(
    obj: torch.Tensor,
    reg: torch.Tensor,
    ks: list[int],
    counts: list[int],
    slots: list[int],
    grid: tuple[int, int],
) -> None:
    if obj.ndim != 2 or reg.shape != obj.shape:
        raise ValueError(
            f"obj and reg must both be [I, N], got {tuple(obj.shape)} and {tuple(reg.shape)}"
        )
    i, n = obj.shape
    if not len(ks) == len(counts) == len(slots) == i:
        raise ValueError(
            f"ks, counts and slots need one entry per image ({i}), got {len(ks)}, {len(counts)}, {len(slots)}"
        )
    if grid[0] * grid[1] != n:
        raise ValueError(
            f"grid {grid[0]}x{grid[1]} does not cover the {n} visual tokens"
        )
    bad = [
        (k, c, m)
        for k, c, m in zip(ks, counts, slots)
        if not (0 <= k <= c and 0 <= m <= k)
    ]
    if bad:
        raise ValueError(
            f"need 0 <= slots <= k <= count per image, got (k, count, slots) = {bad}"
        )


def hiprune_select_ref(
    obj: torch.Tensor,
    reg: torch.Tensor,
    ks: list[int],
    counts: list[int],
    slots: list[int],
    grid: tuple[int, int],
) -> torch.Tensor:
    """Kept indices [I, max(ks)] (ascending, -1 padded). `ks` (clipped to `counts`), `counts`
    (valid tokens) and `slots` (m) are host lists, so nothing waits for the device."""
    _check(obj, reg, ks, counts, slots, grid)
    device = obj.device
    n = obj.shape[1]
    h, w = grid
    n_valid = to_device(counts, device)
    valid = torch.arange(n, device=device)[None, :] < n_valid[:, None]
    full = [ki >= nv for ki, nv in zip(ks, counts)]
    m = [0 if f else mi for f, mi in zip(full, slots)]
    n_anchor = [math.ceil(mi / 5) for mi in m]
    a = max(n_anchor, default=0)
    chosen = torch.zeros_like(valid)
    if a > 0:
        anchors = rank(obj, valid)[:, :a]  # [I, A] by descending object-layer attention
        cand, ok = _candidates(anchors, to_device(n_anchor, device), n_valid, h, w)
        # a candidate counts if no earlier candidate is the same token; take them in order up to m
        same = (cand[:, :, None] == cand[:, None, :]) & ok[:, None, :]
        earlier = torch.ones(
            cand.shape[1], cand.shape[1], dtype=torch.bool, device=device
        ).tril(-1)
        new = ok & ~(same & earlier).any(-1)
        take = new & (new.cumsum(1) <= to_device(m, device)[:, None])
        slots_ = torch.zeros(
            valid.shape[0], n + 1, dtype=torch.bool, device=device
        )  # column n: not taken
        chosen = slots_.scatter(1, torch.where(take, cand, n), True)[:, :n]
    # registers: the top `rest` of the deep layer's attention among the valid tokens not chosen
    rest = to_device(ks, device) - chosen.sum(1)
    order = rank(reg, valid & ~chosen)
    keep = chosen | torch.zeros_like(chosen).scatter(
        1, order, torch.arange(n, device=device)[None, :] < rest[:, None]
    )
    keep = torch.where(to_device(full, device, torch.bool)[:, None], valid, keep)
    return pack(keep, max(ks, default=0))


def _candidates(
    anchors: torch.Tensor, n_anchor: torch.Tensor, n_valid: torch.Tensor, h: int, w: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """The anchors, then each anchor's 4-neighbours in anchor order: token indices [I, 5A] and
    whether each is usable (a real anchor of the image, or a neighbour inside the grid and among
    the valid tokens)."""
    _, a = anchors.shape
    device = anchors.device
    is_anchor = torch.arange(a, device=device)[None, :] < n_anchor[:, None]  # [I, A]
    r, c = anchors // w, anchors % w
    dr = to_device([s[0] for s in NEIGHBOURS], device)
    dc = to_device([s[1] for s in NEIGHBOURS], device)
    nr, nc = r[:, :, None] + dr, c[:, :, None] + dc  # [I, A, 4]
    nb = nr * w + nc
    nb_ok = (
        is_anchor[:, :, None]
        & (nr >= 0)
        & (nr < h)
        & (nc >= 0)
        & (nc < w)
        & (nb < n_valid[:, None, None])
    )
    return torch.cat([anchors, nb.flatten(1)], 1), torch.cat(
        [is_anchor, nb_ok.flatten(1)], 1
    )
