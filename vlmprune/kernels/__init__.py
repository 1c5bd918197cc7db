"""Selection kernels: each has a torch reference (`*_ref`) and a dispatcher."""

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
