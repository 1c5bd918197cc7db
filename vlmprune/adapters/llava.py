"""LLaVA-1.5 family (`model_type == "llava"`): CLIP/SigLIP tower -> MLP projector -> Llama-style
decoder with 1-D RoPE. Each image gives a fixed number of visual tokens on a square grid."""

from __future__ import annotations

import contextlib
from typing import Any

import torch

from vlmprune.adapters.base import SIGNAL_NAMES, Adapter, register_adapter
from vlmprune.adapters.vit import Collected, SignalHooks
from vlmprune.scorers.base import EncoderInfo


def vit_layers(vision_tower: torch.nn.Module) -> torch.nn.ModuleList:
    """The encoder blocks of an HF ViT (CLIPVisionModel, SiglipVisionModel, ...)."""
    body = getattr(vision_tower, "vision_model", vision_tower)
    encoder = getattr(body, "encoder", None)
    layers = getattr(encoder, "layers", None) or getattr(encoder, "layer", None)
    if layers is None:
        raise ValueError(f"cannot find the encoder layers of vision tower {type(vision_tower).__name__}")
    return layers


def vit_has_cls(vision_tower: torch.nn.Module) -> bool:
    body = getattr(vision_tower, "vision_model", vision_tower)
    return hasattr(getattr(body, "embeddings", None), "class_embedding")


@register_adapter
class LlavaAdapter(Adapter):
    """Vision-stage pruning for `LlavaForConditionalGeneration`."""

    model_types = ("llava",)
    model_classes = ("LlavaForConditionalGeneration",)
    default_positions = "compact"
    reference = {"llava": (EncoderInfo(num_layers=24, feature_layer=22, has_cls=True, grid=(24, 24)),
                           frozenset({"features", "text_embeds", *SIGNAL_NAMES}))}

    @property
    def vision_tower(self) -> torch.nn.Module:
        return self.model.model.vision_tower

    def feature_layer(self) -> int:
        """0-based encoder layer whose output is the features (the last one, for a list)."""
        layer = self.model.config.vision_feature_layer
        layer = layer[-1] if isinstance(layer, (list, tuple)) else layer
        # hidden_states[j] is the output of encoder layer j - 1 (hidden_states[0] = embeddings)
        return layer % (len(vit_layers(self.vision_tower)) + 1) - 1

    def cls_offset(self, inputs: dict[str, Any] | None = None) -> int:
        strategy = (inputs or {}).get("vision_feature_select_strategy") or self.model.config.vision_feature_select_strategy
        return 1 if (strategy == "default" and vit_has_cls(self.vision_tower)) else 0

    def encoder_info(self) -> EncoderInfo:
        vc = self.model.config.vision_config
        side = vc.image_size // vc.patch_size
        layer = self.feature_layer()
        if layer < 0:
            raise ValueError("vlmprune: vision_feature_layer selects the patch embeddings; no encoder layer to score")
        return EncoderInfo(
            num_layers=len(vit_layers(self.vision_tower)),
            feature_layer=layer,
            has_cls=vit_has_cls(self.vision_tower),
            grid=(side, side),
        )

    def provides(self) -> set[str]:
        have = super().provides()
        return have if self.info.has_cls else have - {"cls_attn", "cls_value_attn"}

    def visual_token_id(self) -> int:
        return self.model.config.image_token_id

    def encoder_owner(self) -> torch.nn.Module:
        return self.model.model

    _hooks: SignalHooks | None = None  # made at the first encoder call (its taps are on only while it runs)

    @contextlib.contextmanager
    def collecting(self, inputs: dict[str, Any]):
        off = self.cls_offset(inputs)
        if self._hooks is None:
            self._hooks = SignalHooks(vit_layers(self.vision_tower), self.request)
        with self._hooks.capture(skip=off) as got:
            yield lambda out: signal_tables(got)

    def uninstall(self) -> None:
        super().uninstall()
        self._hooks = None  # its taps are off the modules already (they are on only during a capture)

    def encode_images(self, inputs: dict[str, Any]) -> Any:
        mm = inputs.get("mm_encoder_outputs") or {}
        if mm.get("image") is not None:
            return mm["image"]
        return self.encoder_owner().get_image_features(
            pixel_values=inputs["pixel_values"],
            vision_feature_layer=inputs.get("vision_feature_layer"),
            vision_feature_select_strategy=inputs.get("vision_feature_select_strategy"),
            image_sizes=inputs.get("image_sizes"),
            return_dict=True,
        )


def signal_tables(got: Collected) -> dict[str, dict[int, torch.Tensor]]:
    """The batched encoder signals by name (attention rows captured over the visual tokens only)."""
    return {
        "cls_attn": got.cls_attn,
        "cls_value_attn": got.cls_value_attn,
        "received_attn": got.received_attn,
        "keys": got.keys,
        "value_norms": got.value_norms,
        "vision_hidden": got.vision_hidden,
        "attn_graph": got.attn_graph,
    }
