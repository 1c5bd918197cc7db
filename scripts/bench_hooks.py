"""Where a method's hook overhead goes, on CUDA: the plain encoder against the patched one (7B
LLaVA shapes, one decoder layer), as wall time per call (medians of synchronised calls, two
rounds) and as device time per call by kernel (torch.profiler, 10 calls each). The extra device
time is what the signals cost the GPU; the rest of the wall-time difference is host time.

    python scripts/bench_hooks.py --method flowcut --batch 8

A benchmark script, not a test."""

from __future__ import annotations

import argparse
import copy
import time

import torch
from torch.profiler import ProfilerActivity, profile
from transformers import LlavaForConditionalGeneration

import vlmprune
from bench_methods import median, once  # this script's directory is on sys.path when run as a script
from vlmprune.eval.tiny import llava_7b_config


def wall_ms(fn, n: int = 30) -> tuple[float, float]:
    """(median, min) of n synchronised calls, ms."""
    times = [once(fn) for _ in range(n)]
    return median(times), min(times)


def device_table(fn, calls: int = 10, rows: int = 6) -> None:
    """Device time per call, total and by kernel (the top `rows`, plus vlmprune's own)."""
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            fn()
        torch.cuda.synchronize()
    events = [e for e in prof.key_averages() if e.device_type.name == "CUDA"]
    per_call = lambda e: e.self_device_time_total / calls / 1e3  # noqa: E731
    print(f"  device time per call {sum(map(per_call, events)):.2f} ms; by kernel (ms per call, launches per call):")
    top = sorted(events, key=per_call, reverse=True)[:rows]
    ours = [e for e in events if e not in top and e.key.startswith("_")]  # Triton kernels: _rows_kernel, ...
    for e in top + ours:
        print(f"  {per_call(e):8.3f}  x{e.count // calls:<4} {e.key[:90]}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--method", default="flowcut")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--keep", type=int, default=64)
    args = ap.parse_args()
    cfg = llava_7b_config()
    cfg.text_config.num_hidden_layers = 1  # only the encoder and projector run
    dev = torch.device("cuda")
    with dev:
        plain_model = LlavaForConditionalGeneration(cfg).to(torch.bfloat16).eval()
    model = copy.deepcopy(plain_model)
    vlmprune.patch(model, method=args.method, keep=args.keep)
    side = cfg.vision_config.image_size
    pv = torch.randn(args.batch, 3, side, side, device=dev, dtype=torch.bfloat16)
    plain = lambda: plain_model.model.get_image_features(pixel_values=pv, return_dict=True)  # noqa: E731
    hooked = lambda: model.model.get_image_features(pixel_values=pv, return_dict=True)  # noqa: E731
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, {time.strftime('%Y-%m-%d')}: "
          f"{args.method}, batch {args.batch}")
    with torch.no_grad():
        for _ in range(5):
            plain(), hooked()
        for rnd in range(2):
            (a, a_min), (b, b_min) = wall_ms(plain), wall_ms(hooked)
            print(f"round {rnd}: plain {a:.2f} ms (min {a_min:.2f}), hooked {b:.2f} (min {b_min:.2f}), "
                  f"difference {b - a:+.2f} (min {b_min - a_min:+.2f})")
        for name, fn in (("plain", plain), ("hooked", hooked)):
            print(f"## {name}")
            device_table(fn)


if __name__ == "__main__":
    main()
