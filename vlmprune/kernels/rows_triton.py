"""Triton implementation of `vlmprune.kernels.rows.attention_rows`.

`_rows_kernel` runs one program per (row, image, block of tokens). The row's query and key
tensors are found through two tables of addresses, so the layers' projections are read where
the encoder left them (no stacked copy of up to a GiB). It loads the block's keys as one
[BLOCK_T, D] tile and the query, sums their products within each head in float32 (a tl.dot
version, and one reading (token, head) rows, were both slower on an H200), rounds the logits
to the inputs' dtype (times `scale` for the scaled rows, rounded again, as the reference's
in-place multiply does) and stores them as float32; the token norms come from the same tile.
`_softmax_mean_kernel` then turns each (row, image)'s [T, H] logits into the head mean of the
per-head softmax over tokens in one pass, 7x faster on an H200 than torch's softmax over a
middle dim and mean (which still runs where a [T, H] block is too big for one program)."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from vlmprune.kernels.dispatch import interpreted
from vlmprune.kernels.rows_ref import _check, attention_rows_ref, softmax_mean
from vlmprune.kernels.select_ref import to_device

ROW_ELEMS = 4096
"""Key elements a program reads ([BLOCK_T, D]): small tiles in many programs were fastest on an
H200 (4 tokens of CLIP-L, 4 warps: 0.30 ms for 46 rows at batch 8, 0.33 with 16 tokens, 8 warps)."""

SOFTMAX_ELEMS = 32768
"""Largest [T, H] block of logits one softmax program holds in registers."""

DTYPES = {
    torch.float32: tl.float32,
    torch.float16: tl.float16,
    torch.bfloat16: tl.bfloat16,
}


_TABLES: dict[tuple, torch.Tensor] = {}


def address_table(ptrs: list[int], device: torch.device) -> torch.Tensor:
    """The addresses on `device` as int64, made once per set: the caching allocator hands an
    encoder call's projections the same addresses call after call, so the copy (a pinned staging
    buffer and a launch) is usually skipped. A few sets are kept (tables are read, never written)."""
    key = (device.index, *ptrs)
    table = _TABLES.get(key)
    if table is None:
        if len(_TABLES) >= 8:
            _TABLES.pop(next(iter(_TABLES)))
        table = _TABLES[key] = to_device(ptrs, device)
    return table


@triton.jit
def _rows_kernel(
    q_table,  # [P] int64 addresses of the query tensors (token 0 is the query)
    k_table,  # [P] int64 addresses of the key tensors
    logits_ptr,  # [P, I, T, H] float32 out
    norms_ptr,  # [P - norms_from, I, T] float32 out (when NORMS)
    n_images,
    n_tokens,
    scaled,
    norms_from,
    scale,
    q_si,
    k_si,
    k_st,  # strides (elements) of the image and token dims; the channel stride is 1
    DTYPE: tl.constexpr,
    HEADS: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_T: tl.constexpr,
    NORMS: tl.constexpr,
):
    pid = tl.program_id(0)  # row * n_images + image
    row = pid // n_images
    img = pid % n_images
    tok = tl.program_id(1) * BLOCK_T + tl.arange(0, BLOCK_T)
    ch = tl.arange(0, HEADS * HEAD_DIM)
    live = tok < n_tokens
    q_base = tl.load(q_table + row).to(tl.pointer_type(DTYPE)) + img * q_si
    k_base = tl.load(k_table + row).to(tl.pointer_type(DTYPE)) + img * k_si
    q = tl.load(q_base + ch).to(tl.float32)
    k = tl.load(
        k_base + tok[:, None] * k_st + ch[None, :], mask=live[:, None], other=0.0
    ).to(tl.float32)
    # all heads at once: the [BLOCK_T, D] products summed within each head's channels
    logits = tl.sum(tl.reshape(k * q[None, :], (BLOCK_T, HEADS, HEAD_DIM)), axis=2).to(
        DTYPE
    )
    if row < scaled:
        logits = (logits.to(tl.float32) * scale).to(DTYPE)
    head = tl.arange(0, HEADS)
    out = logits_ptr + (pid * n_tokens + tok[:, None]) * HEADS + head[None, :]
    tl.store(out, logits.to(tl.float32), mask=live[:, None])
    if NORMS:  # noqa: SIM102 (a constexpr branch: Triton compiles it away; `and` would not)
        if row >= norms_from:
            norms = tl.sqrt(tl.sum(k * k, axis=1))
            tl.store(
                norms_ptr + ((row - norms_from) * n_images + img) * n_tokens + tok,
                norms,
                mask=live,
            )


@triton.jit
def _softmax_mean_kernel(
    logits_ptr,  # [P * I, T, H] float32
    out_ptr,  # [P * I, T] float32
    n_tokens,
    HEADS: tl.constexpr,
    BLOCK_T: tl.constexpr,
):
    """`rows.softmax_mean` for one (row, image): per head the softmax over tokens, then the mean
    over heads (exp(x - max) / sum, as torch's softmax; float32 sums in another order)."""
    pid = tl.program_id(0).to(tl.int64)
    tok = tl.arange(0, BLOCK_T)
    head = tl.arange(0, HEADS)
    live = tok < n_tokens
    x = tl.load(
        logits_ptr + (pid * n_tokens + tok[:, None]) * HEADS + head[None, :],
        mask=live[:, None],
        other=float("-inf"),
    )
    e = tl.exp(x - tl.max(x, axis=0)[None, :])
    probs = e / tl.sum(e, axis=0)[None, :]
    tl.store(out_ptr + pid * n_tokens + tok, tl.sum(probs, axis=1) / HEADS, mask=live)


def can_launch(t: torch.Tensor) -> bool:
    """CUDA tensors, or CPU tensors when this module was imported under TRITON_INTERPRET=1."""
    return t.is_cuda or (t.device.type == "cpu" and interpreted(_rows_kernel))


def attention_rows_triton(
    queries: list[torch.Tensor],
    keys: list[torch.Tensor],
    heads: int,
    scale: float,
    scaled: int,
    norms_from: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """`attention_rows_ref` without stacking the key tensors (see the module doc). Falls back to
    the reference when the tensors do not share one layout with unit channel stride."""
    _check(queries, keys, heads)
    k0, q0 = keys[0], queries[0]
    i, t, d = k0.shape
    head_dim = d // heads
    ks, qs, dtype = (
        k0.stride(),
        q0.stride(),
        k0.dtype,
    )  # (tensor.device makes an object: slow on 88 tensors)
    same = (
        all(k.stride() == ks and k.dtype is dtype for k in keys)
        and all(q.stride() == qs and q.dtype is dtype for q in queries)
        and len({t.get_device() for t in (*queries, *keys)}) == 1
    )
    pow2 = (
        head_dim & (head_dim - 1) == 0 and heads & (heads - 1) == 0 and d <= ROW_ELEMS
    )
    if (
        not same
        or not pow2
        or k0.stride(2) != 1
        or q0.stride(2) != 1
        or k0.dtype not in DTYPES
        or not can_launch(k0)
    ):
        return attention_rows_ref(queries, keys, heads, scale, scaled, norms_from)
    p, dev = len(keys), k0.device
    tables = address_table(
        [q.data_ptr() for q in queries] + [k.data_ptr() for k in keys], dev
    ).view(2, p)
    logits = torch.empty((p, i, t, heads), dtype=torch.float32, device=dev)
    norms = (
        None
        if norms_from is None
        else torch.empty((p - norms_from, i, t), dtype=torch.float32, device=dev)
    )
    block_t = max(1, ROW_ELEMS // d)
    _rows_kernel[(p * i, triton.cdiv(t, block_t))](
        tables[0],
        tables[1],
        logits,
        norms if norms is not None else logits,
        i,
        t,
        scaled,
        0 if norms_from is None else norms_from,
        float(scale),
        q0.stride(0),
        k0.stride(0),
        k0.stride(1),
        DTYPE=DTYPES[k0.dtype],
        HEADS=heads,
        HEAD_DIM=head_dim,
        BLOCK_T=block_t,
        NORMS=norms_from is not None,
        num_warps=4,
    )
    block = triton.next_power_of_2(t)
    if block * heads > SOFTMAX_ELEMS:
        return softmax_mean(logits), norms
    probs = torch.empty((p, i, t), dtype=torch.float32, device=dev)
    _softmax_mean_kernel[(p * i,)](
        logits,
        probs,
        t,
        HEADS=heads,
        BLOCK_T=block,
        num_warps=8 if block * heads > 8192 else 4,
    )
    return probs, norms
