"""The seam between adapters and scorers: what a scorer asks for (`Request`), what an adapter
hands over (`Signals`), the `Scorer` base class and the name registry."""

from __future__ import annotations

import inspect
import itertools
from collections.abc import Mapping, MutableMapping
from dataclasses import dataclass, field
from typing import ClassVar, Sequence

import torch


@dataclass(frozen=True)
class EncoderInfo:
    """Model-agnostic facts about the vision encoder that a scorer may use to pick its layers.

    `feature_layer` is the 0-based index of the encoder layer whose output becomes the visual
    tokens (e.g. 22 for CLIP-L with `vision_feature_layer=-2`); `grid` the token grid every image
    has, None where each image has its own (Qwen's dynamic resolution: see `Signals.grids`)."""

    num_layers: int
    feature_layer: int
    has_cls: bool
    grid: tuple[int, int] | None


@dataclass(frozen=True)
class Request:
    """The signals a scorer needs. Layers are 0-based encoder layer indices; each attention
    signal of layer i is the attention computed inside layer i (its `self_attn`)."""

    features: bool = False
    cls_attn: tuple[int, ...] = ()
    received_attn: tuple[int, ...] = ()
    keys: tuple[int, ...] = ()
    value_norms: tuple[int, ...] = ()
    vision_hidden: tuple[int, ...] = ()
    cls_value_attn: tuple[int, ...] = ()
    text_attn: tuple[int, ...] = ()  # decoder layers: attention rows from the prompt to the visual tokens
    text_query: str = "last"  # whose rows: the last prompt token's, or ("text") the text after the images
    text_attn_own: bool = False  # a cut at layer K reads layer K's own attention (from its input), not K-1's
    transitions: tuple[int, ...] = ()  # decoder layers: how their attention and MLP change each token
    attn_graph: tuple[int, ...] = ()  # encoder layers: the full softmax attention among the tokens (Zero-TPrune)
    attn_graph_heads: str = "each"  # "each": one graph per head; "mean": the head-mean graph (H times smaller)
    text_embeds: bool = False  # the prompt's text-token embeddings (instruction-conditioned methods: CDPruner)
    key_norms: tuple[int, ...] = ()  # decoder layers: the L1 norm of each token's rotary key (DART's pivots)
    final_norm: bool = False  # decoder stages: hidden states through the LM's final norm first (DART)

    def merge(self, other: "Request") -> "Request":
        """Union of two requests (used when one forward serves several stages)."""
        uni = lambda a, b: tuple(sorted(set(a) | set(b)))  # noqa: E731
        graph_heads = [r.attn_graph_heads for r in (self, other) if r.attn_graph]
        return Request(
            features=self.features or other.features,
            cls_attn=uni(self.cls_attn, other.cls_attn),
            received_attn=uni(self.received_attn, other.received_attn),
            keys=uni(self.keys, other.keys),
            value_norms=uni(self.value_norms, other.value_norms),
            vision_hidden=uni(self.vision_hidden, other.vision_hidden),
            cls_value_attn=uni(self.cls_value_attn, other.cls_value_attn),
            text_attn=uni(self.text_attn, other.text_attn),
            transitions=uni(self.transitions, other.transitions),
            text_query=self.text_query if self.text_attn else other.text_query,
            text_attn_own=self.text_attn_own or other.text_attn_own,
            attn_graph=uni(self.attn_graph, other.attn_graph),
            attn_graph_heads="mean" if graph_heads and all(h == "mean" for h in graph_heads) else "each",
            text_embeds=self.text_embeds or other.text_embeds,
            key_norms=uni(self.key_norms, other.key_norms),
            final_norm=self.final_norm or other.final_norm,
        )


