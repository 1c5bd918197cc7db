"""Signals from a ViT-style encoder (CLIP, SigLIP, ...) without eager attention.

Each requested layer's attention module makes q, k and v with its own `q_proj` / `k_proj` /
`v_proj`: forward hooks keep those outputs (nothing is projected twice), and the rows a scorer
asked for (the CLS query against all keys, the CLS value against all values, value norms, the
mean received attention) are computed from them in a few batched ops over several layers at
once, while the encoder itself keeps SDPA/FlashAttention. On the host-bound encoder of a 7B
VLM, the number of ops the hooks launch is what they cost."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import torch
from torch import nn

from vlmprune.scorers.base import Request

FLUSH_LAYERS = 8
"""Layers whose projections are held before their rows are computed in one batch (bounds the
extra memory to this many layers' k and v)."""


def attn_geometry(attn: nn.Module) -> tuple[int, int, float]:
    """(heads, head_dim, scale) of an HF attention module."""
    heads = getattr(attn, "num_heads", None) or attn.config.num_attention_heads
    head_dim = getattr(attn, "head_dim", None) or attn.q_proj.out_features // heads
    scale = getattr(attn, "scale", None) or getattr(attn, "scaling", None) or head_dim**-0.5
    return heads, head_dim, scale


def row_attention(query: torch.Tensor, keys: torch.Tensor, heads: int, scale: float) -> torch.Tensor:
    """Head-mean softmax attention of one query over all tokens: query [..., D] (heads
    concatenated), keys [..., T, D] -> [..., T] float32 (logits in the inputs' dtype, as SDPA
    forms them; softmax in float32)."""
    d = query.shape[-1] // heads
    q = query.unflatten(-1, (heads, 1, d))  # [..., H, 1, d]
    k = keys.unflatten(-1, (heads, d)).movedim(-3, -2)  # [..., H, T, d]
    logits = (q @ k.transpose(-1, -2)).squeeze(-2) * scale  # [..., H, T]
    return torch.softmax(logits, dim=-1, dtype=torch.float32).mean(-2)


def received_attention(q: torch.Tensor, k: torch.Tensor, heads: int, scale: float, chunk: int = 1024) -> torch.Tensor:
    """Head- and query-mean softmax attention each token receives: q, k [I, T, D] -> [I, T]
    float32. Queries go in chunks so the full T x T map never exists at once."""
    i, t, _ = q.shape
    qh = q.unflatten(-1, (heads, -1)).transpose(1, 2)  # [I, H, T, d]
    kh = k.unflatten(-1, (heads, -1)).transpose(1, 2)
    total = torch.zeros(i, t, dtype=torch.float32, device=q.device)
    for s in range(0, t, chunk):
        logits = torch.matmul(qh[:, :, s : s + chunk], kh.transpose(2, 3)) * scale
        total += torch.softmax(logits, dim=-1, dtype=torch.float32).sum(dim=(1, 2))
    return total / (heads * t)


@dataclass
class Collected:
    """Per-layer signals over all encoder tokens (CLS, if any, at position 0), batched over images."""

    cls_attn: dict[int, torch.Tensor] = field(default_factory=dict)
    cls_value_attn: dict[int, torch.Tensor] = field(default_factory=dict)
    received_attn: dict[int, torch.Tensor] = field(default_factory=dict)
    keys: dict[int, torch.Tensor] = field(default_factory=dict)
    value_norms: dict[int, torch.Tensor] = field(default_factory=dict)
    vision_hidden: dict[int, torch.Tensor] = field(default_factory=dict)


class _Capture:
    """One encoder forward's projections of the requested layers, turned into `Collected` signals:
    `keys` and `received_attn` as each layer finishes, the CLS rows and value norms of up to
    `FLUSH_LAYERS` layers at a time (one stacked computation per signal instead of one per layer)."""

    def __init__(self, request: Request, out: Collected):
        self.request, self.out = request, out
        self.proj: dict[int, dict[str, torch.Tensor]] = {}  # layer -> projection name -> output
        self.pending: list[tuple[int, int, float, dict[str, torch.Tensor]]] = []  # (layer, heads, scale, q/k/v)

    def wants(self, layer: int) -> tuple[str, ...]:
        r = self.request
        need = set()
        if layer in r.cls_attn or layer in r.received_attn:
            need |= {"q", "k"}
        if layer in r.keys:
            need.add("k")
        if layer in r.cls_value_attn or layer in r.value_norms:
            need.add("v")
        return tuple(sorted(need))

    def keep(self, layer: int, name: str):
        def hook(module: nn.Module, args, output: torch.Tensor) -> None:
            self.proj.setdefault(layer, {})[name] = output.detach()  # signals never carry autograd history

        return hook

    def done(self, layer: int):
        """Post-hook on the layer's attention: its q / k / v are all made by now."""

        def hook(attn: nn.Module, args, output) -> None:
            got = self.proj.pop(layer, {})
            missing = [name for name in self.wants(layer) if name not in got]
            if missing:
                raise ValueError(
                    f"vlmprune: the attention of encoder layer {layer} ({type(attn).__name__}) ran without calling "
                    f"{[m + '_proj' for m in missing]}; this encoder needs its own adapter"
                )
            r = self.request
            heads, _, scale = attn_geometry(attn)
            with torch.no_grad():
                if layer in r.keys:
                    self.out.keys[layer] = got["k"]
                if layer in r.received_attn:
                    self.out.received_attn[layer] = received_attention(got["q"], got["k"], heads, scale)
            if layer in r.cls_attn or layer in r.cls_value_attn or layer in r.value_norms:
                self.pending.append((layer, heads, scale, got))
                if len(self.pending) >= FLUSH_LAYERS:
                    self.flush()

        return hook

    @torch.no_grad()
    def flush(self) -> None:
        """The CLS rows and value norms of the pending layers, each signal in one stacked op per
        attention geometry (one, in any ViT)."""
        pending, self.pending = self.pending, []
        r = self.request
        # cls_attn: the CLS query against the keys (scaled); cls_value_attn: the CLS value against the values (unscaled)
        for name, layers, (a, b) in (("cls_attn", r.cls_attn, "qk"), ("cls_value_attn", r.cls_value_attn, "vv")):
            groups: dict[tuple[int, float], list[tuple[int, dict]]] = {}
            for layer, heads, scale, got in pending:
                if layer in layers:
                    groups.setdefault((heads, scale if name == "cls_attn" else 1.0), []).append((layer, got))
            for (heads, scale), group in groups.items():
                query = stack([got[a][:, 0] for _, got in group])  # [L, I, D]
                keys = stack([got[b] for _, got in group])  # [L, I, T, D]
                for (layer, _), row in zip(group, row_attention(query, keys, heads, scale)):
                    getattr(self.out, name)[layer] = row
        group = [(layer, got) for layer, _, _, got in pending if layer in r.value_norms]
        if group:
            norms = torch.linalg.vector_norm(stack([got["v"] for _, got in group]), dim=-1, dtype=torch.float32)
            for (layer, _), row in zip(group, norms):
                self.out.value_norms[layer] = row


def stack(tensors: list[torch.Tensor]) -> torch.Tensor:
    """torch.stack, or a view for a single tensor (no copy)."""
    return tensors[0].unsqueeze(0) if len(tensors) == 1 else torch.stack(tensors)


def _output_hook(idx: int, out: Collected):
    def hook(layer: nn.Module, args, output):
        out.vision_hidden[idx] = (output[0] if isinstance(output, tuple) else output).detach()

    return hook


@contextlib.contextmanager
def collect(layers: nn.ModuleList, request: Request):
    """Within the block, running the encoder fills the returned `Collected` for `request`."""
    out = Collected()
    capture = _Capture(request, out)
    handles = []
    attn_layers = set().union(
        request.cls_attn, request.cls_value_attn, request.received_attn, request.keys, request.value_norms
    )
    try:
        for idx in sorted(attn_layers):
            attn = layers[idx].self_attn
            for name in capture.wants(idx):
                proj = getattr(attn, f"{name}_proj", None)
                if not isinstance(proj, nn.Module):
                    raise ValueError(
                        f"vlmprune: the attention of encoder layer {idx} ({type(attn).__name__}) has no {name}_proj "
                        f"module to read {name} from; this encoder needs its own adapter"
                    )
                handles.append(proj.register_forward_hook(capture.keep(idx, name)))
            handles.append(attn.register_forward_hook(capture.done(idx)))
        for idx in request.vision_hidden:
            handles.append(layers[idx].register_forward_hook(_output_hook(idx, out)))
        yield out
        capture.flush()
    finally:
        for h in handles:
            h.remove()
