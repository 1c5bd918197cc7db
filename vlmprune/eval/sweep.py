"""Pruning-ratio sweeps: every method x keep (or ratio) on a task, with one model load.

Pieces, each small enough to reuse:
- `VLM`: a model plus how to turn (images, prompts) into its inputs and tokens back into text, and
  what each image became (its visual-token count and grid, the picture the encoder saw)
  (`load_vlm("tiny" | "llava-7b-shapes" | "qwen2-vl-tiny" | "qwen2.5-vl-7b-shapes" | an embedded
  model | path or hub id)`). Qwen-VL inputs (`image_grid_thw` present) give each image its own
  token grid: one LLM token per 28 x 28 px block of the resized image (`vlmprune.eval.qwen`).
- `Task`: the items to evaluate (image, prompt, optional answer) and how to score an answer
  (`make_task(None | "shapes[:DIR]" | "shapes-two-turn[:DIR]" | "file.jsonl")`). In a two-turn task
  each item is a conversation: turn 1 (an image and a question) answered greedily, then turn 2
  (another image and question) on the same KV cache, scored on turn 2 (turn 1 recorded).
- `run_sweep`: runs the unpruned reference and every cell, writes `results.json` after each cell
  (a rerun skips finished cells), then `results.csv` and `accuracy_vs_tokens.png`. A method that
  does not run on the model (`flowcut` on Qwen-VL: no CLS token) is skipped, its one-line reason
  kept in `results.json["unsupported"]`.

The metric is exact-match accuracy when every item has an answer, otherwise fidelity (greedy
agreement with the unpruned model); first-token KL and agreement are recorded in both cases."""

from __future__ import annotations

import contextlib
import csv
import json
import math
import os
import platform
import re
import string
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from statistics import median
from typing import Any, Callable, Iterable, Protocol

import torch
from PIL import Image

import vlmprune
from vlmprune.eval import DEFAULT_METHODS, EMBEDDED_MODELS, SHAPES_DEFAULT_LIMIT
from vlmprune.eval.fidelity import Generation, agreement, eos_ids, first_token_kl, greedy
from vlmprune.eval.qwen import load_processor, patchify, unpatchify
from vlmprune.eval.tiny import PAD, left_pad, llava_7b_config, qwen2_5_vl_7b_config, tiny_llava, tiny_qwen
from vlmprune.eval.visualise import overlay_grid, plot_sweep

# "tiny": LLaVA-1.5's visual token count (336 px / patch 14 = 24 x 24 = 576) at a small width,
# with a decoder heavier than the vision tower, as in the real model. Runs in seconds on a CPU.
TINY = dict(
    image_size=336, patch_size=14, vision_hidden=64, vision_layers=2, vision_heads=4,
    text_hidden=256, text_layers=4, text_heads=4, text_kv_heads=2, text_intermediate=704,
)
# "qwen2-vl-tiny": the same widths as a Qwen2-VL (14 px patches, 2x2 merge). Qwen's random models
# take QWEN_SIDE px images: 24 x 24 = 576 visual tokens, LLaVA-1.5's count (2,304 encoder patches).
TINY_QWEN = dict(
    patch_size=14, vision_hidden=64, vision_layers=2, vision_heads=4,
    text_hidden=256, text_layers=4, text_heads=4, text_kv_heads=2, text_intermediate=704,
)
QWEN_SIDE = 672
RANDOM_MODELS = ("tiny", "llava-7b-shapes", "qwen2-vl-tiny", "qwen2.5-vl-7b-shapes")  # random weights, no processor
BUILTIN_MODELS = RANDOM_MODELS + tuple(EMBEDDED_MODELS)
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32,
          "bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
DEFAULT_PROMPT = "Describe the image."


