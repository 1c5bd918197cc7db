"""Train vlmprune's own tiny VLMs on the embedded shapes benchmark (`vlmprune.eval.shapes`).

No pretrained weights can be downloaded, so the package ships small models trained here from
scratch, each with a word-level tokenizer over the benchmark's words and its family's processor:

- `--family llava` (default): the LLaVA-1.5 architecture: a CLIP ViT at 336 px / patch 14 (576
  visual tokens plus CLS, features from layer -2, CLS dropped: strategy "default"), a two-layer MLP
  projector and a small Llama decoder, with a `LlavaProcessor`;
- `--family qwen2_vl`: the Qwen2-VL architecture (`vlmprune.eval.train_tiny_qwen2_vl`): its vision
  tower with 2-D rotary, a 2 x 2 patch merger (144 visual tokens per 336 px image) and a Qwen2
  decoder with M-RoPE, with a `Qwen2VLProcessor`.

    python -m vlmprune.eval.train_tiny --out DIR [--family qwen2_vl] [--device cuda] [--steps N]
    python -m vlmprune.eval.train_tiny --out DIR --quick          # CPU smoke run, seconds
    python -m vlmprune.eval.train_tiny --out DIR --bench          # step throughput only

What differs between the families (model, processor, prompt, GPU pixel pipeline, vision forward and
stage-1 objective, decoder position ids) sits behind `Family`; the rest is shared.

Recipe (docs/training.md):
  0. items are rendered by forked worker processes into shared memory while training runs (the
     pool grows to `--pool`); on CUDA the pool lives on the GPU and batches are gathered there.
     Training targets come from each item's scene description (`LabelSpace`);
  1. stage 1, the vision tower alone: scene attributes (colours, kinds, counts, word, ...) from the
     CLS token at the feature layer (-2) and at the last layer, so that the CLS token (and its
     attention, which `method="cls"` ranks by) gathers the objects; per visual token its kind,
     colour, word, object centre, row and column, so that the tokens the LLM sees are local
     (Qwen2-VL, which has no CLS token: `Qwen2VLSceneObjective`);
  2. stage 2, the projector and decoder on the QA task (the tower frozen, as in LLaVA-1.5): loss on
     the answer token and </s> only, plus a grounding loss on the decoder's attention
     (`AttentionProbe`); bf16 autocast on CUDA, AdamW, cosine LR over max(step / steps, elapsed /
     time budget); exact-match accuracy on the validation split with batched left-padded
     `generate()` after every epoch; the best model saved in fp16 safetensors each time;
  3. the saved directory is reloaded with `from_pretrained` + `AutoProcessor` and scored on the
     test split (the number reported is the shipped fp16 artifact's).

`evaluate(model, processor, items, batch_size)` is the accuracy used here and by the sweep.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import mmap
import multiprocessing as mp
import os
import random
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

PROMPT = "USER: <image>\n{question} ASSISTANT:"
SPECIAL_TOKENS = ("<pad>", "<s>", "</s>", "<unk>", "<image>")
PAD_ID, BOS_ID, EOS_ID, UNK_ID, IMAGE_ID = range(len(SPECIAL_TOKENS))
IMAGE_SIZE = 336
PATCH_SIZE = 14
N_VISUAL = (IMAGE_SIZE // PATCH_SIZE) ** 2  # 576
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
# Renders to exactly PROMPT for one user turn with one image, so a chat-template client (the sweep,
# lmms-eval) and a plain-prompt client see the same tokens.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'user' %}USER: "
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for c in message['content'] %}{% if c['type'] == 'image' %}<image>\n{% endif %}{% endfor %}"
    "{% for c in message['content'] %}{% if c['type'] == 'text' %}{{ c['text'] }}{% endif %}{% endfor %}"
    "{% endif %} "
    "{% elif message['role'] == 'assistant' %}ASSISTANT: "
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for c in message['content'] %}{% if c['type'] == 'text' %}{{ c['text'] }}{% endif %}{% endfor %}"
    "{% endif %}</s>"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)


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


QUICK_ARCH = Arch(vision_hidden=64, vision_layers=2, vision_heads=2, vision_intermediate=128,
                  text_hidden=64, text_layers=2, text_heads=2, text_kv_heads=2, text_intermediate=128)


def build_model(arch: Arch, vocab_size: int, attn: str = "sdpa", seed: int = 0):
    """A LLaVA-1.5-architecture model of `arch`'s sizes at 336 px / patch 14 (576 visual tokens)."""
    from transformers import LlavaForConditionalGeneration

    from vlmprune.eval.tiny import llava_config

    cfg = llava_config(
        image_size=IMAGE_SIZE, patch_size=PATCH_SIZE, vision_hidden=arch.vision_hidden,
        vision_layers=arch.vision_layers, vision_heads=arch.vision_heads,
        vision_intermediate=arch.vision_intermediate, text_hidden=arch.text_hidden,
        text_layers=arch.text_layers, text_heads=arch.text_heads, text_kv_heads=arch.text_kv_heads,
        text_intermediate=arch.text_intermediate, vocab_size=vocab_size, image_token_id=IMAGE_ID,
        strategy="default", feature_layer=-2, attn=attn,
    )
    cfg.text_config.max_position_embeddings = 1024
    torch.manual_seed(seed)
    return greedy_generation(LlavaForConditionalGeneration(cfg))


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
    return pre_tokenizers.Sequence([
        pre_tokenizers.WhitespaceSplit(),
        pre_tokenizers.Split(Regex(r"[^\w\s]"), behavior="isolated"),
    ])


def text_words(texts: Iterable[str], specials: Sequence[str] = SPECIAL_TOKENS) -> set[str]:
    """The word-level pieces of `texts` as the tokenizer will cut them (lower-cased), `specials` left out."""
    pre = _pre_tokenizer()
    words: set[str] = set()
    for text in texts:
        for special in specials:
            text = text.replace(special, " ")
        words.update(w for w, _ in pre.pre_tokenize_str(text.lower()))
    return words


