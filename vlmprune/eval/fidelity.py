"""Fidelity without labels: how far the pruned model's outputs move from the unpruned model's.

Two numbers per item: the KL divergence KL(p_unpruned || p_pruned) of the first generated token's
distribution, and whether the greedy answers (token ids up to EOS) agree. `greedy` is the one
generation loop shared by the sweep, the benchmark and the demo; it also times the prefill."""

from __future__ import annotations

import contextlib
import copy
import time
from dataclasses import dataclass
from typing import Any, Iterator

import torch

import vlmprune
from vlmprune.adapters.base import output_cache


@dataclass
class Generation:
    """One greedy `generate()` call on a batch, with the first token's logits and timings."""

    first_logits: torch.Tensor  # [B, V] float32 on the CPU: the first generated token's logits
    tokens: list[list[int]]  # new tokens per row, cut before the first EOS
    prefill_s: float  # the first forward: decoder prefill (with the pruning, when patched)
    ttft_s: float  # generate() call to the end of the first forward (image encoding included)
    decode_s: float  # end of the first forward to the end of generate()
    forwards: int  # model forwards run (1 prefill + decode steps)
    prefill_len: int  # KV-cache length after the prefill (padded batch width)
    kv_bytes: int  # KV-cache bytes after the prefill
    peak_bytes: int | None  # peak accelerator memory during the call (None on CPU)


class Clock:
    """Wall-clock marks: CUDA events on a CUDA device (no sync until read), perf_counter elsewhere."""

    def __init__(self, device: torch.device | str):
        self.cuda = torch.device(device).type == "cuda"

    def mark(self) -> Any:
        """A point in time on the device's stream."""
        if not self.cuda:
            return time.perf_counter()
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    def seconds(self, start: Any, end: Any) -> float:
        """Seconds between two marks (synchronises on CUDA)."""
        if not self.cuda:
            return end - start
        torch.cuda.synchronize()
        return start.elapsed_time(end) / 1000.0


def cache_bytes(cache: Any) -> int:
    """Bytes held by the key and value tensors of an HF cache."""
    tensors = [getattr(layer, name, None) for layer in getattr(cache, "layers", []) for name in ("keys", "values")]
    return sum(t.numel() * t.element_size() for t in tensors if isinstance(t, torch.Tensor))


@contextlib.contextmanager
def first_forward(model: torch.nn.Module, clock: Clock) -> Iterator[dict[str, Any]]:
    """Record marks around the first forward of `model` inside the block, the cache it leaves,
    and how many forwards ran."""
    seen: dict[str, Any] = {"forwards": 0}

    def before(module, args, kwargs):
        if seen["forwards"] == 0:
            seen["start"] = clock.mark()

    def after(module, args, kwargs, output):
        if seen["forwards"] == 0:
            seen["end"] = clock.mark()
            cache = output_cache(output)
            seen["prefill_len"] = int(cache.get_seq_length()) if cache is not None else 0
            seen["kv_bytes"] = cache_bytes(cache)
        seen["forwards"] += 1

    hooks = [
        model.register_forward_pre_hook(before, with_kwargs=True),
        model.register_forward_hook(after, with_kwargs=True),
    ]
    try:
        yield seen
    finally:
        for h in hooks:
            h.remove()


def eos_ids(model: torch.nn.Module) -> set[int]:
    """The model's end-of-sequence token ids."""
    eos = model.generation_config.eos_token_id
    return set(eos if isinstance(eos, (list, tuple)) else [] if eos is None else [eos])


def cut_at_eos(row: list[int], eos: set[int]) -> list[int]:
    """Tokens before the first EOS."""
    for i, t in enumerate(row):
        if t in eos:
            return row[:i]
    return row


@torch.no_grad()
def greedy(model: torch.nn.Module, inputs: dict[str, Any], max_new_tokens: int = 8, min_new_tokens: int = 0) -> Generation:
    """Greedy-generate from `inputs` and time it (prefill = the first forward)."""
    device = next(model.parameters()).device
    clock = Clock(device)
    config = copy.deepcopy(model.generation_config)
    config.update(
        do_sample=False, num_beams=1, temperature=None, top_p=None, top_k=None, max_new_tokens=max_new_tokens,
        min_new_tokens=min_new_tokens, output_logits=True, return_dict_in_generate=True,
    )
    if clock.cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    prompt_len = inputs["input_ids"].shape[1]
    with first_forward(model, clock) as seen:
        start = clock.mark()
        out = model.generate(**inputs, generation_config=config)
        end = clock.mark()
    eos = eos_ids(model)
    return Generation(
        first_logits=out.logits[0].float().cpu(),
        tokens=[cut_at_eos(row, eos) for row in out.sequences[:, prompt_len:].tolist()],
        prefill_s=clock.seconds(seen["start"], seen["end"]),
        ttft_s=clock.seconds(start, seen["end"]),
        decode_s=clock.seconds(seen["end"], end),
        forwards=seen["forwards"],
        prefill_len=seen["prefill_len"],
        kv_bytes=seen["kv_bytes"],
        peak_bytes=torch.cuda.max_memory_allocated() if clock.cuda else None,
    )


def first_token_kl(ref_logits: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """Per-row KL(softmax(ref) || softmax(logits)) in nats, float32; exactly 0 for equal logits."""
    ref = torch.log_softmax(ref_logits.float(), dim=-1)
    new = torch.log_softmax(logits.float(), dim=-1)
    return torch.nn.functional.kl_div(new, ref, reduction="none", log_target=True).sum(-1)


def agreement(ref_tokens: list[list[int]], tokens: list[list[int]]) -> list[float]:
    """1.0 where the greedy answers (token ids) are identical, else 0.0."""
    return [float(a == b) for a, b in zip(ref_tokens, tokens, strict=True)]


def fidelity(
    model: torch.nn.Module, inputs: dict[str, Any], method: Any = "cls", max_new_tokens: int = 8, **patch_kwargs: Any
) -> list[dict[str, float]]:
    """Per row of `inputs`: first-token KL and greedy agreement of the model pruned with
    `method` (`keep=` / `prune_ratio=` in `patch_kwargs`) against the same model unpruned.
    The model's patch state is restored afterwards."""
    if vlmprune.is_patched(model):
        raise ValueError("fidelity: pass the unpatched model; it is patched here for the pruned run")
    ref = greedy(model, inputs, max_new_tokens)
    with vlmprune.pruning(model, method, **patch_kwargs):
        new = greedy(model, inputs, max_new_tokens)
    kl = first_token_kl(ref.first_logits, new.first_logits).tolist()
    return [{"kl": k, "agree": a} for k, a in zip(kl, agreement(ref.tokens, new.tokens))]