@dataclass
class Signals:
    """What an adapter collected for a batch of I images with up to N visual tokens each.

    Every tensor has the image as its leading dim and the visual tokens (in the order the decoder
    sees them) as the second; `n_valid[i]` says how many of the N are real for image i. Attention
    rows are float32, head-mean, over the N visual tokens (CLS excluded). `keys` and
    `vision_hidden` are per encoder token and keep the CLS token (if any) at position 0.

    `cls_value_attn[l]` [I, N] float32 (FlowCut's semantic relevance): with v = v_proj of layer
    l's layer-normed input split into heads, per head the softmax over all T encoder tokens j
    (CLS included) of the unscaled dot product v_cls . v_j, then the head mean, restricted to the
    N visual tokens like `cls_attn`.

    `grids[i]` is image i's (rows, columns) token grid in raster order (a video's frames stacked
    as rows: t*h x w); `grid` is the grid all images share, or (1, N) when they differ;
    `frames[i]` how many frames item i's rows stack (1 for an image; None: every item one frame)."""

    n_valid: torch.Tensor
    grid: tuple[int, int]
    info: EncoderInfo
    features: torch.Tensor | None = None
    cls_attn: dict[int, torch.Tensor] = field(default_factory=dict)
    received_attn: dict[int, torch.Tensor] = field(default_factory=dict)
    keys: dict[int, torch.Tensor] = field(default_factory=dict)
    value_norms: dict[int, torch.Tensor] = field(default_factory=dict)
    vision_hidden: dict[int, torch.Tensor] = field(default_factory=dict)
    cls_value_attn: dict[int, torch.Tensor] = field(default_factory=dict)
    counts: tuple[int, ...] | None = None
    """`n_valid` on the host when the adapter knows it: scorers size their work from it without
    waiting for the device (`valid_counts`)."""
    grids: tuple[tuple[int, int], ...] | None = None
    text_attn: dict[int, torch.Tensor] = field(default_factory=dict)
    """Decoder stages: layer -> [I, N] float32 head-mean softmax attention from the prompt's query
    rows (`Request.text_query`) to each image's tokens; `features` are then the tokens' hidden states
    entering the stage's layer. A decoder layer's attention is computed as the layer computes it:
    layer K's from its input before it runs, layer K-1's from what it projected."""
    transitions: dict[int, torch.Tensor] = field(default_factory=dict)
    """Decoder layer -> [I, N, 2, 2] float32: for its attention (0) and MLP (1), each token's
    magnitude ratio ||out|| / ||in|| and direction change 1 - cos(in, out), where in is the module's
    (normed) input; `transition_sums[layer]` [I, 2] the sum over the image's row's attended tokens of
    exp(direction change), per module, as the layer ran."""
    transition_sums: dict[int, torch.Tensor] = field(default_factory=dict)
    attn_graph: dict[int, torch.Tensor] = field(default_factory=dict)
    """Encoder layer -> [I, H, T, T] float32: the layer's softmax attention among each image's tokens,
    computed from its own q/k (query rows, key columns; every row of a valid token sums to 1), one
    graph per head (H = 1: the head mean, `Request.attn_graph_heads="mean"`). ViT encoders: over all
    T encoder tokens, the CLS token (if any) at 0 as in `keys`. Qwen-VL: over each item's LLM tokens
    (T = N, padded with zero rows and columns): the attention of a merge group's patches to another
    group's, summed over the key patches and averaged over the query patches, in the merger's order;
    block-diagonal where the layer attends per frame or window."""
    text_embeds: torch.Tensor | None = None
    """[I, M, D]: for each image, the input embeddings of its prompt row's text tokens (the attended
    non-visual tokens after the row's last visual token, in order), zero-padded; `text_counts[i]`
    says how many of the M are real. At a decoder stage: those tokens' hidden states entering the
    stage's layer (as `features`), through the LM's final norm when `Request.final_norm`."""
    text_counts: tuple[int, ...] | None = None
    key_norms: dict[int, torch.Tensor] = field(default_factory=dict)
    """Decoder layer -> [I, N + M] float32: the L1 norm of each token's key in that layer (all heads,
    rotary applied, as the layer attends with it): the image's N visual tokens, then the M text
    tokens of `text_embeds` (0 where padded)."""
    frames: tuple[int, ...] | None = None

    def item_frames(self) -> list[int]:
        """Each item's frame count: `frames`, or 1 for every item."""
        return list(self.frames) if self.frames is not None else [1] * self.num_images

    def image_grids(self) -> list[tuple[int, int]]:
        """Each image's (rows, columns) token grid: `grids`, or `grid` for every image."""
        return list(self.grids) if self.grids is not None else [self.grid] * self.num_images

    def valid_counts(self) -> list[int]:
        """`n_valid` as Python ints (a device sync only when `counts` is not given)."""
        return list(self.counts) if self.counts is not None else self.n_valid.tolist()

    @property
    def num_images(self) -> int:
        return int(self.n_valid.shape[0])

    @property
    def num_tokens(self) -> int:
        return max(self.valid_counts(), default=0)


