"""Oracle tests of the embedded shapes benchmark (vlmprune.eval.shapes): determinism, disjoint
splits, answers re-derived from the scene description by an independent checker, layout, pixels
of small objects, balance, scoring, files."""

from __future__ import annotations

import collections
import io
import itertools
import json
import re

import numpy as np
import pytest

from vlmprune.eval import shapes

W = H = 336
PATCH = 14
KIND_PLURAL = {"circles": "circle", "squares": "square", "triangles": "triangle", "stars": "star", "crosses": "cross"}
PALETTE = {"red", "green", "blue", "yellow", "purple", "orange"}


def png_bytes(image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def items():
    """Items from all three splits, descriptions only (nothing rendered)."""
    seeds = list(shapes.split_seeds("test", 500)) + list(shapes.split_seeds("train", 200)) + \
        list(shapes.split_seeds("validation", 100))
    return [shapes.make_item(s) for s in seeds]


# --------------------------------------------------------------------------------------------
# an independent checker: parse the question text, re-derive the answer from the JSON scene
# --------------------------------------------------------------------------------------------
def check(question: str, scene: dict) -> str:
    objs = scene["objects"]

    def one(pred):
        found = [o for o in objs if pred(o)]
        assert len(found) == 1, f"{question!r}: {len(found)} referents"
        return found[0]

    if m := re.fullmatch(r"What colour is the (circle|square|triangle|star|cross)\?", question):
        return one(lambda o: o["kind"] == m[1])["colour"]
    if m := re.fullmatch(r"What colour is the (small|large) (circle|square|triangle|star|cross)\?", question):
        return one(lambda o: o["kind"] == m[2] and o["size_class"] == m[1])["colour"]
    if m := re.fullmatch(r"What colour is the shape in the (top|bottom) (left|right)\?", question):
        def inside(o, margin):  # centre in the quadrant, `margin` px away from both midlines
            x, y = o["centre"]
            ok_y = y < H / 2 - margin if m[1] == "top" else y > H / 2 + margin
            ok_x = x < W / 2 - margin if m[2] == "left" else x > W / 2 + margin
            return ok_x and ok_y
        target = one(lambda o: inside(o, -PATCH / 2))  # nothing else even near the quadrant
        assert inside(target, PATCH / 2), question
        return target["colour"]
    if m := re.fullmatch(r"How many (\w+) shapes are there\?", question):
        assert m[1] in PALETTE
        return str(sum(o["colour"] == m[1] for o in objs))
    if m := re.fullmatch(r"How many (\w+) are there\?", question):
        return str(sum(o["kind"] == KIND_PLURAL[m[1]] for o in objs))
    if m := re.fullmatch(r"Is there a small (\w+)\?", question):
        return "yes" if any(o["kind"] == m[1] and o["side"] <= 2 * PATCH for o in objs) else "no"
    if m := re.fullmatch(r"Is there a (\w+) (\w+)\?", question):
        assert m[1] in PALETTE
        return "yes" if any(o["colour"] == m[1] and o["kind"] == m[2] for o in objs) else "no"
    if m := re.fullmatch(r"Which is (further left|further right|higher|lower), the (\w+) (\w+) or the (\w+) (\w+)\?",
                         question):
        a = one(lambda o: (o["colour"], o["kind"]) == (m[2], m[3]))
        b = one(lambda o: (o["colour"], o["kind"]) == (m[4], m[5]))
        assert a["kind"] != b["kind"], question  # the answer (a kind) names one of them
        (ax, ay), (bx, by) = a["centre"], b["centre"]
        d = {"further left": bx - ax, "further right": ax - bx, "higher": by - ay, "lower": ay - by}[m[1]]
        assert abs(d) >= PATCH, f"{question!r}: centres {abs(d)} px apart"
        return a["kind"] if d > 0 else b["kind"]
    if question == "What word is written?":
        assert scene["word"] and 3 <= len(scene["word"]) <= 4
        return scene["word"].lower()
    raise AssertionError(f"unparsed question {question!r}")


def test_answers_correct_by_construction(items):
    for item in items:
        scene = json.loads(json.dumps(item.scene.to_dict()))
        assert check(item.question, scene) == item.answer, (item.seed, item.question)
        assert item.answer in shapes.ANSWER_VOCAB
        assert item.answer in shapes.ANSWERS_BY_QTYPE[item.qtype]
        if item.qtype == "count":
            assert int(item.answer) <= 4


def test_layout(items):
    for item in items:
        scene = item.scene.to_dict()
        assert (scene["width"], scene["height"]) == (W, H)
        boxes = []
        pairs = set()
        for o in scene["objects"]:
            x0, y0, x1, y1 = o["bbox"]
            assert 0 <= x0 < x1 <= W and 0 <= y0 < y1 <= H
            assert x1 - x0 == y1 - y0 == o["side"]
            assert o["centre"] == [(x0 + x1) / 2, (y0 + y1) / 2]
            if o["size_class"] == "small":
                assert o["side"] <= 2 * PATCH  # at most 2 x 2 patches
            else:
                assert o["side"] >= 3 * PATCH
            assert tuple(o["rgb"]) == shapes.COLOURS[o["colour"]]
            assert (o["colour"], o["kind"]) not in pairs  # every colour + kind refers to one object
            pairs.add((o["colour"], o["kind"]))
            boxes.append(o["bbox"])
        assert 3 <= len(scene["objects"]) <= 8
        if scene["word"]:
            x0, y0, x1, y1 = scene["word_bbox"]
            assert 0 <= x0 < x1 <= W and 0 <= y0 < y1 <= H
            boxes.append(scene["word_bbox"])
        for a, b in itertools.combinations(boxes, 2):  # pairwise disjoint
            assert a[2] <= b[0] or b[2] <= a[0] or a[3] <= b[1] or b[3] <= a[1], (item.seed, a, b)


def test_balance(items):
    test_items = items[:500]
    by_type = collections.Counter(it.qtype for it in test_items)
    assert set(by_type) == set(shapes.QTYPES)
    assert all(n == 100 for n in by_type.values())
    for qtype in shapes.YES_NO_QTYPES:
        answers = collections.Counter(it.answer for it in test_items if it.qtype == qtype)
        assert set(answers) == {"yes", "no"}
        assert 0.45 <= answers["yes"] / sum(answers.values()) <= 0.55
    relpos = [it for it in test_items if it.qtype == "relpos"]
    first = sum(it.answer == it.query["a"][1] for it in relpos)
    assert 0.45 <= first / len(relpos) <= 0.55  # the answer is the first named object half of the time
    for qtype in ("colour", "count", "relpos"):
        answers = collections.Counter(it.answer for it in items if it.qtype == qtype)
        assert set(answers) == set(shapes.ANSWERS_BY_QTYPE[qtype])
        assert min(answers.values()) >= 0.4 * max(answers.values()), answers
    variants = {(it.qtype, it.variant) for it in items}
    for v in [("colour", "kind"), ("colour", "size"), ("colour", "place"), ("count", "kind"), ("count", "colour"),
              ("presence", "small"), ("presence", "colour"), ("relpos", "x"), ("relpos", "y")]:
        assert v in variants
    # small objects are common, and "no small X" has a large X in the scene in many cases
    n_small = sum(o.size_class == "small" for it in items for o in it.scene.objects)
    assert n_small >= 0.25 * sum(len(it.scene.objects) for it in items)
    hard_no = [it for it in items if it.variant == "small" and it.answer == "no"
               and any(o.kind == it.query["kind"] for o in it.scene.objects)]
    assert len(hard_no) >= 10


def test_determinism_and_pure_rendering():
    seeds = list(shapes.split_seeds("test", 5)) + [7, 12345]
    for seed in seeds:
        a, b = shapes.make_item(seed), shapes.make_item(seed)
        assert json.dumps(a.to_dict()) == json.dumps(b.to_dict())
        png = png_bytes(a.image)
        assert png == png_bytes(b.image)
        # rendering is a function of the (JSON round-tripped) description alone
        scene = shapes.Scene.from_dict(json.loads(json.dumps(a.scene.to_dict())))
        assert png_bytes(shapes.render(scene)) == png
        assert a.image.size == (W, H) and a.image.mode == "RGB"
    assert shapes.make_item(seeds[0]).to_dict()["scene"] != shapes.make_item(seeds[1]).to_dict()["scene"]


def test_pixels_show_the_description():
    """Every object's colour covers a good part of its box (small ones too, not painted over), the
    word is drawn, and the background never looks like a palette colour."""
    palette = np.array(list(shapes.COLOURS.values()))
    for seed in shapes.split_seeds("test", 20):
        item = shapes.make_item(seed)
        pix = np.asarray(item.image).astype(int)
        covered = np.zeros((H, W), bool)
        for o in item.scene.objects:
            x0, y0, x1, y1 = o.bbox
            covered[y0:y1, x0:x1] = True
            exact = np.abs(pix[y0:y1, x0:x1] - np.array(o.rgb)).max(-1) <= 8
            assert exact.mean() >= 0.1, (seed, o)
        if item.scene.word:
            x0, y0, x1, y1 = item.scene.word_bbox
            covered[y0:y1, x0:x1] = True
            dark = (pix[y0:y1, x0:x1] - np.array(item.scene.word_rgb)).__abs__().max(-1) <= 20
            assert dark.mean() >= 0.05
        rest = pix[~covered]
        dist = np.abs(rest[:, None, :] - palette[None]).max(-1).min(-1)
        assert (dist <= 30).mean() < 0.001, seed


def test_splits_disjoint():
    full = {s: shapes.split_seeds(s, shapes.SPLIT_SIZE) for s in ("train", "validation", "test")}
    spans = sorted((r.start, r.stop) for r in full.values())
    for (_, stop), (start, _) in zip(spans, spans[1:]):
        assert stop <= start
    assert list(shapes.split_seeds("val", 3)) == list(shapes.split_seeds("validation", 3))
    assert list(shapes.split_seeds("test", 2, start=5)) == list(shapes.split_seeds("test", 7))[5:]
    small = [set(shapes.split_seeds(s, 50)) for s in ("train", "validation", "test")]
    assert not (small[0] & small[1] or small[0] & small[2] or small[1] & small[2])
    with pytest.raises(ValueError):
        shapes.split_seeds("holdout", 1)
    with pytest.raises(ValueError):
        shapes.split_seeds("train", shapes.SPLIT_SIZE + 1)


@pytest.mark.parametrize("pred, answer, ok", [
    ("Yes", "yes", True), (" yes. ", "yes", True), ("YES!", "yes", True), ("no", "yes", False),
    ("Two", "2", True), ("two.", "2", True), ("2", "2", True), ("zero", "0", True), ("3", "2", False),
    ("Red", "red", True), ("the red", "red", True), ("'cat'", "cat", True), ("CAT", "cat", True),
    ("red  square", "red square", True), ("dark red", "red", False), ("yes, there is", "yes", False),
    ("", "yes", False), ("twenty", "2", False),
])
def test_score(pred, answer, ok):
    assert shapes.score(pred, answer) is ok


def test_write_load_cli(tmp_path):
    out = tmp_path / "test"
    assert shapes.main(["--split", "test", "--n", "6", "--out", str(out)]) == 0
    rows = [json.loads(line) for line in (out / "items.jsonl").read_text().splitlines()]
    assert [r["seed"] for r in rows] == list(shapes.split_seeds("test", 6))
    for row in rows:
        assert {"id", "image", "question", "answer", "qtype", "scene"} <= set(row)
        item = shapes.make_item(row["seed"])
        assert (row["question"], row["answer"], row["qtype"]) == (item.question, item.answer, item.qtype)
        assert row["scene"] == item.scene.to_dict()
    loaded = shapes.load_split(out)
    assert len(loaded) == 6 and len({it.id for it in loaded}) == 6
    for it in loaded:
        assert np.array_equal(np.asarray(it.image), np.asarray(shapes.make_item(it.seed).image))


def test_example_grid(tmp_path):
    grid = shapes.example_grid(tmp_path / "grid.png")
    assert (tmp_path / "grid.png").is_file()
    assert grid.width > 2 * W and grid.height > 2 * H
