"""Prefill time at Qwen2.5-VL-7B shapes (issue 17): unpatched vs patched vs the oracle.

Inputs, per row: one 1344x1344 image (patch grid (1, 96, 96): 2,304 LLM tokens after the 2x2
merge) or one 8-frame 448x448 video (grid (4, 32, 32) after the temporal patch of 2: 1,024 tokens).
Random weights, bf16, SDPA; timings are the shapes', the outputs mean nothing.

For each input, batch size, method and prune ratio (kept = 25% / 10%):

* unpatched: one prefill forward (vision encoder + decoder on every visual token);
* encoder: `get_image_features` / `get_video_features` alone, unpatched, and patched (with the
  method's signal taps: the attention each patch receives, for `cls`);
* patched: one prefill forward of the patched model, the vision encoder INCLUDED;
* oracle: the unpatched model fed only the kept tokens: the pruned `input_ids` (k placeholders per
  item), the kept features precomputed (`mm_encoder_outputs`) and the unpruned M-RoPE ids gathered
  at the kept places as explicit 3-D `position_ids`; it pays no vision encoder and no pruning.
  These are exactly the kwargs the patched model hands HF's forward (captured from one patched
  call, then cloned), so the oracle's first-token logits must equal the patched model's;
* patched - encoder: the patched prefill minus the unpatched encoder (median of per-repeat
  differences; the encoder, oracle, patched and patched-encoder calls alternate within a repeat, so
  drift hits them alike): compared with the oracle, it is what pruning costs on top of the ideal;
* score + select: `run_scorer` (with `signals_for`) on the signals recorded by one patched encoder
  call, alone, as a share of the pruned prefill (patched - encoder).

Every time is the median over repeats after warm-up, each call between `torch.cuda.synchronize()`
and timed with CUDA events (host clock on CPU).

    python scripts/bench_qwen.py --device cuda --out docs/bench/qwen25vl_7b_shapes.json
    python scripts/bench_qwen.py --tiny --device cpu          # the same code on a tiny Qwen2.5-VL

A benchmark script, not a test."""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
import traceback
from typing import Any, Callable

import torch
from transformers.modeling_outputs import BaseModelOutputWithPooling

import vlmprune
from vlmprune.adapters.base import run_scorer
from vlmprune.eval.tiny import QWEN_END, QWEN_IMAGE, QWEN_START, QWEN_VIDEO, qwen2_5_vl_7b_config, qwen_inputs, tiny_qwen

# (kind, (t, h, w) patch grid) per input; the tiny model uses 4 px patches and smaller grids
SHAPES = {"image": ("image", (1, 96, 96)), "video": ("video", (4, 32, 32))}
TINY_SHAPES = {"image": ("image", (1, 24, 24)), "video": ("video", (4, 8, 8))}
LABELS = {"image": "one 1344x1344 image", "video": "one 8-frame 448x448 video"}


def median(xs: list[float]) -> float:
    return float(statistics.median(xs))


class Timer:
    """Milliseconds of one call: synchronised, CUDA events around it (host clock on CPU)."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"

    def __call__(self, fn: Callable[[], Any]) -> float:
        if self.cuda:
            torch.cuda.synchronize()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            return start.elapsed_time(end)
        t = time.perf_counter()
        fn()
        return (time.perf_counter() - t) * 1e3


def build_model(tiny: bool, device: torch.device, dtype: torch.dtype, attn: str):
    if tiny:
        model = tiny_qwen("qwen2_5_vl", attn=attn).to(device, dtype)
        return model.eval(), 4
    import transformers

    cfg = qwen2_5_vl_7b_config(attn=attn)
    with device:  # built on the device in its dtype: no 16 GB detour through host memory
        model = transformers.Qwen2_5_VLForConditionalGeneration._from_config(cfg, dtype=dtype)
    return model.eval(), 14


def make_inputs(model, kind: str, grid: tuple[int, int, int], batch: int, patch: int, device: torch.device,
                dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """A left-padded batch of `batch` rows, one item of `grid` each, with the model's token ids."""
    inputs = qwen_inputs([[(kind, grid)] for _ in range(batch)], patch_size=patch, before=8, after=12)
    ids = inputs["input_ids"]
    cfg = model.config
    remapped = ids.clone()
    for tiny_id, real in ((QWEN_IMAGE, cfg.image_token_id), (QWEN_VIDEO, cfg.video_token_id),
                          (QWEN_START, cfg.vision_start_token_id), (QWEN_END, cfg.vision_end_token_id)):
        remapped[ids == tiny_id] = real
    inputs["input_ids"] = remapped
    out = {}
    for k, v in inputs.items():
        out[k] = v.to(device, dtype) if k.startswith("pixel_values") else v.to(device)
    return out


