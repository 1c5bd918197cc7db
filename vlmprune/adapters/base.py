"""Adapter base: the patched forward shared by model families, and the adapter registry.

A family adapter says where the visual tokens and signals come from; this base turns
the scorer's kept indices into a pruned prefill (embeddings, mask, positions, labels) and keeps
the decode steps that follow consistent with the pruned KV cache."""

from __future__ import annotations

import functools
import inspect
import threading
import weakref
from dataclasses import dataclass
from typing import Any, Callable, ClassVar

import numpy as np
import torch
from torch import nn

from vlmprune.adapters.decoder import DecoderStages, Point, Run, decoder_stack
from vlmprune.adapters.vit import pad_graphs
from vlmprune.config import PruneConfig
from vlmprune.kernels import gather_rows, select_tokens
from vlmprune.kernels.select import to_device
from vlmprune.kernels.assemble import Layout, assemble, plan_layout
from vlmprune.scorers.base import EncoderInfo, Request, Scorer, Signals, budget, stack_rows

STATE_ATTR = "_vlmprune_state"
DECODER_ATTR = "_vlmprune_decoder"  # on the KV cache after a prefill with decoder stages: (length, cuts)
CACHE_NAMES = ("cache", "past_key_values")
"""What the KV cache is called in forward kwargs and outputs: `cache` from transformers 5.24,
`past_key_values` before (5.24 still accepts the old name)."""
SIGNAL_NAMES = ("cls_attn", "cls_value_attn", "received_attn", "keys", "value_norms", "vision_hidden", "attn_graph")
_MISSING = object()


@dataclass
class DecodeState:
    """Stored on the KV cache after a pruned prefill: how to map the unpruned-length attention
    mask and position ids that `generate` keeps onto the pruned cache."""

    orig_len: int
    new_len: int
    mask: torch.Tensor | None
    removed: torch.Tensor
    positions: str  # "compact" / "original" (1-D ids), or "mrope": the family maps them (Qwen)
    rope_deltas: torch.Tensor | None = None  # M-RoPE: [B, 1] next id - attended tokens, per row
    turns: int = 0  # later chat turns (calls with images on a non-empty cache) merged in, see `Turn`


@dataclass
class Turn:
    """A later chat turn: a call with images that continues a non-empty KV cache of `past` tokens.
    Its new tokens are pruned as a prefill of their own; the cache is left as it is."""

    given: dict[str, Any]  # the call as made (what runs when nothing is pruned, now or before)
    prior: DecodeState | None  # the cache's state (None: nothing in it was pruned)
    past: int
    past_mask: torch.Tensor | None  # [B, past] the cache's 2-D mask (None: all attended)

    def join(self, mask: torch.Tensor | None, width: int) -> torch.Tensor | None:
        """The mask of the cache followed by the new tokens' [B, width] (None: all attended)."""
        if mask is None and self.past_mask is None:
            return None
        like = mask if mask is not None else self.past_mask
        head = self.past_mask if self.past_mask is not None else like.new_ones(like.shape[0], self.past)
        tail = mask if mask is not None else like.new_ones(like.shape[0], width)
        return torch.cat([head.to(tail.device, tail.dtype), tail], dim=1)

    def state(self, chunk: DecodeState) -> DecodeState:
        """The cache's state after this turn, from the state of its new tokens alone (`chunk`): the
        pruned cache's columns stand for the unpruned conversation's up to the turn's end."""
        prior = self.prior or DecodeState(self.past, self.past, None, torch.zeros_like(chunk.removed), chunk.positions)
        deltas = chunk.rope_deltas
        if deltas is not None:  # the chunk's counted its own attended tokens only
            seen = self.past_mask.sum(1) if self.past_mask is not None else torch.full_like(deltas[:, 0], self.past)
            deltas = deltas - seen.to(deltas.device, deltas.dtype)[:, None]
        return DecodeState(prior.orig_len - prior.new_len + self.past + chunk.orig_len, self.past + chunk.new_len,
                           self.join(chunk.mask, chunk.new_len), prior.removed.to(chunk.removed.device) + chunk.removed,
                           chunk.positions, deltas, prior.turns + 1)


def find_cache(inputs: dict[str, Any]) -> Any:
    """The KV cache among a forward's kwargs (None if it was given none)."""
    return next((inputs[name] for name in CACHE_NAMES if inputs.get(name) is not None), None)


def output_cache(output: Any) -> Any:
    """The KV cache a forward returned (None if it returned none)."""
    for name in CACHE_NAMES:
        cache = getattr(output, name, None)
        if cache is not None:
            return cache
    return None


