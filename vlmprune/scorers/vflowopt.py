"""`vflowopt`: VFlowOpt's importance map (attention-derived context relevance + information entropy),
progressive cuts over encoder layers and recycling of the pruned tokens, realised on the attention
graphs of one unpruned encoder pass. Its schedule may come from `vlmprune calibrate` (a JSON file)."""

from __future__ import annotations

import itertools
import json
import math
from pathlib import Path

import torch

from vlmprune.kernels.select import gather_rows, pack, rank
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
    """[I, T - offset] float32 importance of the visual tokens (0 where not alive) from one layer's
    head-mean attention a [I, T, T] (a CLS token first when offset = 1) restricted to the alive tokens
    alive [I, T] (CLS always alive): rows renormalised over the alive keys; received attention = the
    mean of the alive rows; global tokens = those receiving more than threshold x the mean received
    (all alive tokens when none does); context relevance = the mean of the global tokens' rows;
    entropy = each visual token's row entropy (nats), softmaxed over the alive visual tokens;
    importance = relevance + alpha x softmaxed entropy."""
    m = alive.float()
    sub = a.float() * m[:, None, :]
    sub = sub / sub.sum(-1, keepdim=True).clamp_min(TINY)
    count = m.sum(1, keepdim=True).clamp_min(1.0)
    received = (sub * m[:, :, None]).sum(1) / count
    mean = (received * m).sum(1, keepdim=True) / count
    glob = alive & (received > threshold * mean)
    glob = torch.where(glob.any(1, keepdim=True), glob, alive).float()
    context = (sub * glob[:, :, None]).sum(1) / glob.sum(1, keepdim=True).clamp_min(1.0)
    vis = alive[:, offset:]
    entropy = -torch.special.xlogy(sub[:, offset:], sub[:, offset:]).sum(-1)
    spread = torch.softmax(entropy.masked_fill(~vis, float("-inf")), dim=1).nan_to_num(
        0.0
    )
    return (context[:, offset:] + alpha * spread).masked_fill(~vis, 0.0)


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
      is most similar (cosine of one GEMM; ties to the lower index), and a kept token's feature becomes the
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
        nodes = torch.tensor([c + offset for c in counts]).to(device)
        alive = torch.arange(n + offset, device=device)[None, :] < nodes[:, None]
        pos = torch.arange(n, device=device)[None, :]
        weights, left = None, list(counts)
        for j, g in enumerate(
            graphs
        ):  # every item at once; the counts kept stay on the host
            imp = importance(
                g.float().mean(1), alive, offset, self.threshold, self.alpha
            )
            weights = imp if weights is None else weights
            last = j == len(graphs) - 1
            left = [
                ki if last else min(c, math.ceil(ki * expand[j]))
                for c, ki in zip(left, ks)
            ]
            order = rank(imp, alive[:, offset:])
            chosen = torch.zeros_like(alive[:, offset:]).scatter(
                1, order, pos < torch.tensor(left).to(device)[:, None]
            )
            alive = torch.cat([alive[:, :offset], chosen], 1)
        kept = alive[:, offset:]
        idx = pack(kept, kmax)
        if not self.recycle:
            return Selection(indices=idx, features=gather_rows(feats, idx))
        full = torch.tensor([ki >= c for c, ki in zip(counts, ks)]).to(device)
        merged = self.recycled(feats, kept, weights, pos < nodes[:, None] - offset)
        out = torch.where(
            full[:, None, None], gather_rows(feats, idx), gather_rows(merged, idx)
        )
        return Selection(indices=idx, features=out)

    @staticmethod
    def recycled(
        x: torch.Tensor, kept: torch.Tensor, weights: torch.Tensor, valid: torch.Tensor
    ) -> torch.Tensor:
        """[I, N, D] in x's dtype, at each kept token: its importance-weighted mean with the valid pruned
        tokens whose most similar (cosine, one GEMM; ties to the lower index) kept token it is."""
        unit = torch.nn.functional.normalize(x.float(), dim=-1)
        sim = torch.bmm(unit, unit.transpose(1, 2)).masked_fill(
            ~kept[:, None, :], float("-inf")
        )
        pos = torch.arange(x.shape[1], device=x.device)[None, :]
        target = torch.where(
            kept, pos, sim.argmax(dim=2)
        )  # argmax: the first (lower) of equal maxima
        w = (weights.float().clamp_min(TINY) * valid)[..., None]
        d = x.shape[-1]
        sums = torch.zeros(*x.shape[:2], d, device=x.device).scatter_add_(
            1, target[..., None].expand(-1, -1, d), x.float() * w
        )
        total = torch.zeros(*x.shape[:2], 1, device=x.device).scatter_add_(
            1, target[..., None], w
        )
        return (sums / total.clamp_min(TINY)).to(x.dtype)
