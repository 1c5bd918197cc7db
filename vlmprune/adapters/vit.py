"""Signals from a ViT-style encoder (CLIP, SigLIP, ...) without eager attention.

Each requested layer's attention module makes q, k and v with its own `q_proj` / `k_proj` /
`v_proj`: taps on their forward keep those outputs (nothing is projected twice), and the rows a scorer
asked for (the CLS query against all keys, the CLS value against all values, value norms, the
mean received attention) are computed from them over several layers at once
(`vlmprune.kernels.rows`), while the encoder itself keeps SDPA/FlashAttention. On the host-bound
encoder of a 7B VLM, the host time of the taps and the number of ops they launch is much of what
they cost."""

from __future__ import annotations

import contextlib
import functools
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import nn

from vlmprune.kernels.rows import attention_rows
from vlmprune.scorers.base import Request, RowTable

FLUSH_LAYERS = 24
"""Most layers whose projections are held before their rows are computed in one batch: every
layer of a CLIP-L tower, since each batch costs a dozen launches on a host-bound encoder."""

FLUSH_BYTES = 2**30
"""...and most bytes of held projections (the torch reference stacks a copy of the keys and values
on top): a CLIP-L encoder at batch 8 holds 9 MiB per projection and layer, so FlowCut's 22 layers
of q, k, v (594 MiB) and VTC-CLS's 11 layers of q, k take one batch each at batch 8, two at 16."""


def attn_geometry(attn: nn.Module) -> tuple[int, int, float]:
    """(heads, head_dim, scale) of an HF attention module."""
    heads = getattr(attn, "num_heads", None) or attn.config.num_attention_heads
    head_dim = getattr(attn, "head_dim", None) or attn.q_proj.out_features // heads
    scale = getattr(attn, "scale", None) or getattr(attn, "scaling", None) or head_dim**-0.5
    return heads, head_dim, scale


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
    """Per-layer signals, batched over images: keys, value norms and hidden states over all encoder
    tokens (CLS, if any, at position 0); attention rows over all but the capture's `skip` first."""

    cls_attn: dict[int, torch.Tensor] = field(default_factory=dict)
    cls_value_attn: dict[int, torch.Tensor] = field(default_factory=dict)
    received_attn: dict[int, torch.Tensor] = field(default_factory=dict)
    keys: dict[int, torch.Tensor] = field(default_factory=dict)
    value_norms: dict[int, torch.Tensor] = field(default_factory=dict)
    vision_hidden: dict[int, torch.Tensor] = field(default_factory=dict)


class SignalHooks:
    """Taps on the `q_proj` / `k_proj` / `v_proj` of the requested layers (and on the layers whose
    output is requested), installed once and idle unless `capture()` is running: registering and
    removing ~90 hooks around every encoder call cost more than running them. A tap wraps the
    module's `forward` (see `tap`) rather than registering a forward hook: on the host-bound
    encoder, a module with hooks takes torch's slow call path, several microseconds a call."""

    def __init__(self, layers: nn.ModuleList, request: Request):
        self.request = request
        self.plan: dict[int, LayerPlan] = {}
        self.handles: list[Tap] = []
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
                    self.handles.append(tap(proj, self._keep(idx, name)))
                heads, _, scale = attn_geometry(attn)
                self.plan[idx] = LayerPlan(
                    wants, heads, scale, keys=idx in request.keys, received=idx in request.received_attn,
                    rows=idx in request.cls_attn or idx in request.cls_value_attn or idx in request.value_norms,
                )
            for idx in request.vision_hidden:
                self.handles.append(tap(layers[idx], self._output(idx)))
        except Exception:
            self.remove()
            raise

    def _keep(self, layer: int, name: str):
        def seen(output: torch.Tensor) -> None:
            if self.active is not None:
                self.active.add(layer, name, output)

        return seen

    def _output(self, layer: int):
        def seen(output) -> None:
            if self.active is not None:
                out = output[0] if isinstance(output, tuple) else output
                self.active.out.vision_hidden[layer] = out.detach()

        return seen

    @contextlib.contextmanager
    def capture(self, skip: int = 0):
        """Within the block, running the encoder fills the returned `Collected`; its attention rows
        (CLS, CLS-value, received) leave out the first `skip` tokens (softmax still over all)."""
        if self.active is not None:
            raise RuntimeError("vlmprune: the encoder's signal hooks are already capturing (a nested encoder call)")
        self.active = _Capture(self, skip)
        try:
            yield self.active.out
            self.active.finish()
        finally:
            self.active = None

    def remove(self) -> None:
        for h in reversed(self.handles):
            h.remove()
        self.handles = []


_NO_FORWARD = object()


class Tap:
    """The handle of one `tap`: `remove()` puts the module's own `forward` back."""

    def __init__(self, module: nn.Module, saved: object):
        self.module, self.saved = module, saved

    def remove(self) -> None:
        if self.saved is _NO_FORWARD:
            self.module.__dict__.pop("forward", None)
        else:
            self.module.forward = self.saved
        self.saved = None


