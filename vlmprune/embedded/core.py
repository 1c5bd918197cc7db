"""The shared core of the embedded models' trainer (`python -m vlmprune.embedded.train`).

What every family uses: the special ids and image geometry, model sizes (`Arch`), the word-level
tokenizer, stage-1 targets from the scene description (`LabelSpace`), items rendered by forked
workers into shared memory (`Renderer`, `TrainStream`, `EvalSet`), the frozen tower's feature
cache, LR schedules, the per-token stage-1 heads (`DenseHeads`), what a family must provide
(`Family`), the grounding probe on the decoder's attention (`AttentionProbe`), stage 1, saving and
the throughput bench. The families are `llava.py` and `qwen2_vl.py`; `train.py` runs them.
"""

from __future__ import annotations

import contextlib
import json
import math
import mmap
import multiprocessing as mp
import time
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

# ids 0..4 in every family's tokenizer: <pad>, <s>, </s>, <unk>, then the family's image token
PAD_ID, BOS_ID, EOS_ID, UNK_ID, IMAGE_ID = range(5)
IMAGE_SIZE = 336
PATCH_SIZE = 14
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def log(*parts: Any) -> None:
    print(*parts, flush=True)


def shapes_module():
    from vlmprune.eval import shapes

    return shapes


# --------------------------------------------------------------------------------------------
# architecture
# --------------------------------------------------------------------------------------------
@dataclass
class Arch:
    """Model sizes. The default fits in ~14 MB of fp16 safetensors."""

    vision_hidden: int = 256
    vision_layers: int = 6
    vision_heads: int = 4
    vision_intermediate: int = 768
    text_hidden: int = 256
    text_layers: int = 4
    text_heads: int = 4
    text_kv_heads: int = 4
    text_intermediate: int = 640


QUICK_ARCH = Arch(
    vision_hidden=64,
    vision_layers=2,
    vision_heads=2,
    vision_intermediate=128,
    text_hidden=64,
    text_layers=2,
    text_heads=2,
    text_kv_heads=2,
    text_intermediate=128,
)


def greedy_generation(model):
    """Set the generation config the trainer's models ship with: our special ids, greedy, 8 tokens."""
    gc = model.generation_config
    gc.pad_token_id, gc.bos_token_id, gc.eos_token_id = PAD_ID, BOS_ID, EOS_ID
    gc.do_sample, gc.max_new_tokens = False, 8
    return model


def n_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


# --------------------------------------------------------------------------------------------
# tokenizer and processor
# --------------------------------------------------------------------------------------------
def _pre_tokenizer():
    from tokenizers import Regex, pre_tokenizers

    # words, numbers and single punctuation marks
    return pre_tokenizers.Sequence(
        [
            pre_tokenizers.WhitespaceSplit(),
            pre_tokenizers.Split(Regex(r"[^\w\s]"), behavior="isolated"),
        ]
    )


def text_words(texts: Iterable[str], specials: Sequence[str]) -> set[str]:
    """The word-level pieces of `texts` as the tokenizer will cut them (lower-cased), `specials` left out."""
    pre = _pre_tokenizer()
    words: set[str] = set()
    for text in texts:
        for special in specials:
            text = text.replace(special, " ")
        words.update(w for w, _ in pre.pre_tokenize_str(text.lower()))
    return words


def build_tokenizer(texts: Iterable[str], answers: Iterable[str], family: Family):
    """A word-level `PreTrainedTokenizerFast`: the family's special tokens, then every word of `texts`
    and of its prompt format; each answer is one token (an answer of several pieces becomes an added
    token). Lower-cases its input; prepends <s> if the family does (LLaVA)."""
    from tokenizers import (
        AddedToken,
        Tokenizer,
        decoders,
        models,
        normalizers,
        processors,
    )
    from transformers import PreTrainedTokenizerFast

    answers = sorted({a.strip().lower() for a in answers})
    words = text_words(
        list(texts) + [family.prompt.format(question="")] + answers,
        family.special_tokens,
    )
    pre = _pre_tokenizer()
    multi = [a for a in answers if len(pre.pre_tokenize_str(a)) != 1]
    vocab = {t: i for i, t in enumerate(family.special_tokens)}
    for w in sorted(words):
        vocab.setdefault(w, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=True)
    tok.add_special_tokens(
        [AddedToken(t, special=True, normalized=False) for t in family.special_tokens]
    )
    if multi:
        tok.add_tokens(
            [AddedToken(a, single_word=True, normalized=True) for a in multi]
        )
    if family.bos:
        tok.post_processor = processors.TemplateProcessing(
            single="<s> $A", pair="<s> $A $B", special_tokens=[("<s>", BOS_ID)]
        )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
        padding_side="left",
        model_max_length=1024,
        extra_special_tokens=dict(family.extra_special_tokens),
    )


def prompt_ids(tokenizer, question: str, family: Family) -> list[int]:
    """Token ids of the family's prompt with the image placeholder
    expanded to its visual tokens (what the processor gives for one 336 px image: 576 for LLaVA)."""
    ids = tokenizer(family.prompt.format(question=question))["input_ids"]
    at = ids.index(IMAGE_ID)
    return ids[:at] + [IMAGE_ID] * family.n_visual + ids[at + 1 :]


def answer_ids(tokenizer, answer: str) -> list[int]:
    return tokenizer(answer, add_special_tokens=False)["input_ids"] + [EOS_ID]