def build_tokenizer(texts: Iterable[str], answers: Iterable[str], family: Family | None = None):
    """A word-level `PreTrainedTokenizerFast`: the family's special tokens, then every word of `texts`
    and of its prompt format; each answer is one token (an answer of several pieces becomes an added
    token). Lower-cases its input; prepends <s> if the family does (LLaVA, the default)."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, processors
    from transformers import PreTrainedTokenizerFast

    family = family or LLAVA
    answers = sorted({a.strip().lower() for a in answers})
    words = text_words(list(texts) + [family.prompt.format(question="")] + answers, family.special_tokens)
    pre = _pre_tokenizer()
    multi = [a for a in answers if len(pre.pre_tokenize_str(a)) != 1]
    vocab = {t: i for i, t in enumerate(family.special_tokens)}
    for w in sorted(words):
        vocab.setdefault(w, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=True)
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in family.special_tokens])
    if multi:
        tok.add_tokens([AddedToken(a, single_word=True, normalized=True) for a in multi])
    if family.bos:
        tok.post_processor = processors.TemplateProcessing(
            single="<s> $A", pair="<s> $A $B", special_tokens=[("<s>", BOS_ID)])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="<pad>",
        padding_side="left", model_max_length=1024, extra_special_tokens=dict(family.extra_special_tokens),
    )


def build_processor(tokenizer):
    """`LlavaProcessor`: CLIP resize/crop to 336 + CLIP normalisation, one <image> -> 576 tokens."""
    from transformers import LlavaProcessor

    kwargs = dict(size={"shortest_edge": IMAGE_SIZE}, crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE},
                  image_mean=list(CLIP_MEAN), image_std=list(CLIP_STD), resample=3)
    try:
        from transformers import CLIPImageProcessor

        image_processor = CLIPImageProcessor(**kwargs)
    except ImportError:  # no torchvision: the PIL backend (same numbers, saved under the same type)
        from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

        image_processor = CLIPImageProcessorPil(**kwargs)
    return LlavaProcessor(image_processor=image_processor, tokenizer=tokenizer, patch_size=PATCH_SIZE,
                          vision_feature_select_strategy="default", num_additional_image_tokens=1,
                          chat_template=CHAT_TEMPLATE)


def prompt_ids(tokenizer, question: str, family: Family | None = None) -> list[int]:
    """Token ids of the family's prompt (LLaVA's PROMPT by default) with the image placeholder
    expanded to its visual tokens (what the processor gives for one 336 px image: 576 for LLaVA)."""
    family = family or LLAVA
    ids = tokenizer(family.prompt.format(question=question))["input_ids"]
    at = ids.index(IMAGE_ID)
    return ids[:at] + [IMAGE_ID] * family.n_visual + ids[at + 1:]


def answer_ids(tokenizer, answer: str) -> list[int]:
    return tokenizer(answer, add_special_tokens=False)["input_ids"] + [EOS_ID]


# --------------------------------------------------------------------------------------------
# stage-1 targets from the scene description
# --------------------------------------------------------------------------------------------
GRID = IMAGE_SIZE // PATCH_SIZE  # 24
_PATCH_CENTRES = np.arange(GRID) * PATCH_SIZE + PATCH_SIZE / 2
DENSE_ROWS = 7  # LabelSpace.dense: kind, colour, word, centre, relevant, object x, object y
WHERE_WEIGHT = 2.0  # stage-1 weight of the object-position regression (an MSE on 0..1 coordinates)


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
        self.quadrants = list(getattr(shapes, "QUADRANTS", ("top left", "top right", "bottom left", "bottom right")))
        self.max_count = 5
        names = [f"colour:{c}" for c in self.colours] + [f"kind:{k}" for k in self.kinds]
        names += [f"obj:{c} {k}" for c in self.colours for k in self.kinds]
        names += [f"{size}:{k}" for size in ("small", "large") for k in self.kinds]
        names += [f"n:{k}>={n}" for k in self.kinds for n in range(1, self.max_count + 1)]
        names += [f"n:{c}>={n}" for c in self.colours for n in range(1, self.max_count + 1)]
        names += ["word"] + [f"word:{w}" for w in self.words]
        names += [f"quad:{q}:{x}" for q in self.quadrants for x in self.colours + self.kinds]
        self.names = names
        self.index = {n: i for i, n in enumerate(names)}
        self.dense_classes = {"kind": 2 + 2 * len(self.kinds), "colour": 1 + len(self.colours),
                              "word": 1 + len(self.words), "centre": 1 + len(self.kinds)}

    def __len__(self) -> int:
        return len(self.names)

    def _quadrant(self, centre: Sequence[float], width: int, height: int) -> str:
        return f"{'top' if centre[1] < height / 2 else 'bottom'} {'left' if centre[0] < width / 2 else 'right'}"

    def cls(self, scene: Any) -> np.ndarray:
        on: set[str] = set()
        kinds: dict[str, int] = {}
        colours: dict[str, int] = {}
        for o in scene.objects:
            on.update((f"colour:{o.colour}", f"kind:{o.kind}", f"obj:{o.colour} {o.kind}", f"{o.size_class}:{o.kind}"))
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
        out = np.zeros((DENSE_ROWS, GRID, GRID), np.uint8)  # kind, colour, word, centre, relevant, x, y
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
            out[3, min(int(cy // PATCH_SIZE), GRID - 1), min(int(cx // PATCH_SIZE), GRID - 1)] = 1 + k
        if scene.word and scene.word_bbox is not None:
            m = cover(scene.word_bbox)
            out[0][m] = 1 + 2 * nk
            out[2][m] = 1 + self.words.index(scene.word) if scene.word in self.words else 0
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
            sel = [o for o in objs if [o.colour, o.kind] in (list(q.get("a", ())), list(q.get("b", ())))
                   and o.kind == item.answer]
        elif qtype == "colour" and variant == "place":
            quad = q.get("quadrant")
            sel = [o for o in objs if self._quadrant(o.centre, scene.width, scene.height) == quad]
        elif qtype == "colour" and variant == "size":
            sel = [o for o in objs if o.kind == q.get("kind") and o.size_class == q.get("size")]
        elif qtype in ("colour", "count") and variant == "kind":
            sel = [o for o in objs if o.kind == q.get("kind")]
        elif qtype == "count" and variant == "colour":
            sel = [o for o in objs if o.colour == q.get("colour")]
        elif qtype == "presence" and variant == "colour":
            sel = [o for o in objs if o.kind == q.get("kind") and o.colour == q.get("colour")]
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
_BUF: dict[str, np.ndarray] = {}  # images [N, H, W, 3], cls [N, L], dense [N, DENSE_ROWS, 576]; uint8, shared maps
_SPACE: LabelSpace | None = None


def _shared(shape: tuple[int, ...]) -> np.ndarray:
    """A uint8 array in an anonymous shared mapping (inherited, writable, by forked workers)."""
    n = int(np.prod(shape))
    return np.frombuffer(mmap.mmap(-1, max(1, n)), dtype=np.uint8, count=n).reshape(shape)


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

    def __init__(self, renderer: Renderer, offset: int, seeds: Sequence[int], chunk: int):
        self.renderer, self.offset, self.seeds = renderer, offset, list(seeds)
        self.jobs = [renderer.submit(offset + i, self.seeds[i:i + chunk]) for i in range(0, len(self.seeds), chunk)]
        self._items: list[PoolItem] | None = None

    def items(self) -> list[PoolItem]:
        if self._items is None:
            from PIL import Image

            rows = [row for job in self.jobs for row in job.get()]
            images = self.renderer.images
            self._items = [PoolItem(Image.fromarray(images[self.offset + i].numpy().copy(), "RGB"), q, a, t,
                                    int(self.seeds[i])) for i, (q, a, t) in enumerate(rows)]
        return self._items


class TrainStream:
    """The training pool: grows in the background while training runs.

    Workers render chunks of training seeds, in order, into the shared buffers; each finished chunk
    is tokenised here and (on CUDA) copied to GPU-resident tensors on a side stream; `ready` counts
    the items usable for sampling (a prefix). No item is ever overwritten; rendering stops at
    `capacity` items."""

    def __init__(self, renderer: Renderer, base: int, seeds: Sequence[int], tokenizer, width: int,
                 device: torch.device, chunk: int, inflight: int, qtype_weight: dict[str, float] | None = None,
                 family: Family | None = None):
        self.r, self.base, self.seeds, self.tok = renderer, base, list(seeds), tokenizer
        self.family = family or LLAVA
        self.qtype_weight = qtype_weight or {}
        self.weight = torch.ones(len(self.seeds))  # sampling weight of each item (by question type)
        self.capacity, self.width, self.device, self.chunk, self.inflight = len(self.seeds), width, device, chunk, inflight
        cuda = device.type == "cuda"
        n = self.capacity
        sl = slice(base, base + n)
        self.images = torch.empty((n, IMAGE_SIZE, IMAGE_SIZE, 3), dtype=torch.uint8, device=device) if cuda \
            else renderer.images[sl]
        self.cls = torch.empty((n, renderer.cls.shape[1]), dtype=torch.uint8, device=device) if cuda \
            else renderer.cls[sl]
        self.dense = torch.empty((n, DENSE_ROWS, GRID * GRID), dtype=torch.uint8, device=device) if cuda \
            else renderer.dense[sl]
        self.ids = torch.full((n, width), PAD_ID, dtype=torch.long, device=device)
        self.answer_mask = torch.zeros((n, width), dtype=torch.bool, device=device)
        self.starts = torch.zeros(n, dtype=torch.long)  # first non-pad column of each row (CPU)
        self.questions: list[str] = []
        self.answers: list[str] = []
        self.qtypes: list[str] = []
        self.ready = 0
        self.submitted = 0
        self.pending: list[tuple[int, int, Any]] = []
        self.copying: list[tuple[int, int, Any]] = []
        self.stream = torch.cuda.Stream(device) if cuda else None
        self.t0 = time.perf_counter()

    def _encode(self, rows: list[tuple[str, str, str]]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        ids = torch.full((len(rows), self.width), PAD_ID, dtype=torch.long)
        mask = torch.zeros((len(rows), self.width), dtype=torch.bool)
        starts = torch.zeros(len(rows), dtype=torch.long)
        for i, (q, a, _) in enumerate(rows):
            p, t = prompt_ids(self.tok, q, self.family), answer_ids(self.tok, a)
            if len(p) + len(t) > self.width:
                raise ValueError(f"question too long for the row width {self.width}: {q!r}")
            start = self.width - len(p) - len(t)
            ids[i, start:] = torch.tensor(p + t)
            mask[i, start + len(p):] = True
            starts[i] = start
        return ids, mask, starts

    def pump(self, at_least: int = 0) -> int:
        """Submit more chunks, take in finished ones; block until `ready >= at_least`."""
        while True:
            while self.submitted < self.capacity and len(self.pending) + len(self.copying) < self.inflight:
                n = min(self.chunk, self.capacity - self.submitted)
                off = self.submitted
                self.pending.append((off, n, self.r.submit(self.base + off, self.seeds[off:off + n])))
                self.submitted += n
            while self.pending and self.pending[0][2].ready():
                off, n, job = self.pending.pop(0)
                rows = job.get()
                ids, mask, starts = self._encode(rows)
                self.questions += [r[0] for r in rows]
                self.answers += [r[1] for r in rows]
                self.qtypes += [r[2] for r in rows]
                self.weight[off:off + n] = torch.tensor([self.qtype_weight.get(r[2], 1.0) for r in rows])
                self.starts[off:off + n] = starts
                src = slice(self.base + off, self.base + off + n)
                if self.stream is not None:
                    with torch.cuda.stream(self.stream):
                        self.images[off:off + n].copy_(self.r.images[src], non_blocking=True)
                        self.cls[off:off + n].copy_(self.r.cls[src], non_blocking=True)
                        self.dense[off:off + n].copy_(self.r.dense[src], non_blocking=True)
                        self.ids[off:off + n].copy_(ids, non_blocking=True)
                        self.answer_mask[off:off + n].copy_(mask, non_blocking=True)
                        event = torch.cuda.Event()
                        event.record(self.stream)
                    self.copying.append((off, n, (event, ids, mask)))
                else:
                    self.ids[off:off + n] = ids
                    self.answer_mask[off:off + n] = mask
                    self.copying.append((off, n, None))
            while self.copying and (self.copying[0][2] is None or self.copying[0][2][0].query()):
                off, n, _ = self.copying.pop(0)
                self.ready = off + n
                if self.ready == self.capacity:
                    log(f"[data] training pool complete: {self.capacity} items in {time.perf_counter() - self.t0:.1f}s")
            if self.ready >= min(at_least, self.capacity):
                return self.ready
            time.sleep(0.01)

    def sample(self, n: int, gen: torch.Generator) -> torch.Tensor:
        """`n` random indices (CPU) among the ready items, drawn by `qtype_weight` (uniform if none)."""
        if not self.qtype_weight:
            return torch.randint(0, self.ready, (n,), generator=gen)
        return torch.multinomial(self.weight[:self.ready], n, replacement=True, generator=gen)


class FeatureCache:
    """Stage 2 with the tower frozen: each pool item's `Family.frozen_features`, computed the first
    time a batch draws the item and kept on the device, so the frozen tower runs once per item
    instead of once per sample (it is a fifth to a quarter of a stage-2 step). Stored in the
    autocast dtype (bf16 on CUDA), which is what the projector's first linear layer reads anyway."""

    def __init__(self, capacity: int, compute, device: torch.device, chunk: int = 512):
        self.capacity, self.compute, self.device, self.chunk = capacity, compute, device, chunk
        self.dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
        self.have = torch.zeros(capacity, dtype=torch.bool)  # CPU: which items are stored
        self.store: torch.Tensor | None = None
        self.computed = 0

    def get(self, idx: torch.Tensor) -> torch.Tensor:
        """Features of the items `idx` (CPU LongTensor), computing the missing ones first."""
        miss = torch.unique(idx[~self.have[idx]])
        for start in range(0, len(miss), self.chunk):
            part = miss[start:start + self.chunk]
            feats = self.compute(part.to(self.device))
            if self.store is None:
                self.store = torch.empty((self.capacity, *feats.shape[1:]), dtype=self.dtype, device=self.device)
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
    return torch.compiler.set_stance("force_eager") if compiled else contextlib.nullcontext()


