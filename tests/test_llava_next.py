"""LLaVA-NeXT / LLaVA-OneVision adapters against their oracles (tiny random models on CPU): nothing
pruned == unpatched bit for bit; every vision method == the unpatched model fed only the kept
visual tokens and every `image_newline` token by hand; a left-padded batch (two image sizes, a
two-image row, a text-only row, a video row) generates as its rows alone; `cls` scores each view
with its own CLS row (eager reference)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

import vlmprune
from tests.test_cli import invoke
from tests.test_qwen import placed
from vlmprune.adapters.llava_next import LlavaNextAdapter
from vlmprune.adapters.llava_onevision import LlavaOnevisionAdapter
from vlmprune.eval.tiny import (
    ANYRES_VIDEO,
    IMAGE_TOKEN,
    PAD,
    anyres_inputs,
    tiny_llava,
    tiny_llava_next,
)
from vlmprune.eval.visualise import GAP, views_overlay
from vlmprune.scorers import scorer_class
from vlmprune.scorers.simple import strided_grid
from vlmprune.tables import support_text

FAMILIES = ("llava_next", "llava_onevision")
ADAPTERS = {"llava_next": LlavaNextAdapter, "llava_onevision": LlavaOnevisionAdapter}
CLASSES = {
    "llava_next": "LlavaNextForConditionalGeneration",
    "llava_onevision": "LlavaOnevisionForConditionalGeneration",
}
VISION_METHODS = [
    m for m in vlmprune.available_methods() if scorer_class(m).stage == "vision"
]


def family_row(family: str) -> list:
    """An image with crops (3 views, unpadded) and, on OneVision, a two-frame video after it."""
    return [("image", (40, 60))] + (
        [("video", (2, 0))] if family == "llava_onevision" else []
    )


def batch_rows(family: str) -> list[list]:
    """Two image sizes, a two-image row, a text-only row and (OneVision) a video row."""
    rows = [[("image", (40, 60))], [("image", (28, 28)), ("image", (60, 30))], []]
    return rows + ([[("video", (2, 0))]] if family == "llava_onevision" else [])


def hf_packed(model, inputs) -> list[torch.Tensor]:
    """HF's own packed rows of each item (newlines included), images then videos (a row's order here)."""
    with torch.no_grad():
        out = []
        if "pixel_values" in inputs:
            extra = (
                {"batch_num_images": inputs["batch_num_images"]}
                if "batch_num_images" in inputs
                else {}
            )
            out += list(
                model.model.get_image_features(
                    pixel_values=inputs["pixel_values"],
                    image_sizes=inputs["image_sizes"],
                    return_dict=True,
                    **extra,
                ).pooler_output
            )
        if "pixel_values_videos" in inputs:
            out += list(
                model.model.get_video_features(
                    pixel_values_videos=inputs["pixel_values_videos"], return_dict=True
                ).pooler_output
            )
    return out


def newline_places(model, run: torch.Tensor) -> torch.Tensor:
    """The places of a packed run that hold `image_newline` (found by value: no feature equals it)."""
    return torch.nonzero(
        (run == model.model.image_newline.to(run.dtype)).all(-1)
    ).flatten()


def visual_count(model, inputs) -> list[int]:
    return [len(r) - len(newline_places(model, r)) for r in hf_packed(model, inputs)]


def oracle_logits(
    model, inputs, kept, feats, positions: str = "compact"
) -> torch.Tensor:
    """The unpatched model fed one prompt by hand: its text, and of each item's packed run the kept
    visual tokens (with `feats`, the scorer's features for them) and every newline, in run order."""
    ids = inputs["input_ids"][0].tolist()
    embed = model.get_input_embeddings()
    parts, cols, at, item = [], [], 0, 0
    runs = hf_packed(model, inputs)
    while at < len(ids):
        if ids[at] in (IMAGE_TOKEN, ANYRES_VIDEO):
            run = runs[item].clone()
            lines = newline_places(model, run)
            visual = torch.tensor(
                [p for p in range(len(run)) if p not in set(lines.tolist())]
            )
            run[visual[kept[item]]] = feats[item]
            places = torch.cat([visual[kept[item]], lines]).sort().values
            parts.append(run[places])
            cols += (at + places).tolist()
            at += len(run)
            item += 1
        else:
            parts.append(embed(torch.tensor([ids[at]])))
            cols.append(at)
            at += 1
    position_ids = torch.tensor([cols]) if positions == "original" else None
    with torch.no_grad():
        return model(
            inputs_embeds=torch.cat(parts)[None], position_ids=position_ids
        ).logits[0]


def join_rows(singles: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Single-row inputs as one left-padded batch (pixels zero-padded to the most views)."""
    width = max(s["input_ids"].shape[1] for s in singles)
    out: dict[str, list[torch.Tensor]] = {}
    for s in singles:
        gap = width - s["input_ids"].shape[1]
        out.setdefault("input_ids", []).append(
            torch.nn.functional.pad(s["input_ids"], (gap, 0), value=PAD)
        )
        out.setdefault("attention_mask", []).append(
            torch.nn.functional.pad(s["attention_mask"], (gap, 0))
        )
        out.setdefault("batch_num_images", []).append(
            s.get("batch_num_images", torch.zeros(1, dtype=torch.long))
        )
        for name in ("pixel_values", "image_sizes", "pixel_values_videos"):
            if name in s:
                out.setdefault(name, []).append(s[name])
    views = max(p.shape[1] for p in out["pixel_values"])
    out["pixel_values"] = [
        torch.nn.functional.pad(p, (0, 0) * 4 + (0, views - p.shape[1]))
        for p in out["pixel_values"]
    ]
    batch = {k: torch.cat(v) for k, v in out.items()}
    if "pixel_values_videos" not in singles[0] and all(
        "batch_num_images" not in s for s in singles
    ):
        del batch["batch_num_images"]
    return batch


def row_inputs(model, family: str, seed: int) -> list[dict[str, torch.Tensor]]:
    out = []
    for i, row in enumerate(batch_rows(family)):
        single = anyres_inputs(model, [row], seed=seed + i)
        if family == "llava_next":
            single.pop("batch_num_images", None)
        out.append(single)
    return out


@pytest.mark.parametrize("family", FAMILIES)
def test_keep_all_is_bit_identical(family):
    model = tiny_llava_next(family, seed=1)
    batch = join_rows(row_inputs(model, family, seed=2))
    with torch.no_grad():
        ref = model(**batch).logits
        for method, amount in (
            ("cls", {"keep": 1000}),
            ("divprune", {"prune_ratio": 0.0}),
        ):
            vlmprune.patch(model, method, **amount)
            assert torch.equal(model(**batch).logits, ref), method
    counts = iter(visual_count(model, batch))
    want = [[next(counts) for _ in row] for row in batch_rows(family)]
    got = vlmprune.last_selection(model)
    assert [[len(k) for k in row] for row in got] == want
    assert all(
        torch.equal(k, torch.arange(n))
        for row, ns in zip(got, want)
        for k, n in zip(row, ns)
    )


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("method", VISION_METHODS)
def test_method_matches_hand_fed_oracle(family, method):
    """Every vision method on both families: == the oracle (newlines kept), or the documented error."""
    model = tiny_llava_next(family, seed=3)
    inputs = anyres_inputs(model, [family_row(family)], seed=5)
    documented = support_text(method, ADAPTERS[family])[family]  # the README's table
    if documented == "unsupported":
        with pytest.raises(ValueError) as refused:
            vlmprune.patch(model, method, keep=5)
        for name in (repr(method), CLASSES[family], "'divprune'"):
            assert name in str(refused.value)
        return
    vlmprune.patch(model, method, keep=5)
    with torch.no_grad():
        out = model(**inputs).logits[0]
    kept, feats, _ = placed(model, inputs)
    got = vlmprune.last_selection(model)[0]
    assert [len(k) for k in got] == [5] * len(family_row(family))
    assert all(torch.equal(a, b) for a, b in zip(got, kept))
    vlmprune.unpatch(model)
    ref = oracle_logits(model, inputs, kept, feats)
    n_lines = sum(len(newline_places(model, r)) for r in hf_packed(model, inputs))
    assert (
        out.shape[0]
        == ref.shape[0]
        == inputs["input_ids"].shape[1]
        - sum(visual_count(model, inputs))
        + 5 * len(got)
    )  # every newline (n_lines of them) is still there
    assert n_lines >= 4
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=0)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize(("keep", "positions"), [(0, "compact"), (7, "original")])
def test_keep_zero_leaves_the_newlines_and_original_positions(family, keep, positions):
    model = tiny_llava_next(family, seed=4)
    inputs = anyres_inputs(model, [family_row(family)], seed=6)
    vlmprune.patch(model, "cls", keep=keep, positions=positions)
    with torch.no_grad():
        out = model(**inputs).logits[0]
    kept = vlmprune.last_selection(model)[0]
    assert [len(k) for k in kept] == [keep] * len(kept)
    feats = [
        f[k]
        for f, k in zip(
            model._vlmprune_adapter.encode(
                inputs, model._vlmprune_adapter.read_prompt(inputs)
            ).feats,
            kept,
        )
    ]
    vlmprune.unpatch(model)
    torch.testing.assert_close(
        out, oracle_logits(model, inputs, kept, feats, positions), atol=1e-4, rtol=0
    )


def test_onevision_downscaled_crop_grid_matches_oracle():
    """`anyres_max_1`: the 2x2-crop grid (8x8 tokens) is bilinearly downscaled to 4x4; the signals with it."""
    model = tiny_llava_next("llava_onevision", seed=7)
    model.config.vision_aspect_ratio = "anyres_max_1"
    inputs = anyres_inputs(model, [[("image", (56, 56))]], seed=8)
    assert visual_count(model, inputs) == [16 + 16]
    for method in ("cls", "visionzip"):
        vlmprune.patch(model, method, keep=6)
        with torch.no_grad():
            out = model(**inputs).logits[0]
        kept, feats, _ = placed(model, inputs)
        vlmprune.unpatch(model)
        torch.testing.assert_close(
            out, oracle_logits(model, inputs, kept, feats), atol=1e-4, rtol=0
        )


GENERATE_METHODS = {  # method -> (patch arguments, kept per image: one count, or per family per row)
    "cls": ({"keep": 3}, 3),
    "divprune": ({"keep": 3}, 3),
    "pool": ({"keep": 3}, 3),
    "fastv": ({"layer": 1, "keep": 3}, 3),
    "cls+fastv": ([("cls", {"keep": 8}), ("fastv", {"layer": 1, "keep": 3})], 3),
    "dart": ({"layer": 1, "keep": 6}, 6),
    # the two-image row's first image leaves (and, OneVision, its second), the others stay
    "exit": (
        {"threshold": 0.4, "keep": 0},
        {"llava_next": [[64], [0, 48], []], "llava_onevision": [[64], [0, 0], [], [8]]},
    ),
}


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("method", list(GENERATE_METHODS))
def test_left_padded_batch_generates_as_rows_alone(family, method):
    model = tiny_llava_next(family, seed=9)
    singles = row_inputs(model, family, seed=20)
    batch = join_rows(singles)
    args, kept = GENERATE_METHODS[method]
    if isinstance(args, list):
        vlmprune.patch(model, args)
    else:
        vlmprune.patch(model, method, **args)
    if isinstance(kept, int):
        kept = [[kept] * len(r) for r in batch_rows(family)]
    else:
        kept = kept[family]
    gen = {"max_new_tokens": 4, "min_new_tokens": 4, "do_sample": False}
    with torch.no_grad():
        out = model.generate(**batch, **gen)[:, batch["input_ids"].shape[1] :]
        got = [[len(k) for k in r] for r in vlmprune.last_selection(model)]
        assert got == kept
        for i, single in enumerate(singles):
            alone = model.generate(**single, **gen)[0, single["input_ids"].shape[1] :]
            assert torch.equal(out[i], alone), (i, out[i], alone)


@pytest.mark.parametrize("family", FAMILIES)
def test_dart_text_pivots_are_the_text_after_the_trailing_newline(family, monkeypatch):
    """dart's instruction (its text pivots' pool) is each row's attended text after its last
    placeholder run: the run's trailing `image_newline` is structure, not text (a row whose image
    is followed by text; with the newline counted every count would be one more)."""
    from vlmprune.scorers.dart import DartScorer

    model = tiny_llava_next(family, seed=9)
    batch = join_rows(row_inputs(model, family, seed=20))
    seen = []
    select = DartScorer.select
    monkeypatch.setattr(
        DartScorer,
        "select",
        lambda self, signals, k: (
            seen.append(signals.text_counts) or select(self, signals, k)
        ),
    )
    vlmprune.patch(model, "dart", layer=1, keep=6)
    with torch.no_grad():
        model(**batch)
    placeholder = torch.isin(
        batch["input_ids"], torch.tensor([IMAGE_TOKEN, ANYRES_VIDEO])
    )
    last = torch.where(placeholder, torch.arange(placeholder.shape[1]), -1).amax(1)
    after = (torch.arange(placeholder.shape[1]) > last[:, None]) & batch[
        "attention_mask"
    ].bool()
    want = [
        int(after[b].sum())
        for b, row in enumerate(batch_rows(family))
        for _ in row  # one count per image / video of the row
    ]
    assert seen == [tuple(want)] and min(want) > 0


def view_cls_reference(model, inputs, mode: str) -> torch.Tensor:
    """The eager CLS row (head mean, patches only) of every view at the feature layer, normalised
    per view ("normalised") or not, placed at each visual token of the image by matching its
    feature row to the view patch it was projected from (LLaVA-NeXT only permutes them)."""
    with torch.no_grad():
        pv = inputs["pixel_values"][0, : model._vlmprune_adapter.view_counts(inputs)[0]]
        att = (
            model.model.vision_tower(pv, output_attentions=True)
            .attentions[-2][:, :, 0, 1:]
            .mean(1)
        )
        if mode == "normalised":
            att = att / att.sum(-1, keepdim=True)
        hidden = model.model.vision_tower(pv, output_hidden_states=True).hidden_states[
            -2
        ][:, 1:]
        per_patch = model.model.multi_modal_projector(hidden).flatten(
            0, 1
        )  # [views * P, D]
    run = hf_packed(model, inputs)[0]
    lines = set(newline_places(model, run).tolist())
    visual = run[[p for p in range(len(run)) if p not in lines]]
    match = (visual[:, None, :] == per_patch[None]).all(
        -1
    )  # [N, views * P]: one True per row
    assert (match.sum(1) == 1).all()
    return att.flatten()[match.float().argmax(1)]


@pytest.mark.parametrize("mode", [None, "normalised", "raw"])
def test_cls_scores_every_view_with_its_own_cls_row(mode):
    """`view_scores` at patch time (None: the default, normalised): == the eager per-view rows,
    normalised or raw; the two modes keep different tokens here."""
    eager = tiny_llava_next("llava_next", attn="eager", seed=10)
    inputs = anyres_inputs(eager, [[("image", (40, 60))]], seed=11)
    vlmprune.patch(eager, "cls", keep=9, view_scores=mode)
    with torch.no_grad():
        eager(**inputs)
    got = vlmprune.last_selection(eager)[0][0]
    for ref in ("normalised", "raw"):
        want = view_cls_reference(eager, inputs, ref).topk(9).indices.sort().values
        assert torch.equal(got, want) == (ref == (mode or "normalised")), ref


def test_grids_uniform_spreads_over_views_and_base_only_images_keep_the_tower_grid():
    """An image with crops: grid (1, N) (no raster covers base view and crops); an image alone in
    its view (OneVision, two images in a row): the tower's 4x4 grid."""
    model = tiny_llava_next("llava_onevision", seed=12)
    inputs = anyres_inputs(
        model,
        [[("image", (40, 60))], [("image", (28, 28)), ("image", (60, 30))]],
        seed=13,
    )
    vlmprune.patch(model, "uniform", keep=4)
    with torch.no_grad():
        model(**inputs)
    (a,), (b, c) = vlmprune.last_selection(model)
    n = visual_count(model, inputs)[0]
    assert n > 16 and torch.equal(a, strided_grid(1, n, 4))
    assert torch.equal(b, strided_grid(4, 4, 4)) and torch.equal(
        c, strided_grid(4, 4, 4)
    )


