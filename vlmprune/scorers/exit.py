"""Visual-token exit: every visual token leaves the language model at one layer."""

from __future__ import annotations

import torch

from vlmprune.scorers.base import Scorer, Selection, Signals, register
from vlmprune.scorers.cls_attention import check_int


@register
class ExitScorer(Scorer):
    """Visual-token exit (DyVTE's idea, training-free): before decoder layer `layer` (default: half
    the depth, 16 of 32)
    every visual token leaves; layers >= `layer` see text only and hold no visual keys in their KV
    cache. The stage's budget is ignored (0 kept). DyVTE trains small networks that decide per
    sample where the visual tokens exit from the text tokens' states; this fixed-layer exit does not
    (`kcenter` then `exit` gives ToDRE's two stages)."""

    name = "exit"
    stage = "decoder"
    paper = "DyVTE: dynamic visual-token exit (its training-free, fixed-layer form), 2025"

    def __init__(self, layer: int | None = None):
        check_int(self.name, "layer", layer, allow_none=True)
        if layer is not None and layer < 1:
            raise ValueError(f"{self.name}: layer must be >= 1, got {layer!r}")
        self.layer = layer

    def for_depth(self, depth: int) -> "ExitScorer":
        return self if self.layer is not None else ExitScorer(max(1, depth // 2))

    def schedule(self, kept):
        return [(self.layer, lambda n, n0: 0)]

    def select(self, signals: Signals, k: torch.Tensor) -> Selection:
        return Selection(indices=torch.zeros(signals.num_images, 0, dtype=torch.long, device=signals.n_valid.device))
