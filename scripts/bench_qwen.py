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

import json
import traceback
from collections.abc import Callable
from typing import Any

import torch

# this script's directory is on sys.path
from _bench import Timer, build, logit_diff, markdown, med, median, parser, patched
from transformers.modeling_outputs import BaseModelOutputWithPooling

import vlmprune
from vlmprune.adapters.base import run_scorer
from vlmprune.eval.tiny import (
    QWEN_END,
    QWEN_IMAGE,
    QWEN_START,
    QWEN_VIDEO,
    qwen2_5_vl_7b_config,
    qwen_inputs,
    tiny_qwen,
)

# (kind, (t, h, w) patch grid) per input; the tiny model uses 4 px patches and smaller grids
SHAPES = {"image": ("image", (1, 96, 96)), "video": ("video", (4, 32, 32))}
TINY_SHAPES = {"image": ("image", (1, 24, 24)), "video": ("video", (4, 8, 8))}
LABELS = {"image": "one 1344x1344 image", "video": "one 8-frame 448x448 video"}


def build_model(tiny: bool, device: torch.device, dtype: torch.dtype, attn: str):
    if tiny:
        model = tiny_qwen("qwen2_5_vl", attn=attn).to(device, dtype)
        return model.eval(), 4
    import transformers

    cfg = qwen2_5_vl_7b_config(attn=attn)
    with (
        device
    ):  # built on the device in its dtype: no 16 GB detour through host memory
        model = transformers.Qwen2_5_VLForConditionalGeneration._from_config(
            cfg, dtype=dtype
        )
    return model.eval(), 14


def make_inputs(
    model,
    kind: str,
    grid: tuple[int, int, int],
    batch: int,
    patch: int,
    device: torch.device,
    dtype: torch.dtype,
) -> dict[str, torch.Tensor]:
    """A left-padded batch of `batch` rows, one item of `grid` each, with the model's token ids."""
    inputs = qwen_inputs(
        [[(kind, grid)] for _ in range(batch)], patch_size=patch, before=8, after=12
    )
    ids = inputs["input_ids"]
    cfg = model.config
    remapped = ids.clone()
    for tiny_id, real in (
        (QWEN_IMAGE, cfg.image_token_id),
        (QWEN_VIDEO, cfg.video_token_id),
        (QWEN_START, cfg.vision_start_token_id),
        (QWEN_END, cfg.vision_end_token_id),
    ):
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
    mm = {
        kind: BaseModelOutputWithPooling(
            pooler_output=tuple(t.clone() for t in out.pooler_output)
        )
        for kind, out in call["mm_encoder_outputs"].items()
    }
    return {
        "input_ids": call["input_ids"].clone(),
        "attention_mask": call["attention_mask"].clone(),
        "position_ids": call["position_ids"].clone(),
        "mm_encoder_outputs": mm,
    }


def bench_one(
    model,
    inputs: dict[str, torch.Tensor],
    kind: str,
    batch: int,
    n: int,
    args,
    timer: Timer,
    out_rows: list[dict[str, Any]],
    save: Callable[[], None],
) -> None:
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
        print(
            f"# {kind} b{batch}: unpatched {med(unp, 'total'):.1f} ms (in place: vision {med(unp, 'vision'):.1f}, "
            f"after {med(unp, 'end'):.1f}; encoder alone {median(enc):.1f}), prompt {full_len} tokens",
            flush=True,
        )
        for method, ratio, seen in patched(model, args, timer):
            adapter = model._vlmprune_adapter
            patched_out = prefill()
            oracle = oracle_from(seen["call"])
            pruned_len = oracle["input_ids"].shape[1]
            kept = [
                int(t.shape[0])
                for out in oracle["mm_encoder_outputs"].values()
                for t in out.pooler_output
            ]
            call_oracle = lambda oracle=oracle: plain_forward(
                input_ids=oracle["input_ids"],
                attention_mask=oracle["attention_mask"],
                position_ids=oracle["position_ids"],
                mm_encoder_outputs=dict(oracle["mm_encoder_outputs"]),
                logits_to_keep=1,
            )
            oracle_out = call_oracle()
            diff = logit_diff(patched_out, oracle_out)
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

            def score(adapter=adapter, feats=feats, grids=grids, k=k):
                signals = adapter.signals_for(feats, grids)
                return run_scorer(adapter.stage.scorer, signals, signals.features, k)

            for _ in range(3):
                score()
            sel = [timer(score) for _ in range(args.score_repeats)]

            after = [
                d["total"] - d["vision"] for d in p
            ]  # the patched prefill after its vision tower, in place
            rest = [
                d["total"] - d["vision"] - d["signals"] for d in p
            ]  # ... less the signal tables
            sub = [
                d["total"] - e for d, e in zip(p, e_plain)
            ]  # patched prefill minus the encoder alone
            row = {
                "input": kind,
                "batch": batch,
                "method": method,
                "prune_ratio": ratio,
                "n_visual": n,
                "kept": kept[0],
                "kept_pct": round(100 * kept[0] / n, 1),
                "prompt_len": full_len,
                "pruned_len": pruned_len,
                "unpatched_ms": med(unp, "total"),
                "unpatched_vision_ms": med(unp, "vision"),
                "unpatched_after_vision_ms": med(unp, "end"),
                "encoder_alone_ms": median(e_plain),
                "patched_ms": med(p, "total"),
                "patched_vision_ms": med(p, "vision"),
                "patched_signals_ms": med(p, "signals"),
                "patched_score_select_inplace_ms": med(p, "score_select"),
                "patched_rope_index_ms": med(p, "rope_index"),
                "patched_assemble_decoder_ms": med(p, "end"),
                "patched_after_vision_ms": median(after),
                "patched_after_signals_ms": median(rest),
                "patched_minus_encoder_alone_ms": median(sub),
                "oracle_ms": median(o),
                "ratio_vs_oracle": median(after) / median(o),
                "ratio_vs_oracle_without_signals": median(rest) / median(o),
                "ratio_vs_oracle_subtracted": median(sub) / median(o),
                "score_select_ms": median(sel),
                "score_select_min_ms": min(sel),
                "score_select_pct_of_pruned_prefill": 100 * median(sel) / median(after),
                "score_select_pct_of_oracle": 100 * median(sel) / median(o),
                "max_abs_logit_diff_vs_oracle": diff,
                "raw": {
                    "unpatched": unp,
                    "encoder_alone_unpatched_loop": enc,
                    "encoder_alone": e_plain,
                    "oracle": o,
                    "patched": p,
                    "score_select": sel,
                },
            }
            out_rows.append(row)
            print(
                f"# {kind} b{batch} {method} {row['kept_pct']}%: patched {row['patched_ms']:.1f} (vision "
                f"{row['patched_vision_ms']:.1f}, signals {row['patched_signals_ms']:.1f}, score+select "
                f"{row['patched_score_select_inplace_ms']:.1f}, rope index {row['patched_rope_index_ms']:.1f}, "
                f"rest {row['patched_assemble_decoder_ms']:.1f}) "
                f"oracle {row['oracle_ms']:.1f} ratio {row['ratio_vs_oracle']:.3f} "
                f"(w/o signals {row['ratio_vs_oracle_without_signals']:.3f}); score+select alone "
                f"{row['score_select_ms']:.3f} ms ({row['score_select_pct_of_pruned_prefill']:.2f}%); "
                f"logit diff {diff:g}",
                flush=True,
            )
            save()


