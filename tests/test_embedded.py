"""The shipped models (vlmprune/eval/assets) load offline through the ordinary HF classes, their
processors expand one image to the right number of visual tokens and render our prompt, and they
answer the embedded benchmark's test split as well as recorded in BENCHMARKS.md."""

from __future__ import annotations

import pytest
import torch

from vlmprune.eval import EMBEDDED_MODELS, train_tiny
from vlmprune.eval import shapes
from vlmprune.eval.sweep import embedded_path

# (HF class, visual tokens per 336 px image, floor on the first 64 test items): the 85 %.
EXPECTED = {"shapes-llava": ("LlavaForConditionalGeneration", 576, 0.85),
            "shapes-qwen2-vl": ("Qwen2VLForConditionalGeneration", 144, 0.85)}


@pytest.fixture(scope="module", params=sorted(EMBEDDED_MODELS))
def loaded(request, monkeypatch_module):
    import transformers
    from transformers import AutoProcessor

    name = request.param
    if name == "shapes-qwen2-vl":
        pytest.importorskip("torchvision", reason="transformers builds Qwen2VLProcessor only with torchvision")
    monkeypatch_module.setenv("HF_HUB_OFFLINE", "1")
    path = embedded_path(name)
    cls = getattr(transformers, EXPECTED[name][0])
    model = cls.from_pretrained(path, local_files_only=True, dtype=torch.float32).eval()
    processor = AutoProcessor.from_pretrained(path, local_files_only=True)
    return name, model, processor


@pytest.fixture(scope="module")
def monkeypatch_module():
    with pytest.MonkeyPatch.context() as mp:
        yield mp


def test_assets_are_small_fp16_safetensors():
    total = 0
    for folder in EMBEDDED_MODELS.values():
        path = embedded_path(next(k for k, v in EMBEDDED_MODELS.items() if v == folder))
        from safetensors import safe_open

        with safe_open(str(path / "model.safetensors"), "pt") as f:
            assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"F16"}
        total += sum(p.stat().st_size for p in path.iterdir())
    assert total <= 25 * 2**20


def test_processor_round_trips_a_prompt_with_an_image(loaded):
    name, model, processor = loaded
    item = shapes.make_item(shapes.split_seeds("test", 1)[0])
    fam = train_tiny.get_family(model.config.model_type)
    prompt = fam.prompt.format(question=item.question)
    inputs = processor(images=[item.image], text=[prompt], return_tensors="pt")
    ids = inputs["input_ids"][0]
    assert int((ids == model.config.image_token_id).sum()) == EXPECTED[name][1]
    text = processor.tokenizer.decode(ids, skip_special_tokens=False)
    assert item.question.lower() in text.lower()
    chat = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": item.question}]}]
    assert processor.apply_chat_template(chat, add_generation_prompt=True) == prompt


def test_accuracy_on_64_test_items(loaded):
    name, model, processor = loaded
    items = [shapes.make_item(s) for s in shapes.split_seeds("test", 64)]
    details: dict = {}
    acc = train_tiny.evaluate(model, processor, items, batch_size=16, details=details)
    print(f"{name}: {acc:.4f} on 64 test items {details['per_qtype']}")
    assert acc >= EXPECTED[name][2], (acc, details["per_qtype"])
