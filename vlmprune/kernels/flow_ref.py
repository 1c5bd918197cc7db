"""FlowCut's progressive selection (DESIGN §3, `flowcut`): the torch reference, checks and constants.

Given per-layer signals of the visual tokens over an encoder span, [L, B, N] float32 each:
`attn` (head-mean CLS attention), optional `sem` (CLS-value attention) and optional `dens`
(value norms), and per layer `rpl[l]`: None where no cut happens, else the layers left after this
cut (0 at the final one). Over the tokens still alive, each layer scores

    score_l = (attn_weight * a / sum(a) + semantic_weight * s / sum(s)) * d

(sums over the alive tokens), accumulated as flow_l = score_l at the first layer, then
momentum * flow_{l-1} + (1 - momentum) * score_l. At a cut with rpl = 0 the top min(k, alive)
tokens by flow stay; otherwise r = floor((alive - k)^+ / sqrt(rpl) * (1 - (H / log alive)^2) + 1/2)
are pruned (never below min(k, alive)), H the entropy of a / sum(a) at that layer. Ties go to the
lower index, NaN flow counts lowest; pruned tokens stay pruned.

`flowcut_select_ref` is that, layer run by layer run in torch ops; `flowcut_select` dispatches to
the Triton kernel (`flow_triton.py`, one program per image running every layer and cut) on CUDA.
Both compute the same float32 formulas; their sums and logarithms may round in another order, so
a decision closer than a few ulps can differ (random inputs agree exactly in the tests)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from vlmprune.kernels.select_ref import pack, rank

TINY = torch.finfo(torch.float32).tiny


@dataclass(frozen=True)
class FlowSchedule:
    """Where FlowCut cuts and how it weighs its terms: `rpl[l]` is None where layer l makes no cut,
    else the layers left after its cut (the last is 0, the final cut)."""

    rpl: tuple[int | None, ...]
    attn_weight: float = 1.0
    semantic_weight: float = 1.0
    momentum: float = 0.5


def _check(
    attn: torch.Tensor, sem, dens, k: torch.Tensor, valid: torch.Tensor, rpl
) -> None:
    if attn.ndim != 3:
        raise ValueError(f"attn must be [L, B, N], got shape {tuple(attn.shape)}")
    for name, t in (("sem", sem), ("dens", dens)):
        if t is not None and t.shape != attn.shape:
            raise ValueError(
                f"{name} must have attn's shape {tuple(attn.shape)}, got {tuple(t.shape)}"
            )
    b = attn.shape[1]
    if k.shape != (b,) or valid.shape != (b,):
        raise ValueError(
            f"k and valid must be [B] = [{b}], got {tuple(k.shape)} and {tuple(valid.shape)}"
        )
    if (
        len(rpl) != attn.shape[0]
        or rpl[-1] != 0
        or any(r is not None and r < 0 for r in rpl)
    ):
        raise ValueError(
            f"rpl must give each of the {attn.shape[0]} layers None or the layers left (>= 0), "
            f"ending with 0 (the final cut); got {rpl}"
        )


def _normalise(x: torch.Tensor, alive: torch.Tensor) -> torch.Tensor:
    """x [..., B, N] restricted to the alive tokens and scaled to sum 1 over them (zero elsewhere)."""
    x = torch.where(alive, x, torch.zeros_like(x))
    return x / x.sum(dim=-1, keepdim=True).clamp_min(TINY)


def flowcut_select_ref(
    attn: torch.Tensor,
    sem: torch.Tensor | None,
    dens: torch.Tensor | None,
    k: torch.Tensor,
    valid: torch.Tensor,
    schedule: FlowSchedule,
) -> torch.Tensor:
    """Kept indices [B, kmax] (ascending, -1 padded; kmax = max of k clipped to valid)."""
    rpl = schedule.rpl
    _check(attn, sem, dens, k, valid, rpl)
    _, b, n = attn.shape
    device = attn.device
    valid = valid.to(device=device, dtype=torch.long).clamp(0, n)
    ks = torch.minimum(k.to(device=device, dtype=torch.long), valid)
    pos = torch.arange(n, device=device)
    alive = pos[None, :] < valid[:, None]
    flow = None
    start = 0
    # the alive set changes only at the cuts, so each run of layers up to a cut is scored at once
    for j in [j for j, r in enumerate(rpl) if r is not None]:
        seg = slice(start, j + 1)
        p = _normalise(attn[seg].float(), alive)  # [Ls, B, N]
        score = schedule.attn_weight * p
        if sem is not None:
            score = score + schedule.semantic_weight * _normalise(
                sem[seg].float(), alive
            )
        if dens is not None:
            score = score * dens[seg].float()
        for row in score:
            flow = (
                row
                if flow is None
                else schedule.momentum * flow + (1 - schedule.momentum) * row
            )
        start = j + 1
        n_alive = alive.sum(1)
        if rpl[j] == 0:
            n_keep = torch.minimum(ks, n_alive)
        else:
            entropy = -torch.special.xlogy(p[-1], p[-1]).sum(1)
            ratio = torch.where(
                n_alive > 1,
                entropy / n_alive.clamp_min(2).float().log(),
                torch.ones_like(entropy),
            )
            cut = (
                torch.floor(
                    (n_alive - ks).clamp_min(0) / rpl[j] ** 0.5 * (1 - ratio**2) + 0.5
                )
                .long()
                .clamp_min(0)
            )
            n_keep = torch.maximum(n_alive - cut, torch.minimum(ks, n_alive))
        order = rank(flow, alive)
        alive = torch.zeros_like(alive).scatter(
            1, order, pos[None, :] < n_keep[:, None]
        )
    return pack(alive, int(ks.max()) if b else 0)
