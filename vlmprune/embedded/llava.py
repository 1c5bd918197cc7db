"""The LLaVA-1.5 family of the embedded models' trainer (`--family llava`, the default; `shapes-llava`).

A CLIP ViT at 336 px / patch 14 (576 visual tokens plus CLS, features from layer -2, CLS dropped:
strategy "default"), a two-layer MLP projector and a small Llama decoder, with a `LlavaProcessor`.
Stage 1 trains the CLS token on the scene attributes (`SceneObjective`), so that its attention,
which `method="cls"` ranks by, gathers the objects. The recipe is `core`'s and `train`'s.
"""

from __future__ import annotations

import contextlib
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from vlmprune.embedded.core import (
    CLIP_MEAN,
    CLIP_STD,
    IMAGE_ID,
    IMAGE_SIZE,
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

PROMPT = "USER: <image>\n{question} ASSISTANT:"
SPECIAL_TOKENS = ("<pad>", "<s>", "</s>", "<unk>", "<image>")
N_VISUAL = (IMAGE_SIZE // PATCH_SIZE) ** 2  # 576
# Renders to exactly PROMPT for one user turn with one image, so a chat-template client (the sweep,
# lmms-eval) and a plain-prompt client see the same tokens.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'user' %}USER: "
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for c in message['content'] %}{% if c['type'] == 'image' %}<image>\n{% endif %}{% endfor %}"
    "{% for c in message['content'] %}{% if c['type'] == 'text' %}{{ c['text'] }}{% endif %}{% endfor %}"
    "{% endif %} "
    "{% elif message['role'] == 'assistant' %}ASSISTANT: "
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for c in message['content'] %}{% if c['type'] == 'text' %}{{ c['text'] }}{% endif %}{% endfor %}"
    "{% endif %}</s>"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)


def build_model(arch: Arch, vocab_size: int, attn: str = "sdpa", seed: int = 0):
    """A LLaVA-1.5-architecture model of `arch`'s sizes at 336 px / patch 14 (576 visual tokens)."""
    from transformers import LlavaForConditionalGeneration

    from vlmprune.eval.tiny import llava_config

    cfg = llava_config(
        image_size=IMAGE_SIZE,
        patch_size=PATCH_SIZE,
        vision_hidden=arch.vision_hidden,
        vision_layers=arch.vision_layers,
        vision_heads=arch.vision_heads,
        vision_intermediate=arch.vision_intermediate,
        text_hidden=arch.text_hidden,
        text_layers=arch.text_layers,
        text_heads=arch.text_heads,
        text_kv_heads=arch.text_kv_heads,
        text_intermediate=arch.text_intermediate,
        vocab_size=vocab_size,
        image_token_id=IMAGE_ID,
        strategy="default",
        feature_layer=-2,
        attn=attn,
    )
    cfg.text_config.max_position_embeddings = 1024
    torch.manual_seed(seed)
    return greedy_generation(LlavaForConditionalGeneration(cfg))


def build_processor(tokenizer):
    """`LlavaProcessor`: CLIP resize/crop to 336 + CLIP normalisation, one <image> -> 576 tokens."""
    from transformers import LlavaProcessor

    kwargs = {
        "size": {"shortest_edge": IMAGE_SIZE},
        "crop_size": {"height": IMAGE_SIZE, "width": IMAGE_SIZE},
        "image_mean": list(CLIP_MEAN),
        "image_std": list(CLIP_STD),
        "resample": 3,
    }
    try:
        from transformers import CLIPImageProcessor

        image_processor = CLIPImageProcessor(**kwargs)
    except (
        ImportError
    ):  # no torchvision: the PIL backend (same numbers, saved under the same type)
        from transformers.models.clip.image_processing_pil_clip import (
            CLIPImageProcessorPil,
        )

        image_processor = CLIPImageProcessorPil(**kwargs)
    return LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=PATCH_SIZE,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        chat_template=CHAT_TEMPLATE,
    )


class Normalise(nn.Module):
    """uint8 [B, H, W, 3] -> CLIP-normalised float [B, 3, H, W] (what the processor computes)."""

    def __init__(self):
        super().__init__()
        self.register_buffer(
            "mean", torch.tensor(CLIP_MEAN).view(1, 3, 1, 1) * 255.0, persistent=False
        )
        self.register_buffer(
            "std", torch.tensor(CLIP_STD).view(1, 3, 1, 1) * 255.0, persistent=False
        )

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = images.permute(0, 3, 1, 2).float()
        return (x - self.mean) / self.std