def test_errors_are_clear():
    model = tiny_llava_next("llava_next", seed=14)
    vlmprune.patch(model, "cls", keep=4)
    with pytest.raises(
        ValueError,
        match=r"view_scores must be one of \['normalised', 'raw'\] or None \(family default\), got 'mean'",
    ):
        vlmprune.patch(model, "cls", keep=7, view_scores="mean")
    assert (
        model._vlmprune_adapter.config.keep == 4
    )  # a failed patch leaves the model as it was
    with pytest.raises(
        ValueError,
        match=r"view_scores='raw' is not an option of LlavaForConditionalGeneration; its options: none",
    ):
        vlmprune.patch(tiny_llava(), "cls", keep=4, view_scores="raw")
    inputs = anyres_inputs(model, [[("image", (40, 60))]], seed=15)
    vlmprune.unpatch(model)
    with torch.no_grad():
        mm = {
            "image": model.model.get_image_features(
                pixel_values=inputs["pixel_values"],
                image_sizes=inputs["image_sizes"],
                return_dict=True,
            )
        }
    vlmprune.patch(model, "divprune", keep=4)
    with torch.no_grad(), pytest.raises(ValueError, match="need image_sizes"):
        model(input_ids=inputs["input_ids"], mm_encoder_outputs=dict(mm))
    with (
        torch.no_grad()
    ):  # with image_sizes, features encoded before patching prune as well
        model(
            input_ids=inputs["input_ids"],
            mm_encoder_outputs=dict(mm),
            image_sizes=inputs["image_sizes"],
        )
    assert len(vlmprune.last_selection(model)[0][0]) == 4


