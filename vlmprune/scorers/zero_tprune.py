"""`zero_tprune`: importance by weighted PageRank on an encoder layer's attention graph (Zero-TPrune's
I-stage), then top-k."""

from __future__ import annotations

import math

import torch

from vlmprune.kernels.graph import pagerank_ref
from vlmprune.scorers.base import EncoderInfo, Request, Scorer, Signals, register
from vlmprune.scorers.cls_attention import check_int, check_number, resolve_layer

HEADS = ("each", "mean")


@register
class ZeroTPruneScorer(Scorer):
    """Zero-TPrune's I-stage: each token's importance is its weighted PageRank (WPR) on the
    attention graph of one encoder layer; the top-k tokens are kept (ties to the lower index).

    - Graph (`Signals.attn_graph`): the layer's softmax attention among its tokens, from its own q/k
      (the model keeps SDPA/FlashAttention), one graph per head (`heads="each"`, the paper) or the
      head mean (`heads="mean"`: one WPR on the mean graph, H times less memory). `layer`: 0-based,
      negative from the end; default the feature layer.
    - WPR per graph: s_0 = 1/n on its n tokens, s_{t+1}(j) = sum_i A(i, j) s_t(i) (a token is
      important when important tokens attend to it), `iterations` times (default 30; the attention
      is a dense row-stochastic matrix, so the iteration converges geometrically to its stationary
      distribution).
    - CLS (CLIP in LLaVA): the graph keeps the CLS token as a node, as the paper runs WPR on DeiT with
      its CLS token; only the patch tokens' scores rank (`with_cls=False`: WPR on the patch-only
      subgraph, rows renormalised). Qwen-VL has no CLS: its graph is over each item's merged tokens
      (the adapter pools the patch graph over the 2x2 merge groups; a video's frames attend only
      within themselves, so its graph is block-diagonal and each frame keeps its share of mass).
      Memory: 4 H T^2 bytes per image (CLIP-L/336: 21 MiB; a Qwen2.5-VL image of 2304 tokens, 16
      heads: 340 MiB); `heads="mean"` needs H times less, for very large Qwen images.
    - VHF (variance-based head filter): a head whose score distribution is nearly flat
      (uninformative) or extremely peaked (attention sinks) is left out. The paper thresholds the
      variance absolutely, tuned per backbone; we use the variance of n * s_h over the n tokens
      (scale-free) relative to the image's median head: heads outside
      [head_filter[0] * median, head_filter[1] * median] are dropped (default 0.1 and 10; the median
      head always stays; `head_filter=None` keeps every head).
    - EIR (emphasizing informative region): the kept heads' scores are aggregated by the power mean
      (mean_h s_h^p)^(1/p) with p = `emphasis` (default 2, a root mean square: a token that is
      central in a few heads is not averaged away); p = 1 is the plain mean.
    - Not implemented: Zero-TPrune's S-stage (similarity-based merging of the remaining tokens) and
      its pruning inside the encoder across several layers: the vision stage prunes once, after the
      encoder."""

    name = "zero_tprune"
    paper = ("Zero-TPrune: Zero-Shot Token Pruning through Leveraging of the Attention Graph in Pre-Trained "
             "Transformers (CVPR), 2024")

    def __init__(self, layer: int | None = None, iterations: int = 30, heads: str = "each", emphasis: float = 2.0,
                 head_filter: tuple[float, float] | None = (0.1, 10.0), with_cls: bool = True):
        check_int(self.name, "layer", layer, allow_none=True)
        check_int(self.name, "iterations", iterations)
        if iterations < 1:
            raise ValueError(f"{self.name}: iterations must be >= 1, got {iterations}")
        if not isinstance(heads, str) or heads not in HEADS:
            raise ValueError(f"{self.name}: heads must be one of {list(HEADS)}, got {heads!r}")
        emphasis = check_number(self.name, "emphasis", emphasis, 1.0, math.inf, hi_open=True)
        if head_filter is not None:
            if not isinstance(head_filter, (tuple, list)) or len(head_filter) != 2:
                raise TypeError(f"{self.name}: head_filter must be (low, high) or None, got {head_filter!r}")
            lo = check_number(self.name, "head_filter[0]", head_filter[0], 0.0, 1.0)
            hi = check_number(self.name, "head_filter[1]", head_filter[1], 1.0, math.inf)
            head_filter = (lo, hi)
        if not isinstance(with_cls, bool):
            raise TypeError(f"{self.name}: with_cls must be a bool, got {with_cls!r}")
        self.layer, self.iterations, self.heads = layer, iterations, heads
        self.emphasis, self.head_filter, self.with_cls = emphasis, head_filter, with_cls

    def _layer(self, info: EncoderInfo) -> int:
        return info.feature_layer if self.layer is None else resolve_layer(self.name, "layer", self.layer, info)

    def needs(self, info: EncoderInfo) -> Request:
        return Request(attn_graph=(self._layer(info),), attn_graph_heads=self.heads)

    def score(self, signals: Signals) -> torch.Tensor:
        layer = self._layer(signals.info)
        if layer not in signals.attn_graph:
            raise ValueError(f"{self.name}: attn_graph of layer {layer} is missing; "
                             f"got layers {sorted(signals.attn_graph)}")
        graph = signals.attn_graph[layer].float()  # [I, H, T, T]
        counts = signals.valid_counts()
        n = signals.features.shape[1] if signals.features is not None else max(counts, default=0)
        i, h, t, _ = graph.shape
        offset = t - n
        if offset not in (0, 1) or graph.shape[2] != graph.shape[3]:
            raise ValueError(f"{self.name}: attn_graph of layer {layer} is {tuple(graph.shape)} for {n} visual tokens; "
                             f"it must be [I, H, T, T] with T = N or N + 1 (a CLS token first)")
        if offset and not self.with_cls:
            graph = graph[:, :, 1:, 1:]
            graph = graph / graph.sum(-1, keepdim=True).clamp(min=torch.finfo(torch.float32).tiny)
            offset = 0
        nodes = [c + offset for c in counts]
        s = pagerank_ref(graph.reshape(i * h, *graph.shape[2:]), [c for c in nodes for _ in range(h)], self.iterations)
        s = s.view(i, h, -1)
        return self.aggregate(s, nodes)[:, offset : offset + n]

    def aggregate(self, s: torch.Tensor, nodes: list[int]) -> torch.Tensor:
        """[I, T]: the per-head WPR scores s [I, H, T] (over each image's first nodes[i] tokens)
        filtered by their variance (VHF) and combined by the power mean (EIR)."""
        i, h, t = s.shape
        keep = torch.ones(i, h, dtype=torch.bool, device=s.device)
        if self.head_filter is not None and h > 1:
            n = torch.tensor(nodes, dtype=torch.float32).to(s.device)
            valid = (torch.arange(t, device=s.device)[None, :] < n[:, None])[:, None, :]  # [I, 1, T]
            x = s * n[:, None, None]  # mean 1 over the valid tokens
            mean = (x * valid).sum(-1, keepdim=True) / n.clamp(min=1)[:, None, None]
            var = (((x - mean) ** 2) * valid).sum(-1) / n.clamp(min=1)[:, None]  # [I, H]
            med = var.median(dim=1, keepdim=True).values  # the lower median: a real head's
            lo, hi = self.head_filter
            keep = ((var >= lo * med) & (var <= hi * med)) | (med <= 0)
        w = keep.float()[:, :, None]
        p = self.emphasis
        agg = (w * s.clamp(min=0) ** p).sum(1) / w.sum(1)
        return agg if p == 1.0 else agg ** (1.0 / p)
