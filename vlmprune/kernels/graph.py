"""Zero-TPrune's attention graph and its weighted PageRank (DESIGN §3, `zero_tprune`).

`attention_graph_ref(q, k, heads, scale)`: a layer's full softmax attention among its tokens from
its own q and k ([B, T, D], heads concatenated), as one [T, T] graph per head (or their mean):
queries go in chunks, so building it needs O(H * chunk * T) memory beside the graph itself
(4 H T^2 bytes per image: 21 MiB for CLIP-L/336, T = 577, H = 16; H times less for the head mean).
With `group` g > 1 (Qwen's 2x2 merge: g = 4 consecutive tokens per group) the graph is over the
groups: the attention of group a to group b is the sum over b's keys, averaged over a's queries,
so every row still sums to 1.

`pagerank_ref(graph, counts, iterations)`: s_0 = 1/n on each graph's n valid nodes, then
s_{t+1}[j] = sum_i s_t[i] * A[i, j] (a node is important when important nodes attend to it), for a
fixed number of iterations: one batched matrix-vector product per iteration over all the graphs of
a batch (every head of every image), no Triton twin (the graph's construction costs far more)."""

from __future__ import annotations

import torch

from vlmprune.kernels.select_ref import to_device

CHUNK_BYTES = 2**28
"""Most bytes of float32 attention probabilities one query chunk may hold while a graph is built."""


def attention_graph_ref(
    q: torch.Tensor,
    k: torch.Tensor,
    heads: int,
    scale: float,
    *,
    group: int = 1,
    mean_heads: bool = False,
    chunk_bytes: int = CHUNK_BYTES,
) -> torch.Tensor:
    """[B, H or 1, T/g, T/g] float32 softmax attention (rows: queries, columns: keys) of q, k
    [B, T, D]: logits = (q_h . k_h) * scale in the inputs' dtype, softmax in float32 (as HF's
    attention computes them), per head or their mean; with `group` g, pooled over groups of g
    consecutive tokens (sum over the key group, mean over the query group)."""
    b, t, _ = q.shape
    if t % group:
        raise ValueError(
            f"attention_graph: {t} tokens are not a whole number of groups of {group}"
        )
    qh = q.unflatten(-1, (heads, -1)).transpose(1, 2)  # [B, H, T, d]
    kh = k.unflatten(-1, (heads, -1)).transpose(1, 2)
    m = t // group
    out = torch.zeros(
        b, 1 if mean_heads else heads, m, m, dtype=torch.float32, device=q.device
    )
    step = max(group, chunk_bytes // max(1, 4 * b * heads * t) // group * group)
    for s in range(0, t, step):
        p = torch.softmax(
            torch.matmul(qh[:, :, s : s + step], kh.transpose(2, 3)) * scale,
            dim=-1,
            dtype=torch.float32,
        )
        if group > 1:
            c = p.shape[2]
            p = p.view(b, heads, c // group, group, m, group).sum(-1).mean(3)
        if mean_heads:
            p = p.mean(1, keepdim=True)
        out[:, :, s // group : s // group + p.shape[2]] = p
    return out


def _check(graph: torch.Tensor, counts: list[int], iterations: int) -> None:
    if graph.ndim != 3 or graph.shape[1] != graph.shape[2]:
        raise ValueError(f"pagerank: graph must be [B, T, T], got {tuple(graph.shape)}")
    if len(counts) != graph.shape[0] or any(
        not 0 <= c <= graph.shape[1] for c in counts
    ):
        raise ValueError(
            f"pagerank: need one count in [0, {graph.shape[1]}] per graph ({graph.shape[0]}), "
            f"got {counts}"
        )
    if iterations < 0:
        raise ValueError(f"pagerank: iterations must be >= 0, got {iterations}")


def initial_scores(counts: list[int], t: int, device) -> torch.Tensor:
    """[B, T] float32: 1/n on each graph's first n (valid) nodes, 0 elsewhere."""
    n = to_device(counts, device)
    valid = torch.arange(t, device=device)[None, :] < n[:, None]
    return valid.float() / n.clamp(min=1).float()[:, None]


def pagerank_ref(
    graph: torch.Tensor, counts: list[int], iterations: int
) -> torch.Tensor:
    """[B, T] float32 weighted PageRank of row-stochastic graphs [B, T, T] (float32), each over its
    first counts[b] nodes (the rest: zero rows and columns, and zero scores)."""
    _check(graph, counts, iterations)
    s = initial_scores(counts, graph.shape[1], graph.device)
    g = graph.float()
    for _ in range(iterations):
        s = torch.bmm(s.unsqueeze(1), g).squeeze(1)
    return s
