"""Decoder-stage pruning, shared by every adapter whose language model is an HF decoder stack
(`.layers` called with `attention_mask`, `position_embeddings`, `position_ids`, `cache`).

A decoder stage acts at layer K (`Prune.layer`): layers < K run on the whole sequence; at K the
visual-token rows the scorer drops leave the hidden states, and layers >= K run on the shorter
sequence with the kept tokens' own rotary embeddings (1-D or M-RoPE: the position ids are not
renumbered), a padding/causal mask made for the kept columns, and their KV-cache layers hold only
the kept tokens. Decode steps give layers >= K a mask over their own, shorter cache.

Signals come from the decoder itself, without eager attention: the attention rows a scorer asks
for (`Request.text_attn`, layer K-1: the last prompt token's row or the mean of the text rows after
the images) are computed from that layer's own k projection (tapped) and its q projection of the
query rows alone, with the rotary embedding applied by the layer's own function; `llm_hidden`
(the visual tokens' hidden states entering given layers) from the layers' inputs."""

from __future__ import annotations

import functools
import sys
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import torch
from torch import nn

from vlmprune.adapters.vit import Tap, Wrap
from vlmprune.kernels import select_tokens
from vlmprune.kernels.select import to_device
from vlmprune.scorers.base import EncoderInfo, Scorer, Signals


def decoder_stack(model: nn.Module) -> nn.Module:
    """The decoder stack (with `.layers`) of an HF VLM."""
    inner = getattr(model, "model", model)
    lm = getattr(inner, "language_model", None) or model.get_decoder()
    return lm if hasattr(lm, "layers") else getattr(lm, "model", lm)


@dataclass
class Point:
    """One place where visual tokens leave: before decoder layer `layer`, kept per image by `kept`
    (a function of the tokens the image has there and of those it had entering the decoder),
    ranked by `scorer` of stage `stage`."""

    layer: int
    stage: int
    scorer: Scorer
    kept: Callable[[int, int], int]


@dataclass
class Cut:
    """What one point did in a forward: per row, the columns of the sequence entering it that go on
    (`cols` [B, L'], -1 = padding added at the left), their 2-D mask, and per image the kept
    indices into the image's tokens there (`chosen` [I, kmax], -1 padded, `kept` on the host)."""

    cols: torch.Tensor
    mask: torch.Tensor
    chosen: torch.Tensor
    kept: list[int]
    length: int  # the sequence length entering the point (prefill)


@dataclass
class Run:
    """One language-model forward of a patched model (a prefill with images, or a decode step)."""

    prefill: bool
    mask: torch.Tensor | None  # [B, L] 2-D mask of the decoder input (None: all attended)
    valid: list[int] = field(default_factory=list)  # prefill: attended tokens per row (host)
    places: Any = None  # per image its tokens' flat places: host arrays, then after the first cut [I, N] on the device
    rows: list[int] = field(default_factory=list)  # per image: its row
    structure: Any = None  # prefill: flat places of structure tokens (newlines; host), then [B, L] bool: never text
    cuts: list[Cut] = field(default_factory=list)  # prefill: made as the layers run; decode: the prefill's
    length: int = 0  # decode: the decoder input length of the prefill
    captured: dict[int, dict[str, Any]] = field(default_factory=dict)  # layer -> its attention's inputs
    current: dict[str, Any] = field(default_factory=dict)  # what layers after a point take instead
    first: list[int] = field(default_factory=list)  # per image: its tokens entering the decoder
    counts: list[int] | None = None  # per image: its tokens now (after the first cut; host)
    transitions: dict[int, torch.Tensor] = field(default_factory=dict)  # layer -> [B, L, 2, 2] (see `transition`)
    transition_sums: dict[int, torch.Tensor] = field(default_factory=dict)  # layer -> [B, 2]


