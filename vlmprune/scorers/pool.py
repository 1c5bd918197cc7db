"""`pool`: the downsampling baseline: average-pool each image's visual tokens over its 2-D grid."""

from __future__ import annotations

import torch

from vlmprune.kernels.pool import ANCHORS, pool_select
from vlmprune.kernels.select import to_device
from vlmprune.scorers.base import EncoderInfo, Request, Scorer, Selection, Signals, budget, register


@register
class PoolScorer(Scorer):
    """Average pooling over the 2-D token grid to exactly k tokens: the downsampling baseline
    (VTC-Bench). A merging method: each pooled token is the float32 mean of the post-projector
    features of its cell, placed at the cell's anchor token.

    VTC-Bench downsamples the image itself before the encoder (fewer patches); this is its analogue
    in token space: the encoder sees the full image and its tokens are pooled, so every family and
    budget runs without re-encoding.

    - Grid: each image's own (`Signals.image_grids()`; Qwen: the merged-token grid; a video's frames
      stacked as rows, so a cell may span consecutive frames: spatio-temporal pooling). The grid
      must cover the image's tokens.
    - Cells (`vlmprune.kernels.pool`): gh row bands with gh = round(sqrt(k h / w)) (close to the
      grid's aspect ratio, raised until no band needs more cells than columns); band r is cut into
      floor(k/gh) or ceil(k/gh) column cells so that there are exactly k; bands and cells split
      rows and columns as evenly as integers allow (floor boundaries). k = gh x gw is plain block
      pooling (24 x 24 -> 64: 3 x 3 blocks; 4 x 4 -> 4: 2 x 2 blocks); any other k is met by giving
      the later bands one cell more, never by dropping tokens: every token is in exactly one cell.
    - `anchor`: which token index represents a cell (its place, hence its position id under
      `positions="original"` and Qwen's M-RoPE): `"centre"` (default) the cell's central token (the
      upper-left of the central four for even sizes), `"first"` its top-left token. Kept indices
      are ascending.
    - k >= n keeps every token unchanged; k = 0 keeps none."""

    name = "pool"
    merges = True
    paper = ("baseline (downsampling, as in VTC-Bench: Are We Using the Right Benchmark: An Evaluation Framework "
             "for Visual Token Compression Methods, 2025)")

    def __init__(self, anchor: str = "centre"):
        if not isinstance(anchor, str) or anchor not in ANCHORS:
            raise ValueError(f"pool: anchor must be one of {list(ANCHORS)}, got {anchor!r}")
        self.anchor = anchor

    def needs(self, info: EncoderInfo) -> Request:
        return Request(features=True)

    def select(self, signals: Signals, k: torch.Tensor) -> Selection:
        feats = signals.features
        if feats is None:
            raise ValueError("pool: needs the visual-token features (signals.features is None)")
        counts = signals.valid_counts()
        grids = signals.image_grids()
        for i, ((h, w), c) in enumerate(zip(grids, counts)):
            if h * w != c:
                raise ValueError(f"pool: grid {h}x{w} of image {i} does not cover its {c} visual tokens")
        ks = budget(k, counts)
        device = feats.device
        kmax = max(ks, default=0)
        groups: dict[tuple[tuple[int, int], int], list[int]] = {}  # images with one (grid, budget) pool together
        for i, (grid, ki) in enumerate(zip(grids, ks)):
            groups.setdefault((grid, ki), []).append(i)
        if len(groups) == 1:  # the usual batch: one grid and budget, no padding
            ((grid, ki),) = groups
            if grid[0] * grid[1] == feats.shape[1]:
                idx, out = pool_select(feats, grid, ki, self.anchor)
                return Selection(indices=idx.contiguous(), features=out)
        out_idx = torch.full((len(ks), kmax), -1, dtype=torch.long, device=device)
        out_feat = feats.new_zeros(len(ks), kmax, feats.shape[-1])
        for ((h, w), ki), rows in groups.items():
            sel = to_device(rows, device)
            idx, out = pool_select(feats[sel, : h * w], (h, w), ki, self.anchor)
            out_idx[sel, :ki] = idx
            out_feat[sel, :ki] = out
        return Selection(indices=out_idx, features=out_feat)
