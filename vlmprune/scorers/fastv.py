"""FastV: visual tokens leave the language model at a shallow layer, ranked by the attention the
last prompt token pays them in the layer before."""

from __future__ import annotations

import torch

from vlmprune.scorers.base import EncoderInfo, Request, Scorer, Signals, register
from vlmprune.scorers.cls_attention import check_int

QUERIES = ("last", "text")


@register
class FastVScorer(Scorer):
    """FastV: before decoder layer `layer` (K, default 2), keep the visual tokens with the highest
    head-mean softmax attention from the last prompt token in layer K-1.

    As the official implementation: the attention of layer K-1 (all heads averaged) from the last
    position of the prompt (each row's last column; left padding puts it there) over the whole
    causal, padding-masked prefix, restricted to each image's tokens; top-k per image, ties to the
    lower index. `query="text"` instead averages the rows of the text tokens after each row's last
    visual token (the instruction). Computed from layer K-1's own q/k projections with its rotary
    embedding (no eager attention). The kept tokens keep their position ids; the paper's
    re-ordering choices beyond this are not modelled."""

    name = "fastv"
    stage = "decoder"
    paper = "An Image is Worth 1/2 Tokens After Layer 2: Plug-and-Play Inference Acceleration for LVLMs (FastV, ECCV), 2024"

    def __init__(self, layer: int = 2, query: str = "last"):
        check_int(self.name, "layer", layer)
        if layer < 1:
            raise ValueError(f"{self.name}: layer must be >= 1 (it ranks by layer - 1's attention), got {layer!r}")
        if query not in QUERIES:
            raise ValueError(f"{self.name}: query must be one of {list(QUERIES)}, got {query!r}")
        self.layer, self.query = layer, query

    def needs(self, info: EncoderInfo) -> Request:
        return Request(text_attn=(self.layer - 1,), text_query=self.query)

    def score(self, signals: Signals) -> torch.Tensor:
        return signals.text_attn[self.layer - 1].float()
