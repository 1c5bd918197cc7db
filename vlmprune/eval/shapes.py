"""The embedded synthetic visual-QA benchmark ("shapes").

Seeded scenes of 3-7 coloured shapes (circle, square, triangle, star, cross; small ones 18-26 px,
i.e. at most 2x2 LLaVA patches, large ones 42-72 px) and sometimes a short rendered word, on
textured or cluttered backgrounds, drawn with Pillow at 336 x 336 (LLaVA-1.5's input: a 24 x 24
grid of 14-px patches). Each item asks one question with a short answer from a small closed
vocabulary (`ANSWER_VOCAB`), scored by normalised exact match (`score`). Answers depend on local
detail (colours and kinds of single objects, small objects, counts, the word), so a tiny model can
learn them but visual-token pruning can lose them.

    item = make_item(seed)            # Item: image (PIL, rendered lazily), question, answer, qtype, scene
    seeds = split_seeds("test", 200)  # disjoint seed ranges for train / validation / test
    write_split(dir, "test", 200)     # dir/items.jsonl + dir/images/*.png
    items = load_split(dir)
    score("Two.", "2")                # True

    python -m vlmprune.eval.shapes --split test --n 200 --out DIR

Everything is a pure function of the seed: the scene description (a dataclass, JSON-able through
`Scene.to_dict` / `Scene.from_dict`) is drawn from `random.Random(seed)`, the question and answer
are computed from the description alone (`answer_query`), and `render(scene)` draws the pixels from
the description alone (the background's texture from its own stored seed).
"""

from __future__ import annotations

import argparse
import colorsys
import json
import math
import random
import re
import sys
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

VERSION = 1

IMAGE_SIZE = 336
PATCH = 14
GRID = IMAGE_SIZE // PATCH  # 24 x 24 = 576 visual tokens

# --------------------------------------------------------------------------------------------
# vocabulary
# --------------------------------------------------------------------------------------------
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (222, 36, 36),
    "green": (30, 158, 58),
    "blue": (36, 84, 228),
    "yellow": (246, 208, 22),
    "purple": (146, 52, 204),
    "orange": (246, 128, 18),
}
KINDS: tuple[str, ...] = ("circle", "square", "triangle", "star", "cross")
PLURALS: dict[str, str] = {"circle": "circles", "square": "squares", "triangle": "triangles",
                           "star": "stars", "cross": "crosses"}
SIZE_CLASSES: tuple[str, ...] = ("small", "large")
SMALL_SIDE = (18, 26)  # bbox side in px; <= 2 patches
LARGE_SIDE = (42, 72)
MAX_SMALL_SIDE = 2 * PATCH
WORDS: tuple[str, ...] = (
    "cat", "dog", "sun", "map", "cup", "key", "owl", "fox", "bee", "pen", "hat", "box",
    "book", "fish", "tree", "lamp", "moon", "ship", "frog", "bird", "cake", "door", "ring", "leaf",
)
MAX_COUNT = 4
DIGITS: tuple[str, ...] = tuple(str(i) for i in range(MAX_COUNT + 1))
YES_NO: tuple[str, ...] = ("yes", "no")

QTYPES: tuple[str, ...] = ("colour", "count", "presence", "relpos", "word")
YES_NO_QTYPES: tuple[str, ...] = ("presence",)
ORDER: tuple[str, ...] = ("first", "second")  # relpos: which named object is the answer (alternates)
ANSWERS_BY_QTYPE: dict[str, tuple[str, ...]] = {
    "colour": tuple(COLOURS),
    "count": DIGITS,
    "presence": YES_NO,
    "relpos": KINDS,
    "word": WORDS,
}
ANSWER_VOCAB: tuple[str, ...] = tuple(COLOURS) + DIGITS + YES_NO + WORDS + KINDS

QUADRANTS: tuple[str, ...] = ("top left", "top right", "bottom left", "bottom right")
RELATIONS: dict[str, tuple[int, int]] = {  # "Which is REL, a or b?" -> (axis, sign): a wins <=> sign * (a - b) > 0
    "further left": (0, -1), "further right": (0, 1), "higher": (1, -1), "lower": (1, 1),
}
PLACE_MARGIN = PATCH  # "the shape in the top left": centre >= 1 patch inside, no other centre near
REL_MIN_SEP = 2 * PATCH  # relative-position questions only when centres differ by >= 2 patches

N_OBJECTS = (3, 7)
GAP = 6  # min px between two bboxes
MARGIN = 4  # min px between a bbox and the image border
SUPERSAMPLE = 4

SPLITS: dict[str, int] = {"train": 0, "validation": 100_000_000, "test": 200_000_000}
SPLIT_ALIASES: dict[str, str] = {"val": "validation", "valid": "validation", "dev": "validation"}
SPLIT_SIZE = 100_000_000


class AmbiguousQuestion(ValueError):
    """The question has no single answer in this scene."""


