"""Signals from a ViT-style encoder (CLIP, SigLIP, ...) without eager attention.

Each requested layer's attention module makes q, k and v with its own `q_proj` / `k_proj` /
`v_proj`: taps on their forward keep those outputs while the encoder runs (nothing is projected
twice), and the rows a scorer asked for (the CLS query against all keys, the CLS value against all
values, value norms, the mean received attention) are computed from them over several layers at
once (`vlmprune.kernels.rows`), while the encoder itself keeps SDPA/FlashAttention. On the
host-bound encoder of a 7B VLM, the host time of the taps and the number of ops they launch is
much of what they cost."""

from __future__ import annotations

import bisect
import contextlib
import functools
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import nn

from vlmprune.kernels.graph import attention_graph_ref
from vlmprune.kernels.received import received_attention
from vlmprune.kernels.rows import attention_rows
from vlmprune.scorers.base import Request, RowTable, stack_rows

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
    attn_graph: dict[int, torch.Tensor] = field(default_factory=dict)  # [I, H, T, T] over all encoder tokens


class SignalHooks:
    """Taps on the `q_proj` / `k_proj` / `v_proj` of the requested layers (and on the layers whose
    output is requested), put on the modules only while `capture()` runs: outside it the encoder
    runs untouched, at no cost. A tap sets `forward` on the instance (see `tap`) rather than
    registering a forward hook (a module with hooks takes torch's slow call path, several
    microseconds a call), and hands each projection to a list's `append`: no Python frame of ours
    runs per projection, which on the host-bound encoder of a 7B VLM is what the taps cost."""

    def __init__(self, layers: nn.ModuleList, request: Request):
        self.layers, self.request = layers, request
        self.plan: dict[int, LayerPlan] = {}
        self.active: _Capture | None = None
        for idx in sorted(set().union(request.cls_attn, request.cls_value_attn, request.received_attn,
                                      request.keys, request.value_norms, request.attn_graph)):
            attn = layers[idx].self_attn
            wants = projections(request, idx)
            for name in wants:
                if not isinstance(getattr(attn, f"{name}_proj", None), nn.Module):
                    raise ValueError(
                        f"vlmprune: the attention of encoder layer {idx} ({type(attn).__name__}) has no {name}_proj "
                        f"module to read {name} from; this encoder needs its own adapter"
                    )
            heads, _, scale = attn_geometry(attn)
            self.plan[idx] = LayerPlan(
                wants, heads, scale, keys=idx in request.keys, received=idx in request.received_attn,
                rows=idx in request.cls_attn or idx in request.cls_value_attn or idx in request.value_norms,
                graph=idx in request.attn_graph,
            )
        self.order = tuple(self.plan)  # ascending: the order the encoder runs them
        # per layer, a list per kept projection: its tap's `append` fills it during a capture
        self.sinks = {idx: [(name, []) for name in plan.wants] for idx, plan in self.plan.items()}
        self.taps = [Tap(getattr(layers[idx].self_attn, f"{name}_proj"), kept.append)
                     for idx, sinks in self.sinks.items() for name, kept in sinks]
        self.batches: dict[tuple[int, ...], Batch] = {}  # the layers settled together -> their `Batch`

    def batch(self, layers: tuple[int, ...]) -> Batch:
        """What settling `layers` together reads and makes, worked out once per set of layers."""
        if layers not in self.batches:
            self.batches[layers] = Batch.of(self, layers)
        return self.batches[layers]

    @contextlib.contextmanager
    def capture(self, skip: int = 0):
        """Within the block, running the encoder fills the returned `Collected`; its attention rows
        (CLS, CLS-value, received) leave out the first `skip` tokens (softmax still over all)."""
        if self.active is not None:
            raise RuntimeError("vlmprune: the encoder's signal hooks are already capturing (a nested encoder call)")
        self.active = capture = _Capture(self, skip)
        try:
            capture.arm()
            yield capture.out
            capture.finish()
        finally:
            capture.disarm()
            self.active = None


_NO_FORWARD = object()


