"""`cdpruner`: a conditional DPP over the visual tokens, its kernel weighted by instruction relevance
(CDPruner). Its instruction is `Signals.text_embeds`: the input embeddings of each image's row's
text after its last visual token, handed over by every adapter (`Adapter.text_embeddings`)."""

from __future__ import annotations

import torch

from vlmprune.kernels.dpp import dpp_greedy
from vlmprune.kernels.select import to_device
from vlmprune.scorers.base import EncoderInfo, Request, Scorer, Selection, Signals, budget, register
from vlmprune.scorers.cls_attention import check_number

REL_EPS = 1e-6
"""Added to the numerator of the min-max normalised relevance (as the official code does), so the
least relevant token keeps a small positive weight."""


def relevance(feats: torch.Tensor, text: torch.Tensor, counts: list[int], text_counts: list[int],
              negate: bool = False, theta: float | None = None) -> torch.Tensor:
    """[I, N] float32 instruction relevance r of each visual token: the mean over the image's text
    tokens of cos(visual token, text token) (negated with `negate`), min-max normalised over the
    image's valid tokens to (r - min + 1e-6) / (max - min); with `theta`, r -> exp(alpha r) with
    alpha = theta / (2 (1 - theta)). An image without text tokens, or whose relevance is flat,
    gets r = 1 everywhere (the unconditional DPP). Padding tokens get 0."""
    device = feats.device
    n = feats.shape[1]
    x = torch.nn.functional.normalize(feats.float(), dim=-1)
    m = text.shape[1] if text is not None else 0
    nv = to_device(counts, device)
    valid = torch.arange(n, device=device)[None, :] < nv[:, None]
    if m == 0:
        return valid.float()
    tq = torch.nn.functional.normalize(text.to(device).float(), dim=-1)
    nt = to_device(text_counts, device)
    tvalid = (torch.arange(m, device=device)[None, :] < nt[:, None]).float()  # [I, M]
    cos = torch.einsum("ind,imd->inm", x, tq)
    raw = (cos * tvalid[:, None, :]).sum(-1) / nt.clamp(min=1).float()[:, None]
    if negate:
        raw = -raw
    lo = raw.masked_fill(~valid, float("inf")).amin(dim=1, keepdim=True)
    hi = raw.masked_fill(~valid, float("-inf")).amax(dim=1, keepdim=True)
    span = hi - lo
    flat = ~(span > 0) | (nt[:, None] == 0)  # also rows without valid tokens (span -inf) or NaN
    r = torch.where(flat, torch.ones_like(raw), (raw - lo + REL_EPS) / torch.where(flat, torch.ones_like(span), span))
    if theta is not None:
        r = torch.exp(theta / (2 * (1 - theta)) * r)
    return r * valid


def conditional_kernel(feats: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    """[I, N, N] float32 L = diag(r) S diag(r) with S the cosine similarity of the features."""
    x = torch.nn.functional.normalize(feats.float(), dim=-1)
    return r[:, :, None] * torch.bmm(x, x.transpose(1, 2)) * r[:, None, :]


@register
class CDPrunerScorer(Scorer):
    """CDPruner: keep the k visual tokens of the greedy MAP of a conditional DPP, whose kernel is
    the features' cosine similarity weighted by each token's relevance to the instruction.

    - Similarity S: cosine of the post-projector features (`Signals.features`, float32), as the
      official code does after the projector.
    - Relevance r (`relevance`): the mean, over the instruction's text tokens
      (`Signals.text_embeds`: the LLM's input embeddings of the row's text after its last visual
      token, the paper's H_q), of the cosine between a visual token and a text token; min-max
      normalised per image to (r - min + 1e-6) / (max - min). The official LLaVA code compares CLIP's
      projected patch embeddings with CLIP text-tower embeddings of the question and negates the
      cosine (CLIP's patch-text similarity runs opposite); here both sides are in the LLM's input
      space and the sign is the paper's (`negate=True` flips it). The official code normalises over
      the whole batch; we normalise per image, so an image's selection does not depend on its batch.
      `theta` (default None, as the official default): r -> exp(alpha r), alpha = theta / (2(1 - theta)).
    - Kernel L = diag(r) S diag(r); greedy MAP (`vlmprune.kernels.dpp`: Chen et al.'s incremental
      Cholesky, ties to the lower index, gains below 1e-6 of the largest diagonal entry count as
      spent and the rest of the budget takes the remaining tokens in index order). Kept indices
      ascending; k >= n keeps every token.
    - Images without text tokens (or flat relevance) run the unconditional DPP (r = 1)."""

    name = "cdpruner"
    paper = ("Beyond Attention or Similarity: Maximizing Conditional Diversity for Token Pruning in MLLMs "
             "(CDPruner, NeurIPS), 2025")

    def __init__(self, theta: float | None = None, negate: bool = False):
        if theta is not None:
            theta = check_number(self.name, "theta", theta, 0.0, 1.0, hi_open=True)
        if not isinstance(negate, bool):
            raise TypeError(f"{self.name}: negate must be a bool, got {negate!r}")
        self.theta, self.negate = theta, negate

    def needs(self, info: EncoderInfo) -> Request:
        return Request(features=True, text_embeds=True)

    def select(self, signals: Signals, k: torch.Tensor) -> Selection:
        feats = signals.features
        if feats is None:
            raise ValueError(f"{self.name}: needs the visual-token features (signals.features is None)")
        if signals.text_embeds is None:
            raise ValueError(f"{self.name}: needs the prompt's text-token embeddings (signals.text_embeds is None)")
        counts = signals.valid_counts()
        m = signals.text_embeds.shape[1]
        text_counts = list(signals.text_counts) if signals.text_counts is not None else [m] * len(counts)
        ks = budget(k, counts)
        r = relevance(feats, signals.text_embeds, counts, text_counts, self.negate, self.theta)
        idx = dpp_greedy(conditional_kernel(feats, r), ks, counts)
        return Selection(indices=idx)
