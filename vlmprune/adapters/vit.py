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

FLUSH_LAYERS = 16
"""Most layers whose projections are held before their rows are computed in one batch."""

FLUSH_BYTES = 512 * 2**20
"""...and most bytes of held projections (the stacked copy for the batch adds up to as much again):
a CLIP-L encoder at batch 8 holds 9 MiB per projection and layer, so FlowCut's 22 layers of q, k,
v take two batches, VTC-CLS's 11 layers of q, k one."""


def attn_geometry(attn: nn.Module) -> tuple[int, int, float]:
    """(heads, head_dim, scale) of an HF attention module."""
    heads = getattr(attn, "num_heads", None) or attn.config.num_attention_heads
    head_dim = getattr(attn, "head_dim", None) or attn.q_proj.out_features // heads
    scale = getattr(attn, "scale", None) or getattr(attn, "scaling", None) or head_dim**-0.5
    return heads, head_dim, scale


def head_mask(dim: int, heads: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """[dim, heads] 0/1: column h selects the channels of head h (heads concatenated)."""
    key = (dim, heads, dtype, str(device))
    if key not in _HEAD_MASKS:
        _HEAD_MASKS[key] = torch.eye(heads, dtype=dtype).repeat_interleave(dim // heads, 0).to(device)
    return _HEAD_MASKS[key]


_HEAD_MASKS: dict[tuple, torch.Tensor] = {}


def row_attention(query: torch.Tensor, keys: torch.Tensor, heads: int, scale: float,
                  scaled: int | None = None) -> torch.Tensor:
    """Head-mean softmax attention of one query per row over all tokens: query [P, I, D] (heads
    concatenated), keys [P, I, T, D] -> [P, I, T] float32 (logits in the inputs' dtype, as SDPA
    forms them, times `scale` for the first `scaled` rows, default all; softmax in float32). The
    per-head dot products are one batched GEMM of the keys with a block-diagonal query matrix
    [D, heads], so the keys are read once, as they lie."""
    p, i, t, d = keys.shape
    blocks = query.unsqueeze(-1) * head_mask(d, heads, query.dtype, query.device)  # [P, I, D, H]
    logits = torch.bmm(keys.reshape(p * i, t, d), blocks.reshape(p * i, d, heads)).view(p, i, t, heads)
    scaled = p if scaled is None else scaled
    if scaled and scale != 1.0:
        logits[:scaled].mul_(scale)
    return torch.softmax(logits, dim=2, dtype=torch.float32).mean(-1)


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


class SignalHooks:
    """Forward hooks on the `q_proj` / `k_proj` / `v_proj` of the requested layers (and on the
    layers whose output is requested), installed once and idle unless `capture()` is running:
    registering and removing ~90 hooks around every encoder call cost more than running them."""

    def __init__(self, layers: nn.ModuleList, request: Request):
        self.request = request
        self.plan: dict[int, tuple[tuple[str, ...], int, float]] = {}  # layer -> (projections, heads, scale)
        self.handles: list = []
        self.active: _Capture | None = None
        try:
            for idx in sorted(set().union(request.cls_attn, request.cls_value_attn, request.received_attn,
                                          request.keys, request.value_norms)):
                attn = layers[idx].self_attn
                wants = projections(request, idx)
                for name in wants:
                    proj = getattr(attn, f"{name}_proj", None)
                    if not isinstance(proj, nn.Module):
                        raise ValueError(
                            f"vlmprune: the attention of encoder layer {idx} ({type(attn).__name__}) has no {name}_proj "
                            f"module to read {name} from; this encoder needs its own adapter"
                        )
                    self.handles.append(proj.register_forward_hook(self._keep(idx, name)))
                heads, _, scale = attn_geometry(attn)
                self.plan[idx] = (wants, heads, scale)
            for idx in request.vision_hidden:
                self.handles.append(layers[idx].register_forward_hook(self._output(idx)))
        except Exception:
            self.remove()
            raise

    def _keep(self, layer: int, name: str):
        def hook(module: nn.Module, args, output: torch.Tensor) -> None:
            if self.active is not None:
                self.active.add(layer, name, output)

        return hook

    def _output(self, layer: int):
        def hook(module: nn.Module, args, output) -> None:
            if self.active is not None:
                out = output[0] if isinstance(output, tuple) else output
                self.active.out.vision_hidden[layer] = out.detach()

        return hook

    @contextlib.contextmanager
    def capture(self):
        """Within the block, running the encoder fills the returned `Collected`."""
        if self.active is not None:
            raise RuntimeError("vlmprune: the encoder's signal hooks are already capturing (a nested encoder call)")
        self.active = _Capture(self)
        try:
            yield self.active.out
            self.active.finish()
        finally:
            self.active = None

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles = []


def projections(request: Request, layer: int) -> tuple[str, ...]:
    """Which of q / k / v layer `layer` must keep for `request`."""
    need = set()
    if layer in request.cls_attn or layer in request.received_attn:
        need |= {"q", "k"}
    if layer in request.keys:
        need.add("k")
    if layer in request.cls_value_attn or layer in request.value_norms:
        need.add("v")
    return tuple(sorted(need))


class _Capture:
    """One encoder forward's projections, turned into `Collected` signals as each layer's set is
    complete: `keys` and `received_attn` at once, the CLS rows and value norms of up to
    `FLUSH_LAYERS` layers (`FLUSH_BYTES`) at a time (one stacked computation for all of them)."""

    def __init__(self, hooks: SignalHooks):
        self.request, self.plan, self.out = hooks.request, hooks.plan, Collected()
        self.proj: dict[int, dict[str, torch.Tensor]] = {}  # layer -> projection name -> output, until complete
        self.pending: list[tuple[int, int, float, dict[str, torch.Tensor]]] = []  # (layer, heads, scale, q/k/v)
        self.held = 0  # bytes of the pending projections

    def add(self, layer: int, name: str, output: torch.Tensor) -> None:
        got = self.proj.setdefault(layer, {})
        got[name] = output.detach() if output.requires_grad else output  # signals carry no autograd history
        wants, heads, scale = self.plan[layer]
        if len(got) < len(wants):
            return
        del self.proj[layer]
        r = self.request
        if layer in r.keys:
            self.out.keys[layer] = got["k"]
        if layer in r.received_attn:
            with torch.no_grad():
                self.out.received_attn[layer] = received_attention(got["q"], got["k"], heads, scale)
        if layer in r.cls_attn or layer in r.cls_value_attn or layer in r.value_norms:
            self.pending.append((layer, heads, scale, got))
            self.held += sum(t.numel() * t.element_size() for t in got.values())
            if len(self.pending) >= FLUSH_LAYERS or self.held >= FLUSH_BYTES:
                self.flush()

    def finish(self) -> None:
        if self.proj:
            layer, got = next(iter(self.proj.items()))
            missing = [name + "_proj" for name in self.plan[layer][0] if name not in got]
            raise ValueError(
                f"vlmprune: the attention of encoder layer {layer} ran without calling {missing}; "
                f"this encoder needs its own adapter"
            )
        self.flush()

    @torch.no_grad()
    def flush(self) -> None:
        """The CLS rows (CLS query . keys, scaled; CLS value . values, unscaled) and value norms of
        the pending layers: per attention geometry (one, in any ViT) one stack of their keys and
        values, one GEMM, one softmax, one norm."""
        pending, self.pending, self.held = self.pending, [], 0
        r = self.request
        groups: dict[tuple[int, float], list[tuple[int, dict]]] = {}
        for layer, heads, scale, got in pending:
            groups.setdefault((heads, scale), []).append((layer, got))
        for (heads, scale), group in groups.items():
            scored = [(layer, got["q"][:, 0], got["k"]) for layer, got in group if layer in r.cls_attn]
            valued = [(layer, got["v"][:, 0], got["v"]) for layer, got in group
                      if layer in r.cls_value_attn or layer in r.value_norms]
            rows = scored + valued
            keys = stack([k for _, _, k in rows])  # [P, I, T, D]
            query = stack([q for _, q, _ in rows])  # [P, I, D]
            probs = row_attention(query, keys, heads, scale, scaled=len(scored))  # values unscaled
            for (layer, _, _), row in zip(scored, probs[: len(scored)].unbind(0)):
                self.out.cls_attn[layer] = row
            for (layer, _, _), row in zip(valued, probs[len(scored):].unbind(0)):
                if layer in r.cls_value_attn:
                    self.out.cls_value_attn[layer] = row
            if any(layer in r.value_norms for layer, _, _ in valued):
                norms = torch.linalg.vector_norm(keys[len(scored):], dim=-1, dtype=torch.float32)
                for (layer, _, _), row in zip(valued, norms.unbind(0)):
                    if layer in r.value_norms:
                        self.out.value_norms[layer] = row


def stack(tensors: list[torch.Tensor]) -> torch.Tensor:
    """torch.stack, or a view for a single tensor (no copy)."""
    return tensors[0].unsqueeze(0) if len(tensors) == 1 else torch.stack(tensors)


@contextlib.contextmanager
def collect(layers: nn.ModuleList, request: Request):
    """Within the block, running the encoder fills the returned `Collected` for `request` (hooks
    installed for the block only; adapters keep a `SignalHooks` installed instead)."""
    hooks = SignalHooks(layers, request)
    try:
        with hooks.capture() as out:
            yield out
    finally:
        hooks.remove()
