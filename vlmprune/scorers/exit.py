"""Visual-token exit: the visual tokens leave the language model at one layer, fixed or where the
prompt stops looking at them."""

from __future__ import annotations

import torch

from vlmprune.scorers.base import EncoderInfo, Request, Scorer, Selection, Signals, register
from vlmprune.scorers.cls_attention import check_int, check_number


@register
class ExitScorer(Scorer):
    """Visual-token exit (DyVTE's idea, training-free).

    - Fixed (default): before decoder layer `layer` (default: half the depth, 16 of 32) every
      visual token leaves; layers >= `layer` see text only and hold no visual keys in their KV
      cache. The stage's budget is ignored (0 kept).
    - `threshold=t`: before every layer K from `layer` (default 2 here: FastV's observation that
      the prompt's attention to the image collapses after layer 2) to the last, an image's tokens
      all leave once the attention mass the last prompt token pays them in layer K-1 (head-mean
      softmax, summed over the image's remaining tokens) is below t; until then all stay. Each
      image exits on its own layer; a check costs one host sync (the kept counts).
    DyVTE trains small networks that decide per sample where the visual tokens exit from the text
    tokens' states; neither form here learns anything (`kcenter` then `exit` gives ToDRE's two
    stages)."""

    name = "exit"
    stage = "decoder"
    paper = "DyVTE: dynamic visual-token exit (its training-free forms: a fixed layer, an attention threshold), 2025"

    def __init__(self, layer: int | None = None, threshold: float | None = None):
        check_int(self.name, "layer", layer, allow_none=True)
        if layer is not None and layer < 1:
            raise ValueError(f"{self.name}: layer must be >= 1, got {layer!r}")
        if threshold is not None:
            threshold = check_number(self.name, "threshold", threshold, 0.0, 1.0)
        self.layer, self.threshold = layer, threshold
        self._depth: int | None = None

    def for_depth(self, depth: int) -> "ExitScorer":
        if self.threshold is None:
            return self if self.layer is not None else ExitScorer(max(1, depth // 2))
        scorer = ExitScorer(self.layer if self.layer is not None else min(2, depth - 1), self.threshold)
        scorer._depth = depth
        return scorer

    def checked(self) -> tuple[int, ...]:
        """The layers the visual tokens may leave before."""
        if self.threshold is None:
            return (self.layer,)
        return tuple(range(self.layer, self._depth if self._depth is not None else 32))

    def schedule(self, kept):
        if self.threshold is None:
            return [(self.layer, lambda n, n0: 0)]
        return [(layer, lambda n, n0: None) for layer in self.checked()]  # None: the selection decides

    def needs(self, info: EncoderInfo) -> Request:
        if self.threshold is None:
            return Request()
        return Request(text_attn=tuple(layer - 1 for layer in self.checked()))

    def select(self, signals: Signals, k: torch.Tensor) -> Selection:
        device = signals.n_valid.device
        if self.threshold is None:
            return Selection(indices=torch.zeros(signals.num_images, 0, dtype=torch.long, device=device))
        attn = signals.text_attn[max(signals.text_attn)].float()
        stay = attn.sum(1) >= self.threshold  # [I]
        n = attn.shape[1]
        cols = torch.arange(n, device=attn.device)[None, :]
        keep = (cols < signals.n_valid.to(attn.device)[:, None]) & stay[:, None]
        return Selection(indices=torch.where(keep, cols, -1))
