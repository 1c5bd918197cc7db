"""Prefill time at Qwen2.5-VL-7B shapes (issue 17): unpatched vs patched vs the oracle.

Inputs, per row: one 1344x1344 image (patch grid (1, 96, 96): 2,304 LLM tokens after the 2x2
merge) or one 8-frame 448x448 video (grid (4, 32, 32) after the temporal patch of 2: 1,024 tokens).
Random weights, bf16, SDPA; timings are the shapes', the outputs mean nothing.

For each input, batch size, method and prune ratio (kept = 25% / 10%):

* unpatched: one prefill forward (vision tower + decoder on every visual token);
* encoder alone: `get_image_features` / `get_video_features` of the unpatched model;
* patched: one prefill forward of the patched model, the vision tower INCLUDED, split in place by
  CUDA events recorded inside it (no sync): the vision tower (a forward hook on `visual`), the
  signal tables (the adapter's encode returning; for `cls` the attention each patch receives),
  scoring + selection (up to the adapter's pruned_inputs), `get_rope_index` on the unpruned prompt,
  then assembly + decoder. "after vision" (all but the tower) is what compares with the oracle;
* oracle: the unpatched model fed only the kept tokens: the pruned `input_ids` (k placeholders per
  item), the kept features precomputed (`mm_encoder_outputs`) and the unpruned M-RoPE ids gathered
  at the kept places as explicit 3-D `position_ids`; it pays no vision encoder and no pruning.
  These are exactly the kwargs the patched model hands HF's forward (captured from one patched
  call, then cloned), so the oracle's first-token logits must equal the patched model's;
* patched - encoder alone (median of per-repeat differences; encoder, oracle and patched calls
  alternate within a repeat) is kept in the JSON too: at batch 8 the host-bound encoder's own noise
  swamps it, hence the in-place split;
* score + select: `run_scorer` (with `signals_for`) on the signals recorded by one patched encoder
  call, alone, as a share of the patched prefill after vision and of the oracle.

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
        for (_, a), (name, b) in zip(marks, marks[1:]):
            out[name] = out.get(name, 0.0) + self.ms(a, b)
        return out

    def __call__(self, fn: Callable[[], Any]) -> float:
        return self.split(fn)["total"]


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


def oracle_from(call: dict[str, Any]) -> dict[str, Any]:
    """The oracle's inputs: the pruned prompt, its M-RoPE ids and the kept features, cloned."""
    mm = {kind: BaseModelOutputWithPooling(pooler_output=tuple(t.clone() for t in out.pooler_output))
          for kind, out in call["mm_encoder_outputs"].items()}
    return dict(input_ids=call["input_ids"].clone(), attention_mask=call["attention_mask"].clone(),
                position_ids=call["position_ids"].clone(), mm_encoder_outputs=mm)


def instrument(adapter, timer: Timer) -> dict[str, Any]:
    """Marks inside the patched prefill: "signals" when the adapter's encode returns (the encoder's
    signal tables computed), "score_select" when its pruned_inputs starts (scoring, selection and the
    layout done), "rope_index" when the unpruned prompt's M-RoPE ids are computed (`get_rope_index`,
    which the oracle is handed); and the kwargs of the pruned forward, recorded into the dict returned."""
    seen: dict[str, Any] = {}
    encode, pruned_inputs = adapter.encode, adapter.pruned_inputs

    def encode_marked(*args, **kwargs):
        out = encode(*args, **kwargs)
        timer.mark("signals")
        return out

    def pruned_inputs_marked(*args, **kwargs):
        timer.mark("score_select")
        call, state = pruned_inputs(*args, **kwargs)
        seen["call"] = call
        return call, state

    full_positions = adapter.full_positions

    def full_positions_marked(*args, **kwargs):
        out = full_positions(*args, **kwargs)
        timer.mark("rope_index")
        return out

    adapter.encode, adapter.pruned_inputs = encode_marked, pruned_inputs_marked
    adapter.full_positions = full_positions_marked
    return seen


