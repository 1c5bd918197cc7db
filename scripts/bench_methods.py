"""Per-method overhead on the accelerator: the extra encoder work of the signal hooks plus scoring
and selection, at LLaVA-1.5-7B shapes (576 visual tokens, D=4096), next to the pruned prefill.

    python scripts/bench_methods.py --batch-sizes 1,8 --keep 64 --out bench_methods.json

A benchmark script, not a test: it needs CUDA for meaningful numbers."""

from __future__ import annotations

import argparse
import json
import os
import time

import torch

import vlmprune
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


def timed(fn, repeats: int, warmup: int = 3) -> float:
    """Median milliseconds of fn() with device sync."""
    for _ in range(warmup):
        fn()
    return median([once(fn) for _ in range(repeats)])


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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--batch-sizes", default="1,8")
    ap.add_argument("--keep", type=int, default=64)
    ap.add_argument("--methods", default=",".join(vlmprune.available_methods()))
    ap.add_argument("--repeats", type=int, default=50)
    ap.add_argument("--out", default="bench_methods.json")
    ap.add_argument("--tiny", action="store_true", help="a small random model (CPU smoke run)")
    ap.add_argument("--profile", default="", help="comma-separated methods: print a torch.profiler table of "
                    "their hooked encoder call at the last batch size (host and device time per op)")
    args = ap.parse_args()
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    cfg = llava_config(image_size=336, patch_size=14) if args.tiny else llava_7b_config()
    cfg.text_config.num_hidden_layers = 1  # only the encoder and projector run here
    with dev:
        model = LlavaForConditionalGeneration(cfg).to(dtype).eval()
    rows = []
    print("| method | batch | encoder ms | hooks ms | score + select ms | overhead ms | kernels == torch refs |")
    print("|---|---|---|---|---|---|---|")
    for b in [int(x) for x in args.batch_sizes.split(",")]:
        pv = torch.randn(b, 3, 336, 336, device=dev, dtype=dtype)
        enc = lambda: model.model.get_image_features(pixel_values=pv, return_dict=True)  # noqa: E731
        with torch.no_grad():
            for method in args.methods.split(","):
                # the plain and the hooked encoder alternate, so that clock and load drift hit both alike
                plain, hooked = [], []
                for r in range(args.repeats + 3):
                    vlmprune.unpatch(model)
                    t_plain = once(enc)
                    vlmprune.patch(model, method=method, keep=args.keep)
                    t_hooked = once(enc)
                    if r >= 3:
                        plain.append(t_plain)
                        hooked.append(t_hooked)
                adapter = model._vlmprune_adapter
                feats = list(enc().pooler_output)
                k = torch.full((b,), args.keep)  # on the host, as the adapter passes it

                def score():
                    signals = adapter.signals_for(feats)
                    return run_scorer(adapter.stage.scorer, signals, signals.features, k)

                select = timed(score, args.repeats)
                idx = score()[0]
                prev = os.environ.get("VLMPRUNE_KERNELS")
                os.environ["VLMPRUNE_KERNELS"] = "torch"  # the torch references must keep the same tokens
                agree = bool(torch.equal(score()[0], idx))
                os.environ.pop("VLMPRUNE_KERNELS") if prev is None else os.environ.update(VLMPRUNE_KERNELS=prev)
                vlmprune.unpatch(model)
                p, h = median(plain), median(hooked)
                rows.append(dict(method=method, batch=b, keep=args.keep, encode_ms=p, hooks_ms=h - p,
                                 score_select_ms=select, overhead_ms=h - p + select, kernels_agree_with_torch=agree))
                print(f"| {method} | {b} | {p:.2f} | {h - p:+.2f} | {select:.2f} | {h - p + select:.2f} | {agree} |",
                      flush=True)
    for method in [m for m in args.profile.split(",") if m]:
        profile(model, enc, method, args.keep)
    json.dump(dict(device=torch.cuda.get_device_name() if dev.type == "cuda" else "cpu", torch=torch.__version__, rows=rows), open(args.out, "w"), indent=1)


if __name__ == "__main__":
    main()
