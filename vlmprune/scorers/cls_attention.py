"""Scorers that rank visual tokens by the attention the encoder's CLS token pays them, and the
helpers (option checks, layer resolution, masked ranking) the other attention-based scorers share."""

from __future__ import annotations

import math

import torch

from vlmprune.scorers.base import EncoderInfo, Request, Scorer, Signals, layer_rows, register


@register
class ClsScorer(Scorer):
    """Head-mean CLS->patch softmax attention inside the feature layer (FasterVLM / VisionZip
    dominant tokens). `layer` (0-based encoder layer) overrides the feature layer. On encoders
    without a CLS token (Qwen2-VL) the mean attention each token receives replaces it."""

    name = "cls"
    paper = "[CLS] Attention is All You Need for Training-Free Visual Token Pruning (FasterVLM), 2024"

    def __init__(self, layer: int | None = None):
        check_int(self.name, "layer", layer, allow_none=True)
        self.layer = layer

    def _layer(self, info: EncoderInfo) -> int:
        if self.layer is None:
            return info.feature_layer
        return resolve_layer(self.name, "layer", self.layer, info)

    def needs(self, info: EncoderInfo) -> Request:
        return attention_request(info, [self._layer(info)])

    def score(self, signals: Signals) -> torch.Tensor:
        return attention(signals, self._layer(signals.info), self.name)


# --- helpers shared by the attention-based vision scorers (vtc_cls, visionzip, hiprune, flowcut) ---


def check_int(method: str, name: str, value, *, allow_none: bool = False) -> None:
    """TypeError unless `value` is an int (not a bool), or None where allowed."""
    if value is None and allow_none:
        return
    if not isinstance(value, int) or isinstance(value, bool):
        kind = "an int or None" if allow_none else "an int"
        raise TypeError(f"{method}: {name} must be {kind}, got {value!r}")


def check_number(
    method: str, name: str, value, lo: float, hi: float, *, lo_open: bool = False, hi_open: bool = False
) -> float:
    """The value as a float; TypeError unless a real number, ValueError outside the interval."""
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        raise TypeError(f"{method}: {name} must be a number, got {value!r}")
    value = float(value)
    below = value <= lo if lo_open else value < lo
    above = value >= hi if hi_open else value > hi
    if below or above or value != value:
        interval = f"{'(' if lo_open else '['}{lo:g}, {hi:g}{')' if hi_open else ']'}"
        raise ValueError(f"{method}: {name} must be in {interval}, got {value!r}")
    return value


def resolve_layer(method: str, name: str, layer: int, info: EncoderInfo) -> int:
    """A 0-based encoder layer index (negative counts from the end), checked against the encoder."""
    idx = layer + info.num_layers if layer < 0 else layer
    if not 0 <= idx < info.num_layers:
        raise ValueError(
            f"{method}: {name}={layer!r} is outside this encoder's layers "
            f"(0..{info.num_layers - 1}, or -{info.num_layers}..-1 from the end)"
        )
    return idx


def attention_request(info: EncoderInfo, layers) -> Request:
    """CLS attention of `layers`, or the mean received attention on encoders without CLS."""
    layers = tuple(sorted(set(layers)))
    return Request(cls_attn=layers) if info.has_cls else Request(received_attn=layers)


def attention(signals: Signals, layer: int, method: str) -> torch.Tensor:
    """[I, N] float32 head-mean CLS attention of `layer` (received attention without CLS)."""
    table, kind = attention_table(signals)
    check_layers(table, kind, (layer,), method)
    return table[layer].float()


def attention_layers(signals: Signals, layers: tuple[int, ...], method: str) -> torch.Tensor:
    """[len(layers), I, N] float32: `attention` of each layer, stacked (a view where the rows lie so)."""
    return signal_layers(*attention_table(signals), layers, method)


def attention_table(signals: Signals) -> tuple[dict[int, torch.Tensor], str]:
    """The table `attention` reads and its name: CLS rows, or received attention without CLS."""
    return (signals.cls_attn, "cls_attn") if signals.info.has_cls else (signals.received_attn, "received_attn")


def check_layers(table: dict[int, torch.Tensor], kind: str, layers: tuple[int, ...], method: str) -> None:
    """A clear error naming the first of `layers` missing from a signal table."""
    for layer in layers:
        if layer not in table:
            raise ValueError(f"{method}: {kind} of layer {layer} is missing; got layers {sorted(table)}")


def signal_layers(table: dict[int, torch.Tensor], kind: str, layers: tuple[int, ...], method: str) -> torch.Tensor:
    """[len(layers), I, ...] float32 rows of a signal table, stacked (`layer_rows`)."""
    check_layers(table, kind, layers, method)
    return layer_rows(table, layers).float()


def valid_mask(n_valid: torch.Tensor, n: int, device) -> torch.Tensor:
    """[I, N] bool: token j of image i is real (j < n_valid[i])."""
    return torch.arange(n, device=device)[None, :] < n_valid.to(device)[:, None]


@register
class VtcClsScorer(Scorer):
    """VTC-CLS: top-k of the mean, over several encoder layers, of the head-mean CLS->patch
    attention (an ensemble of the per-layer CLS rankings).

    `layers`: 0-based encoder layers (negative counts from the end). Default (None): every layer
    from the middle of the encoder (`num_layers // 2`) through the feature layer, e.g. 12..22 for
    CLIP-L/336 in LLaVA-1.5. The paper ensembles the layers from a start layer up to the
    penultimate layer (the LLaVA feature layer) and tunes the start layer per benchmark; starting
    at half depth is our fixed, depth-independent choice. Mean and sum rank alike. On encoders
    without a CLS token the mean received attention replaces it, as for `cls`."""

    name = "vtc_cls"
    paper = "[CLS] Token Tells Everything Needed for Training-free Efficient MLLMs (VTC-CLS), 2024"

    def __init__(self, layers: list[int] | tuple[int, ...] | None = None):
        if layers is not None:
            if not isinstance(layers, (list, tuple)) or not layers:
                raise TypeError(f"vtc_cls: layers must be a non-empty list of ints or None, got {layers!r}")
            for layer in layers:
                check_int(self.name, "layers entry", layer)
            layers = tuple(layers)
        self.layers = layers

    def _layers(self, info: EncoderInfo) -> tuple[int, ...]:
        if self.layers is None:
            return tuple(range(min(info.num_layers // 2, info.feature_layer), info.feature_layer + 1))
        return tuple(sorted({resolve_layer(self.name, "layers", layer, info) for layer in self.layers}))

    def needs(self, info: EncoderInfo) -> Request:
        return attention_request(info, self._layers(info))

    def score(self, signals: Signals) -> torch.Tensor:
        layers = self._layers(signals.info)
        return attention_layers(signals, layers, self.name).mean(0)


def scaled_layers(method: str, fractions: tuple[float, ...], depth: int) -> tuple[int, ...]:
    """Decoder layers at `fractions` of the depth (round half up), made strictly ascending within
    1..depth-1: a schedule pinned on a 32-layer decoder, carried to another depth."""
    layers, prev = [], 0
    for f in fractions:
        layer = max(prev + 1, math.floor(f * depth + 0.5))
        if layer > depth - 1:
            raise ValueError(f"{method}: {len(fractions)} cuts do not fit a decoder of {depth} layers; give `layers`")
        layers.append(layer)
        prev = layer
    return tuple(layers)
