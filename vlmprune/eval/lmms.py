"""lmms-eval glue that needs no lmms-eval import: the model entry point and the shapes task.

- `model_manifest()` is what our `lmms_eval.models` entry point names (pyproject.toml). lmms-eval
  0.7.3 calls it while it builds its model registry and imports `vlmprune.eval.lmms_plugin` (the
  model class) only when `--model vlmprune` is asked for.
- `task_path()` is the folder to give lmms-eval as `--include_path`; it holds the task
  `vlmprune_shapes` (the embedded benchmark, `vlmprune.eval.shapes`, with the bare question, as our
  tiny model was trained) and `vlmprune_shapes_short` (LLaVA-1.5's short-answer instruction added,
  for chat models). The YAMLs name the `shapes_*` functions below.
- The task's data is `tasks/shapes/test.jsonl`: the first `SHAPES_ITEMS` test-split items
  (question, answer, type, seed); each image is rendered from its seed when lmms-eval asks for it,
  so nothing is downloaded. Rewrite the file with `python -m vlmprune.eval.lmms` after a change to
  the benchmark's generator.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import Any

from PIL import Image

TASKS_DIR = Path(__file__).resolve().parent / "tasks"
SHAPES_DATA = TASKS_DIR / "shapes" / "test.jsonl"
SHAPES_ITEMS = 2000  # the test-split size the trainer (`vlmprune.embedded`) reports
MODEL_CLASS = "vlmprune.eval.lmms_plugin.VLMPrune"


def model_manifest():
    """The `lmms_eval.models` entry point: the model id `vlmprune` and the path of its class."""
    from lmms_eval.models.registry_v2 import ModelManifest

    return ModelManifest(model_id="vlmprune", simple_class_path=MODEL_CLASS)


def task_path() -> str:
    """The folder to pass to lmms-eval as `--include_path`."""
    return str(TASKS_DIR)


# --- the shapes task -------------------------------------------------------------------------
def shapes_rows(n: int = SHAPES_ITEMS) -> list[dict[str, Any]]:
    """The task's rows: the first `n` test-split items, without their images."""
    from vlmprune.eval import shapes

    rows = []
    for i, seed in enumerate(shapes.split_seeds("test", n)):
        item = shapes.make_item(seed)
        rows.append({"id": f"test-{i:06d}", "seed": seed, "question": item.question, "answer": item.answer,
                     "qtype": item.qtype, "variant": item.variant})
    return rows


def write_shapes_data(path: str | Path = SHAPES_DATA, n: int = SHAPES_ITEMS) -> Path:
    """Write the task's JSONL (one row per item)."""
    path = Path(path)
    path.write_text("".join(json.dumps(row) + "\n" for row in shapes_rows(n)))
    return path


def shapes_doc_to_visual(doc: dict[str, Any]) -> list[Image.Image]:
    """The item's image, rendered from its seed; a row written by another generator version is refused."""
    from vlmprune.eval import shapes

    item = shapes.make_item(doc["seed"])
    if item.question != doc["question"]:
        raise ValueError(f"shapes item {doc['id']} (seed {doc['seed']}): the generator now asks {item.question!r}, "
                         f"the task file {doc['question']!r}; rewrite it with `python -m vlmprune.eval.lmms`")
    return [item.image]


def shapes_doc_to_text(doc: dict[str, Any], lmms_eval_specific_kwargs: dict[str, str] | None = None) -> str:
    """The question, between the task's pre_prompt and post_prompt."""
    kwargs = lmms_eval_specific_kwargs or {}
    return f"{kwargs.get('pre_prompt', '')}{doc['question']}{kwargs.get('post_prompt', '')}"


def shapes_process_results(doc: dict[str, Any], results: list[str]) -> dict[str, Any]:
    """Exact match (`shapes.score`) of the answer, overall and tagged with the question type."""
    from vlmprune.eval import shapes

    correct = float(shapes.score(results[0], doc["answer"]))
    per_type = {"qtype": doc["qtype"], "correct": correct}
    return {"accuracy": correct, **{f"accuracy_{q}": per_type for q in shapes.QTYPES}}


def qtype_accuracy(items: list[dict[str, Any]], qtype: str) -> float:
    """Mean `correct` over the items of one question type (NaN when there is none)."""
    hits = [it["correct"] for it in items if it["qtype"] == qtype]
    return sum(hits) / len(hits) if hits else math.nan


def shapes_accuracy_colour(items: list[dict[str, Any]]) -> float:
    return qtype_accuracy(items, "colour")


def shapes_accuracy_count(items: list[dict[str, Any]]) -> float:
    return qtype_accuracy(items, "count")


def shapes_accuracy_presence(items: list[dict[str, Any]]) -> float:
    return qtype_accuracy(items, "presence")


def shapes_accuracy_relpos(items: list[dict[str, Any]]) -> float:
    return qtype_accuracy(items, "relpos")


def shapes_accuracy_word(items: list[dict[str, Any]]) -> float:
    return qtype_accuracy(items, "word")


if __name__ == "__main__":
    print(f"wrote {write_shapes_data()}")
    sys.exit(0)
