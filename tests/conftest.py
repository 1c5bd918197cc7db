"""Tiny random LLaVA models built from configs (no downloads) and helpers shared by the tests."""

from __future__ import annotations

import torch

import vlmprune
from vlmprune.eval.tiny import IMAGE_TOKEN, PAD, image_prompt, left_pad, tiny_llava  # noqa: F401

GRID = 4  # 28 px / patch 7 -> 4 x 4 = 16 visual tokens per image
N_VIS = GRID * GRID


def prompt(n_images: int, before: int = 3, after: int = 4, n_vis: int = N_VIS, seed: int = 0) -> list[int]:
    return image_prompt(n_images, n_vis, before=before, after=after, seed=seed)


def pixels(n: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, 3, 28, 28, generator=torch.Generator().manual_seed(seed))


def batch_of_rows(n_img: list[int], seed: int) -> tuple[list[list[int]], list[torch.Tensor]]:
    """Prompts with n_img[i] images each (lengths differ) and their pixel values."""
    rows = [prompt(n, seed=seed + i, after=4 + 3 * i) for i, n in enumerate(n_img)]
    return rows, [pixels(n, seed=seed + 10 + i) for i, n in enumerate(n_img)]


def assert_generate_batch_equals_rows(model, n_img: list[int], seed: int, new_tokens: int = 5) -> None:
    """Greedy generate() of a left-padded batch == each row generated alone (and the batch
    prefill pruned every image: last_selection has one entry per image of each row)."""
    rows, pv_rows = batch_of_rows(n_img, seed)
    ids, mask = left_pad(rows)
    gen = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
    with torch.no_grad():
        new = model.generate(input_ids=ids, attention_mask=mask, pixel_values=torch.cat(pv_rows), **gen)
        assert [len(r) for r in vlmprune.last_selection(model)] == n_img
        for i, row in enumerate(rows):
            kwargs = {"pixel_values": pv_rows[i]} if n_img[i] else {}
            alone = model.generate(input_ids=torch.tensor([row]), **kwargs, **gen)[0, len(row):]
            assert torch.equal(new[i, ids.shape[1]:], alone), (i, new[i, ids.shape[1]:], alone)
