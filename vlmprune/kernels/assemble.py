"""Assemble the pruned decoder input (DESIGN §4.2): text rows and kept visual rows written straight
into the pruned `inputs_embeds`, attention mask, position ids and labels.

The layout is planned on the host. The host has the prompt (its ids and mask, read once before the
encoder runs) and knows how many tokens each image keeps, so it knows where every token lands:
an image's kept tokens fill the first kept[i] places of its run, in ascending index order, whichever
tokens the scorer picks. Only which token fills a visual place is device data. `plan_layout` works
the layout out in numpy (a batch of 8 LLaVA prompts: ~0.07 ms in a loop, ~0.3 ms inside a prefill,
where the code runs cold, see `scripts/bench_host.py`); `assemble` then makes the pruned batch
with one host-to-device copy, one embedding lookup and one indexed copy of the kept visual rows
(a few more ops for padding, given position ids or labels). On the host-bound prefill of a 7B VLM,
where every launch costs host time, this replaced about 35 launches of an on-device assembly
(ranks, cumsums, scatters)."""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from vlmprune.kernels.select_ref import to_device


@dataclass
class Layout:
    """Where every token of a pruned prefill goes, as numpy arrays on the host ("place" = flat
    index into the [B, new_len] output). Visual places are listed image by image, rank by rank."""

    orig_len: int
    new_len: int
    lens: list[int]  # tokens each row keeps
    ids: (
        np.ndarray
    )  # [B, new_len] the token id of each place (0 at visual places and padding)
    mask: np.ndarray | None  # [B, new_len] the attention mask, None when none is needed
    visual: np.ndarray  # [sum(kept)] the places of the kept visual tokens
    pads: (
        np.ndarray
    )  # places that are padding (none when every row keeps new_len tokens)
    source: np.ndarray | None = (
        None  # [B, new_len] each place's prompt column (visual: image start + rank)
    )
    image_start: np.ndarray | None = (
        None  # [sum(kept)] the prompt column of each kept token's image's first
    )
    rank: np.ndarray | None = (
        None  # [B, new_len] each place's rank among its row's kept tokens
    )


