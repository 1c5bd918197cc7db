"""Tiny random-weight models built from configs (no downloads), for tests, demos and benchmarks
of the pipeline's shapes. Their outputs mean nothing; their shapes and code paths are real."""

from __future__ import annotations

import torch
from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

IMAGE_TOKEN = 99
PAD = 0


def llava_config(
    *,
    image_size: int = 28,
    patch_size: int = 7,
    vision_hidden: int = 32,
    vision_layers: int = 4,
    vision_heads: int = 4,
    vision_intermediate: int | None = None,
    text_hidden: int = 32,
    text_layers: int = 2,
    text_heads: int = 4,
    text_kv_heads: int = 2,
    text_intermediate: int | None = None,
    vocab_size: int = 100,
    image_token_id: int = IMAGE_TOKEN,
    strategy: str = "default",
    feature_layer: int = -2,
    attn: str = "sdpa",
) -> LlavaConfig:
    """A LLaVA-1.5-style config; defaults are tiny, `llava_7b_config()` gives the real shapes."""
    vision = CLIPVisionConfig(
        hidden_size=vision_hidden,
        intermediate_size=vision_intermediate or 2 * vision_hidden,
        num_hidden_layers=vision_layers,
        num_attention_heads=vision_heads,
        image_size=image_size,
        patch_size=patch_size,
        projection_dim=vision_hidden,
    )
    text = LlamaConfig(
        hidden_size=text_hidden,
        intermediate_size=text_intermediate or 2 * text_hidden,
        num_hidden_layers=text_layers,
        num_attention_heads=text_heads,
        num_key_value_heads=text_kv_heads,
        vocab_size=vocab_size,
        max_position_embeddings=4096,
        pad_token_id=PAD,
        bos_token_id=1,
        eos_token_id=2,
    )
    cfg = LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_id=image_token_id,
        vision_feature_layer=feature_layer,
        vision_feature_select_strategy=strategy,
    )
    cfg._attn_implementation = attn
    return cfg


def llava_7b_config(attn: str = "sdpa") -> LlavaConfig:
    """LLaVA-1.5-7B shapes: CLIP ViT-L/14 at 336 px (576 visual tokens) + a 7B Llama."""
    return llava_config(
        image_size=336, patch_size=14, vision_hidden=1024, vision_layers=24, vision_heads=16,
        vision_intermediate=4096, text_hidden=4096, text_layers=32, text_heads=32, text_kv_heads=32,
        text_intermediate=11008, vocab_size=32064, image_token_id=32000, attn=attn,
    )


def tiny_llava(attn: str = "sdpa", seed: int = 0, **overrides) -> LlavaForConditionalGeneration:
    """A random LLaVA with a 4x4 grid of visual tokens (28 px images, patch 7)."""
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(llava_config(attn=attn, **overrides)).eval()
    model.generation_config.pad_token_id = PAD
    return model


def image_prompt(n_images: int, n_vis: int, before: int = 3, after: int = 4, seed: int = 0,
                 image_token: int = IMAGE_TOKEN, vocab: int = 90) -> list[int]:
    """Token ids: random text, each image's placeholder run followed by a text token, text."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (before,), generator=g).tolist()
    for _ in range(n_images):
        ids += [image_token] * n_vis + torch.randint(3, vocab, (1,), generator=g).tolist()
    return ids + torch.randint(3, vocab, (after,), generator=g).tolist()


def left_pad(rows: list[list[int]], pad: int = PAD) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask) with rows left-padded to the longest."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, width - len(r):] = torch.tensor(r, dtype=torch.long)
        mask[i, width - len(r):] = 1
    return ids, mask