def run_scorer(scorer: Scorer, signals: Signals, feats: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Kept indices [I, kmax] and the features to place there [I, kmax, D].

    Score-only scorers go through the fused top-k + gather kernel; scorers with their own
    `select` return indices (and, when merging, new features). `k` may live on the host (the
    adapter keeps it there): the kernels then size their outputs without a device sync."""
    if type(scorer).select is Scorer.select:
        scores = scorer.score(signals).float()
        valid = signals.n_valid if signals.counts is None else torch.tensor(signals.counts)
        return select_tokens(scores, feats, k, valid)
    sel = scorer.select(signals, k)
    if sel.features is not None:
        return sel.indices, sel.features
    width, counts = sel.indices.shape[1], signals.counts
    full = counts is not None and k.device.type == "cpu" and all(b == width for b in budget(k, counts))  # no -1 pads
    return sel.indices, gather_rows(feats, sel.indices, padded=not full)


def stack_padded(rows: list[torch.Tensor]) -> torch.Tensor:
    """[len(rows), max length, ...]: per-image tensors stacked along a new first dim, zero-padded
    at the end of their first dim; one stack when all have the same shape (the common case, and
    the cheap one: per-image pads cost a launch each on the host-bound scoring path), no copy
    when they are the rows of one encoder batch (HF's `list(features)`, see `stack_rows`)."""
    if all(r.shape == rows[0].shape for r in rows):
        return stack_rows(rows)
    width = max(r.shape[0] for r in rows)
    return torch.stack([nn.functional.pad(r, (0, 0) * (r.ndim - 1) + (0, width - r.shape[0])) for r in rows])


@dataclass
class Recorded:
    """The signals of one encoder call: name -> layer -> [images, ...], a row per image in order."""

    tables: dict[str, dict[int, torch.Tensor]]
    size: int
    grids: list[tuple[int, int]] | None = None  # each image's token grid, where the encoder call says it


@dataclass
class Prompt:
    """A prefill's prompt on the host, read once before the encoder is launched."""

    ids: torch.Tensor  # [B, L]
    mask: torch.Tensor | None  # [B, L] or None
    is_visual: torch.Tensor  # [B, L] bool: a visual token of any kind (image, video)
    row_counts: list[int]  # visual tokens per row
    right_padded: bool


@dataclass
class Encoded:
    """The visual items (images, videos) of a prefill, in the order their tokens appear in the
    prompt: each item's features [N_i, D] and token grid, and the encoder outputs by kind as HF
    returns them (for a call that prunes nothing)."""

    feats: list[torch.Tensor]
    grids: list[tuple[int, int]]
    outputs: dict[str, Any]
    kinds: list[str] | None = None  # per item: "image" or "video" (None: all images)
    index: list[int] | None = None  # per item: its place among the items of its kind
    structure: list[int] | None = None
    """Per item, its placeholder tokens that are structure, not visual tokens (LLaVA-NeXT's
    `image_newline`): never scored or counted, always kept; `feats` hold the visual tokens only and
    the family places the structure rows (`pruned_inputs`). None: none."""

    def runs(self) -> list[int]:
        """Placeholder tokens of each item in the prompt: its visual tokens plus its structure tokens."""
        extra = self.structure or [0] * len(self.feats)
        return [int(f.shape[0]) + e for f, e in zip(self.feats, extra)]


class Adapter:
    """One per model family. Subclasses set `model_types`/`model_classes` and implement
    `encoder_info`, `visual_token_id`, `encoder_owner`, `collecting` and `encode_images`."""

    model_types: ClassVar[tuple[str, ...]] = ()
    model_classes: ClassVar[tuple[str, ...]] = ()
    default_positions: ClassVar[str] = "compact"
    position_modes: ClassVar[tuple[str, ...]] = ("compact", "original")
    encoder_methods: ClassVar[tuple[str, ...]] = ("get_image_features",)
    reference: ClassVar[dict[str, tuple[EncoderInfo, frozenset[str]]]] = {}
    """model_type -> (a typical checkpoint's encoder, the signals the adapter gives for it): what the
    README's method x family table is computed from, without building a model."""
    fallbacks: ClassVar[dict[str, str]] = {}
    """signal name -> how this family computes it where it differs from the method's paper."""
    options: ClassVar[tuple[str, ...]] = ()
    """The adapter options of `patch` (`PruneConfig.extra`) this family takes (`view_scores`: any-resolution)."""

    def __init__(self, model: nn.Module, config: PruneConfig):
        self.model = model
        self.config = config
        if config.positions is None:
            config.positions = self.default_positions
        if config.positions not in self.position_modes:
            raise ValueError(
                f"positions={config.positions!r} is not defined for {type(model).__name__}; use one of "
                f"{list(self.position_modes)} (DESIGN §2)"
            )
        for name, value in config.extra.items():
            if name not in self.options:
                raise ValueError(f"{name}={value!r} is not an option of {type(model).__name__}; its options: "
                                 f"{list(self.options) or 'none'} (DESIGN §1)")
        self.info = self.encoder_info()
        self.stage = config.vision_stage
        self.request = Request()
        if self.stage is not None:
            try:
                self.request = self.stage.scorer.needs(self.info)
                self.check_request(self.request)
            except ValueError as e:
                raise ValueError(
                    f"{e}. Method {self.stage.method!r} does not run on {type(model).__name__}; the methods that "
                    f"do: {self.supported_methods()}"
                ) from None
        self._local = threading.local()  # per thread: the latest prefill's selection (`_last`, `_cuts`)
        self.lock = threading.RLock()  # one patched call at a time: the taps and decoder wrappers are shared
        self._signals: dict[int, tuple[weakref.ref, Recorded, int]] = {}  # id(features) -> (ref, batch, row)
        self._saved_encoder: dict[str, Any] = {}
        self.decoder: DecoderStages | None = None
        if config.decoder_stages:
            points, depth = [], len(decoder_stack(model).layers)
            for stage in config.decoder_stages:
                budget_of = functools.partial(lambda s, n, n0: config.kept(n, s), stage)
                scorer = stage.scorer.for_depth(depth)  # layer defaults scaled to this decoder
                points += [Point(layer, config.stages.index(stage), scorer, kept)
                           for layer, kept in scorer.schedule(budget_of)]
            self.decoder = DecoderStages(model, points, self.info)

    @property
    def _last(self) -> list[list[torch.Tensor]] | PendingSelection | None:
        """The latest prefill's kept indices in this thread (`last_selection` is per thread)."""
        return getattr(self._local, "last", None)

    @_last.setter
    def _last(self, value) -> None:
        self._local.last = value

    @property
    def _cuts(self) -> list | None:
        """The decoder cuts of this thread's latest prefill."""
        return getattr(self._local, "cuts", None)

    @_cuts.setter
    def _cuts(self, value) -> None:
        self._local.cuts = value

    def __getstate__(self) -> dict[str, Any]:  # deepcopy / pickle: a new lock and no thread state
        state = dict(self.__dict__)
        state.pop("_local", None)
        state.pop("lock", None)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._local, self.lock = threading.local(), threading.RLock()

    # --- family-specific ---------------------------------------------------------------
    def encoder_info(self) -> EncoderInfo:
        raise NotImplementedError

    def visual_token_id(self) -> int:
        raise NotImplementedError

    def encoder_owner(self) -> nn.Module:
        """The module whose `encoder_methods` turn pixels into visual tokens (HF's base model);
        `generate()` calls it before the prefill, so the signals are collected there."""
        raise NotImplementedError

    def collecting(self, inputs: dict[str, Any]):
        """Context manager around the encoder call; yields a function that takes the encoder's
        output and returns its signals batched (name -> layer -> [images, ...], rows in the order
        of the output's images)."""
        raise NotImplementedError

    def encode_images(self, inputs: dict[str, Any]) -> Any:
        """The encoder output (with `pooler_output`: one [N_i, D] tensor per image) for a prefill."""
        raise NotImplementedError

    def provides(self) -> set[str]:
        """Signal names this family can compute."""
        return {"features", "text_embeds", *SIGNAL_NAMES}

    def supported_methods(self) -> list[str]:
        """The registered vision-stage methods (default options) whose signals this model provides."""
        from vlmprune.scorers import available_methods, build_scorer, scorer_class

        ok = []
        for name in available_methods():
            if scorer_class(name).stage != "vision":
                continue
            try:
                self.check_request(build_scorer(name).needs(self.info), name)
            except ValueError:
                continue
            ok.append(name)
        return ok

    # --- install --------------------------------------------------------------------------
    def install(self) -> None:
        """Wrap the encoder methods so every image (video) they encode has its signals recorded."""
        owner = self.encoder_owner()
        for method in self.encoder_methods:
            self._saved_encoder[method] = owner.__dict__.get(method, _MISSING)
            setattr(owner, method, self.wrap_encoder(getattr(owner, method)))
        if self.decoder is not None:
            self.decoder.install()

    def wrap_encoder(self, orig: Callable) -> Callable:
        @functools.wraps(orig)
        def encode(*args, **kwargs):
            inputs = bind_inputs(orig, args, kwargs)
            with self.lock, self.collecting(inputs) as finish:
                out = orig(*args, **kwargs)
                self.record(list(out.pooler_output), finish(out), self.encoder_grids(inputs))
            return out

        return encode

    def uninstall(self) -> None:
        owner = self.encoder_owner()
        for method, saved in self._saved_encoder.items():
            if saved is _MISSING:
                owner.__dict__.pop(method, None)
            else:
                setattr(owner, method, saved)
        self._saved_encoder = {}
        self._signals.clear()
        if self.decoder is not None:
            self.decoder.uninstall()

    def encoder_grids(self, inputs: dict[str, Any]) -> list[tuple[int, int]] | None:
        """Each encoded image's token grid, from the encoder call's inputs (None: the encoder's grid)."""
        return None

    def recorded_grid(self, feats: torch.Tensor) -> tuple[int, int] | None:
        """The grid recorded when these features were encoded (None if they were not, or had none)."""
        ref, batch, row = self._signals.get(id(feats), (None, None, None))
        if ref is None or ref() is not feats or batch.grids is None:
            return None
        return batch.grids[row]

    def record(self, feats: list[torch.Tensor], tables: dict[str, dict[int, torch.Tensor]],
               grids: list[tuple[int, int]] | None = None) -> None:
        """Remember the signals of an encoder call under each image's feature tensor (generate()
        may repeat the same tensors for beams / return sequences, so identity is the key)."""
        self._signals = {k: v for k, v in self._signals.items() if v[0]() is not None}
        batch = Recorded(tables, len(feats), grids)
        for row, f in enumerate(feats):
            self._signals[id(f)] = (weakref.ref(f), batch, row)

    def signals_for(self, feats: list[torch.Tensor], grids: list[tuple[int, int]] | None = None) -> Signals:
        """The recorded signals of these images as one padded `Signals`: the encoder call's own
        batched tensors when `feats` are its images in order (the prefill's case: no copy),
        else their rows stacked. `grids`: each image's token grid (default: the encoder's), with a
        third entry for a video's frame count."""
        padded = stack_padded(feats)
        n = padded.shape[1]
        counts = tuple(int(f.shape[0]) for f in feats)
        if grids is None:
            grids = [self.image_grid(c) for c in counts]
        frames = tuple(g[2] if len(g) > 2 else 1 for g in grids)  # a video's grid: (t*h, w, t)
        grids = [tuple(g[:2]) for g in grids]
        signals = Signals(
            n_valid=to_device(counts, padded.device),
            grid=grids[0] if grids and all(g == grids[0] for g in grids) and grids[0][0] * grids[0][1] == n else (1, n),
            info=self.info,
            features=padded,
            counts=counts,
            grids=tuple(grids),
            frames=frames,
        )
        wanted = [name for name in SIGNAL_NAMES if getattr(self.request, name)]
        if not wanted:
            return signals
        found = []
        for f in feats:
            ref, batch, row = self._signals.get(id(f), (None, None, None))
            if ref is None or ref() is not f:
                raise ValueError(
                    f"vlmprune: method {self.stage.method!r} needs {wanted}, collected while the image is encoded; "
                    f"these image features were computed before the model was patched. Pass pixel_values "
                    f"(or encode with the patched model)"
                )
            found.append((batch, row))
        whole = found[0][0]
        in_order = len(found) == whole.size and all(b is whole and r == i for i, (b, r) in enumerate(found))
        for name in wanted:
            if in_order:  # the recorded table itself (a `RowTable` where the hooks made one)
                setattr(signals, name, whole.tables[name])
                continue
            table = getattr(signals, name)
            stack = pad_graphs if name == "attn_graph" else stack_padded  # graphs: [H, T, T] per image
            for layer in getattr(self.request, name):
                table[layer] = stack([b.tables[name][layer][r] for b, r in found])
        return signals

    def prefill_signals(self, prompt: Prompt, enc: Encoded) -> Signals:
        """The signals of a prefill's items (`signals_for`), with the prompt's text embeddings when
        the scorer asks for them."""
        signals = self.signals_for(enc.feats, enc.grids)
        if self.request.text_embeds:
            rows = images_by_row(prompt.row_counts, enc.runs())
            signals.text_embeds, signals.text_counts = self.text_embeddings(prompt, rows, signals.features.device)
        return signals

    def text_embeddings(self, prompt: Prompt, rows: list[list[int]], device) -> tuple[torch.Tensor, tuple[int, ...]]:
        """[I, M, D] input embeddings of each image's row's text after the row's last visual token
        (attended, non-visual tokens, in order; zero-padded) and how many each image has."""
        ids, visual = prompt.ids.numpy(), prompt.is_visual.numpy()
        attended = np.ones_like(visual) if prompt.mask is None else prompt.mask.numpy() != 0
        per_row = []
        for r in range(ids.shape[0]):
            cols = np.flatnonzero(visual[r])
            after = np.arange(ids.shape[1]) > (cols[-1] if cols.size else -1)
            per_row.append(ids[r][after & attended[r] & ~visual[r]])
        texts = [per_row[r] for r, row in enumerate(rows) for _ in row]
        width = max((len(t) for t in texts), default=0)
        table = np.zeros((len(texts), max(width, 1)), dtype=np.int64)
        for i, t in enumerate(texts):
            table[i, : len(t)] = t
        counts = tuple(len(t) for t in texts)
        embeds = self.model.get_input_embeddings()(to_device(torch.from_numpy(table), device))
        valid = torch.arange(table.shape[1])[None, :] < torch.tensor(counts, dtype=torch.long)[:, None]
        return embeds * valid.to(device=embeds.device, dtype=embeds.dtype)[..., None], counts

    def image_grid(self, n: int) -> tuple[int, int]:
        """The token grid of an image of n tokens: the encoder's, or one row where it does not fit."""
        grid = self.info.grid
        return grid if grid is not None and grid[0] * grid[1] == n else (1, n)

    # --- shared -------------------------------------------------------------------------
    def check_request(self, request: Request, method: str | None = None) -> None:
        """Raise if the scorer needs a signal, or a layer, this model cannot provide."""
        have = self.provides()
        method = method or self.stage.method
        for name in ("features", "text_embeds"):
            if getattr(request, name) and name not in have:
                raise ValueError(f"method {method!r} needs signal {name!r}, which {type(self.model).__name__} "
                                 f"cannot provide; it provides {sorted(have)}")
        for name in SIGNAL_NAMES:
            layers = getattr(request, name)
            if layers and name not in have:
                raise ValueError(
                    f"method {method!r} needs signal {name!r}, which {type(self.model).__name__} "
                    f"cannot provide; it provides {sorted(have)}"
                )
            bad = [layer for layer in layers if not 0 <= layer < self.info.num_layers]
            if bad:
                raise ValueError(
                    f"method {method!r} asks for encoder layer(s) {bad}; this encoder has layers "
                    f"0..{self.info.num_layers - 1}"
                )

    def forward(self, orig: Callable, inputs: dict[str, Any]):
        cache = find_cache(inputs)
        state = getattr(cache, STATE_ATTR, None) if cache is not None else None
        if self.has_visual_input(inputs):
            if cache is not None and cache.get_seq_length() > 0:
                return self.continue_turn(orig, inputs, cache.get_seq_length(), state)
            return self.prefill(orig, inputs)
        if state is not None:
            inputs = self.decode_inputs(state, inputs)
        cuts = getattr(cache, DECODER_ATTR, None) if cache is not None else None
        if cuts is not None and self.decoder is not None:  # layers after a decoder stage: their own cache
            mask = inputs.get("attention_mask")
            if generated_4d(mask):  # static cache: see decode_inputs
                mask = None
            return self.run_decoder(orig, inputs, Run(False, mask, cuts=cuts[1], length=cuts[0]))
        return orig(**inputs)

    def continue_turn(self, orig: Callable, inputs: dict[str, Any], past: int, state: DecodeState | None):
        """A call with images that continues a non-empty KV cache of `past` tokens (a later chat turn,
        DESIGN §2): its new tokens are pruned as a prefill of their own, with the mask the caller gives
        for the whole unpruned conversation mapped onto the pruned cache, and positions that continue
        the cache's (`turn_positions`)."""
        if self.decoder is not None:
            raise ValueError("vlmprune: decoder stages in a call with images that continues a non-empty KV cache are "
                             "not supported; use a vision-stage method for multi-turn chat, or start a new cache")
        ids = inputs.get("input_ids")
        if ids is None:
            raise ValueError("vlmprune: pruning needs input_ids to find the image tokens; got inputs_embeds only")
        q, mask = ids.shape[1], inputs.get("attention_mask")
        if generated_4d(mask) or (mask is not None and mask.ndim != 2):
            raise ValueError(f"vlmprune: a call with images that continues a KV cache needs a 2-D attention_mask over "
                             f"the whole conversation (or none); got shape {tuple(mask.shape)} (a static cache?)")
        if state is not None:
            mask = cache_mask(state, mask, past, q)
        chunk = dict(inputs, attention_mask=None if mask is None else mask[:, past:])
        chunk["position_ids"] = self.turn_positions(inputs, state, past, mask)
        return self.prefill(orig, chunk, Turn(inputs, state, past, None if mask is None else mask[:, :past]))

    def turn_positions(self, inputs: dict[str, Any], state: DecodeState | None, past: int,
                       mask: torch.Tensor | None) -> torch.Tensor | None:
        """A later turn's position ids before its images are pruned (None: the decoder's own, after
        the pruned cache): `compact` the caller's (unpruned) ids less the tokens pruned before;
        `original` the caller's, or without them the unpruned conversation's next ids."""
        pos, ids = inputs.get("position_ids"), inputs["input_ids"]
        if self.config.positions == "compact":
            return pos if pos is None or state is None else pos - state.removed.to(pos.device)[:, None]
        if pos is None:
            start = past + (0 if state is None else state.orig_len - state.new_len)
            pos = torch.arange(start, start + ids.shape[1], device=ids.device)[None]
        return pos

    def chunk_deltas(self, position_ids: torch.Tensor | None, mask: torch.Tensor | None) -> torch.Tensor | None:
        """M-RoPE families: [B, 1] next id - attended tokens of a prefill's ids (None: 1-D positions)."""
        return None

    def unpruned_turn(self, orig: Callable, inputs: dict[str, Any], enc: Encoded, turn: Turn):
        """A later turn whose images keep every token: as the caller made it when nothing in the cache
        was pruned either; else on the pruned cache, its state extended over the new tokens."""
        if turn.prior is None:
            return orig(**self.unpruned_inputs(turn.given, enc))
        q, mask = inputs["input_ids"].shape[1], inputs.get("attention_mask")
        call = self.unpruned_inputs(inputs, enc)
        call["attention_mask"] = turn.join(mask, q)
        chunk = DecodeState(q, q, mask, torch.zeros_like(turn.prior.removed), turn.prior.positions,
                            self.chunk_deltas(inputs.get("position_ids"), mask))
        return self.finish_prefill(orig(**call), turn.state(chunk))

    def finish_prefill(self, result: Any, state: DecodeState) -> Any:
        """`result` of a pruned prefill (or later turn), its cache carrying `state` for the calls after."""
        cache = output_cache(result)
        if cache is not None:
            setattr(cache, STATE_ATTR, state)
        self.after_prefill(state)
        return result

    def run_decoder(self, orig: Callable, call: dict[str, Any], run: Run | None):
        """`orig(**call)` with the decoder stages acting inside it (`run`; None: none act)."""
        if run is None or self.decoder is None:
            return orig(**call)
        labels = call.pop("labels", None) if run.prefill else None
        if labels is not None and call.get("logits_to_keep") not in (None, 0):
            raise ValueError("vlmprune: labels= with a decoder stage needs every position's logits (logits_to_keep=0)")
        self.decoder.run = run
        try:
            result = orig(**call)
        finally:
            self.decoder.run = None
        cache = output_cache(result)
        if run.prefill:
            if cache is not None:
                setattr(cache, DECODER_ATTR, (run.length, run.cuts))
            self._cuts = run.cuts
        if labels is not None:  # the loss over the rows that reached the output: the labels of their columns
            result.loss = self.model.loss_function(logits=result.logits, labels=surviving(labels, run.cuts),
                                                   vocab_size=result.logits.shape[-1])
        return result

    def decoder_run(self, places: np.ndarray, per_image: list[int], rows: list[list[int]], mask,
                    valid: list[int]) -> Run | None:
        """The prefill's `Run` for the decoder stages: each image's flat places in the decoder input
        (whose 2-D mask is `mask`, attending `valid` tokens per row)."""
        if self.decoder is None:
            return None
        self._cuts = None
        row_of = [r for r, row in enumerate(rows) for _ in row]
        return Run(True, mask, valid=list(valid), places=list(np.split(places, np.cumsum(per_image)[:-1])),
                   rows=row_of, first=list(per_image))

    def has_visual_input(self, inputs: dict[str, Any]) -> bool:
        mm = inputs.get("mm_encoder_outputs") or {}
        return inputs.get("pixel_values") is not None or mm.get("image") is not None

    def visual_token_ids(self) -> tuple[int, ...]:
        """The placeholder token ids of every visual kind, in the order of `Encoded.kinds` names."""
        return (self.visual_token_id(),)

    def read_prompt(self, inputs: dict[str, Any]) -> Prompt:
        """The prompt on the host, read before the encoder is launched (a read waits for the device;
        after the launch it would stall the host until the encoder is done): the pruned layout is
        planned from it, so nothing after the encoder waits for the device."""
        input_ids = inputs.get("input_ids")
        if input_ids is None:
            raise ValueError("vlmprune: pruning needs input_ids to find the image tokens; got inputs_embeds only")
        mask = inputs.get("attention_mask")
        if generated_4d(mask):  # a static cache: generate() made it 4-D
            mask = inputs["attention_mask"] = padding_mask(mask, input_ids.shape[1])
        if mask is not None and mask.shape != input_ids.shape:
            raise ValueError(
                f"vlmprune: pruning needs a 2-D attention_mask shaped like input_ids {tuple(input_ids.shape)} "
                f"(or none); got shape {tuple(mask.shape)}"
            )
        if mask is None or mask.device != input_ids.device:
            ids_host, mask_host = input_ids.cpu(), None if mask is None else mask.cpu()
        else:  # one read for both
            ids_host, mask_host = torch.stack([input_ids, mask.to(input_ids.dtype)]).cpu().unbind(0)
        token_ids = self.visual_token_ids()
        is_visual = ids_host == token_ids[0]
        for t in token_ids[1:]:
            is_visual |= ids_host == t
        right_padded = mask_host is not None and bool((mask_host[:, -1] == 0).any())
        return Prompt(ids_host, mask_host, is_visual, is_visual.sum(1).tolist(), right_padded)

    def encode(self, inputs: dict[str, Any], prompt: Prompt) -> Encoded:
        """The prefill's visual items in prompt order (one kind here: images)."""
        encoded = self.encode_images(inputs)
        feats = list(encoded.pooler_output)
        return Encoded(feats, [self.image_grid(int(f.shape[0])) for f in feats], {"image": encoded})

    def prefill(self, orig: Callable, inputs: dict[str, Any], turn: Turn | None = None):
        """A prefill with images (`turn`: a later turn's new tokens, see `continue_turn`)."""
        prompt = self.read_prompt(inputs)
        enc = self.encode(inputs, prompt)
        feats = enc.feats
        per_image = [int(f.shape[0]) for f in feats]
        runs = enc.runs()  # placeholder tokens per item (= per_image unless the family has structure tokens)
        if sum(prompt.row_counts) != sum(runs):
            raise ValueError(
                f"vlmprune: the prompt holds {sum(prompt.row_counts)} image tokens but the images give "
                f"{sum(runs)} visual tokens ({runs}); check the processor output"
            )
        kept = [self.config.kept(n) for n in per_image]
        rows = images_by_row(prompt.row_counts, runs)
        if kept == per_image or self.stage is None:
            self._last = [[torch.arange(per_image[i]) for i in row] for row in rows]
            b, length = prompt.ids.shape
            valid = prompt.mask.sum(1).tolist() if prompt.mask is not None else [length] * b
            run = self.decoder_run(np.flatnonzero(prompt.is_visual.numpy()), per_image, rows,
                                   inputs.get("attention_mask"), valid)
            if run is not None:
                run.length = length
            if turn is not None:
                return self.unpruned_turn(orig, inputs, enc, turn)
            return self.run_decoder(orig, self.unpruned_inputs(inputs, enc), run)

        extra = [r - n for r, n in zip(runs, per_image)]  # structure tokens: kept, placed by `pruned_inputs`
        layout = plan_layout(prompt.ids, prompt.is_visual, runs, [k + e for k, e in zip(kept, extra)],
                             prompt.right_padded, prompt.mask, columns=self.needs_columns(inputs))
        signals = self.prefill_signals(prompt, enc)
        k = torch.tensor(kept)  # on the host: the kernels read budgets without a device sync
        idx, visual = run_scorer(self.stage.scorer, signals, signals.features, k)
        if type(self.stage.scorer).select is not Scorer.select:  # a scorer's own selection: check the plan
            check_kept(idx, kept, self.stage.method)
        self._last = PendingSelection(idx, kept, rows, self.stage.method)
        if idx.device.type == "cpu":
            self._last = self._last.resolve()  # the host has them anyway: check the plan at once

        call, state = self.pruned_inputs(inputs, layout, idx, visual, kept, enc)
        if turn is not None:
            call["attention_mask"] = turn.join(call.get("attention_mask"), layout.new_len)
            state = turn.state(state)
        valid = layout.mask.sum(1).tolist() if layout.mask is not None else list(layout.lens)
        run = self.decoder_run(layout.visual, kept, rows, call.get("attention_mask"), valid)
        if run is not None:
            run.length = layout.new_len
        return self.finish_prefill(self.run_decoder(orig, call, run), state)

    def needs_columns(self, inputs: dict[str, Any]) -> bool:
        """Whether the pruned layout must say each place's prompt column (positions, labels)."""
        return inputs.get("labels") is not None or inputs.get("position_ids") is not None \
            or self.config.positions == "original"

    def unpruned_inputs(self, inputs: dict[str, Any], enc: Encoded) -> dict[str, Any]:
        """The forward's kwargs when nothing is pruned: the encoder outputs handed over as they are."""
        rest = {k: v for k, v in inputs.items() if k not in self.visual_input_names()}
        return {**rest, "mm_encoder_outputs": enc.outputs}

    def pruned_inputs(self, inputs: dict[str, Any], layout: Layout, idx: torch.Tensor, visual: torch.Tensor,
                      kept: list[int], enc: Encoded) -> tuple[dict[str, Any], DecodeState]:
        """The forward's kwargs for the pruned prefill (the kept visual rows written into
        `inputs_embeds`) and the state its decode steps need."""
        needs_index = self.needs_columns(inputs)
        out = assemble(
            self.model.get_input_embeddings(),
            layout,
            kept_rows(visual, kept),
            kept_rows(idx.unsqueeze(-1), kept).squeeze(-1) if needs_index else None,
            attention_mask=inputs.get("attention_mask"),
            position_ids=inputs.get("position_ids"),
            labels=inputs.get("labels"),
            positions=self.config.positions,
        )
        rest = {k: v for k, v in inputs.items() if k not in self.visual_input_names()}
        rest.update(input_ids=None, inputs_embeds=out.inputs_embeds, attention_mask=out.attention_mask)
        rest["position_ids"] = out.position_ids
        if inputs.get("labels") is not None:
            rest["labels"] = out.labels
        state = DecodeState(out.orig_len, out.new_len, out.attention_mask, out.removed, self.config.positions)
        return rest, state

    def compiled(self, orig: Callable) -> Callable:
        """`torch.compile(orig)`, made once: the model's own forward when the user compiles the
        patched one (the pruning step stays outside the graph, see `make_forward`)."""
        if getattr(self, "_compiled", (None, None))[0] is not orig:
            self._compiled = (orig, torch.compile(orig))
        return self._compiled[1]

    def after_prefill(self, state: DecodeState) -> None:
        """Family bookkeeping after a pruned prefill (Qwen: the rope deltas of decode steps)."""

    def visual_input_names(self) -> tuple[str, ...]:
        return ("pixel_values", "image_sizes", "mm_encoder_outputs", "vision_feature_layer", "vision_feature_select_strategy")

    @property
    def last(self) -> list[list[torch.Tensor]] | None:
        """[row][image] kept indices of the latest prefill with images, on the host; copied from
        the device when first asked for, so that the prefill itself never waits for it. The
        vision stage's, or with decoder stages the tokens that survive all of them."""
        stages = self.selections()
        return None if stages is None else stages[-1]

    def selections(self) -> list[list[list[torch.Tensor]]] | None:
        """Per stage (vision stage first, then each decoder cut), [row][image] the tokens it keeps,
        in the original numbering of each image's visual tokens."""
        if isinstance(self._last, PendingSelection):
            self._last = self._last.resolve()
        if self._last is None:
            return None
        out = [self._last]
        for cut in self._cuts or []:
            chosen = cut.chosen.cpu()
            flat = [t for row in out[-1] for t in row]
            picked = [flat[i][chosen[i][: cut.kept[i]]] for i in range(len(flat))]
            it = iter(picked)
            out.append([[next(it) for _ in row] for row in out[-1]])
        return out

    def decode_inputs(self, state: DecodeState, inputs: dict[str, Any]) -> dict[str, Any]:
        """Map a decode step's unpruned-length mask and positions onto the pruned cache."""
        inputs = dict(inputs)
        cache = find_cache(inputs)
        past = cache.get_seq_length()
        ids = inputs.get("input_ids")
        q = (ids if ids is not None else inputs["inputs_embeds"]).shape[1]
        mask = inputs.get("attention_mask")
        if generated_4d(mask):
            # a static cache: generate()'s 4-D mask is made for the unpruned length at the pruned
            # cache's offset; the new tokens are attended, so the prefill's mask says it all
            mask = inputs["attention_mask"] = None
        if mask is not None or state.mask is not None:
            inputs["attention_mask"] = cache_mask(state, mask, past, q)
        pos = inputs.get("position_ids")
        if pos is not None and state.positions == "compact":
            inputs["position_ids"] = pos - state.removed.to(pos.device)[:, None]
        elif pos is None and state.positions == "original":
            start = past + state.orig_len - state.new_len
            device = state.removed.device
            inputs["position_ids"] = (torch.arange(q, device=device) + start)[None, :]
        return inputs


def cache_mask(state: DecodeState, mask: torch.Tensor | None, past: int, q: int) -> torch.Tensor | None:
    """A call's 2-D mask over the unpruned conversation (None: all attended) mapped onto the pruned
    cache of `past` tokens and the call's q new ones: [B, past + q] (None if all attended)."""
    if mask is None:
        if state.mask is None:
            return None
        return torch.cat([state.mask, state.mask.new_ones(state.mask.shape[0], past + q - state.new_len)], dim=1)
    expected = past + q + state.orig_len - state.new_len
    if mask.shape[1] != expected:
        raise ValueError(
            f"vlmprune: attention_mask has {mask.shape[1]} columns; after a pruned prefill of {state.orig_len} tokens "
            f"(kept {state.new_len}) it should have {expected}: the unpruned conversation's length (a later turn "
            f"passes only its new input_ids, with the whole conversation's mask)"
        )
    head = state.mask if state.mask is not None else mask.new_ones(mask.shape[0], state.new_len)
    return torch.cat([head.to(mask.dtype), mask[:, state.orig_len :]], dim=1)


def surviving(labels: torch.Tensor, cuts: list) -> torch.Tensor:
    """`labels` [B, L] of the decoder input, at the columns that go on through every decoder cut
    (-100 at the padding the cuts add)."""
    for cut in cuts:
        labels = labels.to(cut.cols.device).gather(1, cut.cols.clamp(min=0)).masked_fill(cut.cols < 0, -100)
    return labels


def generated_4d(mask: Any) -> bool:
    """Whether `mask` is a 4-D mask as generate() makes for compileable caches (boolean, or additive
    float; or a dict of them by layer type) rather than the 2-D padding mask."""
    if isinstance(mask, dict):
        return True
    return isinstance(mask, torch.Tensor) and mask.ndim == 4 and (mask.dtype == torch.bool or mask.is_floating_point())


def padding_mask(mask: torch.Tensor, length: int) -> torch.Tensor:
    """The 2-D padding mask [B, length] behind a 4-D causal mask [B, 1, Q, K] as generate() makes
    it for compileable caches (or a dict of them by layer type: its full-attention one): the last
    query row attends every valid key up to `length`."""
    if isinstance(mask, dict):
        mask = mask.get("full_attention", next(iter(mask.values())))
    row = mask[:, 0, -1, :length]
    return (row if row.dtype == torch.bool else row == 0).long()


def images_by_row(row_counts: list[int], per_image: list[int]) -> list[list[int]]:
    """The images of each batch row, in order, from the row's image-token count."""
    rows, i = [], 0
    for c in row_counts:
        row = []
        while c > 0:
            row.append(i)
            c -= per_image[i]
            i += 1
        rows.append(row)
    return rows


def check_kept(idx: torch.Tensor, kept: list[int], method: str) -> None:
    """The layout gave image i kept[i] places: its selection must fill them (ascending indices,
    -1 only after the first kept[i]). The width is checked on the host; on CUDA the entries with a
    device-side assert (no host wait; `PendingSelection.resolve` names the image when read)."""
    if idx.ndim != 2 or idx.shape[0] != len(kept) or idx.shape[1] < max(kept, default=0):
        raise RuntimeError(
            f"vlmprune: method {method!r} returned indices of shape {tuple(idx.shape)}; the plan needs "
            f"[{len(kept)}, >= {max(kept, default=0)}] (kept per image {kept})"
        )
    if idx.device.type == "cpu":
        return  # resolved at once by the caller
    if all(c == kept[0] for c in kept):
        last = idx[:, kept[0] - 1] if kept[0] else idx[:, :0]
    else:
        full = [i for i, c in enumerate(kept) if c]
        last = idx[to_device(full, idx.device), to_device([kept[i] - 1 for i in full], idx.device)]
    torch._assert_async((last >= 0).all())


def kept_rows(visual: torch.Tensor, kept: list[int]) -> torch.Tensor:
    """The first kept[i] rows of each image's [kmax, D] block, as one [sum(kept), D]."""
    kmax = visual.shape[1]
    flat = visual.reshape(-1, visual.shape[-1])
    if all(c == kmax for c in kept):
        return flat
    return flat[to_device([i * kmax + j for i, c in enumerate(kept) for j in range(c)], visual.device)]


def structure_merged(idx: torch.Tensor, visual: list[np.ndarray], lines: list[np.ndarray]) -> tuple[torch.Tensor, torch.Tensor]:
    """Items with structure tokens (`Encoded.structure`): per item, its kept tokens' places in its
    prompt run (`visual[i][idx[i]]`; idx [items, K] padded with -1) merged ascending with its
    structure tokens' (`lines[i]`, all kept): [items, K + E] places (padding -1, last) and each
    place's column in [idx | lines] (>= K: structure)."""
    big = max(len(v) + len(s) for v, s in zip(visual, lines)) + 1
    to_run = np.full((len(visual), max(len(v) for v in visual)), big, dtype=np.int64)  # index -> place
    table = np.full((len(visual), max(len(s) for s in lines)), big, dtype=np.int64)
    for i, (v, s) in enumerate(zip(visual, lines)):
        to_run[i, : len(v)], table[i, : len(s)] = v, s
    mapped = to_device(torch.from_numpy(to_run), idx.device).gather(1, idx.clamp(min=0)).masked_fill(idx < 0, big)
    places, order = torch.cat([mapped, to_device(torch.from_numpy(table), idx.device)], 1).sort(1)
    return places.masked_fill(places == big, -1), order


@dataclass
class PendingSelection:
    """A prefill's kept indices still on the device, with what the host planned: each image i
    keeps exactly kept[i] tokens. The assembly relied on it and checked each row's total on the
    device; each image's count is checked when the indices are read."""

    idx: torch.Tensor
    kept: list[int]
    rows: list[list[int]]
    method: str

    def resolve(self) -> list[list[torch.Tensor]]:
        idx = self.idx.cpu()
        chosen = []
        for i, c in enumerate(self.kept):
            sel = idx[i][idx[i] >= 0]
            if sel.numel() != c or not bool((idx[i][:c] >= 0).all()):
                raise RuntimeError(
                    f"vlmprune: method {self.method!r} kept {sel.numel()} tokens of image {i} (indices "
                    f"{idx[i].tolist()}); it must keep exactly {c}, the first {c} entries, -1 after"
                )
            chosen.append(sel)
        return [[chosen[i] for i in row] for row in self.rows]


_ADAPTERS: list[type[Adapter]] = []


def register_adapter(cls: type[Adapter]) -> type[Adapter]:
    _ADAPTERS.append(cls)
    return cls


def supported_models() -> list[str]:
    """HF model_type names with an adapter, sorted."""
    return sorted({t for a in _ADAPTERS for t in a.model_types})


def find_adapter(model: Any) -> type[Adapter]:
    """The adapter class for this model, or a ValueError listing the supported models."""
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    cls_name = type(model).__name__
    for a in _ADAPTERS:
        if model_type in a.model_types and cls_name in a.model_classes:
            return a
    for a in _ADAPTERS:
        if model_type in a.model_types:
            raise ValueError(
                f"vlmprune patches {list(a.model_classes)} for model_type {model_type!r}, got {cls_name}; "
                f"load the model with one of those classes"
            )
    raise ValueError(
        f"model {cls_name} (model_type={model_type!r}) is not supported; supported model types: {supported_models()}"
    )


def bind_inputs(forward: Callable, args: tuple, kwargs: dict[str, Any]) -> dict[str, Any]:
    """Positional + keyword call arguments as one keyword dict."""
    if not args:
        return dict(kwargs)
    sig = inspect.signature(forward)
    out = dict(sig.bind_partial(*args, **kwargs).arguments)
    for p in sig.parameters.values():
        if p.kind is p.VAR_KEYWORD:
            out.update(out.pop(p.name, {}))
    return out


def make_forward(model: nn.Module, orig: Callable) -> Callable:
    """The forward installed on a patched model: it reads the adapter at call time, so patching
    again only swaps the adapter."""

    @functools.wraps(orig)
    def forward(*args, **kwargs):
        adapter = model.__dict__.get("_vlmprune_adapter")
        if adapter is None:
            return orig(*args, **kwargs)
        if torch.compiler.is_compiling():  # the user compiled the patched forward: the pruning runs eagerly
            return _eager_forward(adapter, adapter.compiled(orig), args, kwargs)  # and the model compiled
        return _eager_forward(adapter, orig, args, kwargs)

    return forward


@torch.compiler.disable
def _eager_forward(adapter: Adapter, orig: Callable, args: tuple, kwargs: dict[str, Any]):
    """The pruning step (host planning, scorers, kernels) outside any compiled graph; `orig` is the
    model's forward, itself compiled when the user compiled the patched one."""
    with adapter.lock:  # threads sharing the model take turns (their results are the serial ones)
        return adapter.forward(orig, bind_inputs(orig, args, kwargs))
