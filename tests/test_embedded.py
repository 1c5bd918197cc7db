"""The shipped models (vlmprune/eval/assets) load offline through the ordinary HF classes, their
processors expand one image to the right number of visual tokens and render our prompt, and they
answer the embedded benchmark's test split as well as recorded in BENCHMARKS.md. The Qwen2-VL
model's processor also loads without torchvision (for images only), with the same outputs."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from vlmprune.embedded import train
from vlmprune.eval import EMBEDDED_MODELS
from vlmprune.eval import shapes
from vlmprune.eval.qwen import images_only, load_processor
from vlmprune.eval.sweep import embedded_path

# (HF class, visual tokens per 336 px image, floor on the first 64 test items): the 85 %.
EXPECTED = {"shapes-llava": ("LlavaForConditionalGeneration", 576, 0.85),
            "shapes-qwen2-vl": ("Qwen2VLForConditionalGeneration", 144, 0.85)}


@pytest.fixture(scope="module", params=sorted(EMBEDDED_MODELS))
def loaded(request, monkeypatch_module):
    import transformers

    name = request.param
    monkeypatch_module.setenv("HF_HUB_OFFLINE", "1")
    path = embedded_path(name)
    cls = getattr(transformers, EXPECTED[name][0])
    model = cls.from_pretrained(path, local_files_only=True, dtype=torch.float32).eval()
    processor = load_processor(path, local_files_only=True)  # AutoProcessor; Qwen without torchvision: images only
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
    fam = train.get_family(model.config.model_type)
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
    acc = train.evaluate(model, processor, items, batch_size=16, details=details)
    print(f"{name}: {acc:.4f} on 64 test items {details['per_qtype']}")
    assert acc >= EXPECTED[name][2], (acc, details["per_qtype"])


def qwen_batch(processor, n: int = 8):
    items = [shapes.make_item(s) for s in shapes.split_seeds("test", n)]
    prompts = [train.get_family("qwen2_vl").prompt.format(question=it.question) for it in items]
    processor.tokenizer.padding_side = "left"
    return processor(images=[it.image for it in items], text=prompts, return_tensors="pt", padding=True)


def test_qwen_images_only_processor_equals_the_auto_processor():
    """`images_only(Qwen2VLProcessor)` loads the tokenizer, image processor and chat template of the
    checkpoint: same outputs as `AutoProcessor` (here with the same image backend) and saved as an
    ordinary Qwen2VLProcessor with no video processor."""
    from transformers import AutoProcessor, Qwen2VLProcessor

    path = embedded_path("shapes-qwen2-vl")
    auto = AutoProcessor.from_pretrained(path) if torchvision_available() else None
    only = images_only(Qwen2VLProcessor).from_pretrained(path)
    assert type(only).__name__ == "Qwen2VLProcessor" and not hasattr(only, "video_processor")
    assert only.chat_template and only.image_processor.size.longest_edge == 336 * 336
    got = qwen_batch(only)
    assert got["input_ids"].shape[0] == 8 and (got["image_grid_thw"] == torch.tensor([1, 24, 24])).all()
    if auto is not None:
        want = qwen_batch(auto)
        assert type(auto.image_processor) is type(only.image_processor)
        assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want)


def torchvision_available() -> bool:
    from transformers.utils import is_torchvision_available

    return is_torchvision_available()


NO_TORCHVISION = """
import json, sys
sys.modules["torchvision"] = None  # `import torchvision` fails; transformers sees no torchvision
import torch
from transformers.utils import is_torchvision_available
from vlmprune.eval.fidelity import greedy
from vlmprune.eval.sweep import load_vlm
from vlmprune.eval import shapes
assert not is_torchvision_available()
vlm = load_vlm("shapes-qwen2-vl", "cpu")
items = [shapes.make_item(s) for s in shapes.split_seeds("test", 8)]
inputs = vlm.inputs([it.image for it in items], [it.question for it in items])
torch.save({k: v for k, v in inputs.items()}, sys.argv[1])
gen = greedy(vlm.model, inputs, 4)
print(json.dumps({"processor": type(vlm.processor).__name__, "images": type(vlm.processor.image_processor).__name__,
                  "video": hasattr(vlm.processor, "video_processor"), "n_visual": vlm.n_visual,
                  "answers": [vlm.decode(t) for t in gen.tokens]}))
"""


def test_shapes_qwen2_vl_loads_and_answers_without_torchvision(tmp_path):
    """In a process where torchvision cannot be imported, `load_vlm("shapes-qwen2-vl")` (what
    `vlmprune sweep --model shapes-qwen2-vl` runs) builds its processor for images only on the PIL
    backend; its inputs match this process's to float rounding, and its greedy answers are the same."""
    from vlmprune.eval.fidelity import greedy
    from vlmprune.eval.sweep import load_vlm

    proc = subprocess.run([sys.executable, "-c", NO_TORCHVISION, str(tmp_path / "inputs.pt")], capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    assert got["processor"] == "Qwen2VLProcessor" and got["images"] == "Qwen2VLImageProcessorPil"
    assert not got["video"] and got["n_visual"] == 144
    vlm = load_vlm("shapes-qwen2-vl", "cpu")
    items = [shapes.make_item(s) for s in shapes.split_seeds("test", 8)]
    inputs = vlm.inputs([it.image for it in items], [it.question for it in items])
    theirs = torch.load(tmp_path / "inputs.pt")
    assert theirs.keys() == inputs.keys()
    for k, v in inputs.items():
        same = torch.allclose(theirs[k], v, rtol=0, atol=1e-6) if v.is_floating_point() else torch.equal(theirs[k], v)
        assert same, k
    assert got["answers"] == [vlm.decode(t) for t in greedy(vlm.model, inputs, 4).tokens]
    assert sum(shapes.score(a, it.answer) for a, it in zip(got["answers"], items)) >= 6  # the model answers


def test_qwen_images_only_processor_saves_and_reloads(tmp_path):
    """Saved, the images-only processor is an ordinary Qwen2VLProcessor with no video processor;
    `load_processor` reloads it as such (AutoProcessor wants a video processor there: OSError)."""
    from transformers import Qwen2VLProcessor

    only = images_only(Qwen2VLProcessor).from_pretrained(embedded_path("shapes-qwen2-vl"))
    only.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "processor_config.json").read_text())
    assert saved["processor_class"] == "Qwen2VLProcessor" and "video_processor" not in saved
    back = load_processor(tmp_path)
    assert type(back).__name__ == "Qwen2VLProcessor" and not hasattr(back, "video_processor")
    want, got = qwen_batch(only), qwen_batch(back)
    assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want)
