"""`quota`: query-oriented token assignment over a video's frames (QuoTA), training-free: each frame's
budget from its relevance to the prompt's text, then the frame's tokens pooled (or ranked) to it."""

from __future__ import annotations

import math

import torch

from vlmprune.kernels.pool import pool_select
from vlmprune.scorers.base import (
    EncoderInfo,
    Request,
    Scorer,
    Selection,
    Signals,
    budget,
    register,
)
from vlmprune.scorers.cdpruner import relevance
from vlmprune.scorers.cls_attention import check_number

WITHIN = ("pool", "top")


def frame_scores(rel: list[float], frames: int, min_score: float) -> list[float]:
    """Each frame's score in [min_score, 1]: the mean relevance of its tokens, min-max normalised over
    the item's frames and lifted to min_score + (1 - min_score) s; all 1 when the means are flat."""
    size = len(rel) // frames
    means = [math.fsum(rel[f * size : (f + 1) * size]) / size for f in range(frames)]
    lo, hi = min(means), max(means)
    if not hi > lo:
        return [1.0] * frames
    return [min_score + (1.0 - min_score) * (m - lo) / (hi - lo) for m in means]


def frame_budgets(weights: list[float], caps: list[int], k: int) -> list[int]:
    """Integer budgets summing to min(k, sum(caps)), each <= its cap, in proportion to `weights`:
    water-filling (a frame whose share exceeds its cap gets the cap, the rest is shared again among
    the others), then floors, the tokens left going one each to the largest remainders (ties: the
    earlier frame)."""
    k = min(k, sum(caps))
    full: set[int] = set()
    while True:
        free = [f for f in range(len(caps)) if f not in full]
        left = k - sum(caps[f] for f in full)
        total = math.fsum(weights[f] for f in free)
        share = {
            f: (left * weights[f] / total if total > 0 else left / len(free))
            for f in free
        }
        over = [f for f in free if share[f] >= caps[f]]
        if not over:
            break
        full.update(over)
    quota = [float(caps[f]) if f in full else share[f] for f in range(len(caps))]
    out = [min(caps[f], math.floor(q)) for f, q in enumerate(quota)]
    order = sorted(range(len(caps)), key=lambda f: (-(quota[f] - out[f]), f))
    for f in order[: k - sum(out)]:
        out[f] += 1
    return out


@register
class QuoTAScorer(Scorer):
    """QuoTA, training-free: split an item's budget k over its frames by each frame's relevance to the
    prompt, then reduce every frame to its budget.

    - Token relevance r (as `cdpruner`'s): the mean over the prompt's text tokens (`Signals.text_embeds`:
      the row's text after its last visual token) of the cosine between a visual token's
      post-projector feature and a text token's input embedding, min-max normalised over the item.
    - Frame score: the mean r of the frame's tokens, min-max normalised over the item's frames to
      s in [0, 1], lifted to min_score + (1 - min_score) s (`min_score`, default 0.1: the least relevant
      frame is never scored 0). Flat scores (one frame, no text) give every frame 1.
    - Budgets: weights s^power (`power`, default 2, the official code's exponent; its factor 100
      cancels), shared as k * w_f / sum(w) with each frame capped at its own tokens and the excess
      shared again among the others (water-filling; the official code redistributes once), then
      integers: floors, and the tokens left to the largest remainders (ties: the earlier frame), so
      the budgets sum to exactly k.
    - Within a frame (`within`): "pool" (default) average-pools the frame's grid to its budget with
      `pool`'s cells (`vlmprune.kernels.pool`, anchors at the cells' centres; the official default
      resizes each frame bilinearly, its v2 pools adaptively); "top" keeps the frame's highest r (ties:
      the lower index), features unchanged. A frame with budget 0 loses all its tokens.
    - An image (t = 1) gets all of k in its single frame: `pool` (within="pool") or the top-k by r.
    Differs from the paper: QuoTA scores each frame with an LVLM asked, for a query decoupled by a
    chain-of-thought prompt (its objects), whether the frame holds them; here the model's own features
    are scored against the prompt's embeddings, no second model, no query rewriting. Frames are the
    item's temporal patches after the encoder's temporal merge (Qwen-VL: 2 input frames each)."""

    name = "quota"
    merges = True
    paper = "QuoTA: Query-oriented Token Assignment via CoT Query Decouple for Long Video Comprehension, 2025"

    def __init__(
        self, power: float = 2.0, min_score: float = 0.1, within: str = "pool"
    ):
        self.power = check_number(self.name, "power", power, 0.0, 16.0)
        self.min_score = check_number(
            self.name, "min_score", min_score, 0.0, 1.0, lo_open=True
        )
        if not isinstance(within, str) or within not in WITHIN:
            raise ValueError(
                f"{self.name}: within must be one of {list(WITHIN)}, got {within!r}"
            )
        self.within = within

    def needs(self, info: EncoderInfo) -> Request:
        return Request(features=True, text_embeds=True)

    def budgets(
        self, signals: Signals, k: torch.Tensor
    ) -> tuple[torch.Tensor, list[list[int]]]:
        """(the relevance r [I, N], each item's frame budgets)."""
        feats = signals.features
        if feats is None:
            raise ValueError(
                f"{self.name}: needs the visual-token features (signals.features is None)"
            )
        if signals.text_embeds is None:
            raise ValueError(
                f"{self.name}: needs the prompt's text-token embeddings (signals.text_embeds is None)"
            )
        counts = signals.valid_counts()
        m = signals.text_embeds.shape[1]
        text_counts = (
            list(signals.text_counts)
            if signals.text_counts is not None
            else [m] * len(counts)
        )
        r = relevance(feats, signals.text_embeds, counts, text_counts)
        rows = r.cpu().tolist()
        out = []
        for i, (c, t, (h, w), ki) in enumerate(
            zip(counts, signals.item_frames(), signals.image_grids(), budget(k, counts))
        ):
            if h * w != c or h % t:
                raise ValueError(
                    f"{self.name}: grid {h}x{w} of item {i} does not hold its {c} tokens in {t} frames"
                )
            scores = frame_scores(rows[i][:c], t, self.min_score)
            out.append(frame_budgets([s**self.power for s in scores], [c // t] * t, ki))
        return r, out

    def select(self, signals: Signals, k: torch.Tensor) -> Selection:
        r, budgets = self.budgets(signals, k)
        feats = signals.features
        device = feats.device
        kmax = max((sum(b) for b in budgets), default=0)
        out_idx = torch.full((len(budgets), kmax), -1, dtype=torch.long, device=device)
        out_feat = feats.new_zeros(len(budgets), kmax, feats.shape[-1])
        for i, ((h, w), frame_k) in enumerate(zip(signals.image_grids(), budgets)):
            fh, size, at = h // len(frame_k), (h // len(frame_k)) * w, 0
            for f, b in enumerate(frame_k):
                if b == 0:
                    continue
                lo = f * size
                if self.within == "pool":
                    idx, pooled = pool_select(
                        feats[i : i + 1, lo : lo + size], (fh, w), b
                    )
                    idx, pooled = idx[0] + lo, pooled[0]
                else:
                    order = torch.sort(
                        r[i, lo : lo + size], descending=True, stable=True
                    ).indices[:b]
                    idx = torch.sort(order).values + lo
                    pooled = feats[i, idx]
                out_idx[i, at : at + b] = idx
                out_feat[i, at : at + b] = pooled
                at += b
        return Selection(indices=out_idx, features=out_feat)
