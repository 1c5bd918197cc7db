"""The tiny-model trainer on CPU, for both families (`--family llava` / `qwen2_vl`).

End to end: quick mode builds, trains a few steps, saves, and the saved directory reloads offline
with `from_pretrained` + `AutoProcessor` (`qwen.load_processor`); the processor expands one image to the family's visual
tokens (576 / 144) and the tokenizer maps every benchmark answer to one token. Oracles for the
training code's own paths: its GPU-side pixel_values equal the processor's, its vision + decoder
forward equals the model's forward (Qwen2-VL: batched tower, M-RoPE positions equal
`get_rope_index`), its grounding probe's attention row equals eager attention, and batched
evaluation equals per-item evaluation."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch

shapes = pytest.importorskip("vlmprune.eval.shapes")

from vlmprune.embedded import core, train
from vlmprune.eval.tiny import left_pad

FAMILIES = ("llava", "qwen2_vl")
# what each family's processor and prompt give for one 336 px image
EXPECT = {
    "llava": {
        "cls": "LlavaForConditionalGeneration",
        "n_visual": 576,
        "pixels": (1, 3, 336, 336),
        "first": core.BOS_ID,
        "specials": ["<pad>", "<s>", "</s>", "<unk>", "<image>"],
    },
    "qwen2_vl": {
        "cls": "Qwen2VLForConditionalGeneration",
        "n_visual": 144,
        "pixels": (576, 3 * 2 * 14 * 14),
        "first": 5,
        "specials": [
            "<pad>",
            "<s>",
            "</s>",
            "<unk>",
            "<|image_pad|>",
            "<|vision_start|>",
            "<|vision_end|>",
            "<|video_pad|>",
        ],
    },
}


def needs_family(name: str) -> None:
    """Skip Qwen2-VL where a torchvision is installed but does not import (built for another torch):
    transformers then tries its torchvision image processor. Without torchvision at all the family
    builds and reloads its processor for images only (PIL backend; `vlmprune.eval.qwen`)."""
    if name == "qwen2_vl":
        from transformers.utils import is_torchvision_available

        if is_torchvision_available():
            try:
                import torchvision  # noqa: F401
            except Exception as e:  # noqa: BLE001 (a torchvision built for another torch fails anyhow)
                pytest.skip(f"torchvision is installed but does not import: {e}")


def _train(tmp_path_factory, name: str):
    needs_family(name)
    out = tmp_path_factory.mktemp(name)
    assert _train_quick(out, name) == 0
    return out


def _train_quick(out, family: str, *extra: str) -> int:
    """`train.main` of a `--quick` CPU run of `family` into `out`, with `extra` arguments."""
    argv = [
        "--out",
        str(out),
        "--quick",
        "--device",
        "cpu",
        "--workers",
        "1",
        "--family",
        family,
    ]
    return train.main([*argv, *extra])


def _load(path, name: str):
    from vlmprune.eval.qwen import load_processor

    old = os.environ.get("HF_HUB_OFFLINE")
    os.environ["HF_HUB_OFFLINE"] = "1"
    try:
        model = (
            train.get_family(name)
            .model_class()
            .from_pretrained(path, local_files_only=True, dtype=torch.float32)
        )
        processor = load_processor(
            path, local_files_only=True
        )  # AutoProcessor (images only without torchvision)
    finally:
        if old is None:
            os.environ.pop("HF_HUB_OFFLINE", None)
        else:
            os.environ["HF_HUB_OFFLINE"] = old
    return model.eval(), processor


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory):
    """family -> (its quick run's directory, the reloaded model and processor), made on first use."""
    cache: dict = {}

    def get(name: str):
        if name not in cache:
            path = _train(tmp_path_factory, name)
            cache[name] = (path, _load(path, name))
        return cache[name]

    return get


@pytest.fixture(params=FAMILIES)
def family(request):
    needs_family(request.param)
    return request.param


@pytest.fixture
def trained(family, artifacts):
    return artifacts(family)[0]


@pytest.fixture
def loaded(family, artifacts):
    return artifacts(family)[1]


def items_of(split: str, n: int) -> list:
    return [shapes.make_item(s) for s in shapes.split_seeds(split, n)]


def uint8_images(items) -> torch.Tensor:
    return torch.from_numpy(
        np.stack([np.asarray(it.image.convert("RGB")) for it in items])
    )


def random_model(name: str, processor, attn: str = "sdpa"):
    """A fresh quick-size model of the family, its weights shaken (N(0, 0.3) added) so that its
    greedy answers differ from item to item: checks on its outputs bite."""
    fam = train.get_family(name)
    model = fam.build_model(
        fam.quick_arch, len(processor.tokenizer), attn=attn, seed=1
    ).eval()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.3 * torch.randn(p.shape, generator=g))
    return model


