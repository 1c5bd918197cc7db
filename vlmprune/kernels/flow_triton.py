"""Triton implementation of FlowCut's progressive selection (`vlmprune.kernels.flow`).

`_flowcut_kernel` runs one program per image over every layer of the span with the image's N
tokens in registers: the per-layer scores (masked sums over the alive tokens), the cumulative
flow, and at each cut the entropy, the pruning count and the selection of the tokens that stay
(the select kernel's `order_keys` / `top_mask`: radix select, ties to the lower index, no sort).
At the end a prefix-sum compaction writes the kept indices in ascending order. One launch
replaces the reference's ~25 torch ops per cut. Same formulas as `flowcut_select_ref`, in
float32; sums and logarithms may round differently (see `vlmprune.kernels.flow`)."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from vlmprune.kernels.dispatch import interpreted
from vlmprune.kernels.flow_ref import TINY, FlowSchedule, _check, flowcut_select_ref
from vlmprune.kernels.select_ref import to_device
from vlmprune.kernels.select_triton import (
    order_keys,
    row_budget,
    store_ascending,
    top_mask,
)

MAX_N = 8192
"""Longest row one program holds in registers; longer rows use the torch reference."""


TINY_F32 = tl.constexpr(TINY)


@triton.jit
def _alive_share(ptr, offs, n, alive):
    """x / sum(x) over the alive tokens (zero elsewhere) of one layer's row."""
    x = tl.where(
        alive, tl.load(ptr + offs, mask=offs < n, other=0.0).to(tl.float32), 0.0
    )
    # NaN propagates through the clamp as in torch.clamp_min (tl.maximum alone would drop it)
    return x / tl.maximum(
        tl.sum(x, axis=0), TINY_F32, propagate_nan=tl.PropagateNan.ALL
    )


@triton.jit
def _flowcut_kernel(
    attn_ptr,  # [L, B, N] (any float dtype; read as float32)
    sem_ptr,  # [L, B, N] (read when HAS_SEM)
    dens_ptr,  # [L, B, N] (read when HAS_DENS)
    rpl_ptr,  # int32 [L]: -1 = no cut, else layers left after the cut
    root_ptr,  # float32 [L]: sqrt(rpl)
    k_ptr,  # integer [B]
    valid_ptr,  # integer [B]
    idx_ptr,  # int64 [B, kmax]
    n_layers,
    n,
    s_al,
    s_ab,
    s_sl,
    s_sb,
    s_dl,
    s_db,
    s_ib,
    kmax,
    attn_weight,
    semantic_weight,
    momentum,
    keep_weight,  # 1 - momentum, rounded from double like the reference's Python scalar
    HAS_SEM: tl.constexpr,
    HAS_DENS: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK_N)
    vb, kb = row_budget(k_ptr, valid_ptr, b, n, True)
    alive = offs < vb
    flow = tl.zeros([BLOCK_N], tl.float32)
    for j in range(n_layers):
        p = _alive_share(attn_ptr + j * s_al + b * s_ab, offs, n, alive)
        score = attn_weight * p
        if HAS_SEM:
            score = score + semantic_weight * _alive_share(
                sem_ptr + j * s_sl + b * s_sb, offs, n, alive
            )
        if HAS_DENS:
            score = score * tl.load(
                dens_ptr + j * s_dl + b * s_db + offs, mask=offs < n, other=0.0
            ).to(tl.float32)
        if j == 0:
            flow = score
        else:
            flow = momentum * flow + keep_weight * score
        rpl = tl.load(rpl_ptr + j)
        if rpl >= 0:
            n_alive = tl.sum(alive.to(tl.int32), axis=0)
            n_keep = tl.minimum(kb, n_alive)
            if rpl > 0:
                entropy = -tl.sum(
                    p * tl.log(tl.where(p > 0, p, 1.0)), axis=0
                )  # xlogy: 0 log 0 = 0
                ratio = entropy / tl.log(tl.maximum(n_alive, 2).to(tl.float32))
                ratio = tl.where(n_alive > 1, ratio, 1.0)
                over = tl.maximum(n_alive - kb, 0).to(tl.float32)
                cut = tl.floor(
                    over / tl.load(root_ptr + j) * (1.0 - ratio * ratio) + 0.5
                ).to(tl.int32)
                n_keep = tl.maximum(n_alive - tl.maximum(cut, 0), n_keep)
            alive = top_mask(order_keys(flow, alive, BLOCK_N), alive, n_keep, BLOCK_N)
    store_ascending(idx_ptr + b * s_ib, alive, kb, kmax, BLOCK_N)


_SCHEDULES: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}


def schedule_tensors(
    rpl: tuple[int | None, ...], device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """(int32 [L] layers left per cut, -1 where none; float32 [L] their square roots) on `device`,
    made once per schedule and device: a scorer runs the same schedule at every prefill."""
    key = (rpl, str(device))
    if key not in _SCHEDULES:
        steps = torch.tensor([-1 if r is None else r for r in rpl], dtype=torch.int32)
        roots = torch.tensor(
            [0.0 if r is None else r**0.5 for r in rpl], dtype=torch.float32
        )
        _SCHEDULES[key] = (steps.to(device), roots.to(device))
    return _SCHEDULES[key]


def can_launch(t: torch.Tensor) -> bool:
    """CUDA tensors, or CPU tensors when this module was imported under TRITON_INTERPRET=1."""
    return t.is_cuda or (t.device.type == "cpu" and interpreted(_flowcut_kernel))


def flowcut_select_triton(
    attn: torch.Tensor,
    sem: torch.Tensor | None,
    dens: torch.Tensor | None,
    k: torch.Tensor,
    valid: torch.Tensor,
    schedule: FlowSchedule,
) -> torch.Tensor:
    """`flowcut_select_ref` in one launch. k and valid on the host (as the scorer passes them)
    cost no device sync: they size the output."""
    rpl = schedule.rpl
    _check(attn, sem, dens, k, valid, rpl)
    n_layers, b, n = attn.shape
    tensors = [t for t in (attn, sem, dens) if t is not None]
    if (
        b == 0
        or n == 0
        or n > MAX_N
        or not can_launch(attn)
        or any(t.stride(2) != 1 for t in tensors)
    ):
        return flowcut_select_ref(attn, sem, dens, k, valid, schedule)
    k_h, valid_h = k.tolist(), valid.tolist()
    if min(k_h) < 0:
        raise ValueError(f"k must be >= 0, got {k_h}")
    kmax = max(min(a, max(0, min(v, n))) for a, v in zip(k_h, valid_h))
    dev = attn.device
    idx = torch.empty((b, kmax), dtype=torch.long, device=dev)
    if kmax == 0:
        return idx
    steps, roots = schedule_tensors(rpl, dev)
    k_dev, valid_dev = to_device(k, dev), to_device(valid, dev)
    sem_, dens_ = sem if sem is not None else attn, dens if dens is not None else attn
    block = max(16, triton.next_power_of_2(n))
    _flowcut_kernel[(b,)](
        attn,
        sem_,
        dens_,
        steps,
        roots,
        k_dev,
        valid_dev,
        idx,
        n_layers,
        n,
        attn.stride(0),
        attn.stride(1),
        sem_.stride(0),
        sem_.stride(1),
        dens_.stride(0),
        dens_.stride(1),
        idx.stride(0),
        kmax,
        float(schedule.attn_weight),
        float(schedule.semantic_weight),
        float(schedule.momentum),
        float(1 - schedule.momentum),
        HAS_SEM=sem is not None,
        HAS_DENS=dens is not None,
        BLOCK_N=block,
        num_warps=4 if block <= 1024 else 8,
    )
    return idx
