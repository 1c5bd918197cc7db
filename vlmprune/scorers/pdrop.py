"""PyramidDrop: visual tokens leave the language model in stages, a fraction at each."""

from __future__ import annotations

import math

import torch

from vlmprune.scorers.base import EncoderInfo, Request, Scorer, Signals, register
from vlmprune.scorers.cls_attention import check_number, scaled_layers


@register
class PDropScorer(Scorer):
    """PyramidDrop: before each decoder layer of `layers` (default: 8, 16, 24 of 32, LLaVA-1.5-7B's
    four equal stages, scaled to the model's depth) keep the fraction `ratio` (default 0.5) of each image's remaining visual tokens,
    ranked by the head-mean attention of the last prompt token in the layer before.

    PyramidDrop computes that attention inside the stage's first layer from the last instruction
    token's query; we take layer K-1's (as FastV), so that the ranking is ready before layer K runs
    (no second pass over layer K). The schedule is an option: `layers` ascending, `ratio` in (0, 1].
    The stage's `keep` / `prune_ratio` is not used: the budget is the pyramid's."""

    name = "pdrop"
    stage = "decoder"
    paper = "PyramidDrop: Accelerating Your Large Vision-Language Models via Pyramid Visual Redundancy Reduction (CVPR), 2025"

    def __init__(self, layers: list[int] | tuple[int, ...] | None = None, ratio: float = 0.5):
        if layers is None:  # 8, 16, 24 of 32 layers, scaled to the model's depth (`for_depth`)
            self.layers, self.ratio = None, check_number(self.name, "ratio", ratio, 0.0, 1.0, lo_open=True)
            return
        if not isinstance(layers, (list, tuple)) or not layers or any(
                not isinstance(x, int) or isinstance(x, bool) or x < 1 for x in layers):
            raise TypeError(f"{self.name}: layers must be a non-empty list of ints >= 1, got {layers!r}")
        if list(layers) != sorted(set(layers)):
            raise ValueError(f"{self.name}: layers must be ascending without repeats, got {list(layers)}")
        self.layers = tuple(layers)
        self.ratio = check_number(self.name, "ratio", ratio, 0.0, 1.0, lo_open=True)

    def for_depth(self, depth: int) -> "PDropScorer":
        if self.layers is not None:
            return self
        return PDropScorer(list(scaled_layers(self.name, (8 / 32, 16 / 32, 24 / 32), depth)), self.ratio)

    def schedule(self, kept):
        return [(layer, lambda n, n0: min(n, math.floor(n * self.ratio + 0.5))) for layer in self.layers]

    def needs(self, info: EncoderInfo) -> Request:
        layers = self.layers or (8, 16, 24)  # unresolved: shown for a 32-layer decoder
        return Request(text_attn=tuple(layer - 1 for layer in layers))

    def score(self, signals: Signals) -> torch.Tensor:
        return signals.text_attn[max(signals.text_attn)].float()
