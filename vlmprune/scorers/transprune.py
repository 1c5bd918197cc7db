"""TransPrune: visual tokens leave the language model progressively, ranked by how much the
model's modules change them (token transition) and by the instruction's attention."""

from __future__ import annotations

import math

import torch

from vlmprune.scorers.base import EncoderInfo, Request, Scorer, Signals, register
from vlmprune.scorers.cls_attention import check_number, scaled_layers


@register
class TransPruneScorer(Scorer):
    """TransPrune: progressive pruning inside the LLM by Token Transition Variation (TTV) plus
    Instruction-Guided Attention (IGA).

    - TTV of a token at one module (a layer's attention or its MLP), from the module's normed
      input x and output y: (||y|| / ||x||) * exp(1 - cos(x, y)) / Z, with Z the sum of
      exp(1 - cos) over the row's attended tokens at that module; a layer's TTV is the sum over its
      two modules, accumulated (summed) over the layers of `ttv_layers` (0-based, default 6..11:
      the official LLaVA-1.5 setting, 1-based 7..12) that have run before the cut.
    - IGA: the head-mean softmax attention of the cut's own layer K (from its input, before it
      runs, as the official code recomputes it), from the text tokens after the images (the
      instruction), averaged over those rows.
    - Score per image: TTV / sum(TTV over the image) + IGA / sum(IGA over the image); top-k,
      ties to the lower index. `ttv_only=True` drops IGA (no attention at all).
    - Schedule: cuts before layers `layers` (default 7, 9, 12 of 32, scaled to the model's depth,
      `ttv_layers` then follow them); before each but the last an image
      keeps floor(ratio * its tokens entering the decoder) (`ratios`, default 0.875, 0.625: the
      official ones); the last cut keeps the stage's budget (`keep` / `prune_ratio`; the official
      0.125 is prune_ratio=0.875).
    Choices: Z per row over its attended tokens (the official code sums over the batch, run at
    batch 1); the kept tokens keep their position ids (the official code renumbers them)."""

    name = "transprune"
    stage = "decoder"
    paper = "TransPrune: Token Transition Pruning for Efficient Large Vision-Language Model (CVPR), 2026"

    def __init__(self, layers: list[int] | tuple[int, ...] | None = None, ratios: list[float] | tuple[float, ...] = (0.875, 0.625),
                 ttv_layers: list[int] | tuple[int, ...] | None = None, ttv_only: bool = False):
        self.scaled = layers is None  # 7, 9, 12 of 32 layers, scaled to the model's depth (`for_depth`)
        layers = (7, 9, 12) if layers is None else layers
        if not isinstance(layers, (list, tuple)) or not layers or any(
                not isinstance(x, int) or isinstance(x, bool) or x < 1 for x in layers):
            raise TypeError(f"{self.name}: layers must be a non-empty list of ints >= 1, got {layers!r}")
        if list(layers) != sorted(set(layers)):
            raise ValueError(f"{self.name}: layers must be ascending without repeats, got {list(layers)}")
        if not isinstance(ratios, (list, tuple)) or len(ratios) != len(layers) - 1:
            raise ValueError(f"{self.name}: ratios needs one fraction per cut but the last ({len(layers) - 1}), got {ratios!r}")
        self.ratios = tuple(check_number(self.name, "ratios entry", r, 0.0, 1.0) for r in ratios)
        self.ttv_given = ttv_layers is not None
        if ttv_layers is None:
            ttv_layers = tuple(range(max(0, layers[0] - 1), layers[-1]))
        if not isinstance(ttv_layers, (list, tuple)) or any(not isinstance(x, int) or x < 0 for x in ttv_layers):
            raise TypeError(f"{self.name}: ttv_layers must be a list of 0-based decoder layers, got {ttv_layers!r}")
        if not isinstance(ttv_only, bool):
            raise TypeError(f"{self.name}: ttv_only must be True or False, got {ttv_only!r}")
        self.layers, self.ttv_layers, self.ttv_only = tuple(layers), tuple(sorted(set(ttv_layers))), ttv_only

    def for_depth(self, depth: int) -> "TransPruneScorer":
        if not self.scaled or depth == 32:
            return self
        layers = scaled_layers(self.name, tuple(x / 32 for x in self.layers), depth)
        return TransPruneScorer(list(layers), list(self.ratios), list(self.ttv_layers) if self.ttv_given else None,
                                self.ttv_only)

    def schedule(self, kept):
        early = [(layer, lambda n, n0, r=r: min(n, math.floor(r * n0))) for layer, r in zip(self.layers, self.ratios)]
        return early + [(self.layers[-1], lambda n, n0: min(n, kept(n, n0)))]

    def needs(self, info: EncoderInfo) -> Request:
        attn = () if self.ttv_only else self.layers
        return Request(text_attn=attn, text_query="text", text_attn_own=True, transitions=self.ttv_layers)

    def score(self, signals: Signals) -> torch.Tensor:
        n = signals.n_valid.shape[0], signals.features.shape[1]
        ttv = torch.zeros(n, dtype=torch.float32, device=signals.n_valid.device)
        for layer, t in signals.transitions.items():
            z = signals.transition_sums[layer].clamp(min=1e-12)  # [I, 2]
            ttv = ttv + (t[..., 0] * t[..., 1].exp() / z[:, None, :]).sum(-1).to(ttv.device)
        score = ttv / (ttv.sum(1, keepdim=True) + 1e-8)
        if not self.ttv_only and signals.text_attn:
            iga = signals.text_attn[max(signals.text_attn)].float().to(ttv.device)
            score = score + iga / (iga.sum(1, keepdim=True) + 1e-8)
        return score