def stack_rows(rows: list[torch.Tensor]) -> torch.Tensor:
    """torch.stack(rows), but a view with no copy for one row, or when the rows are views of one
    tensor lying evenly spaced in it with one shape and layout: per-layer signal rows computed in
    one stacked op, or the images of one encoder batch (`list(features)`); on the host-bound
    scoring path a copy costs a launch."""
    first = rows[0]
    if len(rows) == 1:
        return first.unsqueeze(0)
    base = first._base
    if base is not None:
        step = rows[1].storage_offset() - first.storage_offset()
        if step > 0 and all(
            r._base is base and r.shape == first.shape and r.stride() == first.stride()
            and r.storage_offset() == first.storage_offset() + i * step
            for i, r in enumerate(rows)
        ):
            size, stride = (len(rows), *first.shape), (step, *first.stride())
            if base.shape == size and base.stride() == stride and base.storage_offset() == first.storage_offset():
                return base  # list(base) itself
            return first.as_strided(size, stride, first.storage_offset())
    return torch.stack(rows)


class RowTable(MutableMapping):
    """layer -> [I, ...] rows that are the slices of one stacked [L, I, ...] tensor (`stacked`, in
    the order of `layers`), as the encoder hooks compute them: `layer_rows` hands them back
    stacked without checking each row's layout, and a row is made (a view) only when read by
    layer: on the host-bound scoring path, FlowCut's 66 rows cost 0.1 ms of checks and as much
    again to make. Read and written as a dict: an entry replaced or added later is kept apart
    (`replaced`), and `layer_rows` stacks those as usual."""

    def __init__(self, stacked: torch.Tensor, layers: Sequence[int]):
        self.stacked = stacked
        self.position = dict(zip(layers, range(len(layers))))
        self.replaced: dict[int, torch.Tensor] = {}  # entries set after the table was made

    def __getitem__(self, layer: int) -> torch.Tensor:
        if layer in self.replaced:
            return self.replaced[layer]
        return self.stacked[self.position[layer]]

    def __setitem__(self, layer: int, row: torch.Tensor) -> None:
        self.replaced[layer] = row

    def __delitem__(self, layer: int) -> None:
        if layer not in self.position and layer not in self.replaced:
            raise KeyError(layer)
        self.position.pop(layer, None)
        self.replaced.pop(layer, None)

    def __iter__(self):
        yield from self.position
        yield from (layer for layer in self.replaced if layer not in self.position)

    def __len__(self) -> int:
        return len(self.position) + sum(layer not in self.position for layer in self.replaced)

    def __contains__(self, layer: object) -> bool:
        return layer in self.position or layer in self.replaced

    def __repr__(self) -> str:
        return f"RowTable(layers={list(self)}, stacked={tuple(self.stacked.shape)})"


def layer_rows(table: Mapping[int, torch.Tensor], layers: Sequence[int]) -> torch.Tensor:
    """[len(layers), I, ...]: table[l] for l in `layers`, stacked. A slice of the table's stacked
    form (no copy) when it is a `RowTable` whose rows for those layers lie evenly spaced and were
    not replaced, else `stack_rows`. The caller checks that every layer is in the table."""
    if isinstance(table, RowTable) and layers:
        pos = list(map(table.position.get, layers, itertools.repeat(-1, len(layers))))
        step = pos[1] - pos[0] if len(pos) > 1 else 1
        if (pos[0] >= 0 and step > 0 and pos == list(range(pos[0], pos[0] + step * len(pos), step))
                and not (table.replaced and any(layer in table.replaced for layer in layers))):
            return table.stacked[pos[0] : pos[-1] + 1 : step]
    return stack_rows([table[layer] for layer in layers])


