"""The `vlmprune` command: demo, sweep, show, bench, calibrate, methods, models, lmms-task-path.

Bad input (unknown method or model, keep < 0, missing or undecodable file, ...) ends with one
line on stderr and exit status 2; set VLMPRUNE_DEBUG=1 for the traceback."""

from __future__ import annotations

import functools
import os
import sys
from pathlib import Path
from typing import Any, Callable, Optional

import typer
from rich.console import Console
from rich.table import Table

from vlmprune.eval import DEFAULT_METHODS, DEFAULT_MODEL

app = typer.Typer(
    add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
    help="Prune visual tokens of Hugging Face vision-language models: demo, sweeps, overlays, benchmarks.",
)
console = Console(width=None if sys.stdout.isatty() else 160)
MODEL_HELP = ("'shapes-llava' / 'shapes-qwen2-vl' (embedded, trained on the shapes benchmark), 'tiny' / "
              "'qwen2-vl-tiny' (random, 576 visual tokens), 'llava-7b-shapes' / 'qwen2.5-vl-7b-shapes' (random 7B "
              "weights), or a path / hub id")


def friendly(fn: Callable) -> Callable:
    """Turn bad-input errors into one line on stderr and exit status 2."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except (ValueError, TypeError, OSError) as e:
            if os.environ.get("VLMPRUNE_DEBUG"):
                raise
            typer.echo(f"vlmprune {fn.__name__}: error: {' '.join(str(e).split())}", err=True)
            raise typer.Exit(2) from None

    return wrapper


def parse_list(text: str | None, option: str, kind: type = str) -> list | None:
    """'a,b,c' -> [kind(a), ...]; None stays None."""
    if text is None:
        return None
    try:
        values = [kind(v.strip()) for v in text.split(",") if v.strip()]
    except ValueError:
        raise ValueError(f"{option}: expected comma-separated {kind.__name__} values, got {text!r}") from None
    if not values:
        raise ValueError(f"{option}: no values in {text!r}")
    if kind in (int, float) and any(v < 0 for v in values):
        raise ValueError(f"{option}: values must be >= 0, got {text!r}")
    return values


def check_methods(methods: list[str]) -> None:
    """Unknown method names fail before the model is loaded."""
    from vlmprune.scorers import scorer_class

    for m in methods:
        scorer_class(m)


def show_table(title: str, rows: list[dict[str, Any]], columns: dict[str, str]) -> None:
    """Print `rows` as a rich table; `columns` maps row keys to headers (empty columns are left out)."""
    columns = {k: h for k, h in columns.items() if any(r.get(k) is not None for r in rows)}
    table = Table(title=title)
    for key, header in columns.items():
        numeric = all(isinstance(r.get(key), (int, float, type(None))) for r in rows)
        table.add_column(header, justify="right" if numeric else "left")
    for row in rows:
        table.add_row(*(fmt(row.get(key)) for key in columns))
    console.print(table)


def fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


@app.command()
@friendly
def demo(
    keep: int = typer.Option(64, help="visual tokens kept per image"),
    method: str = typer.Option("cls", help="pruning method (see `vlmprune methods`)"),
    batch_size: int = typer.Option(2, help="images per batch"),
    repeats: int = typer.Option(3, help="timed runs (median reported)"),
    new_tokens: int = typer.Option(8, help="tokens to generate"),
    device: str = typer.Option("cpu", help="cpu (a model this small is launch-bound on a GPU) | cuda | auto"),
) -> None:
    """Prune a tiny random LLaVA (576 visual tokens per image) and compare with the unpruned model."""
    import vlmprune
    from vlmprune.config import make_config
    from vlmprune.eval.bench import measure
    from vlmprune.eval.sweep import DEFAULT_PROMPT, load_vlm, random_images

    make_config(method, keep=keep)  # bad method / keep fails before the model is built
    vlm = load_vlm("tiny", device)
    images = [it.image for it in random_images(batch_size, vlm.image_size).items()]
    inputs = vlm.inputs(images, [DEFAULT_PROMPT] * batch_size)
    base, base_gen = measure(vlm.model, inputs, repeats, 1, new_tokens)
    with vlmprune.pruning(vlm.model, method, keep=keep):
        pruned, pruned_gen = measure(vlm.model, inputs, repeats, 1, new_tokens)
        kept = len(vlmprune.last_selection(vlm.model)[0][0])
    n = vlm.n_visual
    speedup = base["prefill_ms"] / pruned["prefill_ms"]
    rows = [dict(base, method="unpruned", keep="-", visual=n, speedup="1.00x"),
            dict(pruned, method=method, keep=str(keep), visual=kept, speedup=f"{speedup:.2f}x")]
    show_table(f"tiny LLaVA, batch {batch_size}, device {vlm.device}", rows, {
        "method": "method", "keep": "keep", "visual": "visual tokens / image", "prefill_len": "prefill seq len",
        "prefill_ms": "prefill ms (median)", "ttft_ms": "TTFT ms", "speedup": "prefill speed-up"})
    console.print(f"{method} keep={keep}: kept {kept} of {n} visual tokens per image; prefill sequence "
                  f"{base['prefill_len']} -> {pruned['prefill_len']} tokens; prefill speed-up {speedup:.2f}x")
    for i in range(batch_size):
        console.print(f"image {i}: unpruned greedy tokens {base_gen.tokens[i]}")
        console.print(f"image {i}: pruned   greedy tokens {pruned_gen.tokens[i]}")


@app.command()
@friendly
def sweep(
    model: str = typer.Option(DEFAULT_MODEL, help=MODEL_HELP),
    methods: str = typer.Option(",".join(DEFAULT_METHODS), help="comma-separated methods"),
    keep: Optional[str] = typer.Option(None, help="comma-separated visual tokens kept per image [all, 1/3, 2/9, 1/9 of "
                                                  "the model's: 576,192,128,64 for LLaVA-1.5, 144,48,32,16 for "
                                                  "shapes-qwen2-vl]"),
    prune_ratio: Optional[str] = typer.Option(None, help="comma-separated fractions removed, instead of --keep"),
    data: Optional[str] = typer.Option(None, help="JSONL of {image, question, answer?}, or 'shapes[:DIR]', or 'shapes-two-turn[:DIR]' (two images, two questions, one conversation; scored on turn 2); default: "
                                                  "'shapes' for an embedded model, else random images (fidelity)"),
    limit: Optional[int] = typer.Option(None, help="items to evaluate (shapes: 100 test items; random images: 8)"),
    batch_size: int = typer.Option(4, help="items per batch"),
    max_new_tokens: int = typer.Option(8, help="greedy tokens per answer"),
    out: Path = typer.Option(Path("sweep-out"), help="output folder (a rerun skips finished cells)"),
    device: str = typer.Option("auto"),
    dtype: str = typer.Option("auto", help="auto | bf16 | fp16 | fp32"),
    attn: str = typer.Option("sdpa", help="sdpa | eager | flash_attention_2"),
    overlays: int = typer.Option(0, help="also draw the kept patches of every method on the first N items (overlays.png)"),
) -> None:
    """Every method x keep on a task: table, results.csv, results.json, accuracy_vs_tokens.png."""
    from rich.progress import Progress

    from vlmprune.eval.sweep import SweepSpec, default_data, run_sweep, summary_rows

    method_list = parse_list(methods, "--methods")
    check_methods(method_list)
    if overlays < 0:
        raise ValueError(f"--overlays must be >= 0 (items drawn), got {overlays}")
    ratios = parse_list(prune_ratio, "--prune-ratio", float)
    if keep is not None and ratios is not None:
        raise ValueError("give --keep or --prune-ratio, not both")
    keeps = parse_list(keep, "--keep", int) if ratios is None else None
    spec = SweepSpec(model=model, methods=method_list, keeps=keeps,
                     ratios=ratios, data=data if data is not None else default_data(model), limit=limit,
                     batch_size=batch_size, max_new_tokens=max_new_tokens, out=str(out), device=device, dtype=dtype,
                     attn=attn, overlays=overlays)
    with Progress(console=console) as progress:
        results = run_sweep(spec, progress=progress)
    rows = summary_rows(results)
    metric = rows[0]["metric_name"] if rows else "metric"
    show_table(f"{model} on {results['task']} ({results['device']})", rows, {
        "method": "method", "keep": "keep", "prune_ratio": "ratio", "visual_tokens": "visual tokens",
        "metric": metric, "kl": "first-token KL", **({} if metric == "agreement" else {"agreement": "agreement"}),
        "prefill_tokens": "prefill tokens",
        "prefill_ms": "prefill ms", "ttft_ms": "TTFT ms", "items": "items", "errors": "errors"})
    for name, reason in results.get("unsupported", {}).items():
        console.print(f"skipped {name}: {reason}")
    run = results["last_run"]
    console.print(f"ran {len(run['ran'])} cells, skipped {len(run['skipped'])} finished; wrote {out}/results.csv, "
                  f"{out}/results.json, {out}/accuracy_vs_tokens.png" + (f", {out}/overlays.png" if overlays > 0 else ""))


@app.command()
@friendly
def show(
    image: Path = typer.Argument(..., help="image file"),
    model: str = typer.Option(DEFAULT_MODEL, help=MODEL_HELP),
    method: str = typer.Option("cls"),
    keep: Optional[int] = typer.Option(None, help="visual tokens kept [64 unless --prune-ratio]"),
    prune_ratio: Optional[float] = typer.Option(None, help="fraction removed, instead of --keep"),
    prompt: str = typer.Option("Describe the image.", help="prompt (matters for text-guided methods)"),
    output: Path = typer.Option(Path("overlay.png"), "--output", "-o", help="PNG to write"),
    device: str = typer.Option("auto"),
    dtype: str = typer.Option("auto"),
) -> None:
    """Overlay the kept patches on the image as the encoder sees it (pruned ones dimmed); any-resolution
    images (LLaVA-NeXT, OneVision): on the original image, the base view's and the crops' side by side."""
    from vlmprune.config import make_config
    from vlmprune.eval.sweep import load_image, load_vlm
    from vlmprune.eval.visualise import kept_overlay

    amount = {"prune_ratio": prune_ratio} if prune_ratio is not None else {"keep": 64 if keep is None else keep}
    make_config(method, **amount)  # bad method / amount fails before anything is loaded
    if not image.is_file():
        raise ValueError(f"image {str(image)!r} does not exist")
    try:
        picture = load_image(image)
    except OSError as e:
        raise ValueError(f"cannot decode image {str(image)!r}: {e}") from None
    vlm = load_vlm(model, device, dtype)
    shown = kept_overlay(vlm, picture, method, prompt, **amount)
    output.parent.mkdir(parents=True, exist_ok=True)
    shown.picture.save(output)
    console.print(f"{method}: {shown.caption}; wrote {output}")


@app.command()
@friendly
def bench(
    model: str = typer.Option("tiny", help=MODEL_HELP),
    batch_sizes: str = typer.Option("1,8", help="comma-separated batch sizes"),
    keep: str = typer.Option("576,64", help="comma-separated visual tokens kept per image"),
    method: str = typer.Option("cls"),
    dtype: str = typer.Option("auto", help="auto (bf16 on CUDA) | bf16 | fp16 | fp32"),
    device: str = typer.Option("auto"),
    repeats: int = typer.Option(10, help="timed runs per measurement (median)"),
    warmup: int = typer.Option(2, help="untimed runs before each measurement"),
    new_tokens: int = typer.Option(32, help="tokens generated per run (decode speed)"),
    attn: str = typer.Option("sdpa"),
    out: Path = typer.Option(Path("bench.json"), help="JSON file to write"),
) -> None:
    """Prefill, TTFT, decode speed, memory, KV cache and FLOPs: unpatched vs patched vs oracle."""
    from rich.progress import Progress

    from vlmprune.eval.bench import BenchSpec, run_bench, write_bench

    check_methods([method])
    spec = BenchSpec(model=model, batch_sizes=parse_list(batch_sizes, "--batch-sizes", int),
                     keeps=parse_list(keep, "--keep", int), method=method, dtype=dtype, device=device,
                     repeats=repeats, warmup=warmup, new_tokens=new_tokens, attn=attn)
    if min(spec.batch_sizes) < 1 or repeats < 1 or new_tokens < 1:
        raise ValueError("--batch-sizes, --repeats and --new-tokens must be >= 1")
    with Progress(console=console) as progress:
        bar = progress.add_task("bench", total=len(spec.batch_sizes) * (1 + len(spec.keeps)))
        results = run_bench(spec, advance=lambda what: progress.update(bar, advance=1, description=what))
    write_bench(results, out)
    show_table(f"{model} / {method} on {results['device']}", results["rows"], {
        "batch": "batch", "keep": "keep", "variant": "variant", "prefill_len": "prefill len",
        "prefill_ms": "prefill ms", "ttft_ms": "TTFT ms", "decode_tok_s": "decode tok/s",
        "peak_mem_gib": "peak GiB", "kv_cache_mib": "KV MiB", "decoder_tflops": "TFLOPs",
        "prefill_speedup": "prefill x", "oracle_max_abs_logit_diff": "|Δlogit| vs oracle"})
    console.print(f"wrote {out}")


@app.command()
@friendly
def calibrate(
    method: str = typer.Option("vflowopt", help="method whose schedule is searched (vflowopt)"),
    model: str = typer.Option(DEFAULT_MODEL, help=MODEL_HELP),
    keep: int = typer.Option(64, help="visual tokens kept per image during the search"),
    data: str | None = typer.Option(None, help="'shapes[:DIR]' or a JSONL of {image, question}; default: 'shapes' "
                                                  "for an embedded model, else random images"),
    limit: int = typer.Option(16, help="calibration items"),
    trials: int = typer.Option(16, help="schedules tried (the first is the scorer's defaults)"),
    seed: int = typer.Option(0),
    layers: str | None = typer.Option(None, help="comma-separated cut layers (0-based) [the scorer's defaults]"),
    batch_size: int = typer.Option(4, help="items per batch"),
    out: Path = typer.Option(Path("vflowopt-schedule.json"), help="JSON schedule to write"),
    device: str = typer.Option("auto"),
    dtype: str = typer.Option("auto"),
) -> None:
    """Search a method's pruning schedule offline (VFlowOpt) and write it as JSON for `schedule=PATH`."""
    from rich.progress import Progress

    from vlmprune.eval.calibrate import CalibrateSpec, write_schedule
    from vlmprune.eval.calibrate import calibrate as run_calibration
    from vlmprune.eval.sweep import default_data

    check_methods([method])
    spec = CalibrateSpec(model=model, keep=keep, data=data if data is not None else default_data(model), limit=limit,
                         trials=trials, seed=seed, batch_size=batch_size, layers=parse_list(layers, "--layers", int),
                         device=device, dtype=dtype, method=method)
    with Progress(console=console) as progress:
        bar = progress.add_task("calibrate", total=trials)
        result = run_calibration(spec, advance=lambda what: progress.update(bar, advance=1, description=what))
    write_schedule(result, out)
    console.print(f"{method} on {model}, keep {keep}, {result['items']} items: best mean cosine {result['score']:.4f} "
                  f"(defaults {result['trials'][0]['score']:.4f}) with layers {result['layers']}, expand "
                  f"{[round(e, 3) for e in result['expand']]}, threshold {result['threshold']:.3g}, alpha "
                  f"{result['alpha']:.3g}; wrote {out}")


@app.command()
def methods() -> None:
    """Registered pruning methods, their stage and paper."""
    from vlmprune.scorers import available_methods, scorer_class

    show_table("methods", [{"name": m, "stage": scorer_class(m).stage, "paper": scorer_class(m).paper}
                           for m in available_methods()], {"name": "name", "stage": "stage", "paper": "paper"})


@app.command()
def models() -> None:
    """Supported HF model types and the classes patched for each."""
    from vlmprune.adapters.base import _ADAPTERS

    rows = [{"type": t, "classes": ", ".join(a.model_classes), "positions": a.default_positions}
            for a in _ADAPTERS for t in a.model_types]
    show_table("supported models", sorted(rows, key=lambda r: r["type"]),
               {"type": "model_type", "classes": "classes", "positions": "positions (default)"})


@app.command("lmms-task-path")
def lmms_task_path() -> None:
    """Print the folder of vlmprune's lmms-eval tasks, for `lmms_eval --include_path`."""
    from vlmprune.eval.lmms import task_path

    typer.echo(task_path())


def main() -> None:
    """Console-script entry point."""
    app()


if __name__ == "__main__":
    main()
