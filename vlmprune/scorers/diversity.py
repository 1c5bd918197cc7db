"""Diversity scorers: keep a subset of visual tokens that covers the feature space, by greedy
max-min selection on the cosine distance of the post-projector features (`maxmin_select`)."""

from __future__ import annotations

import torch

from vlmprune.kernels.maxmin import maxmin_select
from vlmprune.scorers.base import EncoderInfo, Request, Scorer, Selection, Signals, register
from vlmprune.scorers.cls_attention import ClsScorer


def _features(signals: Signals, method: str) -> torch.Tensor:
    if signals.features is None:
        raise ValueError(f"{method}: needs the visual-token features (signals.features is None)")
    return signals.features


@register
class DivPruneScorer(Scorer):
    """DivPrune: greedy max-min diversity on the post-projector visual tokens.

    Distance d(i, j) = 1 - cos(x_i, x_j) in float32. The first kept token is the one farthest
    from its nearest neighbour (argmax_i min_{j != i} d(i, j)); each next one is the token whose
    distance to the nearest already-kept token is largest. Ties go to the lower index; the kept
    indices are returned ascending. Features only; no options."""

    name = "divprune"
    paper = "DivPrune: Diversity-based Visual Token Pruning for Large Multimodal Models (CVPR), 2025"

    def needs(self, info: EncoderInfo) -> Request:
        return Request(features=True)

    def select(self, signals: Signals, k: torch.Tensor) -> Selection:
        feats = _features(signals, self.name)
        idx = maxmin_select(feats, k, torch.tensor(signals.valid_counts()))  # budgets on the host: no sync
        return Selection(indices=idx)


@register
class KCenterScorer(ClsScorer):
    """Greedy k-center (ToDRE stage 1): max-min diversity on 1 - cos of the post-projector
    features, seeded by the token with the highest head-mean CLS attention.

    The seed's attention is read at `layer` (0-based encoder layer, negative counts from the end;
    default: the feature layer). On encoders without a CLS token (Qwen2-VL) the mean attention
    each token receives at that layer replaces it, as for `cls`. Seed ties go to the lower index
    and NaN attention counts as lowest. Then, like `divprune`, each next token is the one farthest
    from the kept set. ToDRE's stage 2 (task relevance inside the LLM) is a separate decoder stage."""

    name = "kcenter"
    paper = "ToDRE: Visual Token Pruning via Diversity and Task Awareness for Efficient Large Vision-Language Models, 2025"

    def needs(self, info: EncoderInfo) -> Request:
        return Request(features=True).merge(super().needs(info))

    def seed(self, signals: Signals) -> torch.Tensor:
        """Per image, the valid token with the highest attention (ties: lower index; NaN lowest)."""
        attn = self.score(signals).float()
        n = attn.shape[1]
        valid = signals.n_valid.to(attn.device)
        pos = torch.arange(n, device=attn.device)
        attn = attn.nan_to_num(nan=float("-inf")).masked_fill(pos[None, :] >= valid[:, None], float("-inf"))
        return attn.argmax(dim=1)

    def select(self, signals: Signals, k: torch.Tensor) -> Selection:
        feats = _features(signals, self.name)
        first = self.seed(signals).to(feats.device)
        # rows with nothing valid keep nothing; their seed is irrelevant
        first = torch.where(signals.n_valid.to(feats.device) > 0, first, torch.zeros_like(first))
        idx = maxmin_select(feats, k, torch.tensor(signals.valid_counts()), first)
        return Selection(indices=idx)