def encoder_call(owner, inputs: dict[str, torch.Tensor], kind: str, plain: bool):
    """The encoder alone: `plain` goes around any patch (the class's method), else through the
    instance (the adapter's wrapper with its taps, when patched)."""
    name = "get_image_features" if kind == "image" else "get_video_features"
    pixels = inputs["pixel_values" if kind == "image" else "pixel_values_videos"]
    fn = getattr(type(owner), name).__get__(owner) if plain else getattr(owner, name)
    return fn(pixels, inputs[f"{kind}_grid_thw"], return_dict=True)


def capture_call(model) -> dict[str, Any]:
    """Make the patched model's adapter record the kwargs of its pruned forward into the dict returned."""
    adapter = model._vlmprune_adapter
    seen: dict[str, Any] = {}
    orig = adapter.pruned_inputs

    def pruned_inputs(*args, **kwargs):
        call, state = orig(*args, **kwargs)
        seen["call"] = call
        return call, state

    adapter.pruned_inputs = pruned_inputs
    return seen


def oracle_from(call: dict[str, Any]) -> dict[str, Any]:
    """The oracle's inputs: the pruned prompt, its M-RoPE ids and the kept features, cloned."""
    mm = {kind: BaseModelOutputWithPooling(pooler_output=tuple(t.clone() for t in out.pooler_output))
          for kind, out in call["mm_encoder_outputs"].items()}
    return dict(input_ids=call["input_ids"].clone(), attention_mask=call["attention_mask"].clone(),
                position_ids=call["position_ids"].clone(), mm_encoder_outputs=mm)


