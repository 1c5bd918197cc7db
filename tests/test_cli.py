"""The `vlmprune` command on the tiny random LLaVA (576 visual tokens): sweep files and resume,
fidelity values, overlay pixels against last_selection, bench rows, demo, and bad input."""

from __future__ import annotations

import csv
import json
import math
import shutil

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

import vlmprune
from vlmprune.cli import app
from vlmprune.eval import sweep as sweep_mod
from vlmprune.eval.fidelity import agreement, fidelity, first_token_kl
from vlmprune.eval.sweep import exact_match, load_vlm, random_images
from vlmprune.eval.visualise import DIM

N = 576
runner = CliRunner()


def invoke(*args: str):
    return runner.invoke(app, [str(a) for a in args])


@pytest.fixture(scope="module")
def vlm():
    return load_vlm("tiny", device="cpu")


@pytest.fixture(scope="module")
def swept(tmp_path_factory):
    """One sweep (2 methods x keep 576,1 on 3 random images), then the same command again;
    model forwards are counted for both runs."""
    out = tmp_path_factory.mktemp("sweep")
    forwards = []
    real = sweep_mod.load_vlm

    def counting(*args, **kwargs):
        v = real(*args, **kwargs)
        v.model.register_forward_hook(lambda *a: forwards.append(1))
        return v

    args = ["sweep", "--model", "tiny", "--methods", "cls,random", "--keep", "576,1", "--limit", 3, "--batch-size", 2,
            "--max-new-tokens", 3, "--device", "cpu", "--out", out]
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(sweep_mod, "load_vlm", counting)
        first = invoke(*args)
        n_first = len(forwards)
        snapshot = {p.name: p.read_bytes() for p in out.iterdir()}
        second = invoke(*args)
    return dict(out=out, first=first, second=second, n_first=n_first, n_second=len(forwards) - n_first,
                snapshot=snapshot)


def test_sweep_writes_table_csv_json_png(swept):
    assert swept["first"].exit_code == 0, swept["first"].output
    out = swept["out"]
    rows = list(csv.DictReader((out / "results.csv").open()))
    assert [(r["method"], r["keep"]) for r in rows] == [
        ("unpruned", ""), ("cls", "576"), ("cls", "1"), ("random", "576"), ("random", "1")]
    assert [int(r["visual_tokens"]) for r in rows] == [N, N, 1, N, 1]
    assert {r["metric_name"] for r in rows} == {"agreement"}  # no answers: fidelity
    assert all(r["items"] == "3" and r["errors"] == "0" for r in rows)
    results = json.loads((out / "results.json").read_text())
    assert set(results["versions"]) >= {"torch", "transformers", "vlmprune"}
    assert results["config"]["model"] == "tiny" and results["device"].startswith("cpu")
    assert list(results["cells"]) == ["unpruned", "cls@keep=576", "cls@keep=1", "random@keep=576", "random@keep=1"]
    # prefill length = prompt - removed visual tokens, exactly
    ref_len = results["cells"]["unpruned"]["items"][0]["prefill_tokens"]
    assert ref_len == 1 + N + len("Describe the image.")
    assert [r["prefill_tokens"] for r in results["cells"]["cls@keep=1"]["items"]] == [ref_len - (N - 1)] * 3
    png = Image.open(out / "accuracy_vs_tokens.png")
    assert png.format == "PNG" and png.size[0] > 500
    assert "cls" in swept["first"].output and "ran 5 cells" in swept["first"].output


def test_sweep_rerun_skips_finished_cells(swept):
    assert swept["second"].exit_code == 0, swept["second"].output
    assert swept["n_first"] > 0 and swept["n_second"] == 0  # no model forward on the rerun
    assert "ran 0 cells, skipped 5" in swept["second"].output
    before = json.loads(swept["snapshot"]["results.json"])
    after = json.loads((swept["out"] / "results.json").read_text())
    assert after["cells"] == before["cells"]
    assert (swept["out"] / "results.csv").read_bytes() == swept["snapshot"]["results.csv"]


