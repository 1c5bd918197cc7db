"""Prefill time at LLaVA-NeXT-7B shapes (issue 21): unpatched vs patched vs the oracle.

Input, per row: one 672x672 image (a base view and 2x2 crops of 336 px: 576 + 48 x 48 = 2,880
visual tokens, plus 48 `image_newline` tokens). Random weights, bf16, SDPA; timings are the
shapes', the outputs mean nothing.

For each batch size, method and prune ratio (kept = 25% / 10% of the visual tokens; newlines kept):

* unpatched: one prefill forward (vision tower on 5 views per image + decoder on every token);
* patched: one prefill forward of the patched model, the vision tower included, split in place by
  CUDA events (no sync inside): the vision tower (a forward hook on it), the signal tables and the
  newlines split off (the adapter's encode returning), scoring + selection (up to pruned_inputs),
  then assembly + decoder. "after vision" (all but the tower) is what compares with the oracle;
* oracle: the unpatched model fed only the kept tokens: the pruned `inputs_embeds`, mask and
  positions the patched model hands HF's forward (captured from one patched call, cloned), so its
  first-token logits must equal the patched model's; it pays no vision tower and no pruning.

Every time is the median over repeats after warm-up, each call between `torch.cuda.synchronize()`
and timed with CUDA events (host clock on CPU).

    python scripts/bench_llava_next.py --device cuda --out docs/bench/llava_next_7b_shapes.json
    python scripts/bench_llava_next.py --tiny --device cpu      # the same code on a tiny LLaVA-NeXT

A benchmark script, not a test."""

from __future__ import annotations

import json
from typing import Any

import torch

# this script's directory is on sys.path
from _bench import Timer, build, logit_diff, markdown, med, median, parser, patched

import vlmprune
from vlmprune.eval.tiny import anyres_inputs, llava_next_7b_config, tiny_llava_next


def build_model(tiny: bool, device: torch.device, dtype: torch.dtype, attn: str):
    """The model and the image size (px) that gives a base view plus 2x2 crops."""
    if tiny:
        return tiny_llava_next("llava_next", attn=attn).to(device, dtype).eval(), 56
    import transformers

    with device:  # built on the device in its dtype
        model = transformers.LlavaNextForConditionalGeneration._from_config(
            llava_next_7b_config(attn), dtype=dtype
        )
    return model.eval(), 672


def bench_batch(
    model,
    inputs: dict[str, torch.Tensor],
    batch: int,
    n: int,
    args,
    timer: Timer,
    rows: list[dict[str, Any]],
) -> None:
    plain = lambda **kw: type(model).forward(model, **kw)  # around any patch
    prefill = lambda: model(**inputs, logits_to_keep=1)
    full_len = inputs["input_ids"].shape[1]
    with torch.no_grad():
        unp = [timer.split(prefill) for _ in range(args.warmup + args.repeats)][
            args.warmup :
        ]
        print(
            f"# b{batch}: unpatched {med(unp, 'total'):.1f} ms (vision {med(unp, 'vision'):.1f}), "
            f"prompt {full_len} tokens",
            flush=True,
        )
        for method, ratio, seen in patched(model, args, timer):
            patched_out = prefill()
            kept = len(vlmprune.last_selection(model)[0][0])
            call = {  # cloned once, outside the timed calls
                k: v.clone() if isinstance(v, torch.Tensor) else v
                for k, v in seen["call"].items()
                if k != "input_ids"
            }
            oracle = lambda: plain(**call)  # noqa: B023  (its logits_to_keep=1 is in the call)
            diff = logit_diff(patched_out, oracle())
            o, p = [], []
            for r in range(args.warmup + args.repeats):
                t = (timer(oracle), timer.split(prefill))
                if r >= args.warmup:
                    o.append(t[0])
                    p.append(t[1])
            after = [d["total"] - d["vision"] for d in p]
            row = {
                "batch": batch,
                "method": method,
                "prune_ratio": ratio,
                "n_visual": n,
                "kept": kept,
                "kept_pct": round(100 * kept / n, 1),
                "prompt_len": full_len,
                "pruned_len": call["inputs_embeds"].shape[1],
                "unpatched_ms": med(unp, "total"),
                "unpatched_vision_ms": med(unp, "vision"),
                "patched_ms": med(p, "total"),
                "patched_vision_ms": med(p, "vision"),
                "patched_signals_ms": med(p, "signals"),
                "patched_score_select_ms": med(p, "score_select"),
                "patched_assemble_decoder_ms": med(p, "end"),
                "patched_after_vision_ms": median(after),
                "oracle_ms": median(o),
                "ratio_vs_oracle": median(after) / median(o),
                "max_abs_logit_diff_vs_oracle": diff,
                "raw": {"unpatched": unp, "patched": p, "oracle": o},
            }
            rows.append(row)
            print(
                f"# b{batch} {method} {row['kept_pct']}%: patched {row['patched_ms']:.1f} (vision "
                f"{row['patched_vision_ms']:.1f}, signals {row['patched_signals_ms']:.1f}, score+select "
                f"{row['patched_score_select_ms']:.1f}, rest {row['patched_assemble_decoder_ms']:.1f}) oracle "
                f"{row['oracle_ms']:.1f} ratio {row['ratio_vs_oracle']:.3f}; logit diff {diff:g}",
                flush=True,
            )


