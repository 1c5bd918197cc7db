"""Tiny random LLaVA models built from configs (no downloads) and helpers shared by the tests."""

from __future__ import annotations

import torch

from vlmprune.eval.tiny import IMAGE_TOKEN, PAD, image_prompt, left_pad, tiny_llava  # noqa: F401

GRID = 4  # 28 px / patch 7 -> 4 x 4 = 16 visual tokens per image
N_VIS = GRID * GRID


def prompt(n_images: int, before: int = 3, after: int = 4, n_vis: int = N_VIS, seed: int = 0) -> list[int]:
    return image_prompt(n_images, n_vis, before=before, after=after, seed=seed)


def pixels(n: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, 3, 28, 28, generator=torch.Generator().manual_seed(seed))