# --------------------------------------------------------------------------------------------
# scene description
# --------------------------------------------------------------------------------------------
@dataclass
class Obj:
    """One shape. bbox = (x0, y0, x1, y1) in px, x1 / y1 exclusive, side = x1 - x0 = y1 - y0."""

    kind: str
    colour: str
    rgb: tuple[int, int, int]
    size_class: str  # "small" | "large"
    side: int
    bbox: tuple[int, int, int, int]
    centre: tuple[float, float]

    @classmethod
    def make(cls, kind: str, colour: str, size_class: str, x0: int, y0: int, side: int) -> "Obj":
        return cls(kind, colour, COLOURS[colour], size_class, side, (x0, y0, x0 + side, y0 + side),
                   (x0 + side / 2, y0 + side / 2))

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "colour": self.colour, "rgb": list(self.rgb), "size_class": self.size_class,
                "side": self.side, "bbox": list(self.bbox), "centre": list(self.centre)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Obj":
        return cls(d["kind"], d["colour"], tuple(d["rgb"]), d["size_class"], int(d["side"]),
                   tuple(int(v) for v in d["bbox"]), tuple(float(v) for v in d["centre"]))


@dataclass
class Scene:
    """A full description of one image; `render(scene)` depends on nothing else.

    background: {"type": "noise" | "stripes" | "grid" | "speckle", "base": [r, g, b], "seed": int,
    "grain": float, type parameters, "lines": [[x0, y0, x1, y1, r, g, b, width, alpha], ...]}.
    word: the rendered word (lower case; drawn in capitals) or None; word_bbox its box (x1 / y1
    exclusive), word_font_size the font size in px, word_rgb / word_stroke_rgb its colours."""

    width: int
    height: int
    background: dict[str, Any]
    objects: list[Obj]
    word: str | None = None
    word_bbox: tuple[int, int, int, int] | None = None
    word_font_size: int | None = None
    word_rgb: tuple[int, int, int] | None = None
    word_stroke_rgb: tuple[int, int, int] | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "width": self.width, "height": self.height, "background": json.loads(json.dumps(self.background)),
            "objects": [o.to_dict() for o in self.objects], "word": self.word,
            "word_bbox": None if self.word_bbox is None else list(self.word_bbox),
            "word_font_size": self.word_font_size,
            "word_rgb": None if self.word_rgb is None else list(self.word_rgb),
            "word_stroke_rgb": None if self.word_stroke_rgb is None else list(self.word_stroke_rgb),
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Scene":
        tup = lambda v: None if v is None else tuple(int(x) for x in v)  # noqa: E731
        return cls(int(d["width"]), int(d["height"]), d["background"], [Obj.from_dict(o) for o in d["objects"]],
                   d.get("word"), tup(d.get("word_bbox")), d.get("word_font_size"), tup(d.get("word_rgb")),
                   tup(d.get("word_stroke_rgb")))


def _as_scene(scene: Scene | dict[str, Any]) -> Scene:
    return scene if isinstance(scene, Scene) else Scene.from_dict(scene)


