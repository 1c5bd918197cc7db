"""Host time of the steps a patched prefill runs after the encoder, in place and warm.

    python scripts/bench_host.py --methods random,flowcut --batch 8

Each step (`plan_layout`, `signals_for`, `run_scorer`, `assemble`) is timed where the prefill calls
it ("in place": right after the encoder's hundreds of dispatched ops) and again at once on the same
arguments ("warm": the call repeated). No device sync: on CUDA these are the host's times, which the
device waits for when the prefill is host-bound. A 7B-shaped LLaVA prompt (576 visual tokens per
image) with a small random model (`--dims tiny`, the default: CPU in minutes) or the 7B shapes.
On CPU, `run_scorer` includes the scorer's compute (the torch references); the other steps are
host work on any device. A benchmark script, not a test.

Why: on the 2-core development machine every step took 3-5x longer in place than warm
(`plan_layout` ~290 / ~65 us, batch 8), and so did plain Python: a loop that takes 7 us after
2 ms of spinning takes ~120 us after 400 small torch ops. The dispatcher's code seems to evict
the interpreter's and numpy's from the caches. A loop of a host step undercounts what it costs in
a prefill; fewer distinct steps after the encoder is what saves host time there."""

from __future__ import annotations

import argparse
import time

import torch
from transformers import LlavaForConditionalGeneration

import vlmprune
from bench_methods import median, prompt  # this script's directory is on sys.path when run as a script
from vlmprune.adapters import base
from vlmprune.eval.tiny import llava_7b_config, llava_config

STEPS = ("plan_layout", "signals_for", "run_scorer", "assemble")


def timed(times: dict[str, list[tuple[float, float]]], name: str, fn):
    """fn, recording (in place, warm) microseconds of each call: the call, then the same call again."""

    def wrapper(*args, **kwargs):
        t0 = time.perf_counter()
        fn(*args, **kwargs)
        t1 = time.perf_counter()
        out = fn(*args, **kwargs)
        times.setdefault(name, []).append(((t1 - t0) * 1e6, (time.perf_counter() - t1) * 1e6))
        return out

    return wrapper


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--methods", default="random,uniform")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--keep", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=30)
    ap.add_argument("--dims", choices=("tiny", "7b"), default="tiny")
    args = ap.parse_args()
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if args.dims == "7b":
        cfg = llava_7b_config()
    else:
        cfg = llava_config(image_size=336, patch_size=14, vision_layers=24, vision_hidden=16, vision_heads=2,
                           vocab_size=2000, image_token_id=1999)
    cfg.text_config.num_hidden_layers = 1
    torch.set_num_threads(1)  # the host steps are single-threaded; keeps CPU runs steady
    with dev:
        model = LlavaForConditionalGeneration(cfg).to(torch.bfloat16 if dev.type == "cuda" else torch.float32).eval()
    size = cfg.vision_config.image_size
    side = size // cfg.vision_config.patch_size
    pv = torch.randn(args.batch, 3, size, size, device=dev, dtype=model.dtype)
    inputs = {k: v.to(dev) for k, v in prompt(model, args.batch, side * side).items()}
    times: dict[str, list[tuple[float, float]]] = {}
    # where the prefill looks each step up: the adapter's method, the others module-level in base
    owners = {name: base.Adapter if name == "signals_for" else base for name in STEPS}
    saved = {name: getattr(owners[name], name) for name in STEPS}
    for name, fn in saved.items():
        setattr(owners[name], name, timed(times, name, fn))
    print(f"{dev}, batch {args.batch}, keep {args.keep}, {args.dims} dims; medians of {args.repeats} prefills, us\n")
    print("| method | " + " | ".join(f"{s} in place / warm" for s in STEPS) + " | sum in place / warm |")
    print("|---|" + "---|" * (len(STEPS) + 1))
    try:
        with torch.no_grad():
            for method in args.methods.split(","):
                vlmprune.patch(model, method=method, keep=args.keep)
                for _ in range(3):
                    model(**inputs, pixel_values=pv, logits_to_keep=1)
                times.clear()
                for _ in range(args.repeats):
                    model(**inputs, pixel_values=pv, logits_to_keep=1)
                vlmprune.unpatch(model)
                cells = [(median([a for a, _ in times[s]]), median([b for _, b in times[s]])) for s in STEPS]
                total = (sum(a for a, _ in cells), sum(b for _, b in cells))
                print(f"| {method} | " + " | ".join(f"{a:.0f} / {b:.0f}" for a, b in cells + [total]) + " |", flush=True)
    finally:
        for name, fn in saved.items():
            setattr(owners[name], name, fn)


if __name__ == "__main__":
    main()