def test_sweep_extended_runs_only_new_cells(swept, tmp_path):
    out = tmp_path / "more"
    shutil.copytree(swept["out"], out)
    res = invoke("sweep", "--model", "tiny", "--methods", "cls,random", "--keep", "576,1,4", "--limit", 3, "--batch-size", 2,
                 "--max-new-tokens", 3, "--device", "cpu", "--out", out)
    assert res.exit_code == 0, res.output
    assert "ran 2 cells, skipped 5" in res.output
    before = json.loads((swept["out"] / "results.json").read_text())["cells"]
    after = json.loads((out / "results.json").read_text())["cells"]
    assert list(after) == [*before, "cls@keep=4", "random@keep=4"]
    assert all(after[k] == before[k] for k in before)
    # the reference was recomputed in memory for the new cells' KL, not re-recorded
    assert all(r["kl"] > 0 and r["visual_tokens"] == [4] for r in after["cls@keep=4"]["items"])
    assert len(list(csv.DictReader((out / "results.csv").open()))) == 7


def test_sweep_fidelity_values(swept, vlm):
    cells = json.loads((swept["out"] / "results.json").read_text())["cells"]
    for key in ("unpruned", "cls@keep=576", "random@keep=576"):  # keep = N is the unpruned model
        assert [(r["kl"], r["agree"]) for r in cells[key]["items"]] == [(0.0, 1.0)] * 3, key
    recorded = [r["kl"] for r in cells["cls@keep=1"]["items"]]
    assert all(k > 0 for k in recorded)
    # the same numbers from the public function, computed here on all three items at once
    items = random_images(3).items()
    inputs = vlm.inputs([it.image for it in items], [it.prompt for it in items])
    direct = fidelity(vlm.model, inputs, "cls", max_new_tokens=3, keep=1)
    assert recorded == pytest.approx([d["kl"] for d in direct], rel=1e-3)
    assert [r["agree"] for r in cells["cls@keep=1"]["items"]] == [d["agree"] for d in direct]


def test_fidelity_functions_exact():
    ref = torch.tensor([[0.0, 0.0], [1.0, 2.0]])
    new = torch.tensor([[math.log(3.0), 0.0], [1.0, 2.0]])
    kl = first_token_kl(ref, new)
    # KL([.5, .5] || [.75, .25]) = .5 ln(.5/.75) + .5 ln(.5/.25) = .5 ln(4/3); equal logits -> exactly 0
    assert kl[0].item() == pytest.approx(0.5 * math.log(4 / 3), rel=1e-6)
    assert kl[1].item() == 0.0
    assert agreement([[1, 2], [3]], [[1, 2], [3, 4]]) == [1.0, 0.0]
    assert exact_match("The Cat.", "cat") == 1.0 and exact_match("a dog", "cat") == 0.0


def test_sweep_records_failing_items_and_goes_on(tmp_path):
    good = tmp_path / "good.png"
    Image.new("RGB", (64, 48), (10, 200, 30)).save(good)
    (tmp_path / "broken.png").write_bytes(b"not an image at all")
    data = tmp_path / "data.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in [
        {"image": "good.png", "question": "What colour?", "answer": "green"},
        {"image": "missing.png", "question": "What?", "answer": "x"},
        {"image": "broken.png", "question": "What?", "answer": "y"},
    ]))
    res = invoke("sweep", "--model", "tiny", "--methods", "uniform", "--keep", "4", "--data", data, "--device", "cpu",
                 "--max-new-tokens", 2, "--out", tmp_path / "out")
    assert res.exit_code == 0, res.output
    cells = json.loads((tmp_path / "out" / "results.json").read_text())["cells"]
    for cell in cells.values():
        assert cell["summary"]["items"] == 3 and cell["summary"]["errors"] == 2
        assert cell["summary"]["metric_name"] == "accuracy" and cell["summary"]["metric"] == 0.0
        recs = {r["id"]: r for r in cell["items"]}
        assert "error" not in recs["1"] and recs["1"]["correct"] == 0.0
        assert "missing.png" in recs["2"]["error"] and "UnidentifiedImageError" in recs["3"]["error"]