# --------------------------------------------------------------------------------------------
# rendering (pure functions of the description)
# --------------------------------------------------------------------------------------------
def _background(bg: dict[str, Any], width: int, height: int) -> Image.Image:
    rng = np.random.default_rng(int(bg["seed"]))
    img = np.empty((height, width, 3), np.float32)
    img[:] = np.asarray(bg["base"], np.float32)
    yy = np.arange(height, dtype=np.float32)[:, None]
    xx = np.arange(width, dtype=np.float32)[None, :]
    kind = bg["type"]
    if kind == "noise":  # low-frequency blotches
        cell = int(bg["cell"])
        low = rng.standard_normal((height // cell + 2, width // cell + 2), dtype=np.float32)
        blot = np.asarray(Image.fromarray(low, "F").resize((width, height), Image.BILINEAR), np.float32)
        img += (float(bg["amp"]) * blot)[..., None]
    elif kind == "stripes":
        theta = math.radians(float(bg["angle"]))
        u = xx * math.cos(theta) + yy * math.sin(theta)
        wave = np.tanh(3.0 * np.sin(2.0 * math.pi * u / float(bg["period"])))
        img += (float(bg["amp"]) * wave)[..., None]
    elif kind == "grid":
        period, lw, off = int(bg["period"]), int(bg["line_width"]), int(bg["offset"])
        on = (((xx + off) % period) < lw) | (((yy + off) % period) < lw)
        img -= (float(bg["amp"]) * on.astype(np.float32))[..., None]
    elif kind == "speckle":
        n = int(bg["count"])
        ys, xs = rng.integers(0, height, n), rng.integers(0, width, n)
        rs = rng.integers(1, 4, n)
        shade = rng.uniform(-1.0, 1.0, n) * float(bg["amp"])
        for y, x, r, s in zip(ys, xs, rs, shade):
            y0, y1, x0, x1 = max(0, y - r), min(height, y + r + 1), max(0, x - r), min(width, x + r + 1)
            img[y0:y1, x0:x1] += s
    else:
        raise ValueError(f"unknown background type {kind!r}")
    grain = float(bg["grain"])
    noise = rng.standard_normal((height, width, 4), dtype=np.float32)
    img += grain * noise[..., :1] + (grain / 3.0) * noise[..., 1:]
    out = Image.fromarray(np.clip(np.rint(img), 0, 255).astype(np.uint8), "RGB").convert("RGBA")
    if bg.get("lines"):
        layer = Image.new("RGBA", (width, height), (0, 0, 0, 0))
        draw = ImageDraw.Draw(layer)
        for x0, y0, x1, y1, r, g, b, w, alpha in bg["lines"]:
            draw.line([(x0, y0), (x1, y1)], fill=(int(r), int(g), int(b), int(round(255 * alpha))), width=int(w))
        out.alpha_composite(layer)
    return out


def _star(cx: float, cy: float, r_out: float, r_in: float) -> list[tuple[float, float]]:
    pts = []
    for i in range(10):
        r = r_out if i % 2 == 0 else r_in
        a = -math.pi / 2 + i * math.pi / 5
        pts.append((cx + r * math.cos(a), cy + r * math.sin(a)))
    return pts


def _shape_patch(kind: str, rgb: tuple[int, int, int], side: int) -> Image.Image:
    """The shape drawn on a transparent side x side RGBA patch (supersampled, box-filtered)."""
    s = side * SUPERSAMPLE
    patch = Image.new("RGBA", (s, s), (0, 0, 0, 0))
    draw = ImageDraw.Draw(patch)
    fill = tuple(rgb) + (255,)
    outline = tuple(int(c * 0.45) for c in rgb) + (255,)
    width = SUPERSAMPLE * max(1, round(side / 22))
    e = s - 1
    if kind == "circle":
        draw.ellipse([0, 0, e, e], fill=fill, outline=outline, width=width)
    elif kind == "square":
        i = round(0.07 * s)
        draw.rectangle([i, i, e - i, e - i], fill=fill, outline=outline, width=width)
    elif kind == "triangle":
        draw.polygon([(e / 2, 0), (e, e), (0, e)], fill=fill, outline=outline, width=width)
    elif kind == "star":
        r = s / 2
        drop = r * (1 - math.cos(math.pi / 5)) / 2  # centre the star's vertical extent
        draw.polygon(_star(s / 2, s / 2 + drop, r, 0.46 * r), fill=fill, outline=outline, width=width)
    elif kind == "cross":
        t = 0.36 * s
        a, b = (s - t) / 2, (s + t) / 2
        draw.polygon([(a, 0), (b, 0), (b, a), (e, a), (e, b), (b, b), (b, e), (a, e), (a, b), (0, b), (0, a), (a, a)],
                     fill=fill, outline=outline, width=width)
    else:
        raise ValueError(f"unknown kind {kind!r}")
    return patch.resize((side, side), Image.BOX)


@lru_cache(maxsize=64)
def _font(size: int) -> Any:
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, ImportError, OSError, AttributeError):  # old Pillow / no FreeType
        return None


def _word_masks(text: str, font_size: int) -> tuple[Image.Image, Image.Image]:
    """(glyph mask, glyph + outline mask), both "L" and exactly the size of the word's box."""
    shown = text.upper()
    stroke = max(1, font_size // 14)
    font = _font(font_size)
    if font is not None:
        l, t, r, b = font.getbbox(shown, stroke_width=stroke)
        w, h = r - l, b - t
        full, glyph = Image.new("L", (w, h), 0), Image.new("L", (w, h), 0)
        ImageDraw.Draw(full).text((-l, -t), shown, font=font, fill=255, stroke_width=stroke, stroke_fill=255)
        ImageDraw.Draw(glyph).text((-l, -t), shown, font=font, fill=255, stroke_width=stroke, stroke_fill=0)
        return glyph, full
    # bitmap fallback: Pillow's default bitmap font, scaled up by an integer factor
    from PIL import ImageFilter

    font = ImageFont.load_default()
    l, t, r, b = ImageDraw.Draw(Image.new("L", (1, 1))).textbbox((0, 0), shown, font=font)
    small = Image.new("L", (r - l, b - t), 0)
    ImageDraw.Draw(small).text((-l, -t), shown, font=font, fill=255)
    k = max(1, round(font_size / 11))
    glyph = small.resize((small.width * k, small.height * k), Image.NEAREST)
    pad = Image.new("L", (glyph.width + 2 * stroke, glyph.height + 2 * stroke), 0)
    pad.paste(glyph, (stroke, stroke))
    return pad, pad.filter(ImageFilter.MaxFilter(2 * stroke + 1))


def render(scene: Scene | dict[str, Any]) -> Image.Image:
    """The RGB image of a scene description (a pure function of the description)."""
    scene = _as_scene(scene)
    canvas = _background(scene.background, scene.width, scene.height)
    for o in scene.objects:
        canvas.alpha_composite(_shape_patch(o.kind, o.rgb, o.side), (o.bbox[0], o.bbox[1]))
    if scene.word:
        glyph, full = _word_masks(scene.word, int(scene.word_font_size))
        x0, y0 = scene.word_bbox[0], scene.word_bbox[1]
        canvas.paste(tuple(scene.word_stroke_rgb) + (255,), (x0, y0, x0 + full.width, y0 + full.height), full)
        canvas.paste(tuple(scene.word_rgb) + (255,), (x0, y0, x0 + glyph.width, y0 + glyph.height), glyph)
    return canvas.convert("RGB")


# --------------------------------------------------------------------------------------------
# questions: a query (dict) -> text, and its answer computed from the description alone
# --------------------------------------------------------------------------------------------
def _in_quadrant(centre: Sequence[float], quadrant: str, inset: float, width: int, height: int) -> bool:
    """Centre inside the quadrant shrunk by `inset` px from the midlines (negative: grown)."""
    vert, horiz = quadrant.split()
    x, y = centre
    ok_y = y < height / 2 - inset if vert == "top" else y > height / 2 + inset
    ok_x = x < width / 2 - inset if horiz == "left" else x > width / 2 + inset
    return ok_x and ok_y


def _unique(objs: Iterable[Obj], pred: Callable[[Obj], bool], what: str) -> Obj:
    found = [o for o in objs if pred(o)]
    if len(found) != 1:
        raise AmbiguousQuestion(f"{len(found)} objects match {what}")
    return found[0]


def question_text(query: dict[str, Any]) -> str:
    q, v = query["qtype"], query.get("variant")
    if q == "colour":
        if v == "kind":
            return f"What colour is the {query['kind']}?"
        if v == "size":
            return f"What colour is the {query['size']} {query['kind']}?"
        if v == "place":
            return f"What colour is the shape in the {query['quadrant']}?"
    elif q == "count":
        if v == "kind":
            return f"How many {PLURALS[query['kind']]} are there?"
        if v == "colour":
            return f"How many {query['colour']} shapes are there?"
    elif q == "presence":
        if v == "small":
            return f"Is there a small {query['kind']}?"
        if v == "colour":
            return f"Is there a {query['colour']} {query['kind']}?"
    elif q == "relpos":
        (ca, ka), (cb, kb) = query["a"], query["b"]
        return f"Which is {query['rel']}, the {ca} {ka} or the {cb} {kb}?"
    elif q == "word":
        return "What word is written?"
    raise ValueError(f"unknown query {query!r}")


def answer_query(scene: Scene | dict[str, Any], query: dict[str, Any]) -> str:
    """The answer to `query` read from the scene description; AmbiguousQuestion if there is none."""
    scene = _as_scene(scene)
    objs, q, v = scene.objects, query["qtype"], query.get("variant")
    if q == "colour":
        if v == "kind":
            return _unique(objs, lambda o: o.kind == query["kind"], query["kind"]).colour
        if v == "size":
            return _unique(objs, lambda o: o.kind == query["kind"] and o.size_class == query["size"],
                           f"{query['size']} {query['kind']}").colour
        if v == "place":
            quad = query["quadrant"]
            near = _unique(objs, lambda o: _in_quadrant(o.centre, quad, -PLACE_MARGIN, scene.width, scene.height),
                           f"the {quad} (with margin)")
            if not _in_quadrant(near.centre, quad, PLACE_MARGIN, scene.width, scene.height):
                raise AmbiguousQuestion(f"the object in the {quad} is too close to a midline")
            return near.colour
    elif q == "count":
        if v == "kind":
            n = sum(o.kind == query["kind"] for o in objs)
        elif v == "colour":
            n = sum(o.colour == query["colour"] for o in objs)
        else:
            raise ValueError(f"unknown query {query!r}")
        if n > MAX_COUNT:
            raise AmbiguousQuestion(f"count {n} > {MAX_COUNT}")
        return str(n)
    elif q == "presence":
        if v == "small":
            hit = any(o.kind == query["kind"] and o.size_class == "small" for o in objs)
        elif v == "colour":
            hit = any(o.kind == query["kind"] and o.colour == query["colour"] for o in objs)
        else:
            raise ValueError(f"unknown query {query!r}")
        return "yes" if hit else "no"
    elif q == "relpos":
        a = _unique(objs, lambda o: [o.colour, o.kind] == list(query["a"]), " ".join(query["a"]))
        b = _unique(objs, lambda o: [o.colour, o.kind] == list(query["b"]), " ".join(query["b"]))
        if a.kind == b.kind:
            raise AmbiguousQuestion(f"both named objects are a {a.kind}")
        axis, sign = RELATIONS[query["rel"]]
        d = sign * (a.centre[axis] - b.centre[axis])
        if abs(d) < REL_MIN_SEP:
            raise AmbiguousQuestion(f"centres only {abs(d):.0f} px apart")
        return (a if d > 0 else b).kind
    elif q == "word":
        if not scene.word:
            raise AmbiguousQuestion("no word in the scene")
        return scene.word
    raise ValueError(f"unknown query {query!r}")


# --------------------------------------------------------------------------------------------
# generation
# --------------------------------------------------------------------------------------------
Spec = tuple[str, str, str]  # (kind, colour, size_class)


def _random_background(rng: random.Random) -> dict[str, Any]:
    h, s, v = rng.random(), rng.uniform(0.03, 0.18), rng.uniform(0.62, 0.86)
    base = [int(round(255 * c)) for c in colorsys.hsv_to_rgb(h, s, v)]
    kind = rng.choice(("noise", "stripes", "grid", "speckle"))
    bg: dict[str, Any] = {"type": kind, "base": base, "seed": rng.randrange(2**31), "grain": round(rng.uniform(3, 9), 2)}
    if kind == "noise":
        bg.update(cell=rng.randint(10, 48), amp=round(rng.uniform(8, 18), 2))
    elif kind == "stripes":
        bg.update(angle=rng.randrange(0, 180, 15), period=rng.randint(9, 40), amp=round(rng.uniform(6, 14), 2))
    elif kind == "grid":
        bg.update(period=rng.randint(16, 44), line_width=rng.randint(1, 2), offset=rng.randrange(44),
                  amp=round(rng.uniform(12, 28), 2))
    else:
        bg.update(count=rng.randint(150, 500), amp=round(rng.uniform(15, 35), 2))
    lines = []
    for _ in range(rng.randint(0, 6)):  # faint distractor lines, greyish
        grey = rng.randint(40, 140)
        tint = [max(0, min(255, grey + rng.randint(-15, 15))) for _ in range(3)]
        pts = [rng.randint(-40, IMAGE_SIZE + 40) for _ in range(4)]
        lines.append(pts + tint + [rng.randint(1, 2), round(rng.uniform(0.2, 0.45), 2)])
    bg["lines"] = lines
    return bg


def _fill(rng: random.Random, specs: list[Spec], n: int, forbid: Callable[[str, str, str], bool] | None = None,
          p_small: float = 0.4) -> list[Spec]:
    """Add random objects up to `n`, with (colour, kind) unique in the scene and none `forbid`den."""
    specs = list(specs)
    used = {(k, c) for k, c, _ in specs}
    tries = 0
    while len(specs) < n and tries < 1000:
        tries += 1
        k, c = rng.choice(KINDS), rng.choice(list(COLOURS))
        sz = "small" if rng.random() < p_small else "large"
        if (k, c) in used or (forbid is not None and forbid(k, c, sz)):
            continue
        specs.append((k, c, sz))
        used.add((k, c))
    return specs


def _disjoint(a: Sequence[int], b: Sequence[int], gap: int) -> bool:
    return a[2] + gap <= b[0] or b[2] + gap <= a[0] or a[3] + gap <= b[1] or b[3] + gap <= a[1]


def _build_scene(rng: random.Random, specs: list[Spec], word: bool, tries: int = 20) -> Scene | None:
    """Sizes, non-overlapping positions, background and word for the object specs."""
    specs = list(specs)
    rng.shuffle(specs)
    W = H = IMAGE_SIZE
    for _ in range(tries):
        sides = [rng.randint(*(SMALL_SIDE if sz == "small" else LARGE_SIDE)) for _, _, sz in specs]
        boxes: list[tuple[int, int, int, int]] = []
        word_spec = None
        if word:
            text = rng.choice(WORDS)
            font_size = rng.randint(26, 38)
            glyph, full = _word_masks(text, font_size)
            dark = rng.randint(10, 60)
            word_spec = (text, font_size, full.size, (dark, dark, dark), (238, 238, 238))
        todo = ([("word", word_spec[2])] if word_spec else []) + sorted(
            ((i, (s, s)) for i, s in enumerate(sides)), key=lambda t: -t[1][0])
        placed: dict[Any, tuple[int, int, int, int]] = {}
        ok = True
        for key, (w, h) in todo:
            for _ in range(300):
                x0, y0 = rng.randint(MARGIN, W - MARGIN - w), rng.randint(MARGIN, H - MARGIN - h)
                box = (x0, y0, x0 + w, y0 + h)
                if all(_disjoint(box, other, GAP) for other in boxes):
                    break
            else:
                ok = False
                break
            boxes.append(box)
            placed[key] = box
        if not ok:
            continue
        objects = [Obj.make(k, c, sz, placed[i][0], placed[i][1], sides[i]) for i, (k, c, sz) in enumerate(specs)]
        scene = Scene(W, H, _random_background(rng), objects)
        if word_spec:
            text, font_size, _, rgb, stroke = word_spec
            scene.word, scene.word_bbox, scene.word_font_size = text, placed["word"], font_size
            scene.word_rgb, scene.word_stroke_rgb = rgb, stroke
        return scene
    return None


def _n(rng: random.Random, at_least: int = 0) -> int:
    return max(rng.randint(*N_OBJECTS), at_least)


def _propose(rng: random.Random, qtype: str, want: str | None) -> tuple[Scene, dict[str, Any]] | None:
    """One attempt at a scene and a query of `qtype` (answer `want` for yes/no types; for relpos
    `want` says whether the answer is the first or the second object named)."""
    word = qtype == "word" or rng.random() < 0.35
    colours = list(COLOURS)
    if qtype == "colour":
        r = rng.random()
        k, c = rng.choice(KINDS), rng.choice(colours)
        if r < 0.4:
            query = {"qtype": "colour", "variant": "kind", "kind": k}
            specs = _fill(rng, [(k, c, "small" if rng.random() < 0.4 else "large")], _n(rng),
                          lambda k2, c2, s2: k2 == k)
        elif r < 0.7:
            size = "small" if rng.random() < 0.6 else "large"
            other = "large" if size == "small" else "small"
            c2 = rng.choice([x for x in colours if x != c])
            query = {"qtype": "colour", "variant": "size", "kind": k, "size": size}
            specs = _fill(rng, [(k, c, size), (k, c2, other)], _n(rng), lambda k2, c2_, s2: k2 == k)
        else:
            for _ in range(20):
                scene = _build_scene(rng, _fill(rng, [], _n(rng)), word)
                if scene is None:
                    continue
                quads = list(QUADRANTS)
                rng.shuffle(quads)
                for quad in quads:
                    query = {"qtype": "colour", "variant": "place", "quadrant": quad}
                    try:
                        answer_query(scene, query)
                    except AmbiguousQuestion:
                        continue
                    return scene, query
            return None
    elif qtype == "count":
        t = rng.randint(0, MAX_COUNT)
        if rng.random() < 0.6:
            k = rng.choice(KINDS)
            query = {"qtype": "count", "variant": "kind", "kind": k}
            base = [(k, c, "small" if rng.random() < 0.4 else "large") for c in rng.sample(colours, t)]
            specs = _fill(rng, base, _n(rng, t + 1), lambda k2, c2, s2: k2 == k)
        else:
            c = rng.choice(colours)
            query = {"qtype": "count", "variant": "colour", "colour": c}
            base = [(k, c, "small" if rng.random() < 0.4 else "large") for k in rng.sample(KINDS, t)]
            specs = _fill(rng, base, _n(rng, t + 1), lambda k2, c2, s2: c2 == c)
    elif qtype == "presence":
        k, c = rng.choice(KINDS), rng.choice(colours)
        if rng.random() < 0.6:
            query = {"qtype": "presence", "variant": "small", "kind": k}
            if want == "yes":
                base = [(k, c, "small")]
                if rng.random() < 0.3:
                    base.append((k, rng.choice([x for x in colours if x != c]), "large"))
            else:
                base = [(k, c, "large")] if rng.random() < 0.6 else []  # a near miss: the kind, but large
            specs = _fill(rng, base, _n(rng), lambda k2, c2, s2: k2 == k and s2 == "small")
        else:
            query = {"qtype": "presence", "variant": "colour", "colour": c, "kind": k}
            size = lambda: "small" if rng.random() < 0.4 else "large"  # noqa: E731
            if want == "yes":
                base = [(k, c, size())]
            else:  # near misses: the kind in another colour, the colour on another kind
                base = []
                if rng.random() < 0.6:
                    base.append((k, rng.choice([x for x in colours if x != c]), size()))
                if rng.random() < 0.6:
                    base.append((rng.choice([x for x in KINDS if x != k]), c, size()))
            specs = _fill(rng, base, _n(rng), lambda k2, c2, s2: k2 == k and c2 == c)
    elif qtype == "relpos":
        scene = _build_scene(rng, _fill(rng, [], _n(rng)), word)
        if scene is None:
            return None
        rel = rng.choice(list(RELATIONS))
        axis, sign = RELATIONS[rel]
        pairs = [(win, lose) for win in scene.objects for lose in scene.objects
                 if win.kind != lose.kind and sign * (win.centre[axis] - lose.centre[axis]) >= REL_MIN_SEP]
        if not pairs:
            return None
        win, lose = rng.choice(pairs)
        a, b = (win, lose) if want == "first" else (lose, win)
        query = {"qtype": "relpos", "variant": "x" if axis == 0 else "y", "rel": rel,
                 "a": [a.colour, a.kind], "b": [b.colour, b.kind]}
        return scene, query
    elif qtype == "word":
        query = {"qtype": "word"}
        specs = _fill(rng, [], _n(rng))
    else:
        raise ValueError(f"unknown qtype {qtype!r}; expected one of {QTYPES}")
    scene = _build_scene(rng, specs, word)
    return None if scene is None else (scene, query)


class Item:
    """One benchmark item. `image` is rendered from the scene (or read from `image_path`) on first use."""

    def __init__(self, id: str, seed: int, question: str, answer: str, qtype: str, variant: str | None,
                 query: dict[str, Any], scene: Scene, image_path: str | None = None,
                 image: Image.Image | None = None) -> None:
        self.id, self.seed, self.question, self.answer = id, seed, question, answer
        self.qtype, self.variant, self.query, self.scene = qtype, variant, query, scene
        self.image_path = image_path
        self._image = image

    @property
    def image(self) -> Image.Image:
        if self._image is None:
            if self.image_path is not None:
                with Image.open(self.image_path) as im:
                    self._image = im.convert("RGB")
            else:
                self._image = render(self.scene)
        return self._image

    @property
    def objects(self) -> list[Obj]:
        return self.scene.objects

    def to_dict(self) -> dict[str, Any]:
        """The JSON row (without the image)."""
        return {"id": self.id, "seed": self.seed, "question": self.question, "answer": self.answer,
                "qtype": self.qtype, "variant": self.variant, "query": self.query, "scene": self.scene.to_dict()}

    def __repr__(self) -> str:
        return f"Item({self.id!r}, {self.question!r} -> {self.answer!r}, {len(self.scene.objects)} objects)"


def qtype_of(seed: int) -> str:
    """Question types cycle with the seed, so any run of consecutive seeds is balanced."""
    return QTYPES[seed % len(QTYPES)]


def make_item(seed: int, qtype: str | None = None) -> Item:
    """The item of `seed` (deterministic). Yes/no answers, and whether the answer of a relative
    position question is the first or the second object it names, alternate with seed // len(QTYPES)."""
    seed = int(seed)
    qtype = qtype or qtype_of(seed)
    turn = (seed // len(QTYPES)) % 2
    want = YES_NO[turn] if qtype in YES_NO_QTYPES else ORDER[turn] if qtype == "relpos" else None
    rng = random.Random(seed * 1_000_003 + QTYPES.index(qtype) if qtype in QTYPES else seed)
    for _ in range(200):
        got = _propose(rng, qtype, want)
        if got is None:
            continue
        scene, query = got
        try:
            answer = answer_query(scene, query)
        except AmbiguousQuestion:
            continue
        if qtype in YES_NO_QTYPES and answer != want:
            continue
        return Item(f"shapes-{seed}", seed, question_text(query), answer, qtype, query.get("variant"), query, scene)
    raise RuntimeError(f"could not generate a {qtype} item for seed {seed}")  # pragma: no cover


# --------------------------------------------------------------------------------------------
# splits, files, scoring
# --------------------------------------------------------------------------------------------
def _split_name(split: str) -> str:
    split = SPLIT_ALIASES.get(split, split)
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {tuple(SPLITS)} (or 'val')")
    return split


def split_seeds(split: str, n: int, start: int = 0) -> range:
    """Seeds of items start .. start + n - 1 of a split; the splits' ranges are disjoint."""
    split = _split_name(split)
    if n < 0 or start < 0 or start + n > SPLIT_SIZE:
        raise ValueError(f"a split holds items 0 .. {SPLIT_SIZE - 1}")
    base = SPLITS[split] + start
    return range(base, base + n)


def _render_row(args: tuple[str, int, int]) -> tuple[dict[str, Any], bytes]:
    import io

    split, index, seed = args
    item = make_item(seed)
    row = item.to_dict()
    row["id"] = f"{split}-{index:06d}"
    row = {"id": row["id"], "split": split, "image": f"images/{row['id']}.png", **{k: v for k, v in row.items() if k != "id"}}
    buf = io.BytesIO()
    item.image.save(buf, format="PNG")
    return row, buf.getvalue()


def write_split(directory: str | Path, split: str, n: int, *, start: int = 0, workers: int = 1) -> Path:
    """Write `directory/items.jsonl` (one JSON row per item: id, split, image, question, answer,
    qtype, variant, query, seed, scene) and `directory/images/<id>.png`; returns the JSONL path."""
    split = _split_name(split)
    directory = Path(directory)
    (directory / "images").mkdir(parents=True, exist_ok=True)
    jobs = [(split, start + i, seed) for i, seed in enumerate(split_seeds(split, n, start))]
    if workers > 1:
        import multiprocessing as mp

        with mp.get_context("spawn").Pool(workers) as pool:
            results: Iterable = list(pool.imap(_render_row, jobs, chunksize=16))
    else:
        results = map(_render_row, jobs)
    path = directory / "items.jsonl"
    with open(path, "w") as f:
        for row, png in results:
            (directory / row["image"]).write_bytes(png)
            f.write(json.dumps(row, sort_keys=False) + "\n")
    return path


def load_split(directory: str | Path) -> list[Item]:
    """Items written by `write_split` (`directory` or its items.jsonl); images load on first use."""
    path = Path(directory)
    if path.is_dir():
        path = path / "items.jsonl"
    items = []
    for line in path.read_text().splitlines():
        if not line.strip():
            continue
        row = json.loads(line)
        items.append(Item(row["id"], row["seed"], row["question"], row["answer"], row["qtype"], row.get("variant"),
                          row.get("query", {}), Scene.from_dict(row["scene"]), str(path.parent / row["image"])))
    return items


_NUMBER_WORDS = {w: str(i) for i, w in enumerate(
    "zero one two three four five six seven eight nine ten".split())}
_NUMBER_WORDS["none"] = "0"


def normalize(text: Any) -> str:
    """Lower case, single spaces, no surrounding quotes or trailing punctuation, no leading
    article, number words as digits."""
    s = str(text).strip().lower()
    s = re.sub(r"\s+", " ", s)
    prev = None
    while s != prev:
        prev = s
        s = s.strip().strip("\"'`").strip()
        s = re.sub(r"[.!?,;:]+$", "", s)
    s = re.sub(r"^(a|an|the) ", "", s)
    return " ".join(_NUMBER_WORDS.get(w, w) for w in s.split(" ")) if s else s


def score(pred: Any, answer: Any) -> bool:
    """Normalised exact match."""
    return normalize(pred) == normalize(answer)


# --------------------------------------------------------------------------------------------
# examples and CLI
# --------------------------------------------------------------------------------------------
def _first_test_item(pred: Callable[[Item], bool], qtype: str, limit: int = 2000) -> Item:
    for seed in split_seeds("test", limit):
        if qtype_of(seed) != qtype:
            continue
        item = make_item(seed)
        if pred(item):
            return item
    raise LookupError(f"no test item of type {qtype} matches")  # pragma: no cover


def example_items() -> list[Item]:
    """Four test items for the docs: a count with a small counted object, a small-object presence
    (yes), a relative position between a small and a large object, and a word."""
    small = lambda it, k: any(o.kind == k and o.size_class == "small" for o in it.scene.objects)  # noqa: E731
    return [
        _first_test_item(lambda it: it.variant == "kind" and small(it, it.query["kind"]) and it.answer in ("2", "3", "4"), "count"),
        _first_test_item(lambda it: it.variant == "small" and it.answer == "yes"
                         and any(o.size_class == "large" and o.kind == it.query["kind"] for o in it.scene.objects),
                         "presence"),
        _first_test_item(lambda it: {o.size_class for o in it.scene.objects
                                     if [o.colour, o.kind] in (it.query["a"], it.query["b"])} == {"small", "large"},
                         "relpos"),
        _first_test_item(lambda it: it.scene.background["type"] in ("stripes", "grid"), "word"),
    ]


def example_grid(path: str | Path | None = None, items: Sequence[Item] | None = None, cols: int = 2) -> Image.Image:
    """A grid of example images captioned with their question and answer (saved to `path`)."""
    items = list(items) if items is not None else example_items()
    pad, cap = 10, 44
    tile_w, tile_h = IMAGE_SIZE, IMAGE_SIZE + cap
    rows = math.ceil(len(items) / cols)
    grid = Image.new("RGB", (cols * tile_w + (cols + 1) * pad, rows * tile_h + (rows + 1) * pad), (255, 255, 255))
    draw = ImageDraw.Draw(grid)
    font = _font(15) or ImageFont.load_default()
    for i, item in enumerate(items):
        x = pad + (i % cols) * (tile_w + pad)
        y = pad + (i // cols) * (tile_h + pad)
        grid.paste(item.image, (x, y))
        draw.text((x + 2, y + IMAGE_SIZE + 4), f"Q: {item.question}", fill=(0, 0, 0), font=font)
        draw.text((x + 2, y + IMAGE_SIZE + 23), f"A: {item.answer}    [{item.qtype}/{item.variant or '-'}]",
                  fill=(0, 0, 150), font=font)
    if path is not None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        grid.save(path)
    return grid


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m vlmprune.eval.shapes", description=__doc__.split("\n\n")[0])
    parser.add_argument("--split", default="test", help="train | validation (val) | test")
    parser.add_argument("--n", type=int, default=200, help="number of items")
    parser.add_argument("--start", type=int, default=0, help="index of the first item in the split")
    parser.add_argument("--out", help="output directory (items.jsonl + images/)")
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--grid", help="also save the docs' example grid PNG here")
    args = parser.parse_args(argv)
    if not args.out and not args.grid:
        parser.error("give --out DIR and/or --grid PNG")
    if args.out:
        path = write_split(args.out, args.split, args.n, start=args.start, workers=args.workers)
        print(f"wrote {args.n} {_split_name(args.split)} items to {path}")
    if args.grid:
        example_grid(args.grid)
        print(f"wrote {args.grid}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
