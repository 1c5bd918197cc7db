"""Greedy max-min diversity selection (DESIGN §4.3): DivPrune and seeded k-center.

Distance: d(i, j) = 1 - cos(x_i, x_j), computed in float32 from one batched Gram GEMM, made
exactly symmetric, with the norms read off its diagonal (`cosine_distance`; non-finite feature
entries count as 0, a zero vector is at distance 1 from everything). With S the picks so far:

* first pick: `first[b]` when given (k-center seeded by, e.g., the top CLS-attention token);
  otherwise argmax_i min_{j != i, j valid} d(i, j) (DivPrune; a lone valid token is picked);
* then, k[b] - 1 times: argmax over valid, unpicked i of min_{s in S} d(i, s).

Every argmax breaks ties toward the lower index. All implementations compute the same float32
distances from the same Gram matrix (the Triton kernels on the fly, with IEEE division and square
root) and only take exact mins and maxes of them, so they agree bit for bit.

`maxmin_select_ref` keeps a running min vector (one Gram + O(N*K)); `maxmin_naive_ref` re-takes
the min over all of S at every step (O(N*K^2)), the plain baseline; `maxmin_select` dispatches to
the Triton kernel (`maxmin_triton.py`) on CUDA and to `maxmin_select_ref` elsewhere."""

from __future__ import annotations

import torch


