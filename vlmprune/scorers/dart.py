"""DART: at a shallow decoder layer keep a few pivot tokens and the visual tokens least like them
(duplication, not importance, decides what goes)."""

from __future__ import annotations

import torch
from torch.nn import functional as F

from vlmprune.scorers.base import EncoderInfo, Request, Scorer, Selection, Signals, budget, register
from vlmprune.scorers.cls_attention import check_int


def quotas(k: int, image_pivots: int, text_pivots: int) -> list[int]:
    """How many tokens each pivot adds (image pivots first, then text pivots): the k - image_pivots
    tokens beyond the image pivots, split as evenly as possible, earlier pivots one more."""
    pivots, rest = image_pivots + text_pivots, k - image_pivots
    if pivots == 0 or rest <= 0:
        return [0] * pivots
    return [rest // pivots + (j < rest % pivots) for j in range(pivots)]


@register
class DartScorer(Scorer):
    """DART (duplication-aware token reduction), training-free, at decoder layer `layer` (K,
    default 2 as the official LLaVA-1.5 setting):

    - Pivots: the `pivot_image` (4) visual tokens and the `pivot_text` (4) instruction tokens (the
      text after the row's last visual token) with the largest L1 norm of their key in layer K-1
      (all heads, rotary applied), as the official code.
    - Tokens are compared as the official code does, by cosine similarity of their hidden states
      entering layer K passed through the LM's final norm.
    - Pivot by pivot, in prompt order (image pivots, then text pivots), each adds its quota of
      the remaining visual tokens least similar to it (ties: lower index); the kept tokens are
      the image pivots and every token added (text pivots are not visual: never kept here).
    Choices: each image keeps exactly its budget k (the official code keeps 4 + 8 * floor(k / 8):
    every pivot adds floor(k / 8)); here the k - 4 beyond the image pivots are split over the
    pivots as evenly as possible, earlier pivots one more. With k <= `pivot_image` the k pivots
    with the largest key norms are kept. Pivots run in prompt order (the official code iterates
    a Python set of positions). An image with fewer instruction tokens has fewer text pivots."""

    name = "dart"
    stage = "decoder"
    paper = "Stop Looking for Important Tokens in Multimodal Language Models: Duplication Matters More (DART, EMNLP), 2025"

    def __init__(self, layer: int = 2, pivot_image: int = 4, pivot_text: int = 4):
        for opt, value in (("layer", layer), ("pivot_image", pivot_image), ("pivot_text", pivot_text)):
            check_int(self.name, opt, value)
        if layer < 1:
            raise ValueError(f"{self.name}: layer must be >= 1 (pivots come from layer - 1's keys), got {layer!r}")
        if pivot_image < 1 or pivot_text < 0:
            raise ValueError(f"{self.name}: pivot_image must be >= 1 and pivot_text >= 0, got {pivot_image!r}, {pivot_text!r}")
        self.layer, self.pivot_image, self.pivot_text = layer, pivot_image, pivot_text

    def needs(self, info: EncoderInfo) -> Request:
        return Request(features=True, text_embeds=True, key_norms=(self.layer - 1,), final_norm=True)

    def select(self, signals: Signals, k: torch.Tensor) -> Selection:
        counts = signals.valid_counts()
        ks = budget(k, counts)
        feats = F.normalize(signals.features.float(), dim=-1)  # [I, N, D]
        n_img, n = feats.shape[:2]
        device = feats.device
        text = signals.text_embeds
        m = text.shape[1] if text is not None else 0
        text_counts = list(signals.text_counts) if signals.text_counts is not None else [m] * n_img
        norms = signals.key_norms[self.layer - 1].float().to(device)
        valid = torch.arange(n, device=device)[None, :] < signals.n_valid.to(device)[:, None]
        n_img_piv = [min(self.pivot_image, kk) for kk in ks]
        n_txt_piv = [min(self.pivot_text, t) if kk > self.pivot_image else 0 for kk, t in zip(ks, text_counts)]
        # pivots, in prompt order: the top key norms, then by position
        img_piv, img_feats = top_pivots(norms[:, :n], valid, n_img_piv, self.pivot_image, feats)
        taken = torch.zeros(n_img, n + 1, dtype=torch.bool, device=device)
        taken.scatter_(1, img_piv, True)
        pivots, ok = [img_feats], [img_piv < n]
        if self.pivot_text and m:
            real = torch.arange(m, device=device)[None, :] < torch.tensor(text_counts, device=device)[:, None]
            tfeats = F.normalize(text.float(), dim=-1).to(device)
            txt_piv, txt_feats = top_pivots(norms[:, n:], real, n_txt_piv, self.pivot_text, tfeats)
            pivots.append(txt_feats)
            ok.append(txt_piv < m)
        pivots, ok = torch.cat(pivots, 1), torch.cat(ok, 1)  # [I, P, D], [I, P]
        quota = torch.zeros(ok.shape, dtype=torch.long)  # per pivot slot, on the host: the slots are known there
        for i, (kk, a, t) in enumerate(zip(ks, n_img_piv, n_txt_piv)):
            slots = list(range(a)) + list(range(self.pivot_image, self.pivot_image + t))
            quota[i, slots] = torch.tensor(quotas(kk, a, t), dtype=torch.long)
        quota = quota.to(device)
        arange = torch.arange(n, device=device)[None, :]
        for j in range(pivots.shape[1]):
            sim = torch.einsum("ind,id->in", feats, pivots[:, j]).masked_fill(taken[:, :n] | ~valid, float("inf"))
            vals, order = torch.sort(sim, dim=1, stable=True)
            add = (arange < quota[:, j : j + 1]) & (vals != float("inf"))
            taken[:, :n].scatter_(1, order, taken[:, :n].gather(1, order) | add)
        kmax = max(ks, default=0)
        idx = torch.sort(torch.where(taken[:, :n], arange, n), dim=1).values[:, :kmax]
        return Selection(indices=idx.masked_fill(idx >= n, -1))


def top_pivots(norms: torch.Tensor, valid: torch.Tensor, counts: list[int], limit: int, feats: torch.Tensor
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row, its counts[i] (<= `limit`) valid entries of largest norm (ties: lower index): their
    positions ascending, padded with n ([I, limit]), and their features ([I, limit, D], padding: the
    last entry's)."""
    n = norms.shape[1]
    by_norm = torch.sort(norms.masked_fill(~valid, float("-inf")), dim=1, descending=True, stable=True).indices[:, :limit]
    slot = torch.arange(by_norm.shape[1], device=by_norm.device)[None, :]
    wanted = torch.tensor(counts, device=by_norm.device)[:, None]
    pos = torch.sort(torch.where(slot < wanted, by_norm, n), dim=1).values
    return pos, feats.gather(1, pos.clamp(max=n - 1)[..., None].expand(-1, -1, feats.shape[-1]))