def budget(k: torch.Tensor, counts: Sequence[int]) -> list[int]:
    """Per image, k clipped to [0, count] (`Signals.valid_counts`); no device sync when k is on
    the host, as the adapter passes it."""
    ks = k.tolist()
    if min(ks, default=0) < 0:
        raise ValueError(f"k must be >= 0, got {ks}")
    return [min(a, c) for a, c in zip(ks, counts)]


@dataclass
class Selection:
    """A scorer's answer: kept indices per image (ascending, padded with -1 to the largest k)
    and, for merging methods, the features to put at the kept places instead of the originals."""

    indices: torch.Tensor
    features: torch.Tensor | None = None


class Scorer:
    """Base class: override `score` (higher = keep) or `select`. A decoder-stage scorer sets
    `stage = "decoder"` and says before which decoder layers it acts (`schedule`). Constructor kwargs are the
    method's options; they are validated against the constructor's signature by `build_scorer`."""

    name: ClassVar[str] = ""
    stage: ClassVar[str] = "vision"
    paper: ClassVar[str] = ""
    merges: ClassVar[bool] = False  # `select` returns its own features for the kept places (VisionZip)

    def needs(self, info: EncoderInfo) -> Request:
        """The signals this scorer reads, given the encoder it will run on."""
        return Request()

    def score(self, signals: Signals) -> torch.Tensor:
        """Float32 scores [I, N]; the shared top-k path keeps the k highest (ties: lower index)."""
        raise NotImplementedError

    def select(self, signals: Signals, k: torch.Tensor) -> Selection:
        """Kept indices for each image; the default runs the fused top-k on `score`."""
        from vlmprune.kernels import select_tokens

        scores = self.score(signals).float()
        idx, _ = select_tokens(scores, None, k, signals.n_valid)
        return Selection(indices=idx)

    def for_depth(self, depth: int) -> "Scorer":
        """Decoder stages: this scorer with layer defaults resolved for a decoder of `depth` layers."""
        return self

    def schedule(self, kept) -> list[tuple[int, object]]:
        """Decoder stages: (layer, tokens kept per image as a function of (its tokens there, its
        tokens entering the decoder)) for each layer the stage acts before; `kept(n, n0)` is the
        stage's own budget."""
        return [(self.layer, kept)]

    def __repr__(self) -> str:
        opts = ", ".join(f"{k}={v!r}" for k, v in vars(self).items() if not k.startswith("_"))
        return f"{type(self).__name__}({opts})"


_REGISTRY: dict[str, type[Scorer]] = {}


def register(cls: type[Scorer]) -> type[Scorer]:
    """Class decorator: make a scorer available under `cls.name`."""
    if not cls.name:
        raise ValueError(f"{cls.__name__} has no `name`")
    if cls.name in _REGISTRY and _REGISTRY[cls.name] is not cls:
        raise ValueError(f"scorer name {cls.name!r} is already registered by {_REGISTRY[cls.name].__name__}")
    _REGISTRY[cls.name] = cls
    return cls


def available_methods() -> list[str]:
    """Registered method names, sorted."""
    return sorted(_REGISTRY)


def scorer_class(name: str) -> type[Scorer]:
    if not isinstance(name, str) or name not in _REGISTRY:
        raise ValueError(f"unknown method {name!r}; available methods: {available_methods()}")
    return _REGISTRY[name]


def scorer_options(name: str) -> dict[str, object]:
    """The method's kwargs and their defaults."""
    sig = inspect.signature(scorer_class(name).__init__)
    return {
        p.name: p.default
        for p in sig.parameters.values()
        if p.name != "self" and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
    }


def build_scorer(name: str, **kwargs) -> Scorer:
    """Instantiate a registered scorer, rejecting kwargs its constructor does not take."""
    cls = scorer_class(name)
    allowed = scorer_options(name)
    bad = sorted(set(kwargs) - set(allowed))
    if bad:
        raise TypeError(f"unknown option(s) {bad} for method {name!r}; allowed: {sorted(allowed)}")
    return cls(**kwargs)


