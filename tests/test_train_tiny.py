"""The tiny-model trainer's quick mode end to end on CPU: it builds, trains a few steps, saves, and
the saved directory reloads offline with `from_pretrained` + `AutoProcessor`; the processor expands
one <image> to 576 tokens and the tokenizer maps every benchmark answer to one token."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch

shapes = pytest.importorskip("vlmprune.eval.shapes")

from vlmprune.eval import train_tiny  # noqa: E402


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    out = tmp_path_factory.mktemp("tiny")
    assert train_tiny.main(["--out", str(out), "--quick", "--device", "cpu", "--workers", "1"]) == 0
    return out


@pytest.fixture(scope="module")
def loaded(trained):
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    old = os.environ.get("HF_HUB_OFFLINE")
    os.environ["HF_HUB_OFFLINE"] = "1"
    try:
        model = LlavaForConditionalGeneration.from_pretrained(trained, local_files_only=True, dtype=torch.float32)
        processor = AutoProcessor.from_pretrained(trained, local_files_only=True)
    finally:
        if old is None:
            os.environ.pop("HF_HUB_OFFLINE", None)
        else:
            os.environ["HF_HUB_OFFLINE"] = old
    return model.eval(), processor


def test_quick_run_writes_the_artifacts(trained):
    names = {p.name for p in trained.iterdir()}
    for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
                 "processor_config.json", "train_log.json"):
        assert name in names, name
    log = json.loads((trained / "train_log.json").read_text())
    assert log["test"] is not None and 0.0 <= log["test"]["acc"] <= 1.0
    assert log["test"]["n"] == 4
    assert any(r["stage"] == 1 for r in log["train"]) and any(r["stage"] == 2 for r in log["train"])
    assert len(log["val"]) >= 1
    from safetensors import safe_open

    with safe_open(str(trained / "model.safetensors"), "pt") as f:
        dtypes = {f.get_slice(k).get_dtype() for k in f.keys()}
    assert dtypes == {"F16"}


def test_reloaded_config_is_llava15_shaped(loaded):
    model, _ = loaded
    cfg = model.config
    assert type(model).__name__ == "LlavaForConditionalGeneration"
    assert cfg.vision_config.image_size == 336 and cfg.vision_config.patch_size == 14
    assert cfg.vision_feature_layer == -2 and cfg.vision_feature_select_strategy == "default"
    assert cfg.image_token_id == train_tiny.IMAGE_ID


def test_processor_expands_one_image_to_576_tokens(loaded):
    model, processor = loaded
    item = shapes.make_item(shapes.split_seeds("test", 1)[0])
    prompt = train_tiny.PROMPT.format(question=item.question)
    inputs = processor(images=item.image, text=prompt, return_tensors="pt")
    ids = inputs["input_ids"][0]
    assert int((ids == processor.image_token_id).sum()) == 576
    assert processor.image_token_id == model.config.image_token_id == 4
    assert tuple(inputs["pixel_values"].shape) == (1, 3, 336, 336)
    assert ids[0].item() == train_tiny.BOS_ID
    # the trainer's own token rows are the processor's
    assert ids.tolist() == train_tiny.prompt_ids(processor.tokenizer, item.question)
    # the chat template renders the same prompt
    chat = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": item.question}]}]
    assert processor.apply_chat_template(chat, add_generation_prompt=True) == prompt
    # and the reloaded model generates from it
    out = model.generate(**inputs, max_new_tokens=3, do_sample=False)
    assert out.shape[0] == 1 and out.shape[1] > ids.shape[0]
    assert isinstance(processor.tokenizer.decode(out[0, ids.shape[0]:], skip_special_tokens=True), str)


def test_every_answer_is_one_token(loaded):
    _, processor = loaded
    tok = processor.tokenizer
    assert tok.convert_tokens_to_ids(["<pad>", "<s>", "</s>", "<unk>", "<image>"]) == [0, 1, 2, 3, 4]
    for answer in shapes.ANSWER_VOCAB:
        ids = tok(str(answer), add_special_tokens=False)["input_ids"]
        assert len(ids) == 1, (answer, ids)
        assert ids[0] != tok.unk_token_id, answer
        assert tok.decode(ids, skip_special_tokens=True).strip() == str(answer).strip().lower(), answer


def test_evaluate_scores_batched_left_padded(loaded):
    model, processor = loaded
    items = [shapes.make_item(s) for s in shapes.split_seeds("val", 3)]
    details: dict = {}
    acc = train_tiny.evaluate(model, processor, items, batch_size=2, details=details)
    assert 0.0 <= acc <= 1.0 and len(details["predictions"]) == 3
    # batching with left padding does not change a row's answer
    single = [train_tiny.predict(model, processor, [it], batch_size=1)[0] for it in items]
    assert single == details["predictions"]


def test_dense_targets_place_each_object_where_its_scene_says():
    """Rows 5 / 6 of `LabelSpace.dense` hold, under each object's box, its centre (0..255 of the
    image side); the class maps mark the centre patch with the object's kind."""
    space = train_tiny.LabelSpace(shapes)
    item = next(it for it in map(shapes.make_item, range(50)) if len(it.scene.objects) >= 2)
    dense = space.dense(item).reshape(train_tiny.DENSE_ROWS, train_tiny.GRID, train_tiny.GRID)
    top = item.scene.objects[-1]  # drawn last, so nothing covers its centre patch
    cx, cy = top.centre
    r, c = int(cy // train_tiny.PATCH_SIZE), int(cx // train_tiny.PATCH_SIZE)
    assert dense[5, r, c] == round(cx / item.scene.width * 255)
    assert dense[6, r, c] == round(cy / item.scene.height * 255)
    assert dense[3, r, c] == 1 + space.kinds.index(top.kind)
    own = (np.arange(train_tiny.GRID) + 0.5) * train_tiny.PATCH_SIZE / item.scene.width * 255
    background = dense[0] == 0  # no object or word: the patch's own centre
    assert background.any()
    assert (dense[5][background] == np.round(np.broadcast_to(own[None, :], background.shape)[background])).all()


def test_qtype_weights_parse_and_refuse_unknown_types():
    assert train_tiny.parse_weights("relpos=2, count=1.5") == {"relpos": 2.0, "count": 1.5}
    assert train_tiny.parse_weights("") == {}
    with pytest.raises(SystemExit, match="'colours=2'.*relpos"):
        train_tiny.parse_weights("colours=2")