# --------------------------------------------------------------------------------------------
# stage-1 targets from the scene description
# --------------------------------------------------------------------------------------------
GRID = IMAGE_SIZE // PATCH_SIZE  # 24
_PATCH_CENTRES = np.arange(GRID) * PATCH_SIZE + PATCH_SIZE / 2
DENSE_ROWS = (
    7  # LabelSpace.dense: kind, colour, word, centre, relevant, object x, object y
)
WHERE_WEIGHT = (
    2.0  # stage-1 weight of the object-position regression (an MSE on 0..1 coordinates)
)


class LabelSpace:
    """Scene targets of the benchmark, a fixed space built from its vocabulary.

    - `cls(scene)`: binary attributes for the CLS token: colours, kinds, colour-kind pairs, small /
      large kinds, counts per kind and per colour as "at least n" thresholds, the word (and whether
      there is one), the colours and kinds whose centre lies in each quadrant;
    - `dense(scene)`: four class maps over the 24 x 24 patch grid (a patch takes the label of the
      object box or word box that contains its centre): `kind` (background, 5 large kinds, 5 small
      kinds, text), `colour` (background, 6 colours), `word` (none, 24 words) and `centre`
      (none, or the kind of an object whose centre is in the patch)."""

    def __init__(self, shapes: Any):
        self.colours = list(shapes.COLOURS)
        self.kinds = list(shapes.KINDS)
        self.words = list(shapes.WORDS)
        self.quadrants = list(
            getattr(
                shapes,
                "QUADRANTS",
                ("top left", "top right", "bottom left", "bottom right"),
            )
        )
        self.max_count = 5
        names = [f"colour:{c}" for c in self.colours] + [
            f"kind:{k}" for k in self.kinds
        ]
        names += [f"obj:{c} {k}" for c in self.colours for k in self.kinds]
        names += [f"{size}:{k}" for size in ("small", "large") for k in self.kinds]
        names += [
            f"n:{k}>={n}" for k in self.kinds for n in range(1, self.max_count + 1)
        ]
        names += [
            f"n:{c}>={n}" for c in self.colours for n in range(1, self.max_count + 1)
        ]
        names += ["word"] + [f"word:{w}" for w in self.words]
        names += [
            f"quad:{q}:{x}" for q in self.quadrants for x in self.colours + self.kinds
        ]
        self.names = names
        self.index = {n: i for i, n in enumerate(names)}
        self.dense_classes = {
            "kind": 2 + 2 * len(self.kinds),
            "colour": 1 + len(self.colours),
            "word": 1 + len(self.words),
            "centre": 1 + len(self.kinds),
        }

    def __len__(self) -> int:
        return len(self.names)

    def _quadrant(self, centre: Sequence[float], width: int, height: int) -> str:
        return f"{'top' if centre[1] < height / 2 else 'bottom'} {'left' if centre[0] < width / 2 else 'right'}"

    def cls(self, scene: Any) -> np.ndarray:
        on: set[str] = set()
        kinds: dict[str, int] = {}
        colours: dict[str, int] = {}
        for o in scene.objects:
            on.update(
                (
                    f"colour:{o.colour}",
                    f"kind:{o.kind}",
                    f"obj:{o.colour} {o.kind}",
                    f"{o.size_class}:{o.kind}",
                )
            )
            kinds[o.kind] = kinds.get(o.kind, 0) + 1
            colours[o.colour] = colours.get(o.colour, 0) + 1
            q = self._quadrant(o.centre, scene.width, scene.height)
            on.update((f"quad:{q}:{o.colour}", f"quad:{q}:{o.kind}"))
        for x, n in list(kinds.items()) + list(colours.items()):
            on.update(f"n:{x}>={i}" for i in range(1, min(n, self.max_count) + 1))
        if scene.word:
            on.update(("word", f"word:{scene.word}"))
        out = np.zeros(len(self.names), np.uint8)
        out[[self.index[n] for n in on if n in self.index]] = 1
        return out

    def dense(self, item: Any) -> np.ndarray:
        """[DENSE_ROWS, 576]: the four class maps, the item's relevance mask (`relevant`), then the
        x and y of the centre of the object under each patch (the patch's own centre on background),
        scaled to 0..255, so that attention averaged over an object reads out where it is."""
        scene = item.scene
        out = np.zeros(
            (DENSE_ROWS, GRID, GRID), np.uint8
        )  # kind, colour, word, centre, relevant, x, y
        out[5] = np.round(_PATCH_CENTRES / scene.width * 255)[None, :]
        out[6] = np.round(_PATCH_CENTRES / scene.height * 255)[:, None]
        nk = len(self.kinds)
        for o in scene.objects:
            m = cover(o.bbox)
            k = self.kinds.index(o.kind)
            out[0][m] = 1 + k + (nk if o.size_class == "small" else 0)
            out[1][m] = 1 + self.colours.index(o.colour)
            cx, cy = o.centre
            out[5][m] = round(min(max(cx / scene.width, 0.0), 1.0) * 255)
            out[6][m] = round(min(max(cy / scene.height, 0.0), 1.0) * 255)
            out[
                3,
                min(int(cy // PATCH_SIZE), GRID - 1),
                min(int(cx // PATCH_SIZE), GRID - 1),
            ] = 1 + k
        if scene.word and scene.word_bbox is not None:
            m = cover(scene.word_bbox)
            out[0][m] = 1 + 2 * nk
            out[2][m] = (
                1 + self.words.index(scene.word) if scene.word in self.words else 0
            )
        for box in self.relevant(item):
            out[4][cover(box)] = 1
        return out.reshape(DENSE_ROWS, GRID * GRID)

    def relevant(self, item: Any) -> list[Sequence[int]]:
        """Boxes of what the question is about, read from the query and the scene: the object(s) it
        names (the quadrant's objects for "the shape in the top left", every counted object, the
        word; for "which is further left, A or B?" the one that is the answer, so that attention
        learns to pick the extreme of the two). Empty when there is nothing to look at (a count of
        0, a presence question with no object of the kind)."""
        q, scene = getattr(item, "query", None) or {}, item.scene
        qtype, variant = q.get("qtype"), q.get("variant")
        objs = scene.objects
        if qtype == "word":
            return [scene.word_bbox] if scene.word_bbox is not None else []
        if qtype == "relpos":
            sel = [
                o
                for o in objs
                if [o.colour, o.kind] in (list(q.get("a", ())), list(q.get("b", ())))
                and o.kind == item.answer
            ]
        elif qtype == "colour" and variant == "place":
            quad = q.get("quadrant")
            sel = [
                o
                for o in objs
                if self._quadrant(o.centre, scene.width, scene.height) == quad
            ]
        elif qtype == "colour" and variant == "size":
            sel = [
                o
                for o in objs
                if o.kind == q.get("kind") and o.size_class == q.get("size")
            ]
        elif qtype in ("colour", "count") and variant == "kind":
            sel = [o for o in objs if o.kind == q.get("kind")]
        elif qtype == "count" and variant == "colour":
            sel = [o for o in objs if o.colour == q.get("colour")]
        elif qtype == "presence" and variant == "colour":
            sel = [
                o
                for o in objs
                if o.kind == q.get("kind") and o.colour == q.get("colour")
            ]
            sel = sel or [o for o in objs if o.kind == q.get("kind")]
        elif qtype == "presence":
            sel = [o for o in objs if o.kind == q.get("kind")]
        else:
            sel = []
        return [o.bbox for o in sel]


def cover(box: Sequence[int]) -> np.ndarray:
    """[24, 24] bool: the patches whose centre lies in `box` (x0, y0, x1, y1; x1 / y1 exclusive)."""
    x0, y0, x1, y1 = box
    rows = (_PATCH_CENTRES >= y0) & (_PATCH_CENTRES < y1)
    cols = (_PATCH_CENTRES >= x0) & (_PATCH_CENTRES < x1)
    return rows[:, None] & cols[None, :]


# --------------------------------------------------------------------------------------------
# data: items rendered by forked workers into shared memory
# --------------------------------------------------------------------------------------------
_BUF: dict[
    str, np.ndarray
] = {}  # images [N, H, W, 3], cls [N, L], dense [N, DENSE_ROWS, 576]; uint8, shared maps
_SPACE: LabelSpace | None = None


def _shared(shape: tuple[int, ...]) -> np.ndarray:
    """A uint8 array in an anonymous shared mapping (inherited, writable, by forked workers)."""
    n = int(np.prod(shape))
    return np.frombuffer(mmap.mmap(-1, max(1, n)), dtype=np.uint8, count=n).reshape(
        shape
    )


def _worker_init() -> None:
    torch.set_num_threads(1)


def _render(job: tuple[int, list[int]]) -> list[tuple[str, str, str]]:
    """Render the items of `seeds` into rows offset.. of the shared buffers; return their text."""
    offset, seeds = job
    shapes = shapes_module()
    out = []
    for i, seed in enumerate(seeds):
        item = shapes.make_item(seed)
        image = item.image.convert("RGB")
        if image.size != (IMAGE_SIZE, IMAGE_SIZE):
            image = image.resize((IMAGE_SIZE, IMAGE_SIZE), 3)
        _BUF["images"][offset + i] = np.asarray(image)
        _BUF["cls"][offset + i] = _SPACE.cls(item.scene)
        _BUF["dense"][offset + i] = _SPACE.dense(item)
        out.append((item.question, str(item.answer), str(item.qtype)))
    return out


class Renderer:
    """Forked worker processes that render items into shared buffers of `total` rows."""

    def __init__(self, space: LabelSpace, total: int, workers: int):
        global _SPACE
        _SPACE = space
        _BUF["images"] = _shared((total, IMAGE_SIZE, IMAGE_SIZE, 3))
        _BUF["cls"] = _shared((total, len(space)))
        _BUF["dense"] = _shared((total, DENSE_ROWS, GRID * GRID))
        self.images = torch.from_numpy(_BUF["images"])
        self.cls = torch.from_numpy(_BUF["cls"])
        self.dense = torch.from_numpy(_BUF["dense"])
        self.pool = None
        if workers > 1 and "fork" in mp.get_all_start_methods():
            self.pool = mp.get_context("fork").Pool(workers, initializer=_worker_init)

    def submit(self, offset: int, seeds: list[int]) -> Any:
        if self.pool is None:

            class Done:  # runs now, in this process
                def __init__(self, value):
                    self.value = value

                def ready(self):
                    return True

                def get(self):
                    return self.value

            return Done(_render((offset, seeds)))
        return self.pool.apply_async(_render, ((offset, seeds),))

    def close(self) -> None:
        if self.pool is not None:
            self.pool.terminate()
            self.pool.join()
            self.pool = None


@dataclass
class PoolItem:
    """An evaluation item rebuilt from the shared buffer (the generator's image, bit for bit)."""

    image: Any
    question: str
    answer: str
    qtype: str
    seed: int


class EvalSet:
    """Validation / test items rendered in the background; `items()` waits for them."""

    def __init__(
        self, renderer: Renderer, offset: int, seeds: Sequence[int], chunk: int
    ):
        self.renderer, self.offset, self.seeds = renderer, offset, list(seeds)
        self.jobs = [
            renderer.submit(offset + i, self.seeds[i : i + chunk])
            for i in range(0, len(self.seeds), chunk)
        ]
        self._items: list[PoolItem] | None = None

    def items(self) -> list[PoolItem]:
        if self._items is None:
            from PIL import Image

            rows = [row for job in self.jobs for row in job.get()]
            images = self.renderer.images
            self._items = [
                PoolItem(
                    Image.fromarray(images[self.offset + i].numpy().copy(), "RGB"),
                    q,
                    a,
                    t,
                    int(self.seeds[i]),
                )
                for i, (q, a, t) in enumerate(rows)
            ]
        return self._items


class TrainStream:
    """The training pool: grows in the background while training runs.

    Workers render chunks of training seeds, in order, into the shared buffers; each finished chunk
    is tokenised here and (on CUDA) copied to GPU-resident tensors on a side stream; `ready` counts
    the items usable for sampling (a prefix). No item is ever overwritten; rendering stops at
    `capacity` items."""

    def __init__(
        self,
        renderer: Renderer,
        base: int,
        seeds: Sequence[int],
        tokenizer,
        width: int,
        device: torch.device,
        chunk: int,
        inflight: int,
        qtype_weight: dict[str, float] | None = None,
        *,
        family: Family,
    ):
        self.r, self.base, self.seeds, self.tok = renderer, base, list(seeds), tokenizer
        self.family = family
        self.qtype_weight = qtype_weight or {}
        self.weight = torch.ones(
            len(self.seeds)
        )  # sampling weight of each item (by question type)
        self.capacity, self.width, self.device, self.chunk, self.inflight = (
            len(self.seeds),
            width,
            device,
            chunk,
            inflight,
        )
        cuda = device.type == "cuda"
        n = self.capacity
        sl = slice(base, base + n)
        self.images = (
            torch.empty(
                (n, IMAGE_SIZE, IMAGE_SIZE, 3), dtype=torch.uint8, device=device
            )
            if cuda
            else renderer.images[sl]
        )
        self.cls = (
            torch.empty((n, renderer.cls.shape[1]), dtype=torch.uint8, device=device)
            if cuda
            else renderer.cls[sl]
        )
        self.dense = (
            torch.empty((n, DENSE_ROWS, GRID * GRID), dtype=torch.uint8, device=device)
            if cuda
            else renderer.dense[sl]
        )
        self.ids = torch.full((n, width), PAD_ID, dtype=torch.long, device=device)
        self.answer_mask = torch.zeros((n, width), dtype=torch.bool, device=device)
        self.starts = torch.zeros(
            n, dtype=torch.long
        )  # first non-pad column of each row (CPU)
        self.questions: list[str] = []
        self.answers: list[str] = []
        self.qtypes: list[str] = []
        self.ready = 0
        self.submitted = 0
        self.pending: list[tuple[int, int, Any]] = []
        self.copying: list[tuple[int, int, Any]] = []
        self.stream = torch.cuda.Stream(device) if cuda else None
        self.t0 = time.perf_counter()

    def _encode(
        self, rows: list[tuple[str, str, str]]
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        ids = torch.full((len(rows), self.width), PAD_ID, dtype=torch.long)
        mask = torch.zeros((len(rows), self.width), dtype=torch.bool)
        starts = torch.zeros(len(rows), dtype=torch.long)
        for i, (q, a, _) in enumerate(rows):
            p, t = prompt_ids(self.tok, q, self.family), answer_ids(self.tok, a)
            if len(p) + len(t) > self.width:
                raise ValueError(
                    f"question too long for the row width {self.width}: {q!r}"
                )
            start = self.width - len(p) - len(t)
            ids[i, start:] = torch.tensor(p + t)
            mask[i, start + len(p) :] = True
            starts[i] = start
        return ids, mask, starts

    def pump(self, at_least: int = 0) -> int:
        """Submit more chunks, take in finished ones; block until `ready >= at_least`."""
        while True:
            while (
                self.submitted < self.capacity
                and len(self.pending) + len(self.copying) < self.inflight
            ):
                n = min(self.chunk, self.capacity - self.submitted)
                off = self.submitted
                self.pending.append(
                    (off, n, self.r.submit(self.base + off, self.seeds[off : off + n]))
                )
                self.submitted += n
            while self.pending and self.pending[0][2].ready():
                off, n, job = self.pending.pop(0)
                rows = job.get()
                ids, mask, starts = self._encode(rows)
                self.questions += [r[0] for r in rows]
                self.answers += [r[1] for r in rows]
                self.qtypes += [r[2] for r in rows]
                self.weight[off : off + n] = torch.tensor(
                    [self.qtype_weight.get(r[2], 1.0) for r in rows]
                )
                self.starts[off : off + n] = starts
                src = slice(self.base + off, self.base + off + n)
                if self.stream is not None:
                    with torch.cuda.stream(self.stream):
                        self.images[off : off + n].copy_(
                            self.r.images[src], non_blocking=True
                        )
                        self.cls[off : off + n].copy_(
                            self.r.cls[src], non_blocking=True
                        )
                        self.dense[off : off + n].copy_(
                            self.r.dense[src], non_blocking=True
                        )
                        self.ids[off : off + n].copy_(ids, non_blocking=True)
                        self.answer_mask[off : off + n].copy_(mask, non_blocking=True)
                        event = torch.cuda.Event()
                        event.record(self.stream)
                    self.copying.append((off, n, (event, ids, mask)))
                else:
                    self.ids[off : off + n] = ids
                    self.answer_mask[off : off + n] = mask
                    self.copying.append((off, n, None))
            while self.copying and (
                self.copying[0][2] is None or self.copying[0][2][0].query()
            ):
                off, n, _ = self.copying.pop(0)
                self.ready = off + n
                if self.ready == self.capacity:
                    log(
                        f"[data] training pool complete: {self.capacity} items in {time.perf_counter() - self.t0:.1f}s"
                    )
            if self.ready >= min(at_least, self.capacity):
                return self.ready
            time.sleep(0.01)

    def sample(self, n: int, gen: torch.Generator) -> torch.Tensor:
        """`n` random indices (CPU) among the ready items, drawn by `qtype_weight` (uniform if none)."""
        if not self.qtype_weight:
            return torch.randint(0, self.ready, (n,), generator=gen)
        return torch.multinomial(
            self.weight[: self.ready], n, replacement=True, generator=gen
        )


class FeatureCache:
    """Stage 2 with the tower frozen: each pool item's `Family.frozen_features`, computed the first
    time a batch draws the item and kept on the device, so the frozen tower runs once per item
    instead of once per sample (it is a fifth to a quarter of a stage-2 step). Stored in the
    autocast dtype (bf16 on CUDA), which is what the projector's first linear layer reads anyway."""

    def __init__(self, capacity: int, compute, device: torch.device, chunk: int = 512):
        self.capacity, self.compute, self.device, self.chunk = (
            capacity,
            compute,
            device,
            chunk,
        )
        self.dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
        self.have = torch.zeros(
            capacity, dtype=torch.bool
        )  # CPU: which items are stored
        self.store: torch.Tensor | None = None
        self.computed = 0

    def get(self, idx: torch.Tensor) -> torch.Tensor:
        """Features of the items `idx` (CPU LongTensor), computing the missing ones first."""
        miss = torch.unique(idx[~self.have[idx]])
        for start in range(0, len(miss), self.chunk):
            part = miss[start : start + self.chunk]
            feats = self.compute(part.to(self.device))
            if self.store is None:
                self.store = torch.empty(
                    (self.capacity, *feats.shape[1:]),
                    dtype=self.dtype,
                    device=self.device,
                )
            self.store[part.to(self.device)] = feats.to(self.dtype)
            self.have[part] = True
            self.computed += len(part)
        return self.store[idx.to(self.device)]


def compile_layers(layers: Iterable[nn.Module]) -> None:
    """torch.compile each module in place (regional compilation: the decoder layers' RMSNorm, RoPE
    and MLP element-wise chains fuse; the grounding probe's hooks are traced with them)."""
    for layer in layers:
        layer.compile()


def uncompile_layers(layers: Iterable[nn.Module]) -> None:
    """Undo `compile_layers` (the eager fallback when compilation fails)."""
    import torch._dynamo

    for layer in layers:
        layer._compiled_call_impl = None
    torch._dynamo.reset()


def eager(compiled: bool):
    """Run compiled modules eagerly inside the block (evaluation: generate()'s shapes would recompile)."""
    return (
        torch.compiler.set_stance("force_eager")
        if compiled
        else contextlib.nullcontext()
    )


# --------------------------------------------------------------------------------------------
# training
# --------------------------------------------------------------------------------------------
def lr_at(
    progress: float, step: int, base: float, warmup: int, floor: float = 0.05
) -> float:
    """Linear warm-up over `warmup` steps, then cosine from `base` to `floor * base` over progress."""
    if step < warmup:
        return base * (step + 1) / warmup
    p = min(max(progress, 0.0), 1.0)
    return base * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * p)))


def param_groups(
    named: Iterable[tuple[str, nn.Parameter]], lr: float, wd: float
) -> list[dict]:
    decay, no_decay = [], []
    for name, p in named:
        if not p.requires_grad:
            continue
        (no_decay if p.ndim < 2 or "embed" in name or "norm" in name else decay).append(
            p
        )
    return [
        {"params": decay, "weight_decay": wd, "lr": lr, "base_lr": lr},
        {"params": no_decay, "weight_decay": 0.0, "lr": lr, "base_lr": lr},
    ]


def make_optimizer(groups: list[dict], device: torch.device) -> torch.optim.Optimizer:
    kwargs = {"betas": (0.9, 0.98), "eps": 1e-8}
    if device.type == "cuda":
        kwargs["fused"] = True
    return torch.optim.AdamW(groups, **kwargs)


def parse_weights(text: str) -> dict[str, float]:
    """'relpos=2,count=1.5' -> {'relpos': 2.0, 'count': 1.5}; names must be question types."""
    out = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        name, _, value = part.partition("=")
        if name not in shapes_module().QTYPES or not value:
            raise SystemExit(
                f"--qtype-weight: bad entry {part!r}; expected TYPE=WEIGHT with TYPE one of "
                f"{', '.join(shapes_module().QTYPES)}"
            )
        out[name] = float(value)
    return out


def set_lr(opt: torch.optim.Optimizer, factor: float) -> None:
    for g in opt.param_groups:
        g["lr"] = g["base_lr"] * factor


class DenseHeads(nn.Module):
    """Per-token stage-1 heads (thrown away after training): LayerNorm, then one linear per class map
    of `LabelSpace.dense` (kind / colour / word / centre, cross-entropy) and for the token's own row
    and column on its `side` x `side` grid (cross-entropy), so the tokens carry what and where; and a
    linear regression of the x, y of the object under the token (MSE), so that a head attending to an
    object reads its position as a number that a later layer can compare. Token i sits at grid cell
    `cells[i]` (raster order by default)."""

    def __init__(
        self,
        space: LabelSpace,
        dim: int,
        side: int = GRID,
        cells: torch.Tensor | None = None,
    ):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.maps = nn.ModuleDict(
            {k: nn.Linear(dim, n) for k, n in space.dense_classes.items()}
        )
        self.order = list(space.dense_classes)  # row order of LabelSpace.dense
        self.position = nn.Linear(dim, 2 * side)  # each token's own row and column
        self.where = nn.Linear(
            dim, 2
        )  # x, y of the object under the token (linear, for comparisons)
        self.side = side
        cells = torch.arange(side * side) if cells is None else cells
        self.register_buffer("rows", cells // side, persistent=False)
        self.register_buffer("cols", cells % side, persistent=False)

    def loss(
        self, tokens: torch.Tensor, classes: Sequence[torch.Tensor], where: torch.Tensor
    ) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """tokens [B, N, D]; `classes`, one per class map: [B, N] class indices or [B, N, C] class
        probabilities; where [B, N, 2] in 0..1 -> ({map or "position": cross-entropy}, MSE)."""
        x = self.norm(tokens)
        ce = {}
        for name, target in zip(self.order, classes):
            logits = self.maps[name](x).float()
            c = logits.shape[-1]
            ce[name] = F.cross_entropy(
                logits.reshape(-1, c),
                target.reshape(-1, c)
                if target.is_floating_point()
                else target.reshape(-1).long(),
            )
        pos = self.position(x).float()
        b, s = pos.shape[0], self.side
        ce["position"] = 0.5 * (
            F.cross_entropy(pos[..., :s].reshape(-1, s), self.rows.repeat(b))
            + F.cross_entropy(pos[..., s:].reshape(-1, s), self.cols.repeat(b))
        )
        return ce, F.mse_loss(self.where(x).float(), where)


# model families
# --------------------------------------------------------------------------------------------
@dataclass
class VisionOut:
    """The vision side of a batch: `tokens` [B, n_visual, D], what the decoder receives (None when
    not computed), and `raw`, what the family's stage-1 objective reads."""

    tokens: torch.Tensor | None
    raw: Any


class Family:
    """What differs between the model families the trainer builds (`--family`): the model and its
    processor, the prompt, the GPU pixel pipeline, the vision forward and its stage-1 objective, the
    decoder's position ids and where the grounding loss's targets land among the visual tokens. The
    data pipeline, schedules, decoder forward, evaluation and saving are shared."""

    name: str
    model_type: str  # `config.model_type` of the models it builds
    prompt: str  # one image placeholder, then {question}; the chat template renders exactly this
    special_tokens: tuple[
        str, ...
    ]  # ids 0..4 are <pad>, <s>, </s>, <unk> and the image token
    extra_special_tokens: dict[str, str]
    bos: bool  # the tokenizer prepends <s>
    n_visual: int  # visual tokens per 336 px image in the decoder
    arch: Arch
    quick_arch: Arch

    def model_class(self) -> type:
        raise NotImplementedError

    def build_model(
        self, arch: Arch, vocab_size: int, attn: str = "sdpa", seed: int = 0
    ) -> nn.Module:
        raise NotImplementedError

    def build_processor(self, tokenizer) -> Any:
        raise NotImplementedError

    def parts(self, model) -> dict[str, nn.Module]:
        """Named parts for the size log."""
        raise NotImplementedError

    def tower(self, model) -> nn.Module:
        """What stage 1 trains (with the objective's heads)."""
        raise NotImplementedError

    def frozen(self, model) -> nn.Module:
        """What stage 2 keeps frozen unless `--vision-lr` > 0: the tower without the projector."""
        raise NotImplementedError

    def objective(self, space: LabelSpace, model) -> nn.Module:
        raise NotImplementedError

    def pixel_transform(self, processor) -> nn.Module:
        """uint8 images [B, H, W, 3] -> the processor's `pixel_values` for them, on any device."""
        raise NotImplementedError

    def vision(
        self,
        model,
        pixel_values: torch.Tensor,
        frozen: bool = False,
        project: bool = True,
    ) -> VisionOut:
        """The tower (under no_grad if `frozen`) and, if `project`, the visual tokens for the decoder."""
        raise NotImplementedError

    @torch.no_grad()
    def frozen_features(self, model, pixel_values: torch.Tensor) -> torch.Tensor:
        """What the frozen part (`frozen`) hands the trainable projector, per image [B, ...]: stage 2
        with the tower frozen caches it (`FeatureCache`), so the tower runs once per item."""
        raise NotImplementedError

    def project(self, model, features: torch.Tensor) -> torch.Tensor:
        """`frozen_features` -> the decoder's visual tokens [B, n_visual, D] (the trainable projector);
        project(frozen_features(x)) == vision(x, frozen=True).tokens."""
        raise NotImplementedError

    def scene_loss(
        self,
        objective: nn.Module,
        out: VisionOut,
        cls: torch.Tensor,
        dense: torch.Tensor,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The stage-1 loss of a batch (`LabelSpace` targets) and its logged parts."""
        raise NotImplementedError

    def position_ids(
        self, model, rows: torch.Tensor, attention_mask: torch.Tensor
    ) -> torch.Tensor:
        """Decoder position ids of left-padded rows, as `generate()` computes them."""
        raise NotImplementedError

    def visual_targets(self, heads: torch.Tensor) -> torch.Tensor:
        """[B, h, 576] per-patch grounding targets -> [B, h, n_visual] over the decoder's visual tokens."""
        raise NotImplementedError

    def lm_forward(
        self,
        model,
        input_ids: torch.Tensor,
        tokens: torch.Tensor,
        attention_mask: torch.Tensor,
        position_ids: torch.Tensor,
        logits_to_keep: int,
    ) -> torch.Tensor:
        """The decoder half of the model's forward spelled out (visual `tokens` scattered into the image
        placeholders' embeddings -> decoder -> LM head on the last `logits_to_keep` positions), so
        training can run the vision half its own way (batched, frozen, with the objective's taps)."""
        inner = model.model
        embeds = inner.get_input_embeddings()(input_ids)
        mask = (
            (input_ids == model.config.image_token_id).unsqueeze(-1).expand_as(embeds)
        )
        embeds = embeds.masked_scatter(mask, tokens.to(embeds.dtype))
        hidden = inner.language_model(
            inputs_embeds=embeds,
            attention_mask=attention_mask,
            position_ids=position_ids,
        ).last_hidden_state
        return model.lm_head(hidden[:, -logits_to_keep:])


def relevance_target(relevant: torch.Tensor) -> torch.Tensor:
    """relevant [B, N] (`LabelSpace.dense` row 4, non-zero on the patches the question is about)
    -> [B, 1, N] float: what every supervised head should look at."""
    return (relevant > 0).unsqueeze(1).float()


class AttentionProbe:
    """Grounding loss on the decoder's attention (stage 2, `--attn-weight`).

    For the decoder layers `layers`, a forward pre-hook on `self_attn` recomputes, from the layer's
    own q / k projections and rotary embeddings, the attention row of one query position (the one
    that predicts the answer) for the first two heads, while the model itself keeps SDPA; the loss
    is -log of the attention mass (mean over the two heads) that falls on the visual tokens of the
    patches the question is about (`LabelSpace.relevant`). Rows with nothing to look at are
    skipped; the other heads are free. It only shapes training: the saved model is a plain Hugging
    Face model."""

    def __init__(self, model, layers: Sequence[int]):
        self.losses: list[torch.Tensor] = []
        self.active = False
        self.heads = 2 if model.config.text_config.num_attention_heads >= 2 else 1
        self.query_index = -1
        self.key_mask: torch.Tensor | None = None  # [B, L] bool: keys the query may see
        self.target: torch.Tensor | None = (
            None  # [B, 1, L] float: the relevant visual tokens
        )
        self.rows: torch.Tensor | None = None  # [B] bool: rows with a target
        decoder = model.model.language_model
        self.handles = [
            decoder.layers[i].self_attn.register_forward_pre_hook(
                self._hook, with_kwargs=True
            )
            for i in layers
        ]

    def set(
        self, key_mask: torch.Tensor, target: torch.Tensor, query_index: int
    ) -> None:
        """target [B, 1, L]: 1 on the tokens the supervised heads should look at (`relevance_target`)."""
        self.target = target
        self.key_mask, self.query_index = key_mask, query_index
        self.rows = self.target.sum(-1).squeeze(1) > 0
        self.losses = []
        self.active = True

    def _hook(self, attn: nn.Module, args: tuple, kwargs: dict) -> None:
        if not self.active or not torch.is_grad_enabled():
            return
        h = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
        mass = (
            (self.attention_row(attn, h, kwargs["position_embeddings"]) * self.target)
            .sum(-1)
            .mean(1)
        )  # [B]
        loss = -torch.log(mass.clamp_min(1e-6))
        self.losses.append((loss * self.rows).sum() / self.rows.sum().clamp_min(1))

    def attention_row(
        self, attn: nn.Module, h: torch.Tensor, position_embeddings: tuple
    ) -> torch.Tensor:
        """[B, heads, L]: softmax attention of the query at `query_index` over the allowed keys, for
        the first `heads` heads, from the layer's q / k projections and the cos / sin it is given
        (1-D RoPE for Llama; for Qwen2-VL the decoder's rotary embedding has already interleaved the
        M-RoPE sections, so the same rotation applies)."""
        cos, sin = position_embeddings
        b, length, _ = h.shape
        hd, qi, nh = attn.head_dim, self.query_index, self.heads
        q = attn.q_proj(h[:, qi]).view(b, -1, hd)[:, :nh]  # [B, nh, hd]
        k = attn.k_proj(h).view(b, length, -1, hd).transpose(1, 2)  # [B, Hkv, L, hd]
        k = k.repeat_interleave(attn.num_key_value_groups, dim=1)[:, :nh]
        c, s_ = cos[:, qi].unsqueeze(1), sin[:, qi].unsqueeze(1)
        q = q * c + _rotate_half(q) * s_
        k = k * cos.unsqueeze(1) + _rotate_half(k) * sin.unsqueeze(1)
        scores = torch.einsum("bhd,bhld->bhl", q.float(), k.float()) * attn.scaling
        return scores.masked_fill(~self.key_mask[:, None, :], float("-inf")).softmax(-1)

    def loss(self) -> torch.Tensor | None:
        self.active = False
        return torch.stack(self.losses).mean() if self.losses else None

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def amp(device: torch.device):
    """bf16 autocast on CUDA, none elsewhere (the training steps' precision)."""
    return (
        torch.autocast("cuda", dtype=torch.bfloat16)
        if device.type == "cuda"
        else torch.autocast("cpu", enabled=False)
    )


def _fmt(stats: dict[str, Any]) -> str:
    return " ".join(f"{k} {float(v):.3f}" for k, v in stats.items())


def train_stage1(
    family: Family,
    model,
    objective: nn.Module,
    pixels: nn.Module,
    stream: TrainStream,
    args,
    device: torch.device,
    history: list[dict],
    t_start: float,
) -> int:
    """Stage 1: the family's vision tower and the objective's heads on the scene targets."""
    tower = family.tower(model)
    params = list(tower.parameters()) + list(objective.parameters())
    opt = make_optimizer(
        param_groups(
            list(tower.named_parameters()) + list(objective.named_parameters()),
            args.stage1_lr,
            args.wd,
        ),
        device,
    )
    tower.train()
    objective.train()
    gen = torch.Generator().manual_seed(args.seed + 1)
    t0 = time.perf_counter()
    step = 0
    for step in range(args.stage1_steps):
        elapsed = time.perf_counter() - t0
        if elapsed > args.stage1_time:
            log(f"[stage1] time budget {args.stage1_time:.0f}s reached at step {step}")
            break
        stream.pump()
        progress = max(step / args.stage1_steps, elapsed / args.stage1_time)
        set_lr(opt, lr_at(progress, step, 1.0, args.warmup))
        idx = stream.sample(args.stage1_batch, gen).to(device)
        with amp(device):
            out = family.vision(model, pixels(stream.images[idx]), project=False)
            loss, stats = family.scene_loss(
                objective, out, stream.cls[idx], stream.dense[idx]
            )
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        if step % args.log_every == 0 or step == args.stage1_steps - 1:
            rec = {
                "stage": 1,
                "step": step,
                "loss": round(loss.item(), 5),
                **{k: round(float(v), 4) for k, v in stats.items()},
                "lr": opt.param_groups[0]["lr"],
                "pool": stream.ready,
                "t": round(time.perf_counter() - t_start, 2),
            }
            history.append(rec)
            log(
                f"[stage1] step {step:5d} loss {rec['loss']:.4f} {_fmt(stats)} lr {rec['lr']:.2e} "
                f"pool {stream.ready} {time.perf_counter() - t0:.1f}s"
            )
    del opt
    return step + 1


def save_model(model, processor, out: Path, extra: dict | None = None) -> None:
    """fp16 safetensors + processor (tokenizer, image processor, chat template; none if None) into `out`."""
    out.mkdir(parents=True, exist_ok=True)
    state = {
        k: (
            v.detach().to("cpu", torch.float16)
            if v.is_floating_point()
            else v.detach().cpu()
        )
        for k, v in model.state_dict().items()
    }
    model.save_pretrained(out, state_dict=state)
    # save_pretrained records the in-memory (fp32) dtype; the file holds fp16
    cfg_path = out / "config.json"
    cfg = json.loads(cfg_path.read_text())
    for d in (cfg, cfg.get("text_config") or {}, cfg.get("vision_config") or {}):
        if "dtype" in d:
            d["dtype"] = "float16"
    cfg_path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    if processor is not None:
        processor.save_pretrained(out)


def bench_throughput(
    family: Family,
    arch: Arch,
    device: torch.device,
    batches: Sequence[int] = (128, 256),
    vocab: int = 300,
    text_len: int = 24,
    iters: int = 8,
) -> dict:
    """Training steps per second of stage 1 (vision tower + objective) and stage 2 (whole model, the
    tower trained too) on random data, through the training code's own forward: how many steps fit
    in a time budget on this device (`--bench`)."""
    model = family.build_model(arch, vocab).to(device)
    space = LabelSpace(shapes_module())
    objective = family.objective(space, model).to(device)
    pixels = family.pixel_transform(
        family.build_processor(build_tokenizer([], [], family))
    ).to(device)
    opt = make_optimizer(
        [{"params": list(model.parameters()) + list(objective.parameters())}], device
    )
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    result = {"family": family.name, "params": n_params(model), "arch": asdict(arch)}

    def timed(fn) -> float:
        for _ in range(2):
            fn()
        sync()
        t = time.perf_counter()
        for _ in range(iters):
            fn()
        sync()
        return (time.perf_counter() - t) / iters

    first = len(family.special_tokens)  # random text ids above the special tokens
    for b in batches:
        images = torch.randint(
            0, 256, (b, IMAGE_SIZE, IMAGE_SIZE, 3), dtype=torch.uint8, device=device
        )
        cls = torch.randint(0, 2, (b, len(space)), dtype=torch.uint8, device=device)
        dense = torch.zeros(
            (b, DENSE_ROWS, GRID * GRID), dtype=torch.uint8, device=device
        )
        ids = torch.cat(
            [
                torch.full((b, 3), first),
                torch.full((b, family.n_visual), IMAGE_ID),
                torch.randint(first, vocab, (b, text_len)),
            ],
            1,
        ).to(device)
        attn = torch.ones_like(ids)
        positions = family.position_ids(model, ids, attn)

        def stage1(images=images, cls=cls, dense=dense):  # this batch size's tensors
            with amp(device):
                loss, _ = family.scene_loss(
                    objective,
                    family.vision(model, pixels(images), project=False),
                    cls,
                    dense,
                )
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

        def stage2(images=images, ids=ids, attn=attn, positions=positions):
            with amp(device):
                tokens = family.vision(model, pixels(images)).tokens
                logits = family.lm_forward(model, ids, tokens, attn, positions, 3)
            loss = logits.float().square().mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

        for name, fn in (("stage1", stage1), ("stage2", stage2)):
            dt = timed(fn)
            result[f"{name}_b{b}_step_s"] = round(dt, 4)
            result[f"{name}_b{b}_img_per_s"] = round(b / dt, 1)
            log(
                f"[bench] {name} batch {b}: {dt * 1000:.1f} ms/step, {b / dt:.0f} images/s"
            )
    if device.type == "cuda":
        result["peak_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
    return result


def vocabulary_texts(shapes: Any, n_scan: int) -> list[str]:
    """Texts whose words make the tokenizer's vocabulary: the questions of the first `n_scan`
    training seeds (questions need no rendering) and the benchmark's word lists."""
    texts = [
        shapes.make_item(seed).question for seed in shapes.split_seeds("train", n_scan)
    ]
    for name in (
        "COLOURS",
        "KINDS",
        "PLURALS",
        "SIZE_CLASSES",
        "QUADRANTS",
        "RELATIONS",
        "WORDS",
        "ANSWER_VOCAB",
    ):
        value = getattr(shapes, name, ())
        texts += [
            str(v)
            for v in (
                list(value) + list(value.values()) if isinstance(value, dict) else value
            )
            if isinstance(v, str)
        ]
    return texts
