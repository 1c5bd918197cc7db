"""The lmms-eval shapes task's data and metric, checked without lmms-eval: the shipped rows are the
benchmark's test split, images are the benchmark's, and the accuracies are exact match per item,
overall and per question type."""

from __future__ import annotations

import json
import math

import pytest

from vlmprune.eval import lmms, shapes


def test_task_data_is_the_test_split():
    rows = [json.loads(line) for line in lmms.SHAPES_DATA.read_text().splitlines()]
    assert rows == lmms.shapes_rows(lmms.SHAPES_ITEMS)
    assert len(rows) == 2000 and rows[0]["seed"] == shapes.split_seeds("test", 1)[0]
    assert [r["qtype"] for r in rows[:5]] == list(shapes.QTYPES)


def test_doc_to_visual_renders_the_item_and_refuses_a_stale_row():
    row = lmms.shapes_rows(3)[2]
    (image,) = lmms.shapes_doc_to_visual(row)
    assert image.tobytes() == shapes.make_item(row["seed"]).image.tobytes()
    with pytest.raises(ValueError, match="rewrite it with `python -m vlmprune.eval.lmms`"):
        lmms.shapes_doc_to_visual({**row, "question": "What word is written?"})


def test_doc_to_text_wraps_the_question():
    row = lmms.shapes_rows(1)[0]
    assert lmms.shapes_doc_to_text(row) == row["question"]
    assert lmms.shapes_doc_to_text(row, {"pre_prompt": "Q: ", "post_prompt": "\nA:"}) == f"Q: {row['question']}\nA:"


def crafted_predictions() -> tuple[list[dict], list[str], dict[str, float]]:
    """Ten task rows, predictions right for two colour items (one only after normalisation) and one
    count item (as a number word), and the accuracies they must give."""
    rows = lmms.shapes_rows(10)  # question types cycle: colour, count, presence, relpos, word, colour, ...
    spoken = {"0": "none", "1": "one", "2": "Two.", "3": "three", "4": "four"}
    preds = ["wrong"] * 10
    preds[0] = f"The {rows[0]['answer'].upper()}."
    preds[5] = rows[5]["answer"]
    preds[1] = spoken[rows[1]["answer"]]
    expected = {"accuracy": 0.3, "accuracy_colour": 1.0, "accuracy_count": 0.5, "accuracy_presence": 0.0,
                "accuracy_relpos": 0.0, "accuracy_word": 0.0}
    return rows, preds, expected


def test_accuracy_overall_and_per_question_type():
    rows, preds, expected = crafted_predictions()
    per_doc = [lmms.shapes_process_results(r, [p]) for r, p in zip(rows, preds)]
    assert [d["accuracy"] for d in per_doc] == [1.0, 1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 0.0]
    for qtype in shapes.QTYPES:
        aggregate = getattr(lmms, f"shapes_accuracy_{qtype}")
        assert aggregate([d[f"accuracy_{qtype}"] for d in per_doc]) == expected[f"accuracy_{qtype}"], qtype
    assert math.isnan(lmms.shapes_accuracy_word([d["accuracy_word"] for d in per_doc[:3]]))  # no word item