def test_supported_models_lists_both_families():
    assert {"llava_next", "llava_onevision"} <= set(vlmprune.supported_models())


def test_fastv_text_query_skips_the_trailing_newline():
    """`fastv` with `query="text"` averages the attention rows of the text after the image: the
    image's trailing `image_newline` (structure) is not one of them (eager reference at layer 0)."""
    eager = tiny_llava_next("llava_next", attn="eager", seed=16)
    inputs = anyres_inputs(eager, [[("image", (40, 60))]], seed=17, after=1)
    with torch.no_grad():
        att = eager(**inputs, output_attentions=True).attentions[0][0].mean(0)
    places = torch.nonzero(inputs["input_ids"][0] == IMAGE_TOKEN).flatten()
    lines = places[newline_places(eager, hf_packed(eager, inputs)[0])]
    visual = places[~torch.isin(places, lines)]
    end = int(places[-1]) + 1  # the run ends with a newline
    assert int(lines[-1]) == end - 1
    rank = lambda first: att[first:, visual].mean(0).topk(6).indices.sort().values
    want, with_newline = rank(end), rank(end - 1)
    assert not torch.equal(
        want, with_newline
    )  # the newline's row would change the choice
    vlmprune.patch(eager, "fastv", layer=1, keep=6, query="text")
    with torch.no_grad():
        eager(**inputs)
    assert torch.equal(vlmprune.last_selection(eager)[0][0], want)


