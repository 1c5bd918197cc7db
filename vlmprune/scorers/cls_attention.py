"""Scorers that rank visual tokens by the attention the encoder's CLS token pays them."""

from __future__ import annotations

import torch

from vlmprune.scorers.base import EncoderInfo, Request, Scorer, Signals, register


@register
class ClsScorer(Scorer):
    """Head-mean CLS->patch softmax attention inside the feature layer (FasterVLM / VisionZip
    dominant tokens). `layer` (0-based encoder layer) overrides the feature layer. On encoders
    without a CLS token (Qwen2-VL) the mean attention each token receives replaces it."""

    name = "cls"
    paper = "[CLS] Attention is All You Need for Training-Free Visual Token Pruning (FasterVLM), 2024"

    def __init__(self, layer: int | None = None):
        if layer is not None and not isinstance(layer, int):
            raise TypeError(f"cls: layer must be an int or None, got {layer!r}")
        self.layer = layer

    def _layer(self, info: EncoderInfo) -> int:
        return info.feature_layer if self.layer is None else self.layer % info.num_layers

    def needs(self, info: EncoderInfo) -> Request:
        layer = self._layer(info)
        return Request(cls_attn=(layer,)) if info.has_cls else Request(received_attn=(layer,))

    def score(self, signals: Signals) -> torch.Tensor:
        layer = self._layer(signals.info)
        table = signals.cls_attn if signals.info.has_cls else signals.received_attn
        return table[layer]
