"""A patched model in transformers' `pipeline`: the shipped shapes-llava, pruned, answers in a
pipeline batch of 8 exactly as `vlmprune sweep` (`run_sweep`) answers the same items."""

from __future__ import annotations

import torch
from transformers import pipeline

import vlmprune
from vlmprune.eval.sweep import SweepSpec, load_vlm, make_task, run_sweep


def test_image_text_to_text_pipeline_batch_of_8_answers_as_the_sweep(tmp_path):
    vlm = load_vlm("shapes-llava", device="cpu", dtype="fp32")
    spec = SweepSpec(
        model="shapes-llava",
        methods=["cls"],
        keeps=[64],
        data="shapes",
        limit=8,
        batch_size=8,
        max_new_tokens=8,
        out=str(tmp_path),
        device="cpu",
        dtype="fp32",
    )
    records = run_sweep(spec, vlm=vlm)["cells"]["cls@keep=64"]["items"]
    items = make_task("shapes", 8).items()
    chats = [
        [
            {
                "role": "user",
                "content": [
                    {"type": "image", "image": it.image},
                    {"type": "text", "text": it.prompt},
                ],
            }
        ]
        for it in items
    ]
    vlmprune.patch(vlm.model, "cls", keep=64)
    pipe = pipeline("image-text-to-text", model=vlm.model, processor=vlm.processor)
    with torch.no_grad():
        outs = pipe(
            text=chats,
            batch_size=8,
            max_new_tokens=8,
            generate_kwargs={"do_sample": False},
            return_full_text=False,
        )
    assert [len(row) for row in vlmprune.last_selection(vlm.model)] == [
        1
    ] * 8  # one pruned batch of 8 rows
    answers = [
        (o[0] if isinstance(o, list) else o)["generated_text"].strip() for o in outs
    ]
    assert [r["id"] for r in records] == [it.id for it in items]
    assert all(r["visual_tokens"] == [64] for r in records)
    assert answers == [r["prediction"] for r in records]
    assert (
        sum(r["correct"] for r in records) >= 2
    )  # real answers, not an empty string each time