def block_image(path, rows: int, cols: int, px: int):
    """A PNG of rows x cols blocks of px x px pixels, one random colour each (seeded): its pixels
    [rows * px, cols * px, 3] and the path."""
    colours = torch.randint(0, 256, (rows, cols, 3), generator=torch.Generator().manual_seed(3), dtype=torch.uint8)
    arr = colours.repeat_interleave(px, 0).repeat_interleave(px, 1).numpy()
    Image.fromarray(arr).save(path)
    return arr, path


def assert_kept_blocks_shown(got: np.ndarray, arr: np.ndarray, kept: set[int], cols: int, px: int) -> None:
    """Every px x px block of the overlay is the image's own where its token was kept, dimmed by
    DIM elsewhere (token i is block divmod(i, cols))."""
    assert got.shape == arr.shape
    dimmed = (arr.astype(np.float64) * DIM).round().astype(np.uint8)
    for i in range(arr.shape[0] // px * cols):
        r, c = divmod(i, cols)
        block = (slice(px * r, px * r + px), slice(px * c, px * c + px))
        assert np.array_equal(got[block], (arr if i in kept else dimmed)[block]), (i, i in kept)


def test_show_dims_exactly_the_pruned_patches(tmp_path, vlm):
    # one random colour per 14 px patch of a 336 px image (the tiny model's input size: no resize)
    arr, src = block_image(tmp_path / "in.png", 24, 24, 14)
    res = invoke("show", src, "--model", "tiny", "--method", "cls", "--keep", 50, "--device", "cpu",
                 "-o", tmp_path / "out.png")
    assert res.exit_code == 0, res.output
    assert "kept 50 of 576" in res.output
    with vlmprune.pruning(vlm.model, "cls", keep=50), torch.no_grad():
        vlm.model(**vlm.inputs([Image.open(src)], ["Describe the image."]))
        kept = set(vlmprune.last_selection(vlm.model)[0][0].tolist())
    assert_kept_blocks_shown(np.asarray(Image.open(tmp_path / "out.png").convert("RGB")), arr, kept, 24, 14)
    assert len(kept) == 50


def test_bench_rows_and_oracle(tmp_path):
    out = tmp_path / "bench.json"
    res = invoke("bench", "--batch-sizes", 2, "--keep", "576,16", "--repeats", 1, "--warmup", 0, "--new-tokens", 2,
                 "--device", "cpu", "--dtype", "fp32", "--out", out)
    assert res.exit_code == 0, res.output
    rows = {(r["keep"], r["variant"]): r for r in json.loads(out.read_text())["rows"]}
    assert sorted(rows) == sorted([(N, "unpatched"), (N, "patched"), (N, "oracle"), (16, "patched"), (16, "oracle")])
    base, pat, ora = rows[(N, "unpatched")], rows[(16, "patched")], rows[(16, "oracle")]
    assert pat["prefill_len"] == ora["prefill_len"] == base["prefill_len"] - (N - 16)
    assert pat["oracle_max_abs_logit_diff"] <= 1e-5 and pat["oracle_argmax_agree"] == 1.0
    assert pat["kv_cache_mib"] / base["kv_cache_mib"] == pytest.approx(pat["prefill_len"] / base["prefill_len"])
    # theoretical FLOPs of the tiny decoder: d=256, 4 layers, kv width 128, mlp 704, vocab 100
    d, layers, t = 256, 4, base["prefill_len"]
    p_layer = 2 * d * d + 2 * d * 128 + 3 * d * 704 + 2 * d
    want = 2 * (2 * layers * p_layer * t + 2 * layers * t * t * d + 2 * 100 * d)
    assert base["decoder_tflops"] * 1e12 == pytest.approx(want, rel=1e-9)


def test_demo_prints_kept_count():
    res = invoke("demo", "--keep", 32, "--repeats", 1, "--new-tokens", 2)
    assert res.exit_code == 0, res.output
    assert "kept 32 of 576 visual tokens per image" in res.output
    assert "prefill sequence 596 -> 52 tokens" in res.output


def test_methods_and_models_list_registries():
    res = invoke("methods")
    assert res.exit_code == 0 and all(m in res.output for m in vlmprune.available_methods())
    assert "FasterVLM" in res.output
    res = invoke("models")
    assert res.exit_code == 0 and "LlavaForConditionalGeneration" in res.output


@pytest.mark.parametrize("args, needle", [
    (["sweep", "--methods", "cls,nosuch"], "'nosuch'"),
    (["sweep", "--keep", "64,-1"], "-1"),
    (["sweep", "--keep", "64,abc"], "64,abc"),
    (["sweep", "--model", "no-such-model"], "'no-such-model'"),
    (["sweep", "--data", "no/such.jsonl"], "no/such.jsonl"),
    (["sweep", "--keep", "64", "--prune-ratio", "0.5"], "not both"),
    (["sweep", "--overlays", "-1"], "-1"),
    (["demo", "--keep", "-5"], "-5"),
    (["demo", "--method", "nosuch"], "'nosuch'"),
    (["show", "no_such.png"], "no_such.png"),
    (["show", "BROKEN", "--keep", 4], "cannot decode image"),
    (["show", "BROKEN", "--prune-ratio", 1.5], "1.5"),
    (["bench", "--method", "nosuch"], "'nosuch'"),
    (["bench", "--model", "nope"], "'nope'"),
])
def test_bad_input_is_one_line_and_nonzero(tmp_path, args, needle):
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG but not really")
    res = invoke(*[broken if a == "BROKEN" else a for a in args], *(["--out", tmp_path / "o"] if args[0] == "sweep" else []))
    assert res.exit_code == 2, res.output
    assert needle in res.stderr and "error" in res.stderr
    assert len(res.stderr.strip().splitlines()) == 1 and "Traceback" not in res.output


def word_tokenizer():
    """A word-level fast tokenizer: <pad> <s> </s> <unk>, w0..w89, and <image> at the tiny models' 99."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(["<pad>", "<s>", "</s>", "<unk>", *(f"w{i}" for i in range(90))])}
    tok = Tokenizer(models.WordLevel(vocab={**vocab, "<image>": 99}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
                                   unk_token="<unk>", extra_special_tokens={"image_token": "<image>"})


def save_hf_llava(path) -> None:
    """The tiny model saved with a real LlavaProcessor (word-level tokenizer, CLIP image processor),
    so `--model PATH` goes through AutoProcessor + AutoModelForImageTextToText."""
    from transformers import CLIPImageProcessor, LlavaProcessor

    from vlmprune.eval.sweep import TINY
    from vlmprune.eval.tiny import tiny_llava

    images = CLIPImageProcessor(size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336})
    LlavaProcessor(image_processor=images, tokenizer=word_tokenizer(), patch_size=14,
                   vision_feature_select_strategy="default", image_token="<image>",
                   num_additional_image_tokens=1).save_pretrained(path)
    tiny_llava(**TINY).save_pretrained(path)


def test_pretrained_path_with_processor(tmp_path):
    save_hf_llava(tmp_path / "model")
    Image.new("RGB", (420, 336), (200, 30, 30)).save(tmp_path / "a.png")
    (tmp_path / "d.jsonl").write_text(
        '{"image": "a.png", "question": "w5 w6", "answer": "w7"}\n{"image": "a.png", "question": "w5 w6 w7 w8 w9"}\n')
    res = invoke("sweep", "--model", tmp_path / "model", "--data", tmp_path / "d.jsonl", "--methods", "cls",
                 "--keep", "576,8", "--device", "cpu", "--max-new-tokens", 2, "--out", tmp_path / "out")
    assert res.exit_code == 0, res.output
    cells = json.loads((tmp_path / "out" / "results.json").read_text())["cells"]
    ref, pruned = cells["unpruned"]["items"], cells["cls@keep=8"]["items"]
    # left-padded batch: each row's own length; the processor expanded <image> to 576 tokens
    assert ref[1]["prefill_tokens"] - ref[0]["prefill_tokens"] == 3
    assert [r["prefill_tokens"] for r in pruned] == [r["prefill_tokens"] - 568 for r in ref]
    assert [r["visual_tokens"] for r in pruned] == [[8], [8]]
    assert [(r["kl"], r["agree"]) for r in cells["cls@keep=576"]["items"]] == [(0.0, 1.0)] * 2
    assert "correct" in ref[0] and "correct" not in ref[1]  # one answer missing: metric is agreement
    assert cells["unpruned"]["summary"]["metric_name"] == "agreement"
    res = invoke("show", tmp_path / "a.png", "--model", tmp_path / "model", "--method", "uniform", "--keep", 144,
                 "--device", "cpu", "-o", tmp_path / "o.png")
    assert res.exit_code == 0, res.output
    got = np.asarray(Image.open(tmp_path / "o.png"))
    assert got.shape == (336, 336, 3)  # shortest edge 336, centre crop 336
    bright = {(r, c) for r in range(24) for c in range(24) if got[14 * r + 7, 14 * c + 7, 0] > 150}
    assert len(bright) == 144  # kept patches keep the red 200; pruned ones are dimmed to 60


def test_sweep_without_arguments_runs_the_embedded_model_on_the_benchmark(tmp_path):
    """No --model / --data / --methods: the shipped LLaVA on the shapes test split, the default
    methods; the unpruned answers are the trainer's own `evaluate()` answers on the same items."""
    from vlmprune.embedded import train
    from vlmprune.eval import shapes
    from vlmprune.eval.sweep import embedded_path

    out = tmp_path / "default"
    res = invoke("sweep", "--keep", "64", "--limit", 6, "--device", "cpu", "--out", out, "--overlays", 2)
    assert res.exit_code == 0, res.output
    results = json.loads((out / "results.json").read_text())
    assert results["config"]["model"] == "shapes-llava" and results["task"] == "shapes"
    assert list(results["cells"]) == ["unpruned", "cls@keep=64", "divprune@keep=64", "random@keep=64"]
    items = [shapes.make_item(s) for s in shapes.split_seeds("test", 6)]
    got = results["cells"]["unpruned"]["items"]
    assert [r["answer"] for r in got] == [it.answer for it in items]
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    model = LlavaForConditionalGeneration.from_pretrained(embedded_path("shapes-llava"), dtype=torch.float32)
    details: dict = {}
    train.evaluate(model.eval(), AutoProcessor.from_pretrained(embedded_path("shapes-llava")), items, details=details)
    assert [r["prediction"] for r in got] == details["predictions"]
    assert "accuracy" in res.output and "accuracy_vs_tokens.png" in res.output
    # overlays.png: 2 rows (items) x 4 tiles (image, cls, divprune, random), each tile the `show` overlay
    from vlmprune.eval.sweep import load_vlm
    from vlmprune.eval.visualise import CAPTION_PX, kept_overlay

    grid = np.asarray(Image.open(out / "overlays.png").convert("RGB"))
    assert grid.shape == (2 * (336 + CAPTION_PX), 4 * 336, 3)
    vlm = load_vlm("shapes-llava", "cpu")
    for row, item in enumerate(items[:2]):
        for col, method in enumerate(["cls", "divprune", "random"], start=1):
            want = np.asarray(kept_overlay(vlm, item.image, method, item.question, keep=64)[0])
            top = row * (336 + CAPTION_PX) + CAPTION_PX
            assert np.array_equal(grid[top:top + 336, col * 336:(col + 1) * 336], want), (row, method)


def test_plot_leaves_out_the_time_panel_without_timings(tmp_path):
    from vlmprune.eval.visualise import plot_sweep

    rows = [dict(method="unpruned", visual_tokens=576, metric=0.8, metric_name="accuracy", prefill_ms=9.0),
            dict(method="cls", visual_tokens=64, metric=0.5, metric_name="accuracy", prefill_ms=2.0)]
    plot_sweep(rows, tmp_path / "two.png")
    plot_sweep([dict(r, prefill_ms=None) for r in rows], tmp_path / "one.png")
    two, one = Image.open(tmp_path / "two.png"), Image.open(tmp_path / "one.png")
    assert two.size[1] == one.size[1] and one.size[0] < 0.6 * two.size[0]


def test_plot_draws_pool_as_the_black_baseline(tmp_path, monkeypatch):
    """The downsampling baseline (`pool`) is one black dash-dotted line; other methods keep colours."""
    import matplotlib.axes

    from vlmprune.eval.visualise import plot_sweep

    drawn = []
    real = matplotlib.axes.Axes.plot
    monkeypatch.setattr(matplotlib.axes.Axes, "plot", lambda ax, *a, **k: drawn.append(k) or real(ax, *a, **k))
    rows = [dict(method=m, visual_tokens=n, metric=0.5, metric_name="accuracy", prefill_ms=None)
            for m in ("cls", "pool") for n in (64, 128)]
    plot_sweep(rows, tmp_path / "p.png")
    assert [(k["label"], k["color"], k.get("linestyle", "-")) for k in drawn] == [
        ("cls", "C0", "-"), ("pool (baseline)", "black", "-.")]


# --- Qwen-VL: the shipped shapes-qwen2-vl (144 tokens of 28 x 28 px per 336 px image) and qwen2-vl-tiny
@pytest.fixture(scope="module")
def qwen():
    return load_vlm("shapes-qwen2-vl", "cpu")


def test_default_keeps_are_fractions_of_the_model_s_tokens():
    from vlmprune.eval.sweep import default_keeps

    assert default_keeps(576) == [576, 192, 128, 64] and default_keeps(144) == [144, 48, 32, 16]


def test_show_on_qwen_draws_the_image_s_own_token_grid(tmp_path, qwen):
    """A 504 x 224 px image is kept at its size by the processor (504 x 224 = 336^2, its min = max
    pixels): 8 x 18 tokens of 28 x 28 px (a square grid would be 12 x 12); each block is the
    image's own colours where the token was kept, dimmed elsewhere."""
    arr, src = block_image(tmp_path / "wide.png", 8, 18, 28)
    res = invoke("show", src, "--model", "shapes-qwen2-vl", "--method", "cls", "--keep", 36, "--device", "cpu",
                 "-o", tmp_path / "out.png")
    assert res.exit_code == 0, res.output
    assert "kept 36 of 144 visual tokens (8x18 grid of 28x28 px blocks" in " ".join(res.output.split())
    inputs = qwen.inputs([Image.open(src)], ["Describe the image."])
    assert inputs["image_grid_thw"].tolist() == [[1, 16, 36]]
    with vlmprune.pruning(qwen.model, "cls", keep=36), torch.no_grad():
        qwen.model(**inputs)
        kept = set(vlmprune.last_selection(qwen.model)[0][0].tolist())
    assert len(kept) == 36
    assert_kept_blocks_shown(np.asarray(Image.open(tmp_path / "out.png").convert("RGB")), arr, kept, 18, 28)


def test_sweep_on_qwen_skips_flowcut_and_draws_overlays(tmp_path, qwen):
    """flowcut (needs a CLS token) is reported with its one-line reason and skipped; the other
    cells count Qwen's 144 tokens per image; the unpruned answers are the trainer's `predict`
    answers; each overlay tile is `show`'s picture."""
    from vlmprune.embedded import train
    from vlmprune.eval import shapes
    from vlmprune.eval.visualise import CAPTION_PX, kept_overlay

    out = tmp_path / "qwen"
    res = invoke("sweep", "--model", "shapes-qwen2-vl", "--methods", "cls,flowcut,uniform", "--keep", "144,36",
                 "--limit", 3, "--batch-size", 2, "--max-new-tokens", 3, "--device", "cpu", "--out", out,
                 "--overlays", 1)
    assert res.exit_code == 0, res.output
    results = json.loads((out / "results.json").read_text())
    assert list(results["cells"]) == ["unpruned", "cls@keep=144", "cls@keep=36", "uniform@keep=144", "uniform@keep=36"]
    reason = results["unsupported"]["flowcut"]
    assert "CLS" in reason and "does not run on Qwen2VLForConditionalGeneration" in reason
    assert f"skipped flowcut: {reason}" in " ".join(res.output.split())
    rows = list(csv.DictReader((out / "results.csv").open()))
    assert [int(r["visual_tokens"]) for r in rows] == [144, 144, 36, 144, 36]
    cells = results["cells"]
    ref = cells["unpruned"]["items"]
    for key in ("cls@keep=36", "uniform@keep=36"):
        assert [r["visual_tokens"] for r in cells[key]["items"]] == [[36]] * 3
        assert [r["prefill_tokens"] for r in cells[key]["items"]] == [r["prefill_tokens"] - 108 for r in ref]
    for key in ("cls@keep=144", "uniform@keep=144"):
        assert [(r["kl"], r["agree"]) for r in cells[key]["items"]] == [(0.0, 1.0)] * 3
    items = [shapes.make_item(s) for s in shapes.split_seeds("test", 3)]
    assert [r["prediction"] for r in ref] == train.predict(qwen.model, qwen.processor, items, max_new_tokens=3)
    grid = np.asarray(Image.open(out / "overlays.png").convert("RGB"))
    assert grid.shape == (336 + CAPTION_PX, 3 * 336, 3)  # image, cls, uniform (no flowcut)
    for col, method in enumerate(["cls", "uniform"], start=1):
        want = np.asarray(kept_overlay(qwen, items[0].image, method, items[0].question, keep=36)[0])
        assert np.array_equal(grid[CAPTION_PX:, col * 336:(col + 1) * 336], want), method


def test_bench_qwen_rows_and_oracle(tmp_path):
    """qwen2-vl-tiny (576 tokens per 672 px image): patched and oracle prefill the same length and
    hold the same KV cache, with the same first-token logits."""
    out = tmp_path / "bench.json"
    res = invoke("bench", "--model", "qwen2-vl-tiny", "--batch-sizes", 2, "--keep", "576,40", "--repeats", 1,
                 "--warmup", 0, "--new-tokens", 2, "--device", "cpu", "--dtype", "fp32", "--out", out)
    assert res.exit_code == 0, res.output
    results = json.loads(out.read_text())
    assert results["n_visual"] == N
    rows = {(r["keep"], r["variant"]): r for r in results["rows"]}
    base, pat, ora = rows[(N, "unpatched")], rows[(40, "patched")], rows[(40, "oracle")]
    assert pat["prefill_len"] == ora["prefill_len"] == base["prefill_len"] - (N - 40)
    assert pat["kv_cache_mib"] == ora["kv_cache_mib"]
    assert pat["kv_cache_mib"] / base["kv_cache_mib"] == pytest.approx(pat["prefill_len"] / base["prefill_len"])
    assert pat["decoder_tflops"] == ora["decoder_tflops"] < base["decoder_tflops"]
    for keep in (N, 40):
        assert rows[(keep, "patched")]["oracle_max_abs_logit_diff"] <= 1e-5
        assert rows[(keep, "patched")]["oracle_argmax_agree"] == 1.0


def test_qwen_oracle_is_the_unpatched_model_on_the_kept_tokens():
    """`bench.oracle_inputs` for Qwen: each image's run cut to its kept tokens (rows left-padded),
    their unpruned M-RoPE ids; generate() on it gives the patched model's logits at every step.
    The ids are what make it so: the same tokens at the positions HF would give them differ."""
    from vlmprune.eval.bench import oracle_inputs

    vlm = load_vlm("qwen2-vl-tiny", "cpu")
    items = random_images(2, vlm.image_size).items()
    inputs = vlm.inputs([it.image for it in items], ["Describe the image.", "What is in the picture, on the left?"])
    assert inputs["attention_mask"][0, 0] == 0  # left padding in row 0
    gen = dict(max_new_tokens=4, min_new_tokens=4, do_sample=False, output_logits=True, return_dict_in_generate=True)
    with vlmprune.pruning(vlm.model, "kcenter", keep=40), torch.no_grad():
        patched = vlm.model.generate(**inputs, **gen)
        selection = vlmprune.last_selection(vlm.model)
    oracle = oracle_inputs(vlm, inputs, selection)
    assert (oracle["input_ids"] == vlm.image_token_id).sum(1).tolist() == [40, 40]
    assert oracle["position_ids"].shape == (3, *oracle["input_ids"].shape)
    with torch.no_grad():
        direct = vlm.model.generate(**oracle, **gen)
        renumbered = vlm.model.generate(**{k: v for k, v in oracle.items() if k != "position_ids"}, **gen)
    assert torch.equal(patched.sequences[:, -4:], direct.sequences[:, -4:])
    for a, b in zip(patched.logits, direct.logits):
        assert (a - b).abs().max() <= 1e-5
    assert (patched.logits[0] - renumbered.logits[0]).abs().max() > 1e-3
