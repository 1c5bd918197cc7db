"""VisionZip's split and merge (DESIGN §3, `visionzip`): the torch reference, checks and constants.

For G images that share n_valid = nv and budget ki < nv: the `n_dom` tokens of highest attention
stay as they are (ties to the lower index, NaN lowest); of the R = nv - n_dom remaining tokens in
ascending order, those at slots 0, step, 2 step, ... (step = R // n_ctx, n_ctx of them) are the
targets and every other remaining token joins the target of highest cosine similarity of its
`metric` row (in float32), ties to the lower target; a target's feature becomes the
float32 mean of its own and its members' features. Returns the ki kept indices ascending and
their features in the input dtype. ki >= nv keeps the first ki tokens unchanged.

`visionzip_merge_ref` is that in torch ops (~60); `visionzip_merge` dispatches to the Triton
path (`merge_triton.py`: three kernels, for the split, the assignment and the merge). Both
compute the same float32 formulas, in another order: the reference normalises the rows and
takes their dot products (each summed on its own, so identical targets tie exactly, which a GEMM
does not promise), the assignment kernel divides each dot product by the two norms, so a
similarity within a few ulps of another could pick another target (random inputs and exact ties
agree in the tests); merged features agree to float32 rounding (the Triton merge sums members in
blocks, the reference in a scatter-add, itself unordered on CUDA)."""

from __future__ import annotations

import torch

from vlmprune.kernels.select_ref import gather_rows, pack, rank, to_device


def _check(
    attn: torch.Tensor,
    metric: torch.Tensor,
    feats: torch.Tensor,
    nv: int,
    ki: int,
    n_dom: int,
    n_ctx: int,
):
    g, n = attn.shape if attn.ndim == 2 else (None, None)
    if (
        g is None
        or metric.shape[:2] != attn.shape
        or feats.shape[:2] != attn.shape
        or metric.ndim != 3
        or feats.ndim != 3
    ):
        raise ValueError(
            f"attn [G, N], metric [G, N, M] and feats [G, N, D] must agree, got {tuple(attn.shape)}, "
            f"{tuple(metric.shape)} and {tuple(feats.shape)}"
        )
    if not (0 <= ki and 0 <= nv <= n and 0 <= n_ctx <= ki and n_dom + n_ctx == ki):
        raise ValueError(
            f"need 0 <= nv <= N = {n}, 0 <= n_ctx <= ki and n_dom + n_ctx = ki; got nv={nv}, "
            f"ki={ki}, n_dom={n_dom}, n_ctx={n_ctx}"
        )


def keep_first(feats: torch.Tensor, ki: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The first ki tokens, unchanged (ki >= n_valid: nothing to prune)."""
    g = feats.shape[0]
    return torch.arange(ki, device=feats.device).expand(g, ki), feats[:, :ki]


def pairwise_dot(
    a: torch.Tensor, b: torch.Tensor, chunk_elems: int = 2**24
) -> torch.Tensor:
    """[G, R, M] x [G, C, M] -> [G, R, C] dot products, each summed on its own (a product and a
    row sum, R in chunks of at most `chunk_elems` products): a GEMM may round two identical
    columns differently (seen on CPU BLAS), and identical targets must tie so that the lower wins."""
    g, r, m = a.shape
    c = b.shape[1]
    if r == 0 or c == 0:
        return a.new_zeros(g, r, c)
    step = max(1, chunk_elems // max(1, g * c * m))
    return torch.cat(
        [(a[:, s : s + step, None, :] * b[:, None]).sum(-1) for s in range(0, r, step)],
        dim=1,
    )


def visionzip_merge_ref(
    attn: torch.Tensor,
    metric: torch.Tensor,
    feats: torch.Tensor,
    nv: int,
    ki: int,
    n_dom: int,
    n_ctx: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """([G, ki] kept indices ascending, [G, ki, D] features at them in feats' dtype), no host sync."""
    _check(attn, metric, feats, nv, ki, n_dom, n_ctx)
    g, n = attn.shape
    device = feats.device
    if ki >= nv:
        return keep_first(feats, ki)
    metric = torch.nn.functional.normalize(metric.float(), dim=-1)
    valid = (torch.arange(n, device=device) < nv).expand(g, n)
    order = rank(attn, valid)
    is_dom = torch.zeros(g, n, dtype=torch.bool, device=device).scatter(
        1, order[:, :n_dom], True
    )
    if n_ctx == 0:
        idx = pack(is_dom, ki)
        return idx, gather_rows(feats, idx)
    n_rest = nv - n_dom
    rest_idx = pack(~is_dom & valid, n_rest)  # [G, R] ascending
    step = n_rest // n_ctx
    is_target = torch.zeros(n_rest, dtype=torch.bool)
    is_target[: step * n_ctx : step] = True
    slots = torch.arange(n_rest)
    targets = rest_idx[:, to_device(slots[is_target], device)]  # [G, C]
    others = rest_idx[:, to_device(slots[~is_target], device)]  # [G, R - C]
    group = pairwise_dot(
        gather_rows(metric, others), gather_rows(metric, targets)
    ).argmax(dim=2)  # ties: lower target
    d = feats.shape[-1]
    sums = (
        gather_rows(feats, targets)
        .float()
        .scatter_add(
            1, group[..., None].expand(-1, -1, d), gather_rows(feats, others).float()
        )
    )
    counts = torch.ones(g, n_ctx, device=device).scatter_add(
        1, group, torch.ones(group.shape, device=device)
    )
    idx = pack(is_dom.scatter(1, targets, True), ki)
    out = gather_rows(feats, idx).float()
    out.scatter_(
        1,
        torch.searchsorted(idx, targets)[..., None].expand(-1, -1, d),
        sums / counts[..., None],
    )
    return idx, out.to(feats.dtype)
