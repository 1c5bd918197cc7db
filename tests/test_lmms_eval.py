"""lmms-eval integration, offline: `--model vlmprune` is found through our entry point, and lmms-eval's
own CLI runs the shapes task on a random-weight LLaVA saved to disk (576 visual tokens per image,
cls keep=16), in one process and then in two data-parallel processes. The answers it logs are
those of the model patched directly with vlmprune; the prompt lengths it logs are the pruned ones;
the accuracy is recomputed from the samples. The shipped Qwen2-VL model (`pretrained=shapes-qwen2-vl`,
144 tokens per image) runs the same way, and Qwen processors take `min_pixels` / `max_pixels`.
Skipped when lmms-eval is not installed."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from importlib.metadata import entry_points
from pathlib import Path

import pytest
import torch

lmms_eval = pytest.importorskip("lmms_eval")

import vlmprune  # noqa: E402
from tests.test_lmms_task import crafted_predictions  # noqa: E402
from vlmprune.embedded import core, llava, train  # noqa: E402
from vlmprune.eval import lmms, shapes  # noqa: E402

LIMIT = 5
KEEP = 16
N_VISUAL = llava.N_VISUAL  # 576


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    """A random-weight LLaVA-1.5-architecture model with the benchmark's tokenizer and processor,
    saved as the trainer (`vlmprune.embedded`) saves its model (random weights answer with image-dependent word strings)."""
    out = tmp_path_factory.mktemp("model")
    tokenizer = core.build_tokenizer(core.vocabulary_texts(shapes, 64), map(str, shapes.ANSWER_VOCAB), llava.LLAVA)
    model = llava.build_model(core.QUICK_ARCH, len(tokenizer))
    core.save_model(model, llava.build_processor(tokenizer), out)
    return out


@pytest.fixture(scope="module")
def loaded(model_dir):
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    model = LlavaForConditionalGeneration.from_pretrained(model_dir, dtype=torch.float32).eval()
    return model, AutoProcessor.from_pretrained(model_dir)


@pytest.fixture(scope="module")
def direct(loaded):
    """Greedy answers of the first LIMIT test items, one at a time, unpatched and patched by hand."""
    model, processor = loaded
    items = [shapes.make_item(seed) for seed in shapes.split_seeds("test", LIMIT)]
    unpatched = train.predict(model, processor, items, batch_size=1, max_new_tokens=8)
    with vlmprune.pruning(model, "cls", keep=KEEP):
        patched = train.predict(model, processor, items, batch_size=1, max_new_tokens=8)
    return {"items": items, "unpatched": unpatched, "patched": patched}


def lmms_eval_cli(model_dir: Path | str, out: Path, launcher: list[str],
                  keep: int = KEEP) -> tuple[str, dict, list[dict]]:
    """Run lmms-eval's CLI on the shapes task offline; (its output, results.json, samples by doc)."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "CUDA_VISIBLE_DEVICES": "",
           "HF_DATASETS_CACHE": str(out / "datasets-cache")}
    model_args = f"pretrained={model_dir},method=cls,keep={keep},batch_size=2,device=cpu"
    args = ["--model", "vlmprune", "--model_args", model_args, "--tasks", "vlmprune_shapes",
            "--include_path", lmms.task_path(), "--limit", str(LIMIT), "--output_path", str(out), "--log_samples"]
    proc = subprocess.run([*launcher, "-m", "lmms_eval", *args], env=env, capture_output=True, text=True, timeout=300)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-4000:]
    results = json.loads(next(out.rglob("*_results.json")).read_text())
    lines = next(out.rglob("*_samples_vlmprune_shapes.jsonl")).read_text().splitlines()
    return log, results, sorted((json.loads(line) for line in lines), key=lambda s: s["doc_id"])


@pytest.fixture(scope="module")
def single(model_dir, tmp_path_factory):
    return lmms_eval_cli(model_dir, tmp_path_factory.mktemp("single"), [sys.executable])


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_entry_point_registers_the_model():
    from lmms_eval.models import get_model, get_model_manifest

    from vlmprune.eval.lmms_plugin import VLMPrune

    (ep,) = [ep for ep in entry_points(group="lmms_eval.models") if ep.name == "vlmprune"]
    assert ep.value == "vlmprune.eval.lmms:model_manifest"
    assert get_model_manifest("vlmprune").simple_class_path == "vlmprune.eval.lmms_plugin.VLMPrune"
    assert get_model("vlmprune") is VLMPrune


