"""Benchmark of the selection kernels of DESIGN §4 on a CUDA device (not a test).

For each shape it first checks the Triton kernels against the torch references on fresh random
inputs (indices bit for bit, gathered rows equal), then times with `triton.testing.do_bench`
(median, ms):

* select_tokens: `select_tokens_triton` vs `select_tokens_ref` vs a plain
  `torch.topk` + `sort` + `gather` (uniform k, no ragged handling or tie rule: a speed floor);
* maxmin_select: `maxmin_select_triton` vs `maxmin_select_ref` (running min) vs
  `maxmin_naive_ref` (re-min over all picks at every step), DivPrune (no seed) and k-center
  (seeded) variants;
* flowcut_select: `flowcut_select_triton` (one launch for all layers and cuts) vs
  `flowcut_select_ref` (torch ops, one batch of them per cut), FlowCut's default span at
  CLIP-L shapes (22 layers, a cut every 2);
* hiprune_select: `hiprune_select_triton` (one launch) vs `hiprune_select_ref` (~50 torch ops),
  the 24 x 24 grid, k = 64 with the default 6 anchor + buffer slots;
* visionzip_merge: `visionzip_merge_triton` (split kernel, similarity GEMM, merge kernel) vs
  `visionzip_merge_ref`, keys of CLIP-L width (1024) as the metric, k = 54 + 10;
* attention_rows: `attention_rows_triton` (reads each layer's projections where they lie) vs
  `attention_rows_ref` (stacks them, one GEMM), 46 rows (23 layers of CLS query and CLS
  value; FlowCut's span is 22) and VTC-CLS's 11 at CLIP-L shapes; rows within bf16 logit rounding.

Shapes: LLaVA-1.5 (N=576 tokens, D=4096, k=64, batch 1 and 8, bf16 features) and any-res
(N=2880). Prints a markdown table and writes JSON to --out.

    python scripts/bench_kernels.py --out bench_kernels.json
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from vlmprune.kernels.flow import FlowSchedule, flowcut_select_ref  # noqa: E402
from vlmprune.kernels.hiprune import hiprune_select_ref  # noqa: E402
from vlmprune.kernels.merge import visionzip_merge_ref  # noqa: E402
from vlmprune.kernels.rows import attention_rows_ref  # noqa: E402
from vlmprune.kernels.maxmin import maxmin_naive_ref, maxmin_select_ref  # noqa: E402
from vlmprune.kernels.select import select_tokens_ref  # noqa: E402

SELECT_SHAPES = [  # (batch, N, D, k)
    (1, 576, 4096, 64),
    (8, 576, 4096, 64),
    (1, 2880, 4096, 64),
    (8, 2880, 4096, 288),
]
MAXMIN_SHAPES = [  # (batch, N, D, k)
    (1, 576, 4096, 64),
    (8, 576, 4096, 64),
    (1, 2880, 4096, 64),
    (8, 2880, 4096, 288),
]

FLOW_SHAPES = [  # (batch, layers, N, k)
    (1, 22, 576, 64),
    (8, 22, 576, 64),
]

GRID_SHAPES = [  # (batch, h, w, k): hiprune
    (1, 24, 24, 64),
    (8, 24, 24, 64),
]
MERGE_SHAPES = [  # (batch, N, metric width, D, k): visionzip
    (1, 576, 1024, 4096, 64),
    (8, 576, 1024, 4096, 64),
]
ROWS_SHAPES = [  # (rows, batch, T, D, heads): attention_rows at CLIP-L; 46 rows = 23 layers of CLS query
    # and CLS value (FlowCut's default span is 22 layers: 44), 11 = VTC-CLS
    (46, 1, 577, 1024, 16),
    (46, 8, 577, 1024, 16),
    (11, 8, 577, 1024, 16),
]


def bench(fn, warmup: int, rep: int) -> float:
    import triton.testing

    try:
        return float(triton.testing.do_bench(fn, warmup=warmup, rep=rep, return_mode="median"))
    except TypeError:  # older signature
        return float(triton.testing.do_bench(fn, warmup=warmup, rep=rep, quantiles=[0.5])[0])


def topk_sort_gather(scores: torch.Tensor, feats: torch.Tensor, k: int):
    idx = torch.topk(scores, k, dim=1).indices.sort(dim=1).values
    return idx, torch.gather(feats, 1, idx.unsqueeze(-1).expand(-1, -1, feats.shape[-1]))


def check_select(select_tokens_triton, b, n, d, k, gen, dev) -> dict:
    """Random ragged cases (float and integer-valued scores with NaN, ragged valid and k incl.
    0, valid and > valid) must match the reference exactly."""
    cases = 0
    for ties in (False, True):
        scores = torch.randn(b, n, generator=gen, device=dev)
        if ties:
            scores = (scores * 3).round()
            scores[torch.rand(b, n, generator=gen, device=dev) < 0.05] = float("nan")
        feats = torch.randn(b, n, d, generator=gen, device=dev).bfloat16()
        valid = torch.randint(n // 2, n + 1, (b,), generator=gen, device=dev)
        valid[0] = n
        kk = torch.full((b,), k, device=dev)
        if b > 1:
            kk[1] = 0
        if b > 2:
            kk[2] = n + 5
        if b > 3:
            kk[3] = valid[3]
        got = select_tokens_triton(scores, feats, kk, valid)
        want = select_tokens_ref(scores, feats, kk, valid)
        if not (torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])):
            raise SystemExit(f"select_tokens mismatch at shape {(b, n, d, k)} ties={ties}")
        cases += 1
    return {"cases": cases, "ok": True}


def check_maxmin(maxmin_select_triton, b, n, d, k, gen, dev, naive: bool) -> dict:
    cases = 0
    for coarse in (False, True):
        feats = torch.randn(b, n, d, generator=gen, device=dev)
        if coarse:
            feats = feats.sign()  # exact duplicates and distance ties
        feats = feats.bfloat16()
        valid = torch.randint(n // 2, n + 1, (b,), generator=gen, device=dev)
        valid[0] = n
        kk = torch.full((b,), k, device=dev)
        if b > 1:
            kk[1] = 0
        first = (torch.rand(b, generator=gen, device=dev) * valid).long()
        for fst in (None, first):
            got = maxmin_select_triton(feats, kk, valid, fst, return_order=True)
            want = maxmin_select_ref(feats, kk, valid, fst, return_order=True)
            if not (torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])):
                raise SystemExit(f"maxmin_select mismatch at shape {(b, n, d, k)} coarse={coarse} seeded={fst is not None}")
            if naive and not torch.equal(maxmin_naive_ref(feats, kk, valid, fst), want[0]):
                raise SystemExit(f"maxmin_naive_ref mismatch at shape {(b, n, d, k)}")
            cases += 1
    return {"cases": cases, "ok": True}


def flow_inputs(b, layers, n, k, gen, dev, nan: bool = False):
    """FlowCut's inputs: skewed attention rows, semantic rows, value norms; budgets on the host
    (as the scorer passes them); a cut every 2 layers counted back from the last."""
    attn = torch.rand(layers, b, n, generator=gen, device=dev) ** 4
    if nan:
        attn[0, 0, 3] = float("nan")
    sem = torch.rand(layers, b, n, generator=gen, device=dev)
    dens = torch.rand(layers, b, n, generator=gen, device=dev) * 3
    kk = torch.full((b,), k)
    valid = torch.full((b,), n)
    if b > 1:
        valid[1] = n // 2
    rpl = tuple(layers - 1 - j if (layers - 1 - j) % 2 == 0 else None for j in range(layers))
    return attn, sem, dens, kk, valid, FlowSchedule(rpl)


def check_exact(name: str, triton_fn, ref_fn, make, shape) -> dict:
    """triton_fn == ref_fn bit for bit on make(False) and make(True) (plain and tie / NaN inputs)."""
    for hard in (False, True):
        args = make(hard)
        if not torch.equal(triton_fn(*args), ref_fn(*args)):
            raise SystemExit(f"{name} mismatch at shape {shape} (hard inputs: {hard})")
    return {"cases": 2, "ok": True}


def hiprune_inputs(b, h, w, k, gen, dev, ties: bool = False):
    """Object / register attention rows (integer-valued with a NaN for ties); host budgets: every
    image at k except one with k = 0 and one kept whole; the default 6 slots."""
    n = h * w
    obj, reg = (torch.rand(b, n, generator=gen, device=dev) for _ in range(2))
    if ties:
        obj, reg = (obj * 4).round(), (reg * 3).round()
        obj[0, 5] = float("nan")
    ks = [k] * b
    if b > 2:
        ks[1], ks[2] = 0, n
    return obj, reg, ks, [n] * b, [min(x, int(0.1 * x + 0.5)) for x in ks], (h, w)


def merge_inputs(b, n, m, d, k, gen, dev, ties: bool = False):
    attn = torch.rand(b, n, generator=gen, device=dev)
    if ties:
        attn = (attn * 5).round()
    metric = torch.nn.functional.normalize(torch.randn(b, n, m, generator=gen, device=dev), dim=-1).bfloat16()
    feats = torch.randn(b, n, d, generator=gen, device=dev).bfloat16()
    return attn, metric, feats, n, k, k - 10, 10


def check_merge(visionzip_merge_triton, b, n, m, d, k, gen, dev) -> dict:
    """Indices bit for bit; merged features to bf16 rounding (members summed in another order)."""
    worst = 0.0
    for ties in (False, True):
        args = merge_inputs(b, n, m, d, k, gen, dev, ties)
        (gi, gf), (wi, wf) = visionzip_merge_triton(*args), visionzip_merge_ref(*args)
        if not torch.equal(gi, wi):
            raise SystemExit(f"visionzip_merge index mismatch at shape {(b, n, m, d, k)} ties={ties}")
        worst = max(worst, float((gf.float() - wf.float()).abs().max()))
        if worst > 0.02:
            raise SystemExit(f"visionzip_merge features differ by {worst} at shape {(b, n, m, d, k)}")
    return {"cases": 2, "ok": True, "max_abs_feature_diff": worst}


def rows_inputs(p, b, t, d, heads, gen, dev):
    """p layers' own bf16 projection tensors [b, t, d]; the last half are value rows (norms)."""
    qs = [torch.randn(b, t, d, generator=gen, device=dev).bfloat16() for _ in range(p)]
    ks = [torch.randn(b, t, d, generator=gen, device=dev).bfloat16() for _ in range(p)]
    return qs, ks, heads, (d // heads) ** -0.5, p // 2, p // 2


def check_rows(attention_rows_triton, args_) -> dict:
    """Rows and norms within bf16 logit rounding of the reference."""
    (gp, gn), (wp, wn) = attention_rows_triton(*args_), attention_rows_ref(*args_)
    rows, norms = float((gp - wp).abs().max()), float((gn - wn).abs().max() / wn.abs().max())
    if rows > 1e-2 or norms > 1e-4:
        raise SystemExit(f"attention_rows differ: rows by {rows}, norms by {norms} (relative)")
    return {"cases": 1, "ok": True, "max_abs_row_diff": rows, "max_rel_norm_diff": norms}


def time_pair(results: list, name: str, triton_fn, ref_fn, args_, check: dict, row: dict, opts) -> None:
    """Time triton_fn(*args_) and ref_fn(*args_), record the row and print it."""
    times = {
        "triton": bench(lambda: triton_fn(*args_), opts.warmup, opts.rep),
        "ref": bench(lambda: ref_fn(*args_), opts.warmup, opts.rep),
    }
    results.append({"kernel": name, **row, "check": check, "ms": times})
    print(f"{name} {row}: " + ", ".join(f"{a} {t:.4f} ms" for a, t in times.items()), flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="path of the JSON results")
    ap.add_argument("--warmup", type=int, default=25, help="do_bench warmup (ms)")
    ap.add_argument("--rep", type=int, default=200, help="do_bench repetition time (ms)")
    ap.add_argument("--quick", action="store_true", help="first shape of each kernel only")
    ap.add_argument("--only", default="", help="comma-separated kernel names to run (default: all)")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench_kernels.py needs a CUDA device")
    import triton

    from vlmprune.kernels.flow_triton import flowcut_select_triton
    from vlmprune.kernels.hiprune_triton import hiprune_select_triton
    from vlmprune.kernels.merge_triton import visionzip_merge_triton
    from vlmprune.kernels.maxmin_triton import maxmin_select_triton
    from vlmprune.kernels.rows_triton import attention_rows_triton
    from vlmprune.kernels.select_triton import select_tokens_triton

    dev = torch.device("cuda")
    gen = torch.Generator(device=dev).manual_seed(0)
    env = {
        "gpu": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "python": platform.python_version(),
        "tf32_matmul": torch.backends.cuda.matmul.allow_tf32,
    }
    results: list[dict] = []
    only = {x for x in args.only.split(",") if x}
    run = lambda name: not only or name in only  # noqa: E731
    sel_shapes = SELECT_SHAPES[:1] if args.quick else SELECT_SHAPES
    mm_shapes = MAXMIN_SHAPES[:1] if args.quick else MAXMIN_SHAPES

    for b, n, d, k in (sel_shapes if run('select_tokens') else []):
        check = check_select(select_tokens_triton, b, n, d, k, gen, dev)
        scores = torch.randn(b, n, generator=gen, device=dev)
        feats = torch.randn(b, n, d, generator=gen, device=dev).bfloat16()
        kk = torch.full((b,), k, device=dev)
        valid = torch.full((b,), n, device=dev)
        times = {
            "triton": bench(lambda: select_tokens_triton(scores, feats, kk, valid), args.warmup, args.rep),
            "ref": bench(lambda: select_tokens_ref(scores, feats, kk, valid), args.warmup, args.rep),
            "topk+sort+gather": bench(lambda: topk_sort_gather(scores, feats, k), args.warmup, args.rep),
        }
        results.append({"kernel": "select_tokens", "batch": b, "N": n, "D": d, "k": k, "dtype": "bf16",
                        "check": check, "ms": times})
        print(f"select_tokens B={b} N={n} D={d} k={k}: " + ", ".join(f"{a} {t:.4f} ms" for a, t in times.items()), flush=True)

    for b, n, d, k in (mm_shapes if run('maxmin_select') else []):
        naive_ok = b * k * k * n <= 8 * 288 * 288 * 2880
        check = check_maxmin(maxmin_select_triton, b, n, d, k, gen, dev, naive=b * n <= 8 * 576)
        feats = torch.randn(b, n, d, generator=gen, device=dev).bfloat16()
        kk = torch.full((b,), k, device=dev)
        first = torch.randint(0, n, (b,), generator=gen, device=dev)
        for variant, fst in (("divprune", None), ("kcenter", first)):
            t0 = time.perf_counter()
            times = {
                "triton": bench(lambda: maxmin_select_triton(feats, kk, None, fst), args.warmup, args.rep),
                "ref": bench(lambda: maxmin_select_ref(feats, kk, None, fst), args.warmup, args.rep),
            }
            if naive_ok:
                times["naive"] = bench(lambda: maxmin_naive_ref(feats, kk, None, fst), 1, args.rep)
            results.append({"kernel": f"maxmin_select ({variant})", "batch": b, "N": n, "D": d, "k": k,
                            "dtype": "bf16", "check": check, "ms": times})
            print(f"maxmin {variant} B={b} N={n} D={d} k={k}: " + ", ".join(f"{a} {t:.4f} ms" for a, t in times.items())
                  + f" ({time.perf_counter() - t0:.1f}s)", flush=True)

    for b, layers, n, k in ((FLOW_SHAPES[:1] if args.quick else FLOW_SHAPES) if run('flowcut_select') else []):
        check = check_exact("flowcut_select", flowcut_select_triton, flowcut_select_ref,
                            lambda hard: flow_inputs(b, layers, n, k, gen, dev, hard), (b, layers, n, k))
        time_pair(results, "flowcut_select", flowcut_select_triton, flowcut_select_ref,
                  flow_inputs(b, layers, n, k, gen, dev), check,
                  {"batch": b, "N": n, "D": layers, "k": k, "dtype": "fp32"}, args)

    for b, h, w, k in ((GRID_SHAPES[:1] if args.quick else GRID_SHAPES) if run('hiprune_select') else []):
        check = check_exact("hiprune_select", hiprune_select_triton, hiprune_select_ref,
                            lambda hard: hiprune_inputs(b, h, w, k, gen, dev, hard), (b, h, w, k))
        time_pair(results, "hiprune_select", hiprune_select_triton, hiprune_select_ref,
                  hiprune_inputs(b, h, w, k, gen, dev), check,
                  {"batch": b, "N": h * w, "D": "-", "k": k, "dtype": "fp32"}, args)

    for b, n, m, d, k in ((MERGE_SHAPES[:1] if args.quick else MERGE_SHAPES) if run('visionzip_merge') else []):
        check = check_merge(visionzip_merge_triton, b, n, m, d, k, gen, dev)
        time_pair(results, "visionzip_merge", visionzip_merge_triton, visionzip_merge_ref,
                  merge_inputs(b, n, m, d, k, gen, dev), check,
                  {"batch": b, "N": n, "D": d, "k": k, "dtype": "bf16"}, args)

    for p, b, t, d, heads in ((ROWS_SHAPES[:1] if args.quick else ROWS_SHAPES) if run('attention_rows') else []):
        args_ = rows_inputs(p, b, t, d, heads, gen, dev)
        time_pair(results, "attention_rows", attention_rows_triton, attention_rows_ref, args_,
                  check_rows(attention_rows_triton, args_),
                  {"batch": b, "N": t, "D": d, "k": f"{p} rows", "dtype": "bf16"}, args)

    lines = [
        f"GPU: {env['gpu']}, torch {env['torch']}, triton {env['triton']}; median ms (triton.testing.do_bench)",
        "",
        "| kernel | B | N | D (flowcut: layers) | k | triton | ref | baseline | ref / triton | baseline / triton |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        t = r["ms"]
        base_name = "topk+sort+gather" if r["kernel"] == "select_tokens" else "naive"
        base = t.get(base_name)
        lines.append(
            f"| {r['kernel']} | {r['batch']} | {r['N']} | {r['D']} | {r['k']} | {t['triton']:.4f} | {t['ref']:.4f} | "
            + (f"{base_name} {base:.4f}" if base is not None else "-")
            + f" | {t['ref'] / t['triton']:.1f}x | "
            + (f"{base / t['triton']:.1f}x" if base is not None else "-")
            + " |"
        )
    claim = [r for r in results if r["kernel"].startswith("maxmin") and r["N"] == 576 and r["k"] == 64 and "naive" in r["ms"]]
    if claim:
        lines.append("")
        for r in claim:
            x = r["ms"]["naive"] / r["ms"]["triton"]
            lines.append(f"DESIGN §4.3 (>= 50x over the naive re-min at N=576, K=64): {r['kernel']} B={r['batch']}: "
                         f"{x:.0f}x {'PASS' if x >= 50 else 'FAIL'}")
    table = "\n".join(lines)
    print()
    print(table)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"env": env, "results": results, "table": table}, indent=2))
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
