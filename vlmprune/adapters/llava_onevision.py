"""LLaVA-OneVision family (`model_type == "llava_onevision"`): LLaVA-NeXT's any-resolution images
(`llava_next.py`) on a SigLIP tower (no CLS token: the attention methods read the mean attention
each patch receives) and a Qwen2 decoder, plus videos.

- Images as LLaVA-NeXT, with OneVision's two changes, both followed because the signals are packed
  by HF's own code: a crop grid larger than `vision_aspect_ratio` allows (`anyres_max_9`: about 9
  views of patches) is bilinearly downscaled, each token's signal with it; in a row with several
  images (`batch_num_images`) every image is its base view alone (one newline after it).
- Videos: every frame is one encoder image whose patch grid HF pools 2x2 (bilinear); a video's
  tokens are its frames' pooled tokens, frame by frame, then one `image_newline` (structure: kept,
  not counted). `keep` counts a video's tokens over all its frames; its grid stacks the frames as
  rows (t*h, w); each frame's attention row is one view (normalised per frame by default).
- Items are scored in the order the prompt holds them (images and videos interleaved)."""

from __future__ import annotations

import math
from typing import Any, ClassVar

import numpy as np
import torch

from vlmprune.adapters.base import Encoded, Prompt, register_adapter
from vlmprune.adapters.llava_next import PROVIDES, Item, LlavaNextAdapter
from vlmprune.adapters.qwen2_vl import prompt_order
from vlmprune.scorers.base import EncoderInfo


@register_adapter
class LlavaOnevisionAdapter(LlavaNextAdapter):
    """Vision-stage pruning for `LlavaOnevisionForConditionalGeneration` (any-resolution images and videos)."""

    model_types = ("llava_onevision",)
    model_classes = ("LlavaOnevisionForConditionalGeneration",)
    encoder_methods = ("get_image_features", "get_video_features")
    reference: ClassVar[dict[str, tuple[EncoderInfo, frozenset[str]]]] = {
        "llava_onevision": (
            EncoderInfo(num_layers=27, feature_layer=26, has_cls=False, grid=None),
            PROVIDES,
        )
    }
    fallbacks: ClassVar[dict[str, str]] = {
        "received_attn": "received attention (no CLS)"
    }

    def visual_token_ids(self) -> tuple[int, ...]:
        return (self.model.config.image_token_id, self.model.config.video_token_id)

    def has_visual_input(self, inputs: dict[str, Any]) -> bool:
        return (
            super().has_visual_input(inputs)
            or inputs.get("pixel_values_videos") is not None
            or (inputs.get("mm_encoder_outputs") or {}).get("video") is not None
        )

    def visual_input_names(self) -> tuple[str, ...]:
        return (
            *super().visual_input_names(),
            "pixel_values_videos",
            "image_sizes_videos",
            "vision_aspect_ratio",
            "batch_num_images",
        )

    # --- layout of the placeholder runs ----------------------------------------------------------
    def pack_options(self, inputs: dict[str, Any]) -> dict[str, Any]:
        aspect = (
            inputs.get("vision_aspect_ratio") or self.model.config.vision_aspect_ratio
        )
        return {"vision_aspect_ratio": aspect}

    def view_counts(self, inputs: dict[str, Any]) -> list[int]:
        """As LLaVA-NeXT, but an image in a row of several (`batch_num_images`) is its base view alone."""
        counts = super().view_counts(inputs)
        per_row = inputs.get("batch_num_images")
        if per_row is None:
            return counts
        alone = [n == 1 for n in per_row.tolist() for _ in range(n)]
        return [c if a else 1 for c, a in zip(counts, alone)]

    def video_items(self, inputs: dict[str, Any]) -> list[Item]:
        """Each video's `Item`: its frames' 2x2-pooled patch grids, then one newline."""
        videos, frames = inputs["pixel_values_videos"].shape[:2]
        h, w = (math.ceil(s / 2) for s in self.patches())
        newline = np.zeros(frames * h * w + 1, dtype=bool)
        newline[-1] = True
        return [Item(frames, newline, (frames * h, w)) for _ in range(videos)]

    def encoder_items(self, inputs: dict[str, Any]) -> list[Item]:
        return (
            self.video_items(inputs)
            if inputs.get("pixel_values_videos") is not None
            else self.image_items(inputs)
        )

    def pack_signal(
        self, x: torch.Tensor, items: list[Item], inputs: dict[str, Any]
    ) -> list[torch.Tensor]:
        if inputs.get("pixel_values_videos") is None:
            return super().pack_signal(x, items, inputs)
        pooled = self.model.model.apply_pooling(
            x
        )  # [videos * frames, h * w, C], as HF pools the features
        return list(pooled.reshape(len(items), -1, x.shape[-1]))

    # --- prefill ------------------------------------------------------------------------------
    def encode_images(self, inputs: dict[str, Any]) -> Any:
        return self.encode_kind(
            inputs,
            "image",
            "pixel_values",
            image_sizes=inputs.get("image_sizes"),
            vision_aspect_ratio=inputs.get("vision_aspect_ratio"),
            batch_num_images=inputs.get("batch_num_images"),
        )

    def encode_videos(self, inputs: dict[str, Any]) -> Any:
        return self.encode_kind(inputs, "video", "pixel_values_videos")

    def encode_kind(
        self, inputs: dict[str, Any], kind: str, pixels: str, **extra: Any
    ) -> Any:
        """`mm_encoder_outputs[kind]` where given (None: neither it nor pixels), else HF's
        `get_<kind>_features` on the `pixels` input with `extra`."""
        mm = inputs.get("mm_encoder_outputs") or {}
        if mm.get(kind) is not None or inputs.get(pixels) is None:
            return mm.get(kind)
        return getattr(self.encoder_owner(), f"get_{kind}_features")(
            **{pixels: inputs[pixels]},
            vision_feature_layer=inputs.get("vision_feature_layer"),
            vision_feature_select_strategy=inputs.get("vision_feature_select_strategy"),
            return_dict=True,
            **extra,
        )

    def encode(self, inputs: dict[str, Any], prompt: Prompt) -> Encoded:
        """Images and videos encoded (or taken from `mm_encoder_outputs`), newlines split off, in prompt order."""
        outputs = {
            kind: out
            for kind, out in (
                ("image", self.encode_images(inputs)),
                ("video", self.encode_videos(inputs)),
            )
            if out is not None
        }
        items_of = {
            "image": lambda: self.image_items(inputs),
            "video": lambda: self.video_items(inputs),
        }
        pairs = {
            kind: self.recorded(out.pooler_output, items_of[kind])
            for kind, out in outputs.items()
        }
        sizes = {
            kind: [len(item.newline) for _, item in p] for kind, p in pairs.items()
        }
        return self.encoded(
            prompt_order(prompt, self.visual_token_ids(), sizes), pairs, outputs
        )
