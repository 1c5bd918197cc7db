"""Baselines that read no model signal: `random` and `uniform`."""

from __future__ import annotations

import functools
import math

import torch

from vlmprune.kernels.select import to_device
from vlmprune.scorers.base import Scorer, Selection, Signals, budget, register


@register
class RandomScorer(Scorer):
    """Uniform random subset. The scores come from a generator seeded with `seed` for every
    image, so a given image keeps the same tokens alone or inside any batch."""

    name = "random"
    paper = "baseline"

    def __init__(self, seed: int = 0):
        if not isinstance(seed, int):
            raise TypeError(f"random: seed must be an int, got {seed!r}")
        self.seed = seed
        self._rows: dict[tuple[int, str], torch.Tensor] = {}  # (tokens, device) -> the scores, made once

    def score(self, signals: Signals) -> torch.Tensor:
        key = (signals.num_tokens, str(signals.n_valid.device))
        if key not in self._rows:
            row = torch.rand(signals.num_tokens, generator=torch.Generator().manual_seed(self.seed))
            self._rows[key] = to_device(row, signals.n_valid.device)
        return self._rows[key].expand(signals.num_images, -1)  # read only: the selection never writes it


@functools.lru_cache(maxsize=256)
def strided_grid(h: int, w: int, k: int) -> torch.Tensor:
    """k raster indices spread evenly over an h x w grid (ascending).

    A gh x gw lattice of cell centres with gh/gw close to h/w and gh*gw >= k is laid over the grid;
    when it has more than k points, k of them are taken at even strides along its raster order.
    Cached (a pure function of h, w, k; callers copy out of the returned tensor)."""
    n = h * w
    k = max(0, min(k, n))
    if k == 0:
        return torch.empty(0, dtype=torch.long)
    gh = max(1, min(h, round(math.sqrt(k * h / w))))
    gw = min(w, math.ceil(k / gh))
    while gh * gw < k:
        gh = min(h, gh + 1)
        gw = min(w, math.ceil(k / gh))
    rows = ((torch.arange(gh, dtype=torch.float64) + 0.5) * h / gh).floor().long()
    cols = ((torch.arange(gw, dtype=torch.float64) + 0.5) * w / gw).floor().long()
    lattice = (rows[:, None] * w + cols[None, :]).flatten()
    m = lattice.numel()
    pick = ((torch.arange(k, dtype=torch.float64) + 0.5) * m / k).floor().long()
    return lattice[pick]


@register
class UniformScorer(Scorer):
    """Evenly strided subset over the 2-D token grid: the pooling baseline. Each image uses its
    own grid (Qwen: the merged-token grid; a video's frames stacked as rows, so the lattice
    spreads over frames as well as space)."""

    name = "uniform"
    paper = "baseline"

    def select(self, signals: Signals, k: torch.Tensor):
        counts = signals.valid_counts()
        grids = signals.image_grids()
        for i, ((h, w), c) in enumerate(zip(grids, counts)):
            if h * w != c:
                raise ValueError(f"uniform: grid {h}x{w} of image {i} does not cover its {c} visual tokens")
        ks = budget(k, counts)  # on the host: no device sync
        idx = torch.full((signals.num_images, max(ks, default=0)), -1, dtype=torch.long)
        for i, (ki, (h, w)) in enumerate(zip(ks, grids)):
            idx[i, :ki] = strided_grid(h, w, ki)
        return Selection(indices=to_device(idx, signals.n_valid.device))