# --- `vlmprune show` on any-resolution images -------------------------------------------------
def save_tiny_llava_next(path, family: str = "llava_next"):
    """The tiny LLaVA-NeXT (or OneVision) saved with its real processor (word-level tokenizer, the
    family's own any-resolution image processor on the model's pinpoints), for `--model PATH`."""
    import transformers

    from tests.test_cli import word_tokenizer

    model = tiny_llava_next(family, seed=18)
    side, vc = model.config.vision_config.image_size, model.config.vision_config
    kwargs = {
        "image_grid_pinpoints": model.config.image_grid_pinpoints,
        "image_mean": [0.5] * 3,
        "image_std": [0.5] * 3,
    }
    if family == "llava_next":
        images = transformers.LlavaNextImageProcessor(
            size={"shortest_edge": side},
            crop_size={"height": side, "width": side},
            **kwargs,
        )
        processor = transformers.LlavaNextProcessor(
            image_processor=images,
            tokenizer=word_tokenizer(),
            patch_size=vc.patch_size,
            vision_feature_select_strategy="default",
            image_token="<image>",
            num_additional_image_tokens=1,
        )
    else:
        square = {"height": side, "width": side}
        processor = transformers.LlavaOnevisionProcessor(
            image_processor=transformers.LlavaOnevisionImageProcessor(
                size=square, **kwargs
            ),
            tokenizer=video_word_tokenizer(),
            video_processor=transformers.LlavaOnevisionVideoProcessor(size=square),
            num_image_tokens=(side // vc.patch_size) ** 2,
            vision_feature_select_strategy=model.config.vision_feature_select_strategy,
            image_token="<image>",
            vision_aspect_ratio=model.config.vision_aspect_ratio,
        )
    processor.save_pretrained(path)
    model.save_pretrained(path)


def video_word_tokenizer():
    """`word_tokenizer` with <video> at the tiny OneVision's video id (its processor counts it)."""
    from tokenizers import models
    from transformers import PreTrainedTokenizerFast

    from tests.test_cli import word_tokenizer

    words = word_tokenizer()
    backend = words.backend_tokenizer
    vocab = {**words.get_vocab(), "<video>": ANYRES_VIDEO}
    backend.model = models.WordLevel(vocab=vocab, unk_token="<unk>")
    special = {"image_token": "<image>", "video_token": "<video>"}
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token="<pad>",
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        extra_special_tokens=special,
    )


