"""Why `attention_rows` runs at half the memory bandwidth: the shipped `_rows_kernel` against other
formulations of the same work at FlowCut's batch-8 shape (22 layers of keys and values,
[8, 577, 1024] bf16, 44 rows), on CUDA:

* `load_only`: the same grid and tiles, loads and a row sum only (the bandwidth this grid reaches);
* `rows3d`: the tile loaded as [tokens, heads, head_dim] instead of reshaped;
* `rows_loop`: a program loops over a chunk of tokens (software-pipelined loads);
* `rows_dot`: the per-head sums as one `tl.dot` with a block-diagonal query matrix per program;
* per-layer launches (each layer's rows right after its keys and values are written, while they
  are in L2) against one launch for all layers.

Each variant's output is compared with the shipped kernel's. A diagnosis script (the variants are
not part of the package); results in BENCHMARKS.md.

    python scripts/bench_rows_variants.py --out rows_variants.txt
"""

from __future__ import annotations

import argparse

import torch
import triton
import triton.language as tl

from vlmprune.kernels import rows_triton as rt

L, B, T, D, H = 22, 8, 577, 1024, 16
P, HD = 2 * L, D // H


@triton.jit
def load_only(k_table, out_ptr, n_images, n_tokens, k_si, k_st, D: tl.constexpr, BLOCK_T: tl.constexpr):
    pid = tl.program_id(0)
    tok = tl.program_id(1) * BLOCK_T + tl.arange(0, BLOCK_T)
    base = tl.load(k_table + pid // n_images).to(tl.pointer_type(tl.bfloat16)) + (pid % n_images) * k_si
    k = tl.load(base + tok[:, None] * k_st + tl.arange(0, D)[None, :], mask=(tok < n_tokens)[:, None], other=0.0)
    tl.store(out_ptr + pid * n_tokens + tok, tl.sum(k.to(tl.float32), axis=1), mask=tok < n_tokens)


@triton.jit
def _finish(lg, k, row, pid, img, tok, live, logits_ptr, norms_ptr, n_images, n_tokens, scaled, norms_from, scale,
            HEADS: tl.constexpr):
    """Round, scale and store a [BLOCK_T, HEADS] block of logits and, for value rows, the norms."""
    lg = lg.to(tl.bfloat16)
    if row < scaled:
        lg = (lg.to(tl.float32) * scale).to(tl.bfloat16)
    h = tl.arange(0, HEADS)
    tl.store(logits_ptr + (pid * n_tokens + tok[:, None]) * HEADS + h[None, :], lg.to(tl.float32), mask=live[:, None])
    if row >= norms_from:
        kf = k.to(tl.float32)
        tl.store(norms_ptr + ((row - norms_from) * n_images + img) * n_tokens + tok, tl.sqrt(tl.sum(kf * kf, axis=1)),
                 mask=live)


@triton.jit
def rows3d(q_table, k_table, logits_ptr, norms_ptr, n_images, n_tokens, scaled, norms_from, scale, q_si, k_si, k_st,
           HEADS: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_T: tl.constexpr):
    pid = tl.program_id(0)
    row, img = pid // n_images, pid % n_images
    tok = tl.program_id(1) * BLOCK_T + tl.arange(0, BLOCK_T)
    ch = tl.arange(0, HEADS)[:, None] * HEAD_DIM + tl.arange(0, HEAD_DIM)[None, :]  # [H, HD]
    live = tok < n_tokens
    q = tl.load(tl.load(q_table + row).to(tl.pointer_type(tl.bfloat16)) + img * q_si + ch).to(tl.float32)
    kb = tl.load(k_table + row).to(tl.pointer_type(tl.bfloat16)) + img * k_si
    k = tl.load(kb + tok[:, None, None] * k_st + ch[None, :, :], mask=live[:, None, None], other=0.0).to(tl.float32)
    _finish(tl.sum(k * q[None, :, :], axis=2), tl.reshape(k, (BLOCK_T, HEADS * HEAD_DIM)), row, pid, img, tok, live,
            logits_ptr, norms_ptr, n_images, n_tokens, scaled, norms_from, scale, HEADS)


@triton.jit
def rows_loop(q_table, k_table, logits_ptr, norms_ptr, n_images, n_tokens, scaled, norms_from, scale, q_si, k_si, k_st,
              HEADS: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_T: tl.constexpr, CHUNK: tl.constexpr,
              STAGES: tl.constexpr, DOT: tl.constexpr):
    """CHUNK tokens per program, BLOCK_T at a time; DOT: the head sums as one tl.dot."""
    pid = tl.program_id(0)
    row, img = pid // n_images, pid % n_images
    ch = tl.arange(0, HEADS * HEAD_DIM)
    q = tl.load(tl.load(q_table + row).to(tl.pointer_type(tl.bfloat16)) + img * q_si + ch)
    block_diag = tl.where((ch // HEAD_DIM)[:, None] == tl.arange(0, HEADS)[None, :], q[:, None], 0.0).to(tl.bfloat16)
    kb = tl.load(k_table + row).to(tl.pointer_type(tl.bfloat16)) + img * k_si
    for t0 in tl.range(0, CHUNK, BLOCK_T, num_stages=STAGES):
        tok = tl.program_id(1) * CHUNK + t0 + tl.arange(0, BLOCK_T)
        live = tok < n_tokens
        k = tl.load(kb + tok[:, None] * k_st + ch[None, :], mask=live[:, None], other=0.0)
        if DOT:
            lg = tl.dot(k, block_diag, out_dtype=tl.float32)
        else:
            prod = k.to(tl.float32) * q.to(tl.float32)[None, :]
            lg = tl.sum(tl.reshape(prod, (BLOCK_T, HEADS, HEAD_DIM)), axis=2)
        _finish(lg, k, row, pid, img, tok, live, logits_ptr, norms_ptr, n_images, n_tokens, scaled, norms_from, scale,
                HEADS)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    dev = "cuda"
    xs = [torch.randn(B, T, D, device=dev, dtype=torch.bfloat16) for _ in range(P)]  # keys then values
    tab = torch.tensor([[x.data_ptr() for x in xs]] * 2, device=dev)
    logits = torch.empty(P, B, T, H, device=dev)
    norms = torch.empty(L, B, T, device=dev)
    lines = []

    def bench(name, fn) -> None:
        ms = triton.testing.do_bench(fn, warmup=25, rep=100)
        lines.append(f"{name}: {ms:.4f} ms ({P * B * T * D * 2 / ms / 1e9:.2f} TB/s)")
        print(lines[-1], flush=True)

    common = (logits, norms, B, T, L, L, 0.125, T * D, T * D, D)
    shipped = lambda bt=4, w=4: rt._rows_kernel[(P * B, triton.cdiv(T, bt))](  # noqa: E731
        tab[0], tab[1], *common, DTYPE=tl.bfloat16, HEADS=H, HEAD_DIM=HD, BLOCK_T=bt, NORMS=True, num_warps=w)

    def against_shipped(name: str) -> None:
        got, got_norms = logits.clone(), norms.clone()
        shipped()
        lines.append(f"{name} vs shipped: logits max diff {(got - logits).abs().max().item():.3g} "
                     f"(max |logit| {logits.abs().max().item():.3g}), norms {(got_norms - norms).abs().max().item():.3g}")

    big = torch.randn(P, B, T, D, device=dev, dtype=torch.bfloat16)
    bench("torch sum of one stacked tensor", lambda: big.sum(dtype=torch.float32))
    del big
    sums = torch.empty(P * B * T, device=dev)
    bench("load_only BLOCK_T=4", lambda: load_only[(P * B, triton.cdiv(T, 4))](tab[1], sums, B, T, T * D, D, D=D,
                                                                                 BLOCK_T=4, num_warps=4))
    for bt, w in ((4, 4), (8, 4), (16, 8)):
        bench(f"shipped BLOCK_T={bt} warps={w}", lambda: shipped(bt, w))
    bench("rows3d BLOCK_T=4", lambda: rows3d[(P * B, triton.cdiv(T, 4))](tab[0], tab[1], *common, HEADS=H, HEAD_DIM=HD,
                                                                          BLOCK_T=4, num_warps=4))
    against_shipped("rows3d")
    for dot, bt, chunk, stages, w in ((False, 4, 32, 2, 4), (False, 4, 64, 3, 4), (True, 16, 32, 2, 4),
                                      (True, 16, 64, 2, 4), (True, 32, 128, 3, 4), (True, 64, 128, 2, 4)):
        bench(f"rows_loop DOT={dot} BLOCK_T={bt} CHUNK={chunk} stages={stages} warps={w}",
              lambda: rows_loop[(P * B, triton.cdiv(T, chunk))](tab[0], tab[1], *common, HEADS=H, HEAD_DIM=HD, BLOCK_T=bt,
                                                               CHUNK=chunk, STAGES=stages, DOT=dot, num_warps=w))
        against_shipped(f"rows_loop DOT={dot}")

    # per-layer launches while the layer's keys and values are fresh in L2, vs one launch after all
    fresh = [torch.empty_like(x) for x in xs]
    per_layer = [torch.tensor([[fresh[i].data_ptr(), fresh[L + i].data_ptr()]] * 2, device=dev) for i in range(L)]
    all_layers = torch.tensor([[x.data_ptr() for x in fresh]] * 2, device=dev)

    def write(i: int) -> None:
        fresh[i].copy_(xs[i])
        fresh[L + i].copy_(xs[L + i])

    def one_launch() -> None:
        for i in range(L):
            write(i)
        rt._rows_kernel[(P * B, triton.cdiv(T, 4))](all_layers[0], all_layers[1], *common, DTYPE=tl.bfloat16,
                                                    HEADS=H, HEAD_DIM=HD, BLOCK_T=4, NORMS=True, num_warps=4)

    def interleaved() -> None:
        for i in range(L):
            write(i)
            rt._rows_kernel[(2 * B, triton.cdiv(T, 4))](per_layer[i][0], per_layer[i][1], logits[2 * i], norms[i], B, T,
                                                        1, 1, 0.125, T * D, T * D, D, DTYPE=tl.bfloat16, HEADS=H,
                                                        HEAD_DIM=HD, BLOCK_T=4, NORMS=True, num_warps=4)

    bench("L2: the 44 writes alone", lambda: [write(i) for i in range(L)])
    bench("L2: writes, then one launch", one_launch)
    bench("L2: each layer's launch after its writes", interleaved)
    open(args.out, "w").write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
