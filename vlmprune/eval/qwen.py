"""Qwen-VL helpers of the evaluation tools: a processor that loads without torchvision, and the
processor's patch layout both ways (pixels -> `pixel_values` rows, rows -> the picture the encoder saw).

- `load_processor(name, **kwargs)` is `AutoProcessor.from_pretrained`, except where that fails for a
  Qwen-VL checkpoint: transformers builds `Qwen2VLProcessor` (and the Qwen2.5-VL / Qwen3-VL ones)
  with a video processor, its video processors need torchvision (ImportError), and a processor
  saved for images only has none to load (OSError). The fallback is
  the same processor class without the video processor (`images_only`): its tokenizer, chat
  template and image processor load from the checkpoint as usual (the image processor on its PIL
  backend when torchvision is missing: `Qwen2VLImageProcessorPil`), so images and text give the
  same `input_ids`, `mm_token_type_ids`, `pixel_values` and `image_grid_thw`; only `videos=` is
  refused.
- `patchify` / `unpatchify`: Qwen's `pixel_values` hold, per image, one row per `patch` x `patch`
  px patch, in 2 x 2 merge windows taken in raster order (raster order inside a window); a row is
  (channel, frame, row, column) with the still image repeated over the `temporal` frames. One LLM
  token is one merge window: (patch * merge)^2 px of the resized image (28 x 28 px for 14 px
  patches), and the merger emits them in raster order over the (h / merge, w / merge) token grid.
"""

from __future__ import annotations

import functools
import inspect
import json
from pathlib import Path
from typing import Any

import torch


def load_processor(name: str, **kwargs: Any) -> Any:
    """`AutoProcessor.from_pretrained(name, **kwargs)`; for a Qwen-VL checkpoint whose processor
    cannot be built with its video processor (no torchvision for it, or none saved), the same
    processor for images only (`images_only`). Any other failure is raised as AutoProcessor raised it."""
    from transformers import AutoProcessor

    try:
        return AutoProcessor.from_pretrained(name, **kwargs)
    except (ImportError, OSError) as e:  # no torchvision; or no video processor saved (an images-only one)
        try:
            cls = processor_class(name, kwargs)
        except (OSError, ValueError):
            raise e from None
        if cls is None or "video_processor" not in inspect.signature(cls.__init__).parameters:
            raise
        try:
            return images_only(cls).from_pretrained(name, **kwargs)
        except (ImportError, OSError, ValueError, TypeError):
            raise e from None


def processor_class(name: str, kwargs: dict[str, Any]) -> type | None:
    """The processor class the checkpoint names (its processor or tokenizer config), else the one
    transformers maps its model type to; None if none."""
    import transformers
    from transformers import AutoConfig
    from transformers.models.auto.processing_auto import PROCESSOR_MAPPING_NAMES
    from transformers.utils import cached_file

    hub = {k: kwargs[k] for k in ("local_files_only", "revision", "token", "cache_dir") if k in kwargs}
    for filename in ("processor_config.json", "tokenizer_config.json"):
        path = cached_file(name, filename, _raise_exceptions_for_missing_entries=False,
                           _raise_exceptions_for_connection_errors=False, **hub)
        if path:
            named = json.loads(Path(path).read_text()).get("processor_class")
            if named:
                return getattr(transformers, named, None)
    model_type = AutoConfig.from_pretrained(name, **hub).model_type
    return getattr(transformers, PROCESSOR_MAPPING_NAMES.get(model_type) or "", None)


@functools.lru_cache(maxsize=None)
def images_only(cls: type) -> type:
    """`cls` (a processor taking image_processor, tokenizer, video_processor) without its video
    processor: `from_pretrained` then loads only the tokenizer, the image processor and the chat
    template. Named like `cls`, so `save_pretrained` records the ordinary processor class."""

    def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
        cls.__init__(self, image_processor, tokenizer, None, chat_template=chat_template, **kwargs)

    doc = f"{cls.__name__} for images only (no video processor: it needs torchvision)."
    return type(cls.__name__, (cls,), {"__init__": __init__, "__doc__": doc, "__module__": __name__})


def set_pixels(processor: Any, min_pixels: int | None = None, max_pixels: int | None = None) -> None:
    """Bound the pixels of each image a Qwen-VL processor makes (in place): its image processor
    resizes an image to whole 28 x 28 px blocks with min_pixels <= height x width <= max_pixels
    (`size` = {shortest_edge: min_pixels, longest_edge: max_pixels}), so these bound the visual
    tokens per image (pixels / 784). Set on the loaded processor, not passed to `from_pretrained`
    (from there they would reach every call as deprecated call-time arguments)."""
    import dataclasses

    ip = getattr(processor, "image_processor", None)
    size = getattr(ip, "size", None)
    if not hasattr(ip, "merge_size") or getattr(size, "longest_edge", None) is None:
        raise ValueError(f"min_pixels / max_pixels apply to Qwen-VL processors (pixels per image); "
                         f"{type(processor).__name__} does not take them")
    new = {"shortest_edge": min_pixels, "longest_edge": max_pixels}
    for key, value in new.items():
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
            raise ValueError(f"{'min_pixels' if key == 'shortest_edge' else 'max_pixels'} must be a positive int, "
                             f"got {value!r}")
    new = {k: v for k, v in new.items() if v is not None}
    size = dataclasses.replace(size, **new) if dataclasses.is_dataclass(size) else {**size, **new}
    if size["shortest_edge"] > size["longest_edge"]:
        raise ValueError(f"min_pixels {size['shortest_edge']} > max_pixels {size['longest_edge']}")
    ip.size = size


def patchify(images: torch.Tensor, patch: int = 14, merge: int = 2, temporal: int = 2) -> torch.Tensor:
    """[B, C, H, W] (H, W multiples of patch * merge) -> [B * H/patch * W/patch, C * temporal * patch^2]:
    the processor's `pixel_values` rows of B still images, image after image."""
    b, c, h, w = images.shape
    gh, gw = h // (patch * merge), w // (patch * merge)
    if gh * patch * merge != h or gw * patch * merge != w:
        raise ValueError(f"image of {w}x{h} px is not a whole number of {patch * merge} px tokens")
    x = images.reshape(b, c, gh, merge, patch, gw, merge, patch).permute(0, 2, 5, 3, 6, 1, 4, 7)  # b gh gw mh mw c ph pw
    x = x.unsqueeze(6).expand(*x.shape[:6], temporal, patch, patch)
    return x.reshape(b * gh * gw * merge * merge, c * temporal * patch * patch)


def unpatchify(rows: torch.Tensor, grid: tuple[int, int, int], patch: int = 14, merge: int = 2,
               temporal: int = 2) -> torch.Tensor:
    """One item's `pixel_values` rows with patch grid (t, h, w) -> its first frame [C, h * patch, w * patch]."""
    t, h, w = (int(v) for v in grid)
    c = rows.shape[-1] // (temporal * patch * patch)
    x = rows[: h * w].reshape(h // merge, w // merge, merge, merge, c, temporal, patch, patch)[..., 0, :, :]
    return x.permute(4, 0, 2, 5, 1, 3, 6).reshape(c, h * patch, w * patch)  # c gh mh ph gw mw pw