# --------------------------------------------------------------------------------------------
# the quick run and its artifacts
# --------------------------------------------------------------------------------------------
def test_quick_run_writes_the_artifacts(trained, family):
    names = {p.name for p in trained.iterdir()}
    for name in (
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
        "processor_config.json",
        "chat_template.jinja",
        "train_log.json",
    ):
        assert name in names, name
    log = json.loads((trained / "train_log.json").read_text())
    assert log["family"] == family
    assert log["test"] is not None and 0.0 <= log["test"]["acc"] <= 1.0
    assert log["test"]["n"] == 4
    assert any(r["stage"] == 1 for r in log["train"]) and any(
        r["stage"] == 2 for r in log["train"]
    )
    assert len(log["val"]) >= 1
    from safetensors import safe_open

    with safe_open(str(trained / "model.safetensors"), "pt") as f:
        dtypes = {f.get_slice(k).get_dtype() for k in f.keys()}  # noqa: SIM118 (safe_open is not iterable)
    assert dtypes == {"F16"}


def test_continued_run_starts_from_the_saved_model(trained, family, tmp_path):
    """`--init DIR` skips stage 1 and trains the saved weights: with a zero learning rate the
    continued run saves exactly the weights it started from."""
    from safetensors.torch import load_file

    out = tmp_path / "continued"
    assert (
        _train_quick(
            out, family, "--init", str(trained), "--pool-start", "1000", "--lr", "0"
        )
        == 0
    )
    log = json.loads((out / "train_log.json").read_text())
    assert log["args"]["init"] == str(trained) and log["times"]["stage1_steps"] == 0
    assert not any(r["stage"] == 1 for r in log["train"])
    before, after = (
        load_file(str(trained / "model.safetensors")),
        load_file(str(out / "model.safetensors")),
    )
    assert before.keys() == after.keys() and all(
        torch.equal(before[k], after[k]) for k in before
    )


def test_reloaded_config_is_llava15_shaped(artifacts):
    model, _ = artifacts("llava")[1]
    cfg = model.config
    assert type(model).__name__ == "LlavaForConditionalGeneration"
    assert cfg.vision_config.image_size == 336 and cfg.vision_config.patch_size == 14
    assert (
        cfg.vision_feature_layer == -2
        and cfg.vision_feature_select_strategy == "default"
    )
    assert cfg.image_token_id == core.IMAGE_ID


def test_reloaded_config_is_qwen2_vl_shaped(artifacts):
    needs_family("qwen2_vl")
    model, processor = artifacts("qwen2_vl")[1]
    cfg = model.config
    assert type(model).__name__ == "Qwen2VLForConditionalGeneration"
    v, t = cfg.vision_config, cfg.text_config
    assert (v.patch_size, v.spatial_merge_size, v.temporal_patch_size) == (14, 2, 2)
    assert v.hidden_size == t.hidden_size  # the merger projects to the decoder's width
    section = t.rope_parameters["mrope_section"]
    assert sum(section) == t.hidden_size // t.num_attention_heads // 2
    tok = processor.tokenizer
    assert (
        cfg.image_token_id
        == tok.convert_tokens_to_ids("<|image_pad|>")
        == core.IMAGE_ID
    )
    assert cfg.vision_start_token_id == tok.convert_tokens_to_ids("<|vision_start|>")
    assert cfg.vision_end_token_id == tok.convert_tokens_to_ids("<|vision_end|>")
    assert (
        cfg.video_token_id
        == tok.convert_tokens_to_ids("<|video_pad|>")
        != tok.unk_token_id
    )
    assert type(processor).__name__ == "Qwen2VLProcessor"
    assert type(processor.image_processor).__name__.startswith("Qwen2VLImageProcessor")


def test_default_qwen2_vl_fits_in_10_mib(tmp_path):
    """The default Qwen2-VL sizes with the full vocabulary: fp16 safetensors of at most 10 MiB."""
    fam = train.get_family("qwen2_vl")
    tok = core.build_tokenizer(
        core.vocabulary_texts(shapes, 200), map(str, shapes.ANSWER_VOCAB), fam
    )
    model = fam.build_model(
        fam.arch, len(tok) + 16
    )  # margin for words of later training seeds
    core.save_model(model, None, tmp_path)
    assert (tmp_path / "model.safetensors").stat().st_size <= 10 * 2**20
    cfg = model.config
    assert (
        cfg.vision_config.embed_dim,
        cfg.vision_config.depth,
        cfg.vision_config.num_heads,
    ) == (192, 6, 4)
    assert (cfg.text_config.hidden_size, cfg.text_config.num_hidden_layers) == (256, 4)
    assert cfg.text_config.rope_parameters["mrope_section"] == [8, 12, 12]