HEADER = [
    "batch",
    "method",
    "kept",
    "prefill len",
    "unpatched ms: total / vision",
    "patched ms: total / after vision",
    "of which signals / score + select",
    "oracle ms",
    "patched after vision / oracle",
    "logit diff vs oracle",
]


def table(rows: list[dict[str, Any]]) -> str:
    title = (
        f"**one {rows[0]['image_px']}x{rows[0]['image_px']} image** ({rows[0]['n_visual']} visual tokens per row)"
        if rows
        else ""
    )
    cells = [
        [
            str(r["batch"]),
            f"`{r['method']}`",
            f"{r['kept_pct']:g}% ({r['kept']})",
            f"{r['pruned_len']} / {r['prompt_len']}",
            f"{r['unpatched_ms']:.1f} / {r['unpatched_vision_ms']:.1f}",
            f"{r['patched_ms']:.1f} / {r['patched_after_vision_ms']:.1f}",
            f"{r['patched_signals_ms']:.1f} / {r['patched_score_select_ms']:.1f}",
            f"{r['oracle_ms']:.1f}",
            f"{r['ratio_vs_oracle']:.3f}",
            f"{r['max_abs_logit_diff_vs_oracle']:g}",
        ]
        for r in rows
    ]
    return "\n".join([title, "", *markdown(HEADER, cells)])


def main() -> None:
    ap = parser(
        __doc__,
        "a tiny random LLaVA-NeXT (28 px views, a 56 px image)",
        "bench_llava_next.json",
    )
    ap.add_argument("--md", default=None, help="also write the markdown table here")
    args = ap.parse_args()
    names = ("LLaVA-NeXT-7B shapes", "tiny llava_next")
    model, side, timer, env = build(args, build_model, names, "vision_tower")
    device, dtype = model.device, model.dtype
    rows: list[dict[str, Any]] = []
    for b in [int(x) for x in args.batch_sizes.split(",")]:
        inputs = anyres_inputs(
            model, [[("image", (side, side))] for _ in range(b)], before=8, after=12
        )
        inputs = {
            k: v.to(device, dtype) if k == "pixel_values" else v.to(device)
            for k, v in inputs.items()
        }
        inputs.pop("batch_num_images", None)
        n = (
            int((inputs["input_ids"][0] == model.config.image_token_id).sum())
            - side // model.config.vision_config.patch_size
        )
        bench_batch(model, inputs, b, n, args, timer, rows)
        for r in rows:
            r.setdefault("image_px", side)
        if device.type == "cuda":
            env[f"peak_mem_gib_b{b}"] = torch.cuda.max_memory_allocated() / 2**30
        with open(args.out, "w") as f:
            json.dump({"env": env, "rows": rows}, f, indent=1)
    print(table(rows))
    if args.md:
        with open(args.md, "w") as f:
            f.write(table(rows) + "\n")


if __name__ == "__main__":
    main()
