"""vlmprune: visual-token pruning for Hugging Face vision-language models.

    model = vlmprune.patch(model, method="cls", keep=64)
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterator

import torch

from vlmprune.adapters import find_adapter, supported_models
from vlmprune.adapters.base import make_forward
from vlmprune.config import PruneConfig, make_config
from vlmprune.scorers import available_methods

__version__ = "0.1.0"

_ADAPTER = "_vlmprune_adapter"
_SAVED = "_vlmprune_saved_forward"
_MISSING = object()

__all__ = [
    "PruneConfig",
    "available_methods",
    "last_selection",
    "patch",
    "pruning",
    "supported_models",
    "unpatch",
    "is_patched",
]


def patch(
    model: torch.nn.Module,
    method: Any = "cls",
    *,
    keep: int | None = None,
    prune_ratio: float | None = None,
    positions: str | None = None,
    view_scores: str | None = None,
    **method_kwargs: Any,
) -> torch.nn.Module:
    """Make `model` prune visual tokens with `method`, keeping `keep` per image (or removing
    the fraction `prune_ratio`). In place; returns the model. A failed call leaves it untouched;
    patching a patched model replaces its config. `positions` and `view_scores` (any-resolution
    families: "normalised" or "raw" attention rows per view) are the family's options; None: its default."""
    config = make_config(method, keep=keep, prune_ratio=prune_ratio, positions=positions, view_scores=view_scores,
                         **method_kwargs)
    adapter = find_adapter(model)(model, config)
    previous = model.__dict__.get(_ADAPTER)
    if previous is not None:
        previous.uninstall()
    else:
        setattr(model, _SAVED, model.__dict__.get("forward", _MISSING))
        model.forward = make_forward(model, model.forward)
    adapter.install()
    setattr(model, _ADAPTER, adapter)
    return model


def unpatch(model: torch.nn.Module) -> torch.nn.Module:
    """Restore the model's original forward. A no-op on an unpatched model."""
    if not is_patched(model):
        return model
    model.__dict__[_ADAPTER].uninstall()
    saved = model.__dict__.pop(_SAVED)
    if saved is _MISSING:
        del model.forward
    else:
        model.forward = saved
    delattr(model, _ADAPTER)
    return model


def is_patched(model: torch.nn.Module) -> bool:
    return _ADAPTER in model.__dict__


@contextlib.contextmanager
def pruning(model: torch.nn.Module, method: Any = "cls", **kwargs: Any) -> Iterator[torch.nn.Module]:
    """Patch for the duration of a block; the previous state (unpatched, or patched with another
    config) is restored on exit."""
    previous = model.__dict__.get(_ADAPTER)
    patch(model, method, **kwargs)
    try:
        yield model
    finally:
        if previous is None:
            unpatch(model)
        else:
            model.__dict__[_ADAPTER].uninstall()
            previous.install()
            setattr(model, _ADAPTER, previous)


def last_selection(model: torch.nn.Module, stage: int | None = None) -> list[list[torch.Tensor]]:
    """[sample][image] kept visual-token indices (ascending, in the original numbering of each
    image's visual tokens) from the most recent forward that had images (the prefill, for
    generate()): those that survive every stage, or with `stage=i` those kept by stage i (a
    multi-layer decoder stage such as `pdrop`: after its last layer)."""
    adapter = model.__dict__.get(_ADAPTER)
    if adapter is None:
        raise ValueError("last_selection: the model is not patched; call vlmprune.patch(model, ...) first")
    stages = adapter.selections()
    if stages is None:
        raise ValueError("last_selection: no forward with images has run since the model was patched")
    if stage is None:
        return stages[-1]
    n = len(adapter.config.stages)
    if not isinstance(stage, int) or not 0 <= stage < n:
        raise ValueError(f"last_selection: stage must be an int in 0..{n - 1} (this config has {n} stages), got {stage!r}")
    if adapter.config.stages[stage].where == "vision":
        return stages[0]  # the vision stage's selection (everything, when there is none)
    # stages[1 + j] follows decoder cut j; a multi-layer stage's selection is its last cut's
    last_cut = max(j for j, p in enumerate(adapter.decoder.points) if p.stage == stage)
    return stages[min(1 + last_cut, len(stages) - 1)]