def med(splits: list[dict[str, float]], key: str) -> float:
    return median([d.get(key, 0.0) for d in splits])


def bench_one(model, inputs: dict[str, torch.Tensor], kind: str, batch: int, n: int, args, timer: Timer,
              out_rows: list[dict[str, Any]], save: Callable[[], None]) -> None:
    owner = model.model
    plain_forward = lambda **kw: type(model).forward(model, **kw)  # around any patch
    thw = inputs[f"{kind}_grid_thw"]
    prefill = lambda: model(**inputs, logits_to_keep=1)
    encoder = lambda: encoder_call(owner, inputs, kind, plain=True)
    with torch.no_grad():
        # unpatched: whole prefill (split at the vision tower's end) and the encoder alone, alternating
        unp, enc = [], []
        for r in range(args.warmup + args.repeats):
            e, u = timer(encoder), timer.split(prefill)
            if r >= args.warmup:
                enc.append(e)
                unp.append(u)
        full_len = inputs["input_ids"].shape[1]
        print(f"# {kind} b{batch}: unpatched {med(unp, 'total'):.1f} ms (in place: vision {med(unp, 'vision'):.1f}, "
              f"after {med(unp, 'end'):.1f}; encoder alone {median(enc):.1f}), prompt {full_len} tokens", flush=True)
        for method in args.methods:
            for ratio in args.ratios:
                vlmprune.patch(model, method=method, prune_ratio=ratio)
                adapter = model._vlmprune_adapter
                seen = instrument(adapter, timer)
                patched_out = prefill()
                oracle = oracle_from(seen["call"])
                pruned_len = oracle["input_ids"].shape[1]
                kept = [int(t.shape[0]) for out in oracle["mm_encoder_outputs"].values() for t in out.pooler_output]
                call_oracle = lambda: plain_forward(
                    input_ids=oracle["input_ids"], attention_mask=oracle["attention_mask"],
                    position_ids=oracle["position_ids"], mm_encoder_outputs=dict(oracle["mm_encoder_outputs"]),
                    logits_to_keep=1)
                oracle_out = call_oracle()
                diff = (patched_out.logits.float() - oracle_out.logits.float()).abs().max().item()
                del patched_out, oracle_out
                e_plain, o, p = [], [], []
                for r in range(args.warmup + args.repeats):
                    t = (timer(encoder), timer(call_oracle), timer.split(prefill))
                    if r >= args.warmup:
                        for xs, x in zip((e_plain, o, p), t):
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
                vlmprune.unpatch(model)

                after = [d["total"] - d["vision"] for d in p]  # the patched prefill after its vision tower, in place
                rest = [d["total"] - d["vision"] - d["signals"] for d in p]  # ... less the signal tables
                sub = [d["total"] - e for d, e in zip(p, e_plain)]  # patched prefill minus the encoder alone
                row = {
                    "input": kind, "batch": batch, "method": method, "prune_ratio": ratio, "n_visual": n,
                    "kept": kept[0], "kept_pct": round(100 * kept[0] / n, 1), "prompt_len": full_len,
                    "pruned_len": pruned_len,
                    "unpatched_ms": med(unp, "total"), "unpatched_vision_ms": med(unp, "vision"),
                    "unpatched_after_vision_ms": med(unp, "end"), "encoder_alone_ms": median(e_plain),
                    "patched_ms": med(p, "total"), "patched_vision_ms": med(p, "vision"),
                    "patched_signals_ms": med(p, "signals"), "patched_score_select_inplace_ms": med(p, "score_select"),
                    "patched_rope_index_ms": med(p, "rope_index"), "patched_assemble_decoder_ms": med(p, "end"),
                    "patched_after_vision_ms": median(after), "patched_after_signals_ms": median(rest),
                    "patched_minus_encoder_alone_ms": median(sub), "oracle_ms": median(o),
                    "ratio_vs_oracle": median(after) / median(o),
                    "ratio_vs_oracle_without_signals": median(rest) / median(o),
                    "ratio_vs_oracle_subtracted": median(sub) / median(o),
                    "score_select_ms": median(sel), "score_select_min_ms": min(sel),
                    "score_select_pct_of_pruned_prefill": 100 * median(sel) / median(after),
                    "score_select_pct_of_oracle": 100 * median(sel) / median(o),
                    "max_abs_logit_diff_vs_oracle": diff,
                    "raw": {"unpatched": unp, "encoder_alone_unpatched_loop": enc, "encoder_alone": e_plain,
                            "oracle": o, "patched": p, "score_select": sel},
                }
                out_rows.append(row)
                print(f"# {kind} b{batch} {method} {row['kept_pct']}%: patched {row['patched_ms']:.1f} (vision "
                      f"{row['patched_vision_ms']:.1f}, signals {row['patched_signals_ms']:.1f}, score+select "
                      f"{row['patched_score_select_inplace_ms']:.1f}, rope index {row['patched_rope_index_ms']:.1f}, "
                      f"rest {row['patched_assemble_decoder_ms']:.1f}) "
                      f"oracle {row['oracle_ms']:.1f} ratio {row['ratio_vs_oracle']:.3f} "
                      f"(w/o signals {row['ratio_vs_oracle_without_signals']:.3f}); score+select alone "
                      f"{row['score_select_ms']:.3f} ms ({row['score_select_pct_of_pruned_prefill']:.2f}%); "
                      f"logit diff {diff:g}", flush=True)
                save()