HEADER = [
    "batch",
    "method",
    "kept",
    "prefill len",
    "unpatched ms: total / after vision",
    "encoder alone ms",
    "patched ms: total / after vision",
    "of which signals / score + select / rope index",
    "oracle ms",
    "patched after vision / oracle (w/o signals)",
    "score + select alone ms",
    "% of patched after vision (of oracle)",
    "logit diff vs oracle",
]


def table(rows: list[dict[str, Any]]) -> str:
    lines = []
    for kind in dict.fromkeys(r["input"] for r in rows):
        sub = [r for r in rows if r["input"] == kind]
        cells = [
            [
                str(r["batch"]),
                f"`{r['method']}`",
                f"{r['kept_pct']:g}% ({r['kept']})",
                f"{r['pruned_len']} / {r['prompt_len']}",
                f"{r['unpatched_ms']:.1f} / {r['unpatched_after_vision_ms']:.1f}",
                f"{r['encoder_alone_ms']:.1f}",
                f"{r['patched_ms']:.1f} / {r['patched_after_vision_ms']:.1f}",
                (
                    f"{r['patched_signals_ms']:.1f} / {r['patched_score_select_inplace_ms']:.1f} / "
                    f"{r.get('patched_rope_index_ms', 0):.1f}"
                ),
                f"{r['oracle_ms']:.1f}",
                f"{r['ratio_vs_oracle']:.3f} ({r['ratio_vs_oracle_without_signals']:.3f})",
                f"{r['score_select_ms']:.3f}",
                (
                    f"{r['score_select_pct_of_pruned_prefill']:.2f}% "
                    f"({r.get('score_select_pct_of_oracle', float('nan')):.2f}%)"
                ),
                f"{r['max_abs_logit_diff_vs_oracle']:g}",
            ]
            for r in sub
        ]
        lines += [
            "",
            f"**{LABELS.get(kind, kind)}** ({sub[0]['n_visual']} visual tokens per row)",
            "",
            *markdown(HEADER, cells),
        ]
    return "\n".join(lines)


def main() -> None:
    ap = parser(
        __doc__,
        "a tiny random Qwen2.5-VL (4 px patches, small grids)",
        "bench_qwen.json",
    )
    ap.add_argument("--inputs", default="image,video")
    ap.add_argument("--score-repeats", type=int, default=20)
    ap.add_argument(
        "--table",
        metavar="JSON",
        help="print the markdown table of a saved run and exit",
    )
    args = ap.parse_args()
    if args.table:
        with open(args.table) as f:
            print(table(json.load(f)["rows"]))
        return
    names = ("Qwen2.5-VL-7B shapes", "tiny qwen2_5_vl")
    model, patch, timer, env = build(args, build_model, names, "visual")
    device, dtype = model.device, model.dtype
    rows: list[dict[str, Any]] = []

    def save() -> None:
        with open(args.out, "w") as f:
            json.dump({"env": env, "rows": rows}, f, indent=1)

    shapes = TINY_SHAPES if args.tiny else SHAPES
    for name in args.inputs.split(","):
        kind, grid = shapes[name]
        n = grid[0] * grid[1] * grid[2] // 4
        for b in [int(x) for x in args.batch_sizes.split(",")]:
            try:
                inputs = make_inputs(model, kind, grid, b, patch, device, dtype)
                bench_one(model, inputs, kind, b, n, args, timer, rows, save)
            except Exception as e:  # noqa: BLE001  (the other shapes' numbers stay; the error goes in the JSON)
                traceback.print_exc()
                vlmprune.unpatch(model)
                env.setdefault("errors", []).append(
                    f"{name} b{b}: {type(e).__name__}: {e}"
                )
                save()
            inputs = None
            if device.type == "cuda":
                torch.cuda.empty_cache()
                env[f"peak_mem_gib_{name}_b{b}"] = (
                    torch.cuda.max_memory_allocated() / 2**30
                )
    save()
    print(table(rows))


if __name__ == "__main__":
    main()
