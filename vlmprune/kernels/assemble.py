"""Assemble the pruned decoder input (DESIGN §4.2): text rows and kept visual rows written into
the pruned `inputs_embeds`, attention mask, position ids and labels in one scatter each.

Torch ops only, and none of them waits for the device: every shape (the kept length of each row,
the padding side) comes from the host, which knows them before the scorer has run. A prefill can
then queue scoring, assembly and the decoder behind the vision encoder without stalling; each
wait for the device here used to leave it idle while the host caught up."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from vlmprune.kernels.select import to_device


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
    text_embeds: torch.Tensor,
    is_visual: torch.Tensor,
    keep_visual: torch.Tensor,
    visual_embeds: torch.Tensor,
    lens: list[int],
    right_padded: bool = False,
    attention_mask: torch.Tensor | None = None,
    position_ids: torch.Tensor | None = None,
    labels: torch.Tensor | None = None,
    positions: str = "compact",
) -> Assembled:
    """Drop the visual tokens not kept and re-pad the rows to a common length.

    text_embeds [B, L, D]: embeddings of the prompt (visual slots hold anything);
    is_visual [B, L]: visual-token slots; keep_visual [V] bool over all visual slots in row-major
    order; visual_embeds [sum(keep_visual), D]: what goes into the kept visual slots, same order;
    lens [B] (host): tokens each row keeps, i.e. its text tokens plus its kept visual tokens.
    Rows shorter than the longest are padded on the batch's padding side (`right_padded`, as the
    2-D attention mask says; mask 0, zeros). A `lens` that disagrees with `keep_visual` is an error
    (on CUDA a device-side assert, which needs no wait).

    positions: "compact" renumbers as if only the kept tokens had been given (given position ids
    shift down by the number of tokens removed before each token; with none given the decoder's
    own arange over the pruned sequence applies, so None is returned); "original" keeps each
    token's position id (arange over the unpruned sequence when none were given)."""
    b, length, d = text_embeds.shape
    device = text_embeds.device
    new_len = max(lens, default=0)
    keep = ~is_visual
    if keep_visual.numel():  # each visual slot reads its flag by its rank among the visual slots
        rank = (is_visual.reshape(-1).cumsum(0) - 1).clamp_(min=0)
        keep |= is_visual & keep_visual[rank].view(b, length)
    src = text_embeds.reshape(b * length, d)
    if visual_embeds.shape[0]:  # ...and each kept visual slot its row of visual_embeds by its rank
        kept_visual = (is_visual & keep).reshape(-1)
        rank = (kept_visual.cumsum(0) - 1).clamp_(min=0)
        src = torch.where(kept_visual[:, None], visual_embeds.to(src.dtype)[rank], src)
    # destination of every slot in the flat [B * new_len] output; dropped slots go to one spare row
    count = keep.long().cumsum(1)
    lens_dev = count[:, -1] if length else torch.zeros(b, dtype=torch.long, device=device)
    start = torch.arange(0, b * new_len, new_len, device=device) if new_len else torch.zeros_like(lens_dev)
    if not right_padded:
        start = start + new_len - lens_dev
    dest = torch.where(keep, count - 1 + start[:, None], b * new_len).reshape(-1)

    def scatter(values: torch.Tensor, fill: float, width: tuple[int, ...] = ()) -> torch.Tensor:
        out = values.new_full((b * new_len + 1, *width), fill)
        out[dest] = values.reshape(b * length, *width)
        return out[:-1].view(b, new_len, *width)

    embeds = scatter(src, 0, (d,))
    ragged = any(n != new_len for n in lens)
    mask = None
    if attention_mask is not None or ragged:
        mask = scatter(attention_mask if attention_mask is not None else torch.ones_like(keep, dtype=torch.long), 0)
    pos = None
    if position_ids is not None or positions == "original":
        base = position_ids if position_ids is not None else torch.arange(length, device=device)
        base = base.expand(b, length)
        if positions == "compact":
            base = base - (~keep).long().cumsum(1)
        pos = scatter(base, 0)
    new_labels = scatter(labels, -100) if labels is not None else None
    if device.type != "cpu":  # the host's lengths are the plan; a scorer that broke it stops the stream here
        torch._assert_async((lens_dev == (new_len if not ragged else to_device(lens, device))).all())
    elif lens_dev.tolist() != list(lens):
        raise ValueError(f"assemble: the rows keep {lens_dev.tolist()} tokens, but lens says {list(lens)}")
    return Assembled(embeds, mask, pos, new_labels, length - lens_dev, length, new_len)
