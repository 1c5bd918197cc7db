"""Shared by the prefill benchmarks (`bench_qwen.py`, `bench_llava_next.py`): their common options,
the model built and its environment recorded, medians, a timer that splits one call at marks
without a sync inside it, and the marks inside a patched prefill."""

from __future__ import annotations

import argparse
import itertools
import platform
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from typing import Any

import torch

import vlmprune


def median(xs: list[float]) -> float:
    return float(statistics.median(xs))


def med(splits: list[dict[str, float]], key: str) -> float:
    """The median of one stage's ms over `Timer.split` results (0 where a call had no such mark)."""
    return median([d.get(key, 0.0) for d in splits])


class Timer:
    """Milliseconds of one call: synchronised, CUDA events around it (host clock on CPU). Inside a
    call, `mark(name)` records an event where the stream has got to (on CPU, the host clock), so a
    call's time splits into stages without a sync inside it: `split` gives the stages' ms."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.marks: list[tuple[str, Any]] | None = None

    def now(self) -> Any:
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            return event
        return time.perf_counter()

    def ms(self, a: Any, b: Any) -> float:
        return a.elapsed_time(b) if self.cuda else (b - a) * 1e3

    def mark(self, name: str) -> None:
        if self.marks is not None:
            self.marks.append((name, self.now()))

    def split(self, fn: Callable[[], Any]) -> dict[str, float]:
        """{"total": ms, "<mark>": ms from the previous mark (or the start) to this one, "end": ms
        from the last mark to the end}."""
        if self.cuda:
            torch.cuda.synchronize()
        self.marks = [("start", self.now())]
        try:
            fn()
            self.marks.append(("end", self.now()))
        finally:
            marks, self.marks = self.marks, None
        if self.cuda:
            marks[-1][1].synchronize()
        out = {"total": self.ms(marks[0][1], marks[-1][1])}
        for (_, a), (name, b) in itertools.pairwise(marks):
            out[name] = out.get(name, 0.0) + self.ms(a, b)
        return out

    def __call__(self, fn: Callable[[], Any]) -> float:
        return self.split(fn)["total"]


def markdown(header: list[str], rows: list[list[str]]) -> list[str]:
    """A markdown table's lines: the header, its rule, one line of cells per row."""
    line = lambda cells: "| " + " | ".join(cells) + " |"
    return [line(header), "|" + "---|" * len(header)] + [line(r) for r in rows]


def patched(model, args, timer: Timer) -> Iterator[tuple[str, float, dict[str, Any]]]:
    """`model` patched with each of `args.methods` at each of `args.ratios` in turn: yields the method,
    the ratio and what `instrument` records; unpatched after each."""
    for method in args.methods:
        for ratio in args.ratios:
            vlmprune.patch(model, method=method, prune_ratio=ratio)
            yield method, ratio, instrument(model._vlmprune_adapter, timer)
            vlmprune.unpatch(model)


def logit_diff(a: Any, b: Any) -> float:
    """The largest absolute difference of two outputs' logits (float32)."""
    return (a.logits.float() - b.logits.float()).abs().max().item()


def mark_after(fn: Callable, timer: Timer, name: str) -> Callable:
    """`fn`, marking `name` on `timer` when it returns."""

    def marked(*args, **kwargs):
        out = fn(*args, **kwargs)
        timer.mark(name)
        return out

    return marked


def instrument(adapter, timer: Timer) -> dict[str, Any]:
    """Marks inside the patched prefill: "signals" when the adapter's encode returns (the encoder's
    signal tables computed), "score_select" when its pruned_inputs starts (scoring, selection and the
    layout done) and, on M-RoPE families, "rope_index" when the unpruned prompt's ids are computed
    (`full_positions`, which the oracle is handed). The kwargs of the latest pruned forward are
    recorded into the dict returned, as they are (clone them after the call, outside the timing)."""
    seen: dict[str, Any] = {}
    pruned_inputs = adapter.pruned_inputs

    def pruned_inputs_marked(*args, **kwargs):
        timer.mark("score_select")
        call, state = pruned_inputs(*args, **kwargs)
        seen["call"] = call
        return call, state

    adapter.encode = mark_after(adapter.encode, timer, "signals")
    adapter.pruned_inputs = pruned_inputs_marked
    if hasattr(adapter, "full_positions"):
        adapter.full_positions = mark_after(adapter.full_positions, timer, "rope_index")
    return seen


def parser(doc: str, tiny: str, out: str) -> argparse.ArgumentParser:
    """The benchmarks' common options (`--tiny` described by `tiny`, `--out` defaulting to `out`)."""
    ap = argparse.ArgumentParser(
        description=doc, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument(
        "--device",
        default="cuda" if torch.cuda.is_available() else "cpu",
        choices=["cuda", "cpu"],
    )
    ap.add_argument("--tiny", action="store_true", help=tiny)
    ap.add_argument("--batch-sizes", default="1,8")
    ap.add_argument("--methods", default="cls,divprune")
    ap.add_argument(
        "--ratios", default="0.75,0.9", help="prune_ratio values (fraction removed)"
    )
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--attn", default="sdpa")
    ap.add_argument(
        "--dtype", default=None, help="bf16 / fp32 (default: bf16 on cuda, fp32 on cpu)"
    )
    ap.add_argument("--out", default=out)
    return ap


def build(
    args, make: Callable, names: tuple[str, str], tower: str
) -> tuple[Any, Any, Timer, dict[str, Any]]:
    """`make(tiny, device, dtype, attn)` -> (model, extra) built as `args` say (their lists parsed in
    place), timed, named `names[args.tiny]`; a "vision" mark where its `model.model.<tower>` ends
    (in place); returns the model, its extra, its `Timer` and the run's environment."""
    import transformers

    try:
        import triton  # noqa: F401  (its version only)
    except ImportError:
        pass
    args.methods = args.methods.split(",")
    args.ratios = [float(x) for x in args.ratios.split(",")]
    device = torch.device(args.device)
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32, None: None}[args.dtype] or (
        torch.bfloat16 if device.type == "cuda" else torch.float32
    )
    name = names[args.tiny]
    t0 = time.perf_counter()
    model, extra = make(args.tiny, device, dtype, args.attn)
    env = {
        "device": torch.cuda.get_device_name()
        if device.type == "cuda"
        else platform.processor() or "cpu",
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "triton": getattr(sys.modules.get("triton"), "__version__", None),
        "python": platform.python_version(),
        "date": time.strftime("%Y-%m-%d"),
        "model": name,
        "params": sum(p.numel() for p in model.parameters()),
        "dtype": str(dtype),
        "attn": args.attn,
        "build_s": time.perf_counter() - t0,
        "argv": sys.argv[1:],
        "repeats": args.repeats,
        "warmup": args.warmup,
    }
    print(
        f"# {name}: {env['params'] / 1e9:.2f} B params, built in {env['build_s']:.1f} s on {env['device']}; "
        f"torch {env['torch']}, transformers {env['transformers']}, triton {env['triton']}",
        flush=True,
    )
    timer = Timer(device)
    getattr(model.model, tower).register_forward_hook(lambda *_: timer.mark("vision"))
    return model, extra, timer, env
