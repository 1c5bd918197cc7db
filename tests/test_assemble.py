"""The pruned-prefill assembly and its helpers against plain per-row loops (ragged images, both
padding sides, given and default positions, labels): shapes come from the host, never the device."""

import pytest
import torch

from vlmprune.adapters.base import PendingSelection, images_by_row, kept_rows, slot_mask
from vlmprune.kernels.assemble import assemble


def reference(text, is_visual, keep_visual, visual, mask, pos, labels, positions, right):
    """Row by row: the kept tokens in order, renumbered or not, padded on `right` or the left."""
    b, length, d = text.shape
    flags = iter(keep_visual.tolist())
    vis = iter(visual)
    rows = []
    for r in range(b):
        base = pos[r] if pos is not None else torch.arange(length)
        row, dropped = [], 0
        for c in range(length):
            if is_visual[r, c]:
                if not next(flags):
                    dropped += 1
                    continue
                emb = next(vis)
            else:
                emb = text[r, c]
            p = base[c] - dropped if positions == "compact" else base[c]
            row.append((emb, 1 if mask is None else mask[r, c], p, -100 if labels is None else labels[r, c]))
        rows.append(row)
    new_len = max(len(row) for row in rows)
    out = torch.zeros(b, new_len, d), torch.zeros(b, new_len, dtype=torch.long)
    out_pos, out_lab = torch.zeros(b, new_len, dtype=torch.long), torch.full((b, new_len), -100)
    for r, row in enumerate(rows):
        start = 0 if right else new_len - len(row)
        for j, (emb, m, p, lab) in enumerate(row):
            out[0][r, start + j], out[1][r, start + j], out_pos[r, start + j], out_lab[r, start + j] = emb, m, p, lab
    return out[0], out[1], out_pos, out_lab, [len(row) for row in rows]


@pytest.mark.parametrize("right", [False, True])
@pytest.mark.parametrize("positions, given", [("compact", False), ("compact", True), ("original", False), ("original", True)])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_assemble_equals_the_per_row_loop(right, positions, given, seed):
    g = torch.Generator().manual_seed(seed)
    b, length, d = 4, 13, 3
    text = torch.randn(b, length, d, generator=g)
    is_visual = torch.rand(b, length, generator=g) < 0.6
    is_visual[1] = False  # a text-only row
    keep_visual = torch.rand(int(is_visual.sum()), generator=g) < 0.4
    visual = torch.randn(int(keep_visual.sum()), d, generator=g)
    mask = (torch.rand(b, length, generator=g) < 0.9).long()
    pos = torch.randint(0, 50, (b, length), generator=g) if given else None
    labels = torch.randint(0, 9, (b, length), generator=g)
    emb, m, p, lab, lens = reference(text, is_visual, keep_visual, visual, mask, pos, labels, positions, right)
    out = assemble(text, is_visual, keep_visual, visual, lens, right_padded=right, attention_mask=mask,
                   position_ids=pos, labels=labels, positions=positions)
    assert out.new_len == max(lens) and out.orig_len == length
    assert torch.equal(out.inputs_embeds, emb) and torch.equal(out.attention_mask, m) and torch.equal(out.labels, lab)
    assert torch.equal(out.removed, torch.tensor([length - n for n in lens]))
    if positions == "compact" and not given:
        assert out.position_ids is None  # the decoder's own arange over the pruned rows
    else:
        assert torch.equal(out.position_ids, p)


def test_assemble_with_nothing_kept_and_no_mask():
    """Every visual token dropped, equal row lengths, no mask given: no mask is made."""
    text = torch.randn(2, 5, 2)
    is_visual = torch.tensor([[0, 1, 1, 0, 0], [0, 0, 1, 1, 0]], dtype=torch.bool)
    out = assemble(text, is_visual, torch.zeros(4, dtype=torch.bool), torch.zeros(0, 2), [3, 3])
    assert out.attention_mask is None
    assert torch.equal(out.inputs_embeds, text[~is_visual].view(2, 3, 2))


def test_lengths_that_disagree_with_the_kept_tokens_are_an_error():
    """The host's plan (lens) must match what the keep flags say: a scorer keeping fewer tokens
    than planned would otherwise shift every later row's tokens."""
    text = torch.randn(2, 4, 2)
    is_visual = torch.tensor([[0, 1, 1, 0], [0, 1, 1, 0]], dtype=torch.bool)
    keep_visual = torch.tensor([True, False, True, True])  # row 0 keeps 3 tokens, row 1 keeps 4
    with pytest.raises(ValueError, match=r"keep \[3, 4\] tokens, but lens says \[4, 4\]"):
        assemble(text, is_visual, keep_visual, torch.zeros(3, 2), [4, 4])


def test_slot_mask_and_kept_rows_for_ragged_images():
    per_image, kept = [5, 2, 4], [3, 2, 1]
    idx = torch.tensor([[0, 2, 4], [0, 1, -1], [3, -1, -1]])
    assert slot_mask(idx, per_image).tolist() == [1, 0, 1, 0, 1, 1, 1, 0, 0, 0, 1]
    visual = torch.arange(9.0).view(3, 3, 1)
    assert kept_rows(visual, kept).flatten().tolist() == [0, 1, 2, 3, 4, 6]
    assert images_by_row([7, 0, 4], per_image) == [[0, 1], [], [2]]


def test_a_selection_that_breaks_the_plan_is_an_error_naming_the_method():
    ok = PendingSelection(torch.tensor([[1, 3], [0, -1]]), [2, 1], [[0], [1]], "m")
    assert [[s.tolist() for s in row] for row in ok.resolve()] == [[[1, 3]], [[0]]]
    with pytest.raises(RuntimeError, match="method 'bad' kept 1 tokens of image 0.*exactly 2"):
        PendingSelection(torch.tensor([[1, -1]]), [2], [[0]], "bad").resolve()


def test_stack_padded_reuses_the_batch_the_rows_came_from():
    from vlmprune.adapters.base import stack_padded

    whole = torch.randn(3, 4, 2)
    assert stack_padded(list(whole)) is whole  # HF's list(features): no copy
    assert torch.equal(stack_padded([whole[1], whole[0], whole[2]]), whole[[1, 0, 2]])  # reordered: a stack
    assert torch.equal(stack_padded(list(whole[:2])), whole[:2])  # a part of a batch: a stack
    ragged = stack_padded([whole[0], whole[1, :2]])
    assert ragged.shape == (2, 4, 2) and torch.equal(ragged[1, 2:], torch.zeros(2, 2))