class Tap:
    """A `forward` set on a module's instance that hands every output of the module's own forward
    to `seen` (then returns it unchanged), as accelerate's hooks do: `put()` sets it (wrapping a
    forward already set there), `remove()` puts that back. The forward is a partial of the module,
    so a deep copy of the model runs its own weights; on a plain `nn.Linear` it computes
    `F.linear` itself (one Python call fewer). It is made once and reused while the instance's
    own forward stays the same, so putting a tap on is one dict write."""

    def __init__(self, module: nn.Module, seen: Callable[[Any], None]):
        self.module, self.seen = module, seen
        self.saved: object = None  # what put() replaced; None while off
        self.made_for: object = None
        self.forward: Callable | None = None

    def put(self) -> None:
        slots = self.module.__dict__
        saved = slots.get("forward", _NO_FORWARD)
        if saved is not self.made_for:
            if saved is _NO_FORWARD and type(self.module).forward is nn.Linear.forward:
                self.forward = functools.partial(_tapped_linear, self.module, self.seen)
            else:
                own = None if saved is _NO_FORWARD else saved
                self.forward = functools.partial(_tapped, own, self.module, self.seen)
            self.made_for = saved
        self.saved = saved
        slots["forward"] = self.forward  # not a parameter, buffer or module: skip nn.Module's setattr

    def remove(self) -> None:
        if self.saved is None:
            return
        if self.saved is _NO_FORWARD:
            self.module.__dict__.pop("forward", None)
        else:
            self.module.__dict__["forward"] = self.saved
        self.saved = None


class Wrap:
    """A `forward` set on a module's instance so that `fn(forward, *args, **kwargs)` runs in its
    place, `forward` being the one that was there (an instance forward such as accelerate's hooks,
    or the class's); `remove()` puts that back. For wrappers that need the call's arguments (a
    `Tap` sees only the output)."""

    def __init__(self, module: nn.Module, fn: Callable):
        self.module = module
        self.saved = module.__dict__.get("forward")
        own = self.saved or functools.partial(type(module).forward, module)
        module.__dict__["forward"] = functools.partial(fn, own)

    def remove(self) -> None:
        if self.saved is None:
            self.module.__dict__.pop("forward", None)
        else:
            self.module.__dict__["forward"] = self.saved


def tap(module: nn.Module, seen: Callable[[Any], None]) -> Tap:
    """Make `module` hand every output of its forward to `seen` until the returned `Tap` is removed."""
    handle = Tap(module, seen)
    handle.put()
    return handle


def _tapped(forward: Callable | None, module: nn.Module, seen: Callable[[Any], None], *args, **kwargs):
    out = type(module).forward(module, *args, **kwargs) if forward is None else forward(*args, **kwargs)
    seen(out)
    return out


def _tapped_linear(module: nn.Linear, seen: Callable[[Any], None], input: torch.Tensor) -> torch.Tensor:
    out = nn.functional.linear(input, module.weight, module.bias)  # what nn.Linear.forward computes
    seen(out)
    return out


@dataclass(frozen=True)
class LayerPlan:
    """What one hooked layer keeps and what becomes of it, decided once at install time."""

    wants: tuple[str, ...]  # projections to keep: a sub-tuple of ("k", "q", "v")
    heads: int
    scale: float
    keys: bool  # its keys are a signal
    received: bool  # its received attention is computed from its q and k
    rows: bool  # its CLS rows / value norms go into the next stacked batch
    graph: bool = False  # its full attention graph is computed from its q and k


def detached(t: torch.Tensor) -> torch.Tensor:
    """`t` without autograd history (signals carry none)."""
    return t.detach() if t.requires_grad else t


def projections(request: Request, layer: int) -> tuple[str, ...]:
    """Which of q / k / v layer `layer` must keep for `request`."""
    need = set()
    if layer in request.cls_attn or layer in request.received_attn or layer in request.attn_graph:
        need |= {"q", "k"}
    if layer in request.keys:
        need.add("k")
    if layer in request.cls_value_attn or layer in request.value_norms:
        need.add("v")
    return tuple(sorted(need))


@dataclass
class RowGroup:
    """One `attention_rows` call of a batch: the layers of one attention geometry whose CLS query
    rows (`scored`, from q and k) and CLS value rows (`valued`, from v) it computes, and the sinks
    their projections are read from."""

    heads: int
    scale: float
    scored: list[int] = field(default_factory=list)
    valued: list[int] = field(default_factory=list)
    normed: bool = False  # some valued layers' value norms are requested
    semantic: bool = False  # every valued layer's CLS value row is requested
    all_normed: bool = False  # every valued layer's value norms are requested
    queries: list[list] = field(default_factory=list)  # sinks: q of each scored layer, then v of each valued
    keys: list[list] = field(default_factory=list)  # sinks: k of each scored layer, then v of each valued