def bench_one(model, inputs: dict[str, torch.Tensor], kind: str, batch: int, n: int, args, timer: Timer,
              out_rows: list[dict[str, Any]], save: Callable[[], None]) -> None:
    owner = model.model
    plain_forward = lambda **kw: type(model).forward(model, **kw)  # noqa: E731  (around any patch)
    thw = inputs[f"{kind}_grid_thw"]
    with torch.no_grad():
        # unpatched: whole prefill and encoder alone, alternating
        unp, enc = [], []
        for r in range(args.warmup + args.repeats):
            e = timer(lambda: encoder_call(owner, inputs, kind, plain=True))
            u = timer(lambda: model(**inputs, logits_to_keep=1))
            if r >= args.warmup:
                enc.append(e)
                unp.append(u)
        full_len = inputs["input_ids"].shape[1]
        print(f"# {kind} b{batch}: unpatched {median(unp):.1f} ms (encoder {median(enc):.1f}), "
              f"prompt {full_len} tokens", flush=True)
        for method in args.methods:
            for ratio in args.ratios:
                vlmprune.patch(model, method=method, prune_ratio=ratio)
                adapter = model._vlmprune_adapter
                seen = capture_call(model)
                patched_out = model(**inputs, logits_to_keep=1)
                oracle = oracle_from(seen["call"])
                pruned_len = oracle["input_ids"].shape[1]
                kept = [int(t.shape[0]) for out in oracle["mm_encoder_outputs"].values() for t in out.pooler_output]
                call_oracle = lambda: plain_forward(  # noqa: E731
                    input_ids=oracle["input_ids"], attention_mask=oracle["attention_mask"],
                    position_ids=oracle["position_ids"], mm_encoder_outputs=dict(oracle["mm_encoder_outputs"]),
                    logits_to_keep=1)
                oracle_out = call_oracle()
                diff = (patched_out.logits.float() - oracle_out.logits.float()).abs().max().item()
                del patched_out, oracle_out
                e_plain, o, p, e_patched = [], [], [], []
                for r in range(args.warmup + args.repeats):
                    t = (timer(lambda: encoder_call(owner, inputs, kind, plain=True)), timer(call_oracle),
                         timer(lambda: model(**inputs, logits_to_keep=1)),
                         timer(lambda: encoder_call(owner, inputs, kind, plain=False)))
                    if r >= args.warmup:
                        for xs, x in zip((e_plain, o, p, e_patched), t):
                            xs.append(x)
                # score + select alone, on the signals one patched encoder call recorded
                feats = list(encoder_call(owner, inputs, kind, plain=False).pooler_output)
                grids = adapter.token_grids(thw)
                k = torch.tensor([adapter.config.kept(int(f.shape[0])) for f in feats])

                def score():
                    signals = adapter.signals_for(feats, grids)
                    return run_scorer(adapter.stage.scorer, signals, signals.features, k)

                for _ in range(3):
                    score()
                sel = [timer(score) for _ in range(args.score_repeats)]
                del feats
                vlmprune.unpatch(model)

                pruned = [a - b for a, b in zip(p, e_plain)]  # patched prefill minus the (unpatched) encoder
                hooks = [a - b for a, b in zip(e_patched, e_plain)]
                over = [a - b for a, b in zip(pruned, o)]
                row = dict(
                    input=kind, batch=batch, method=method, prune_ratio=ratio, n_visual=n, kept=kept[0],
                    kept_pct=round(100 * kept[0] / n, 1), prompt_len=full_len, pruned_len=pruned_len,
                    unpatched_ms=median(unp), unpatched_minus_encoder_ms=median(unp) - median(enc),
                    encoder_ms=median(e_plain), encoder_patched_ms=median(e_patched), hooks_ms=median(hooks),
                    patched_ms=median(p), patched_minus_encoder_ms=median(pruned), oracle_ms=median(o),
                    ratio_vs_oracle=median(pruned) / median(o), overhead_vs_oracle_ms=median(over),
                    patched_minus_patched_encoder_ms=median([a - b for a, b in zip(p, e_patched)]),
                    score_select_ms=median(sel), score_select_min_ms=min(sel),
                    score_select_pct_of_pruned_prefill=100 * median(sel) / median(pruned),
                    max_abs_logit_diff_vs_oracle=diff,
                    raw=dict(unpatched=unp, encoder_unpatched_alone=enc, encoder=e_plain, oracle=o, patched=p,
                             encoder_patched=e_patched, score_select=sel),
                )
                out_rows.append(row)
                print(f"# {kind} b{batch} {method} {row['kept_pct']}%: patched {row['patched_ms']:.1f} "
                      f"(-enc {row['patched_minus_encoder_ms']:.1f}) oracle {row['oracle_ms']:.1f} "
                      f"ratio {row['ratio_vs_oracle']:.3f} score+select {row['score_select_ms']:.3f} ms "
                      f"({row['score_select_pct_of_pruned_prefill']:.2f}%) logit diff {diff:g}", flush=True)
                save()