def _prepare(
    feats: torch.Tensor,
    k: torch.Tensor | int,
    valid: torch.Tensor | None,
    first: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Validate; return (k clipped to valid, valid, first) as int64 on the features' device."""
    if feats.ndim != 3:
        raise ValueError(f"feats must be [B, N, D], got shape {tuple(feats.shape)}")
    b, n, _ = feats.shape
    dev = feats.device
    if isinstance(k, int) and not isinstance(k, bool):
        k = torch.full((b,), k, dtype=torch.long)
    if not isinstance(k, torch.Tensor):
        raise TypeError(f"k must be an int or a LongTensor [B], got {k!r}")
    if k.shape != (b,):
        raise ValueError(f"k must be [B] = [{b}], got shape {tuple(k.shape)}")
    if (k < 0).any():
        raise ValueError(f"k must be >= 0, got {k.tolist()}")
    if valid is None:
        valid = torch.full((b,), n, dtype=torch.long, device=dev)
    if valid.shape != (b,):
        raise ValueError(f"valid must be [B] = [{b}], got shape {tuple(valid.shape)}")
    valid = valid.to(device=dev, dtype=torch.long).clamp(0, n)
    k = torch.minimum(k.to(device=dev, dtype=torch.long), valid)
    if first is not None:
        if first.shape != (b,):
            raise ValueError(
                f"first must be [B] = [{b}], got shape {tuple(first.shape)}"
            )
        first = first.to(device=dev, dtype=torch.long)
        bad = (k > 0) & ((first < 0) | (first >= valid))
        if bad.any():
            raise ValueError(
                f"first must index a valid token (0 <= first < valid), got first={first.tolist()} "
                f"with valid={valid.tolist()}"
            )
        first = torch.where(k > 0, first, torch.zeros_like(first))
    return k, valid, first


NORM_EPS2 = 2.0**-80
"""Floor of the squared norm (exact in float32): a zero vector has cosine 0 with everything."""


def gram_sum(feats: torch.Tensor) -> torch.Tensor:
    """s = G + G^T with G = X X^T the Gram matrix of each image's features: [B, N, D] -> [B, N, N]
    float32, exactly symmetric (a GEMM need not give G[i, j] == G[j, i] bit for bit, and DivPrune's
    first pick is often a tie between two mutual nearest neighbours, which must go to the lower
    index). Non-finite feature entries count as 0; one batched GEMM with float32 accumulation.
    bf16 / fp16 features on CUDA are multiplied as they are with a float32 result (their products
    are exact in float32, as when upcast first; it runs on the tensor cores instead of a float32
    GEMM many times slower); other inputs are upcast to float32 first."""
    if feats.is_cuda and feats.dtype in (torch.bfloat16, torch.float16):
        x = torch.nan_to_num(feats, nan=0.0, posinf=0.0, neginf=0.0)
        try:
            g = torch.bmm(x, x.transpose(1, 2), out_dtype=torch.float32)
        except (
            TypeError,
            RuntimeError,
        ):  # torch without bmm(out_dtype=...): the float32 GEMM below
            g = None
        if g is not None:
            return g + g.transpose(1, 2)
    x = feats.float()
    if x is feats:
        x = torch.nan_to_num(x, nan=0.0, posinf=0.0, neginf=0.0)
    else:
        x = torch.nan_to_num_(x, nan=0.0, posinf=0.0, neginf=0.0)
    g = torch.bmm(x, x.transpose(1, 2))
    return g + g.transpose(1, 2)


def distance_from_gram_sum(s: torch.Tensor) -> torch.Tensor:
    """d[i, j] = 1 - (0.5 s[i, j]) / (n_i n_j), n_i = sqrt(max(0.5 s[i, i], NORM_EPS2)): the cosine
    distance, in exactly this order of float32 operations (the Triton kernels repeat it with IEEE
    division and square root, so both give the same bits; 0.5 * s is exact)."""
    n = torch.sqrt(torch.clamp_min(0.5 * torch.diagonal(s, dim1=1, dim2=2), NORM_EPS2))
    return 1.0 - (0.5 * s) / (n[:, :, None] * n[:, None, :])


def cosine_distance(feats: torch.Tensor) -> torch.Tensor:
    """d = 1 - cos(x_i, x_j) for every pair of tokens: [B, N, D] -> [B, N, N] float32."""
    return distance_from_gram_sum(gram_sum(feats))


def first_pick(dist: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """DivPrune's first token per image: argmax_i min_{j != i, j valid} d(i, j) (ties: lower i)."""
    _, n, _ = dist.shape
    pos = torch.arange(n, device=dist.device)
    live = pos[None, :] < valid[:, None]
    skip = (pos[:, None] == pos[None, :])[None] | ~live[:, None, :]
    nearest = dist.masked_fill(skip, float("inf")).amin(dim=-1)
    return nearest.masked_fill(~live, float("-inf")).argmax(dim=-1)


def _finish(order: torch.Tensor, n: int, return_order: bool):
    """Ascending indices (-1 padded) from picks in selection order (-1 padded)."""
    idx = torch.sort(order.masked_fill(order < 0, n), dim=1).values
    idx = idx.masked_fill(idx == n, -1)
    return (idx, order) if return_order else idx


def _start(feats: torch.Tensor, k, valid, first):
    """Checked inputs, the -1 filled pick order [B, kmax] and the distance matrix (None when
    nothing is kept)."""
    k, valid, first = _prepare(feats, k, valid, first)
    kmax = int(k.max()) if feats.shape[0] else 0
    order = torch.full(
        (feats.shape[0], kmax), -1, dtype=torch.long, device=feats.device
    )
    return k, valid, first, order, (cosine_distance(feats) if kmax else None)


def maxmin_select_ref(
    feats: torch.Tensor,
    k: torch.Tensor | int,
    valid: torch.Tensor | None = None,
    first: torch.Tensor | None = None,
    *,
    return_order: bool = False,
):
    """Greedy max-min diversity selection, torch reference with a running min vector.

    feats [B, N, D] (any float dtype; distances in float32), k [B] tokens to keep per image
    (clipped to valid), valid [B] real tokens per image (default N), first [B] optional first
    pick. Returns idx [B, kmax] ascending and -1 padded (kmax = max clipped k); with
    `return_order=True`, (idx, order) where order holds the same picks in selection order."""
    k, valid, first, order, dist = _start(feats, k, valid, first)
    b, n, _ = feats.shape
    if dist is None:
        return _finish(order, n, return_order)
    rows = torch.arange(b, device=feats.device)
    pos = torch.arange(n, device=feats.device)
    dead = pos[None, :] >= valid[:, None]  # padding, never a candidate
    p = first_pick(dist, valid) if first is None else first
    order[:, 0] = torch.where(k > 0, p, -1)
    chosen = torch.zeros((b, n), dtype=torch.bool, device=feats.device)
    chosen[rows, p] = True
    mind = dist[rows, p]  # min over S of d[s, i], per image
    for t in range(1, order.shape[1]):
        cand = mind.masked_fill(chosen | dead, float("-inf"))
        p = cand.argmax(dim=1)  # first maximum: ties to the lower index
        active = k > t
        order[:, t] = torch.where(active, p, -1)
        chosen[rows, p] |= active
        mind = torch.minimum(mind, dist[rows, p])
    return _finish(order, n, return_order)


def maxmin_naive_ref(
    feats: torch.Tensor,
    k: torch.Tensor | int,
    valid: torch.Tensor | None = None,
    first: torch.Tensor | None = None,
    *,
    return_order: bool = False,
):
    """The same selection written plainly: per image, at every step the min over all picks so far
    is taken again (O(N*K^2) after the Gram). The baseline the kernel is measured against."""
    k, valid, first, order, dist = _start(feats, k, valid, first)
    b, n, _ = feats.shape
    if dist is None:
        return _finish(order, n, return_order)
    starts = first_pick(dist, valid) if first is None else first
    for i in range(b):
        ki, vi = int(k[i]), int(valid[i])
        if ki == 0:
            continue
        d = dist[i, :vi, :vi]
        picks = [int(starts[i])]
        for _ in range(1, ki):
            m = d[picks, :].amin(dim=0)
            m[picks] = float("-inf")
            picks.append(int(m.argmax()))
        order[i, :ki] = torch.tensor(picks, device=feats.device)
    return _finish(order, n, return_order)
