"""The pruned-prefill assembly against plain per-row loops (ragged images, both padding sides, given
and default positions, labels): the layout is planned on the host from the prompt, and only which
token fills a visual place comes from the selection."""

import pytest
import torch

from vlmprune.adapters.base import PendingSelection, check_kept, images_by_row, kept_rows
from vlmprune.kernels.assemble import assemble, plan_layout

IMAGE = 7  # the image token id of the tests' prompts


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


def prompt(g: torch.Generator, b: int, length: int):
    """[b, length] ids whose image tokens come in runs (0-3 images a row, one row text-only), the
    images' token counts, and per image a random ascending selection (some keep none, some all)."""
    ids = torch.randint(0, IMAGE, (b, length), generator=g)
    per_image = []
    for r in range(b):
        c = 0
        while r != 1 and c < length - 1 and torch.rand(1, generator=g) < 0.7:
            c += int(torch.randint(0, 3, (1,), generator=g))  # text before the image (maybe none)
            n = min(int(torch.randint(1, 5, (1,), generator=g)), length - c)
            if n <= 0:
                break
            ids[r, c : c + n] = IMAGE
            per_image.append(n)
            c += n
    kept = [int(torch.randint(0, n + 1, (1,), generator=g)) for n in per_image]
    kmax = max(kept, default=0)
    idx = torch.full((len(per_image), kmax), -1)
    for i, (n, c) in enumerate(zip(per_image, kept)):
        idx[i, :c] = torch.randperm(n, generator=g)[:c].sort().values
    return ids, per_image, kept, idx


@pytest.mark.parametrize("right", [False, True])
@pytest.mark.parametrize("positions, given", [("compact", False), ("compact", True), ("original", False), ("original", True)])
@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_assemble_equals_the_per_row_loop(right, positions, given, seed):
    g = torch.Generator().manual_seed(seed)
    b, length, d = 4, 13, 3
    ids, per_image, kept, idx = prompt(g, b, length)
    is_visual = ids == IMAGE
    embed = torch.nn.Embedding(IMAGE, d)  # the image token id is outside the table: never looked up
    feats = torch.randn(len(per_image), max(per_image, default=1), d, generator=g)
    visual = torch.zeros(0, d)
    if sum(kept):
        visual = torch.stack([feats[i, j] for i, c in enumerate(kept) for j in idx[i, :c]])
    keep_visual = torch.tensor([j in idx[i, : kept[i]].tolist() for i, n in enumerate(per_image) for j in range(n)],
                               dtype=torch.bool)
    mask = ((torch.rand(b, length, generator=g) < 0.9) | is_visual).long()
    pos = torch.randint(0, 50, (b, length), generator=g) if given else None
    labels = torch.randint(0, 9, (b, length), generator=g)
    with torch.no_grad():
        text = embed(ids.clamp(max=IMAGE - 1))  # (the reference never reads its image slots)
        emb, m, p, lab, lens = reference(text, is_visual, keep_visual, visual, mask, pos, labels, positions, right)
        layout = plan_layout(ids, is_visual, per_image, kept, right, mask)
        index = kept_rows(idx.unsqueeze(-1), kept).squeeze(-1) if kept else torch.zeros(0, dtype=torch.long)
        out = assemble(embed, layout, visual, index, attention_mask=mask, position_ids=pos, labels=labels,
                       positions=positions)
    assert layout.lens == lens and out.new_len == max(lens) and out.orig_len == length
    assert torch.equal(out.inputs_embeds, emb) and torch.equal(out.attention_mask, m) and torch.equal(out.labels, lab)
    assert torch.equal(out.removed, torch.tensor([length - n for n in lens]))
    if positions == "compact" and not given:
        assert out.position_ids is None  # the decoder's own arange over the pruned rows
    else:
        assert torch.equal(out.position_ids, p)


def test_assemble_with_nothing_kept_and_no_mask():
    """Every visual token dropped, equal row lengths, no mask given: no mask is made; the image
    token id may lie outside the embedding table (it is never looked up)."""
    embed = torch.nn.Embedding(5, 2)
    ids = torch.tensor([[1, 9, 9, 2, 3], [4, 0, 9, 9, 1]])  # 9: the image token, not in the table
    is_visual = ids == 9
    layout = plan_layout(ids, is_visual, [2, 2], [0, 0])
    with torch.no_grad():
        out = assemble(embed, layout, torch.zeros(0, 2))
        assert out.attention_mask is None and layout.new_len == 3
        assert torch.equal(out.inputs_embeds, embed(ids[~is_visual].view(2, 3)))


@pytest.mark.parametrize("ids, per_image, what", [
    ([[9, 1, 9, 9], [1, 1, 1, 1]], [3], "3 tokens of image 0"),  # text inside the image's run
    ([[1, 1, 9, 9], [9, 9, 1, 1]], [4], "4 tokens of image 0"),  # one image across two rows
    ([[9, 9, 1, 9], [9, 1, 1, 1]], [2, 2], "2 tokens of image 1"),
])
def test_an_image_that_is_not_one_run_is_an_error_naming_it(ids, per_image, what):
    ids = torch.tensor(ids)
    with pytest.raises(ValueError, match=f"the {what} are not one run within a row"):
        plan_layout(ids, ids == 9, per_image, [1] * len(per_image))


def test_an_image_token_outside_the_mask_is_an_error():
    ids = torch.tensor([[1, 9, 9, 2]])
    with pytest.raises(ValueError, match=r"attention_mask is 0 at an image token \(row 0, column 2\)"):
        plan_layout(ids, ids == 9, [2], [1], attention_mask=torch.tensor([[1, 1, 0, 1]]))


def test_kept_rows_and_images_by_row_for_ragged_images():
    per_image, kept = [5, 2, 4], [3, 2, 1]
    visual = torch.arange(9.0).view(3, 3, 1)
    assert kept_rows(visual, kept).flatten().tolist() == [0, 1, 2, 3, 4, 6]
    assert images_by_row([7, 0, 4], per_image) == [[0, 1], [], [2]]


def test_a_selection_narrower_than_the_plan_is_an_error_naming_the_method():
    with pytest.raises(RuntimeError, match=r"method 'bad' returned indices of shape \(2, 1\).*\[2, >= 2\]"):
        check_kept(torch.tensor([[0], [1]]), [2, 1], "bad")
    check_kept(torch.tensor([[0, 1], [1, -1]]), [2, 1], "ok")


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