def test_processor_expands_one_image(loaded, family):
    model, processor = loaded
    expect, fam = EXPECT[family], train.get_family(family)
    item = items_of("test", 1)[0]
    prompt = fam.prompt.format(question=item.question)
    inputs = processor(images=item.image, text=prompt, return_tensors="pt")
    ids = inputs["input_ids"][0]
    assert int((ids == processor.image_token_id).sum()) == expect["n_visual"]
    assert processor.image_token_id == model.config.image_token_id == core.IMAGE_ID
    assert tuple(inputs["pixel_values"].shape) == expect["pixels"]
    if family == "qwen2_vl":
        assert inputs["image_grid_thw"].tolist() == [[1, 24, 24]]
        assert (
            inputs["mm_token_type_ids"][0].tolist()
            == (ids == core.IMAGE_ID).long().tolist()
        )
    assert ids[0].item() == expect["first"]
    # the trainer's own token rows are the processor's
    assert ids.tolist() == core.prompt_ids(processor.tokenizer, item.question, fam)
    # the chat template renders the same prompt
    chat = [
        {
            "role": "user",
            "content": [{"type": "image"}, {"type": "text", "text": item.question}],
        }
    ]
    assert processor.apply_chat_template(chat, add_generation_prompt=True) == prompt
    # and the reloaded model generates from it
    out = model.generate(**inputs, max_new_tokens=3, do_sample=False)
    assert out.shape[0] == 1 and out.shape[1] > ids.shape[0]
    assert isinstance(
        processor.tokenizer.decode(out[0, ids.shape[0] :], skip_special_tokens=True),
        str,
    )


def test_every_answer_is_one_token(loaded, family):
    _, processor = loaded
    tok = processor.tokenizer
    specials = EXPECT[family]["specials"]
    assert tok.convert_tokens_to_ids(specials) == list(range(len(specials)))
    for answer in shapes.ANSWER_VOCAB:
        ids = tok(str(answer), add_special_tokens=False)["input_ids"]
        assert len(ids) == 1, (answer, ids)
        assert ids[0] != tok.unk_token_id, answer
        assert (
            tok.decode(ids, skip_special_tokens=True).strip()
            == str(answer).strip().lower()
        ), answer


def test_evaluate_scores_batched_left_padded(loaded, family):
    _, processor = loaded
    model = random_model(family, processor)
    items = items_of("val", 4)
    details: dict = {}
    acc = train.evaluate(model, processor, items, batch_size=4, details=details)
    assert 0.0 <= acc <= 1.0 and len(details["predictions"]) == 4
    assert (
        len(set(details["predictions"])) > 1
    )  # the random model's answers differ: the check below bites
    # batching with left padding does not change a row's answer
    single = [train.predict(model, processor, [it], batch_size=1)[0] for it in items]
    assert single == details["predictions"]


# --------------------------------------------------------------------------------------------
# the training code's own paths against the model's
# --------------------------------------------------------------------------------------------
def test_gpu_pixel_values_equal_the_processors(loaded, family):
    """`Family.pixel_transform` (uint8 images -> pixel_values, what training runs on the GPU) gives
    the processor's `pixel_values`: bit for bit for Qwen2-VL (patch layout included), to float
    rounding for LLaVA's CLIP normalisation."""
    _, processor = loaded
    items = items_of("val", 3)
    expected = processor.image_processor(
        images=[it.image for it in items], return_tensors="pt"
    )["pixel_values"]
    got = train.get_family(family).pixel_transform(processor)(uint8_images(items))
    assert got.shape == expected.shape
    if family == "qwen2_vl":
        assert torch.equal(got, expected)
    else:
        torch.testing.assert_close(got, expected, atol=1e-6, rtol=0)


