"""Per-method overhead on the accelerator at LLaVA-1.5-7B shapes (576 visual tokens, D=4096):

* hooks: the extra time of the encoder call with the method's signal hooks (a copy of the model,
  patched once as in use, against the unpatched one; calls alternate, see `paired`);
* score + select: the scorer and the selection on the recorded signals, alone, synchronised;
* end to end (`--e2e`, the headline): one prefill forward of the patched 7B model (encoder, hooks,
  scoring, selection, decoder on the kept tokens) against the same work without any method: the
  unpatched encoder, the same number of tokens kept at fixed positions, the decoder fed them.
  In a real prefill the host queues scoring behind the encoder, so part of the isolated costs
  overlaps; this column is what a user waits for.

    python scripts/bench_methods.py --batch-sizes 1,8 --keep 64 --e2e --out bench_methods.json

A benchmark script, not a test: it needs CUDA for meaningful numbers."""

from __future__ import annotations

import argparse
import copy
import json
import os
import time

import torch

import vlmprune
from vlmprune.adapters import vit
from vlmprune.adapters.base import run_scorer
from vlmprune.eval.tiny import llava_7b_config, llava_config
from transformers import LlavaForConditionalGeneration


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def once(fn) -> float:
    """Milliseconds of one fn() with device sync."""
    sync()
    t = time.perf_counter()
    fn()
    sync()
    return (time.perf_counter() - t) * 1e3


