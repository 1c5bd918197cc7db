"""FlowCut: information-flow-aware pruning, simulated on the signals of an unpruned encoder."""

from __future__ import annotations

import torch

from vlmprune.kernels.flow import FlowSchedule, flowcut_select
from vlmprune.scorers.base import EncoderInfo, Request, Scorer, Selection, Signals, register
from vlmprune.scorers.cls_attention import (
    attention_layers,
    check_int,
    check_number,
    resolve_layer,
    signal_layers,
)


@register
class FlowCutScorer(Scorer):
    """FlowCut: rank tokens by a cumulative, multi-criteria flow score over the encoder layers
    and prune progressively, more where the CLS attention is concentrated, down to k.

    At each layer l of the span (0-based `end_layer`, default the layer before the feature layer,
    as in the paper, where the last cut happens before the feature layer runs; `num_flow_layers`,
    default None = every layer from 0, as in the paper), over the tokens still alive:
      score_l = (attn_weight * a / sum(a) + semantic_weight * s / sum(s)) * d
    with a the head-mean CLS attention (attention strength), s the head-mean softmax of
    v_cls . v_j (semantic relevance to CLS, signal `cls_value_attn`) and d the token's value norm
    (information density; `use_value_norm=False` drops it), sums over the alive tokens.
    Cumulative flow: c_l = score_l at the first layer, then momentum * c_{l-1} + (1 - momentum)
    * score_l (paper: 0.5). Every `prune_every` layers counted back from end_layer (paper: 2),
    with rpl = end_layer - l layers left: rpl = 0 keeps the top k by c_l; otherwise
    r = floor((n_alive - k) / sqrt(rpl) * (1 - (H / log n_alive)^2) + 1/2) tokens are pruned
    (keeping at least k), H the entropy of a renormalised over the alive tokens. Pruned tokens
    stay pruned; ties go to the lower index.

    Simplified vs the paper: the encoder runs unpruned, so every layer's attention, values and
    CLS state are those of the full token set (the paper's later layers only see the survivors;
    we renormalise over the survivors instead); the pruning count is per image (the paper takes
    the batch maximum); d is the L2 norm of the concatenated heads' value vector (the paper: L1
    norm of the head-mean value); the kept tokens' features are the unpruned encoder's. Needs a
    CLS token."""

    name = "flowcut"
    paper = "FlowCut: Rethinking Redundancy via Information Flow for Efficient Vision-Language Models (NeurIPS), 2025"

    def __init__(
        self,
        num_flow_layers: int | None = None,
        end_layer: int | None = None,
        attn_weight: float = 1.0,
        semantic_weight: float = 1.0,
        use_value_norm: bool = True,
        momentum: float = 0.5,
        prune_every: int = 2,
    ):
        check_int(self.name, "num_flow_layers", num_flow_layers, allow_none=True)
        if num_flow_layers is not None and num_flow_layers < 1:
            raise ValueError(f"{self.name}: num_flow_layers must be >= 1 or None, got {num_flow_layers!r}")
        check_int(self.name, "end_layer", end_layer, allow_none=True)
        check_int(self.name, "prune_every", prune_every)
        if prune_every < 1:
            raise ValueError(f"{self.name}: prune_every must be >= 1, got {prune_every!r}")
        if not isinstance(use_value_norm, bool):
            raise TypeError(f"{self.name}: use_value_norm must be True or False, got {use_value_norm!r}")
        self.num_flow_layers = num_flow_layers
        self.end_layer = end_layer
        self.attn_weight = check_number(self.name, "attn_weight", attn_weight, 0.0, float("inf"), hi_open=True)
        self.semantic_weight = check_number(
            self.name, "semantic_weight", semantic_weight, 0.0, float("inf"), hi_open=True
        )
        if self.attn_weight == 0 and self.semantic_weight == 0:
            raise ValueError(f"{self.name}: attn_weight and semantic_weight cannot both be 0")
        self.use_value_norm = use_value_norm
        self.momentum = check_number(self.name, "momentum", momentum, 0.0, 1.0, hi_open=True)
        self.prune_every = prune_every

    def _span(self, info: EncoderInfo) -> tuple[int, ...]:
        if self.end_layer is None:
            end = max(0, info.feature_layer - 1)
        else:
            end = resolve_layer(self.name, "end_layer", self.end_layer, info)
        start = 0 if self.num_flow_layers is None else max(0, end - self.num_flow_layers + 1)
        return tuple(range(start, end + 1))

    def needs(self, info: EncoderInfo) -> Request:
        if not info.has_cls:
            raise ValueError(f"{self.name}: needs an encoder with a CLS token (has_cls=False)")
        span = self._span(info)
        return Request(
            cls_attn=span,
            cls_value_attn=span if self.semantic_weight > 0 else (),
            value_norms=span if self.use_value_norm else (),
        )

    def _stack(self, signals: Signals, span: tuple[int, ...]) -> tuple[torch.Tensor, ...]:
        """[L, I, N] float32 per-layer signals of the span: CLS attention, CLS-value attention (or
        None) and value norms of the visual tokens (or None); views of the encoder's stacked rows
        where they lie so (`layer_rows`), not copies."""
        a = attention_layers(signals, span, self.name)
        n = a.shape[2]
        s = d = None
        if self.semantic_weight > 0:
            s = signal_layers(signals.cls_value_attn, "cls_value_attn", span, self.name)
        if self.use_value_norm:
            d = signal_layers(signals.value_norms, "value_norms", span, self.name)
            d = d[..., d.shape[-1] - n :]
        return a, s, d

    def select(self, signals: Signals, k: torch.Tensor) -> Selection:
        span = self._span(signals.info)
        end = span[-1]
        a, s, d = self._stack(signals, span)
        # a cut every `prune_every` layers counted back from end_layer: the layers left after it
        rpl = tuple(end - layer if (end - layer) % self.prune_every == 0 else None for layer in span)
        schedule = FlowSchedule(rpl, self.attn_weight, self.semantic_weight, self.momentum)
        valid = torch.tensor(signals.valid_counts())  # on the host: the kernel sizes its output without a sync
        idx = flowcut_select(a, s, d, k, valid, schedule)
        return Selection(indices=idx)
