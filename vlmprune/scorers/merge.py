"""Merging scorers: keep some tokens as they are and fold the others into a few merged tokens."""

from __future__ import annotations

import math

import torch

from vlmprune.kernels.merge import visionzip_merge
from vlmprune.kernels.select import to_device
from vlmprune.scorers.base import EncoderInfo, Request, Scorer, Selection, Signals, budget, register
from vlmprune.scorers.cls_attention import (
    attention,
    attention_request,
    check_int,
    check_number,
    resolve_layer,
)

SIMILARITIES = ("keys", "features")


def split_budget(k: int, contextual_ratio: float) -> tuple[int, int]:
    """(dominant, contextual) for a budget of k tokens: contextual = floor(k * ratio + 1/2)
    (round half up), dominant = the rest. With the default 10/64 this gives the paper's
    54+10 (k=64), 108+20 (k=128) and 162+30 (k=192)."""
    contextual = min(k, math.floor(k * contextual_ratio + 0.5))
    return k - contextual, contextual


@register
class VisionZipScorer(Scorer):
    """VisionZip: `dominant` tokens with the highest CLS attention, plus `contextual` tokens
    that each merge a group of the remaining tokens, so k = dominant + contextual.

    - Dominant: top tokens by head-mean CLS attention at `layer` (0-based, negative counts from
      the end; default the feature layer, as in the paper), ties to the lower index. Chosen among
      the N visual tokens only (the CLS token is not a visual token the decoder sees).
    - Split: contextual = floor(k * contextual_ratio + 1/2), dominant = k - contextual (default
      ratio 10/64, the paper's 54:10); k >= n_valid keeps every token unchanged.
    - Targets: the R remaining tokens in ascending index order, step = R // contextual, and the
      targets are the remaining tokens at positions 0, step, 2*step, ... (contextual of them; the
      paper's uniform sampling).
    - Assignment: every other remaining token joins the target with the highest cosine
      similarity (ties to the lower target index). `similarity="keys"` (default, the paper's
      metric) uses the k_proj output of `layer` with all heads concatenated (the paper averages
      the keys over heads first); `"features"` uses the post-projector features.
    - Merge: the feature placed at a target's index is the plain mean of the post-projector
      features (`signals.features`, computed in float32, cast back) of the target and all tokens
      assigned to it. The paper averages the encoder's hidden states before the projector; since
      the adapter prunes after the projector, we average what the LLM sees. Dominant tokens keep
      their own features.
    On encoders without a CLS token the mean received attention replaces the CLS attention;
    `similarity="keys"` then needs one key row per visual token (use "features" otherwise)."""

    name = "visionzip"
    merges = True
    paper = "VisionZip: Longer is Better but Not Necessary in Vision Language Models (CVPR), 2025"

    def __init__(self, layer: int | None = None, contextual_ratio: float = 10 / 64, similarity: str = "keys"):
        check_int(self.name, "layer", layer, allow_none=True)
        self.layer = layer
        self.contextual_ratio = check_number(self.name, "contextual_ratio", contextual_ratio, 0.0, 1.0)
        if not isinstance(similarity, str) or similarity not in SIMILARITIES:
            raise ValueError(f"{self.name}: similarity must be one of {list(SIMILARITIES)}, got {similarity!r}")
        self.similarity = similarity

    def _layer(self, info: EncoderInfo) -> int:
        return info.feature_layer if self.layer is None else resolve_layer(self.name, "layer", self.layer, info)

    def needs(self, info: EncoderInfo) -> Request:
        layer = self._layer(info)
        req = attention_request(info, (layer,))
        keys = (layer,) if self.similarity == "keys" else ()
        return Request(features=True, cls_attn=req.cls_attn, received_attn=req.received_attn, keys=keys)

    def _metric(self, signals: Signals, layer: int, n: int) -> torch.Tensor:
        """[I, N, *] vectors whose cosine groups the tokens."""
        if self.similarity == "features":
            return signals.features
        if layer not in signals.keys:
            raise ValueError(f"{self.name}: keys of layer {layer} are missing; got layers {sorted(signals.keys)}")
        keys = signals.keys[layer]
        offset = keys.shape[1] - n
        if offset not in (0, 1):
            raise ValueError(
                f"{self.name}: keys of layer {layer} have {keys.shape[1]} rows for {n} visual tokens; "
                f"similarity='keys' needs one row per visual token (plus CLS); use similarity='features'"
            )
        return keys[:, offset:]

    def select(self, signals: Signals, k: torch.Tensor) -> Selection:
        if signals.features is None:
            raise ValueError(f"{self.name}: needs the visual-token features (signals.features is None)")
        feats = signals.features
        device = feats.device
        layer = self._layer(signals.info)
        attn = attention(signals, layer, self.name).to(device)
        n = attn.shape[1]
        metric = self._metric(signals, layer, n).to(device)  # normalised where the cosine is taken
        counts = signals.valid_counts()
        ks = budget(k, counts)
        groups: dict[tuple[int, int], list[int]] = {}  # images with the same (valid tokens, budget) run together
        for i, (nv, ki) in enumerate(zip(counts, ks)):
            groups.setdefault((min(nv, n), ki), []).append(i)
        if len(groups) == 1:  # the usual batch: every image at once, no regrouping
            (nv, ki), = groups
            idx, merged = visionzip_merge(attn, metric, feats, nv, ki, *split_budget(ki, self.contextual_ratio))
            return Selection(indices=idx, features=merged)
        kmax = max(ks, default=0)
        out_idx = torch.full((len(ks), kmax), -1, dtype=torch.long, device=device)
        out_feat = torch.zeros(len(ks), kmax, feats.shape[-1], dtype=feats.dtype, device=device)
        for (nv, ki), rows in groups.items():
            sel = to_device(rows, device)
            idx, merged = visionzip_merge(attn[sel], metric[sel], feats[sel], nv, ki,
                                          *split_budget(ki, self.contextual_ratio))
            out_idx[sel, :ki] = idx
            out_feat[sel, :ki] = merged
        return Selection(indices=out_idx, features=out_feat)
