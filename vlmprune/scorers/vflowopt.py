"""`vflowopt`: VFlowOpt's importance map (attention-derived context relevance + information entropy),
progressive cuts over encoder layers and recycling of the pruned tokens, realised on the attention
graphs of one unpruned encoder pass. Its schedule may come from `vlmprune calibrate` (a JSON file)."""

from __future__ import annotations

import itertools
import json
import math
from pathlib import Path

import torch

from vlmprune.kernels.merge import pairwise_dot
from vlmprune.kernels.select import rank
from vlmprune.scorers.base import (
    EncoderInfo,
    Request,
    Scorer,
    Selection,
    Signals,
    budget,
    register,
)
from vlmprune.scorers.cls_attention import check_int, check_number, resolve_layer

TINY = torch.finfo(torch.float32).tiny
SCHEDULE_KEYS = ("layers", "expand", "threshold", "alpha")
THRESHOLD = 35.0
"""Global tokens receive more than THRESHOLD x the mean received attention: the official LLaVA-OneVision
settings found by its search are 28.7 (50% kept), 34.8 (25%) and 39.3 (10%)."""
EXPAND = 1 / 0.6011
"""The earlier cut keeps EXPAND x k tokens: the official 10% setting's last stage keeps 0.6011 of what
the stage before it kept."""


def importance(
    a: torch.Tensor, alive: torch.Tensor, offset: int, threshold: float, alpha: float
) -> torch.Tensor:
    """[T - offset] float32 importance of the visual tokens (0 where not alive) from one layer's
    head-mean attention a [T, T] (a CLS token first when offset = 1) restricted to the alive tokens
    (CLS always alive): rows renormalised over the alive keys; received attention = the mean of the
    alive rows; global tokens = those receiving more than threshold x the mean received (all alive
    tokens when none does); context relevance = the mean of the global tokens' rows; entropy = each
    visual token's row entropy (nats), softmaxed over the alive visual tokens; importance =
    relevance + alpha x softmaxed entropy."""
    m = alive.float()
    sub = a.float() * m[None, :]
    sub = sub / sub.sum(-1, keepdim=True).clamp_min(TINY)
    received = (sub * m[:, None]).sum(0) / m.sum()
    glob = alive & (received > threshold * received[alive].mean())
    if not bool(glob.any()):
        glob = alive
    context = (sub * glob[:, None].float()).sum(0) / glob.sum()
    vis = alive[offset:]
    entropy = -torch.special.xlogy(sub[offset:], sub[offset:]).sum(-1)
    spread = torch.softmax(entropy.masked_fill(~vis, float("-inf")), dim=0).nan_to_num(
        0.0
    )
    return (context[offset:] + alpha * spread).masked_fill(~vis, 0.0)


