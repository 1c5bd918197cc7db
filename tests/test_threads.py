"""Threads sharing one patched model get exactly the serial results; last_selection is per thread;
a patched model deep-copies."""

from __future__ import annotations

import copy
from concurrent.futures import ThreadPoolExecutor

import torch

import vlmprune
from tests.conftest import pixels, prompt, tiny_llava
from vlmprune.eval.tiny import qwen_inputs, tiny_qwen


def test_threads_on_one_llava_get_the_serial_results():
    model = tiny_llava(seed=50)
    vlmprune.patch(model, "flowcut", keep=5)
    jobs = [(torch.tensor([prompt(1, seed=60 + i)]), pixels(1, seed=70 + i)) for i in range(8)]

    def run(job):
        ids, pv = job
        with torch.no_grad():
            out = model.generate(input_ids=ids, pixel_values=pv, max_new_tokens=4, do_sample=False)
        return out, [t.clone() for t in vlmprune.last_selection(model)[0]]

    serial = [run(j) for j in jobs]
    with ThreadPoolExecutor(4) as pool:
        parallel = list(pool.map(run, jobs))
    for (a, sel_a), (b, sel_b) in zip(serial, parallel):
        assert torch.equal(a, b)
        assert all(torch.equal(x, y) for x, y in zip(sel_a, sel_b))  # each thread reads its own selection


def test_threads_on_one_qwen_with_a_decoder_stage_get_the_serial_results():
    model = tiny_qwen("qwen2_vl", seed=51, text_layers=3)
    vlmprune.patch(model, [("cls", {"keep": 6}), ("fastv", {"layer": 2, "keep": 3})])
    jobs = [qwen_inputs([[("image", (1, 4 * (1 + i % 3), 8))]], seed=80 + i) for i in range(6)]

    def run(inputs):
        with torch.no_grad():
            return model.generate(**inputs, max_new_tokens=3, do_sample=False)

    serial = [run(j) for j in jobs]
    with ThreadPoolExecutor(3) as pool:
        parallel = list(pool.map(run, jobs))
    assert all(torch.equal(a, b) for a, b in zip(serial, parallel))


def test_a_patched_model_deep_copies_and_the_copy_prunes_alone():
    model = tiny_llava(seed=52)
    vlmprune.patch(model, "cls", keep=4)
    twin = copy.deepcopy(model)
    ids, pv = torch.tensor([prompt(1, seed=90)]), pixels(1, seed=91)
    with torch.no_grad():
        a = model(input_ids=ids, pixel_values=pv).logits
        b = twin(input_ids=ids, pixel_values=pv).logits
    assert torch.equal(a, b) and a.shape[1] == ids.shape[1] - 12
    vlmprune.unpatch(model)
    assert vlmprune.is_patched(twin) and not vlmprune.is_patched(model)
