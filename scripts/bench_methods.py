"""Per-method overhead on the accelerator: the extra encoder work of the signal hooks plus scoring
and selection, at LLaVA-1.5-7B shapes (576 visual tokens, D=4096), next to the pruned prefill.

    python scripts/bench_methods.py --batch-sizes 1,8 --keep 64 --out bench_methods.json

A benchmark script, not a test: it needs CUDA for meaningful numbers."""

from __future__ import annotations

import argparse
import json
import time

import torch

import vlmprune
from vlmprune.adapters.base import run_scorer
from vlmprune.eval.tiny import llava_7b_config, llava_config
from transformers import LlavaForConditionalGeneration


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def timed(fn, repeats: int, warmup: int = 3) -> float:
    """Median milliseconds of fn() with device sync."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        sync()
        t = time.perf_counter()
        fn()
        sync()
        times.append((time.perf_counter() - t) * 1e3)
    return sorted(times)[len(times) // 2]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--batch-sizes", default="1,8")
    ap.add_argument("--keep", type=int, default=64)
    ap.add_argument("--methods", default=",".join(vlmprune.available_methods()))
    ap.add_argument("--repeats", type=int, default=50)
    ap.add_argument("--out", default="bench_methods.json")
    ap.add_argument("--tiny", action="store_true", help="a small random model (CPU smoke run)")
    args = ap.parse_args()
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    cfg = llava_config(image_size=336, patch_size=14) if args.tiny else llava_7b_config()
    cfg.text_config.num_hidden_layers = 1  # only the encoder and projector run here
    with dev:
        model = LlavaForConditionalGeneration(cfg).to(dtype).eval()
    rows = []
    for b in [int(x) for x in args.batch_sizes.split(",")]:
        pv = torch.randn(b, 3, 336, 336, device=dev, dtype=dtype)
        enc = lambda: model.model.get_image_features(pixel_values=pv, return_dict=True)  # noqa: E731
        with torch.no_grad():
            for method in args.methods.split(","):
                plain = timed(enc, args.repeats)  # paired with each method: clocks drift between methods
                vlmprune.patch(model, method=method, keep=args.keep)
                adapter = model._vlmprune_adapter
                hooked = timed(enc, args.repeats)
                feats = list(enc().pooler_output)
                k = torch.full((b,), args.keep, device=dev)

                def score():
                    signals = adapter.signals_for(feats)
                    return run_scorer(adapter.stage.scorer, signals, signals.features, k)

                select = timed(score, args.repeats)
                vlmprune.unpatch(model)
                rows.append(dict(method=method, batch=b, keep=args.keep, encode_ms=plain, hooks_ms=hooked - plain,
                                 score_select_ms=select, overhead_ms=hooked - plain + select))
                print(f"| {method} | {b} | {plain:.2f} | {hooked - plain:+.2f} | {select:.2f} | {hooked - plain + select:.2f} |",
                      flush=True)
    json.dump(dict(device=torch.cuda.get_device_name() if dev.type == "cuda" else "cpu", torch=torch.__version__, rows=rows), open(args.out, "w"), indent=1)


if __name__ == "__main__":
    main()