def table(rows: list[dict[str, Any]]) -> str:
    lines = []
    for kind in dict.fromkeys(r["input"] for r in rows):
        sub = [r for r in rows if r["input"] == kind]
        lines += ["", f"**{LABELS.get(kind, kind)}** ({sub[0]['n_visual']} visual tokens per row)", "",
                  ("| batch | method | kept | prefill len | unpatched ms: total / after vision | encoder alone ms "
                   "| patched ms: total / after vision | of which signals / score + select / rope index | oracle ms "
                   "| patched after vision / oracle (w/o signals) | score + select alone ms | % of patched after vision (of oracle) "
                   "| logit diff vs oracle |"),
                  "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in sub:
            lines.append(
                f"| {r['batch']} | `{r['method']}` | {r['kept_pct']:g}% ({r['kept']}) | {r['pruned_len']} / {r['prompt_len']} "
                f"| {r['unpatched_ms']:.1f} / {r['unpatched_after_vision_ms']:.1f} | {r['encoder_alone_ms']:.1f} "
                f"| {r['patched_ms']:.1f} / {r['patched_after_vision_ms']:.1f} "
                f"| {r['patched_signals_ms']:.1f} / {r['patched_score_select_inplace_ms']:.1f} / {r.get('patched_rope_index_ms', 0):.1f} "
                f"| {r['oracle_ms']:.1f} "
                f"| {r['ratio_vs_oracle']:.3f} ({r['ratio_vs_oracle_without_signals']:.3f}) "
                f"| {r['score_select_ms']:.3f} | {r['score_select_pct_of_pruned_prefill']:.2f}% "
                f"({r.get('score_select_pct_of_oracle', float('nan')):.2f}%) "
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
    ap.add_argument("--table", metavar="JSON", help="print the markdown table of a saved run and exit")
    args = ap.parse_args()
    if args.table:
        with open(args.table) as f:
            print(table(json.load(f)["rows"]))
        return
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
    model.model.visual.register_forward_hook(lambda *_: timer.mark("vision"))  # the vision tower's end, in place
    rows: list[dict[str, Any]] = []
    save = lambda: json.dump(dict(env=env, rows=rows), open(args.out, "w"), indent=1)
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
