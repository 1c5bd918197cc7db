"""The lmms-eval model `vlmprune`: a Hugging Face VLM of any family vlmprune has an adapter for,
pruned with `vlmprune.patch`.

    python -m lmms_eval --model vlmprune \\
        --model_args pretrained=llava-hf/llava-1.5-7b-hf,method=cls,keep=64,dtype=float16 \\
        --tasks gqa --batch_size 8 --output_path runs/

model_args: `pretrained` (a local directory, a hub id, or an embedded model: `shapes-llava`,
`shapes-qwen2-vl`), `method` (a vlmprune method; absent or `none`: the unpatched model), `keep` or
`prune_ratio`, `positions`, `view_scores` (LLaVA-NeXT / OneVision: `normalised` or `raw` attention rows
per view), `attn_implementation` (default sdpa), `batch_size`, `device` (default
auto: cuda when available), `dtype` (auto: bf16 on CUDA, fp32 on CPU; or float16 / bfloat16 /
float32), `min_pixels` / `max_pixels` (Qwen-VL processors only), and any option of the method (e.g.
`layer=-3` for cls). Values here win over lmms-eval's own `--batch_size` / `--device`.

Qwen2-VL / Qwen2.5-VL / Qwen3-VL checkpoints: the processor resizes each image to a whole number of
28 x 28 px blocks (one visual token each) with min_pixels <= height x width <= max_pixels, so these
two bound the visual tokens per image (tokens ~ pixels / 784): e.g.
`pretrained=Qwen/Qwen2.5-VL-7B-Instruct,min_pixels=200704,max_pixels=200704,method=cls,keep=64` gives
every image ~256 tokens before pruning (448 x 448 px for a square image). They set the loaded
processor's bounds (`vlmprune.eval.qwen.set_pixels`; one of them alone keeps the checkpoint's other
bound); without them the checkpoint's own setting holds (Qwen2-VL's: 3,136 to 12,845,056 px). A
processor that does not take them (any other family) is an error. Without torchvision a Qwen-VL
processor is loaded for images only (`vlmprune.eval.qwen.load_processor`).

lmms-eval finds the class through our `lmms_eval.models` entry point (`vlmprune.eval.lmms`).
Under `accelerate launch --num_processes N` every process loads the model on its own GPU and
lmms-eval shards the documents by `rank` / `world_size`.
"""

from __future__ import annotations

import json
from typing import Any

import torch
from accelerate import Accelerator
from loguru import logger
from PIL import Image
from tqdm import tqdm

from lmms_eval.api.instance import GenerationResult, Instance, TokenCounts
from lmms_eval.api.model import lmms

import vlmprune
from vlmprune.config import make_config
from vlmprune.eval.qwen import set_pixels
from vlmprune.eval.sweep import RANDOM_MODELS, HFVLM, chat_text, load_vlm
from vlmprune.scorers import available_methods, scorer_options

MODEL_ARGS = ("pretrained", "method", "keep", "prune_ratio", "positions", "view_scores", "attn_implementation",
              "batch_size", "device", "dtype", "min_pixels", "max_pixels")
TEXT_ARGS = ("pretrained", "method", "positions", "view_scores", "attn_implementation", "device",
             "dtype")  # never parsed as numbers
DEFAULT_MAX_NEW_TOKENS = 256


def parse_value(text: str) -> Any:
    """'64' -> 64, '-2' -> -2, '0.5' -> 0.5, 'true' -> True, 'none' -> None, '[12,18]' -> [12, 18], else the text."""
    low = text.strip().lower()
    if low in ("none", "null"):
        return None
    if low in ("true", "false"):
        return low == "true"
    if low[:1] in ("[", "{"):
        try:
            return json.loads(text)
        except json.JSONDecodeError:
            raise ValueError(f"vlmprune model_args: cannot parse {text!r} as a JSON list or object") from None
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text.strip()


