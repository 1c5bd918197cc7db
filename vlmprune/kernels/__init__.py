"""Selection kernels: each has a torch reference (`*_ref`) and a dispatcher."""

from vlmprune.kernels.select import gather_rows, select_tokens, select_tokens_ref

__all__ = ["gather_rows", "select_tokens", "select_tokens_ref"]
