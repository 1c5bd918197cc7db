"""Selection kernels. Each kernel X is three modules (DESIGN §4), imported one way only:
`X` (the dispatcher: Triton on CUDA, the reference elsewhere) -> `X_triton` (the Triton kernel,
imported inside the dispatcher: Triton is optional) -> `X_ref` (the torch reference, its input
checks and constants)."""

from vlmprune.kernels.maxmin import maxmin_naive_ref, maxmin_select, maxmin_select_ref
from vlmprune.kernels.select import gather_rows, select_tokens, select_tokens_ref

__all__ = [
    "gather_rows",
    "maxmin_naive_ref",
    "maxmin_select",
    "maxmin_select_ref",
    "select_tokens",
    "select_tokens_ref",
]
