"""Signals from a ViT-style encoder (CLIP, SigLIP, ...) without eager attention.

A forward pre-hook on each requested layer's `self_attn` sees the layer-normed input from which
q/k/v are made; from it we compute only the rows a scorer asked for (the CLS query against all
keys, or the mean received attention), while the encoder itself keeps SDPA/FlashAttention."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import torch
from torch import nn

from vlmprune.scorers.base import Request


def attn_geometry(attn: nn.Module) -> tuple[int, int, float]:
    """(heads, head_dim, scale) of an HF attention module."""
    heads = getattr(attn, "num_heads", None) or attn.config.num_attention_heads
    head_dim = getattr(attn, "head_dim", None) or attn.q_proj.out_features // heads
    scale = getattr(attn, "scale", None) or getattr(attn, "scaling", None) or head_dim**-0.5
    return heads, head_dim, scale


def cls_row(attn: nn.Module, h: torch.Tensor) -> torch.Tensor:
    """Head-mean softmax attention of token 0 over all tokens: [I, T] float32."""
    heads, head_dim, scale = attn_geometry(attn)
    i, t, _ = h.shape
    q = attn.q_proj(h[:, :1]).view(i, 1, heads, head_dim).transpose(1, 2)
    k = attn.k_proj(h).view(i, t, heads, head_dim).transpose(1, 2)
    logits = torch.matmul(q, k.transpose(2, 3)) * scale
    return torch.softmax(logits, dim=-1, dtype=torch.float32).mean(1)[:, 0]


def cls_value_row(attn: nn.Module, h: torch.Tensor) -> torch.Tensor:
    """Head-mean softmax (unscaled) similarity of the CLS value to every token's value: [I, T]
    float32 (FlowCut's semantic-relevance term)."""
    heads, head_dim, _ = attn_geometry(attn)
    i, t, _ = h.shape
    v = attn.v_proj(h).view(i, t, heads, head_dim).transpose(1, 2)
    logits = torch.matmul(v[:, :, :1], v.transpose(2, 3))
    return torch.softmax(logits, dim=-1, dtype=torch.float32).mean(1)[:, 0]


def received_row(attn: nn.Module, h: torch.Tensor, chunk: int = 1024) -> torch.Tensor:
    """Head- and query-mean softmax attention each token receives: [I, T] float32.
    Queries are processed in chunks so the full T x T map never exists at once."""
    heads, head_dim, scale = attn_geometry(attn)
    i, t, _ = h.shape
    q = attn.q_proj(h).view(i, t, heads, head_dim).transpose(1, 2)
    k = attn.k_proj(h).view(i, t, heads, head_dim).transpose(1, 2)
    total = torch.zeros(i, t, dtype=torch.float32, device=h.device)
    for s in range(0, t, chunk):
        logits = torch.matmul(q[:, :, s : s + chunk], k.transpose(2, 3)) * scale
        total += torch.softmax(logits, dim=-1, dtype=torch.float32).sum(dim=(1, 2))
    return total / (heads * t)


@dataclass
class Collected:
    """Per-layer signals over all encoder tokens (CLS, if any, at position 0)."""

    cls_attn: dict[int, torch.Tensor] = field(default_factory=dict)
    cls_value_attn: dict[int, torch.Tensor] = field(default_factory=dict)
    received_attn: dict[int, torch.Tensor] = field(default_factory=dict)
    keys: dict[int, torch.Tensor] = field(default_factory=dict)
    value_norms: dict[int, torch.Tensor] = field(default_factory=dict)
    vision_hidden: dict[int, torch.Tensor] = field(default_factory=dict)


def _layer_hook(idx: int, request: Request, out: Collected):
    def hook(attn: nn.Module, args, kwargs):
        h = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
        with torch.no_grad():
            if idx in request.cls_attn:
                out.cls_attn[idx] = cls_row(attn, h)
            if idx in request.cls_value_attn:
                out.cls_value_attn[idx] = cls_value_row(attn, h)
            if idx in request.received_attn:
                out.received_attn[idx] = received_row(attn, h)
            if idx in request.keys:
                out.keys[idx] = attn.k_proj(h)
            if idx in request.value_norms:
                out.value_norms[idx] = attn.v_proj(h).float().norm(dim=-1)

    return hook


def _output_hook(idx: int, out: Collected):
    def hook(layer: nn.Module, args, output):
        out.vision_hidden[idx] = (output[0] if isinstance(output, tuple) else output).detach()

    return hook


@contextlib.contextmanager
def collect(layers: nn.ModuleList, request: Request):
    """Within the block, running the encoder fills the returned `Collected` for `request`."""
    out = Collected()
    handles = []
    attn_layers = set().union(
        request.cls_attn, request.cls_value_attn, request.received_attn, request.keys, request.value_norms
    )
    try:
        for idx in sorted(attn_layers):
            handles.append(layers[idx].self_attn.register_forward_pre_hook(_layer_hook(idx, request, out), with_kwargs=True))
        for idx in request.vision_hidden:
            handles.append(layers[idx].register_forward_hook(_output_hook(idx, out)))
        yield out
    finally:
        for h in handles:
            h.remove()