def parse_model_args(text: str) -> dict[str, Any]:
    """'a=1,b=[2,3],c=x' -> {'a': 1, 'b': [2, 3], 'c': 'x'} (commas inside brackets stay)."""
    parts, depth, current = [], 0, ""
    for ch in text:
        depth += (ch in "[{") - (ch in "]}")
        if ch == "," and depth == 0:
            parts.append(current)
            current = ""
        else:
            current += ch
    parts.append(current)
    args = {}
    for part in filter(str.strip, parts):
        key, sep, value = part.partition("=")
        if not sep:
            raise ValueError(f"vlmprune model_args: expected key=value, got {part!r}")
        key = key.strip()
        args[key] = value.strip() if key in TEXT_ARGS else parse_value(value)
    return args


def check_pruning(method: str | None, keep: Any, prune_ratio: Any, positions: Any, options: dict[str, Any],
                  view_scores: Any = None) -> None:
    """Reject bad pruning arguments before any model is loaded."""
    if method is None:
        given = {k: v for k, v in dict(keep=keep, prune_ratio=prune_ratio, positions=positions,
                                       view_scores=view_scores, **options).items() if v is not None}
        if given:
            raise ValueError(f"vlmprune model_args {given} need a method (one of {available_methods()}); "
                             f"method=none runs the unpatched model")
        return
    allowed = scorer_options(method)  # unknown method: ValueError listing the methods
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        raise ValueError(f"vlmprune model_args: unknown key(s) {unknown}; allowed: {list(MODEL_ARGS)} and, "
                         f"for method {method!r}, {sorted(allowed)}")
    make_config(method, keep=keep, prune_ratio=prune_ratio, positions=positions, view_scores=view_scores, **options)