BLOCK = (
    slice(8, 21),
    slice(36, 53),
)  # rows, columns of the bright block in a 40 x 60 px image


def block_picture() -> Image.Image:
    """A dark 60 x 40 px image (crops 2x2, unpadded to 6x8 tokens) with one bright block off centre."""
    arr = np.full((40, 60, 3), 20, dtype=np.uint8)
    arr[BLOCK] = (250, 240, 30)
    return Image.fromarray(arr)


def touched_tokens(vlm, image: Image.Image) -> torch.Tensor:
    """The visual tokens whose view patch the block changes (the processor's pixels of the image vs
    the dark image, per patch, packed by HF's own pack_image_features): an oracle independent of
    the mapping under test."""
    dark = Image.new("RGB", image.size, (20, 20, 20))
    pv = [vlm.inputs([im], ["w1"])["pixel_values"][0] for im in (image, dark)]
    p = vlm.model.config.vision_config.patch_size
    diff = (pv[0] - pv[1]).abs().amax(1)  # [views, S, S]
    views = diff.unflatten(1, (-1, p)).unflatten(3, (-1, p)).amax((2, 4))
    strategy = (
        {"vision_feature_select_strategy": "default"}
        if vlm.model.config.model_type == "llava_next"
        else {}
    )
    packed = vlm.model.model.pack_image_features(
        [views.flatten(1)[..., None]],
        vlm.inputs([image], ["w1"])["image_sizes"],
        **strategy,
    )[0][0]
    return torch.nonzero(packed[:, 0] > 1e-3).flatten()