@dataclass
class Batch:
    """The layers settled together: the sinks to read (with their names, for errors), the layers
    whose keys or received attention are made one by one, and the stacked row computations."""

    sinks: list[tuple[int, str, list]]
    each: list[int]  # layers with keys, received attention or an attention graph
    groups: list[RowGroup]
    lists: list[list] = field(default_factory=list)  # the sinks alone

    @classmethod
    def of(cls, hooks: SignalHooks, layers: tuple[int, ...]) -> Batch:
        r, plan = hooks.request, hooks.plan
        groups: dict[tuple[int, float], RowGroup] = {}
        for layer in layers:
            p = plan[layer]
            if not p.rows:
                continue
            g = groups.setdefault((p.heads, p.scale), RowGroup(p.heads, p.scale))
            if layer in r.cls_attn:
                g.scored.append(layer)
            if layer in r.cls_value_attn or layer in r.value_norms:
                g.valued.append(layer)
                g.normed |= layer in r.value_norms
        for g in groups.values():
            g.semantic = all(layer in r.cls_value_attn for layer in g.valued)
            g.all_normed = all(layer in r.value_norms for layer in g.valued)
            sinks = [dict(hooks.sinks[layer]) for layer in g.scored]
            values = [dict(hooks.sinks[layer])["v"] for layer in g.valued]
            g.queries = [s["q"] for s in sinks] + values
            g.keys = [s["k"] for s in sinks] + values
        sinks = [(layer, name, kept) for layer in layers for name, kept in hooks.sinks[layer]]
        return cls(
            sinks=sinks,
            each=[layer for layer in layers if plan[layer].keys or plan[layer].received or plan[layer].graph],
            groups=list(groups.values()),
            lists=[kept for _, _, kept in sinks],
        )


