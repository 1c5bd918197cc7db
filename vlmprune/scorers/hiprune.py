"""HiPrune: keep tokens chosen by the encoder's hierarchical attention (object layer, then the
output layer)."""

from __future__ import annotations

import math

import torch

from vlmprune.kernels.select import pack, rank, to_device
from vlmprune.scorers.base import EncoderInfo, Request, Scorer, Selection, Signals, register
from vlmprune.scorers.cls_attention import (
    attention,
    attention_request,
    budget,
    check_int,
    check_number,
    valid_mask,
)


def default_object_layer(info: EncoderInfo) -> int:
    """1-based object layer: 9/24 of the depth with a CLS token (9 for CLIP-L), half the depth
    without (16 for the 32-block Qwen2.5-VL encoder), the paper's settings."""
    if info.has_cls:
        return max(1, math.floor(info.num_layers * 9 / 24 + 0.5))
    return max(1, info.num_layers // 2)


@register
class HiPruneScorer(Scorer):
    """HiPrune: anchors (object-centric middle layer), their spatial buffers, and registers
    (global output layer), filled in that order up to k.

    Per image with budget k (< n_valid; otherwise all tokens are kept):
    - m = min(k, floor(alpha * k + 1/2)) slots for anchors + buffers (`alpha`, default 0.1).
    - Anchors: the ceil(m / 5) tokens with the highest head-mean CLS attention in `object_layer`
      (1-based encoder layer; default 9 of 24 for CLIP-L, scaled with depth), ties to the lower
      index. ceil(m / 5) because an anchor brings at most 4 buffers.
    - Buffers: going through the anchors by descending attention, their 4-neighbours on the
      h x w patch grid in raster order (up, left, right, down), skipping tokens outside the grid,
      invalid or already chosen, until m tokens are chosen. If the neighbours run out first, the
      unused slots go to the registers.
    - Registers: the remaining k - chosen slots, the highest head-mean CLS attention in the
      feature (output) layer among the tokens not chosen yet, ties to the lower index.
    On encoders without a CLS token the mean received attention replaces the CLS attention."""

    name = "hiprune"
    paper = "HiPrune: Training-Free Visual Token Pruning via Hierarchical Attention in Vision-Language Models, 2025"

    def __init__(self, alpha: float = 0.1, object_layer: int | None = None):
        self.alpha = check_number(self.name, "alpha", alpha, 0.0, 1.0)
        check_int(self.name, "object_layer", object_layer, allow_none=True)
        if object_layer is not None and object_layer < 1:
            raise ValueError(f"{self.name}: object_layer is 1-based and must be >= 1, got {object_layer!r}")
        self.object_layer = object_layer

    def _layers(self, info: EncoderInfo) -> tuple[int, int]:
        """(object layer, register layer), both 0-based."""
        one_based = default_object_layer(info) if self.object_layer is None else self.object_layer
        if one_based > info.num_layers:
            raise ValueError(
                f"{self.name}: object_layer={one_based} is beyond this encoder's {info.num_layers} layers "
                f"(1..{info.num_layers})"
            )
        return one_based - 1, info.feature_layer

    def needs(self, info: EncoderInfo) -> Request:
        return attention_request(info, self._layers(info))

    def select(self, signals: Signals, k: torch.Tensor) -> Selection:
        obj_layer, reg_layer = self._layers(signals.info)
        obj = attention(signals, obj_layer, self.name)
        reg = attention(signals, reg_layer, self.name).to(obj.device)
        device = obj.device
        n = obj.shape[1]
        h, w = signals.grid
        if h * w != n:
            raise ValueError(f"{self.name}: grid {h}x{w} does not cover the {n} visual tokens")
        counts = signals.valid_counts()
        ks = budget(k, counts)
        valid = valid_mask(signals.n_valid, n, device)
        # per image, on the host: slots m for anchors + buffers, ceil(m / 5) anchors; full rows keep all
        full = [ki >= nv for ki, nv in zip(ks, counts)]
        m = [0 if f else min(ki, math.floor(self.alpha * ki + 0.5)) for f, ki in zip(full, ks)]
        n_anchor = [math.ceil(mi / 5) for mi in m]
        a = max(n_anchor, default=0)
        chosen = torch.zeros_like(valid)
        if a > 0:
            anchors = rank(obj, valid)[:, :a]  # [I, A] by descending object-layer attention
            cand, ok = self._candidates(anchors, to_device(n_anchor, device), signals.n_valid.to(device), h, w)
            # a candidate counts if no earlier candidate is the same token; take them in order up to m
            same = (cand[:, :, None] == cand[:, None, :]) & ok[:, None, :]
            earlier = torch.ones(cand.shape[1], cand.shape[1], dtype=torch.bool, device=device).tril(-1)
            new = ok & ~(same & earlier).any(-1)
            take = new & (new.cumsum(1) <= to_device(m, device)[:, None])
            slots = torch.zeros(valid.shape[0], n + 1, dtype=torch.bool, device=device)  # column n: not taken
            chosen = slots.scatter(1, torch.where(take, cand, n), True)[:, :n]
        # registers: the top `rest` of the deep layer's attention among the valid tokens not chosen
        rest = to_device(ks, device) - chosen.sum(1)
        order = rank(reg, valid & ~chosen)
        keep = chosen | torch.zeros_like(chosen).scatter(1, order, torch.arange(n, device=device)[None, :] < rest[:, None])
        keep = torch.where(to_device(full, device, torch.bool)[:, None], valid, keep)
        return Selection(indices=pack(keep, max(ks, default=0)))

    @staticmethod
    def _candidates(anchors: torch.Tensor, n_anchor: torch.Tensor, n_valid: torch.Tensor, h: int, w: int
                    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The anchors, then each anchor's 4-neighbours (up, left, right, down) in anchor order:
        token indices [I, 5A] and whether each is usable (a real anchor of the image, or a
        neighbour inside the grid and among the valid tokens)."""
        i, a = anchors.shape
        device = anchors.device
        is_anchor = torch.arange(a, device=device)[None, :] < n_anchor[:, None]  # [I, A]
        r, c = anchors // w, anchors % w
        dr = to_device([-1, 0, 0, 1], device)
        dc = to_device([0, -1, 1, 0], device)
        nr, nc = r[:, :, None] + dr, c[:, :, None] + dc  # [I, A, 4]
        nb = nr * w + nc
        nb_ok = is_anchor[:, :, None] & (nr >= 0) & (nr < h) & (nc >= 0) & (nc < w) & (nb < n_valid[:, None, None])
        return torch.cat([anchors, nb.flatten(1)], 1), torch.cat([is_anchor, nb_ok.flatten(1)], 1)
