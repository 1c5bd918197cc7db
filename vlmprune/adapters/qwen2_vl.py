"""Qwen-VL families (`qwen2_vl`, `qwen2_5_vl`, `qwen3_vl`): a ViT with 2-D rotary over dynamic
resolution -> a 2x2 patch merger (one LLM token per 28x28 px block) -> a Qwen decoder with M-RoPE.

One module for the three: they differ only in where their blocks attend (Qwen2.5-VL runs most
blocks on windows, in a window-permuted token order) and in Qwen3-VL's deepstack features (merged
encoder-layer features added to the visual tokens' hidden states in the first decoder layers).

- Visual items are images and videos, each with its own (t, h, w) grid; `keep` counts an item's
  LLM tokens (a video's over all its frames). Items are scored in the order the prompt holds them.
- Qwen3-VL videos: the processor writes each frame as `<s seconds>` text, vision start, its pads,
  vision end. The video's tokens from its first pad to its last are one run whose text is structure
  (`frame_runs`: kept, never scored), so each frame's run holds its own kept tokens (maybe none).
- Signals (no CLS token): `received_attn` of a block, the head- and query-mean softmax attention
  each patch receives, from that block's own q/k (taps on its fused `qkv` and on the rotary and
  sequence bounds the block is called with), over the sequences the block attends (an image, a
  video frame, or on Qwen2.5-VL's window blocks a window); `keys`, the block's k (before rotary,
  heads concatenated). Both are pooled over each 2x2 merge group (the mean of its 4 patches), in
  the merger's output order. `features` are the merger's outputs.
- Positions (`positions="original"`, the only mode): the 3-D M-RoPE ids of the unpruned prompt,
  gathered for the kept tokens; the model's `rope_deltas` are set so that decode steps continue at
  the ids the unpruned model would use (DESIGN §2).
- The pruned prefill hands HF's own forward the pruned `input_ids` (one placeholder per kept token)
  and the kept features as `mm_encoder_outputs` (deepstack features gathered with the same
  indices), so the decoder input is built by the model's own code."""

from __future__ import annotations

import contextlib
import copy
import functools
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np
import torch
from torch import nn

from vlmprune.adapters.base import (
    Adapter,
    DecodeState,
    Encoded,
    Prompt,
    find_cache,
    kept_rows,
    register_adapter,
    stack_padded,
    structure_merged,
)
from vlmprune.adapters.vit import Tap, Wrap, detached, pad_graphs
from vlmprune.kernels import gather_rows
from vlmprune.kernels.assemble import Layout, place_columns
from vlmprune.kernels.graph import attention_graph_ref
from vlmprune.kernels.received import received_attention
from vlmprune.scorers.base import EncoderInfo, Request

KINDS = ("image", "video")
PROVIDES = frozenset({"features", "text_embeds", "received_attn", "keys", "attn_graph"})