class Normalise(nn.Module):
    """uint8 [B, H, W, 3] -> CLIP-normalised float [B, 3, H, W] (what the processor computes)."""

    def __init__(self):
        super().__init__()
        self.register_buffer("mean", torch.tensor(CLIP_MEAN).view(1, 3, 1, 1) * 255.0, persistent=False)
        self.register_buffer("std", torch.tensor(CLIP_STD).view(1, 3, 1, 1) * 255.0, persistent=False)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = images.permute(0, 3, 1, 2).float()
        return (x - self.mean) / self.std


# --------------------------------------------------------------------------------------------
# evaluation
# --------------------------------------------------------------------------------------------
def _score_fn():
    try:
        return shapes_module().score
    except ImportError:  # pragma: no cover
        return lambda pred, ans: float(pred.strip().lower() == ans.strip().lower())


@torch.no_grad()
def predict(model, processor, items: Sequence[Any], batch_size: int = 64, max_new_tokens: int = 4) -> list[str]:
    """Greedy answers for `items` (objects with `.image` and `.question`), batched, left-padded."""
    device = next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    tokenizer = processor.tokenizer
    tokenizer.padding_side = "left"
    prompt = family_of(model).prompt
    was_training = model.training
    model.eval()
    out: list[str] = []
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if (device.type == "cuda" and dtype == torch.float32) \
        else torch.autocast(device.type, enabled=False)
    try:
        for start in range(0, len(items), batch_size):
            batch = items[start:start + batch_size]
            inputs = processor(images=[it.image.convert("RGB") for it in batch],
                               text=[prompt.format(question=it.question) for it in batch],
                               return_tensors="pt", padding=True)
            inputs = {k: (v.to(device, dtype) if v.is_floating_point() else v.to(device)) for k, v in inputs.items()
                      if isinstance(v, torch.Tensor)}
            with autocast:
                gen = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False,
                                     pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
            new = gen[:, inputs["input_ids"].shape[1]:]
            out += [s.strip() for s in tokenizer.batch_decode(new, skip_special_tokens=True)]
    finally:
        model.train(was_training)
    return out