# --- models ----------------------------------------------------------------------------------
class VLM:
    """A model built from a config, with a byte-level stand-in tokenizer: the prompt is
    [BOS] + one image-token run + the prompt's bytes; images are resized to the encoder's size.

    What every VLM tells about its inputs (the sweep, `show` and the benchmark rely on these):
    `visual_counts` (each image's visual tokens), `token_grid` (an image's grid of visual tokens)
    and `view` (the picture the encoder saw). With Qwen-VL inputs (`image_grid_thw` present) each
    image has its own grid, read off `image_grid_thw`; otherwise every image has `n_visual` tokens
    on the encoder's square patch grid (plus a leading CLS with `vision_feature_select_strategy="full"`)."""

    mean = std = (0.5, 0.5, 0.5)

    def __init__(self, name: str, model: torch.nn.Module):
        self.name = name
        self.model = model
        self._n_visual: int | None = None

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    @property
    def image_size(self) -> int:
        """Side (px) of the images `n_visual` counts and the benchmark feeds."""
        return self.model.config.vision_config.image_size

    @property
    def image_token_id(self) -> int:
        return self.model.config.image_token_id

    @property
    def n_visual(self) -> int:
        """Visual tokens per image, counted in the inputs of one blank `image_size` image."""
        if self._n_visual is None:
            inputs = self.inputs([Image.new("RGB", (self.image_size, self.image_size))], ["x"])
            self._n_visual = int((inputs["input_ids"] == self.image_token_id).sum())
            if self.anyres(inputs):  # the placeholders count the newlines too
                self._n_visual = self.anyres_counts(inputs, [self._n_visual])[0][0]
        return self._n_visual

    @property
    def merge(self) -> int | None:
        """Qwen-VL's spatial merge (2: one LLM token per 2x2 encoder patches); None for other families."""
        return getattr(self.model.config.vision_config, "spatial_merge_size", None)

    def visual_counts(self, inputs: dict[str, torch.Tensor]) -> list[list[int]]:
        """[row][image] visual tokens of each image of `inputs`, unpruned."""
        per_row = (inputs["input_ids"] == self.image_token_id).sum(1).tolist()
        thw = inputs.get("image_grid_thw")
        if self.anyres(inputs):
            return self.anyres_counts(inputs, per_row)
        if thw is None:
            n = self.n_visual
            return [[n] * (int(c) // n) for c in per_row]
        sizes = iter((thw.prod(-1) // self.merge**2).tolist())
        out = []
        for c in per_row:
            row: list[int] = []
            while sum(row) < c:
                row.append(int(next(sizes)))
            if sum(row) != c:
                raise ValueError(f"image_grid_thw {thw.tolist()} does not match the image tokens per row {per_row}")
            out.append(row)
        return out

    def anyres(self, inputs: dict[str, torch.Tensor]) -> bool:
        """Any-resolution images (LLaVA-NeXT / OneVision: base view + crops + newlines)."""
        return inputs.get("image_sizes") is not None and bool(getattr(self.model.config, "image_grid_pinpoints", None))

    def anyres_counts(self, inputs: dict[str, torch.Tensor], per_row: list[int]) -> list[list[int]]:
        """LLaVA-NeXT / OneVision: [row][image] visual tokens, newlines excluded: HF's own packing
        (the adapter's `pack`) of zero features per view with a newline of ones; an image's
        placeholder run is its packed length, its visual tokens the zeros."""
        adapter = self.model.__dict__.get("_vlmprune_adapter")
        if adapter is None:  # an unpatched model (the reference cell): its adapter for the layout alone
            with vlmprune.pruning(self.model, "random", keep=1):
                return self.anyres_counts(inputs, per_row)
        host = {**inputs, "image_sizes": inputs["image_sizes"].cpu()}
        h, w = adapter.patches()
        views = [torch.zeros(v, h * w, 1) for v in adapter.view_counts(host)]
        packed = adapter.pack(views, host, torch.ones(1))
        runs, counts = iter(len(p) for p in packed), iter(int((p == 0).sum()) for p in packed)
        out = []
        for c in per_row:
            row, length = [], 0
            while length < c:
                length += next(runs)
                row.append(next(counts))
            out.append(row)
        return out

    def token_grid(self, inputs: dict[str, torch.Tensor], i: int = 0) -> tuple[int, int]:
        """(rows, columns) of image `i`'s visual tokens: Qwen-VL's (t * h / merge, w / merge) from its
        `image_grid_thw` row, else the encoder's patch grid (image_size / patch_size square)."""
        thw = inputs.get("image_grid_thw")
        if thw is not None:
            t, h, w = thw[i].tolist()
            return t * h // self.merge, w // self.merge
        vc = self.model.config.vision_config
        n = vc.image_size // vc.patch_size
        return n, n

    def pixels(self, images: list[Image.Image], size: int | None = None) -> torch.Tensor:
        """[B, 3, S, S] normalised pixel values (S = `size`, default `image_size`)."""
        s = size or self.image_size
        arr = torch.stack([torch.frombuffer(bytearray(im.resize((s, s), Image.BICUBIC).tobytes()), dtype=torch.uint8)
                           for im in images]).view(len(images), s, s, 3)
        x = arr.permute(0, 3, 1, 2).float() / 255.0
        return (x - torch.tensor(self.mean)[:, None, None]) / torch.tensor(self.std)[:, None, None]

    def text_ids(self, prompt: str) -> list[int]:
        """The prompt's bytes as token ids, clear of the special ids (pad, BOS, EOS, placeholders)."""
        cfg = self.model.config
        vocab = cfg.text_config.vocab_size
        reserved = {PAD, 1, 2, *(getattr(cfg, k, None) for k in (
            "image_token_id", "video_token_id", "vision_start_token_id", "vision_end_token_id"))}
        text = [3 + b % (min(vocab, 256) - 4) for b in prompt.encode()]
        return [t if t not in reserved else 3 for t in text]

    def token_ids(self, prompt: str) -> list[int]:
        n = self.model.config.vision_config.image_size // self.model.config.vision_config.patch_size
        extra = int(self.model.config.vision_feature_select_strategy == "full")
        return [1] + [self.image_token_id] * (n * n + extra) + self.text_ids(prompt)

    def inputs(self, images: list[Image.Image], prompts: list[str]) -> dict[str, torch.Tensor]:
        """Model inputs for one image per prompt, left-padded, on the model's device."""
        ids, mask = left_pad([self.token_ids(p) for p in prompts])
        pv = self.pixels([im.convert("RGB") for im in images])
        return {"input_ids": ids.to(self.device), "attention_mask": mask.to(self.device),
                "pixel_values": pv.to(self.device, self.dtype)}

    def decode(self, tokens: list[int]) -> str:
        return " ".join(str(t) for t in tokens)

    def view(self, inputs: dict[str, torch.Tensor], i: int = 0) -> Image.Image:
        """Image `i` of `inputs` as the encoder sees it (de-normalised; a video's first frame)."""
        pv = inputs["pixel_values"]
        thw = inputs.get("image_grid_thw")
        if thw is None:
            x = pv[i]
        else:
            vc = self.model.config.vision_config
            start = int(thw[:i].prod(-1).sum())
            x = unpatchify(pv[start:], thw[i].tolist(), vc.patch_size, vc.spatial_merge_size, vc.temporal_patch_size)
        mean = torch.tensor(self.mean)[:, None, None]
        std = torch.tensor(self.std)[:, None, None]
        x = (x.detach().float().cpu() * std + mean) * 255.0
        arr = x.round().clamp(0, 255).to(torch.uint8).permute(1, 2, 0).contiguous()
        return Image.fromarray(arr.numpy(), "RGB")

    def image_features(self, inputs: dict[str, torch.Tensor]) -> Any:
        """The unpatched encoder + projector on the images of `inputs` (`get_image_features`)."""
        extra = {"image_grid_thw": inputs["image_grid_thw"]} if inputs.get("image_grid_thw") is not None else {}
        return self.model.model.get_image_features(pixel_values=inputs["pixel_values"], **extra, return_dict=True)


class QwenVLM(VLM):
    """A Qwen-VL model built from a config, with the byte-level stand-in tokenizer: the prompt is
    [vision start] + one image's placeholders + [vision end] + the prompt's bytes; images are
    resized to `side` px (a whole number of patch x merge px tokens) and laid out as Qwen's
    processor lays them out (`qwen.patchify`), with `image_grid_thw` and `mm_token_type_ids`."""

    def __init__(self, name: str, model: torch.nn.Module, side: int = QWEN_SIDE):
        super().__init__(name, model)
        self.side = side

    @property
    def image_size(self) -> int:
        return self.side

    def grid(self) -> int:
        """Encoder patches per side of an image."""
        return self.side // self.model.config.vision_config.patch_size

    def token_ids(self, prompt: str) -> list[int]:
        cfg = self.model.config
        n = (self.grid() // self.merge) ** 2
        placeholders = [cfg.vision_start_token_id] + [cfg.image_token_id] * n + [cfg.vision_end_token_id]
        return placeholders + self.text_ids(prompt)

    def inputs(self, images: list[Image.Image], prompts: list[str]) -> dict[str, torch.Tensor]:
        vc = self.model.config.vision_config
        ids, mask = left_pad([self.token_ids(p) for p in prompts])
        pixels = self.pixels([im.convert("RGB") for im in images])
        pv = patchify(pixels, vc.patch_size, self.merge, vc.temporal_patch_size)
        g = self.grid()
        return {"input_ids": ids.to(self.device), "attention_mask": mask.to(self.device),
                "mm_token_type_ids": (ids == self.image_token_id).int().to(self.device),
                "pixel_values": pv.to(self.device, self.dtype),
                "image_grid_thw": torch.tensor([[1, g, g]] * len(images), device=self.device)}


class HFVLM(VLM):
    """A pretrained model with its own processor (chat template when it has one)."""

    def __init__(self, name: str, model: torch.nn.Module, processor: Any):
        super().__init__(name, model)
        self.processor = processor
        processor.tokenizer.padding_side = "left"
        ip = getattr(processor, "image_processor", None)
        self.mean = tuple(getattr(ip, "image_mean", None) or (0.0, 0.0, 0.0))
        self.std = tuple(getattr(ip, "image_std", None) or (1.0, 1.0, 1.0))

    @property
    def image_size(self) -> int:
        """The encoder's input size; for Qwen-VL (any size), the side the processor keeps up to
        `QWEN_SIDE` px: sqrt(max_pixels) in 28 px steps (336 for `shapes-qwen2-vl`, which fixes it)."""
        vc = self.model.config.vision_config
        if getattr(vc, "image_size", None):
            return vc.image_size
        ip = self.processor.image_processor
        size = getattr(ip, "size", None)
        largest = getattr(size, "longest_edge", None) or getattr(ip, "max_pixels", None)
        step = vc.patch_size * vc.spatial_merge_size
        return max(step, min(QWEN_SIDE, math.isqrt(int(largest or QWEN_SIDE**2))) // step * step)

    def text(self, prompt: str) -> str:
        return chat_text(self.processor, prompt)

    def inputs(self, images: list[Image.Image], prompts: list[str]) -> dict[str, torch.Tensor]:
        batch = self.processor(images=[im.convert("RGB") for im in images], text=[self.text(p) for p in prompts],
                               return_tensors="pt", padding=True)
        return {k: (v.to(self.device, self.dtype) if v.is_floating_point() else v.to(self.device))
                for k, v in batch.items() if isinstance(v, torch.Tensor)}

    def decode(self, tokens: list[int]) -> str:
        return self.processor.tokenizer.decode(tokens, skip_special_tokens=True).strip()


def chat_text(processor: Any, prompt: str, n_images: int = 1) -> str:
    """One user turn of `n_images` images then `prompt`, through the processor's chat template
    (LLaVA-1.5's plain "USER: <image>\\n... ASSISTANT:" format when it has none)."""
    if getattr(processor, "chat_template", None):
        content = [{"type": "image"}] * n_images + [{"type": "text", "text": prompt}]
        return processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)
    images = ((getattr(processor, "image_token", None) or "<image>") + "\n") * n_images
    return f"USER: {images}{prompt} ASSISTANT:"


def resolve_device(device: str) -> torch.device:
    """'auto' -> cuda when available, else cpu."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} requested but CUDA is not available; use --device cpu")
    return torch.device(device)


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """'auto' -> bf16 on CUDA, fp32 elsewhere."""
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; choose one of {['auto', *DTYPES]}")
    return DTYPES[dtype]


def build_on(device: torch.device, dtype: torch.dtype, build: Callable[[], torch.nn.Module]) -> torch.nn.Module:
    """Construct a model with parameters created directly on `device` in `dtype`."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with device:
            return build().eval()
    finally:
        torch.set_default_dtype(old)


def embedded_path(name: str) -> Path:
    """The folder of an embedded model (`EMBEDDED_MODELS`)."""
    return Path(__file__).parent / "assets" / EMBEDDED_MODELS[name]


def load_vlm(name: str = "tiny", device: str = "auto", dtype: str = "auto", attn: str = "sdpa") -> VLM:
    """Random weights built from a config: 'tiny' (LLaVA, 576 visual tokens, small width),
    'llava-7b-shapes' (LLaVA-1.5-7B shapes), 'qwen2-vl-tiny' (Qwen2-VL, small width) and
    'qwen2.5-vl-7b-shapes' (Qwen2.5-VL-7B shapes), the Qwen ones on `QWEN_SIDE` px images (576
    visual tokens); or an embedded trained model ('shapes-llava', 'shapes-qwen2-vl'), a local
    directory or a hub id, loaded with its processor (`qwen.load_processor`: without torchvision a
    Qwen-VL processor loads for images only)."""
    if name in EMBEDDED_MODELS:
        return load_vlm(str(embedded_path(name)), device, dtype, attn)
    dev = resolve_device(device)
    dt = resolve_dtype(dtype, dev)
    if name == "tiny":
        return VLM(name, build_on(dev, dt, lambda: tiny_llava(attn=attn, **TINY)))
    if name == "qwen2-vl-tiny":
        return QwenVLM(name, build_on(dev, dt, lambda: tiny_qwen("qwen2_vl", attn=attn, **TINY_QWEN)))
    if name in ("llava-7b-shapes", "qwen2.5-vl-7b-shapes"):
        from transformers import LlavaForConditionalGeneration, Qwen2_5_VLForConditionalGeneration

        if name == "llava-7b-shapes":
            model = build_on(dev, dt, lambda: LlavaForConditionalGeneration(llava_7b_config(attn)))
        else:
            model = build_on(dev, dt, lambda: Qwen2_5_VLForConditionalGeneration(qwen2_5_vl_7b_config(attn)))
        model.generation_config.pad_token_id = PAD
        return VLM(name, model) if name == "llava-7b-shapes" else QwenVLM(name, model)
    if not Path(name).is_dir() and not re.fullmatch(r"[\w.-]+/[\w.-]+", name):
        raise ValueError(f"unknown model {name!r}; use one of {list(BUILTIN_MODELS)}, a local model directory "
                         f"or a hub id 'org/name'")
    from transformers import AutoModelForImageTextToText

    try:
        processor = load_processor(name)
        model = AutoModelForImageTextToText.from_pretrained(name, dtype=dt, attn_implementation=attn).to(dev).eval()
    except (OSError, ValueError) as e:
        raise ValueError(f"cannot load model {name!r}: {str(e).splitlines()[0]}") from e
    vlmprune.adapters.find_adapter(model)  # unsupported family: a clear error before any work
    return HFVLM(name, model, processor)


# --- tasks -----------------------------------------------------------------------------------
@dataclass
class Item:
    """One evaluation item. `image` is a PIL image or a path opened when the item is loaded."""

    id: str
    image: Any
    prompt: str
    answer: str | None = None
    then: Item | None = None  # the conversation's next turn (two-turn tasks), asked on the same KV cache


class Task(Protocol):
    """What a sweep evaluates: items, and the score of a prediction against an answer."""

    name: str

    def items(self) -> list[Item]: ...

    def score(self, prediction: str, answer: str) -> float: ...


def normalise(text: str) -> str:
    """Lower-case, drop punctuation and articles, collapse spaces (VQA-style)."""
    text = text.lower().translate(str.maketrans("", "", string.punctuation))
    return " ".join(w for w in text.split() if w not in ("a", "an", "the"))


def exact_match(prediction: str, answer: str) -> float:
    """1.0 when the normalised prediction equals the normalised answer."""
    return float(normalise(prediction) == normalise(answer))


@dataclass
class ItemsTask:
    """A task over a fixed list of items, scored by `scorer`."""

    name: str
    item_list: list[Item]
    scorer: Callable[[str, str], float] = exact_match

    def items(self) -> list[Item]:
        return self.item_list

    def score(self, prediction: str, answer: str) -> float:
        return float(self.scorer(prediction, answer))


def random_images(limit: int, size: int = 336, seed: int = 0, prompt: str = DEFAULT_PROMPT) -> ItemsTask:
    """`limit` seeded noise images with one prompt and no answers (the fidelity task)."""
    def image(i: int) -> Image.Image:
        g = torch.Generator().manual_seed(seed * 100003 + i)
        arr = torch.randint(0, 256, (size // 16, size // 16, 3), generator=g, dtype=torch.uint8)
        return Image.fromarray(arr.numpy(), "RGB").resize((size, size), Image.BILINEAR)

    return ItemsTask("random-images", [Item(f"random-{i}", image(i), prompt) for i in range(limit)])


def jsonl_task(path: str | Path, limit: int | None = None) -> ItemsTask:
    """Lines of {"image": path (relative to the file), "question": ..., "answer": optional}."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"data file {str(path)!r} does not exist")
    items = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            image, question = row["image"], row["question"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise ValueError(f"{path}:{n}: expected a JSON object with 'image' and 'question' ({e})") from e
        answer, item_id = row.get("answer"), str(row.get("id", n))
        if any(it.id == item_id for it in items):
            raise ValueError(f"{path}:{n}: duplicate id {item_id!r}")
        items.append(Item(item_id, path.parent / image, question, None if answer is None else str(answer)))
        if limit is not None and len(items) >= limit:
            break
    return ItemsTask(path.stem, items)


def shapes_task(directory: str | None, limit: int | None) -> ItemsTask:
    """The embedded synthetic benchmark (`vlmprune.eval.shapes`): a saved split, or test-split items."""
    from vlmprune.eval import shapes

    if directory:
        objs = shapes.load_split(directory)
    else:
        objs = [shapes.make_item(s) for s in shapes.split_seeds("test", limit or SHAPES_DEFAULT_LIMIT)]
    objs = list(objs)[:limit] if limit is not None else list(objs)
    items = [Item(str(getattr(o, "id", i)), o.image, o.question, o.answer) for i, o in enumerate(objs)]
    return ItemsTask("shapes", items, shapes.score)


def two_turn_task(directory: str | None, limit: int | None) -> ItemsTask:
    """The shapes benchmark as two-turn conversations: items 2i and 2i+1 of `shapes_task` are turn 1
    and turn 2 of conversation i (`limit` conversations); pruning is known to degrade in multi-turn
    dialogue (LLMC+, 2025): turn 2's image is pruned on a cache that holds turn 1's pruned image."""
    single = shapes_task(directory, 2 * (limit or SHAPES_DEFAULT_LIMIT))
    pairs = [replace(a, id=f"{a.id}+{b.id}", then=b) for a, b in zip(single.item_list[::2], single.item_list[1::2])]
    return ItemsTask("shapes-two-turn", pairs[:limit] if limit is not None else pairs, single.scorer)


def default_data(model: str) -> str | None:
    """The task a sweep runs when none is given: the embedded benchmark for a model trained on it,
    random images (fidelity only) for any other."""
    return "shapes" if model in EMBEDDED_MODELS else None


def make_task(data: str | None, limit: int | None) -> Task:
    """None -> random images (fidelity); 'shapes' or 'shapes:DIR'; 'shapes-two-turn[:DIR]'; or a JSONL file."""
    if data is None:
        return random_images(limit or 8)
    if data == "shapes-two-turn" or data.startswith("shapes-two-turn:"):
        return two_turn_task(data.partition(":")[2] or None, limit)
    if data == "shapes" or data.startswith("shapes:"):
        return shapes_task(data.partition(":")[2] or None, limit)
    return jsonl_task(data, limit)


def load_image(image: Any) -> Image.Image:
    """An RGB PIL image from a PIL image or a path (decoded now, so failures surface here)."""
    if isinstance(image, Image.Image):
        return image.convert("RGB")
    with Image.open(image) as im:
        return im.convert("RGB")


# --- cells -----------------------------------------------------------------------------------
@dataclass(frozen=True)
class Cell:
    """One configuration of the sweep; `method=None` is the unpruned reference."""

    method: str | None = None
    keep: int | None = None
    ratio: float | None = None

    @property
    def key(self) -> str:
        if self.method is None:
            return "unpruned"
        return f"{self.method}@keep={self.keep}" if self.keep is not None else f"{self.method}@ratio={self.ratio}"

    def patch_kwargs(self) -> dict[str, Any]:
        return {"keep": self.keep} if self.keep is not None else {"prune_ratio": self.ratio}

    def kept(self, n: int) -> int:
        """Visual tokens kept per image of n tokens."""
        if self.method is None:
            return n
        return min(n, self.keep) if self.keep is not None else min(n, round(n * (1 - self.ratio)))


DEFAULT_KEEP_FRACTIONS = (1, 1 / 3, 2 / 9, 1 / 9)  # of the visual tokens per image: 576, 192, 128, 64 for LLaVA-1.5


def default_keeps(n_visual: int) -> list[int]:
    """The keep values of a sweep given none: all, 1/3, 2/9 and 1/9 of the model's visual tokens per
    image (576, 192, 128, 64 for LLaVA-1.5; 144, 48, 32, 16 for `shapes-qwen2-vl`)."""
    return list(dict.fromkeys(max(1, round(n_visual * f)) for f in DEFAULT_KEEP_FRACTIONS))


def make_cells(methods: list[str], keeps: list[int] | None = None, ratios: list[float] | None = None) -> list[Cell]:
    """methods x keeps (or x ratios), in order."""
    if (keeps is None) == (ratios is None):
        raise ValueError("give exactly one of keep values and prune ratios")
    if keeps is not None:
        return [Cell(m, keep=k) for m in methods for k in keeps]
    return [Cell(m, ratio=r) for m in methods for r in ratios]


def check_cells(vlm: VLM, cells: list[Cell]) -> dict[str, str]:
    """Bad methods / amounts fail here, before any work; then each method is patched and unpatched
    once: a method that does not run on this model (e.g. `flowcut`, which needs a CLS token, on
    Qwen-VL) is returned as method -> its one-line error, for the sweep to skip and report."""
    from vlmprune.config import make_config

    for cell in cells:
        make_config(cell.method, **cell.patch_kwargs())
    unsupported: dict[str, str] = {}
    for cell in cells:
        if cell.method in unsupported:
            continue
        try:
            with vlmprune.pruning(vlm.model, cell.method, **cell.patch_kwargs()):
                pass
        except ValueError as e:  # the arguments are valid (make_config): the model cannot run the method
            unsupported[cell.method] = " ".join(str(e).split())
    return unsupported


@dataclass
class Loaded:
    """An item with its decoded image, or the error that loading it raised."""

    item: Item
    image: Image.Image | None = None
    error: str | None = None
    then_image: Image.Image | None = None  # the next turn's (two-turn tasks)


def load_items(items: Iterable[Item]) -> list[Loaded]:
    """Decode every item's image once; failures are kept as errors."""
    out = []
    for it in items:
        try:
            out.append(Loaded(it, load_image(it.image), then_image=load_image(it.then.image) if it.then else None))
        except Exception as e:  # noqa: BLE001 -- a bad item is recorded, the sweep goes on
            out.append(Loaded(it, error=f"{type(e).__name__}: {e}"))
    return out


@dataclass
class Outputs:
    """What a cell produced: one record per item (JSON), per-batch timings, and the raw outputs
    (first-token logits, greedy tokens) kept in memory for the reference comparison."""

    records: list[dict[str, Any]] = field(default_factory=list)
    batches: list[dict[str, Any]] = field(default_factory=list)
    raw: dict[str, tuple[torch.Tensor, list[int]]] = field(default_factory=dict)


def run_batch(vlm: VLM, batch: list[Loaded], max_new_tokens: int
              ) -> tuple[Generation, list[list[int]], list[int], list[list[int]] | None]:
    """Greedy generation on one batch; the kept visual tokens per image and the prefill length
    (real tokens, after pruning) of each row; with two-turn items, of turn 2, and turn 1's answers."""
    if batch[0].item.then is not None:
        return run_two_turns(vlm, batch, max_new_tokens)
    inputs = vlm.inputs([b.image for b in batch], [b.item.prompt for b in batch])
    gen = greedy(vlm.model, inputs, max_new_tokens)
    kept, lengths = kept_and_lengths(vlm, inputs, inputs["attention_mask"])
    return gen, kept, lengths, None


def kept_and_lengths(vlm: VLM, inputs: dict[str, torch.Tensor], mask: torch.Tensor) -> tuple[list[list[int]], list[int]]:
    """Each row's kept visual tokens per image in the latest prefill of `inputs`, and its real tokens
    after pruning (`mask`: the attention mask of the prefill's own tokens)."""
    counts = vlm.visual_counts(inputs)
    if vlmprune.is_patched(vlm.model):
        kept = [[len(s) for s in row] for row in vlmprune.last_selection(vlm.model)]
    else:
        kept = counts
    lengths = [int(t) - sum(n - k for n, k in zip(ns, ks)) for t, ns, ks in zip(mask.sum(1).tolist(), counts, kept)]
    return kept, lengths


def run_two_turns(vlm: VLM, batch: list[Loaded], max_new_tokens: int
                  ) -> tuple[Generation, list[list[int]], list[int], list[list[int]]]:
    """Turn 1 (each item's image and question) answered greedily, then turn 2 (`item.then`) generated
    on the same KV cache: its new tokens are turn 1's last answer token (not cached yet; EOS added
    where the answer did not end), then turn 2's prompt (without BOS), and its mask spans the whole
    conversation (0 after each answer's EOS, where generate() padded the finished rows)."""
    from transformers import DynamicCache

    first = vlm.inputs([b.image for b in batch], [b.item.prompt for b in batch])
    cache = DynamicCache()
    gen1 = greedy(vlm.model, {**first, "cache": cache}, max_new_tokens)
    second = vlm.inputs([b.then_image for b in batch], [b.item.then.prompt for b in batch])
    eos, bos = min(eos_ids(vlm.model)), vlm.model.generation_config.bos_token_id
    steps = gen1.forwards  # generated columns; the cache holds all but the last
    rows, answered, late = [], [], []
    for r, answer in enumerate(gen1.tokens):
        n = len(answer)  # the answer's EOS (if any) is column n
        last = answer[steps - 1] if n >= steps else (eos if n == steps - 1 else PAD)
        prompt = second["input_ids"][r][second["attention_mask"][r].bool()].tolist()
        rows.append([last] + [eos] * (n >= steps) + prompt[int(prompt[:1] == [bos]):])
        answered.append([int(j <= n) for j in range(steps - 1)])
        late.append(n < steps - 1)  # the last column is padding after the answer
    ids, mask = left_pad(rows)
    for r, row in enumerate(rows):
        mask[r, ids.shape[1] - len(row)] = int(not late[r])
    call = {k: v for k, v in second.items() if k not in ("input_ids", "attention_mask", "mm_token_type_ids")}
    whole = torch.cat([first["attention_mask"], torch.tensor(answered, dtype=torch.long).view(len(rows), -1).to(vlm.device),
                       mask.to(vlm.device)], 1)
    call.update(input_ids=ids.to(vlm.device), attention_mask=whole, cache=cache)
    gen2 = greedy(vlm.model, call, max_new_tokens)
    kept, lengths = kept_and_lengths(vlm, call, mask)
    return gen2, kept, lengths, gen1.tokens


def run_cell(vlm: VLM, loaded: list[Loaded], batch_size: int, max_new_tokens: int,
             advance: Callable[[], None] = lambda: None) -> Outputs:
    """Generate for every item in batches (after one untimed warm-up item); a failing batch is
    retried item by item and a failing item is recorded with its error."""
    out = Outputs()
    for lo in loaded:
        if lo.error:
            out.records.append({"id": lo.item.id, "error": lo.error})
    good = [lo for lo in loaded if not lo.error]
    if good:  # untimed first call: one-off costs (kernel compilation, allocator) stay out of the timings
        with contextlib.suppress(Exception):
            run_batch(vlm, good[:1], 1)
    for start in range(0, len(good), batch_size):
        batch = good[start:start + batch_size]
        for part in attempt(vlm, batch, max_new_tokens, out):
            out.records.append({"id": part.item.id, "error": part.error})
        advance()
    order = {lo.item.id: i for i, lo in enumerate(loaded)}
    out.records.sort(key=lambda r: order[r["id"]])
    return out


def attempt(vlm: VLM, batch: list[Loaded], max_new_tokens: int, out: Outputs) -> list[Loaded]:
    """Run `batch` into `out`; returns the items that failed even alone (with their error)."""
    try:
        gen, kept, lengths, turn1 = run_batch(vlm, batch, max_new_tokens)
    except Exception as e:  # noqa: BLE001 -- isolate the failing item, record it, go on
        if len(batch) == 1:
            return [Loaded(batch[0].item, error=f"{type(e).__name__}: {e}")]
        return [bad for lo in batch for bad in attempt(vlm, [lo], max_new_tokens, out)]
    out.batches.append({"size": len(batch), "prefill_ms": 1e3 * gen.prefill_s, "ttft_ms": 1e3 * gen.ttft_s,
                        "prefill_len": gen.prefill_len})
    for i, lo in enumerate(batch):
        out.raw[lo.item.id] = (gen.first_logits[i], gen.tokens[i])
        record = {"id": lo.item.id, "prediction": vlm.decode(gen.tokens[i]), "answer": lo.item.answer,
                  "visual_tokens": kept[i], "prefill_tokens": lengths[i]}
        if turn1 is not None:  # scored on turn 2; turn 1 kept beside it
            record.update(answer=lo.item.then.answer, turn1_prediction=vlm.decode(turn1[i]), turn1_answer=lo.item.answer)
        out.records.append(record)
    return []


def score_records(task: Task, out: Outputs, reference: Outputs | None) -> None:
    """Add `correct` (items with answers) and `kl` / `agree` against the reference, in place."""
    for rec in out.records:
        if "error" in rec:
            continue
        if rec.get("answer") is not None:
            rec["correct"] = task.score(rec["prediction"], rec["answer"])
        if rec.get("turn1_answer") is not None:
            rec["turn1_correct"] = task.score(rec["turn1_prediction"], rec["turn1_answer"])
        ref = reference.raw.get(rec["id"]) if reference else None
        if ref is not None:
            logits, tokens = out.raw[rec["id"]]
            rec["kl"] = float(first_token_kl(ref[0][None], logits[None])[0])
            rec["agree"] = agreement([ref[1]], [tokens])[0]


def mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


def visual_tokens(cell: Cell, records: list[dict[str, Any]], n_visual: int) -> int | float:
    """Visual tokens per image of a cell: the mean over its items' images (images of any size, as
    Qwen-VL's), an int when whole; `cell.kept(n_visual)` when no item ran."""
    per_image = [k for r in records if "error" not in r for k in r["visual_tokens"]]
    if not per_image:
        return cell.kept(n_visual)
    avg = sum(per_image) / len(per_image)
    return int(avg) if avg == int(avg) else round(avg, 2)


def summarise(cell: Cell, out: Outputs, n_visual: int) -> dict[str, Any]:
    """One table row for a cell."""
    ok = [r for r in out.records if "error" not in r]
    with_answer = [r for r in ok if "correct" in r]
    has_answers = bool(ok) and len(with_answer) == len(ok)
    row = {
        "method": cell.method or "unpruned", "keep": cell.keep, "prune_ratio": cell.ratio,
        "visual_tokens": visual_tokens(cell, out.records, n_visual), "items": len(out.records),
        "errors": len(out.records) - len(ok),
        "accuracy": mean([r["correct"] for r in with_answer]) if has_answers else None,
        "turn1_accuracy": mean([r["turn1_correct"] for r in ok if "turn1_correct" in r]),
        "agreement": mean([r["agree"] for r in ok if "agree" in r]),
        "kl": mean([r["kl"] for r in ok if "kl" in r]),
        "prefill_tokens": mean([r["prefill_tokens"] for r in ok]),
        "prefill_ms": median([b["prefill_ms"] for b in out.batches]) if out.batches else None,
        "ttft_ms": median([b["ttft_ms"] for b in out.batches]) if out.batches else None,
    }
    row["metric_name"] = "accuracy" if has_answers else "agreement"
    row["metric"] = row["accuracy"] if has_answers else row["agreement"]
    return row


# --- results files ---------------------------------------------------------------------------
SAME_CONFIG = ("model", "data", "limit", "max_new_tokens", "dtype", "attn")


def environment(device: torch.device) -> dict[str, Any]:
    """Versions and device, recorded with the results."""
    import transformers

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or platform.machine()
    return {
        "versions": {"vlmprune": vlmprune.__version__, "torch": torch.__version__,
                     "transformers": transformers.__version__, "python": platform.python_version()},
        "device": f"{device} ({name})",
    }


def read_results(path: Path, config: dict[str, Any]) -> dict[str, Any]:
    """The results of an earlier run into the same folder (its finished cells), or a new record."""
    if not path.exists():
        return {"config": config, "cells": {}}
    try:
        results = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON ({e}); remove it or use another --out") from e
    old = results.get("config", {})
    diff = {k: (old.get(k), config[k]) for k in SAME_CONFIG if old.get(k) != config[k]}
    if diff:
        raise ValueError(f"{path} holds a sweep with another config {diff} (old, new); use another --out")
    results["config"] = {**old, **config, "methods": sorted(set(old.get("methods", [])) | set(config["methods"]))}
    return results


def write_json(path: Path, data: dict[str, Any]) -> None:
    """Write atomically (a crash never leaves half a file)."""
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=1))
    os.replace(tmp, path)


CSV_COLUMNS = ("method", "keep", "prune_ratio", "visual_tokens", "metric_name", "metric", "accuracy", "turn1_accuracy",
               "agreement", "kl", "prefill_tokens", "prefill_ms", "ttft_ms", "items", "errors")


def write_csv(path: Path, rows: list[dict[str, Any]]) -> None:
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=CSV_COLUMNS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)


@dataclass
class SweepSpec:
    """Everything a sweep needs besides the model."""

    model: str = "tiny"
    methods: list[str] = field(default_factory=lambda: list(DEFAULT_METHODS))
    keeps: list[int] | None = None
    ratios: list[float] | None = None
    data: str | None = None
    limit: int | None = None
    batch_size: int = 4
    max_new_tokens: int = 8
    out: str = "sweep-out"
    device: str = "auto"
    dtype: str = "auto"
    attn: str = "sdpa"
    overlays: int = 0  # first items drawn in overlays.png (kept patches per method at the smallest budget)

    def config(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if k not in ("out", "overlays")}


def run_sweep(spec: SweepSpec, vlm: VLM | None = None, progress: Any = None) -> dict[str, Any]:
    """Run the unfinished cells of `spec` into `spec.out` and return the results dict.
    `progress` is a rich Progress (or None). The reference runs again (not re-recorded) when a
    new cell needs its outputs."""
    out_dir = Path(spec.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path = out_dir / "results.json"
    task = make_task(spec.data, spec.limit)
    results = read_results(json_path, spec.config())
    vlm = vlm or load_vlm(spec.model, spec.device, spec.dtype, spec.attn)
    if spec.keeps is None and spec.ratios is None:  # the default budgets are fractions of the model's tokens
        spec = replace(spec, keeps=default_keeps(vlm.n_visual))
        results["config"]["keeps"] = spec.keeps
    cells = make_cells(spec.methods, spec.keeps, spec.ratios)
    unsupported = check_cells(vlm, cells)
    cells = [c for c in cells if c.method not in unsupported]
    results.update(environment(vlm.device), task=task.name, n_visual=vlm.n_visual, unsupported=unsupported)
    todo = [c for c in [Cell(), *cells] if c.key not in results["cells"]]
    results["last_run"] = {"started": time.strftime("%Y-%m-%dT%H:%M:%S"), "ran": [c.key for c in todo],
                           "skipped": [c.key for c in [Cell(), *cells] if c not in todo]}
    if todo:
        loaded = load_items(task.items())
        n_batches = -(-sum(1 for lo in loaded if not lo.error) // spec.batch_size)
        runs = 1 + sum(1 for c in todo if c.method)  # the reference always runs
        bar = progress.add_task("sweep", total=n_batches * runs) if progress else None
        advance = (lambda: progress.advance(bar)) if progress else (lambda: None)

        def run(cell: Cell) -> Outputs:
            if progress:
                progress.update(bar, description=cell.key)
            with vlmprune.pruning(vlm.model, cell.method, **cell.patch_kwargs()) if cell.method else contextlib.nullcontext():
                return run_cell(vlm, loaded, spec.batch_size, spec.max_new_tokens, advance)

        reference = run(Cell())
        for cell in todo:
            outputs = reference if cell.method is None else run(cell)
            score_records(task, outputs, reference)
            results["cells"][cell.key] = {"summary": summarise(cell, outputs, vlm.n_visual), "items": outputs.records}
            write_json(json_path, results)
    write_json(json_path, results)
    rows = summary_rows(results)
    write_csv(out_dir / "results.csv", rows)
    plot_sweep(rows, out_dir / "accuracy_vs_tokens.png", title=f"{spec.model} on {task.name}")
    if spec.overlays > 0 and cells:
        write_overlays(vlm, task, cells, spec.overlays, out_dir / "overlays.png")
    return results


def write_overlays(vlm: VLM, task: Task, cells: list[Cell], n: int, path: Path) -> None:
    """The kept patches of every method on the first `n` items that decode, at the sweep's
    smallest budget (`visualise.overlay_grid`)."""
    smallest = min(cells, key=lambda c: c.kept(vlm.n_visual))
    loaded = [lo for lo in load_items(task.items()[:n + 8]) if lo.image is not None][:n]  # a few spares for bad images
    overlay_grid(vlm, [lo.image for lo in loaded], [lo.item.prompt for lo in loaded],
                 list(dict.fromkeys(c.method for c in cells)), path, **smallest.patch_kwargs())


def summary_rows(results: dict[str, Any]) -> list[dict[str, Any]]:
    """The summary row of every finished cell, in the order they were run (reference first)."""
    return [cell["summary"] for cell in results["cells"].values()]