class VLMPrune(lmms):
    """A supported HF vision-language model, patched with a vlmprune method (or not, with method=none)."""

    def __init__(
        self,
        pretrained: str,
        method: str | None = None,
        keep: int | None = None,
        prune_ratio: float | None = None,
        positions: str | None = None,
        view_scores: str | None = None,
        attn_implementation: str = "sdpa",
        batch_size: int | str = 1,
        device: str = "auto",
        dtype: str = "auto",
        min_pixels: int | None = None,
        max_pixels: int | None = None,
        **method_options: Any,
    ) -> None:
        super().__init__()
        method = None if method in (None, "none") else method
        check_pruning(method, keep, prune_ratio, positions, method_options, view_scores)
        if not str(batch_size).isdigit() or int(batch_size) < 1:
            raise ValueError(f"vlmprune model_args: batch_size must be a positive int, got {batch_size!r}")
        self.batch_size_per_process = int(batch_size)
        if pretrained in RANDOM_MODELS:
            raise ValueError(f"vlmprune model_args: pretrained={pretrained!r} has no processor; give a local model "
                             f"directory or a hub id")
        self.accelerator = Accelerator()
        if self.accelerator.num_processes > 1:  # data parallel: one model per process, on its own device
            device = str(self.accelerator.device)
        for key, value in dict(min_pixels=min_pixels, max_pixels=max_pixels).items():
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
                raise ValueError(f"vlmprune model_args: {key} must be a positive int, got {value!r}")
        self.vlm: HFVLM = load_vlm(pretrained, device, dtype, attn_implementation)
        if min_pixels is not None or max_pixels is not None:
            try:
                set_pixels(self.vlm.processor, min_pixels, max_pixels)
            except ValueError as e:
                raise ValueError(f"vlmprune model_args: {e}") from None
        self.processor = self.vlm.processor
        self.tokenizer = self.processor.tokenizer
        self.method = method
        if method is not None:
            vlmprune.patch(self.vlm.model, method, keep=keep, prune_ratio=prune_ratio, positions=positions,
                           view_scores=view_scores, **method_options)
        amount = f"keep={keep}" if keep is not None else f"prune_ratio={prune_ratio}"
        self.pruning = "unpatched" if method is None else f"{method} {amount}"
        self.kept_tokens = 0  # visual tokens kept, summed over the images generate_until saw
        self.visual_tokens = 0  # and before pruning
        self.images_seen = 0
        self._rank = self.accelerator.process_index
        self._world_size = self.accelerator.num_processes

    @classmethod
    def create_from_arg_string(cls, arg_string: str | dict, additional_config: dict | None = None) -> "VLMPrune":
        """Build from `--model_args` (our own value parsing: '-2' stays an int); lmms-eval's
        `--batch_size` / `--device` fill only what model_args leaves out."""
        args = dict(arg_string) if isinstance(arg_string, dict) else parse_model_args(arg_string)
        for key in ("batch_size", "device"):
            if (additional_config or {}).get(key) is not None:
                args.setdefault(key, additional_config[key])
        return cls(**args)

    @property
    def model(self) -> torch.nn.Module:
        return self.vlm.model

    @property
    def device(self) -> torch.device:
        return self.vlm.device

    @property
    def batch_size(self) -> int:
        return self.batch_size_per_process

    # --- inputs --------------------------------------------------------------------------------
    def visuals(self, request: Instance) -> list[Image.Image]:
        """The request's images (RGB); anything but images is refused with a clear error."""
        _, _, doc_to_visual, doc_id, task, split = request.args
        visuals = doc_to_visual(self.task_dict[task][split][doc_id]) if doc_to_visual is not None else []
        visuals = [v for v in (visuals or []) if v is not None]
        for v in visuals:
            if not isinstance(v, Image.Image):
                raise ValueError(f"vlmprune model: task {task!r} gives a {type(v).__name__} visual; only images "
                                 f"(PIL) are supported")
        return [v.convert("RGB") for v in visuals]

    def prompt(self, context: str, n_images: int) -> str:
        """The chat-formatted prompt; a context that already holds the image token keeps its own placement."""
        image_token = getattr(self.processor, "image_token", None) or "<image>"
        return chat_text(self.processor, context, 0 if image_token in context else n_images)

    def encode(self, texts: list[str], images: list[Image.Image]) -> dict[str, torch.Tensor]:
        """Processor outputs (left-padded) on the model's device, floats in the model's dtype."""
        batch = self.processor(images=images or None, text=texts, return_tensors="pt", padding=True)
        return {k: (v.to(self.device, self.vlm.dtype) if v.is_floating_point() else v.to(self.device))
                for k, v in batch.items() if isinstance(v, torch.Tensor)}

    def kept_per_image(self, inputs: dict[str, torch.Tensor]) -> list[list[int]] | None:
        """[row][image] visual tokens the last prefill (of `inputs`) kept (None when unpatched); adds
        them, and the images' unpruned counts, to the totals."""
        if self.method is None:
            return None
        kept = [[len(s) for s in row] for row in vlmprune.last_selection(self.model)]
        self.kept_tokens += sum(map(sum, kept))
        self.visual_tokens += sum(map(sum, self.vlm.visual_counts(inputs)))
        self.images_seen += sum(map(len, kept))
        return kept

    # --- requests ------------------------------------------------------------------------------
    def generate_until(self, requests: list[Instance]) -> list[GenerationResult]:
        """Batched generation (requests grouped by their gen_kwargs), cut at the first `until` string."""
        out: list[GenerationResult | None] = [None] * len(requests)
        groups: dict[str, list[int]] = {}
        for i, req in enumerate(requests):
            groups.setdefault(repr(sorted(req.args[1].items())), []).append(i)
        bar = tqdm(total=len(requests), disable=self.rank != 0, desc="vlmprune generate")
        for indices in groups.values():
            kwargs, until = generation_kwargs(requests[indices[0]].args[1])
            for start in range(0, len(indices), self.batch_size):
                chunk = indices[start:start + self.batch_size]
                for i, result in zip(chunk, self.generate([requests[i] for i in chunk], kwargs, until)):
                    out[i] = result
                bar.update(len(chunk))
        bar.close()
        if self.images_seen:
            n = self.images_seen
            logger.info(f"vlmprune {self.pruning}: kept {self.kept_tokens / n:g} of {self.visual_tokens / n:g} "
                        f"visual tokens per image over {n} images")
        return out

    @torch.no_grad()
    def generate(self, requests: list[Instance], kwargs: dict[str, Any], until: list[str]) -> list[GenerationResult]:
        """One left-padded batch through `model.generate`; the token counts are the prompt's after
        pruning (visual tokens removed) and the generated ones."""
        texts, images = [], []
        for req in requests:
            visuals = self.visuals(req)
            texts.append(self.prompt(req.args[0], len(visuals)))
            images += visuals
        inputs = self.encode(texts, images)
        tokens = self.model.generate(**inputs, **kwargs, pad_token_id=self.tokenizer.pad_token_id)
        new = tokens[:, inputs["input_ids"].shape[1]:]
        kept = self.kept_per_image(inputs) if images else None  # a text-only batch prunes nothing
        image_tokens = (inputs["input_ids"] == self.vlm.image_token_id).sum(1).tolist()
        out = []
        for i, text in enumerate(self.tokenizer.batch_decode(new, skip_special_tokens=True)):
            removed = image_tokens[i] - sum(kept[i]) if kept is not None else 0
            counts = TokenCounts(input_tokens=int(inputs["attention_mask"][i].sum()) - removed,
                                 output_tokens=int((new[i] != self.tokenizer.pad_token_id).sum()))
            out.append(GenerationResult(cut(text, until).strip(), counts))
        return out

    @torch.no_grad()
    def loglikelihood(self, requests: list[Instance]) -> list[tuple[float, bool]]:
        """(sum of log-probs of the continuation after the chat prompt, whether greedy decoding gives
        it), one request at a time. Text tokens are never pruned, so the continuation's logits are
        the last ones whatever was kept."""
        out = []
        for req in tqdm(requests, disable=self.rank != 0, desc="vlmprune loglikelihood"):
            context, target, _, doc_id, task, split = req.args
            continuation = target if isinstance(target, str) else target(self.task_dict[task][split][doc_id])
            visuals = self.visuals(req)
            prompt = self.prompt(context, len(visuals))
            n = len(self.tokenizer(prompt + continuation)["input_ids"]) - len(self.tokenizer(prompt)["input_ids"])
            if n <= 0:
                raise ValueError(f"vlmprune loglikelihood: continuation {continuation!r} adds no token to the prompt")
            inputs = self.encode([prompt + continuation], visuals)
            logits = self.model(**inputs).logits[0, -n - 1:-1].float()
            target_ids = inputs["input_ids"][0, -n:]
            logprobs = torch.log_softmax(logits, dim=-1)
            total = float(logprobs.gather(-1, target_ids[:, None]).sum())
            out.append((total, bool((logprobs.argmax(-1) == target_ids).all())))
        return out

    def generate_until_multi_round(self, requests: list[Instance]) -> list[str]:
        raise NotImplementedError("vlmprune model: multi-round generation is not supported; use tasks whose "
                                  "output_type is generate_until or loglikelihood")


def generation_kwargs(gen_kwargs: dict[str, Any]) -> tuple[dict[str, Any], list[str]]:
    """lmms-eval's gen_kwargs -> (`generate` kwargs, stop strings). Greedy unless temperature > 0."""
    until = gen_kwargs.get("until") or []
    if isinstance(until, str):
        until = [until]
    if not isinstance(until, list):
        raise ValueError(f"vlmprune model: gen_kwargs 'until' must be a string or a list, got {until!r}")
    temperature = float(gen_kwargs.get("temperature") or 0.0)
    kwargs: dict[str, Any] = {"max_new_tokens": int(gen_kwargs.get("max_new_tokens") or DEFAULT_MAX_NEW_TOKENS),
                              "num_beams": int(gen_kwargs.get("num_beams") or 1), "do_sample": temperature > 0}
    if temperature > 0:
        kwargs["temperature"] = temperature
        if gen_kwargs.get("top_p") is not None:
            kwargs["top_p"] = float(gen_kwargs["top_p"])
    return kwargs, until


def cut(text: str, until: list[str]) -> str:
    """`text` up to the first occurrence of any stop string."""
    for stop in until:
        if stop:
            text = text.split(stop, 1)[0]
    return text