def panel_marks(picture: np.ndarray, image: np.ndarray, panel: int) -> np.ndarray:
    """[H, W] bool: where panel `panel` of a `views_overlay` picture shows the image's own pixels
    (kept), at the image's size (the picture is upscaled by display_scale, panels GAP px apart)."""
    h, w = image.shape[:2]
    scale = picture.shape[0] // h
    left = panel * (w * scale + GAP)
    shown = picture[:, left : left + w * scale][::scale, ::scale]
    return (shown == image).all(-1)


@pytest.mark.parametrize("family", FAMILIES)
def test_show_draws_base_view_and_crops_over_the_original_image(tmp_path, family):
    """Keep exactly the tokens whose patches the bright block touches: both panels show the block
    and dim everything farther than one token cell (+ resampling) from it; keep the others: the
    reverse. Then `vlmprune show --model PATH` end to end (each family with its real processor)."""
    from vlmprune.eval.sweep import load_vlm

    save_tiny_llava_next(tmp_path / "model", family)
    vlm = load_vlm(str(tmp_path / "model"), "cpu")
    image = block_picture()
    arr = np.asarray(image)
    inputs = vlm.inputs([image], ["w1"])
    assert inputs["pixel_values"].shape[1] == 5 and inputs["image_sizes"].tolist() == [
        [40, 60]
    ]
    vlmprune.patch(vlm.model, "cls", keep=4)
    layout = vlm.model._vlmprune_adapter.token_layout(inputs)[0]
    vlmprune.unpatch(vlm.model)
    touched = touched_tokens(vlm, image)
    n = len(layout)
    assert n == 16 + 6 * 8 and 0 < len(touched) < n // 2
    block = np.zeros((40, 60), dtype=bool)
    block[BLOCK] = True
    ys, xs = np.mgrid[:40, :60]
    for cell_h, cell_w, panel in ((10, 15, 0), (40 / 38 * 7, 60 / 56 * 7, 1)):
        picture, _ = views_overlay(image, touched, layout, vlm.model.config)
        shown = panel_marks(np.asarray(picture), arr, panel)
        near = (
            (ys >= BLOCK[0].start - cell_h - 3)
            & (ys < BLOCK[0].stop + cell_h + 3)
            & (xs >= BLOCK[1].start - cell_w - 3)
            & (xs < BLOCK[1].stop + cell_w + 3)
        )
        assert shown[block].all() and not shown[~near].any(), panel
        others = torch.tensor([i for i in range(n) if i not in set(touched.tolist())])
        picture, _ = views_overlay(image, others, layout, vlm.model.config)
        shown = panel_marks(np.asarray(picture), arr, panel)
        assert not shown[block].any() and shown[~near].all(), panel
    image.save(tmp_path / "in.png")
    res = invoke(
        "show", tmp_path / "in.png", "--model", tmp_path / "model", "--method", "cls",
        "--keep", 20, "--device", "cpu", "-o", tmp_path / "out.png",
    )  # fmt: skip
    assert res.exit_code == 0, res.output
    said = " ".join(res.output.split())
    assert "kept 20 of 64 visual tokens (base view 4x4: " in said
    assert (
        "crops 6x8 as packed (unpadded; OneVision: downscaled)" in said
        and "drawn on the 60x40 px image" in said
    )
    with vlmprune.pruning(vlm.model, "cls", keep=20), torch.no_grad():
        vlm.model(**inputs)
        kept = vlmprune.last_selection(vlm.model)[0][0]
    want, _ = views_overlay(image, kept, layout, vlm.model.config)
    assert np.array_equal(
        np.asarray(Image.open(tmp_path / "out.png")), np.asarray(want)
    )


