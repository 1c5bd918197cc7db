"""`vlmprune calibrate --method vflowopt`: VFlowOpt's offline search of its pruning schedule, as a
JSON file the scorer reads back (`patch(model, "vflowopt", keep=k, schedule=path)`).

The objective is the paper's visual-information-flow signal: the last decoder layer's hidden state at
the prompt's last token (the token the answer starts from), pruned vs unpruned, compared by cosine and
averaged over the calibration items. The paper searches with Bayesian optimisation; here a seeded
random search: the scorer's defaults first, then `trials - 1` draws of threshold in [0, 50), alpha in
[0, 1) and each earlier cut's expand factor in [1, 4), sorted non-increasing. The cut layers stay the
scorer's defaults for the model (or `layers`). The best draw (ties: the earlier) is written."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

import vlmprune
from vlmprune.eval.sweep import load_items, load_vlm, make_task

METHODS = ("vflowopt",)


@dataclass
class CalibrateSpec:
    model: str
    keep: int
    data: str | None = None
    limit: int = 16
    trials: int = 16
    seed: int = 0
    batch_size: int = 4
    layers: list[int] | None = None
    device: str = "auto"
    dtype: str = "auto"
    method: str = "vflowopt"


def last_token_states(
    model: torch.nn.Module, batches: list[dict[str, torch.Tensor]]
) -> torch.Tensor:
    """[items, D] float32: the last decoder layer's hidden state at each row's last (prompt) token."""
    rows = []
    with torch.no_grad():
        for inputs in batches:
            out = model(**inputs, output_hidden_states=True)
            rows.append(out.hidden_states[-1][:, -1].float())
    return torch.cat(rows)


def candidates(trials: int, seed: int, cuts_before_last: int) -> list[dict[str, Any]]:
    """The schedules tried: {} (the scorer's defaults), then seeded random draws."""
    g = torch.Generator().manual_seed(seed)
    out: list[dict[str, Any]] = [{}]
    for _ in range(trials - 1):
        t, a = torch.rand(2, generator=g, dtype=torch.float64).tolist()
        expand = sorted(
            (
                1.0
                + 3.0 * torch.rand(cuts_before_last, generator=g, dtype=torch.float64)
            ).tolist(),
            reverse=True,
        )
        out.append({"threshold": 50.0 * t, "alpha": a, "expand": expand})
    return out


def calibrate(
    spec: CalibrateSpec, advance: Callable[[str], None] | None = None
) -> dict[str, Any]:
    """Search the schedule on the task's items; the result (best schedule, its score, every trial)."""
    if spec.method not in METHODS:
        raise ValueError(
            f"calibrate: method {spec.method!r} has no schedule to calibrate; allowed: {list(METHODS)}"
        )
    if spec.keep < 0 or spec.limit < 1 or spec.trials < 1 or spec.batch_size < 1:
        raise ValueError(
            f"calibrate: need keep >= 0 and limit, trials, batch size >= 1; got keep={spec.keep}, "
            f"limit={spec.limit}, trials={spec.trials}, batch_size={spec.batch_size}"
        )
    vlm = load_vlm(spec.model, spec.device, spec.dtype)
    loaded = [
        it
        for it in load_items(make_task(spec.data, spec.limit).items())
        if it.error is None
    ]
    if not loaded:
        raise ValueError(f"calibrate: no loadable items in {spec.data!r}")
    batches = [
        vlm.inputs(
            [it.image for it in loaded[s : s + spec.batch_size]],
            [it.item.prompt for it in loaded[s : s + spec.batch_size]],
        )
        for s in range(0, len(loaded), spec.batch_size)
    ]
    reference = last_token_states(vlm.model, batches)
    base = {"layers": spec.layers} if spec.layers is not None else {}
    vlmprune.patch(vlm.model, spec.method, keep=spec.keep, **base)
    layers, _ = vlm.model._vlmprune_adapter.stage.scorer.cuts(
        vlm.model._vlmprune_adapter.info
    )
    trials = []
    try:
        for options in candidates(spec.trials, spec.seed, len(layers) - 1):
            vlmprune.patch(vlm.model, spec.method, keep=spec.keep, **base, **options)
            scorer = vlm.model._vlmprune_adapter.stage.scorer
            pruned = last_token_states(vlm.model, batches)
            score = float(
                torch.nn.functional.cosine_similarity(pruned, reference, dim=-1).mean()
            )
            trials.append(
                {
                    "layers": list(layers),
                    "expand": list(scorer.cuts(vlm.model._vlmprune_adapter.info)[1]),
                    "threshold": scorer.threshold,
                    "alpha": scorer.alpha,
                    "score": score,
                }
            )
            if advance is not None:
                advance(f"trial {len(trials)}: cosine {score:.4f}")
    finally:
        vlmprune.unpatch(vlm.model)
    best = max(trials, key=lambda t: t["score"])  # max keeps the first of equal scores
    return {
        "method": spec.method,
        "model": spec.model,
        "data": spec.data,
        "items": len(loaded),
        "keep": spec.keep,
        "objective": "mean cosine of the last layer's last-token hidden state, pruned vs unpruned",
        **{k: best[k] for k in ("layers", "expand", "threshold", "alpha", "score")},
        "trials": trials,
    }


def write_schedule(result: dict[str, Any], path: Path) -> None:
    """The calibration result as JSON (the scorer reads layers, expand, threshold and alpha)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2) + "\n")