class DecoderStages:
    """The decoder points of a config, installed as wrappers on the decoder layers while patched;
    they act only inside a `Run` (set by the adapter around the model call)."""

    def __init__(self, model: nn.Module, points: list[Point], info: EncoderInfo):
        self.model, self.points, self.info = model, sorted(points, key=lambda p: p.layer), info
        self.stack = decoder_stack(model)
        self.layers = self.stack.layers
        n = len(self.layers)
        for p in self.points:
            if not 1 <= p.layer < n:
                raise ValueError(f"decoder stage at layer {p.layer}: the language model has layers 0..{n - 1}; "
                                 f"a stage acts before a layer in 1..{n - 1}")
        if len({p.layer for p in self.points}) != len(self.points):
            raise ValueError(f"two decoder stages act at the same layer: {[p.layer for p in self.points]}")
        deep = getattr(getattr(model.config, "vision_config", None), "deepstack_visual_indexes", None)
        if deep and self.points and self.points[0].layer < len(deep):
            raise ValueError(f"a decoder stage at layer {self.points[0].layer}: this model adds deepstack visual "
                             f"features after decoder layers 0..{len(deep) - 1}; put the stage at layer >= {len(deep)}")
        self.run: Run | None = None
        self.wraps: list[Wrap] = []
        self.taps: dict[int, Tap] = {}

    # --- install -------------------------------------------------------------------------
    def install(self) -> None:
        requests = [p.scorer.needs(self.info) for p in self.points]
        watched = {p.layer - 1 for p, r in zip(self.points, requests)
                   if p.layer - 1 in r.key_norms or (p.layer - 1 in r.text_attn and not r.text_attn_own)}
        moving = {layer for r in requests for layer in r.transitions}
        first = self.points[0].layer if self.points else len(self.layers)
        for idx, layer in enumerate(self.layers):
            if idx in watched:
                attn = layer.self_attn
                self._wrap(attn, functools.partial(self._attention, idx))
                self.taps[idx] = Tap(attn.k_proj, functools.partial(self._keys, idx))
            if idx in moving:
                self._wrap(layer.self_attn, functools.partial(self._module, idx, 0))
                self._wrap(layer.mlp, functools.partial(self._module, idx, 1))
            if idx >= first:
                self._wrap(layer, functools.partial(self._layer, idx))

    def uninstall(self) -> None:
        while self.wraps:  # last in, first out: wrappers on one module unwind in order
            self.wraps.pop().remove()

    def _wrap(self, module: nn.Module, fn: Callable) -> None:
        self.wraps.append(Wrap(module, fn))

    # --- signals --------------------------------------------------------------------------
    def _keys(self, idx: int, k: torch.Tensor) -> None:
        if self.run is not None and self.run.prefill:
            self.run.captured.setdefault(idx, {})["k"] = k

    def _attention(self, idx: int, forward: Callable, hidden_states, *args, **kwargs):
        run = self.run
        if run is None or not run.prefill:
            return forward(hidden_states, *args, **kwargs)
        tap = self.taps[idx]
        tap.put()
        try:
            out = forward(hidden_states, *args, **kwargs)
        finally:
            tap.remove()
        run.captured.setdefault(idx, {}).update(h=hidden_states, rotary=kwargs.get("position_embeddings"))
        return out

    def _module(self, idx: int, which: int, forward: Callable, hidden_states, *args, **kwargs):
        """A watched layer's attention (0) or MLP (1): its transition, from its input and output."""
        out = forward(hidden_states, *args, **kwargs)
        run = self.run
        if run is not None and run.prefill:
            after = out[0] if isinstance(out, tuple) else out
            ratio, direction = transition(hidden_states.detach(), after.detach())
            mask = run.cuts[-1].mask if run.cuts else run.mask
            if idx not in run.transitions:
                b, length = ratio.shape
                run.transitions[idx] = ratio.new_zeros(b, length, 2, 2)
                run.transition_sums[idx] = ratio.new_zeros(b, 2)
            run.transitions[idx][:, :, which, 0] = ratio
            run.transitions[idx][:, :, which, 1] = direction
            weight = direction.exp() if mask is None else direction.exp() * mask
            run.transition_sums[idx][:, which] = weight.sum(1)
        return out

    def text_attention(self, idx: int, query: str, text_after: torch.Tensor | None, mask: torch.Tensor | None,
                       own: tuple | None = None) -> torch.Tensor:
        """[B, L] float32 head-mean softmax attention from the query rows of layer `idx` to every
        column: the last column's row (`query="last"`), or the mean of the rows of the text tokens
        after each row's last visual token (`"text"`; `text_after` [B, L] bool). From what the
        layer captured as it ran, or (`own`: its input hidden states and rotary embeddings, before
        it runs) from its own input norm and projections."""
        h, kh, (cos, sin) = self.rotary_keys(idx, own)
        attn = self.layers[idx].self_attn
        b, length, _ = h.shape
        heads = attn.config.num_attention_heads
        head_dim = kh.shape[-1]
        rope = sys.modules[type(attn).__module__].apply_rotary_pos_emb
        if query == "last":
            rows = torch.full((b, 1), length - 1, device=h.device)
        else:
            rows, row_ok, counts = instruction_columns(text_after, min_width=1)
            count = to_device(counts, h.device)
        pick = lambda t: t.gather(1, rows[..., None].expand(-1, -1, t.shape[-1]))  # noqa: E731
        q = attn.q_proj(pick(h)).view(b, rows.shape[1], heads, head_dim).transpose(1, 2)
        q, _ = rope(q, q, pick(cos), pick(sin))
        kh = kh.repeat_interleave(heads // kh.shape[1], dim=1)
        logits = torch.matmul(q.float(), kh.float().transpose(2, 3)) * attn.scaling  # [B, H, R, L]
        allowed = torch.arange(length, device=h.device)[None, None, :] <= rows[:, :, None]  # causal
        if mask is not None:
            allowed = allowed & mask.bool()[:, None, :]
        probs = torch.softmax(logits.masked_fill(~allowed[:, None], float("-inf")), dim=-1).mean(1)  # [B, R, L]
        if query == "last":
            return probs[:, 0]
        probs = probs.masked_fill(~row_ok[..., None], 0)
        return probs.sum(1) / count.clamp(min=1)[:, None]

    def rotary_keys(self, idx: int, own: tuple | None = None) -> tuple[torch.Tensor, torch.Tensor, tuple]:
        """Layer `idx`'s normed input [B, L, D], its keys with the rotary embedding applied as the
        layer applies it [B, Hkv, L, hd], and its (cos, sin) expanded to the batch: from what the
        layer captured as it ran, or (`own`: its input hidden states and rotary embeddings) from
        its own input norm and k projection."""
        attn = self.layers[idx].self_attn
        if own is None:
            got = self.run.captured[idx]
            h, k, (cos, sin) = got["h"], got["k"], got["rotary"]
        else:
            h = self.layers[idx].input_layernorm(own[0])
            k, (cos, sin) = attn.k_proj(h), own[1]
        b, length, _ = h.shape
        head_dim = getattr(attn, "head_dim", h.shape[-1] // attn.config.num_attention_heads)
        rope = sys.modules[type(attn).__module__].apply_rotary_pos_emb
        cos, sin = cos.expand(b, -1, -1), sin.expand(b, -1, -1)
        kh = k.detach().view(b, length, -1, head_dim).transpose(1, 2)
        kh, _ = rope(kh, kh, cos, sin)
        return h, kh, (cos, sin)

    # --- the cut --------------------------------------------------------------------------
    def _layer(self, idx: int, forward: Callable, hidden_states, *args, **kwargs):
        run = self.run
        if run is None:
            return forward(hidden_states, *args, **kwargs)
        point = next((p for p in self.points if p.layer == idx), None)
        if point is not None:
            hidden_states = self.cut(point, hidden_states, kwargs) if run.prefill else hidden_states
            if not run.prefill:
                self.decode_mask(self.points.index(point), hidden_states, kwargs)
        kwargs.update(run.current)
        return forward(hidden_states, *args, **kwargs)

    def cut(self, point: Point, hidden: torch.Tensor, kwargs: dict[str, Any]) -> torch.Tensor:
        """Drop the visual rows `point`'s scorer does not keep; set what the following layers take."""
        run = self.run
        b, length, _ = hidden.shape
        device = hidden.device
        mask = run.cuts[-1].mask if run.cuts else run.mask
        if run.counts is None:  # the first cut: the images' places come from the host
            run.counts = [len(p) for p in run.places]
            flat = np.full((len(run.counts), max(run.counts, default=0)), -1, dtype=np.int64)
            for i, p in enumerate(run.places):
                flat[i, : len(p)] = p
            run.places = to_device(torch.from_numpy(flat), device)
        counts, places = run.counts, run.places  # [I, N] flat places in [B, L] (-1 pad), on the device
        kept = [point.kept(n, n0) for n, n0 in zip(counts, run.first)]
        at_places, row_of = places.clamp(min=0), to_device(run.rows, device)  # each image's row
        signals = Signals(n_valid=to_device(counts, device), grid=(1, places.shape[1]), info=self.info,
                          counts=tuple(counts), features=hidden.reshape(b * length, -1)[at_places])
        request = point.scorer.needs(self.info)
        # after an earlier cut the layers take the shortened sequence's rotary embeddings and ids
        rotary = run.current.get("position_embeddings", kwargs["position_embeddings"])
        ids = run.current.get("position_ids", kwargs.get("position_ids"))
        for layer, moved in run.transitions.items():
            signals.transitions[layer] = moved.reshape(b * length, 2, 2)[at_places]
            signals.transition_sums[layer] = run.transition_sums[layer][row_of]
        visual = mark(torch.zeros(b * length, dtype=torch.bool, device=device), places, True).view(b, length)
        last = torch.where(visual, torch.arange(length, device=device), -1).amax(1)
        text_after = torch.arange(length, device=device)[None, :] > last[:, None]  # the instruction
        if mask is not None:
            text_after &= mask.bool()
        if isinstance(run.structure, np.ndarray):  # the first cut: from the host
            flat = mark(torch.zeros(b * length, dtype=torch.bool, device=device), to_device(run.structure, device), True)
            run.structure = flat.view(b, length)
        if run.structure is not None:
            text_after &= ~run.structure
        at = point.layer if request.text_attn_own else point.layer - 1
        if at in request.text_attn:
            own = (hidden, rotary) if at == point.layer else None
            rows = self.text_attention(at, request.text_query, text_after, mask, own)  # [B, L]
            signals.text_attn[at] = rows[row_of[:, None], at_places % length].masked_fill(places < 0, 0)
        if request.text_embeds or request.key_norms:
            self.text_signals(signals, request, hidden, text_after[row_of], at_places % length, places < 0, row_of)
        if request.final_norm:
            signals.features = self.stack.norm(signals.features)
        dynamic = any(k is None for k in kept)  # the scorer's selection says how many go on (a host sync)
        if dynamic:
            kept = list(counts)
        if type(point.scorer).select is Scorer.select:
            chosen, _ = select_tokens(point.scorer.score(signals).float(), None, torch.tensor(kept), torch.tensor(counts))
        else:
            chosen = point.scorer.select(signals, torch.tensor(kept)).indices
        if dynamic:
            kept = (chosen >= 0).sum(1).tolist()
        # the columns that go on: every attended non-visual column, and the chosen visual ones
        kept_places = places.gather(1, chosen.clamp(min=0)).masked_fill(chosen < 0, -1)  # [I, kmax]
        keep = ~visual if mask is None else mask.bool() & ~visual
        keep = mark(keep.reshape(-1), kept_places, True).view(b, length)
        lens = list(run.valid)
        for i, (n, k) in enumerate(zip(counts, kept)):
            lens[run.rows[i]] -= n - k
        run.valid = lens
        new_len = max(lens, default=0)
        packed = torch.sort(torch.where(keep, torch.arange(length, device=device), length), dim=1).values[:, :new_len]
        shift = to_device([new_len - n for n in lens], device)  # left padding added to shorter rows
        src = torch.arange(new_len, device=device)[None, :] - shift[:, None]
        cols = torch.where(src >= 0, packed.gather(1, src.clamp(min=0)), -1)
        safe = cols.clamp(min=0)
        new_mask = (cols >= 0) if mask is None else mask.bool().gather(1, safe) & (cols >= 0)
        run.cuts.append(Cut(cols, new_mask.long(), chosen, kept, length))
        if run.structure is not None:
            run.structure = run.structure.gather(1, safe) & (cols >= 0)
        run.captured.pop(point.layer - 1, None)  # read by this point only
        # the places of the images' kept tokens in the new sequence, for a later cut (on the device)
        where = torch.full((b * length + 1,), -1, dtype=torch.long, device=device)
        flat_cols = torch.where(cols >= 0, torch.arange(b, device=device)[:, None] * length + safe, b * length)
        where.scatter_(0, flat_cols.reshape(-1), torch.arange(b * new_len, device=device))
        where[-1] = -1
        run.places = where[kept_places.masked_fill(kept_places < 0, b * length)]
        run.counts = kept
        hidden = hidden.gather(1, safe[..., None].expand(-1, -1, hidden.shape[-1]))
        for layer, moved in run.transitions.items():  # the kept tokens' transitions go on with them
            run.transitions[layer] = moved.gather(1, safe[:, :, None, None].expand(-1, -1, 2, 2)) \
                .masked_fill((cols < 0)[:, :, None, None], 0)
        cos, sin = rotary
        g = lambda t: t.expand(b, -1, -1).gather(1, safe[..., None].expand(-1, -1, t.shape[-1]))  # noqa: E731
        current = {"position_embeddings": (g(cos), g(sin))}
        if ids is not None:
            current["position_ids"] = ids.expand(b, -1).gather(1, safe)
        current["attention_mask"] = self.make_mask(point.layer, hidden, new_mask, kwargs.get("cache"))
        run.current = current
        return hidden

    def text_signals(self, signals: Signals, request, hidden: torch.Tensor, text_after: torch.Tensor,
                     cols: torch.Tensor, pad: torch.Tensor, row_of: torch.Tensor) -> None:
        """Per image (`text_after` [I, L]: its row's instruction columns; `cols` [I, N] its tokens'
        columns, `pad` where padded): the instruction tokens' hidden states (`text_embeds`) and the
        key norms of the requested layers over its visual then its text tokens. One host sync (the
        longest instruction)."""
        tcols, real, counts = instruction_columns(text_after)  # [I, M]
        tpad = ~real
        if request.text_embeds:
            text = hidden[row_of[:, None], tcols].masked_fill(tpad[..., None], 0)
            signals.text_embeds = self.stack.norm(text) if request.final_norm else text
            signals.text_counts = tuple(counts)
        for layer in request.key_norms:
            norms = self.rotary_keys(layer)[1].float().abs().sum((1, 3))  # [B, L]
            mine = norms[row_of]
            signals.key_norms[layer] = torch.cat([mine.gather(1, cols).masked_fill(pad, 0),
                                                  mine.gather(1, tcols).masked_fill(tpad, 0)], dim=1)

    def decode_mask(self, index: int, hidden: torch.Tensor, kwargs: dict[str, Any]) -> None:
        """A decode step: layers from this point on attend to their own (shorter) cache."""
        run = self.run
        cut = run.cuts[index]
        b = hidden.shape[0]
        full = run.mask
        new = full[:, run.length :] if full is not None else \
            torch.ones(b, kwargs["cache"].get_seq_length() + hidden.shape[1] - run.length, dtype=torch.long,
                       device=hidden.device)
        mask2d = torch.cat([cut.mask.to(new.dtype), new.to(cut.mask.device)], dim=1)
        run.current = {"attention_mask": self.make_mask(self.points[index].layer, hidden, mask2d, kwargs.get("cache"))}

    def make_mask(self, layer: int, hidden: torch.Tensor, mask2d: torch.Tensor, cache) -> Any:
        """The mask HF would make for `layer` from a 2-D mask over that layer's keys."""
        import inspect

        from transformers.masking_utils import create_causal_mask

        name = "cache" if "cache" in inspect.signature(create_causal_mask).parameters else "past_key_values"
        return create_causal_mask(self.stack.config, hidden, mask2d, **{name: cache}, layer_idx=layer)


def transition(before: torch.Tensor, after: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[B, L] float32 each: how a module changes each token's representation: the magnitude
    ratio ||after|| / ||before|| and the direction change 1 - cos(before, after)."""
    before, after = before.float(), after.float()
    ratio = after.norm(dim=-1) / before.norm(dim=-1).clamp(min=1e-12)
    direction = 1 - nn.functional.cosine_similarity(before, after, dim=-1)
    return ratio, direction


def instruction_columns(text_after: torch.Tensor, min_width: int = 0) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
    """Per row of `text_after` [R, L] (bool): its True columns in order, padded to the longest row
    (at least `min_width`) with column L-1 ([R, W]); which of them are real ([R, W] bool); how many
    each row has (host; the one device sync)."""
    length = text_after.shape[1]
    counts = text_after.sum(1).tolist()
    width = max(max(counts, default=0), min_width)
    order = torch.sort(torch.where(text_after, torch.arange(length, device=text_after.device), length), dim=1).values
    real = torch.arange(width, device=text_after.device)[None, :] < to_device(counts, text_after.device)[:, None]
    return order[:, :width].clamp(max=length - 1), real, counts


def mark(flat: torch.Tensor, index: torch.Tensor, value: bool) -> torch.Tensor:
    """`flat` with `value` at the (flat) positions in `index`, skipping -1 entries, without a host
    sync (boolean indexing would wait for the device to count them)."""
    out = torch.cat([flat, flat.new_zeros(1)])
    out[index.reshape(-1).masked_fill(index.reshape(-1) < 0, flat.numel())] = value
    return out[:-1]