def plan_layout(
    input_ids: torch.Tensor,
    is_visual: torch.Tensor,
    per_image: list[int],
    kept: list[int],
    right_padded: bool = False,
    attention_mask: torch.Tensor | None = None,
    columns: bool = True,
) -> Layout:
    """The pruned layout from the prompt on the host: input_ids, is_visual and attention_mask are
    [B, L] CPU tensors; image i has per_image[i] visual tokens (in row-major order of the visual
    places) and keeps kept[i]. Each image's tokens must be one run within a row, attended to (mask
    1). Rows shorter than the longest are padded on the batch's padding side (`right_padded`).
    `columns=False` skips what only position ids and labels need (`source`, `image_start`, `rank`)."""
    ids, visual, (b, length) = input_ids.numpy(), is_visual.numpy(), input_ids.shape
    # numpy costs ~1 us a call and Python ~0.1 us a step: the work goes image by image where it can
    places = np.flatnonzero(
        visual
    )  # every visual token's flat prompt index, image by image
    if places.size != sum(per_image):
        raise ValueError(
            f"vlmprune: the prompt holds {places.size} image tokens, the images {sum(per_image)}"
        )
    ends = list(itertools.accumulate(per_image))
    firsts = [e - n for e, n in zip(ends, per_image)]
    starts = (
        places[[min(f, places.size - 1) for f in firsts]].tolist()
        if places.size
        else [0] * len(per_image)
    )
    lasts = (
        places[[max(e - 1, 0) for e in ends]].tolist()
        if places.size
        else [0] * len(per_image)
    )
    if attention_mask is not None:
        attended = attention_mask.numpy().reshape(-1)[places] != 0
        if not attended.all():
            r, c = divmod(int(places[np.argmin(attended)]), length)
            raise ValueError(
                f"vlmprune: the attention_mask is 0 at an image token (row {r}, column {c}); image "
                f"tokens must be attended to"
            )
    # for the layout, image i keeps its first kept[i] tokens: the places are the same for any choice
    keep = np.ones(b * length, dtype=bool)
    dropped = [0] * b  # per row, so far
    before = []  # per image: (row, dropped in its row before it)
    for i, (n, k, s, e) in enumerate(zip(per_image, kept, starts, lasts)):
        if n and (
            e - s != n - 1 or s // length != e // length
        ):  # places ascend: one run iff e - s = n - 1
            raise ValueError(
                f"vlmprune: the {n} tokens of image {i} are not one run within a row of the prompt (image token "
                f"counts {per_image}, rows of {length}); pruning needs each image's placeholder tokens consecutive"
            )
        r = s // length
        before.append((r, dropped[r]))
        keep[s + k : s + n] = False
        dropped[r] += n - k
    lens = [length - d for d in dropped]
    new_len = max(lens, default=0)
    ragged = any(n != new_len for n in lens)
    offset = [
        0 if right_padded else new_len - n for n in lens
    ]  # padding before each row
    kept_places = np.flatnonzero(keep)  # row-major: the output's order
    src = kept_places  # the prompt place of each output place (b * length at padding)
    count = None
    if ragged or columns:
        count = np.cumsum(keep.reshape(b, length), axis=1)
    if ragged:
        row = kept_places // length
        src = np.full(b * new_len, b * length, dtype=np.int64)
        src[
            row * new_len + np.asarray(offset)[row] + count.reshape(-1)[kept_places] - 1
        ] = kept_places
    pads = np.flatnonzero(src == b * length) if ragged else np.zeros(0, np.int64)

    def place(values: np.ndarray, fill: int) -> np.ndarray:
        flat = (
            np.append(values.reshape(-1), np.asarray(fill, values.dtype))
            if ragged
            else values.reshape(-1)
        )
        return flat[src].reshape(b, new_len)

    mask = None
    if attention_mask is not None or ragged:
        mask = place(
            attention_mask.numpy()
            if attention_mask is not None
            else np.ones((b, length), np.int64),
            0,
        )
    # image i's kept tokens fill new_len * row + offset + (its column - tokens dropped before it) + rank
    base = [
        r * new_len + offset[r] + s - r * length - d
        for (r, d), s in zip(before, starts)
    ]
    total = sum(kept)
    ranks = np.arange(total) - np.repeat(
        [e - k for e, k in zip(itertools.accumulate(kept), kept)], kept
    )
    visual_places = np.repeat(base, kept) + ranks if total else np.zeros(0, np.int64)
    out_ids = place(ids, 0)
    out_ids.reshape(-1)[visual_places] = (
        0  # the image token may lie outside the table: its rows come later
    )
    layout = Layout(length, new_len, lens, out_ids, mask, visual_places, pads)
    if columns:
        layout.source = (src % length).reshape(b, new_len)
        layout.source.reshape(-1)[pads] = 0
        layout.image_start = np.repeat([s % length for s in starts], kept).astype(
            np.int64
        )
        layout.rank = place(count, 1) - 1
    return layout


@dataclass
class Assembled:
    """The pruned batch and the map needed to keep decode steps consistent with it."""

    inputs_embeds: torch.Tensor
    attention_mask: torch.Tensor | None
    position_ids: torch.Tensor | None
    labels: torch.Tensor | None
    removed: torch.Tensor  # [B] tokens dropped from each row
    orig_len: int
    new_len: int


