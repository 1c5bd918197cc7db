"""Speed and memory: unpatched vs patched vs the oracle, for batch sizes x keep values.

The oracle is the unpatched model fed only the kept visual tokens: a prompt with `kept` image
tokens per image and the image features precomputed (`mm_encoder_outputs`), so it pays no vision
encoder and no pruning. Patched should match its prefill time (the pruning's own cost is the gap)
and its first-token logits (up to kernel-level rounding).

Qwen-VL (M-RoPE): no `image_grid_thw` describes k kept tokens of an image in general (k need not
be a t x h x w grid), and the model would compute their 3-D rope ids from such a grid. So the
oracle gets no grid and explicit `position_ids` [3, B, L]: the unpruned prompt's `get_rope_index`
ids gathered at the kept tokens (each text token's own ids, each kept visual token its place in
the full grid), padding at 1 as `get_rope_index` pads. That is the family's `positions="original"`
rule (DESIGN §2), the unpatched model's answer to "these tokens at these places". `generate()`
continues explicit ids at the last one + 1 in all three sections; the prompt ends in text, whose
ids are the largest, so decoding runs at the ids the unpruned model would use.

Timings per `generate()` call (see `fidelity.greedy`): prefill = the first model forward (decoder
prefill, with pruning when patched; images are encoded by generate() just before it); TTFT =
generate() start to the end of that forward (image encoding included; for the oracle, the
separately measured image-encoding time is added); decode tokens/s = B x (new_tokens - 1) / the
rest of the call. Medians over `repeats` after `warmup` calls (and a few untimed runs of every
path before the first measurement).

The oracle goes through HF's own path for precomputed features (placeholder count check and
`masked_scatter`, which wait on the GPU mid-forward); the patched prefill writes the pruned
embeddings itself, so on a launch-bound GPU it can beat the oracle by that wait. FLOPs are the decoder's prefill,
in theory: per row of T tokens, 2 x P_layers x T (weight matmuls) + 2 x L x T^2 x d (QK^T and
AV with the causal half) + 2 x V x d (LM head on the last token)."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from statistics import median
from typing import Any, Callable

import torch
from transformers.modeling_outputs import BaseModelOutputWithPooling

import vlmprune
from vlmprune.eval.fidelity import Clock, Generation, greedy
from vlmprune.eval.sweep import DEFAULT_PROMPT, VLM, environment, load_vlm, random_images
from vlmprune.eval.tiny import PAD, left_pad


@dataclass
class BenchSpec:
    """What to benchmark."""

    model: str = "tiny"
    batch_sizes: list[int] = field(default_factory=lambda: [1, 8])
    keeps: list[int] = field(default_factory=lambda: [576, 64])
    method: str = "cls"
    dtype: str = "auto"
    device: str = "auto"
    repeats: int = 10
    warmup: int = 2
    new_tokens: int = 32
    attn: str = "sdpa"


def language_model(model: torch.nn.Module) -> torch.nn.Module:
    """The decoder stack (has `.layers`) of an HF VLM."""
    inner = getattr(model, "model", model)
    lm = getattr(inner, "language_model", None) or model.get_decoder()
    return getattr(lm, "model", lm) if not hasattr(lm, "layers") else lm


def decoder_flops(model: torch.nn.Module, lengths: list[int]) -> float:
    """Theoretical decoder prefill FLOPs for rows of these token counts (see module doc)."""
    cfg = model.config.get_text_config()
    layers = language_model(model).layers
    p_layers = sum(p.numel() for p in layers.parameters())
    d, n_layers, vocab = cfg.hidden_size, len(layers), cfg.vocab_size
    return float(sum(2 * p_layers * t + 2 * n_layers * t * t * d + 2 * vocab * d for t in lengths))


def oracle_inputs(vlm: VLM, inputs: dict[str, torch.Tensor], selection: list[list[torch.Tensor]]) -> dict[str, Any]:
    """The unpatched model's inputs for the oracle: each image's token run cut to its kept tokens
    (kept places, ascending), its kept features (computed unpatched) passed as `mm_encoder_outputs`;
    for Qwen-VL also the unpruned M-RoPE ids of the kept places as `position_ids` (module doc)."""
    token = vlm.image_token_id
    with torch.no_grad():
        feats = list(vlm.image_features(inputs).pooler_output)
    chosen = [s.to(feats[0].device) for row in selection for s in row]
    counts = vlm.visual_counts(inputs)
    columns = []  # per row: the columns of `inputs` the oracle keeps
    all_ids, all_mask = inputs["input_ids"].tolist(), inputs["attention_mask"].tolist()
    for ids, mask, sizes, row in zip(all_ids, all_mask, counts, selection):
        cols, img, run, keep = [], 0, 0, set()
        for j, (t, m) in enumerate(zip(ids, mask)):
            if not m:
                continue
            if t != token:
                cols.append(j)
                continue
            if run == 0:
                keep = set(row[img].tolist())
            if run in keep:
                cols.append(j)
            run += 1
            if run == sizes[img]:
                img, run = img + 1, 0
        columns.append(cols)
    pad = getattr(getattr(vlm, "processor", None), "tokenizer", None)
    pad_id = pad.pad_token_id if pad is not None else PAD
    rows = [[ids[j] for j in cols] for ids, cols in zip(all_ids, columns)]
    new_ids, new_mask = left_pad(rows, pad=pad_id)
    encoded = BaseModelOutputWithPooling(pooler_output=[f[s] for f, s in zip(feats, chosen)])
    out = {"input_ids": new_ids.to(vlm.device), "attention_mask": new_mask.to(vlm.device),
           "mm_encoder_outputs": {"image": encoded}}
    if inputs.get("image_grid_thw") is not None:
        full = rope_index(vlm, inputs)
        width = new_ids.shape[1]
        pos = torch.ones(3, len(rows), width, dtype=full.dtype, device=full.device)
        for b, cols in enumerate(columns):
            pos[:, b, width - len(cols):] = full[:, b, cols]
        out["position_ids"] = pos
    return out


def rope_index(vlm: VLM, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    """[3, B, L] M-RoPE ids of the unpruned prompt (the model's `get_rope_index`)."""
    ids = inputs["input_ids"]
    types = inputs.get("mm_token_type_ids")
    if types is None:
        types = (ids == vlm.image_token_id).int()
    pos, _ = vlm.model.model.get_rope_index(ids, mm_token_type_ids=types, image_grid_thw=inputs["image_grid_thw"],
                                            attention_mask=inputs.get("attention_mask"))
    return pos


def vision_seconds(vlm: VLM, inputs: dict[str, torch.Tensor], repeats: int, warmup: int) -> float:
    """Median time to encode the images (vision tower + projector), unpatched."""
    clock = Clock(vlm.device)
    times = []
    with torch.no_grad():
        for i in range(warmup + repeats):
            start = clock.mark()
            vlm.image_features(inputs)
            end = clock.mark()
            if i >= warmup:
                times.append(clock.seconds(start, end))
    return median(times)


def measure(model: torch.nn.Module, inputs: dict[str, Any], repeats: int, warmup: int, new_tokens: int) -> tuple[dict[str, Any], Generation]:
    """Median timings of `repeats` greedy generations of exactly `new_tokens` tokens, and the last run."""
    runs = [greedy(model, inputs, new_tokens, min_new_tokens=new_tokens) for _ in range(warmup + repeats)][warmup:]
    batch = inputs["input_ids"].shape[0]
    last = runs[-1]
    peaks = [r.peak_bytes for r in runs if r.peak_bytes is not None]
    return {
        "prefill_ms": 1e3 * median(r.prefill_s for r in runs),
        "prefill_ms_min": 1e3 * min(r.prefill_s for r in runs),
        "ttft_ms": 1e3 * median(r.ttft_s for r in runs),
        "decode_tok_s": median(batch * (r.forwards - 1) / r.decode_s for r in runs) if last.forwards > 1 else None,
        "peak_mem_gib": max(peaks) / 2**30 if peaks else None,
        "kv_cache_mib": last.kv_bytes / 2**20,
        "prefill_len": last.prefill_len,
    }, last


def warm_up(vlm: VLM, inputs: dict[str, Any], spec: BenchSpec, runs: int = 3) -> None:
    """Untimed runs of every code path first (kernel selection, allocator, GPU clocks), so the
    first measured configuration is not penalised."""
    for _ in range(runs):
        greedy(vlm.model, inputs, 2)
        with vlmprune.pruning(vlm.model, spec.method, keep=min(spec.keeps)):
            greedy(vlm.model, inputs, 2)


def row_lengths(inputs: dict[str, Any], removed: list[int] | None = None) -> list[int]:
    """Real (unpadded) tokens per row, minus `removed` visual tokens per row."""
    lengths = inputs["attention_mask"].sum(1).tolist()
    return [t - r for t, r in zip(lengths, removed or [0] * len(lengths))]


def run_bench(spec: BenchSpec, vlm: VLM | None = None, advance: Callable[[str], None] = lambda _: None) -> dict[str, Any]:
    """Measure every batch size x keep; returns {config, versions, device, rows}."""
    vlm = vlm or load_vlm(spec.model, spec.device, spec.dtype, spec.attn)
    with vlmprune.pruning(vlm.model, spec.method, keep=max(spec.keeps)):
        pass  # bad method / keep fails here, before any timing
    results = {"config": asdict(spec), **environment(vlm.device), "n_visual": vlm.n_visual, "rows": []}
    if vlm.device.type == "cuda":
        results["weights_gib"] = torch.cuda.memory_allocated(vlm.device) / 2**30
    images = random_images(max(spec.batch_sizes), vlm.image_size).items()
    n = vlm.n_visual  # every benchmark image is image_size x image_size: n visual tokens each
    warm_up(vlm, vlm.inputs([images[0].image], [DEFAULT_PROMPT]), spec)
    for b in spec.batch_sizes:
        inputs = vlm.inputs([it.image for it in images[:b]], [DEFAULT_PROMPT] * b)
        vision_ms = 1e3 * vision_seconds(vlm, inputs, spec.repeats, spec.warmup)
        base, _ = measure(vlm.model, inputs, spec.repeats, spec.warmup, spec.new_tokens)

        def add(variant: str, keep: int, m: dict[str, Any], lengths: list[int], **extra: Any) -> None:
            results["rows"].append({
                "batch": b, "keep": keep, "variant": variant, "vision_ms": vision_ms, **m,
                "prefill_speedup": base["prefill_ms"] / m["prefill_ms"], "ttft_speedup": base["ttft_ms"] / m["ttft_ms"],
                "decoder_tflops": decoder_flops(vlm.model, lengths) / 1e12, **extra,
            })

        add("unpatched", n, base, row_lengths(inputs))
        advance(f"batch {b} unpatched")
        for keep in spec.keeps:
            with vlmprune.pruning(vlm.model, spec.method, keep=keep):
                patched, gen = measure(vlm.model, inputs, spec.repeats, spec.warmup, spec.new_tokens)
                selection = vlmprune.last_selection(vlm.model)
            oracle, ogen = measure(vlm.model, oracle_inputs(vlm, inputs, selection), spec.repeats, spec.warmup,
                                   spec.new_tokens)
            oracle["ttft_ms"] += vision_ms  # the oracle got its features precomputed
            lengths = row_lengths(inputs, [sum(c - len(s) for c, s in zip(counts, row))
                                           for counts, row in zip(vlm.visual_counts(inputs), selection)])
            add("patched", keep, patched, lengths,
                oracle_max_abs_logit_diff=(gen.first_logits - ogen.first_logits).abs().max().item(),
                oracle_argmax_agree=(gen.first_logits.argmax(-1) == ogen.first_logits.argmax(-1)).float().mean().item())
            add("oracle", keep, oracle, lengths)
            advance(f"batch {b} keep {keep}")
    return results


def write_bench(results: dict[str, Any], path: str | Path) -> None:
    """Write the results as JSON (creating the folder)."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(results, indent=1))