class _Capture:
    """One encoder forward: its taps, the projections they keep (a list per projection), and
    the `Collected` signals made from them in batches: `settle(layer)` turns every layer up to
    `layer` into signals, the CLS rows and value norms of all of them in one stacked computation.
    A batch holds at most `FLUSH_LAYERS` layers with rows and `FLUSH_BYTES` of projections: the
    first hooked layer's projections give the size of every layer's, and the layers where a batch
    must end get a tap on their output, so the taps stay free of Python while nothing must end."""

    def __init__(self, hooks: SignalHooks, skip: int = 0):
        self.hooks, self.request, self.plan, self.skip = hooks, hooks.request, hooks.plan, skip
        self.out = Collected()
        self.order = hooks.order
        self.done = 0  # self.order[:done] are signals already
        self.taps: list[Tap] = []  # put on for this capture only, beyond the hooks' own

    def arm(self) -> None:
        for t in self.hooks.taps:
            t.put()
        layers = self.hooks.layers
        for layer in self.request.vision_hidden:
            self.taps.append(tap(layers[layer], functools.partial(self._hidden, layer)))
        if self.order:
            self.taps.append(tap(layers[self.order[0]], self._plan_batches))

    def disarm(self) -> None:
        while self.taps:  # last in, first out: taps on one module unwind in order
            self.taps.pop().remove()
        for t in self.hooks.taps:
            t.remove()
        for sinks in self.hooks.sinks.values():
            for _, kept in sinks:
                kept.clear()

    def _hidden(self, layer: int, output) -> None:
        out = output[0] if isinstance(output, tuple) else output
        self.out.vision_hidden[layer] = out.detach()

    def _plan_batches(self, _output) -> None:
        """At the first hooked layer's output: where each stacked batch ends, from its projections'
        size (the last batch ends at the last hooked layer); a tap on those layers' output settles
        each batch as soon as it is complete (its projections are freed there)."""
        first = self.order[0]
        size = max((kept[-1].nbytes for _, kept in self.hooks.sinks[first] if kept), default=0)
        ends, count, held = [], 0, 0
        for layer in self.order:
            plan = self.plan[layer]
            if not (plan.rows or plan.received or plan.graph):
                continue
            count += plan.rows
            held += size * len(plan.wants)
            if count >= FLUSH_LAYERS or held >= FLUSH_BYTES or layer == self.order[-1]:
                ends.append(layer)
                count = held = 0
        for layer in ends:
            if layer == first:
                self.settle(first)
            else:
                self.taps.append(tap(self.hooks.layers[layer], functools.partial(self._settle_at, layer)))

    def _settle_at(self, layer: int, _output) -> None:
        self.settle(layer)

    def finish(self) -> None:
        self.settle(self.order[-1] if self.order else -1)

    @torch.no_grad()
    def settle(self, upto: int) -> None:
        """Signals of every pending layer up to `upto`: keys and received attention layer by layer,
        the CLS rows and value norms of all of them in stacked computations (see `flush`). What
        a set of layers reads and makes is worked out once (`SignalHooks.batch`): per call, only
        the projections are read from their sinks."""
        end = bisect.bisect_right(self.order, upto, self.done)
        if end == self.done:
            return
        batch = self.hooks.batch(self.order[self.done : end])
        self.done = end
        if not all(batch.lists):
            layer, name = next((layer, name) for layer, name, kept in batch.sinks if not kept)
            raise ValueError(
                f"vlmprune: the attention of encoder layer {layer} ran without calling {name}_proj; "
                f"this encoder needs its own adapter"
            )
        for layer in batch.each:
            plan = self.plan[layer]
            got = {name: detached(kept[-1]) for name, kept in self.hooks.sinks[layer]}  # the last call's
            if plan.keys:
                self.out.keys[layer] = got["k"]
            if plan.received:
                rows = received_attention(got["q"], got["k"], plan.heads, plan.scale)
                self.out.received_attn[layer] = rows[:, self.skip :]
            if plan.graph:  # over every encoder token (CLS kept, as in `keys`)
                self.out.attn_graph[layer] = attention_graph_ref(
                    got["q"], got["k"], plan.heads, plan.scale, mean_heads=self.request.attn_graph_heads == "mean")
        for group in batch.groups:
            self.flush(group)
        for kept in batch.lists:
            kept.clear()

    def flush(self, group: RowGroup) -> None:
        """The CLS rows (CLS query . keys, scaled; CLS value . values, unscaled) and value norms of
        one group's layers in one `attention_rows` call (on CUDA one kernel reading the projections
        where they lie; no autograd history: `settle` runs without grad)."""
        scored = len(group.scored)
        probs, norms = attention_rows([kept[-1] for kept in group.queries], [kept[-1] for kept in group.keys],
                                      group.heads, group.scale, scaled=scored,
                                      norms_from=scored if group.normed else None)
        probs = probs[:, :, self.skip :]
        self._put("cls_attn", probs[:scored], group.scored, True)
        self._put("cls_value_attn", probs[scored:], group.valued, group.semantic)
        if group.normed:
            self._put("value_norms", norms, group.valued, group.all_normed)

    def _put(self, name: str, stack: torch.Tensor, layers: list[int], whole: bool) -> None:
        """The requested ones of `stack`'s rows (one per layer of `layers`) into the `name` table:
        as a `RowTable` (scorers read it back stacked, see `layer_rows`) when they are all
        requested (`whole`) and the table's first batch, else entry by entry."""
        table = getattr(self.out, name)
        if layers and whole and not table:
            setattr(self.out, name, RowTable(stack, layers))
            return
        wanted = getattr(self.request, name)
        table.update((layer, row) for layer, row in zip(layers, stack.unbind(0)) if layer in wanted)


@contextlib.contextmanager
def collect(layers: nn.ModuleList, request: Request):
    """Within the block, running the encoder fills the returned `Collected` for `request` (adapters
    keep one `SignalHooks` per request instead: its plan is made once)."""
    with SignalHooks(layers, request).capture() as out:
        yield out


def pad_graphs(rows: list[torch.Tensor]) -> torch.Tensor:
    """[len(rows), H, T, T] from per-image [H, T_i, T_i] graphs, zero-padded to the largest T_i (no
    copy when they are the rows of one batch in order, see `stack_rows`)."""
    if all(r.shape == rows[0].shape for r in rows):
        return stack_rows(rows)
    t = max(r.shape[-1] for r in rows)
    out = rows[0].new_zeros(len(rows), rows[0].shape[0], t, t)
    for i, r in enumerate(rows):
        out[i, :, : r.shape[-1], : r.shape[-1]] = r
    return out