@pytest.mark.parametrize("family", FAMILIES)
def test_sweep_overlays_are_show_s_pictures(tmp_path, family):
    """`sweep --overlays 2` on a saved LLaVA-NeXT / OneVision: each row's first tile is the original image
    (upscaled as drawn), each method's tile is exactly `kept_overlay`'s two-panel picture."""
    from vlmprune.eval.sweep import load_vlm
    from vlmprune.eval.visualise import CAPTION_PX, display_scale, kept_overlay

    save_tiny_llava_next(tmp_path / "model", family)
    images = [block_picture(), Image.new("RGB", (30, 50), (200, 30, 30))]
    for i, image in enumerate(images):
        image.save(tmp_path / f"{i}.png")
    (tmp_path / "d.jsonl").write_text(
        '{"image": "0.png", "question": "w5 w6"}\n{"image": "1.png", "question": "w7"}\n'
    )
    out = tmp_path / "out"
    res = invoke(
        "sweep", "--model", tmp_path / "model", "--data", tmp_path / "d.jsonl", "--methods",
        "cls,uniform", "--keep", 8, "--device", "cpu", "--max-new-tokens", 1, "--out", out,
        "--overlays", 2,
    )  # fmt: skip
    assert res.exit_code == 0, res.output
    grid = np.asarray(Image.open(out / "overlays.png").convert("RGB"))
    vlm = load_vlm(str(tmp_path / "model"), "cpu")
    want = [
        [kept_overlay(vlm, im, m, q, keep=8).picture for m in ("cls", "uniform")]
        for im, q in zip(images, ("w5 w6", "w7"))
    ]
    width = max(p.width for row in want for p in row)
    height = max(p.height for row in want for p in row)
    assert grid.shape == (2 * (height + CAPTION_PX), 3 * width, 3)
    for r, (image, pictures) in enumerate(zip(images, want)):
        top = r * (height + CAPTION_PX) + CAPTION_PX
        s = display_scale(image.size)
        shown = image.resize((image.width * s, image.height * s), Image.NEAREST)
        for c, picture in enumerate([shown, *pictures]):
            tile = grid[
                top : top + picture.height, c * width : c * width + picture.width
            ]
            assert np.array_equal(tile, np.asarray(picture)), (r, c)
    # two panels: the base view and the crops
    assert want[0][0].width > 2 * want[0][0].height
    # the counts: each image's visual tokens without its newlines, as the adapter prunes them
    cells = json.loads((out / "results.json").read_text())["cells"]
    model = vlm.model
    vlmprune.patch(model, "cls", keep=10**6)
    counts = []
    for image, q in zip(images, ("w5 w6", "w7")):
        with torch.no_grad():
            model(**vlm.inputs([image], [q]))
        counts.append([len(k) for k in vlmprune.last_selection(model)[0]])
    vlmprune.unpatch(model)
    assert [r["visual_tokens"] for r in cells["unpruned"]["items"]] == counts
    assert [r["visual_tokens"] for r in cells["cls@keep=8"]["items"]] == [[8], [8]]


def test_lmms_eval_model_args_take_view_scores(tmp_path):
    """`view_scores=raw` in --model_args reaches the patched model; a bad value fails before loading."""
    plugin = pytest.importorskip("vlmprune.eval.lmms_plugin")
    assert (
        plugin.parse_model_args("method=cls,keep=8,view_scores=raw")["view_scores"]
        == "raw"
    )
    with pytest.raises(ValueError, match=r"view_scores must be one of .*got 'mean'"):
        plugin.VLMPrune(
            pretrained="not-loaded", method="cls", keep=8, view_scores="mean"
        )
    with pytest.raises(ValueError, match="need a method"):
        plugin.VLMPrune(pretrained="not-loaded", view_scores="raw")
    save_tiny_llava_next(tmp_path / "model")
    lm = plugin.VLMPrune(
        pretrained=str(tmp_path / "model"),
        method="cls",
        keep=8,
        view_scores="raw",
        device="cpu",
    )
    assert lm.model._vlmprune_adapter.view_scores == "raw"
