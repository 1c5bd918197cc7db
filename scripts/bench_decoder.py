"""Decoder-stage pruning on LLaVA-1.5-7B shapes (random weights): prefill, one decode step and
KV-cache bytes at batch B, for unpatched, vision-stage `cls` keep 64, and the decoder stages
(`fastv` and `dart` K=2 keep 64, `pdrop` 8/16/24 x 0.5, `transprune` 7/9/12 prune_ratio 0.875, `exit` K=16),
each next to a plain run of the same work (layers < K on every token, layers >= K on the same
kept rows, by hand, no scoring), and the time of the cuts themselves (signals + scoring +
selection + gathers, CUDA events around `DecoderStages.cut`).

    python scripts/bench_decoder.py --device cuda --batch 8 --out docs/bench/decoder_llava7b.json
    python scripts/bench_decoder.py --tiny          # the same code on a tiny model, on the CPU
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
from transformers import LlavaForConditionalGeneration
from transformers.masking_utils import create_causal_mask

import vlmprune
from vlmprune.adapters import decoder as decoder_module
from vlmprune.adapters.decoder import decoder_stack
from vlmprune.eval.tiny import image_prompt, llava_7b_config, llava_config

CONFIGS = {
    "unpatched": None,
    "cls k64 (vision)": ("cls", {"keep": 64}),
    "fastv K2 k64": ("fastv", {"layer": 2, "keep": 64}),
    "dart K2 k64": ("dart", {"layer": 2, "keep": 64}),
    "pdrop 8/16/24 x0.5": ("pdrop", {"keep": 1}),
    "transprune 7/9/12 r0.875": ("transprune", {"prune_ratio": 0.875}),
    "exit K16": ("exit", {"layer": 16, "keep": 0}),
}


class Timer:
    def __init__(self, device):
        self.cuda = device.type == "cuda"

    def __enter__(self):
        if self.cuda:
            self.start, self.end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            self.start.record()
        else:
            self.t0 = time.perf_counter()
        return self

    def __exit__(self, *exc):
        if self.cuda:
            self.end.record()
            torch.cuda.synchronize()
            self.ms = self.start.elapsed_time(self.end)
        else:
            self.ms = (time.perf_counter() - self.t0) * 1e3


def median_ms(fn, device, repeats, warmup=2):
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        with Timer(device) as t:
            fn()
        times.append(t.ms)
    return statistics.median(times)


def time_cuts(prefill, device, repeats) -> float:
    """Median total time of the decoder cuts of one prefill, CUDA events around `DecoderStages.cut`.
    Separate runs from the prefill timing: the events synchronise, which would stall the prefill."""
    times, original = [], decoder_module.DecoderStages.cut

    def timed_cut(self, *a, **k):
        with Timer(device) as t:
            out = original(self, *a, **k)
        times.append(t.ms)
        return out

    decoder_module.DecoderStages.cut = timed_cut
    try:
        with torch.no_grad():
            prefill()  # warmup
            times.clear()
            per_call = []
            for _ in range(repeats):
                n = len(times)
                prefill()
                per_call.append(sum(times[n:]))
    finally:
        decoder_module.DecoderStages.cut = original
    return statistics.median(per_call)


def kv_bytes(cache) -> int:
    return sum(layer.keys.numel() * layer.keys.element_size() * 2 for layer in cache.layers)


def plain_run(model, embeds, columns_by_layer):
    """The decoder by hand: every layer on its own columns (`columns_by_layer[l]`: None = all of the
    previous layer's), HF's own rotary embeddings and masks, no scoring."""
    stack = decoder_stack(model)
    pos = torch.arange(embeds.shape[1], device=embeds.device)[None].expand(embeds.shape[0], -1)
    cos, sin = stack.rotary_emb(embeds, pos)
    h, mask = embeds, create_causal_mask(stack.config, embeds, None, None)
    for i, layer in enumerate(stack.layers):
        cols = columns_by_layer.get(i)
        if cols is not None:
            g = lambda t: t.gather(1, cols[..., None].expand(-1, -1, t.shape[-1]))  # noqa: E731
            h, cos, sin, pos = g(h), g(cos), g(sin), pos.gather(1, cols)
            mask = create_causal_mask(stack.config, h, None, None)
        h = layer(h, attention_mask=mask, position_embeddings=(cos, sin), position_ids=pos)
    return model.lm_head(stack.norm(h[:, -1:]))


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--tiny", action="store_true", help="a tiny LLaVA (24 layers, 4x4 image grid... scaled) on the CPU")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    if args.tiny:
        cfg = llava_config(image_size=336, patch_size=14, text_layers=32, text_hidden=64, vision_layers=2,
                           vocab_size=1100, image_token_id=1050)
    else:
        cfg = llava_7b_config()
    with torch.device(device):
        torch.manual_seed(0)
        model = LlavaForConditionalGeneration(cfg).to(dtype).eval()
    n_vis = (cfg.vision_config.image_size // cfg.vision_config.patch_size) ** 2
    ids = torch.tensor([image_prompt(1, n_vis, before=5, after=30, seed=i, image_token=cfg.image_token_id, vocab=1000)
                        for i in range(args.batch)], device=device)
    pv = torch.randn(args.batch, 3, cfg.vision_config.image_size, cfg.vision_config.image_size, device=device, dtype=dtype)
    with torch.no_grad():
        feats = torch.cat(list(model.model.get_image_features(pixel_values=pv, return_dict=True).pooler_output))
        embeds = model.get_input_embeddings()(ids)
        embeds[ids == cfg.image_token_id] = feats.to(dtype)
    with torch.no_grad():
        encoder_ms = median_ms(lambda: model.model.get_image_features(pixel_values=pv, return_dict=True), device,
                               args.repeats)
    rows = {}
    for name, spec in CONFIGS.items():
        vlmprune.unpatch(model)
        if spec is not None:
            vlmprune.patch(model, spec[0], **spec[1])
        with torch.no_grad():
            prefill = lambda: model(input_ids=ids, pixel_values=pv, use_cache=True, logits_to_keep=1)  # noqa: E731
            prefill_ms = median_ms(prefill, device, args.repeats)
            out = prefill()
            kv = kv_bytes(out.cache)
            tok = out.logits[:, -1].argmax(-1, keepdim=True)
            mask = torch.ones(args.batch, ids.shape[1] + 1, dtype=torch.long, device=device)
            step_pos = torch.full((args.batch, 1), ids.shape[1], device=device)
            steps = []
            for _ in range(args.repeats + 1):  # each step continues a fresh prefill's cache
                cache = prefill().cache
                with Timer(device) as t:
                    model(input_ids=tok, cache=cache, attention_mask=mask, use_cache=True, position_ids=step_pos)
                steps.append(t.ms)
            decode_ms = statistics.median(steps[1:])
        cuts_ms = time_cuts(prefill, device, args.repeats) if spec is not None and spec[0] != "cls" else 0.0
        # the plain run of the same work: the columns the patched prefill kept, by hand
        plain_ms = None
        adapter = model.__dict__.get("_vlmprune_adapter")
        if adapter is not None and adapter.decoder is not None and adapter._cuts:
            cols = {p.layer: c.cols.clamp(min=0) for p, c in zip(adapter.decoder.points, adapter._cuts)}
            with torch.no_grad():
                plain_ms = median_ms(lambda: plain_run(model, embeds, cols), device, args.repeats)
        rows[name] = dict(prefill_ms=prefill_ms, decode_step_ms=decode_ms, kv_cache_mib=kv / 2**20,
                          cuts_ms=cuts_ms, plain_decoder_ms=plain_ms)
        print(name, json.dumps(rows[name]), flush=True)
    import transformers

    env = dict(device=torch.cuda.get_device_name() if device.type == "cuda" else "cpu", torch=torch.__version__,
               transformers=transformers.__version__, batch=args.batch, visual_tokens=n_vis,
               prompt_len=ids.shape[1], dtype=str(dtype), encoder_ms=encoder_ms)
    print(f"vision encoder alone: {encoder_ms:.1f} ms")
    print("| config | prefill ms | prefill - encoder ms | plain decoder ms | cuts ms (% of prefill) | decode step ms | KV cache MiB |")
    print("|---|---|---|---|---|---|---|")
    for name, r in rows.items():
        share = f"{r['cuts_ms']:.2f} ({100 * r['cuts_ms'] / r['prefill_ms']:.1f}%)" if r["cuts_ms"] else "—"
        plain = f"{r['plain_decoder_ms']:.1f}" if r["plain_decoder_ms"] else "—"
        print(f"| {name} | {r['prefill_ms']:.1f} | {r['prefill_ms'] - encoder_ms:.1f} | {plain} | {share} | "
              f"{r['decode_step_ms']:.2f} | {r['kv_cache_mib']:.0f} |")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(dict(env=env, rows=rows), f, indent=1)



if __name__ == "__main__":
    main()