def test_cli_answers_are_vlmprune_s(single, direct, loaded):
    log, results, samples = single
    assert direct["patched"] != direct["unpatched"]  # pruning to 16 tokens changes this model's answers
    assert [(s["doc_id"], s["input"], s["target"]) for s in samples] == [
        (i, it.question, it.answer) for i, it in enumerate(direct["items"])]
    assert [s["filtered_resps"] for s in samples] == direct["patched"]
    assert results["n-samples"]["vlmprune_shapes"] == {"original": 2000, "effective": LIMIT}
    # the patch ran inside lmms-eval: each logged prompt is the pruned one, and the plugin's count
    _, processor = loaded
    removed = N_VISUAL - KEEP
    pruned = [len(core.prompt_ids(processor.tokenizer, it.question, llava.LLAVA)) - removed for it in direct["items"]]
    assert [s["token_counts"][0]["input_tokens"] for s in samples] == pruned
    assert f"vlmprune cls keep={KEEP}: kept {KEEP} of {N_VISUAL} visual tokens per image over {LIMIT} images" in log


def test_cli_accuracy_is_recomputed_from_the_samples(single):
    _, results, samples = single
    hits = [float(shapes.score(s["filtered_resps"], s["target"])) for s in samples]
    assert [s["accuracy"] for s in samples] == hits
    assert results["results"]["vlmprune_shapes"]["accuracy,none"] == sum(hits) / LIMIT
    for qtype, hit in zip(shapes.QTYPES, hits):  # the first five items hold one of each type, in this order
        assert results["results"]["vlmprune_shapes"][f"accuracy_{qtype},none"] == hit


def test_data_parallel_run_gathers_the_same_samples(model_dir, single, tmp_path):
    """`accelerate launch --num_processes 2` (two CPU processes over gloo here): each rank gets its
    shard, and the gathered samples are those of the one-process run."""
    launcher = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
                "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
                "--main_process_port", str(free_port())]
    log, results, samples = lmms_eval_cli(model_dir, tmp_path, launcher)
    assert "Running on rank 1" in log
    # ranks get docs 0, 2, 4 and 1, 3 (+ one padding request): three images each
    assert log.count(f"kept {KEEP} of {N_VISUAL} visual tokens per image over 3 images") == 2
    key = lambda s: (s["doc_id"], s["filtered_resps"], s["token_counts"], s["accuracy"])  # noqa: E731
    assert [key(s) for s in samples] == [key(s) for s in single[2]]
    assert results["results"] == single[1]["results"]


def test_loglikelihood_matches_greedy_generation(model_dir, loaded):
    """The plugin's log-likelihood of the patched model's own greedy continuation is the sum of the
    log-probs `generate` scored it with, and is flagged greedy; another first word is not."""
    from lmms_eval.api.instance import Instance
    from lmms_eval.models import get_model

    model, processor = loaded
    lm = get_model("vlmprune").create_from_arg_string(f"pretrained={model_dir},method=cls,keep={KEEP}",
                                                      {"batch_size": 1, "device": "cpu"})
    doc = lmms.shapes_rows(1)[0]
    lm.task_dict = {"shapes": {"test": [doc]}}
    with vlmprune.pruning(model, "cls", keep=KEEP):
        prompt = llava.PROMPT.format(question=doc["question"])
        inputs = processor(images=lmms.shapes_doc_to_visual(doc), text=[prompt], return_tensors="pt")
        gen = model.generate(**inputs, max_new_tokens=3, do_sample=False, output_scores=True,
                             return_dict_in_generate=True)
    tokens = gen.sequences[0, inputs["input_ids"].shape[1]:]
    expected = sum(float(torch.log_softmax(s[0].float(), -1)[t]) for s, t in zip(gen.scores, tokens))
    words = processor.tokenizer.convert_ids_to_tokens(tokens.tolist())  # word-level: one piece per word
    assert len(words) == 3 and not set(tokens.tolist()) & set(processor.tokenizer.all_special_ids)
    other = next(w for w in shapes.WORDS if w != words[0])

    def request(continuation: str) -> Instance:
        args = (doc["question"], continuation, lmms.shapes_doc_to_visual, 0, "shapes", "test")
        return Instance("loglikelihood", args, 0, {"task": "shapes", "doc_id": 0, "repeats": 1})

    (full, full_greedy), (first, first_greedy), (wrong, wrong_greedy) = lm.loglikelihood(
        [request(" " + " ".join(words)), request(" " + words[0]), request(" " + other)])
    assert full == pytest.approx(expected, abs=1e-3) and full_greedy
    assert first_greedy and not wrong_greedy and wrong < first
    assert [[len(s) for s in row] for row in vlmprune.last_selection(lm.model)] == [[KEEP]]