@register_adapter
class QwenVLAdapter(Adapter):
    """Vision-stage pruning for Qwen2-VL, Qwen2.5-VL and Qwen3-VL (images and videos)."""

    model_types = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl")
    model_classes = (
        "Qwen2VLForConditionalGeneration",
        "Qwen2_5_VLForConditionalGeneration",
        "Qwen3VLForConditionalGeneration",
    )
    default_positions = "original"
    position_modes = ("original",)
    encoder_methods = ("get_image_features", "get_video_features")
    reference: ClassVar[dict[str, tuple[EncoderInfo, frozenset[str]]]] = {
        "qwen2_vl": (
            EncoderInfo(num_layers=32, feature_layer=31, has_cls=False, grid=None),
            PROVIDES,
        ),
        "qwen2_5_vl": (
            EncoderInfo(num_layers=32, feature_layer=31, has_cls=False, grid=None),
            PROVIDES,
        ),
        "qwen3_vl": (
            EncoderInfo(num_layers=27, feature_layer=26, has_cls=False, grid=None),
            PROVIDES,
        ),
    }
    fallbacks: ClassVar[dict[str, str]] = {
        "received_attn": "received attention (no CLS)",
        "keys": "2x2-pooled keys",
        "attn_graph": "2x2-pooled attention graph",
    }

    @property
    def visual(self) -> nn.Module:
        return self.model.model.visual

    @property
    def merge(self) -> int:
        return int(self.visual.spatial_merge_size)

    def encoder_info(self) -> EncoderInfo:
        depth = len(self.visual.blocks)
        full = getattr(
            self.visual, "fullatt_block_indexes", None
        )  # Qwen2.5-VL: the others attend windows
        feature = full[-1] if full else depth - 1
        return EncoderInfo(
            num_layers=depth, feature_layer=feature, has_cls=False, grid=None
        )

    def provides(self) -> set[str]:
        return set(PROVIDES)

    def visual_token_id(self) -> int:
        return self.model.config.image_token_id

    def visual_token_ids(self) -> tuple[int, ...]:
        return (self.model.config.image_token_id, self.model.config.video_token_id)

    def encoder_owner(self) -> nn.Module:
        return self.model.model

    def has_visual_input(self, inputs: dict[str, Any]) -> bool:
        mm = inputs.get("mm_encoder_outputs") or {}
        return any(
            inputs.get(n) is not None for n in ("pixel_values", "pixel_values_videos")
        ) or any(mm.get(kind) is not None for kind in KINDS)

    def visual_input_names(self) -> tuple[str, ...]:
        return ("pixel_values", "pixel_values_videos", "mm_encoder_outputs")

    # --- signals ------------------------------------------------------------------------------
    _taps: QwenTaps | None = None
    _lines: np.ndarray | None = (
        None  # per place of the items' runs (prompt order): structure (see `frame_runs`)
    )

    @contextlib.contextmanager
    def collecting(self, inputs: dict[str, Any]):
        grid_thw = inputs.get("image_grid_thw", inputs.get("video_grid_thw"))
        if self._taps is None:
            self._taps = QwenTaps(self.visual, self.request)
        with self._taps.capture() as seen:
            yield lambda out: self._taps.tables(seen, grid_thw)

    def uninstall(self) -> None:
        super().uninstall()
        self._taps = None

    def token_grids(self, thw: torch.Tensor) -> list[tuple[int, int, int]]:
        """Each item's LLM-token grid (rows, columns, frames) from its (t, h, w) patch grid, frames stacked."""
        m = self.merge
        return [(t * h // m, w // m, t) for t, h, w in thw.tolist()]

    def encoder_grids(self, inputs: dict[str, Any]) -> list[tuple[int, int]] | None:
        thw = inputs.get("image_grid_thw", inputs.get("video_grid_thw"))
        return None if thw is None else self.token_grids(thw)

    # --- prefill ------------------------------------------------------------------------------
    def encode(self, inputs: dict[str, Any], prompt: Prompt) -> Encoded:
        """Images and videos encoded (or taken from `mm_encoder_outputs`), then put in prompt order."""
        owner, mm = self.encoder_owner(), dict(inputs.get("mm_encoder_outputs") or {})
        outputs, feats, grids = {}, {}, {}
        for kind in KINDS:
            pixels = inputs.get(
                "pixel_values" if kind == "image" else "pixel_values_videos"
            )
            thw = inputs.get(f"{kind}_grid_thw")
            if pixels is not None:
                method = (
                    owner.get_image_features
                    if kind == "image"
                    else owner.get_video_features
                )
                outputs[kind] = method(pixels, thw, return_dict=True)
            elif mm.get(kind) is not None:
                outputs[kind] = mm[kind]
            else:
                continue
            feats[kind] = list(outputs[kind].pooler_output)
            if thw is not None:
                grids[kind] = self.token_grids(thw)
            else:  # generate() encodes before the prefill and drops the grids: the encoder call recorded them
                grids[kind] = [self.recorded_grid(f) for f in feats[kind]]
                if None in grids[kind]:
                    raise ValueError(
                        f"vlmprune: {kind} features given without {kind}_grid_thw (one (t, h, w) row "
                        f"per {kind}); pass it, or pass the pixels"
                    )
        order = prompt_order(
            prompt,
            self.visual_token_ids(),
            {k: [int(f.shape[0]) for f in v] for k, v in feats.items()},
        )
        enc = QwenEncoded(
            feats=[feats[kind][j] for kind, j in order],
            grids=[grids[kind][j] for kind, j in order],
            outputs=outputs,
            kinds=[kind for kind, _ in order],
            index=[j for _, j in order],
        )
        self._lines = None
        if "video" in feats and self.model.config.model_type == "qwen3_vl":
            self._lines = frame_runs(prompt, enc)
        return enc

    def full_positions(self, inputs: dict[str, Any]) -> torch.Tensor:
        """[3, B, L] M-RoPE ids of the unpruned prompt: the caller's (generate passes [4, B, L], text
        ids first) or the model's `get_rope_index`."""
        pos = inputs.get("position_ids")
        if pos is not None:
            return pos[-3:] if pos.ndim == 3 else pos[None].expand(3, -1, -1)
        ids = inputs["input_ids"]
        types = inputs.get("mm_token_type_ids")
        if types is None:  # the processor gives it; the token ids say the same
            image, video = self.visual_token_ids()
            types = (ids == image).int() + 2 * (ids == video).int()
        extra = {
            k: inputs[k] for k in ("second_per_grid_ts",) if inputs.get(k) is not None
        }
        pos, _ = self.model.model.get_rope_index(
            ids,
            mm_token_type_ids=types,
            image_grid_thw=inputs.get("image_grid_thw"),
            video_grid_thw=inputs.get("video_grid_thw"),
            attention_mask=inputs.get("attention_mask"),
            **extra,
        )
        return pos

    def pruned_inputs(
        self,
        inputs: dict[str, Any],
        layout: Layout,
        idx: torch.Tensor,
        visual: torch.Tensor,
        kept: list[int],
        enc: Encoded,
    ) -> tuple[dict[str, Any], DecodeState]:
        ids_in = inputs["input_ids"]
        device = ids_in.device
        if enc.structure and any(
            enc.structure
        ):  # Qwen3-VL videos: kept frame tokens and every timestamp
            index = self.run_index(enc, idx, kept)
        else:
            index = kept_rows(idx.unsqueeze(-1), kept).squeeze(-1)
        columns = place_columns(
            layout, index, device
        )  # index: each kept token's place in its item's run
        ids = torch.from_numpy(layout.ids).to(device)
        if (
            layout.visual.size
        ):  # a run's kept places hold the prompt's ids at their columns
            at = torch.from_numpy(layout.visual).to(device)
            ids.view(-1)[at] = ids_in.gather(1, columns).view(-1)[at]
        pos = self.full_positions(inputs).to(device)
        pos = pos.gather(2, columns[None].expand(pos.shape[0], -1, -1))
        mask = inputs.get("attention_mask")
        if layout.mask is not None:
            mask = torch.from_numpy(layout.mask).to(
                device, mask.dtype if mask is not None else torch.long
            )
        call = {
            k: v
            for k, v in inputs.items()
            if k
            not in (
                *self.visual_input_names(),
                "image_grid_thw",
                "video_grid_thw",
                "mm_token_type_ids",
                "second_per_grid_ts",
            )
        }
        call.update(
            input_ids=ids,
            attention_mask=mask,
            position_ids=pos,
            mm_encoder_outputs=self.kept_outputs(
                enc, idx, kept_rows(visual, kept), kept
            ),
        )
        labels = inputs.get("labels")
        if labels is not None:
            labels = labels.to(device).gather(1, columns)
            if layout.pads.size:
                labels.view(-1)[torch.from_numpy(layout.pads).to(device)] = -100
            call["labels"] = labels
        removed = layout.orig_len - np.asarray(layout.lens, dtype=np.int64)
        state = DecodeState(
            layout.orig_len,
            layout.new_len,
            mask,
            torch.from_numpy(removed).to(device),
            "mrope",
            rope_deltas=self.chunk_deltas(pos, mask),
        )
        return call, state

    def run_index(
        self, enc: QwenEncoded, idx: torch.Tensor, kept: list[int]
    ) -> torch.Tensor:
        """Each kept place's offset in its item's prompt run, flat, item by item, ascending: the kept
        visual tokens' offsets merged with every structure token's. With decoder stages, remembers
        which kept places are structure (one host read)."""
        places, order = structure_merged(idx, enc.offsets, enc.lines)
        run_kept = [k + e for k, e in zip(kept, enc.structure)]
        if (
            self.decoder is not None
        ):  # the decoder stages' places skip the structure: which ranks it holds
            is_line = (order >= idx.shape[1]).cpu().numpy()
            self._lines = np.concatenate(
                [is_line[i, :c] for i, c in enumerate(run_kept)]
            )
        return kept_rows(places.unsqueeze(-1), run_kept).squeeze(-1)

    def decoder_run(self, places, per_image, rows, mask, valid):
        """As the base, over the visual tokens' places only, the structure's (Qwen3-VL's timestamps
        between a video's frames) marked as such (never instruction text for `query="text"`)."""
        lines = None
        if self.decoder is not None and self._lines is not None:
            places, lines = places[~self._lines], places[self._lines]
        run = super().decoder_run(places, per_image, rows, mask, valid)
        if run is not None:
            run.structure = lines
        return run

    def chunk_deltas(
        self, position_ids: torch.Tensor | None, mask: torch.Tensor | None
    ) -> torch.Tensor | None:
        """Decode steps continue at the unpruned ids: [B, 1] the largest attended id + 1 - the attended
        tokens (a row with none attended: -1 - 0, as if its ids started at 0)."""
        pos = position_ids if position_ids.ndim == 3 else position_ids[None]
        pos = pos[-3:]
        valid = (
            mask.bool()
            if mask is not None
            else torch.ones(pos.shape[1:], dtype=torch.bool, device=pos.device)
        )
        top = pos.masked_fill(~valid[None].to(pos.device), -1).amax(dim=(0, 2))
        return (top + 1 - valid.sum(1).to(top.device))[:, None]

    def turn_positions(
        self,
        inputs: dict[str, Any],
        state: DecodeState | None,
        past: int,
        mask: torch.Tensor | None,
    ) -> torch.Tensor:
        """A later turn's M-RoPE ids [3, B, q]: the caller's 3-D ids, else those `get_rope_index` gives
        these tokens in the whole unpruned conversation: the turn's own ids from 0, shifted to each
        row's next id (its attended cached tokens + the cache's rope delta). generate() passes 4-D ids
        made by HF's text rule (rope deltas added to 1-D ids, also for a new image): not these."""
        pos = inputs.get("position_ids")
        if pos is not None and pos.ndim == 3 and pos.shape[0] == 3:
            return pos
        grids = {f"{kind}_grid_thw": self.patch_grids(inputs, kind) for kind in KINDS}
        own = self.full_positions(
            dict(
                inputs,
                position_ids=None,
                attention_mask=None if mask is None else mask[:, past:],
                **grids,
            )
        )
        deltas = (
            state.rope_deltas if state is not None else self.model.model.rope_deltas
        )
        seen = (
            mask[:, :past].sum(1)
            if mask is not None
            else torch.full((own.shape[1],), past)
        )
        start = seen.to(own.device) + (
            0 if deltas is None else deltas[:, 0].to(own.device)
        )
        return own + start[None, :, None]

    def kept_outputs(
        self, enc: Encoded, idx: torch.Tensor, rows: torch.Tensor, kept: list[int]
    ) -> dict[str, Any]:
        """The encoder outputs of the kept tokens by kind, as HF's forward reads them: the kept (or
        merged) features per item, and Qwen3-VL's deepstack features gathered at the same indices."""
        per_item = rows.split(kept)
        deep = None
        if any(
            getattr(out, "deepstack_features", None) for out in enc.outputs.values()
        ):
            deep = [
                kept_rows(
                    gather_rows(
                        stack_padded(
                            [
                                enc.outputs[kind].deepstack_features[layer][j]
                                for kind, j in zip(enc.kinds, enc.index)
                            ]
                        ),
                        idx,
                    ),
                    kept,
                ).split(kept)
                for layer in range(
                    len(next(iter(enc.outputs.values())).deepstack_features)
                )
            ]
        out = {}
        for kind in KINDS:
            items = [i for i, k in enumerate(enc.kinds) if k == kind]
            if not items or sum(kept[i] for i in items) == 0:
                continue  # nothing of this kind reaches the decoder
            items.sort(key=lambda i: enc.index[i])
            result = copy.copy(enc.outputs[kind])
            result.pooler_output = tuple(per_item[i] for i in items)
            if deep is not None:
                result.deepstack_features = [
                    tuple(layer[i] for i in items) for layer in deep
                ]
            out[kind] = result
        return out

    def patch_grids(self, inputs: dict[str, Any], kind: str) -> torch.Tensor | None:
        """[items, 3] (t, h, w) patch grids of a call's items of `kind`: given, or (generate() encodes
        before the prefill and drops them) from the token grids recorded when they were encoded."""
        given, out = (
            inputs.get(f"{kind}_grid_thw"),
            (inputs.get("mm_encoder_outputs") or {}).get(kind),
        )
        if given is not None or out is None:
            return given
        m, thw = self.merge, []
        for f in out.pooler_output:
            g = self.recorded_grid(f)
            if g is None:
                raise ValueError(
                    f"vlmprune: {kind} features given without {kind}_grid_thw (one (t, h, w) row per "
                    f"{kind}); pass it, or pass the pixels"
                )
            t = g[2] if len(g) > 2 else 1
            thw.append([t, g[0] * m // t, g[1] * m])
        return torch.tensor(thw)

    def after_prefill(self, state: DecodeState) -> None:
        self.model.model.rope_deltas = (
            state.rope_deltas
        )  # what HF's own decode steps read

    def decode_inputs(
        self, state: DecodeState, inputs: dict[str, Any]
    ) -> dict[str, Any]:
        """generate() passes the unpruned ids (they stay right); without ids, each new token's id is
        its row's attended count so far (pruned cache) - 1 + the row's pruned rope delta."""
        pos = inputs.get("position_ids")
        if (
            state.turns and pos is not None and pos.shape[0] != 3
        ):  # generate()'s, by HF's text rule: see turn_positions
            inputs = dict(inputs, position_ids=None)
        out = super().decode_inputs(state, inputs)
        if out.get("position_ids") is None and state.rope_deltas is not None:
            ids = out.get("input_ids")
            q = (ids if ids is not None else out["inputs_embeds"]).shape[1]
            mask = out.get("attention_mask")
            if mask is not None:
                base = (mask.long().cumsum(-1) - 1)[:, -q:]
            else:
                past = find_cache(out).get_seq_length()
                base = (torch.arange(q, device=state.rope_deltas.device) + past)[None]
            out["position_ids"] = (
                (base.to(state.rope_deltas.device) + state.rope_deltas)
                .unsqueeze(0)
                .expand(3, -1, -1)
            )
        return out


@dataclass
class QwenEncoded(Encoded):
    """`Encoded` with, per item, where its visual tokens lie in its prompt run (`offsets`) and where
    its structure tokens do (`lines`): a Qwen3-VL video's run spans its frames and the text between."""

    offsets: list[np.ndarray] = field(default_factory=list)
    lines: list[np.ndarray] = field(default_factory=list)


def frame_runs(prompt: Prompt, enc: QwenEncoded) -> np.ndarray:
    """Qwen3-VL: a video is one placeholder run per frame, a timestamp's text between (and vision
    start / end tokens). Each video's tokens from its first placeholder to its last become one run,
    the text in it structure (never scored or counted, always kept), marked visual in `prompt`.
    Returns, for every place of every item's run in prompt order, whether it is structure."""
    flat, length = prompt.is_visual.numpy().reshape(-1), prompt.ids.shape[1]
    places, at, marks = np.flatnonzero(flat), 0, []
    enc.structure, enc.offsets, enc.lines = [], [], []
    for f, kind in zip(enc.feats, enc.kinds):
        mine = places[at : at + int(f.shape[0])]
        at += mine.size
        first, last = int(mine[0]), int(mine[-1])
        line = np.zeros(
            mine.size, dtype=bool
        )  # an image, or a video over rows: as it is (plan_layout checks)
        if kind == "video" and first // length == last // length:
            line = np.ones(last - first + 1, dtype=bool)
            line[mine - first] = False
            flat[first : last + 1] = True
        enc.offsets.append(np.flatnonzero(~line))
        enc.lines.append(np.flatnonzero(line))
        enc.structure.append(int(line.sum()))
        marks.append(line)
    prompt.row_counts = prompt.is_visual.sum(1).tolist()
    return np.concatenate(marks)


def prompt_order(
    prompt: Prompt, token_ids: tuple[int, ...], sizes: dict[str, list[int]]
) -> list[tuple[str, int]]:
    """(kind, index within its kind) of every visual item in the order the prompt holds their
    tokens, from the token id at each item's first place and the items' token counts."""
    places = np.flatnonzero(prompt.is_visual.numpy())
    ids = prompt.ids.numpy().reshape(-1)
    kind_of = dict(zip(token_ids, KINDS))
    taken = {kind: 0 for kind in sizes}
    order, at = [], 0
    while at < places.size:
        kind = kind_of[int(ids[places[at]])]
        j = taken.get(kind, 0)
        if kind not in sizes or j >= len(sizes[kind]):
            raise ValueError(
                f"vlmprune: the prompt holds more {kind} placeholder tokens than the {kind}s given "
                f"({len(sizes.get(kind, []))} {kind}s of {sizes.get(kind, [])} tokens); check the processor output"
            )
        order.append((kind, j))
        taken[kind] = j + 1
        at += sizes[kind][j]
    left = {
        kind: len(v) - taken.get(kind, 0)
        for kind, v in sizes.items()
        if len(v) > taken.get(kind, 0)
    }
    if left:
        raise ValueError(
            f"vlmprune: {left} image/video inputs have no placeholder tokens in the prompt"
        )
    return order


def _record_args(
    seen: dict[str, Any], forward: Callable, hidden_states, *args, **kwargs
):
    """An attention block's forward (see `Wrap`) that records the sequence bounds and rotary
    embeddings it is called with, then runs unchanged."""
    seen["cu_seqlens"] = kwargs.get("cu_seqlens", args[0] if args else None)
    seen["rotary"] = kwargs.get("position_embeddings")
    return forward(hidden_states, *args, **kwargs)


class QwenTaps:
    """Taps on the requested vision blocks' attention (its fused `qkv` output and the arguments it
    is called with), put on only while `capture()` runs, and the signal tables made from them."""

    def __init__(self, visual: nn.Module, request: Request):
        self.visual, self.request = visual, request
        self.layers = tuple(
            sorted(
                set(request.received_attn) | set(request.keys) | set(request.attn_graph)
            )
        )
        self.unit = int(visual.spatial_merge_size) ** 2
        for layer in self.layers:
            if not isinstance(
                getattr(visual.blocks[layer].attn, "qkv", None), nn.Linear
            ):
                raise ValueError(  # noqa: TRY004 (bad input is a ValueError: DESIGN §1)
                    f"vlmprune: vision block {layer} has no fused qkv projection; this encoder needs its own adapter"
                )

    @contextlib.contextmanager
    def capture(self):
        seen: dict[int, dict[str, Any]] = {layer: {} for layer in self.layers}
        taps: list[Any] = []
        try:
            for layer in self.layers:
                attn = self.visual.blocks[layer].attn
                taps.append(Wrap(attn, functools.partial(_record_args, seen[layer])))
                qkv = Tap(attn.qkv, functools.partial(seen[layer].__setitem__, "qkv"))
                qkv.put()
                taps.append(qkv)
            yield seen
        finally:
            while taps:
                taps.pop().remove()

    @torch.no_grad()
    def tables(
        self, seen: dict[int, dict[str, Any]], grid_thw: torch.Tensor
    ) -> dict[str, dict[int, torch.Tensor]]:
        """name -> layer -> [items, N, ...] signals at the LLM-token level (merge groups pooled, in
        the merger's output order), zero-padded to the longest item."""
        out: dict[str, dict[int, torch.Tensor]] = {
            "received_attn": {},
            "keys": {},
            "attn_graph": {},
        }
        if not self.layers:
            return out
        thw = grid_thw.tolist()
        sizes = [t * h * w // self.unit for t, h, w in thw]
        order = self.merger_order(grid_thw)
        for layer in self.layers:
            got = seen[layer]
            if "qkv" not in got or got.get("rotary") is None:
                raise ValueError(
                    f"vlmprune: vision block {layer} ran without its qkv projection or rotary embeddings; "
                    f"this encoder needs its own adapter"
                )
            attn = self.visual.blocks[layer].attn
            qkv = detached(got["qkv"])
            s = qkv.shape[0]
            q, k, _ = qkv.view(s, 3, attn.num_heads, -1).unbind(1)  # [S, H, d] each
            if layer in self.request.keys:
                out["keys"][layer] = self.per_item(k.reshape(s, -1), order, sizes)
            if layer in self.request.received_attn or layer in self.request.attn_graph:
                rotary = sys.modules[
                    type(attn).__module__
                ].apply_rotary_pos_emb_vision  # as the block applies it
                cos, sin = got["rotary"]
                qr, kr = rotary(q, k, cos, sin)
                qr, kr = qr.reshape(s, -1), kr.reshape(s, -1)
                bounds = got["cu_seqlens"].tolist()
            if layer in self.request.received_attn:
                r = segment_received(qr, kr, bounds, attn.num_heads, attn.scaling)
                out["received_attn"][layer] = self.per_item(r[:, None], order, sizes)[
                    ..., 0
                ]
            if layer in self.request.attn_graph:
                graphs = segment_graph(
                    qr,
                    kr,
                    bounds,
                    attn.num_heads,
                    attn.scaling,
                    self.unit,
                    sizes,
                    mean_heads=self.request.attn_graph_heads == "mean",
                )
                out["attn_graph"][layer] = pad_graphs(
                    self.graph_order(graphs, order, sizes)
                )
        return out

    def merger_order(self, grid_thw: torch.Tensor) -> torch.Tensor | None:
        """For each merged token in the merger's output order, its group's place in the blocks'
        token order (Qwen2.5-VL runs its blocks window-permuted); None when the orders agree."""
        v = self.visual
        if not hasattr(v, "fullatt_block_indexes"):
            return None
        if hasattr(v, "get_window_index"):  # transformers < 5.20
            window_index, _ = v.get_window_index(grid_thw)
        else:
            from transformers.vision_utils import get_vision_window_index

            window_index, _ = get_vision_window_index(
                grid_thw,
                spatial_merge_size=v.spatial_merge_size,
                window_size=v.window_size,
                patch_size=v.patch_size,
            )
        return torch.argsort(window_index.to(grid_thw.device))

    @staticmethod
    def graph_order(
        graphs: list[torch.Tensor], order: torch.Tensor | None, sizes: list[int]
    ) -> list[torch.Tensor]:
        """Each item's [H, N, N] group graph (blocks' order) in the merger's output order (rows and
        columns); Qwen2.5-VL's window permutation keeps every item's groups among its own."""
        if order is None:
            return graphs
        out, start = [], 0
        for g, n in zip(graphs, sizes):
            local = (order[start : start + n] - start).to(g.device)
            out.append(g[:, local][:, :, local])
            start += n
        return out

    def per_item(
        self, x: torch.Tensor, order: torch.Tensor | None, sizes: list[int]
    ) -> torch.Tensor:
        """[S, C] per-patch values (blocks' order) -> [items, N, C] float32: the mean of each merge
        group's patches, in the merger's output order, split by item and zero-padded."""
        groups = x.float().view(-1, self.unit, x.shape[-1]).mean(1)
        if order is not None:
            groups = groups[order.to(groups.device)]
        return stack_padded(list(groups.split(sizes)))


def segment_received(
    q: torch.Tensor, k: torch.Tensor, bounds: list[int], heads: int, scale: float
) -> torch.Tensor:
    """[S] float32: for every token, the head- and query-mean softmax attention it receives within
    its attention sequence ([bounds[i], bounds[i+1]) as the block's cu_seqlens say). Sequences of
    one length go together (one image's frames, same-size images), each computed in query chunks."""
    out = torch.zeros(q.shape[0], dtype=torch.float32, device=q.device)
    for _, rows in same_length_sequences(bounds, q.device):
        out[rows.reshape(-1)] = received_attention(
            q[rows], k[rows], heads, scale
        ).reshape(-1)
    return out


def same_length_sequences(
    bounds: list[int], device
) -> list[tuple[np.ndarray, torch.Tensor]]:
    """The attention sequences ([bounds[i], bounds[i+1]) as a block's cu_seqlens say) grouped by
    length: per length n, the sequences' first tokens (host) and their token rows [G, n] on `device`."""
    lengths, starts = np.diff(np.asarray(bounds)), np.asarray(bounds[:-1])
    groups = []
    for n in np.unique(lengths):
        if n > 0:
            first = starts[lengths == n]
            groups.append(
                (
                    first,
                    torch.from_numpy(first[:, None] + np.arange(n)[None, :]).to(device),
                )
            )
    return groups


def segment_graph(
    q: torch.Tensor,
    k: torch.Tensor,
    bounds: list[int],
    heads: int,
    scale: float,
    unit: int,
    sizes: list[int],
    mean_heads: bool = False,
) -> list[torch.Tensor]:
    """Per item, its [H (1 for the head mean), N_i, N_i] float32 attention graph over its merge groups
    (N_i = sizes[i] groups of `unit` consecutive patches, in the blocks' order): within each attention
    sequence ([bounds[j], bounds[j+1]) as the block's cu_seqlens say), the softmax attention of its
    patches, summed over each key group and averaged over each query group
    (`attention_graph_ref`); zero between sequences (a video's frames, Qwen2.5-VL's windows).
    Sequences of one length go together, each in query chunks."""
    h = 1 if mean_heads else heads
    graphs = [torch.zeros(h, n, n, dtype=torch.float32, device=q.device) for n in sizes]
    item_start = (
        np.concatenate([[0], np.cumsum(sizes)[:-1]]) * unit
    )  # first patch of each item
    for first, rows in same_length_sequences(bounds, q.device):
        n = rows.shape[1]
        g = attention_graph_ref(
            q[rows], k[rows], heads, scale, group=unit, mean_heads=mean_heads
        )
        for j, b0 in enumerate(first.tolist()):
            item = int(np.searchsorted(item_start, b0, side="right")) - 1
            at = (b0 - int(item_start[item])) // unit
            graphs[item][:, at : at + n // unit, at : at + n // unit] = g[j]
    return graphs