def median(xs: list[float]) -> float:
    return sorted(xs)[len(xs) // 2]


def profile(model, enc, method: str, keep: int) -> None:
    """torch.profiler's per-op table of 10 hooked encoder calls (after a warm-up)."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as run_profile

    vlmprune.patch(model, method=method, keep=keep)
    with torch.no_grad():
        for _ in range(3):
            enc()
        sync()
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
        with run_profile(activities=activities) as prof:
            for _ in range(10):
                enc()
            sync()
    vlmprune.unpatch(model)
    print(f"\n## profile: {method}, 10 encoder calls")
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25))


def paired(plain, treated, repeats: int, warmup: int = 3) -> dict[str, float]:
    """plain() and treated() called alternately: their medians, the median of the per-pair
    differences (the overhead estimate: robust to drift, which hits both calls of a pair alike)
    and the difference of the minima (the least-loaded machine state), all in ms."""
    for _ in range(warmup):
        plain(), treated()
    a, b = [], []
    for _ in range(repeats):
        a.append(once(plain))
        b.append(once(treated))
    return dict(plain=median(a), treated=median(b), diff=median([y - x for x, y in zip(a, b)]), diff_min=min(b) - min(a))


def prompt(model, b: int, n_vis: int, before: int = 8, after: int = 12) -> dict[str, torch.Tensor]:
    """Batch-b prompts of `before` text tokens, one image's placeholders and `after` text tokens."""
    g = torch.Generator().manual_seed(0)
    tok = model.config.image_token_id
    text = lambda n: torch.randint(3, min(1000, tok), (b, n), generator=g)  # noqa: E731
    ids = torch.cat([text(before), torch.full((b, n_vis), tok), text(after)], 1)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def end_to_end(plain_model, model, pv: torch.Tensor, keep: int, repeats: int) -> dict[str, float]:
    """`paired` times of one prefill without a method (plain_model: its encoder, `keep` tokens at
    fixed positions, the decoder fed them) and of the patched `model` (same weights)."""
    dev, b = pv.device, pv.shape[0]
    side = model.config.vision_config.image_size // model.config.vision_config.patch_size
    n_vis, before = side * side, 8
    inputs = {k: v.to(dev) for k, v in prompt(model, b, n_vis, before=before).items()}
    fixed = torch.linspace(0, n_vis - 1, keep, device=dev).round().long()
    ids, emb = inputs["input_ids"], plain_model.get_input_embeddings()

    def baseline():
        feats = plain_model.model.get_image_features(pixel_values=pv, return_dict=True).pooler_output
        feats = torch.stack(list(feats)) if isinstance(feats, (list, tuple)) else feats
        embeds = torch.cat([emb(ids[:, :before]), feats[:, fixed].to(emb.weight.dtype), emb(ids[:, before + n_vis:])], 1)
        mask = torch.ones(embeds.shape[:2], dtype=torch.long, device=dev)
        plain_model(inputs_embeds=embeds, attention_mask=mask, logits_to_keep=1)

    return paired(baseline, lambda: model(**inputs, pixel_values=pv, logits_to_keep=1), repeats)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--batch-sizes", default="1,8")
    ap.add_argument("--keep", type=int, default=64)
    ap.add_argument("--methods", default=",".join(vlmprune.available_methods()))
    ap.add_argument("--repeats", type=int, default=40)
    ap.add_argument("--out", default="bench_methods.json")
    ap.add_argument("--tiny", action="store_true", help="a small random model (CPU smoke run)")
    ap.add_argument("--e2e", action="store_true", help="also time whole prefills of the 7B model (see the doc)")
    ap.add_argument("--flush-layers", type=int, default=vit.FLUSH_LAYERS, help="vit.FLUSH_LAYERS for this run")
    ap.add_argument("--flush-mib", type=int, default=vit.FLUSH_BYTES >> 20, help="vit.FLUSH_BYTES / MiB for this run")
    ap.add_argument("--profile", default="", help="comma-separated methods: print a torch.profiler table of "
                    "their hooked encoder call at the last batch size (host and device time per op)")
    args = ap.parse_args()
    vit.FLUSH_LAYERS, vit.FLUSH_BYTES = args.flush_layers, args.flush_mib << 20
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    cfg = llava_config(image_size=336, patch_size=14) if args.tiny else llava_7b_config()
    if not args.e2e:
        cfg.text_config.num_hidden_layers = 1  # only the encoder and projector run
    with dev:
        plain_model = LlavaForConditionalGeneration(cfg).to(dtype).eval()
    model = copy.deepcopy(plain_model)  # the same weights; patched per method, plain_model never
    rows = []
    print("| method | batch | encoder ms | hooks ms (min) | score + select ms (min) | e2e without method ms "
          "| e2e overhead ms (min) | kernels == torch refs |")
    print("|---|---|---|---|---|---|---|---|")
    for b in [int(x) for x in args.batch_sizes.split(",")]:
        pv = torch.randn(b, 3, cfg.vision_config.image_size, cfg.vision_config.image_size, device=dev, dtype=dtype)
        with torch.no_grad():
            for method in args.methods.split(","):
                vlmprune.patch(model, method=method, keep=args.keep)
                enc = lambda: model.model.get_image_features(pixel_values=pv, return_dict=True)  # noqa: E731
                t = paired(lambda: plain_model.model.get_image_features(pixel_values=pv, return_dict=True), enc,
                           args.repeats)
                adapter = model._vlmprune_adapter
                feats = list(enc().pooler_output)
                k = torch.full((b,), args.keep)  # on the host, as the adapter passes it
                question = model.get_input_embeddings()(torch.randint(3, 90, (b, 16), device=dev))

                def score():
                    signals = adapter.signals_for(feats)
                    if adapter.request.text_embeds:  # cdpruner, quota: a 16-token question per image
                        signals.text_embeds, signals.text_counts = question, (16,) * b
                    return run_scorer(adapter.stage.scorer, signals, signals.features, k)

                for _ in range(3):
                    score()
                select = [once(score) for _ in range(args.repeats)]
                idx = score()[0]
                prev = os.environ.get("VLMPRUNE_KERNELS")
                os.environ["VLMPRUNE_KERNELS"] = "torch"  # the torch references must keep the same tokens
                agree = bool(torch.equal(score()[0], idx))
                os.environ.pop("VLMPRUNE_KERNELS") if prev is None else os.environ.update(VLMPRUNE_KERNELS=prev)
                row = dict(method=method, batch=b, keep=args.keep, encode_ms=t["plain"], hooks_ms=t["diff"],
                           hooks_min_ms=t["diff_min"], score_select_ms=median(select),
                           score_select_min_ms=min(select), kernels_agree_with_torch=agree)
                e2e = ("", "")
                if args.e2e:
                    e = end_to_end(plain_model, model, pv, args.keep, args.repeats)
                    row.update(e2e_baseline_ms=e["plain"], e2e_ms=e["treated"], e2e_overhead_ms=e["diff"],
                               e2e_overhead_min_ms=e["diff_min"])
                    e2e = (f"{e['plain']:.2f}", f"{e['diff']:+.2f} ({e['diff_min']:+.2f})")
                vlmprune.unpatch(model)
                rows.append(row)
                print(f"| {method} | {b} | {t['plain']:.2f} | {t['diff']:+.2f} ({t['diff_min']:+.2f}) "
                      f"| {median(select):.2f} ({min(select):.2f}) | {' | '.join(e2e)} | {agree} |", flush=True)
    for method in [m for m in args.profile.split(",") if m]:
        profile(model, lambda: model.model.get_image_features(pixel_values=pv, return_dict=True), method, args.keep)
    json.dump(dict(device=torch.cuda.get_device_name() if dev.type == "cuda" else "cpu", torch=torch.__version__,
                   date=time.strftime("%Y-%m-%d"), rows=rows), open(args.out, "w"), indent=1)


if __name__ == "__main__":
    main()
