"""The Qwen2-VL family of the tiny-model trainer (`python -m vlmprune.embedded.train --family qwen2_vl`).

A `Qwen2VLForConditionalGeneration` of tiny sizes at 336 px: its vision tower (14 px patches with
temporal patch 2 over the repeated frame, 2-D rotary; 24 x 24 = 576 patches) and a 2 x 2
`PatchMerger` -> 144 visual tokens per image; a Qwen2 decoder with M-RoPE (the image's tokens share
one temporal position and take row / column positions; text continues after the largest). The
processor is a `Qwen2VLProcessor` whose `Qwen2VLImageProcessor` keeps 336 x 336
(min_pixels = max_pixels = 336^2), with the trainer's word-level tokenizer and the Qwen special
tokens. Prompt: `<|vision_start|><|image_pad|><|vision_end|>{question} Answer:`.

Only what differs from LLaVA lives here (`Qwen2VLFamily`); the recipe (data, stage-1 / stage-2
schedules, grounding loss, evaluation, saving) is `core`'s and `train`'s. docs/training.md describes both.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Sequence
from typing import Any, ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from vlmprune.embedded.core import (
    BOS_ID,
    CLIP_MEAN,
    CLIP_STD,
    EOS_ID,
    GRID,
    IMAGE_ID,
    IMAGE_SIZE,
    PAD_ID,
    PATCH_SIZE,
    QUICK_ARCH,
    WHERE_WEIGHT,
    Arch,
    DenseHeads,
    Family,
    LabelSpace,
    VisionOut,
    greedy_generation,
)

MERGE = 2  # spatial_merge_size: 2 x 2 patches -> one decoder token
TEMPORAL = 2  # temporal_patch_size: a still image is its frame repeated
TOKEN_GRID = GRID // MERGE  # 12
N_PATCHES = GRID * GRID  # 576 patches per image in the tower
N_VISUAL = TOKEN_GRID * TOKEN_GRID  # 144 visual tokens per image in the decoder
PROMPT = "<|vision_start|><|image_pad|><|vision_end|>{question} Answer:"
SPECIAL_TOKENS = (
    "<pad>",
    "<s>",
    "</s>",
    "<unk>",
    "<|image_pad|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|video_pad|>",
)
VISION_START_ID, VISION_END_ID, VIDEO_ID = range(5, 8)
# Renders to exactly PROMPT for one user turn with one image (see llava.CHAT_TEMPLATE).
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'user' %}"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for c in message['content'] %}{% if c['type'] == 'image' %}"
    "<|vision_start|><|image_pad|><|vision_end|>{% endif %}{% endfor %}"
    "{% for c in message['content'] %}{% if c['type'] == 'text' %}{{ c['text'] }}{% endif %}{% endfor %}"
    "{% endif %}"
    "{% elif message['role'] == 'assistant' %} Answer: "
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for c in message['content'] %}{% if c['type'] == 'text' %}{{ c['text'] }}{% endif %}{% endfor %}"
    "{% endif %}</s>"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %} Answer:{% endif %}"
)
# vision: embed 192, 6 blocks, 4 heads, MLP 384 (mlp_ratio 2); decoder: 256 wide, 4 layers, 4 heads
# (2 KV heads), MLP 480: 5.1 M parameters, under 10 MiB of fp16 safetensors
ARCH = Arch(
    vision_hidden=192,
    vision_layers=6,
    vision_heads=4,
    vision_intermediate=384,
    text_hidden=256,
    text_layers=4,
    text_heads=4,
    text_kv_heads=2,
    text_intermediate=480,
)


def mrope_section(head_dim: int) -> list[int]:
    """Temporal / height / width shares of the decoder's rotary frequencies (head_dim / 2 of them),
    in Qwen2-VL's proportions (16 / 24 / 24 of 64): [8, 12, 12] for head_dim 64."""
    half = head_dim // 2
    hw = (half - half // 4) // 2
    return [half - 2 * hw, hw, hw]


def qwen2_vl_config(arch: Arch, vocab_size: int, attn: str = "sdpa"):
    """A `Qwen2VLConfig` of `arch`'s sizes: patch 14, merge 2 x 2, temporal patch 2, the merger
    projecting to the decoder's width, rope theta the default (1e6), M-RoPE sections from head_dim."""
    from transformers import Qwen2VLConfig

    if arch.vision_intermediate % arch.vision_hidden:
        raise ValueError(
            f"Qwen2-VL's vision MLP is mlp_ratio x embed_dim: vision_intermediate "
            f"{arch.vision_intermediate} is not a multiple of vision_hidden {arch.vision_hidden}"
        )
    cfg = Qwen2VLConfig(
        text_config={
            "vocab_size": vocab_size,
            "hidden_size": arch.text_hidden,
            "intermediate_size": arch.text_intermediate,
            "num_hidden_layers": arch.text_layers,
            "num_attention_heads": arch.text_heads,
            "num_key_value_heads": arch.text_kv_heads,
            "max_position_embeddings": 1024,
            "rope_parameters": {
                "rope_type": "default",
                "mrope_section": mrope_section(arch.text_hidden // arch.text_heads),
            },
            "pad_token_id": PAD_ID,
            "bos_token_id": BOS_ID,
            "eos_token_id": EOS_ID,
        },
        vision_config={
            "depth": arch.vision_layers,
            "embed_dim": arch.vision_hidden,
            "hidden_size": arch.text_hidden,
            "num_heads": arch.vision_heads,
            "mlp_ratio": arch.vision_intermediate // arch.vision_hidden,
            "patch_size": PATCH_SIZE,
            "spatial_merge_size": MERGE,
            "temporal_patch_size": TEMPORAL,
        },
        image_token_id=IMAGE_ID,
        video_token_id=VIDEO_ID,
        vision_start_token_id=VISION_START_ID,
        vision_end_token_id=VISION_END_ID,
    )
    for c in (cfg, cfg.text_config, cfg.vision_config):
        c._attn_implementation = attn
    return cfg


def build_processor(tokenizer):
    """`Qwen2VLProcessor`: a `Qwen2VLImageProcessor` that keeps 336 x 336 (min = max pixels), CLIP
    mean / std, patch 14, merge 2, temporal patch 2 -> one image is 576 patches, 144 <|image_pad|>;
    and a `Qwen2VLVideoProcessor` of the same settings, never used here but part of the processor.
    Without torchvision (which the video processor needs) the same processor for images only, on
    the image processor's PIL backend (`vlmprune.eval.qwen.images_only`; saved as a Qwen2VLProcessor
    with no video processor, and reloaded by `qwen.load_processor`)."""
    from transformers import Qwen2VLProcessor

    kwargs = {
        "min_pixels": IMAGE_SIZE * IMAGE_SIZE,
        "max_pixels": IMAGE_SIZE * IMAGE_SIZE,
        "patch_size": PATCH_SIZE,
        "temporal_patch_size": TEMPORAL,
        "merge_size": MERGE,
        "image_mean": list(CLIP_MEAN),
        "image_std": list(CLIP_STD),
        "resample": 3,
    }
    try:
        from transformers import Qwen2VLImageProcessor, Qwen2VLVideoProcessor

        images, videos = (
            Qwen2VLImageProcessor(**kwargs),
            Qwen2VLVideoProcessor(**kwargs),
        )
    except ImportError:
        from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import (
            Qwen2VLImageProcessorPil,
        )

        from vlmprune.eval.qwen import images_only

        return images_only(Qwen2VLProcessor)(
            image_processor=Qwen2VLImageProcessorPil(**kwargs),
            tokenizer=tokenizer,
            chat_template=CHAT_TEMPLATE,
        )
    return Qwen2VLProcessor(
        image_processor=images,
        tokenizer=tokenizer,
        video_processor=videos,
        chat_template=CHAT_TEMPLATE,
    )


# --------------------------------------------------------------------------------------------
# pixels: the processor's pixel_values, computed on the GPU
# --------------------------------------------------------------------------------------------
def patchify(x: torch.Tensor) -> torch.Tensor:
    """[B, H, W, C] -> [B * H/14 * W/14, C * 2 * 14 * 14]: the processor's patch layout (2 x 2 merge
    windows in raster order, raster order inside a window; each patch's elements as channel,
    repeated frame, row, column). Any dtype: it only moves elements."""
    b, h, w, c = x.shape
    gh, gw, p = h // (PATCH_SIZE * MERGE), w // (PATCH_SIZE * MERGE), PATCH_SIZE
    x = x.reshape(b, gh, MERGE, p, gw, MERGE, p, c).permute(
        0, 1, 4, 2, 5, 7, 3, 6
    )  # b gh gw mh mw c ph pw
    x = x.unsqueeze(6).expand(*x.shape[:6], TEMPORAL, p, p)
    return x.reshape(b * gh * gw * MERGE * MERGE, c * TEMPORAL * p * p)


def window_order(grid: int = GRID, merge: int = MERGE) -> torch.Tensor:
    """[grid^2]: the raster index (row * grid + column) of each patch in the tower's order."""
    return (
        torch.arange(grid * grid)
        .view(grid // merge, merge, grid // merge, merge)
        .permute(0, 2, 1, 3)
        .reshape(-1)
    )


@functools.cache
def on_device(name: str, device: torch.device) -> torch.Tensor:
    """A constant index tensor, built once per device (no host-to-device copy in the training loop):
    `window_order()`, or ("positions") the (row, column) of each patch in the tower's order, its
    rotary positions (what the model's `get_vision_position_ids` gives for one 24 x 24 image)."""
    order = window_order()
    return (
        order
        if name == "window_order"
        else torch.stack([order // GRID, order % GRID], 1)
    ).to(device)


def byte_table(image_processor) -> torch.Tensor:
    """[3, 256]: the processor's normalised value of each byte in each channel, read off its own
    output for an image whose first row runs through 0..255, so that looking bytes up in it gives
    the processor's numbers bit for bit, whichever backend (PIL / torchvision) it runs."""
    from PIL import Image

    img = np.zeros((IMAGE_SIZE, IMAGE_SIZE, 3), np.uint8)
    img[0, :256] = np.arange(256, dtype=np.uint8)[:, None]
    pixel_values = image_processor(images=Image.fromarray(img), return_tensors="pt")[
        "pixel_values"
    ]
    source = patchify(
        torch.arange(img.size).view(1, *img.shape)
    )  # flat index into img of each element
    index = (source % 3) * 256 + torch.from_numpy(img).reshape(-1).long()[source]
    table = torch.zeros(3 * 256, dtype=torch.float32)
    table[index] = pixel_values.reshape(source.shape).float()
    if not torch.equal(table[index], pixel_values.reshape(source.shape).float()):
        raise RuntimeError(
            "the image processor does not map each byte to one value per channel at 336 px"
        )
    return table.view(3, 256)


class Qwen2VLPixels(nn.Module):
    """uint8 images [B, 336, 336, 3] -> the processor's `pixel_values` [B * 576, 1176]: each byte
    through `byte_table` (bit-identical to the processor), then `patchify`."""

    def __init__(self, table: torch.Tensor):
        super().__init__()
        self.register_buffer("table", table.reshape(-1).clone(), persistent=False)
        self.register_buffer(
            "offset", torch.arange(3, dtype=torch.int32) * 256, persistent=False
        )

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return patchify(
            self.table[images.int() + self.offset]
        )  # int32 indices: half the memory of int64


# --------------------------------------------------------------------------------------------
# vision tower, batched; decoder positions
# --------------------------------------------------------------------------------------------
def tower_forward(visual, pixel_values: torch.Tensor, images: int) -> torch.Tensor:
    """The Qwen2-VL vision blocks over `images` equal-size (336 px) images at once -> the last
    block's output [images, 576, embed_dim] in the tower's (merge-window) order.

    The model's own forward packs the images into one sequence with `cu_seqlens` and, without flash
    attention, loops over them; here each block's attention runs as one [images, heads, 576, d]
    SDPA call, and the patch embedding (a Conv3d whose kernel is the whole patch) as one matmul.
    The same computation (checked against the model's forward in tests/test_train_tiny.py)."""
    n = pixel_values.shape[0] // images
    if n != N_PATCHES:
        raise ValueError(f"expected {N_PATCHES} patches per image, got {n}")
    from transformers.models.qwen2_vl.modeling_qwen2_vl import (
        apply_rotary_pos_emb_vision,
    )

    if visual.spatial_merge_size != MERGE:
        raise ValueError(
            f"expected spatial_merge_size {MERGE}, got {visual.spatial_merge_size}"
        )
    positions = on_device("positions", pixel_values.device)
    weight = visual.patch_embed.proj.weight
    h = F.linear(pixel_values.to(weight.dtype), weight.reshape(weight.shape[0], -1))
    cos, sin = visual.rotary_pos_emb(h, positions)
    h = h.view(images, n, -1)
    for block in visual.blocks:
        attn = block.attn
        q, k, v = (
            attn.qkv(block.norm1(h)).view(images, n, 3, attn.num_heads, -1).unbind(2)
        )  # [B, n, heads, d]
        q, k = apply_rotary_pos_emb_vision(q, k, cos, sin)
        o = F.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), scale=attn.scaling
        )
        h = h + attn.proj(o.transpose(1, 2).reshape(images, n, -1))
        h = h + block.mlp(block.norm2(h))
    return h


def mrope_positions(
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    image_id: int = IMAGE_ID,
    grid: tuple[int, int] = (TOKEN_GRID, TOKEN_GRID),
) -> torch.Tensor:
    """[3, B, L] M-RoPE position ids of left-padded rows whose images each have `grid` decoder tokens,
    as the model's `get_rope_index` computes them (0 on padding), without its loop over rows: text
    counts on from the previous token; an image's tokens all take the temporal position of its
    first token and add their row / column to it; text after an image continues at that position
    + max(grid)."""
    gh, gw = grid
    n, span = gh * gw, max(gh, gw)
    real = attention_mask.bool()
    u = attention_mask.long().cumsum(-1) - 1  # index among the row's real tokens
    image = (input_ids == image_id) & real
    seen = image.long().cumsum(-1)  # image tokens up to and including this one
    before = seen - image.long()  # image tokens before this one
    text = u - before + (before // n) * span
    j, inside = (
        (seen - 1).clamp(min=0) // n,
        (seen - 1).clamp(min=0) % n,
    )  # image number, index inside it
    base = u - inside - n * j + span * j  # position of the image's first token
    visual = torch.stack([base, base + inside // gw, base + inside % gw])
    positions = torch.where(
        image.unsqueeze(0), visual, text.unsqueeze(0).expand(3, -1, -1)
    )
    return positions.masked_fill(~real.unsqueeze(0), 0)


# --------------------------------------------------------------------------------------------
# stage 1
# --------------------------------------------------------------------------------------------
def window_targets(
    dense: torch.Tensor, classes: Sequence[int]
) -> tuple[list[torch.Tensor], torch.Tensor]:
    """`LabelSpace.dense` targets [B, DENSE_ROWS, 576] in tower order -> the merged tokens' targets:
    for each class map (`classes` labels each) the label histogram of the token's 2 x 2 patches
    [B, 144, C], and their mean object x, y [B, 144, 2] in 0..1."""
    windows = (
        dense[:, : len(classes)]
        .reshape(dense.shape[0], len(classes), N_VISUAL, MERGE * MERGE)
        .long()
    )
    soft = [F.one_hot(windows[:, i], c).float().mean(2) for i, c in enumerate(classes)]
    where = (
        dense[:, 5:7]
        .reshape(dense.shape[0], 2, N_VISUAL, MERGE * MERGE)
        .float()
        .mean(-1)
        / 255
    )
    return soft, where.transpose(1, 2)


class Qwen2VLSceneObjective(nn.Module):
    """Stage-1 heads on the Qwen2-VL vision tower (thrown away after training) and their loss. There
    is no CLS token, so the scene attributes are read from mean-pooled tokens:

    - `scene`: LayerNorm + linear on the mean of the 144 merged tokens (what the decoder sees) ->
      the scene attributes (BCE); `scene_patches`: the same on the mean of the last block's 576
      patch tokens (before the merger);
    - `patches`: `DenseHeads` on the last block's patch tokens, exact per-patch targets (kind,
      colour, word, centre, own row / column of 24, object x / y);
    - `merged`: `DenseHeads` on the merged tokens: for each class map the target is the label
      histogram of the token's 2 x 2 patches (soft cross-entropy: a token a quarter star and three
      quarters background must say so, so a small object is never outvoted), its own row / column
      of 12, and the mean object x / y of its 4 patches.

    loss = 20 (BCE_merged + BCE_patches) + mean CE (patches) + mean CE (merged)
    + WHERE_WEIGHT (MSE_patches + MSE_merged)."""

    def __init__(self, space: LabelSpace, dim: int, out_dim: int):
        super().__init__()
        self.scene = nn.Sequential(
            nn.LayerNorm(out_dim), nn.Linear(out_dim, len(space))
        )
        self.scene_patches = nn.Sequential(
            nn.LayerNorm(dim), nn.Linear(dim, len(space))
        )
        self.register_buffer("order", window_order(), persistent=False)
        self.patches = DenseHeads(space, dim, GRID, cells=self.order)
        self.merged = DenseHeads(space, out_dim, TOKEN_GRID)
        self.classes = list(space.dense_classes.values())

    def loss(
        self,
        patches: torch.Tensor,
        merged: torch.Tensor,
        cls_target: torch.Tensor,
        dense_target: torch.Tensor,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """patches [B, 576, D] (tower order), merged [B, 144, D'], cls_target [B, L] uint8,
        dense_target [B, DENSE_ROWS, 576] uint8 (raster order, `LabelSpace.dense`)."""
        y = cls_target.float()
        logit = self.scene(merged.mean(1)).float()
        bce = F.binary_cross_entropy_with_logits(
            logit, y
        ) + F.binary_cross_entropy_with_logits(
            self.scene_patches(patches.mean(1)).float(), y
        )
        dense = dense_target[
            :, :, self.order
        ]  # tower order: 2 x 2 windows of 4 consecutive patches
        where = dense[:, 5:7].transpose(1, 2).float() / 255  # [B, 576, 2]
        ce_patch, mse_patch = self.patches.loss(patches, dense[:, :4].unbind(1), where)
        ce, mse = self.merged.loss(merged, *window_targets(dense, self.classes))
        loss = (
            20.0 * bce
            + sum(ce_patch.values()) / len(ce_patch)
            + sum(ce.values()) / len(ce)
            + WHERE_WEIGHT * (mse_patch + mse)
        )
        with torch.no_grad():
            stats = {
                "cls_exact": ((logit > 0) == (y > 0.5)).all(-1).float().mean(),
                "cls_bce": bce.detach() / 2,
                **{f"ce_{k}": v.detach() for k, v in ce.items()},
                "ce_patch": sum(ce_patch.values()).detach() / len(ce_patch),
                "mse_where": (mse + mse_patch).detach() / 2,
            }
        return loss, stats


# --------------------------------------------------------------------------------------------
# the family
# --------------------------------------------------------------------------------------------
class Qwen2VLFamily(Family):
    """Qwen2-VL: vision tower + 2 x 2 merger (144 visual tokens), Qwen2 decoder with M-RoPE. Stage 1
    trains the whole tower (merger included) on `Qwen2VLSceneObjective`; stage 2 trains the merger
    (Qwen2-VL's projector) with the decoder and keeps the rest of the tower frozen."""

    name = model_type = "qwen2_vl"
    prompt = PROMPT
    special_tokens = SPECIAL_TOKENS
    extra_special_tokens: ClassVar[dict[str, str]] = {
        "image_token": "<|image_pad|>",
        "video_token": "<|video_pad|>",
    }
    bos = False
    n_visual = N_VISUAL
    arch = ARCH
    quick_arch = QUICK_ARCH

    def model_class(self) -> type:
        from transformers import Qwen2VLForConditionalGeneration

        return Qwen2VLForConditionalGeneration

    def build_model(
        self, arch: Arch, vocab_size: int, attn: str = "sdpa", seed: int = 0
    ) -> nn.Module:
        cfg = qwen2_vl_config(arch, vocab_size, attn)
        torch.manual_seed(seed)
        return greedy_generation(self.model_class()(cfg))

    def build_processor(self, tokenizer) -> Any:
        return build_processor(tokenizer)

    def parts(self, model) -> dict[str, nn.Module]:
        return {
            "vision": self.frozen(model),
            "merger": model.model.visual.merger,
            "decoder": model.model.language_model,
        }

    def tower(self, model) -> nn.Module:
        return model.model.visual

    def frozen(self, model) -> nn.Module:
        visual = model.model.visual
        return nn.ModuleList([visual.patch_embed, visual.blocks])

    def objective(self, space: LabelSpace, model) -> nn.Module:
        cfg = model.config.vision_config
        return Qwen2VLSceneObjective(space, cfg.embed_dim, cfg.hidden_size)

    def pixel_transform(self, processor) -> nn.Module:
        return Qwen2VLPixels(byte_table(processor.image_processor))

    def vision(
        self,
        model,
        pixel_values: torch.Tensor,
        frozen: bool = False,
        project: bool = True,
    ) -> VisionOut:
        """`tower_forward`, then the merger (always: the stage-1 objective reads merged tokens too)."""
        visual = model.model.visual
        images = pixel_values.shape[0] // N_PATCHES
        with torch.no_grad() if frozen else contextlib.nullcontext():
            patches = tower_forward(visual, pixel_values, images)
        return VisionOut(self.project(model, patches), patches)

    @torch.no_grad()
    def frozen_features(self, model, pixel_values: torch.Tensor) -> torch.Tensor:
        """The last block's patch tokens [B, 576, embed_dim] (merge-window order)."""
        return tower_forward(
            model.model.visual, pixel_values, pixel_values.shape[0] // N_PATCHES
        )

    def project(self, model, features: torch.Tensor) -> torch.Tensor:
        """The merger: 2 x 2 patches -> one of the 144 visual tokens."""
        images = features.shape[0]
        return model.model.visual.merger(features.reshape(images * N_PATCHES, -1)).view(
            images, N_VISUAL, -1
        )

    def scene_loss(
        self,
        objective: nn.Module,
        out: VisionOut,
        cls: torch.Tensor,
        dense: torch.Tensor,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        return objective.loss(out.raw, out.tokens, cls, dense)

    def position_ids(
        self, model, rows: torch.Tensor, attention_mask: torch.Tensor
    ) -> torch.Tensor:
        return mrope_positions(rows, attention_mask, model.config.image_token_id)

    def visual_targets(self, heads: torch.Tensor) -> torch.Tensor:
        """A merged token is a target if any of its 4 patches is."""
        b, h, _ = heads.shape
        order = on_device("window_order", heads.device)
        return (
            heads[:, :, order]
            .reshape(b, h, N_VISUAL, MERGE * MERGE)
            .amax(-1)
            .contiguous()
        )


QWEN2_VL = Qwen2VLFamily()