def tap(module: nn.Module, seen: Callable[[Any], None]) -> Tap:
    """Make `module` hand every output of its forward to `seen` (then return it unchanged), by
    setting `forward` on the instance, as accelerate's hooks do; `Tap.remove()` undoes it. The
    new forward is a partial of the module, so a deep copy of the model runs its own weights."""
    saved = module.__dict__.get("forward", _NO_FORWARD)
    module.forward = functools.partial(_tapped, None if saved is _NO_FORWARD else saved, module, seen)
    return Tap(module, saved)


def _tapped(forward: Callable | None, module: nn.Module, seen: Callable[[Any], None], *args, **kwargs):
    out = type(module).forward(module, *args, **kwargs) if forward is None else forward(*args, **kwargs)
    seen(out)
    return out


@dataclass(frozen=True)
class LayerPlan:
    """What one hooked layer keeps and what becomes of it, decided once at install time."""

    wants: tuple[str, ...]  # projections to keep: a sub-tuple of ("k", "q", "v")
    heads: int
    scale: float
    keys: bool  # its keys are a signal
    received: bool  # its received attention is computed as soon as q and k are in
    rows: bool  # its CLS rows / value norms wait for the next stacked batch


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

    def __init__(self, hooks: SignalHooks, skip: int = 0):
        self.request, self.plan, self.out, self.skip = hooks.request, hooks.plan, Collected(), skip
        self.proj: dict[int, dict[str, torch.Tensor]] = {}  # layer -> projection name -> output, until complete
        self.pending: list[tuple[int, int, float, dict[str, torch.Tensor]]] = []  # (layer, heads, scale, q/k/v)
        self.held = 0  # bytes of the pending projections

    def add(self, layer: int, name: str, output: torch.Tensor) -> None:
        got = self.proj.setdefault(layer, {})
        got[name] = output.detach() if output.requires_grad else output  # signals carry no autograd history
        plan = self.plan[layer]
        if len(got) < len(plan.wants):
            return
        del self.proj[layer]
        if plan.keys:
            self.out.keys[layer] = got["k"]
        if plan.received:
            with torch.no_grad():
                rows = received_attention(got["q"], got["k"], plan.heads, plan.scale)
            self.out.received_attn[layer] = rows[:, self.skip :]
        if plan.rows:
            self.pending.append((layer, plan.heads, plan.scale, got))
            self.held += sum(t.nbytes for t in got.values())
            if len(self.pending) >= FLUSH_LAYERS or self.held >= FLUSH_BYTES:
                self.flush()

    def finish(self) -> None:
        if self.proj:
            layer, got = next(iter(self.proj.items()))
            missing = [name + "_proj" for name in self.plan[layer].wants if name not in got]
            raise ValueError(
                f"vlmprune: the attention of encoder layer {layer} ran without calling {missing}; "
                f"this encoder needs its own adapter"
            )
        self.flush()

    @torch.no_grad()
    def flush(self) -> None:
        """The CLS rows (CLS query . keys, scaled; CLS value . values, unscaled) and value norms of
        the pending layers: per attention geometry (one, in any ViT) one `attention_rows` call
        over all of them (on CUDA one kernel reading the projections where they lie)."""
        pending, self.pending, self.held = self.pending, [], 0
        r = self.request
        groups: dict[tuple[int, float], list[tuple[int, dict]]] = {}
        for layer, heads, scale, got in pending:
            groups.setdefault((heads, scale), []).append((layer, got))
        for (heads, scale), group in groups.items():
            scored = [(layer, got["q"], got["k"]) for layer, got in group if layer in r.cls_attn]
            valued = [(layer, got["v"], got["v"]) for layer, got in group
                      if layer in r.cls_value_attn or layer in r.value_norms]
            rows = scored + valued
            normed = any(layer in r.value_norms for layer, _, _ in valued)
            probs, norms = attention_rows([q for _, q, _ in rows], [k for _, _, k in rows], heads, scale,
                                          scaled=len(scored), norms_from=len(scored) if normed else None)
            probs = probs[:, :, self.skip :]
            valued_layers = [layer for layer, _, _ in valued]
            self._put("cls_attn", probs[: len(scored)], [layer for layer, _, _ in scored])
            self._put("cls_value_attn", probs[len(scored) :], valued_layers)
            if normed:
                self._put("value_norms", norms, valued_layers)

    def _put(self, name: str, stack: torch.Tensor, layers: list[int]) -> None:
        """The requested ones of `stack`'s rows (one per layer of `layers`) into the `name` table:
        as a `RowTable` (scorers read it back stacked, see `layer_rows`) when they are all
        requested and the table's first batch, else entry by entry."""
        wanted = getattr(self.request, name)
        table = getattr(self.out, name)
        if layers and not table and all(layer in wanted for layer in layers):
            setattr(self.out, name, RowTable(stack, layers))
            return
        table.update((layer, row) for layer, row in zip(layers, stack.unbind(0)) if layer in wanted)


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