def test_training_forward_equals_the_models_forward(loaded, family):
    """`Family.vision` + `Family.lm_forward` with `Family.position_ids` (what training runs) gives the
    logits of the model's own forward on the processor's left-padded batch; for Qwen2-VL that
    forward computes its M-RoPE positions with `get_rope_index` and runs the tower per image."""
    _, processor = loaded
    fam = train.get_family(family)
    model = random_model(family, processor)
    items = items_of("val", 3)
    inputs = processor(
        images=[it.image for it in items],
        text=[fam.prompt.format(question=it.question) for it in items],
        return_tensors="pt",
        padding=True,
    )
    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    assert (mask == 0).any()  # the rows are left-padded
    k = 6
    with torch.no_grad():
        out = fam.vision(
            model, fam.pixel_transform(processor)(uint8_images(items)), frozen=True
        )
        got = fam.lm_forward(
            model, ids, out.tokens, mask, fam.position_ids(model, ids, mask), k
        )
        kwargs = {}
        if family == "llava":  # as generate() prepares them
            kwargs["position_ids"] = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 1)
        expected = model(**inputs, **kwargs, logits_to_keep=k).logits
    torch.testing.assert_close(
        got, expected, atol=1e-4, rtol=1e-4
    )  # fp32 sums in another order


def test_qwen2_vl_positions_equal_get_rope_index():
    """`mrope_positions` (vectorised) == the model's own `get_rope_index` on left-padded rows with one
    image, and on rows with two images."""
    from vlmprune.embedded import qwen2_vl as q

    model = q.QWEN2_VL.build_model(core.QUICK_ARCH, 40)
    image = [q.VISION_START_ID] + [core.IMAGE_ID] * q.N_VISUAL + [q.VISION_END_ID]
    for rows, n_images in (
        ([image + list(range(10, 10 + n)) for n in (3, 7, 5)], 3),
        ([image + [9] + image + [11, 12], [13] + image + [14] + image], 4),
    ):
        ids, mask = left_pad(rows)
        expected, _ = model.model.get_rope_index(
            ids,
            mm_token_type_ids=(ids == core.IMAGE_ID).int(),
            image_grid_thw=torch.tensor([[1, 24, 24]] * n_images),
            attention_mask=mask,
        )
        assert torch.equal(q.mrope_positions(ids, mask), expected)


