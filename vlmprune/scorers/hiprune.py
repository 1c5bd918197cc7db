"""HiPrune: keep tokens chosen by the encoder's hierarchical attention (object layer, then the
output layer)."""

from __future__ import annotations

import math

import torch

from vlmprune.kernels.hiprune import hiprune_select
from vlmprune.kernels.select import to_device
from vlmprune.scorers.base import EncoderInfo, Request, Scorer, Selection, Signals, budget, register
from vlmprune.scorers.cls_attention import (
    attention,
    attention_request,
    check_int,
    check_number,
)


def default_object_layer(info: EncoderInfo) -> int:
    """1-based object layer: 9/24 of the depth with a CLS token (9 for CLIP-L), half the depth
    without (16 for the 32-block Qwen2.5-VL encoder), the paper's settings."""
    if info.has_cls:
        return max(1, math.floor(info.num_layers * 9 / 24 + 0.5))
    return max(1, info.num_layers // 2)


@register
class HiPruneScorer(Scorer):
    """HiPrune: anchors (object-centric middle layer), their spatial buffers, and registers
    (global output layer), filled in that order up to k.

    Per image with budget k (< n_valid; otherwise all tokens are kept):
    - m = min(k, floor(alpha * k + 1/2)) slots for anchors + buffers (`alpha`, default 0.1).
    - Anchors: the ceil(m / 5) tokens with the highest head-mean CLS attention in `object_layer`
      (1-based encoder layer; default 9 of 24 for CLIP-L, scaled with depth), ties to the lower
      index. ceil(m / 5) because an anchor brings at most 4 buffers.
    - Buffers: going through the anchors by descending attention, their 4-neighbours on the
      h x w patch grid in raster order (up, left, right, down), skipping tokens outside the grid,
      invalid or already chosen, until m tokens are chosen. If the neighbours run out first, the
      unused slots go to the registers.
    - Registers: the remaining k - chosen slots, the highest head-mean CLS attention in the
      feature (output) layer among the tokens not chosen yet, ties to the lower index.
    On encoders without a CLS token the mean received attention replaces the CLS attention.
    Each image's own grid (`Signals.grids`) gives its neighbours; a video's frames are stacked as
    rows, so the rows at a frame's edge neighbour the next frame's."""

    name = "hiprune"
    paper = "HiPrune: Training-Free Visual Token Pruning via Hierarchical Attention in Vision-Language Models, 2025"

    def __init__(self, alpha: float = 0.1, object_layer: int | None = None):
        self.alpha = check_number(self.name, "alpha", alpha, 0.0, 1.0)
        check_int(self.name, "object_layer", object_layer, allow_none=True)
        if object_layer is not None and object_layer < 1:
            raise ValueError(f"{self.name}: object_layer is 1-based and must be >= 1, got {object_layer!r}")
        self.object_layer = object_layer

    def _layers(self, info: EncoderInfo) -> tuple[int, int]:
        """(object layer, register layer), both 0-based."""
        one_based = default_object_layer(info) if self.object_layer is None else self.object_layer
        if one_based > info.num_layers:
            raise ValueError(
                f"{self.name}: object_layer={one_based} is beyond this encoder's {info.num_layers} layers "
                f"(1..{info.num_layers})"
            )
        return one_based - 1, info.feature_layer

    def needs(self, info: EncoderInfo) -> Request:
        return attention_request(info, self._layers(info))

    def select(self, signals: Signals, k: torch.Tensor) -> Selection:
        obj_layer, reg_layer = self._layers(signals.info)
        obj = attention(signals, obj_layer, self.name)
        reg = attention(signals, reg_layer, self.name).to(obj.device)
        counts = signals.valid_counts()
        ks = budget(k, counts)
        # per image, on the host: m slots for anchors + buffers (the kernel takes ceil(m / 5) anchors)
        slots = [min(ki, math.floor(self.alpha * ki + 0.5)) for ki in ks]
        grids = signals.image_grids()
        if all(g == grids[0] for g in grids) and grids[0][0] * grids[0][1] == obj.shape[1]:
            return Selection(indices=hiprune_select(obj, reg, ks, counts, slots, grids[0]))
        # images of different grids (Qwen's dynamic resolution): one kernel call per grid
        out = torch.full((len(ks), max(ks, default=0)), -1, dtype=torch.long, device=obj.device)
        for grid in dict.fromkeys(grids):
            rows = [i for i, g in enumerate(grids) if g == grid]
            sel, n = to_device(rows, obj.device), grid[0] * grid[1]
            part = hiprune_select(obj[sel, :n], reg[sel, :n], [ks[i] for i in rows], [counts[i] for i in rows],
                                  [slots[i] for i in rows], grid)
            out[sel, : part.shape[1]] = part
        return Selection(indices=out)