def evaluate(model, processor, items: Sequence[Any], batch_size: int = 64, max_new_tokens: int = 4,
             details: dict | None = None) -> float:
    """Exact-match accuracy (the benchmark's `score`) of greedy `generate()` answers on `items`.
    Pass a dict as `details` to get per-question-type accuracy and the predictions back in it."""
    if not items:
        return float("nan")
    score = _score_fn()
    preds = predict(model, processor, items, batch_size, max_new_tokens)
    hits = [float(score(p, str(it.answer))) for p, it in zip(preds, items)]
    if details is not None:
        per: dict[str, list[float]] = {}
        for it, h in zip(items, hits):
            per.setdefault(str(getattr(it, "qtype", "all")), []).append(h)
        details["per_qtype"] = {k: sum(v) / len(v) for k, v in sorted(per.items())}
        details["predictions"] = preds
    return sum(hits) / len(hits)


# --------------------------------------------------------------------------------------------
# training
# --------------------------------------------------------------------------------------------
def lr_at(progress: float, step: int, base: float, warmup: int, floor: float = 0.05) -> float:
    """Linear warm-up over `warmup` steps, then cosine from `base` to `floor * base` over progress."""
    if step < warmup:
        return base * (step + 1) / warmup
    p = min(max(progress, 0.0), 1.0)
    return base * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * p)))