def test_qwen2_vl_tower_order_and_window_targets():
    """Token i of the tower is patch `window_order()[i]` (the model's own vision position ids say
    so); a merged token's targets are its 2 x 2 window's label histogram and mean object position;
    grounding targets pool to the merged token that holds the patch."""
    from transformers.vision_utils import get_vision_position_ids

    from vlmprune.embedded import qwen2_vl as q

    order = q.window_order()
    pos = get_vision_position_ids(torch.tensor([[1, 24, 24]]), 2)
    assert torch.equal(pos[:, 0], order // 24) and torch.equal(pos[:, 1], order % 24)
    assert torch.equal(q.on_device("positions", torch.device("cpu")), pos)
    dense = torch.zeros((1, core.DENSE_ROWS, 24, 24), dtype=torch.uint8)
    dense[0, 0, 0, 0], dense[0, 0, 0, 1], dense[0, 0, 1, 0] = (
        3,
        3,
        5,
    )  # kinds in the first window
    dense[0, 1, 23, 23] = 2  # a colour in the last window's last patch
    dense[0, 5, 0, :2] = 100  # object x under two patches of the first window
    raster = dense.reshape(1, core.DENSE_ROWS, 576)
    soft, where = q.window_targets(raster[:, :, order], [12, 7])
    assert (
        soft[0][0, 0, [0, 3, 5]].tolist() == [0.25, 0.5, 0.25]
        and soft[0][0, 1, 0] == 1.0
    )
    assert soft[1][0, 143, [0, 2]].tolist() == [0.75, 0.25]
    assert where[0, 0].tolist() == pytest.approx([50 / 255, 0.0])
    heads = torch.zeros((1, 2, 576))
    heads[0, 1, 5 * 24 + 7] = 1  # patch (5, 7) -> merged token (2, 3)
    pooled = q.QWEN2_VL.visual_targets(heads)
    assert pooled.shape == (1, 2, 144) and pooled[
        0, 1
    ].nonzero().flatten().tolist() == [2 * 12 + 3]
    assert pooled[0, 0].sum() == 0


def test_attention_probe_row_equals_eager_attention(loaded, family):
    """The grounding probe's attention row (recomputed from q / k and the decoder's cos / sin: 1-D
    RoPE, or Qwen2-VL's M-RoPE) equals the eager attention weights of the same layer."""
    _, processor = loaded
    fam = train.get_family(family)
    model = random_model(family, processor, attn="eager")
    items = items_of("val", 2)
    inputs = processor(
        images=[it.image for it in items],
        text=[fam.prompt.format(question=it.question) for it in items],
        return_tensors="pt",
        padding=True,
    )
    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    layer = model.config.text_config.num_hidden_layers - 1
    attn = model.model.language_model.layers[layer].self_attn
    probe = core.AttentionProbe(model, [])
    probe.key_mask, probe.query_index = mask.bool(), -1
    seen = {}
    handle = attn.register_forward_pre_hook(
        lambda m, a, kw: seen.update(kw), with_kwargs=True
    )
    try:
        with torch.no_grad():
            out = fam.vision(
                model, fam.pixel_transform(processor)(uint8_images(items)), frozen=True
            )
            fam.lm_forward(
                model, ids, out.tokens, mask, fam.position_ids(model, ids, mask), 1
            )
            row = probe.attention_row(
                attn, seen["hidden_states"], seen["position_embeddings"]
            )
            kwargs = (
                {"position_ids": (mask.cumsum(-1) - 1).masked_fill(mask == 0, 1)}
                if family == "llava"
                else {}
            )
            eager = model(**inputs, **kwargs, output_attentions=True).attentions[layer][
                :, : probe.heads, -1
            ]
    finally:
        handle.remove()
    torch.testing.assert_close(row, eager.float(), atol=1e-5, rtol=1e-4)


def test_cached_frozen_features_give_the_visual_tokens(loaded, family):
    """Stage 2 with the tower frozen reads each item's `frozen_features` from a `FeatureCache`: the
    projection of the cached features is `vision(frozen=True)`'s tokens exactly, and each item's
    features are computed once however often batches draw it."""
    _, processor = loaded
    fam = train.get_family(family)
    model = random_model(family, processor)
    pixels = fam.pixel_transform(processor)
    images = uint8_images(items_of("val", 4))
    calls = []

    def compute(rows):
        calls.append(rows.tolist())
        return fam.frozen_features(model, pixels(images[rows]))

    cache = core.FeatureCache(len(images), compute, torch.device("cpu"), chunk=2)
    with torch.no_grad():
        expected = fam.vision(model, pixels(images), frozen=True).tokens
        first = fam.project(model, cache.get(torch.tensor([3, 1, 3])))
        second = fam.project(model, cache.get(torch.tensor([0, 1, 2, 3, 2])))
    assert torch.equal(first, expected[[3, 1, 3]]) and torch.equal(
        second, expected[[0, 1, 2, 3, 2]]
    )
    assert calls == [[1, 3], [0, 2]] and cache.computed == 4


# --------------------------------------------------------------------------------------------
# targets and options
# --------------------------------------------------------------------------------------------
def test_dense_targets_place_each_object_where_its_scene_says():
    """Rows 5 / 6 of `LabelSpace.dense` hold, under each object's box, its centre (0..255 of the
    image side); the class maps mark the centre patch with the object's kind."""
    space = core.LabelSpace(shapes)
    item = next(
        it for it in map(shapes.make_item, range(50)) if len(it.scene.objects) >= 2
    )
    dense = space.dense(item).reshape(core.DENSE_ROWS, core.GRID, core.GRID)
    top = item.scene.objects[-1]  # drawn last, so nothing covers its centre patch
    cx, cy = top.centre
    r, c = int(cy // core.PATCH_SIZE), int(cx // core.PATCH_SIZE)
    assert dense[5, r, c] == round(cx / item.scene.width * 255)
    assert dense[6, r, c] == round(cy / item.scene.height * 255)
    assert dense[3, r, c] == 1 + space.kinds.index(top.kind)
    own = (np.arange(core.GRID) + 0.5) * core.PATCH_SIZE / item.scene.width * 255
    background = dense[0] == 0  # no object or word: the patch's own centre
    assert background.any()
    assert (
        dense[5][background]
        == np.round(np.broadcast_to(own[None, :], background.shape)[background])
    ).all()


def test_qtype_weights_parse_and_refuse_unknown_types():
    assert core.parse_weights("relpos=2, count=1.5") == {"relpos": 2.0, "count": 1.5}
    assert core.parse_weights("") == {}
    with pytest.raises(SystemExit, match="'colours=2'.*relpos"):
        core.parse_weights("colours=2")


def test_unknown_family_is_refused():
    with pytest.raises(ValueError, match="'gemma'.*llava, qwen2_vl"):
        train.get_family("gemma")
    with pytest.raises(SystemExit):
        train.parse_args(["--out", "x", "--family", "gemma"])
