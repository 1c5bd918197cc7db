"""Train vlmprune's own tiny VLMs on the embedded shapes benchmark (`vlmprune.eval.shapes`).

No pretrained weights can be downloaded, so the package ships small models trained here from
scratch, each with a word-level tokenizer over the benchmark's words and its family's processor:

- `--family llava` (default): the LLaVA-1.5 architecture: a CLIP ViT at 336 px / patch 14 (576
  visual tokens plus CLS, features from layer -2, CLS dropped: strategy "default"), a two-layer MLP
  projector and a small Llama decoder, with a `LlavaProcessor` (`vlmprune.embedded.llava`);
- `--family qwen2_vl`: the Qwen2-VL architecture (`vlmprune.embedded.qwen2_vl`): its vision
  tower with 2-D rotary, a 2 x 2 patch merger (144 visual tokens per 336 px image) and a Qwen2
  decoder with M-RoPE, with a `Qwen2VLProcessor`.

    python -m vlmprune.embedded.train --out DIR [--family qwen2_vl] [--device cuda] [--steps N]
    python -m vlmprune.embedded.train --out DIR --quick          # CPU smoke run, seconds
    python -m vlmprune.embedded.train --out DIR --bench          # step throughput only

What differs between the families (model, processor, prompt, GPU pixel pipeline, vision forward and
stage-1 objective, decoder position ids) sits behind `Family` (`core.py`, with everything the
families share); this module holds the families by name, the evaluation of a trained model and the
two-stage run with its command line.

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

`evaluate(model, processor, items, batch_size)` is the accuracy used here and by the tests of the
shipped models.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from vlmprune.embedded.core import (
    IMAGE_ID,
    PAD_ID,
    UNK_ID,
    Arch,
    AttentionProbe,
    EvalSet,
    Family,
    FeatureCache,
    LabelSpace,
    Renderer,
    TrainStream,
    VisionOut,
    amp,
    answer_ids,
    bench_throughput,
    build_tokenizer,
    compile_layers,
    eager,
    log,
    lr_at,
    make_optimizer,
    n_params,
    param_groups,
    parse_weights,
    prompt_ids,
    relevance_target,
    save_model,
    set_lr,
    shapes_module,
    train_stage1,
    uncompile_layers,
    vocabulary_texts,
)
from vlmprune.embedded.llava import LLAVA
from vlmprune.embedded.qwen2_vl import QWEN2_VL

FAMILIES = {
    "llava": LLAVA,
    "qwen2_vl": QWEN2_VL,
}  # --family names, also the models' config.model_type


def get_family(name: str) -> Family:
    """The family called `name` (one of FAMILIES; also a model's `config.model_type`)."""
    if name not in FAMILIES:
        raise ValueError(
            f"unknown model family {name!r}; expected one of {', '.join(FAMILIES)}"
        )
    return FAMILIES[name]


def family_of(model) -> Family:
    """The family of a model the trainer built (by its `config.model_type`)."""
    return get_family(model.config.model_type)


def _score_fn():
    try:
        return shapes_module().score
    except ImportError:  # pragma: no cover
        return lambda pred, ans: float(pred.strip().lower() == ans.strip().lower())


@torch.no_grad()
def predict(
    model,
    processor,
    items: Sequence[Any],
    batch_size: int = 64,
    max_new_tokens: int = 4,
) -> list[str]:
    """Greedy answers for `items` (objects with `.image` and `.question`), batched, left-padded."""
    device = next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    tokenizer = processor.tokenizer
    tokenizer.padding_side = "left"
    prompt = family_of(model).prompt
    was_training = model.training
    model.eval()
    out: list[str] = []
    autocast = (
        torch.autocast("cuda", dtype=torch.bfloat16)
        if (device.type == "cuda" and dtype == torch.float32)
        else torch.autocast(device.type, enabled=False)
    )
    try:
        for start in range(0, len(items), batch_size):
            batch = items[start : start + batch_size]
            inputs = processor(
                images=[it.image.convert("RGB") for it in batch],
                text=[prompt.format(question=it.question) for it in batch],
                return_tensors="pt",
                padding=True,
            )
            inputs = {
                k: (v.to(device, dtype) if v.is_floating_point() else v.to(device))
                for k, v in inputs.items()
                if isinstance(v, torch.Tensor)
            }
            with autocast:
                gen = model.generate(
                    **inputs,
                    max_new_tokens=max_new_tokens,
                    do_sample=False,
                    pad_token_id=tokenizer.pad_token_id,
                    eos_token_id=tokenizer.eos_token_id,
                )
            new = gen[:, inputs["input_ids"].shape[1] :]
            out += [
                s.strip() for s in tokenizer.batch_decode(new, skip_special_tokens=True)
            ]
    finally:
        model.train(was_training)
    return out


def evaluate(
    model,
    processor,
    items: Sequence[Any],
    batch_size: int = 64,
    max_new_tokens: int = 4,
    details: dict | None = None,
) -> float:
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


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        prog="python -m vlmprune.embedded.train", description=__doc__.split("\n\n")[0]
    )
    ap.add_argument(
        "--out",
        required=True,
        help="output directory (model, processor, train_log.json)",
    )
    ap.add_argument(
        "--family",
        choices=FAMILIES,
        default="llava",
        help="model architecture: LLaVA-1.5 (default) or Qwen2-VL",
    )
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument(
        "--quick",
        action="store_true",
        help="a few steps of a smaller model on CPU (smoke check)",
    )
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--pool",
        type=int,
        default=80_000,
        help="training items (rendered in the background while training runs, then reused)",
    )
    ap.add_argument(
        "--pool-start",
        type=int,
        default=0,
        help="index of the first training seed (a continued run can take items it has not seen)",
    )
    ap.add_argument(
        "--init",
        default=None,
        help="continue from this saved model directory (its weights, tokenizer and processor; "
        "stage 1 is skipped)",
    )
    ap.add_argument(
        "--val", type=int, default=1000, help="validation items scored after each epoch"
    )
    ap.add_argument(
        "--test", type=int, default=2000, help="test items scored at the end"
    )
    ap.add_argument(
        "--workers",
        type=int,
        default=max(1, min(12, (os.cpu_count() or 2) - 4)),
        help="rendering processes (more starve the training loop of CPU)",
    )
    ap.add_argument("--chunk", type=int, default=64, help="items per rendering job")
    ap.add_argument("--stage1-steps", type=int, default=2000)
    ap.add_argument("--stage1-batch", type=int, default=256)
    ap.add_argument("--stage1-lr", type=float, default=1e-3)
    ap.add_argument(
        "--stage1-time",
        type=float,
        default=75.0,
        help="seconds; stage 1 ends (annealed) by then",
    )
    ap.add_argument(
        "--steps",
        "--stage2-steps",
        dest="steps",
        type=int,
        default=12000,
        help="stage-2 steps",
    )
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument(
        "--qtype-weight",
        default="",
        help="sampling weight per question type, e.g. 'relpos=2,count=1.5' (others 1; '' = uniform)",
    )
    ap.add_argument(
        "--lr", type=float, default=1e-3, help="stage-2 LR of projector and decoder"
    )
    ap.add_argument(
        "--vision-lr",
        type=float,
        default=0.0,
        help="stage-2 LR of the vision tower; 0 (default) keeps it frozen, as LLaVA-1.5 does",
    )
    ap.add_argument(
        "--aux-weight",
        type=float,
        default=0.2,
        help="weight of the stage-1 objective kept as an auxiliary loss in stage 2 when the "
        "tower is trained (--vision-lr > 0); 0: off",
    )
    ap.add_argument(
        "--attn-weight",
        type=float,
        default=0.5,
        help="weight of the grounding loss on the decoder's attention (AttentionProbe; 0: off)",
    )
    ap.add_argument(
        "--attn-layers",
        default="",
        help="comma-separated decoder layers the grounding loss supervises (default: the last half)",
    )
    ap.add_argument("--wd", type=float, default=0.05)
    ap.add_argument("--warmup", type=int, default=200)
    ap.add_argument(
        "--budget",
        type=float,
        default=480.0,
        help="seconds from start by which stage 2 ends (its LR schedule is fitted to it); "
        "the final evaluation and save follow (~15 s)",
    )
    ap.add_argument(
        "--epoch-items",
        type=int,
        default=100_000,
        help="training samples per epoch (val after each)",
    )
    ap.add_argument(
        "--patience",
        type=int,
        default=3,
        help="epochs without val gain (after half the run) -> stop",
    )
    ap.add_argument("--eval-batch", type=int, default=128)
    ap.add_argument("--log-every", type=int, default=50)
    ap.add_argument(
        "--arch", default=None, help="JSON of Arch fields overriding the default sizes"
    )
    ap.add_argument(
        "--bench",
        action="store_true",
        help="only time training steps on random data, then exit",
    )
    ap.add_argument(
        "--compile",
        action=argparse.BooleanOptionalAction,
        default=torch.cuda.is_available(),
        help="torch.compile the decoder layers for stage 2 (default: on with CUDA; falls back to "
        "eager if compilation fails)",
    )
    ap.add_argument(
        "--cache-tower",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="with the tower frozen, compute its features once per item (FeatureCache)",
    )
    args = ap.parse_args(argv)
    if args.quick:
        if args.device.startswith("cuda") and not torch.cuda.is_available():
            args.device = "cpu"
        args.pool, args.val, args.test = (
            min(args.pool, 32),
            min(args.val, 4),
            min(args.test, 4),
        )
        args.workers, args.chunk = min(args.workers, 2), 8
        args.stage1_steps, args.stage1_batch = (
            min(args.stage1_steps, 2),
            min(args.stage1_batch, 2),
        )
        args.steps, args.batch, args.warmup, args.log_every = (
            min(args.steps, 2),
            min(args.batch, 2),
            1,
            1,
        )
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
        log(
            json.dumps(
                bench_throughput(
                    family, arch, device, batches=(4,) if args.quick else (128, 256)
                )
            )
        )
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
    max_answer = max(
        len(answer_ids(tokenizer, a)) for a in answer_list
    )  # answer tokens + </s>
    width = (
        max(len(prompt_ids(tokenizer, q, family)) for q in set(texts)) + max_answer + 8
    )
    val_seeds = list(shapes.split_seeds("val", args.val))
    test_seeds = list(shapes.split_seeds("test", args.test))
    train_seeds = list(shapes.split_seeds("train", args.pool, start=args.pool_start))
    n_val, n_test = len(val_seeds), len(test_seeds)
    renderer = Renderer(space, n_val + n_test + len(train_seeds), args.workers)
    try:
        log(
            f"[data] vocab {len(tokenizer)}, row width {width}, {len(space)} scene labels, {args.workers} rendering "
            f"workers; {time.perf_counter() - t_start:.1f}s"
        )

        # model ------------------------------------------------------------------------------------
        if args.init:
            model = family.model_class().from_pretrained(args.init, dtype=torch.float32)
            log(f"[model] initialised from {args.init}; stage 1 skipped")
        else:
            model = family.build_model(arch, len(tokenizer))
        total = n_params(model)
        sizes = ", ".join(
            f"{name} {n_params(part) / 1e6:.2f}M"
            for name, part in family.parts(model).items()
        )
        log(
            f"[model] {family.name}: {total / 1e6:.2f}M params ({sizes} + lm_head); fp16 ~{2 * total / 2**20:.1f} MiB"
        )
        model.to(device)
        if device.type == "cuda":
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True
        objective = family.objective(space, model).to(device)
        pixels = family.pixel_transform(processor).to(device)
        stream = TrainStream(
            renderer,
            n_val + n_test,
            train_seeds,
            tokenizer,
            width,
            device,
            args.chunk,
            inflight=max(2, 3 * args.workers),
            qtype_weight=parse_weights(args.qtype_weight),
            family=family,
        )
        stream.pump(at_least=min(len(train_seeds), 8 * args.chunk))
        # validation and test items queue behind the first training chunks
        val_set = EvalSet(renderer, 0, val_seeds, args.chunk)
        test_set = EvalSet(renderer, n_val, test_seeds, args.chunk)
        times["first_batch_s"] = round(time.perf_counter() - t_start, 2)
        log(
            f"[data] first {stream.ready} training items ready after {times['first_batch_s']:.1f}s"
        )
        history: list[dict] = []
        val_hist: list[dict] = []

        # 1. vision pre-training ---------------------------------------------------------------------
        t1 = time.perf_counter()
        s1_steps = (
            train_stage1(
                family, model, objective, pixels, stream, args, device, history, t_start
            )
            if args.stage1_steps > 0 and not args.init
            else 0
        )
        times["stage1_s"] = round(time.perf_counter() - t1, 2)
        times["stage1_steps"] = s1_steps

        # 2. QA training ------------------------------------------------------------------------------
        t2 = time.perf_counter()
        frozen = (
            args.vision_lr <= 0
        )  # LLaVA-1.5's recipe: the vision tower stays frozen
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
                side += param_groups(
                    objective.named_parameters(), args.vision_lr, args.wd
                )
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
        k = (
            max_answer + 1
        )  # logits of the positions that predict the answer tokens and </s>
        n_layers = model.config.text_config.num_hidden_layers
        attn_layers = (
            [int(x) % n_layers for x in args.attn_layers.split(",")]
            if args.attn_layers
            else list(range(n_layers // 2, n_layers))
        )
        probe = AttentionProbe(model, attn_layers) if args.attn_weight > 0 else None
        # the frozen tower's output, computed once per item (its rows come from the GPU-resident pool)
        cache = (
            FeatureCache(
                stream.capacity,
                lambda rows: family.frozen_features(model, pixels(stream.images[rows])),
                device,
            )
            if frozen and args.cache_tower
            else None
        )
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
                relevant.masked_scatter_(
                    visual,
                    family.visual_targets(relevance_target(stream.dense[idx, 4])),
                )
                keys = attn.bool()
                keys[:, rows.shape[1] - k + 1 :] = (
                    False  # the query sees itself and what comes before
                )
                probe.set(keys, relevant, -k)
            with amp(device):
                if cache is not None:
                    vision_out = VisionOut(
                        family.project(model, cache.get(idx_cpu)), None
                    )
                else:
                    vision_out = family.vision(
                        model, pixels(stream.images[idx]), frozen=frozen
                    )
                logits = family.lm_forward(
                    model, rows, vision_out.tokens, attn, position_ids, k
                )
                aux, aux_stats = (
                    family.scene_loss(
                        objective, vision_out, stream.cls[idx], stream.dense[idx]
                    )
                    if use_aux
                    else (None, {})
                )
            logits = logits[:, :-1].float()
            target = rows[:, -(k - 1) :].masked_fill(~amask[:, -(k - 1) :], -100)
            loss = F.cross_entropy(
                logits.reshape(-1, logits.shape[-1]),
                target.reshape(-1),
                ignore_index=-100,
            )
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
                logits, target, loss, grounding, aux, aux_stats = forward_backward(
                    idx_cpu, rows, amask, attn, position_ids
                )
            except (
                Exception
            ) as e:  # compilation fails (if at all) in the first step: go on eagerly
                if not compiled or done > 0:
                    raise
                log(
                    f"[stage2] torch.compile failed ({type(e).__name__}: {str(e)[:300]}); continuing eagerly"
                )
                uncompile_layers(decoder_layers)
                compiled = False
                logits, target, loss, grounding, aux, aux_stats = forward_backward(
                    idx_cpu, rows, amask, attn, position_ids
                )
            torch.nn.utils.clip_grad_norm_(main_params, 1.0)
            if side_params:
                torch.nn.utils.clip_grad_norm_(side_params, 1.0)
            opt.step()
            done = step + 1
            with torch.no_grad():
                hit = (
                    ((logits.argmax(-1) == target) | (target == -100))
                    .all(-1)
                    .float()
                    .mean()
                )
            logged = {"loss": loss.detach(), "train_acc": hit}
            if grounding is not None:
                logged["ground"] = grounding.detach()
            if aux is not None:
                logged.update(
                    aux=aux.detach(),
                    **{
                        f"aux_{n}": v
                        for n, v in aux_stats.items()
                        if n in ("cls_exact", "ce_kind")
                    },
                )
            for key, v in logged.items():
                run[key] = run.get(key, 0.0) + v
            run["n"] = run.get("n", 0) + 1
            if step % args.log_every == 0 or done == args.steps:
                n = run.pop("n")
                rec = {
                    "stage": 2,
                    "step": step,
                    **{key: round(float(v) / n, 4) for key, v in run.items()},
                    "lr": opt.param_groups[0]["lr"],
                    "pool": stream.ready,
                    "t": round(time.perf_counter() - t_start, 2),
                }
                history.append(rec)
                run = {}
                log(
                    f"[stage2] step {step:5d} "
                    + " ".join(
                        f"{key} {rec[key]:.4f}"
                        for key in rec
                        if key not in ("stage", "step", "lr", "pool", "t")
                    )
                    + f" lr {rec['lr']:.2e} progress {progress:.2f} pool {stream.ready} {time.perf_counter() - t2:.1f}s"
                )
            if done % steps_per_epoch == 0 or done == args.steps:
                te = time.perf_counter()
                details: dict = {}
                val_items = val_set.items()
                with eager(compiled):
                    acc = evaluate(
                        model,
                        processor,
                        val_items,
                        args.eval_batch,
                        max_answer + 1,
                        details=details,
                    )
                epoch = done / steps_per_epoch
                val_hist.append(
                    val_record(
                        done,
                        steps_per_epoch,
                        acc,
                        details,
                        t_start,
                        eval_s=round(time.perf_counter() - te, 2),
                    )
                )
                stale = 0 if acc > best + 0.002 else stale + 1
                if acc > best:
                    best, best_step = acc, done
                    save_model(model, processor, out)
                log(
                    f"[val] epoch {epoch:.2f} step {done} acc {acc:.4f} (best {best:.4f} @ {best_step}) "
                    f"{ {q: round(v, 3) for q, v in details['per_qtype'].items()} } eval {time.perf_counter() - te:.1f}s,"
                    f" total {time.perf_counter() - t_start:.1f}s"
                )
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
        log(
            f"[stage2] stopped: {stop_reason} after {done} steps, {times['stage2_s']:.0f}s; pool {stream.ready} items"
        )
        val_items, test_items = val_set.items(), test_set.items()
        unk = sum(
            UNK_ID in tokenizer(it.question)["input_ids"]
            for it in val_items + test_items
        )
        if unk:
            log(
                f"[data] warning: {unk} validation / test questions have words outside the vocabulary"
            )
    finally:
        renderer.close()
    # the run may have ended between evaluations: score (and keep, if better) the last state
    if not val_hist or val_hist[-1]["step"] != done:
        details = {}
        acc = evaluate(
            model,
            processor,
            val_items,
            args.eval_batch,
            max_answer + 1,
            details=details,
        )
        val_hist.append(val_record(done, steps_per_epoch, acc, details, t_start))
        log(f"[val] final step {done} acc {acc:.4f} (best before {best:.4f})")
        if acc >= best:
            best, best_step = acc, done
            save_model(model, processor, out)

    # 3. reload the shipped artifact and score the test split -----------------------------------------
    t3 = time.perf_counter()
    opt = stream = None  # free the optimizer state and the pool before the test pass
    model.cpu()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    from vlmprune.eval.qwen import load_processor

    dtype = torch.float16 if device.type == "cuda" else torch.float32
    shipped = family.model_class().from_pretrained(out, dtype=dtype).to(device).eval()
    proc = load_processor(
        out
    )  # AutoProcessor; for Qwen2-VL without torchvision, for images only
    details = {}
    test_acc = evaluate(
        shipped, proc, test_items, args.eval_batch, max_answer + 1, details=details
    )
    times["test_s"] = round(time.perf_counter() - t3, 2)
    times["total_s"] = round(time.perf_counter() - t_start, 2)
    example = test_items[0]
    test_rec = {
        "acc": round(test_acc, 4),
        "n": len(test_items),
        "per_qtype": {q: round(v, 4) for q, v in details["per_qtype"].items()},
        "dtype": str(dtype),
        "best_val_acc": round(best, 4),
        "best_step": best_step,
        "stop_reason": stop_reason,
        "example": {
            "question": example.question,
            "answer": example.answer,
            "prediction": details["predictions"][0],
        },
    }
    _write_log(out, args, arch, total, history, val_hist, times, test_rec)
    size = (out / "model.safetensors").stat().st_size
    log(
        f"[test] acc {test_acc:.4f} on {len(test_items)} items (reloaded {out}, {dtype}); per type {test_rec['per_qtype']}"
    )
    log(
        f"[test] example: {example.question!r} -> {details['predictions'][0]!r} (answer {example.answer!r})"
    )
    log(
        f"[done] model.safetensors {size / 2**20:.2f} MiB, {total / 1e6:.2f}M params; times {times}"
    )
    return 0


def val_record(
    done: int, steps_per_epoch: int, acc: float, details: dict, t_start: float, **extra
) -> dict:
    """One validation entry of train_log.json (after an epoch, or the last state)."""
    return {
        "epoch": round(done / steps_per_epoch, 2),
        "step": done,
        "val_acc": round(acc, 4),
        "per_qtype": {q: round(v, 4) for q, v in details["per_qtype"].items()},
        "t": round(time.perf_counter() - t_start, 2),
        **extra,
    }


def _write_log(
    out: Path, args, arch: Arch, total: int, history, val_hist, times, test
) -> None:
    data = {
        "args": vars(args),
        "family": args.family,
        "arch": asdict(arch),
        "params": total,
        "torch": torch.__version__,
        "device": torch.cuda.get_device_name()
        if args.device.startswith("cuda") and torch.cuda.is_available()
        else "cpu",
        "times": times,
        "train": history,
        "val": val_hist,
        "test": test,
    }
    tmp = out / "train_log.json.tmp"
    tmp.write_text(json.dumps(data, indent=1))
    tmp.replace(out / "train_log.json")


if __name__ == "__main__":
    sys.exit(main())