@pytest.mark.parametrize("name", ["vlmprune_shapes", "vlmprune_shapes_short"])
def test_task_yaml_as_lmms_eval_reads_it(name):
    """lmms-eval's YAML loader resolves the data file next to the YAML, and each metric of the YAML
    aggregates to the accuracy it names."""
    from lmms_eval.utils import load_yaml_config

    config = load_yaml_config(str(Path(lmms.task_path()) / "shapes" / f"{name}.yaml"))
    assert config["task"] == name
    assert config["dataset_kwargs"]["data_files"] == {"test": str(lmms.SHAPES_DATA)}
    rows, preds, expected = crafted_predictions()
    per_doc = [config["process_results"](r, [p]) for r, p in zip(rows, preds)]
    got = {}
    for metric in config["metric_list"]:
        values = [d[metric["metric"]] for d in per_doc]
        aggregate = metric["aggregation"]
        got[metric["metric"]] = sum(values) / len(values) if aggregate == "mean" else aggregate(values)
    assert got == pytest.approx(expected)
    prompt = config["doc_to_text"](rows[0], config["lmms_eval_specific_kwargs"]["default"])
    short = "\nAnswer the question using a single word or phrase."
    assert prompt == rows[0]["question"] + (short if name.endswith("short") else "")


def test_model_args_are_checked_before_loading():
    from vlmprune.eval.lmms_plugin import VLMPrune, parse_model_args

    args = parse_model_args("pretrained=org/model-7,method=vtc_cls,keep=64,layers=[12,18],batch_size=8,dtype=float16")
    assert args == {"pretrained": "org/model-7", "method": "vtc_cls", "keep": 64, "layers": [12, 18],
                    "batch_size": 8, "dtype": "float16"}
    assert parse_model_args("method=cls,layer=-3,prune_ratio=0.75") == {
        "method": "cls", "layer": -3, "prune_ratio": 0.75}
    with pytest.raises(ValueError, match=r"unknown key\(s\) \['foo'\]; allowed: \['pretrained', .*\['layer'\]"):
        VLMPrune(pretrained="not-loaded", method="cls", keep=16, foo=1)
    with pytest.raises(ValueError, match="need a method"):
        VLMPrune(pretrained="not-loaded", keep=16)
    with pytest.raises(ValueError, match="unknown method 'nope'; available methods: .*'cls'"):
        VLMPrune(pretrained="not-loaded", method="nope", keep=16)
    with pytest.raises(ValueError, match="give exactly one of keep"):
        VLMPrune(pretrained="not-loaded", method="cls")
    with pytest.raises(ValueError, match="batch_size must be a positive int, got 'auto'"):
        VLMPrune(pretrained="not-loaded", batch_size="auto")


# --- Qwen2-VL: the shipped shapes-qwen2-vl -----------------------------------------------------------
QWEN_KEEP = 36
QWEN_VISUAL = 144


@pytest.fixture(scope="module")
def qwen():
    from vlmprune.eval.sweep import load_vlm

    return load_vlm("shapes-qwen2-vl", "cpu")