def param_groups(named: Iterable[tuple[str, nn.Parameter]], lr: float, wd: float) -> list[dict]:
    decay, no_decay = [], []
    for name, p in named:
        if not p.requires_grad:
            continue
        (no_decay if p.ndim < 2 or "embed" in name or "norm" in name else decay).append(p)
    return [{"params": decay, "weight_decay": wd, "lr": lr, "base_lr": lr},
            {"params": no_decay, "weight_decay": 0.0, "lr": lr, "base_lr": lr}]


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
            raise SystemExit(f"--qtype-weight: bad entry {part!r}; expected TYPE=WEIGHT with TYPE one of "
                             f"{', '.join(shapes_module().QTYPES)}")
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

    def __init__(self, space: LabelSpace, dim: int, side: int = GRID, cells: torch.Tensor | None = None):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.maps = nn.ModuleDict({k: nn.Linear(dim, n) for k, n in space.dense_classes.items()})
        self.order = list(space.dense_classes)  # row order of LabelSpace.dense
        self.position = nn.Linear(dim, 2 * side)  # each token's own row and column
        self.where = nn.Linear(dim, 2)  # x, y of the object under the token (linear, for comparisons)
        self.side = side
        cells = torch.arange(side * side) if cells is None else cells
        self.register_buffer("rows", cells // side, persistent=False)
        self.register_buffer("cols", cells % side, persistent=False)

    def loss(self, tokens: torch.Tensor, classes: Sequence[torch.Tensor],
             where: torch.Tensor) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """tokens [B, N, D]; `classes`, one per class map: [B, N] class indices or [B, N, C] class
        probabilities; where [B, N, 2] in 0..1 -> ({map or "position": cross-entropy}, MSE)."""
        x = self.norm(tokens)
        ce = {}
        for name, target in zip(self.order, classes):
            logits = self.maps[name](x).float()
            c = logits.shape[-1]
            ce[name] = F.cross_entropy(logits.reshape(-1, c), target.reshape(-1, c) if target.is_floating_point()
                                       else target.reshape(-1).long())
        pos = self.position(x).float()
        b, s = pos.shape[0], self.side
        ce["position"] = 0.5 * (F.cross_entropy(pos[..., :s].reshape(-1, s), self.rows.repeat(b))
                                + F.cross_entropy(pos[..., s:].reshape(-1, s), self.cols.repeat(b)))
        return ce, F.mse_loss(self.where(x).float(), where)


class SceneObjective(nn.Module):
    """Stage-1 heads on the LLaVA vision tower (thrown away after training) and their loss.

    - `cls_feat`: LayerNorm + linear on the CLS token **at the feature layer** (hidden_states[-2],
      the layer whose CLS attention `method="cls"` reads) -> the scene attributes (BCE);
    - `cls_last`: linear on the last layer's pooled (post-LayerNorm) CLS -> the same attributes, so
      the last block is trained too, as in CLIP;
    - `dense`: `DenseHeads` on the feature-layer patch tokens (the tokens the LLM sees).

    Stage 2 keeps this loss, weighted by `--aux-weight`, so the CLS token (which strategy "default"
    hides from the LLM) keeps its meaning while the tower is fine-tuned on QA."""

    def __init__(self, space: LabelSpace, dim: int):
        super().__init__()
        self.cls_feat = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, len(space)))
        self.cls_last = nn.Linear(dim, len(space))
        self.dense = DenseHeads(space, dim)

    def loss(self, feature_layer: torch.Tensor, pooled: torch.Tensor, cls_target: torch.Tensor,
             dense_target: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """feature_layer [B, 1 + N, D] (CLS first), pooled [B, D], cls_target [B, L] uint8,
        dense_target [B, DENSE_ROWS, N] uint8 (rows in `LabelSpace.dense` order)."""
        y = cls_target.float()
        logit_feat = self.cls_feat(feature_layer[:, 0]).float()
        logit_last = self.cls_last(pooled).float()
        bce = F.binary_cross_entropy_with_logits(logit_feat, y) + F.binary_cross_entropy_with_logits(logit_last, y)
        ce, where = self.dense.loss(feature_layer[:, 1:], dense_target[:, :4].unbind(1),
                                    dense_target[:, 5:7].transpose(1, 2).float() / 255)
        loss = 20.0 * bce + sum(ce.values()) / len(ce) + WHERE_WEIGHT * where
        with torch.no_grad():
            stats = {"cls_exact": ((logit_feat > 0) == (y > 0.5)).all(-1).float().mean(),
                     "cls_bce": bce.detach() / 2, **{f"ce_{k}": v.detach() for k, v in ce.items()},
                     "mse_where": where.detach()}
        return loss, stats


# --------------------------------------------------------------------------------------------
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
    special_tokens: tuple[str, ...]  # ids 0..4 are <pad>, <s>, </s>, <unk> and the image token
    extra_special_tokens: dict[str, str]
    bos: bool  # the tokenizer prepends <s>
    n_visual: int  # visual tokens per 336 px image in the decoder
    arch: Arch
    quick_arch: Arch

    def model_class(self) -> type:
        raise NotImplementedError

    def build_model(self, arch: Arch, vocab_size: int, attn: str = "sdpa", seed: int = 0) -> nn.Module:
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

    def vision(self, model, pixel_values: torch.Tensor, frozen: bool = False, project: bool = True) -> VisionOut:
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

    def scene_loss(self, objective: nn.Module, out: VisionOut, cls: torch.Tensor,
                   dense: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The stage-1 loss of a batch (`LabelSpace` targets) and its logged parts."""
        raise NotImplementedError

    def position_ids(self, model, rows: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Decoder position ids of left-padded rows, as `generate()` computes them."""
        raise NotImplementedError

    def visual_targets(self, heads: torch.Tensor) -> torch.Tensor:
        """[B, h, 576] per-patch grounding targets -> [B, h, n_visual] over the decoder's visual tokens."""
        raise NotImplementedError

    def lm_forward(self, model, input_ids: torch.Tensor, tokens: torch.Tensor, attention_mask: torch.Tensor,
                   position_ids: torch.Tensor, logits_to_keep: int) -> torch.Tensor:
        """The decoder half of the model's forward spelled out (visual `tokens` scattered into the image
        placeholders' embeddings -> decoder -> LM head on the last `logits_to_keep` positions), so
        training can run the vision half its own way (batched, frozen, with the objective's taps)."""
        inner = model.model
        embeds = inner.get_input_embeddings()(input_ids)
        mask = (input_ids == model.config.image_token_id).unsqueeze(-1).expand_as(embeds)
        embeds = embeds.masked_scatter(mask, tokens.to(embeds.dtype))
        hidden = inner.language_model(inputs_embeds=embeds, attention_mask=attention_mask,
                                      position_ids=position_ids).last_hidden_state
        return model.lm_head(hidden[:, -logits_to_keep:])


class LlavaFamily(Family):
    """LLaVA-1.5: CLIP ViT with CLS (576 patch tokens at layer -2, CLS dropped), MLP projector, Llama
    decoder with 1-D RoPE (positions from the attention mask)."""

    name = model_type = "llava"
    prompt = PROMPT
    special_tokens = SPECIAL_TOKENS
    extra_special_tokens = {"image_token": "<image>"}
    bos = True
    n_visual = N_VISUAL
    arch = Arch()
    quick_arch = QUICK_ARCH

    def model_class(self) -> type:
        from transformers import LlavaForConditionalGeneration

        return LlavaForConditionalGeneration

    def build_model(self, arch: Arch, vocab_size: int, attn: str = "sdpa", seed: int = 0) -> nn.Module:
        return build_model(arch, vocab_size, attn, seed)

    def build_processor(self, tokenizer) -> Any:
        return build_processor(tokenizer)

    def parts(self, model) -> dict[str, nn.Module]:
        inner = model.model
        return {"vision": inner.vision_tower, "projector": inner.multi_modal_projector, "decoder": inner.language_model}

    def tower(self, model) -> nn.Module:
        return model.model.vision_tower

    def frozen(self, model) -> nn.Module:
        return model.model.vision_tower

    def objective(self, space: LabelSpace, model) -> nn.Module:
        return SceneObjective(space, model.config.vision_config.hidden_size)

    def pixel_transform(self, processor) -> nn.Module:
        return Normalise()

    def vision(self, model, pixel_values: torch.Tensor, frozen: bool = False, project: bool = True) -> VisionOut:
        """Features of `vision_feature_layer` without CLS -> projector (strategy "default")."""
        inner = model.model
        with torch.no_grad() if frozen else contextlib.nullcontext():
            out = inner.vision_tower(pixel_values=pixel_values, output_hidden_states=True)
        feature_layer = out.hidden_states[model.config.vision_feature_layer]
        tokens = self.project(model, feature_layer[:, 1:]) if project else None
        return VisionOut(tokens, (feature_layer, out.pooler_output))

    @torch.no_grad()
    def frozen_features(self, model, pixel_values: torch.Tensor) -> torch.Tensor:
        """The feature layer's patch tokens (CLS dropped) [B, 576, vision_hidden]."""
        out = model.model.vision_tower(pixel_values=pixel_values, output_hidden_states=True)
        return out.hidden_states[model.config.vision_feature_layer][:, 1:]

    def project(self, model, features: torch.Tensor) -> torch.Tensor:
        return model.model.multi_modal_projector(features)

    def scene_loss(self, objective: nn.Module, out: VisionOut, cls: torch.Tensor,
                   dense: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        return objective.loss(*out.raw, cls, dense)

    def position_ids(self, model, rows: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return (attention_mask.cumsum(-1) - 1).clamp(min=0)

    def visual_targets(self, heads: torch.Tensor) -> torch.Tensor:
        return heads


LLAVA = LlavaFamily()
FAMILIES = ("llava", "qwen2_vl")


def get_family(name: str) -> Family:
    """The family called `name` (one of FAMILIES; also a model's `config.model_type`)."""
    if name == "llava":
        return LLAVA
    if name == "qwen2_vl":
        from vlmprune.eval.train_tiny_qwen2_vl import QWEN2_VL

        return QWEN2_VL
    raise ValueError(f"unknown model family {name!r}; expected one of {', '.join(FAMILIES)}")


def family_of(model) -> Family:
    return get_family(model.config.model_type)


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
        self.target: torch.Tensor | None = None  # [B, 1, L] float: the relevant visual tokens
        self.rows: torch.Tensor | None = None  # [B] bool: rows with a target
        decoder = model.model.language_model
        self.handles = [decoder.layers[i].self_attn.register_forward_pre_hook(self._hook, with_kwargs=True)
                        for i in layers]

    def set(self, key_mask: torch.Tensor, target: torch.Tensor, query_index: int) -> None:
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
        mass = (self.attention_row(attn, h, kwargs["position_embeddings"]) * self.target).sum(-1).mean(1)  # [B]
        loss = -torch.log(mass.clamp_min(1e-6))
        self.losses.append((loss * self.rows).sum() / self.rows.sum().clamp_min(1))

    def attention_row(self, attn: nn.Module, h: torch.Tensor, position_embeddings: tuple) -> torch.Tensor:
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


def _amp(device: torch.device):
    return torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else torch.autocast("cpu", enabled=False)


def _fmt(stats: dict[str, Any]) -> str:
    return " ".join(f"{k} {float(v):.3f}" for k, v in stats.items())


def train_stage1(family: Family, model, objective: nn.Module, pixels: nn.Module, stream: TrainStream, args,
                 device: torch.device, history: list[dict], t_start: float) -> int:
    """Stage 1: the family's vision tower and the objective's heads on the scene targets."""
    tower = family.tower(model)
    params = list(tower.parameters()) + list(objective.parameters())
    opt = make_optimizer(param_groups(list(tower.named_parameters()) + list(objective.named_parameters()),
                                      args.stage1_lr, args.wd), device)
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
        with _amp(device):
            out = family.vision(model, pixels(stream.images[idx]), project=False)
            loss, stats = family.scene_loss(objective, out, stream.cls[idx], stream.dense[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        if step % args.log_every == 0 or step == args.stage1_steps - 1:
            rec = {"stage": 1, "step": step, "loss": round(loss.item(), 5),
                   **{k: round(float(v), 4) for k, v in stats.items()}, "lr": opt.param_groups[0]["lr"],
                   "pool": stream.ready, "t": round(time.perf_counter() - t_start, 2)}
            history.append(rec)
            log(f"[stage1] step {step:5d} loss {rec['loss']:.4f} {_fmt(stats)} lr {rec['lr']:.2e} "
                f"pool {stream.ready} {time.perf_counter() - t0:.1f}s")
    del opt
    return step + 1


def save_model(model, processor, out: Path, extra: dict | None = None) -> None:
    """fp16 safetensors + processor (tokenizer, image processor, chat template; none if None) into `out`."""
    out.mkdir(parents=True, exist_ok=True)
    state = {k: (v.detach().to("cpu", torch.float16) if v.is_floating_point() else v.detach().cpu())
             for k, v in model.state_dict().items()}
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


def bench_throughput(family: Family, arch: Arch, device: torch.device, batches: Sequence[int] = (128, 256),
                     vocab: int = 300, text_len: int = 24, iters: int = 8) -> dict:
    """Training steps per second of stage 1 (vision tower + objective) and stage 2 (whole model, the
    tower trained too) on random data, through the training code's own forward: how many steps fit
    in a time budget on this device (`--bench`)."""
    model = family.build_model(arch, vocab).to(device)
    space = LabelSpace(shapes_module())
    objective = family.objective(space, model).to(device)
    pixels = family.pixel_transform(family.build_processor(build_tokenizer([], [], family))).to(device)
    opt = make_optimizer([{"params": list(model.parameters()) + list(objective.parameters())}], device)
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
        images = torch.randint(0, 256, (b, IMAGE_SIZE, IMAGE_SIZE, 3), dtype=torch.uint8, device=device)
        cls = torch.randint(0, 2, (b, len(space)), dtype=torch.uint8, device=device)
        dense = torch.zeros((b, DENSE_ROWS, GRID * GRID), dtype=torch.uint8, device=device)
        ids = torch.cat([torch.full((b, 3), first), torch.full((b, family.n_visual), IMAGE_ID),
                         torch.randint(first, vocab, (b, text_len))], 1).to(device)
        attn = torch.ones_like(ids)
        positions = family.position_ids(model, ids, attn)

        def stage1():
            with _amp(device):
                loss, _ = family.scene_loss(objective, family.vision(model, pixels(images), project=False), cls, dense)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

        def stage2():
            with _amp(device):
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
            log(f"[bench] {name} batch {b}: {dt * 1000:.1f} ms/step, {b / dt:.0f} images/s")
    if device.type == "cuda":
        result["peak_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
    return result


def vocabulary_texts(shapes: Any, n_scan: int) -> list[str]:
    """Texts whose words make the tokenizer's vocabulary: the questions of the first `n_scan`
    training seeds (questions need no rendering) and the benchmark's word lists."""
    texts = [shapes.make_item(seed).question for seed in shapes.split_seeds("train", n_scan)]
    for name in ("COLOURS", "KINDS", "PLURALS", "SIZE_CLASSES", "QUADRANTS", "RELATIONS", "WORDS", "ANSWER_VOCAB"):
        value = getattr(shapes, name, ())
        texts += [str(v) for v in (list(value) + list(value.values()) if isinstance(value, dict) else value)
                  if isinstance(v, str)]
    return texts


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m vlmprune.eval.train_tiny", description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True, help="output directory (model, processor, train_log.json)")
    ap.add_argument("--family", choices=FAMILIES, default="llava",
                    help="model architecture: LLaVA-1.5 (default) or Qwen2-VL")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--quick", action="store_true", help="a few steps of a smaller model on CPU (smoke check)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--pool", type=int, default=80_000,
                    help="training items (rendered in the background while training runs, then reused)")
    ap.add_argument("--pool-start", type=int, default=0,
                    help="index of the first training seed (a continued run can take items it has not seen)")
    ap.add_argument("--init", default=None,
                    help="continue from this saved model directory (its weights, tokenizer and processor; "
                         "stage 1 is skipped)")
    ap.add_argument("--val", type=int, default=1000, help="validation items scored after each epoch")
    ap.add_argument("--test", type=int, default=2000, help="test items scored at the end")
    ap.add_argument("--workers", type=int, default=max(1, min(12, (os.cpu_count() or 2) - 4)),
                    help="rendering processes (more starve the training loop of CPU)")
    ap.add_argument("--chunk", type=int, default=64, help="items per rendering job")
    ap.add_argument("--stage1-steps", type=int, default=2000)
    ap.add_argument("--stage1-batch", type=int, default=256)
    ap.add_argument("--stage1-lr", type=float, default=1e-3)
    ap.add_argument("--stage1-time", type=float, default=75.0, help="seconds; stage 1 ends (annealed) by then")
    ap.add_argument("--steps", "--stage2-steps", dest="steps", type=int, default=12000, help="stage-2 steps")
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--qtype-weight", default="",
                    help="sampling weight per question type, e.g. 'relpos=2,count=1.5' (others 1; '' = uniform)")
    ap.add_argument("--lr", type=float, default=1e-3, help="stage-2 LR of projector and decoder")
    ap.add_argument("--vision-lr", type=float, default=0.0,
                    help="stage-2 LR of the vision tower; 0 (default) keeps it frozen, as LLaVA-1.5 does")
    ap.add_argument("--aux-weight", type=float, default=0.2,
                    help="weight of the stage-1 objective kept as an auxiliary loss in stage 2 when the "
                         "tower is trained (--vision-lr > 0); 0: off")
    ap.add_argument("--attn-weight", type=float, default=0.5,
                    help="weight of the grounding loss on the decoder's attention (AttentionProbe; 0: off)")
    ap.add_argument("--attn-layers", default="",
                    help="comma-separated decoder layers the grounding loss supervises (default: the last half)")
    ap.add_argument("--wd", type=float, default=0.05)
    ap.add_argument("--warmup", type=int, default=200)
    ap.add_argument("--budget", type=float, default=480.0,
                    help="seconds from start by which stage 2 ends (its LR schedule is fitted to it); "
                         "the final evaluation and save follow (~15 s)")
    ap.add_argument("--epoch-items", type=int, default=100_000, help="training samples per epoch (val after each)")
    ap.add_argument("--patience", type=int, default=3, help="epochs without val gain (after half the run) -> stop")
    ap.add_argument("--eval-batch", type=int, default=128)
    ap.add_argument("--log-every", type=int, default=50)
    ap.add_argument("--arch", default=None, help="JSON of Arch fields overriding the default sizes")
    ap.add_argument("--bench", action="store_true", help="only time training steps on random data, then exit")
    ap.add_argument("--compile", action=argparse.BooleanOptionalAction, default=torch.cuda.is_available(),
                    help="torch.compile the decoder layers for stage 2 (default: on with CUDA; falls back to "
                         "eager if compilation fails)")
    ap.add_argument("--cache-tower", action=argparse.BooleanOptionalAction, default=True,
                    help="with the tower frozen, compute its features once per item (FeatureCache)")
    args = ap.parse_args(argv)
    if args.quick:
        if args.device.startswith("cuda") and not torch.cuda.is_available():
            args.device = "cpu"
        args.pool, args.val, args.test = min(args.pool, 32), min(args.val, 4), min(args.test, 4)
        args.workers, args.chunk = min(args.workers, 2), 8
        args.stage1_steps, args.stage1_batch = min(args.stage1_steps, 2), min(args.stage1_batch, 2)
        args.steps, args.batch, args.warmup, args.log_every = min(args.steps, 2), min(args.batch, 2), 1, 1
        args.eval_batch, args.epoch_items = 4, 10**9
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    t_start = time.perf_counter()
    family = get_family(args.family)
    arch = family.quick_arch if args.quick else family.arch
    if args.arch:
        arch = Arch(**{**asdict(arch), **json.loads(args.arch)})
    device = torch.device(args.device)
    if args.bench:
        log(json.dumps(bench_throughput(family, arch, device, batches=(4,) if args.quick else (128, 256))))
        return 0
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    random.seed(args.seed)
    torch.manual_seed(args.seed)
    shapes = shapes_module()
    space = LabelSpace(shapes)
    times: dict[str, float] = {}

    # 0. tokenizer, processor, rendering workers (forked before CUDA starts) ------------------------
    texts = vocabulary_texts(shapes, 64 if args.quick else 3000)
    answer_list = [str(a) for a in shapes.ANSWER_VOCAB]
    if args.init:  # continue from a saved model: its own tokenizer and processor
        from vlmprune.eval.qwen import load_processor

        processor = load_processor(args.init)
        tokenizer = processor.tokenizer
    else:
        tokenizer = build_tokenizer(texts, answer_list, family)
        processor = family.build_processor(tokenizer)
    max_answer = max(len(answer_ids(tokenizer, a)) for a in answer_list)  # answer tokens + </s>
    width = max(len(prompt_ids(tokenizer, q, family)) for q in set(texts)) + max_answer + 8
    val_seeds = list(shapes.split_seeds("val", args.val))
    test_seeds = list(shapes.split_seeds("test", args.test))
    train_seeds = list(shapes.split_seeds("train", args.pool, start=args.pool_start))
    n_val, n_test = len(val_seeds), len(test_seeds)
    renderer = Renderer(space, n_val + n_test + len(train_seeds), args.workers)
    try:
        log(f"[data] vocab {len(tokenizer)}, row width {width}, {len(space)} scene labels, {args.workers} rendering "
            f"workers; {time.perf_counter() - t_start:.1f}s")

        # model ------------------------------------------------------------------------------------
        if args.init:
            model = family.model_class().from_pretrained(args.init, dtype=torch.float32)
            log(f"[model] initialised from {args.init}; stage 1 skipped")
        else:
            model = family.build_model(arch, len(tokenizer))
        total = n_params(model)
        sizes = ", ".join(f"{name} {n_params(part) / 1e6:.2f}M" for name, part in family.parts(model).items())
        log(f"[model] {family.name}: {total / 1e6:.2f}M params ({sizes} + lm_head); fp16 ~{2 * total / 2**20:.1f} MiB")
        model.to(device)
        if device.type == "cuda":
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True
        objective = family.objective(space, model).to(device)
        pixels = family.pixel_transform(processor).to(device)
        stream = TrainStream(renderer, n_val + n_test, train_seeds, tokenizer, width, device, args.chunk,
                             inflight=max(2, 3 * args.workers), qtype_weight=parse_weights(args.qtype_weight),
                             family=family)
        stream.pump(at_least=min(len(train_seeds), 8 * args.chunk))
        # validation and test items queue behind the first training chunks
        val_set = EvalSet(renderer, 0, val_seeds, args.chunk)
        test_set = EvalSet(renderer, n_val, test_seeds, args.chunk)
        times["first_batch_s"] = round(time.perf_counter() - t_start, 2)
        log(f"[data] first {stream.ready} training items ready after {times['first_batch_s']:.1f}s")
        history: list[dict] = []
        val_hist: list[dict] = []

        # 1. vision pre-training ---------------------------------------------------------------------
        t1 = time.perf_counter()
        s1_steps = (train_stage1(family, model, objective, pixels, stream, args, device, history, t_start)
                    if args.stage1_steps > 0 and not args.init else 0)
        times["stage1_s"] = round(time.perf_counter() - t1, 2)
        times["stage1_steps"] = s1_steps

        # 2. QA training ------------------------------------------------------------------------------
        t2 = time.perf_counter()
        frozen = args.vision_lr <= 0  # LLaVA-1.5's recipe: the vision tower stays frozen
        use_aux = args.aux_weight > 0 and not frozen
        in_tower = {id(p) for p in family.frozen(model).parameters()}
        vision = [(n, p) for n, p in model.named_parameters() if id(p) in in_tower]
        rest = [(n, p) for n, p in model.named_parameters() if id(p) not in in_tower]
        groups = param_groups(rest, args.lr, args.wd)
        side = []  # vision tower (+ stage-1 heads): clipped on their own, so they cannot throttle the LLM
        if frozen:
            family.frozen(model).requires_grad_(False)
        else:
            side = param_groups(vision, args.vision_lr, args.wd)
            if use_aux:
                side += param_groups(objective.named_parameters(), args.vision_lr, args.wd)
        opt = make_optimizer(groups + side, device)
        main_params = [p for g in groups for p in g["params"]]
        side_params = [p for g in side for p in g["params"]]
        gen = torch.Generator().manual_seed(args.seed + 2)
        steps_per_epoch = max(1, args.epoch_items // args.batch)
        best, best_step, stale, done = -1.0, 0, 0, 0
        run: dict[str, Any] = {}
        model.train()
        objective.train()
        if frozen:
            family.frozen(model).eval()
        stop_reason = "steps"
        deadline = max(1.0, args.budget - (t2 - t_start))
        k = max_answer + 1  # logits of the positions that predict the answer tokens and </s>
        n_layers = model.config.text_config.num_hidden_layers
        attn_layers = [int(x) % n_layers for x in args.attn_layers.split(",")] if args.attn_layers \
            else list(range(n_layers // 2, n_layers))
        probe = AttentionProbe(model, attn_layers) if args.attn_weight > 0 else None
        # the frozen tower's output, computed once per item (its rows come from the GPU-resident pool)
        cache = (FeatureCache(stream.capacity, lambda rows: family.frozen_features(model, pixels(stream.images[rows])),
                              device) if frozen and args.cache_tower else None)
        decoder_layers = list(model.model.language_model.layers)
        compiled = args.compile
        if compiled:
            compile_layers(decoder_layers)

        def forward_backward(idx_cpu, rows, amask, attn, position_ids):
            """Loss of one batch and its backward: (answer logits, their targets, CE, grounding, aux, stats)."""
            idx = idx_cpu.to(device)
            if probe is not None:
                visual = (rows == IMAGE_ID).unsqueeze(1)
                relevant = torch.zeros(visual.shape, device=device)
                relevant.masked_scatter_(visual, family.visual_targets(relevance_target(stream.dense[idx, 4])))
                keys = attn.bool()
                keys[:, rows.shape[1] - k + 1:] = False  # the query sees itself and what comes before
                probe.set(keys, relevant, -k)
            with _amp(device):
                if cache is not None:
                    vision_out = VisionOut(family.project(model, cache.get(idx_cpu)), None)
                else:
                    vision_out = family.vision(model, pixels(stream.images[idx]), frozen=frozen)
                logits = family.lm_forward(model, rows, vision_out.tokens, attn, position_ids, k)
                aux, aux_stats = (family.scene_loss(objective, vision_out, stream.cls[idx], stream.dense[idx])
                                  if use_aux else (None, {}))
            logits = logits[:, :-1].float()
            target = rows[:, -(k - 1):].masked_fill(~amask[:, -(k - 1):], -100)
            loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1), ignore_index=-100)
            grounding = probe.loss() if probe is not None else None
            total_loss = loss
            if aux is not None:
                total_loss = total_loss + args.aux_weight * aux
            if grounding is not None:
                total_loss = total_loss + args.attn_weight * grounding
            opt.zero_grad(set_to_none=True)
            total_loss.backward()
            return logits, target, loss, grounding, aux, aux_stats

        progress = 0.0
        for step in range(args.steps):
            elapsed = time.perf_counter() - t2
            if elapsed > deadline:
                stop_reason = "time budget"
                break
            stream.pump()
            progress = max(step / args.steps, elapsed / deadline)
            set_lr(opt, lr_at(progress, step, 1.0, args.warmup))
            idx_cpu = stream.sample(args.batch, gen)
            # drop the columns that are padding in every row (not when compiled: one static shape)
            keep = 0 if compiled else int(stream.starts[idx_cpu].min())
            idx = idx_cpu.to(device)
            rows, amask = stream.ids[idx, keep:], stream.answer_mask[idx, keep:]
            attn = (rows != PAD_ID).long()
            position_ids = family.position_ids(model, rows, attn)
            try:
                logits, target, loss, grounding, aux, aux_stats = forward_backward(idx_cpu, rows, amask, attn,
                                                                                   position_ids)
            except Exception as e:  # compilation fails (if at all) in the first step: go on eagerly
                if not compiled or done > 0:
                    raise
                log(f"[stage2] torch.compile failed ({type(e).__name__}: {str(e)[:300]}); continuing eagerly")
                uncompile_layers(decoder_layers)
                compiled = False
                logits, target, loss, grounding, aux, aux_stats = forward_backward(idx_cpu, rows, amask, attn,
                                                                                   position_ids)
            torch.nn.utils.clip_grad_norm_(main_params, 1.0)
            if side_params:
                torch.nn.utils.clip_grad_norm_(side_params, 1.0)
            opt.step()
            done = step + 1
            with torch.no_grad():
                hit = ((logits.argmax(-1) == target) | (target == -100)).all(-1).float().mean()
            logged = {"loss": loss.detach(), "train_acc": hit}
            if grounding is not None:
                logged["ground"] = grounding.detach()
            if aux is not None:
                logged.update(aux=aux.detach(), **{f"aux_{n}": v for n, v in aux_stats.items()
                                                   if n in ("cls_exact", "ce_kind")})
            for key, v in logged.items():
                run[key] = run.get(key, 0.0) + v
            run["n"] = run.get("n", 0) + 1
            if step % args.log_every == 0 or done == args.steps:
                n = run.pop("n")
                rec = {"stage": 2, "step": step, **{key: round(float(v) / n, 4) for key, v in run.items()},
                       "lr": opt.param_groups[0]["lr"], "pool": stream.ready, "t": round(time.perf_counter() - t_start, 2)}
                history.append(rec)
                run = {}
                log(f"[stage2] step {step:5d} " + " ".join(f"{key} {rec[key]:.4f}" for key in rec
                                                            if key not in ("stage", "step", "lr", "pool", "t"))
                    + f" lr {rec['lr']:.2e} progress {progress:.2f} pool {stream.ready} {time.perf_counter() - t2:.1f}s")
            if done % steps_per_epoch == 0 or done == args.steps:
                te = time.perf_counter()
                details: dict = {}
                val_items = val_set.items()
                with eager(compiled):
                    acc = evaluate(model, processor, val_items, args.eval_batch, max_answer + 1, details=details)
                epoch = done / steps_per_epoch
                val_hist.append({"epoch": round(epoch, 2), "step": done, "val_acc": round(acc, 4),
                                 "per_qtype": {q: round(v, 4) for q, v in details["per_qtype"].items()},
                                 "t": round(time.perf_counter() - t_start, 2), "eval_s": round(time.perf_counter() - te, 2)})
                stale = 0 if acc > best + 0.002 else stale + 1
                if acc > best:
                    best, best_step = acc, done
                    save_model(model, processor, out)
                log(f"[val] epoch {epoch:.2f} step {done} acc {acc:.4f} (best {best:.4f} @ {best_step}) "
                    f"{ {q: round(v, 3) for q, v in details['per_qtype'].items()} } eval {time.perf_counter() - te:.1f}s,"
                    f" total {time.perf_counter() - t_start:.1f}s")
                _write_log(out, args, arch, total, history, val_hist, times, None)
                if acc >= 0.999:
                    stop_reason = "val acc saturated"
                    break
                if stale >= args.patience and progress >= 0.5:
                    stop_reason = f"plateau ({args.patience} epochs)"
                    break
        if probe is not None:
            probe.remove()
        if compiled:
            uncompile_layers(decoder_layers)
        if cache is not None:
            log(f"[stage2] frozen-tower features computed for {cache.computed} items")
        times["stage2_s"] = round(time.perf_counter() - t2, 2)
        times["stage2_steps"] = done
        times["pool_items"] = stream.ready
        log(f"[stage2] stopped: {stop_reason} after {done} steps, {times['stage2_s']:.0f}s; pool {stream.ready} items")
        val_items, test_items = val_set.items(), test_set.items()
        unk = sum(UNK_ID in tokenizer(it.question)["input_ids"] for it in val_items + test_items)
        if unk:
            log(f"[data] warning: {unk} validation / test questions have words outside the vocabulary")
    finally:
        renderer.close()
    # the run may have ended between evaluations: score (and keep, if better) the last state
    if not val_hist or val_hist[-1]["step"] != done:
        details = {}
        acc = evaluate(model, processor, val_items, args.eval_batch, max_answer + 1, details=details)
        val_hist.append({"epoch": round(done / steps_per_epoch, 2), "step": done, "val_acc": round(acc, 4),
                         "per_qtype": {q: round(v, 4) for q, v in details["per_qtype"].items()},
                         "t": round(time.perf_counter() - t_start, 2)})
        log(f"[val] final step {done} acc {acc:.4f} (best before {best:.4f})")
        if acc >= best:
            best, best_step = acc, done
            save_model(model, processor, out)

    # 3. reload the shipped artifact and score the test split -----------------------------------------
    t3 = time.perf_counter()
    del opt, stream
    model.cpu()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    from vlmprune.eval.qwen import load_processor

    dtype = torch.float16 if device.type == "cuda" else torch.float32
    shipped = family.model_class().from_pretrained(out, dtype=dtype).to(device).eval()
    proc = load_processor(out)  # AutoProcessor; for Qwen2-VL without torchvision, for images only
    details = {}
    test_acc = evaluate(shipped, proc, test_items, args.eval_batch, max_answer + 1, details=details)
    times["test_s"] = round(time.perf_counter() - t3, 2)
    times["total_s"] = round(time.perf_counter() - t_start, 2)
    example = test_items[0]
    test_rec = {"acc": round(test_acc, 4), "n": len(test_items),
                "per_qtype": {q: round(v, 4) for q, v in details["per_qtype"].items()}, "dtype": str(dtype),
                "best_val_acc": round(best, 4), "best_step": best_step, "stop_reason": stop_reason,
                "example": {"question": example.question, "answer": example.answer,
                            "prediction": details["predictions"][0]}}
    _write_log(out, args, arch, total, history, val_hist, times, test_rec)
    size = (out / "model.safetensors").stat().st_size
    log(f"[test] acc {test_acc:.4f} on {len(test_items)} items (reloaded {out}, {dtype}); per type {test_rec['per_qtype']}")
    log(f"[test] example: {example.question!r} -> {details['predictions'][0]!r} (answer {example.answer!r})")
    log(f"[done] model.safetensors {size / 2**20:.2f} MiB, {total / 1e6:.2f}M params; times {times}")
    return 0


def _write_log(out: Path, args, arch: Arch, total: int, history, val_hist, times, test) -> None:
    data = {"args": vars(args), "family": args.family, "arch": asdict(arch), "params": total, "torch": torch.__version__,
            "device": torch.cuda.get_device_name() if args.device.startswith("cuda") and torch.cuda.is_available()
            else "cpu", "times": times, "train": history, "val": val_hist, "test": test}
    tmp = out / "train_log.json.tmp"
    tmp.write_text(json.dumps(data, indent=1))
    tmp.replace(out / "train_log.json")


if __name__ == "__main__":
    # run the package module's main, so that the Qwen2-VL family (which imports it) shares this code
    from vlmprune.eval.train_tiny import main as _main

    sys.exit(_main())
