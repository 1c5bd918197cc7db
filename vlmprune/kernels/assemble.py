"""Assemble the pruned decoder input (DESIGN §4.2): text rows and kept visual rows written into
the pruned `inputs_embeds`, attention mask, position ids and labels. Torch reference."""

from __future__ import annotations

from dataclasses import dataclass

import torch


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


def pad_side(attention_mask: torch.Tensor | None) -> str:
    """'right' when some row ends in padding, else 'left' (the generation convention)."""
    if attention_mask is not None and attention_mask.ndim == 2 and bool((attention_mask[:, -1] == 0).any()):
        return "right"
    return "left"


def assemble_ref(
    text_embeds: torch.Tensor,
    is_visual: torch.Tensor,
    keep_visual: torch.Tensor,
    visual_embeds: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    position_ids: torch.Tensor | None = None,
    labels: torch.Tensor | None = None,
    positions: str = "compact",
) -> Assembled:
    """Drop the visual tokens not kept and re-pad the rows to a common length.

    text_embeds [B, L, D]: embeddings of the prompt (visual slots hold anything);
    is_visual [B, L]: visual-token slots; keep_visual [V] bool over all visual slots in row-major
    order; visual_embeds [sum(keep_visual), D]: what goes into the kept visual slots, same order.
    Rows shorter than the longest are padded on the batch's padding side (mask 0, zeros).

    positions: "compact" renumbers as if only the kept tokens had been given (given position ids
    shift down by the number of tokens removed before each token; with none given the decoder's
    own arange over the pruned sequence applies, so None is returned); "original" keeps each
    token's position id (arange over the unpruned sequence when none were given)."""
    b, length, _ = text_embeds.shape
    keep = ~is_visual
    keep[is_visual] = keep_visual
    lens = keep.sum(1)
    new_len = int(lens.max()) if b else 0
    offset = (new_len - lens) if pad_side(attention_mask) == "left" else torch.zeros_like(lens)
    dest = keep.long().cumsum(1) - 1 + offset[:, None]
    rows, cols = keep.nonzero(as_tuple=True)
    to = dest[rows, cols]

    src = text_embeds[rows, cols]
    src[is_visual[rows, cols]] = visual_embeds.to(src.dtype)
    embeds = text_embeds.new_zeros(b, new_len, text_embeds.shape[-1])
    embeds[rows, to] = src

    ragged = bool((lens != new_len).any())
    mask = None
    if attention_mask is not None or ragged:
        src_mask = attention_mask if attention_mask is not None else torch.ones_like(keep, dtype=torch.long)
        mask = src_mask.new_zeros(b, new_len)
        mask[rows, to] = src_mask[rows, cols]

    pos = None
    if position_ids is not None or positions == "original":
        base = position_ids
        if base is None:
            base = torch.arange(length, device=keep.device)
        base = base.expand(b, length)
        if positions == "compact":
            base = base - (~keep).long().cumsum(1)
        pos = base.new_zeros(b, new_len)
        pos[rows, to] = base[rows, cols]

    new_labels = None
    if labels is not None:
        new_labels = labels.new_full((b, new_len), -100)
        new_labels[rows, to] = labels[rows, cols]

    return Assembled(embeds, mask, pos, new_labels, length - lens, length, new_len)