class SceneObjective(nn.Module):
    """Stage-1 heads on the LLaVA vision tower (thrown away after training) and their loss.

    - `cls_feat`: LayerNorm + linear on the CLS token **at the feature layer** (hidden_states[-2],
      the layer whose CLS attention `method="cls"` reads) -> the scene attributes (BCE);
    - `cls_last`: linear on the last layer's pooled (post-LayerNorm) CLS -> the same attributes, so
      the last block is trained too, as in CLIP;
    - `dense`: `DenseHeads` on the feature-layer patch tokens (the tokens the LLM sees).

    Stage 2 keeps this loss, weighted by `--aux-weight`, so the CLS token (which strategy "default"
    hides from the LLM) keeps its meaning while the tower is fine-tuned on QA."""

    def __init__(self, space: LabelSpace, dim: int):
        super().__init__()
        self.cls_feat = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, len(space)))
        self.cls_last = nn.Linear(dim, len(space))
        self.dense = DenseHeads(space, dim)

    def loss(
        self,
        feature_layer: torch.Tensor,
        pooled: torch.Tensor,
        cls_target: torch.Tensor,
        dense_target: torch.Tensor,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """feature_layer [B, 1 + N, D] (CLS first), pooled [B, D], cls_target [B, L] uint8,
        dense_target [B, DENSE_ROWS, N] uint8 (rows in `LabelSpace.dense` order)."""
        y = cls_target.float()
        logit_feat = self.cls_feat(feature_layer[:, 0]).float()
        logit_last = self.cls_last(pooled).float()
        bce = F.binary_cross_entropy_with_logits(
            logit_feat, y
        ) + F.binary_cross_entropy_with_logits(logit_last, y)
        ce, where = self.dense.loss(
            feature_layer[:, 1:],
            dense_target[:, :4].unbind(1),
            dense_target[:, 5:7].transpose(1, 2).float() / 255,
        )
        loss = 20.0 * bce + sum(ce.values()) / len(ce) + WHERE_WEIGHT * where
        with torch.no_grad():
            stats = {
                "cls_exact": ((logit_feat > 0) == (y > 0.5)).all(-1).float().mean(),
                "cls_bce": bce.detach() / 2,
                **{f"ce_{k}": v.detach() for k, v in ce.items()},
                "mse_where": where.detach(),
            }
        return loss, stats


class LlavaFamily(Family):
    """LLaVA-1.5: CLIP ViT with CLS (576 patch tokens at layer -2, CLS dropped), MLP projector, Llama
    decoder with 1-D RoPE (positions from the attention mask)."""

    name = model_type = "llava"
    prompt = PROMPT
    special_tokens = SPECIAL_TOKENS
    extra_special_tokens: ClassVar[dict[str, str]] = {"image_token": "<image>"}
    bos = True
    n_visual = N_VISUAL
    arch = Arch()
    quick_arch = QUICK_ARCH

    def model_class(self) -> type:
        from transformers import LlavaForConditionalGeneration

        return LlavaForConditionalGeneration

    def build_model(
        self, arch: Arch, vocab_size: int, attn: str = "sdpa", seed: int = 0
    ) -> nn.Module:
        return build_model(arch, vocab_size, attn, seed)

    def build_processor(self, tokenizer) -> Any:
        return build_processor(tokenizer)

    def parts(self, model) -> dict[str, nn.Module]:
        inner = model.model
        return {
            "vision": inner.vision_tower,
            "projector": inner.multi_modal_projector,
            "decoder": inner.language_model,
        }

    def tower(self, model) -> nn.Module:
        return model.model.vision_tower

    def frozen(self, model) -> nn.Module:
        return model.model.vision_tower

    def objective(self, space: LabelSpace, model) -> nn.Module:
        return SceneObjective(space, model.config.vision_config.hidden_size)

    def pixel_transform(self, processor) -> nn.Module:
        return Normalise()

    def vision(
        self,
        model,
        pixel_values: torch.Tensor,
        frozen: bool = False,
        project: bool = True,
    ) -> VisionOut:
        """Features of `vision_feature_layer` without CLS -> projector (strategy "default")."""
        inner = model.model
        with torch.no_grad() if frozen else contextlib.nullcontext():
            out = inner.vision_tower(
                pixel_values=pixel_values, output_hidden_states=True
            )
        feature_layer = out.hidden_states[model.config.vision_feature_layer]
        tokens = self.project(model, feature_layer[:, 1:]) if project else None
        return VisionOut(tokens, (feature_layer, out.pooler_output))

    @torch.no_grad()
    def frozen_features(self, model, pixel_values: torch.Tensor) -> torch.Tensor:
        """The feature layer's patch tokens (CLS dropped) [B, 576, vision_hidden]."""
        out = model.model.vision_tower(
            pixel_values=pixel_values, output_hidden_states=True
        )
        return out.hidden_states[model.config.vision_feature_layer][:, 1:]

    def project(self, model, features: torch.Tensor) -> torch.Tensor:
        return model.model.multi_modal_projector(features)

    def scene_loss(
        self,
        objective: nn.Module,
        out: VisionOut,
        cls: torch.Tensor,
        dense: torch.Tensor,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        return objective.loss(*out.raw, cls, dense)

    def position_ids(
        self, model, rows: torch.Tensor, attention_mask: torch.Tensor
    ) -> torch.Tensor:
        return (attention_mask.cumsum(-1) - 1).clamp(min=0)

    def visual_targets(self, heads: torch.Tensor) -> torch.Tensor:
        return heads


LLAVA = LlavaFamily()