def table(rows: list[dict[str, Any]]) -> str:
    lines = []
    for kind in dict.fromkeys(r["input"] for r in rows):
        sub = [r for r in rows if r["input"] == kind]
        lines += ["", f"**{LABELS.get(kind, kind)}** ({sub[0]['n_visual']} visual tokens per row)", "",
                  "| batch | method | kept | prefill len | unpatched ms (decoder part) | encoder ms (patched) "
                  "| patched ms | patched − encoder ms | oracle ms | (patched − encoder) / oracle "
                  "| score + select ms | % of pruned prefill | logit diff vs oracle |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in sub:
            lines.append(
                f"| {r['batch']} | `{r['method']}` | {r['kept_pct']:g}% ({r['kept']}) | {r['pruned_len']} / {r['prompt_len']} "
                f"| {r['unpatched_ms']:.1f} ({r['unpatched_minus_encoder_ms']:.1f}) "
                f"| {r['encoder_ms']:.1f} ({r['encoder_patched_ms']:.1f}) | {r['patched_ms']:.1f} "
                f"| {r['patched_minus_encoder_ms']:.1f} | {r['oracle_ms']:.1f} | {r['ratio_vs_oracle']:.3f} "
                f"| {r['score_select_ms']:.3f} | {r['score_select_pct_of_pruned_prefill']:.2f}% "
                f"| {r['max_abs_logit_diff_vs_oracle']:g} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cuda", "cpu"])
    ap.add_argument("--tiny", action="store_true", help="a tiny random Qwen2.5-VL (4 px patches, small grids)")
    ap.add_argument("--inputs", default="image,video")
    ap.add_argument("--batch-sizes", default="1,8")
    ap.add_argument("--methods", default="cls,divprune")
    ap.add_argument("--ratios", default="0.75,0.9", help="prune_ratio values (fraction removed)")
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--score-repeats", type=int, default=20)
    ap.add_argument("--attn", default="sdpa")
    ap.add_argument("--dtype", default=None, help="bf16 / fp32 (default: bf16 on cuda, fp32 on cpu)")
    ap.add_argument("--out", default="bench_qwen.json")
    args = ap.parse_args()
    args.methods = args.methods.split(",")
    args.ratios = [float(x) for x in args.ratios.split(",")]
    device = torch.device(args.device)
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32, None: None}[args.dtype] or \
        (torch.bfloat16 if device.type == "cuda" else torch.float32)
    timer = Timer(device)

    import transformers

    try:
        import triton  # noqa: F401  (its version only)
    except ImportError:
        pass

    t0 = time.perf_counter()
    model, patch = build_model(args.tiny, device, dtype, args.attn)
    build_s = time.perf_counter() - t0
    params = sum(p.numel() for p in model.parameters())
    env = dict(device=torch.cuda.get_device_name() if device.type == "cuda" else platform.processor() or "cpu",
               torch=torch.__version__, transformers=transformers.__version__,
               triton=getattr(sys.modules.get("triton"), "__version__", None), python=platform.python_version(),
               date=time.strftime("%Y-%m-%d"), model="tiny qwen2_5_vl" if args.tiny else "Qwen2.5-VL-7B shapes",
               params=params, dtype=str(dtype), attn=args.attn, build_s=build_s, argv=sys.argv[1:],
               repeats=args.repeats, warmup=args.warmup)
    print(f"# {env['model']}: {params / 1e9:.2f} B params, built in {build_s:.1f} s on {env['device']}; "
          f"torch {env['torch']}, transformers {env['transformers']}, triton {env['triton']}", flush=True)
    rows: list[dict[str, Any]] = []
    save = lambda: json.dump(dict(env=env, rows=rows), open(args.out, "w"), indent=1)  # noqa: E731
    shapes = TINY_SHAPES if args.tiny else SHAPES
    for name in args.inputs.split(","):
        kind, grid = shapes[name]
        n = grid[0] * grid[1] * grid[2] // 4
        for b in [int(x) for x in args.batch_sizes.split(",")]:
            try:
                inputs = make_inputs(model, kind, grid, b, patch, device, dtype)
                bench_one(model, inputs, kind, b, n, args, timer, rows, save)
            except Exception as e:  # keep the other shapes' numbers; the error goes in the JSON
                traceback.print_exc()
                vlmprune.unpatch(model)
                env.setdefault("errors", []).append(f"{name} b{b}: {type(e).__name__}: {e}")
                save()
            inputs = None
            if device.type == "cuda":
                torch.cuda.empty_cache()
                env[f"peak_mem_gib_{name}_b{b}"] = torch.cuda.max_memory_allocated() / 2**30
    save()
    print(table(rows))


if __name__ == "__main__":
    main()
