"""Tiny random LLaVA models built from configs (no downloads) and helpers shared by the tests."""

from __future__ import annotations

import pytest
import torch
from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

IMAGE_TOKEN = 99
PAD = 0
GRID = 4  # 28 px / patch 7 -> 4 x 4 = 16 visual tokens per image
N_VIS = GRID * GRID


def tiny_llava(attn: str = "sdpa", seed: int = 0, strategy: str = "default", feature_layer: int = -2):
    torch.manual_seed(seed)
    vision = CLIPVisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4,
        image_size=28, patch_size=7, projection_dim=32,
    )
    text = LlamaConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=100, max_position_embeddings=256, pad_token_id=PAD,
        bos_token_id=1, eos_token_id=2,
    )
    cfg = LlavaConfig(
        vision_config=vision, text_config=text, image_token_id=IMAGE_TOKEN,
        vision_feature_layer=feature_layer, vision_feature_select_strategy=strategy,
    )
    cfg._attn_implementation = attn
    model = LlavaForConditionalGeneration(cfg).eval()
    model.generation_config.pad_token_id = PAD
    return model


def prompt(n_images: int, before: int = 3, after: int = 4, n_vis: int = N_VIS, seed: int = 0) -> list[int]:
    """Token ids: text, then each image's placeholder run separated by a text token, then text."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 90, (before,), generator=g).tolist()
    for _ in range(n_images):
        ids += [IMAGE_TOKEN] * n_vis + torch.randint(3, 90, (1,), generator=g).tolist()
    return ids + torch.randint(3, 90, (after,), generator=g).tolist()


def left_pad(rows: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), PAD, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, width - len(r):] = torch.tensor(r)
        mask[i, width - len(r):] = 1
    return ids, mask


def pixels(n: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, 3, 28, 28, generator=torch.Generator().manual_seed(seed))


@pytest.fixture
def llava():
    return tiny_llava()