def read_schedule(path: str | Path) -> dict[str, object]:
    """The schedule entries of a JSON file written by `vlmprune calibrate` (others are ignored)."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"vflowopt: schedule file {str(path)!r} does not exist")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(
            f"vflowopt: schedule file {str(path)!r} is not JSON ({e})"
        ) from None
    if not isinstance(data, dict) or not any(key in data for key in SCHEDULE_KEYS):
        raise ValueError(
            f"vflowopt: schedule file {str(path)!r} has none of the keys {list(SCHEDULE_KEYS)}"
        )
    return {key: data[key] for key in SCHEDULE_KEYS if key in data}


@register
class VFlowOptScorer(Scorer):
    """VFlowOpt: keep the tokens of highest importance (context relevance + information entropy) in cuts
    at several encoder layers, then recycle the pruned tokens into the kept ones.

    - Signal: each cut layer's head-mean softmax attention among the item's tokens (`attn_graph`,
      heads="mean", from the layer's own q/k; LLaVA: with the CLS token, which stays a node and is
      never pruned; Qwen-VL: the 2x2-pooled graph of the merged tokens).
    - Importance at a cut (`importance`): over the tokens still alive, the attention restricted to them
      (rows renormalised: that layer's softmax without the pruned keys); global tokens receive more
      than `threshold` x the mean received attention (default 35, the official settings' middle); the
      context relevance of token j is the mean attention the global tokens pay it (the official code's
      "combined attention"; all alive tokens are global when none passes). Patch-level information
      entropy, pinned here as the entropy of token j's own attention row (how widely it gathers),
      softmaxed over the alive tokens, weighted by `alpha` (default 0, the official released settings;
      the paper computes it from the 256-bin grey-level histogram of the patch's pixels, which the
      adapters do not hand over).
    - Progressive cuts: at `layers` (0-based, ascending; default the feature layer and the layer two
      before it), cut i < last keeps min(alive, ceil(k x expand[i])) (`expand` >= 1 non-increasing;
      default 1.664 = 1 / 0.6011, the official 10% setting's last stage ratio), the last keeps k; ties
      to the lower index. The paper prunes inside the ViT at its cut layer and inside the LLM later; here
      every cut reads the unpruned encoder's attention (restricted to the survivors) and the tokens
      leave after the encoder, so the encoder's and the LLM's own computations are not shortened.
    - Recycling (`recycle=True`): every pruned token joins the kept token whose post-projector feature
      is most similar (cosine; ties to the lower index), and a kept token's feature becomes the
      importance-weighted mean of its own and its members' features (weights: the importance at the first
      cut, where all tokens are scored on one scale). The official code instead groups the pruned tokens
      by m x m cells of the grid into a few extra recycled tokens (its count then misses the budget).
    - `schedule`: a JSON file from `vlmprune calibrate --method vflowopt` (the paper's offline search,
      there Bayesian optimisation of the cosine between the last-layer last-token states with and
      without pruning); its `layers`, `expand`, `threshold` and `alpha` entries replace the options.
    k >= n keeps every token unchanged; k = 0 keeps none."""

    name = "vflowopt"
    merges = True
    paper = (
        "VFlowOpt: A Token Pruning Framework for LMMs with Visual Information Flow-Guided Optimization "
        "(ICCV), 2025"
    )

    def __init__(
        self,
        layers: list[int] | tuple[int, ...] | None = None,
        expand: list[float] | tuple[float, ...] | None = None,
        threshold: float = THRESHOLD,
        alpha: float = 0.0,
        recycle: bool = True,
        schedule: str | None = None,
    ):
        if schedule is not None:
            if not isinstance(schedule, (str, Path)):
                raise TypeError(
                    f"{self.name}: schedule must be a path to a JSON file or None, got {schedule!r}"
                )
            loaded = read_schedule(schedule)
            layers = loaded.get("layers", layers)
            expand = loaded.get("expand", expand)
            threshold = loaded.get("threshold", threshold)
            alpha = loaded.get("alpha", alpha)
        if layers is not None:
            if not isinstance(layers, (list, tuple)) or not layers:
                raise TypeError(
                    f"{self.name}: layers must be a non-empty list of ints or None, got {layers!r}"
                )
            for layer in layers:
                check_int(self.name, "layers entry", layer)
            layers = tuple(layers)
        if expand is not None:
            if not isinstance(expand, (list, tuple)):
                raise TypeError(
                    f"{self.name}: expand must be a list of numbers >= 1 or None, got {expand!r}"
                )
            expand = tuple(
                check_number(self.name, "expand entry", e, 1.0, math.inf, hi_open=True)
                for e in expand
            )
            if any(b > a for a, b in itertools.pairwise(expand)):
                raise ValueError(
                    f"{self.name}: expand must be non-increasing, got {list(expand)}"
                )
        if not isinstance(recycle, bool):
            raise TypeError(f"{self.name}: recycle must be a bool, got {recycle!r}")
        self.layers, self.expand = layers, expand
        self.threshold = check_number(
            self.name, "threshold", threshold, 0.0, math.inf, hi_open=True
        )
        self.alpha = check_number(
            self.name, "alpha", alpha, 0.0, math.inf, hi_open=True
        )
        self.recycle, self.schedule = recycle, schedule

    def cuts(self, info: EncoderInfo) -> tuple[tuple[int, ...], tuple[float, ...]]:
        """(the cut layers, ascending; each earlier cut's expand factor)."""
        fl = info.feature_layer
        if self.layers is None:
            layers = tuple(sorted({max(0, fl - 2), fl}))
        else:
            layers = tuple(
                resolve_layer(self.name, "layers", layer, info) for layer in self.layers
            )
            if any(b <= a for a, b in itertools.pairwise(layers)):
                raise ValueError(
                    f"{self.name}: layers must be strictly ascending, got {list(self.layers)}"
                )
        expand = (
            self.expand if self.expand is not None else (EXPAND,) * (len(layers) - 1)
        )
        if len(expand) != len(layers) - 1:
            raise ValueError(
                f"{self.name}: expand needs one factor per cut before the last ({len(layers) - 1}), "
                f"got {list(expand)}"
            )
        return layers, tuple(expand)

    def needs(self, info: EncoderInfo) -> Request:
        return Request(
            features=True, attn_graph=self.cuts(info)[0], attn_graph_heads="mean"
        )

    def select(self, signals: Signals, k: torch.Tensor) -> Selection:
        feats = signals.features
        if feats is None:
            raise ValueError(
                f"{self.name}: needs the visual-token features (signals.features is None)"
            )
        layers, expand = self.cuts(signals.info)
        for layer in layers:
            if layer not in signals.attn_graph:
                raise ValueError(
                    f"{self.name}: attn_graph of layer {layer} is missing; got layers "
                    f"{sorted(signals.attn_graph)}"
                )
        graphs = [signals.attn_graph[layer] for layer in layers]  # [I, 1, T, T] each
        counts = signals.valid_counts()
        ks = budget(k, counts)
        n, device = feats.shape[1], feats.device
        offset = graphs[0].shape[-1] - n
        if offset not in (0, 1):
            raise ValueError(
                f"{self.name}: attn_graph is {tuple(graphs[0].shape)} for {n} visual tokens; it must be "
                f"[I, 1, T, T] with T = N or N + 1 (a CLS token first)"
            )
        kmax = max(ks, default=0)
        out_idx = torch.full((len(ks), kmax), -1, dtype=torch.long, device=device)
        out_feat = feats.new_zeros(len(ks), kmax, feats.shape[-1])
        for i, (c, ki) in enumerate(zip(counts, ks)):
            if ki == 0:
                continue
            if ki >= c:
                out_idx[i, :c] = torch.arange(c, device=device)
                out_feat[i, :c] = feats[i, :c]
                continue
            nodes = c + offset
            alive = torch.ones(nodes, dtype=torch.bool, device=device)
            weights = None
            for j, g in enumerate(graphs):
                a = g[i].float().mean(0)[:nodes, :nodes]
                imp = importance(a, alive, offset, self.threshold, self.alpha)
                weights = imp if weights is None else weights
                alive_vis = alive[offset:]
                keep = (
                    ki
                    if j == len(graphs) - 1
                    else min(int(alive_vis.sum()), math.ceil(ki * expand[j]))
                )
                order = rank(imp[None], alive_vis[None])[0, :keep]
                alive = alive.clone()
                alive[offset:] = torch.zeros(
                    c, dtype=torch.bool, device=device
                ).scatter(0, order, True)
            kept = torch.nonzero(alive[offset:]).flatten()
            out_idx[i, :ki] = kept
            out_feat[i, :ki] = (
                self.recycled(feats[i, :c], kept, weights)
                if self.recycle
                else feats[i, kept]
            )
        return Selection(indices=out_idx, features=out_feat)

    @staticmethod
    def recycled(
        x: torch.Tensor, kept: torch.Tensor, weights: torch.Tensor
    ) -> torch.Tensor:
        """[len(kept), D] in x's dtype: each kept token's importance-weighted mean with the pruned tokens
        whose most similar (cosine) kept token it is."""
        c = x.shape[0]
        pruned = torch.ones(c, dtype=torch.bool, device=x.device).index_fill(
            0, kept, False
        )
        gone = torch.nonzero(pruned).flatten()
        unit = torch.nn.functional.normalize(x.float(), dim=-1)
        w = weights.float().clamp_min(TINY)
        sums = x[kept].float() * w[kept, None]
        total = w[kept].clone()
        if gone.numel():
            target = pairwise_dot(unit[gone][None], unit[kept][None])[0].argmax(
                dim=1
            )  # ties: the lower kept index
            sums.index_add_(0, target, x[gone].float() * w[gone, None])
            total.index_add_(0, target, w[gone])
        return (sums / total[:, None]).to(x.dtype)