def test_cli_runs_shapes_qwen2_vl(qwen, tmp_path):
    """`pretrained=shapes-qwen2-vl,method=cls,keep=36` through lmms-eval's CLI: the answers of the
    model patched by hand, the pruned prompt lengths, the plugin's count of kept tokens."""
    log, results, samples = lmms_eval_cli("shapes-qwen2-vl", tmp_path, [sys.executable], keep=QWEN_KEEP)
    items = [shapes.make_item(seed) for seed in shapes.split_seeds("test", LIMIT)]
    with vlmprune.pruning(qwen.model, "cls", keep=QWEN_KEEP):
        patched = train.predict(qwen.model, qwen.processor, items, batch_size=1, max_new_tokens=8)
    assert [s["filtered_resps"] for s in samples] == patched
    fam = train.get_family("qwen2_vl")
    pruned = [len(core.prompt_ids(qwen.processor.tokenizer, it.question, fam)) - (QWEN_VISUAL - QWEN_KEEP)
              for it in items]
    assert [s["token_counts"][0]["input_tokens"] for s in samples] == pruned
    assert f"kept {QWEN_KEEP} of {QWEN_VISUAL} visual tokens per image over {LIMIT} images" in log
    hits = [float(shapes.score(s["filtered_resps"], s["target"])) for s in samples]
    assert results["results"]["vlmprune_shapes"]["accuracy,none"] == sum(hits) / LIMIT


def test_qwen_min_max_pixels_set_the_tokens_per_image(qwen):
    """min_pixels = max_pixels = 224^2: each 336 px image becomes 224 x 224 px, 8 x 8 = 64 tokens
    (not 144); generate_until answers as the model patched by hand with the processor loaded with
    the same bounds, and counts the pruned prompt."""
    from lmms_eval.api.instance import Instance
    from lmms_eval.models import get_model

    from vlmprune.eval.qwen import load_processor, set_pixels
    from vlmprune.eval.sweep import embedded_path

    px = 224 * 224
    lm = get_model("vlmprune").create_from_arg_string(
        f"pretrained=shapes-qwen2-vl,min_pixels={px},max_pixels={px},method=cls,keep=16",
        {"batch_size": 2, "device": "cpu"})
    size = lm.processor.image_processor.size
    assert (size.shortest_edge, size.longest_edge) == (px, px)
    rows = lmms.shapes_rows(3)
    lm.task_dict = {"shapes": {"test": rows}}
    requests = [Instance("generate_until", (r["question"], {"max_new_tokens": 4}, lmms.shapes_doc_to_visual, i,
                                            "shapes", "test"), i, {"task": "shapes", "doc_id": i, "repeats": 1})
                for i, r in enumerate(rows)]
    got = lm.generate_until(requests)
    processor = load_processor(embedded_path("shapes-qwen2-vl"))
    set_pixels(processor, px, px)
    items = [shapes.make_item(r["seed"]) for r in rows]
    inputs = processor(images=[items[0].image], text=["<|image_pad|>"], return_tensors="pt")
    assert inputs["image_grid_thw"].tolist() == [[1, 16, 16]]
    assert int((inputs["input_ids"] == qwen.image_token_id).sum()) == 64
    with vlmprune.pruning(qwen.model, "cls", keep=16):
        direct = train.predict(qwen.model, processor, items, batch_size=1, max_new_tokens=4)
    assert [g.text for g in got] == direct
    fam = train.get_family("qwen2_vl")
    prompt = [len(core.prompt_ids(processor.tokenizer, it.question, fam)) - 144 + 64 for it in items]
    assert [g.token_counts.input_tokens for g in got] == [n - (64 - 16) for n in prompt]
    assert lm.visual_tokens == 3 * 64 and lm.kept_tokens == 3 * 16


def test_min_max_pixels_are_refused_where_they_do_not_apply(model_dir):
    from vlmprune.eval.lmms_plugin import VLMPrune

    with pytest.raises(ValueError, match="min_pixels / max_pixels apply to Qwen-VL processors"):
        VLMPrune(pretrained=str(model_dir), max_pixels=224 * 224, device="cpu")
    with pytest.raises(ValueError, match="min_pixels must be a positive int, got 'many'"):
        VLMPrune(pretrained="shapes-qwen2-vl", min_pixels="many", device="cpu")
    with pytest.raises(ValueError, match="min_pixels 200704 > max_pixels 112896"):
        VLMPrune(pretrained="shapes-qwen2-vl", min_pixels=448 * 448, device="cpu")
