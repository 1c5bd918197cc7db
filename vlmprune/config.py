"""PruneConfig: what to prune and how much, validated once at `patch` time."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from vlmprune.scorers import Scorer, build_scorer, scorer_class

POSITION_MODES = ("compact", "original")
VIEW_SCORES = ("normalised", "raw")  # any-resolution families: how the attention rows of an image's views compare


@dataclass
class Stage:
    """One pruning stage: a built scorer, where it acts, and its own budget (`keep` /
    `prune_ratio` per image; None: the config's)."""

    method: str
    scorer: Scorer
    kwargs: dict[str, Any]
    keep: int | None = None
    prune_ratio: float | None = None

    @property
    def where(self) -> str:
        return type(self.scorer).stage


@dataclass
class PruneConfig:
    """Validated pruning settings. Exactly one of `keep` (visual tokens kept per image) and
    `prune_ratio` (fraction removed, kept = round(N * (1 - ratio))) is set."""

    stages: list[Stage]
    keep: int | None = None
    prune_ratio: float | None = None
    positions: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    """Adapter options given to `patch` (`view_scores`), only those given; the family refuses those it has not."""

    @property
    def vision_stage(self) -> Stage | None:
        return next((s for s in self.stages if s.where == "vision"), None)

    @property
    def decoder_stages(self) -> list[Stage]:
        return [s for s in self.stages if s.where == "decoder"]

    def kept(self, n: int, stage: Stage | None = None) -> int:
        """Visual tokens kept for an image of n tokens (by `stage`, default the vision stage)."""
        stage = stage or self.vision_stage
        if stage is None:  # no vision stage: every token enters the decoder
            return n
        keep, ratio = self.keep, self.prune_ratio
        if stage is not None and (stage.keep is not None or stage.prune_ratio is not None):
            keep, ratio = stage.keep, stage.prune_ratio
        if keep is not None:
            return min(keep, n)
        return min(n, int(round(n * (1.0 - ratio))))

    def describe(self) -> str:
        amount = f"keep={self.keep}" if self.keep is not None else f"prune_ratio={self.prune_ratio}"
        methods = " -> ".join(f"{s.method}{s.kwargs or ''}" for s in self.stages)
        return f"{methods} ({amount}, positions={self.positions})"


def _check_amount(keep: Any, prune_ratio: Any) -> None:
    if (keep is None) == (prune_ratio is None):
        raise ValueError(
            f"give exactly one of keep (visual tokens kept per image) and prune_ratio "
            f"(fraction removed, in [0, 1)); got keep={keep!r}, prune_ratio={prune_ratio!r}"
        )
    if keep is not None:
        if isinstance(keep, bool) or not isinstance(keep, int):
            raise TypeError(f"keep must be an int >= 0, got {keep!r}")
        if keep < 0:
            raise ValueError(f"keep must be >= 0 (0 removes every visual token), got {keep}")
    if prune_ratio is not None:
        if isinstance(prune_ratio, bool) or not isinstance(prune_ratio, (int, float)):
            raise TypeError(f"prune_ratio must be a float in [0, 1), got {prune_ratio!r}")
        if not (0.0 <= prune_ratio < 1.0) or math.isnan(prune_ratio):
            raise ValueError(f"prune_ratio must be in [0, 1) (fraction of visual tokens removed), got {prune_ratio}")


def _stages(method: Any, kwargs: dict[str, Any]) -> list[Stage]:
    """Normalise `method` (a name, or a list of (name, kwargs) stages) into built stages."""
    if isinstance(method, str):
        return [Stage(method, build_scorer(method, **kwargs), dict(kwargs))]
    if not isinstance(method, (list, tuple)) or not method:
        raise TypeError(f"method must be a registered name or a list of (name, kwargs) stages, got {method!r}")
    if kwargs:
        raise TypeError(f"with a list of stages, give each stage's options in its tuple, not as kwargs {sorted(kwargs)}")
    stages = []
    for item in method:
        if isinstance(item, str):
            name, opts = item, {}
        elif isinstance(item, (list, tuple)) and len(item) == 2 and isinstance(item[1], dict):
            name, opts = item
        else:
            raise TypeError(f"a stage must be a name or a (name, kwargs) pair, got {item!r}")
        opts = dict(opts)
        keep, ratio = opts.pop("keep", None), opts.pop("prune_ratio", None)
        if keep is not None or ratio is not None:
            _check_amount(keep, ratio)
        stages.append(Stage(name, build_scorer(name, **opts), opts, keep, ratio))
    where = [s.where for s in stages]
    if where.count("vision") > 1 or ("vision" in where and where[0] != "vision"):
        raise ValueError(f"at most one vision stage, and it must come first; got stages {[s.method for s in stages]} at {where}")
    return stages


def make_config(
    method: Any = "cls",
    *,
    keep: int | None = None,
    prune_ratio: float | None = None,
    positions: str | None = None,
    view_scores: str | None = None,
    **method_kwargs: Any,
) -> PruneConfig:
    """Validate the arguments of `patch` and build the scorers."""
    if isinstance(method, str):
        scorer_class(method)  # unknown method is reported before anything else
    if positions is not None and positions not in POSITION_MODES:
        raise ValueError(f"positions must be one of {POSITION_MODES} or None (family default), got {positions!r}")
    if view_scores is not None and view_scores not in VIEW_SCORES:
        raise ValueError(f"view_scores must be one of {list(VIEW_SCORES)} or None (family default), got {view_scores!r}")
    stages = _stages(method, method_kwargs)
    if keep is not None or prune_ratio is not None or not all(s.keep is not None or s.prune_ratio is not None
                                                               for s in stages):
        _check_amount(keep, prune_ratio)  # needed unless every stage gives its own
    extra = {} if view_scores is None else {"view_scores": view_scores}
    return PruneConfig(stages=stages, keep=keep, prune_ratio=prune_ratio, positions=positions, extra=extra)
