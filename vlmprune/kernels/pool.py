"""Average pooling of an image's visual tokens over its 2-D grid down to exactly k tokens (DESIGN §3,
`pool`): the cell plan (`pool_plan`, on the host, cached) and the pooling (`pool_tokens_ref`).

The cells of an h x w grid for a budget 1 <= k <= h*w:
- gh row bands: gh = round-half-up(sqrt(k * h / w)) clipped to [1, min(h, k)], raised until
  ceil(k / gh) <= w (so cells keep close to the grid's aspect ratio and no band needs more cells
  than it has columns). Band r holds rows [r*h // gh, (r+1)*h // gh).
- band r is cut into c_r = (r+1)*k // gh - r*k // gh column cells (floor(k/gh) or ceil(k/gh); the
  wider bands come last), cell c holding columns [c*w // c_r, (c+1)*w // c_r). So there are exactly
  k cells, every token lies in exactly one, and k = gh*gw gives the plain gh x gw block pooling
  (a 24 x 24 grid to 64 tokens: 3 x 3 blocks).
- the pooled token sits at its cell's anchor: `"centre"`, the token at row (r0 + r1 - 1) // 2 and
  column (c0 + c1 - 1) // 2 (the upper-left of the four central tokens of an even-sized cell), or
  `"first"`, its top-left token. Either way the anchors are ascending in raster order.
The pooled feature is the float32 mean of the cell's features (their sum over the cell, divided by
its size), cast back to the features' dtype. A gather of each cell's tokens (a [k, smax] table,
-1 padded) and a masked sum: no atomics, so the result is the same on every run."""

from __future__ import annotations

import functools
import math

import torch

from vlmprune.kernels.select_ref import to_device

ANCHORS = ("centre", "first")


def row_bands(h: int, w: int, k: int) -> int:
    """The number of row bands gh of the plan for k cells on an h x w grid (1 <= k <= h*w)."""
    gh = max(1, min(h, k, math.floor(math.sqrt(k * h / w) + 0.5)))
    while -(-k // gh) > w:
        gh += 1
    return gh


@functools.lru_cache(maxsize=256)
def pool_plan(
    h: int, w: int, k: int, anchor: str = "centre"
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(anchors [k] ascending raster indices, table [k, smax] each cell's raster indices ascending
    and -1 padded, sizes [k]) on the host, for 1 <= k <= h*w. Cached: callers must not write them."""
    if anchor not in ANCHORS:
        raise ValueError(f"pool: anchor must be one of {list(ANCHORS)}, got {anchor!r}")
    if not (1 <= k <= h * w):
        raise ValueError(f"pool: need 1 <= k <= {h}*{w}, got k={k}")
    gh = row_bands(h, w, k)
    anchors, cells = [], []
    for r in range(gh):
        r0, r1 = r * h // gh, (r + 1) * h // gh
        c_r = (r + 1) * k // gh - r * k // gh
        for c in range(c_r):
            c0, c1 = c * w // c_r, (c + 1) * w // c_r
            row, col = (
                ((r0 + r1 - 1) // 2, (c0 + c1 - 1) // 2)
                if anchor == "centre"
                else (r0, c0)
            )
            anchors.append(row * w + col)
            cells.append([i * w + j for i in range(r0, r1) for j in range(c0, c1)])
    smax = max(len(c) for c in cells)
    table = torch.tensor([c + [-1] * (smax - len(c)) for c in cells], dtype=torch.long)
    return (
        torch.tensor(anchors, dtype=torch.long),
        table,
        torch.tensor([len(c) for c in cells], dtype=torch.long),
    )


def pool_tokens_ref(
    feats: torch.Tensor, table: torch.Tensor, sizes: torch.Tensor
) -> torch.Tensor:
    """[G, k, D] in feats' dtype: for each cell (a row of `table`, -1 padded), the float32 mean of
    feats[g, cell] over its `sizes` tokens. feats [G, N, D]; table and sizes on feats' device."""
    g, _, d = feats.shape
    k, smax = table.shape
    picked = torch.gather(
        feats, 1, table.clamp(min=0).reshape(1, -1, 1).expand(g, -1, d)
    ).float()
    picked = picked.view(g, k, smax, d).masked_fill((table < 0)[None, :, :, None], 0.0)
    return (picked.sum(2) / sizes.to(picked.dtype)[None, :, None]).to(feats.dtype)


def pool_select(
    feats: torch.Tensor, grid: tuple[int, int], k: int, anchor: str = "centre"
) -> tuple[torch.Tensor, torch.Tensor]:
    """([G, k] anchors ascending, [G, k, D] pooled features) for G images sharing an h x w grid that
    covers feats' N = h*w tokens; k >= N keeps the first k (all) tokens unchanged, k = 0 keeps none."""
    g, n, d = feats.shape
    h, w = grid
    if h * w != n:
        raise ValueError(f"pool: grid {h}x{w} does not cover the {n} tokens")
    device = feats.device
    if k >= n:
        return torch.arange(n, device=device).expand(g, n), feats
    if k <= 0:
        return torch.empty(g, 0, dtype=torch.long, device=device), feats.new_zeros(
            g, 0, d
        )
    anchors, table, sizes = pool_plan(h, w, k, anchor)
    out = pool_tokens_ref(feats, to_device(table, device), to_device(sizes, device))
    return to_device(anchors, device).expand(g, k), out
