"""Which implementation runs: Triton on CUDA tensors, the torch reference elsewhere.

`VLMPRUNE_KERNELS=torch` forces the reference; `VLMPRUNE_KERNELS=triton` forces Triton (with
`TRITON_INTERPRET=1` this runs the kernels on CPU, which is how tests compare them)."""

from __future__ import annotations

import importlib.util
import os

import torch


def triton_available() -> bool:
    return importlib.util.find_spec("triton") is not None


def interpreted(kernel) -> bool:
    """Whether this `@triton.jit` kernel was built by Triton's interpreter (TRITON_INTERPRET=1 when
    its module was imported): then it runs on CPU tensors."""
    return type(kernel).__name__ == "InterpretedFunction"


def use_triton(t: torch.Tensor) -> bool:
    mode = os.environ.get("VLMPRUNE_KERNELS", "auto").lower()
    if mode not in ("auto", "torch", "triton"):
        raise ValueError(
            f"VLMPRUNE_KERNELS={mode!r}; allowed: 'auto', 'torch', 'triton'"
        )
    if mode == "torch":
        return False
    if mode == "triton":
        return True
    return t.is_cuda and triton_available() and _has_triton_impl()


def _has_triton_impl() -> bool:
    return importlib.util.find_spec("vlmprune.kernels.select_triton") is not None
