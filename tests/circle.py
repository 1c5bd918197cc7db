"""Hand-made features with a known max-min answer, shared by the kernel and scorer tests
(torch only, so the Triton-interpreter child process can import it)."""

import torch


def circle(copies: list[int], seed: int = 0, dim: int = 6):
    """8 equally spaced unit directions in a plane of R^dim (integer coordinates, so all
    axis/diagonal distances are exact), direction a repeated copies[a] times with power-of-two
    scales (cosine distances unchanged, exactly), in a shuffled order. Returns the features and
    the direction of each token."""
    coords = [(1, 0), (1, 1), (0, 1), (-1, 1), (-1, 0), (-1, -1), (0, -1), (1, -1)]
    dirs = [a for a, c in enumerate(copies) for _ in range(c)]
    perm = torch.randperm(len(dirs), generator=torch.Generator().manual_seed(seed)).tolist()
    dirs = [dirs[p] for p in perm]
    x = torch.zeros(len(dirs), dim)
    for i, a in enumerate(dirs):
        x[i, 1], x[i, 3] = coords[a]
        x[i] *= (0.5, 1.0, 4.0)[i % 3]
    return x, dirs