def assemble(
    embed: nn.Module,
    layout: Layout,
    visual_rows: torch.Tensor,
    visual_index: torch.Tensor | None = None,
    attention_mask: torch.Tensor | None = None,
    position_ids: torch.Tensor | None = None,
    labels: torch.Tensor | None = None,
    positions: str = "compact",
) -> Assembled:
    """The pruned decoder input on the embedding's device, from a host `layout`.

    visual_rows [sum(kept), D]: the kept visual tokens' features, image by image in ascending index
    order (the order of `layout.visual`); visual_index [sum(kept)]: their indices within their
    image (needed only for position ids or labels). attention_mask, position_ids, labels: the
    prompt's own ([B, L]; position ids may be [1, L]); the mask only gives its dtype (its values are
    in the layout).

    positions: "compact" renumbers as if only the kept tokens had been given (given position ids
    shift down by the number of tokens removed before each token; with none given the decoder's
    own arange over the pruned sequence applies, so None is returned); "original" keeps each
    token's position id (arange over the unpruned sequence when none were given). Padding places
    get zeros (mask, embeddings, positions) and -100 (labels)."""
    b, new_len = layout.ids.shape
    device = embed.weight.device
    needs_source = (
        labels is not None or position_ids is not None or positions == "original"
    )
    if needs_source and layout.visual.size and visual_index is None:
        raise ValueError(
            "assemble: position ids and labels need visual_index (the kept tokens' indices in their "
            "images)"
        )
    removed = layout.orig_len - np.asarray(layout.lens, dtype=np.int64)
    parts = [layout.ids, layout.visual, layout.pads, removed]
    if layout.mask is not None:
        parts.append(layout.mask)
    if needs_source:
        if layout.source is None:
            raise ValueError(
                "assemble: position ids and labels need a layout planned with columns=True"
            )
        parts += [layout.source, layout.image_start, layout.rank]
    host = torch.from_numpy(
        np.concatenate([p.reshape(-1) for p in parts]).astype(np.int64, copy=False)
    )
    buf = to_device(host, device).split(
        [p.size for p in parts]
    )  # one copy for all of it
    ids, visual, pads, removed = buf[:4]
    embeds = embed(ids.view(b, new_len))
    flat = embeds.view(b * new_len, -1)
    if visual.numel():
        flat.index_copy_(0, visual, visual_rows.to(device, flat.dtype))
    if pads.numel():
        flat.index_fill_(0, pads, 0)
    mask = None
    if layout.mask is not None:
        dtype = attention_mask.dtype if attention_mask is not None else torch.long
        mask = buf[4].view(b, new_len).to(dtype)
    pos = new_labels = None
    if needs_source:
        source, image_start, rank = buf[-3:]
        if (
            visual.numel()
        ):  # the visual places' columns: their image's first column + their index in it
            # out of place: `source` shares the copied buffer with `visual`, which autograd may keep
            source = source.index_copy(0, visual, image_start + visual_index.to(device))
        source = source.view(b, new_len)  # padding places hold 0
        if position_ids is not None:
            pos = position_ids.to(device).expand(b, -1).gather(1, source)
            if (
                positions == "compact"
            ):  # minus the tokens removed before each: its column minus its rank
                pos = pos - source + rank.view(b, new_len)
            if pads.numel():
                pos.view(-1).index_fill_(0, pads, 0)
        elif positions == "original":
            pos = source
        if labels is not None:
            new_labels = labels.to(device).gather(1, source)
            if pads.numel():
                new_labels.view(-1).index_fill_(0, pads, -100)
    return Assembled(embeds, mask, pos, new_labels, removed, layout.orig_len, new_len)


def place_columns(layout: Layout, visual_index: torch.Tensor, device) -> torch.Tensor:
    """[B, new_len] on `device`: each place's prompt column (a kept visual token: its image's first
    column + its index in the image; padding: 0), from a layout planned with columns=True. Families
    whose positions are not a function of the column alone (Qwen's M-RoPE) gather theirs with it."""
    if layout.source is None:
        raise ValueError("place_columns: needs a layout planned with columns=True")
    parts = [layout.source, layout.visual, layout.image_start]
    host = torch.from_numpy(
        np.concatenate([p.reshape(-1) for p in parts]).astype(np.int64, copy=False)
    )
    source, visual, image_start = to_device(host, device).split([p.size for p in parts])
    if visual.numel():
        source = source.index_copy(0, visual, image_start + visual_index.to(device))
    return source.view(layout.ids.shape)
