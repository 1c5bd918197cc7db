"""Tiny random-weight models built from configs (no downloads), for tests, demos and benchmarks
of the pipeline's shapes. Their outputs mean nothing; their shapes and code paths are real."""

from __future__ import annotations

import torch
from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

IMAGE_TOKEN = 99
PAD = 0


def llava_config(
    *,
    image_size: int = 28,
    patch_size: int = 7,
    vision_hidden: int = 32,
    vision_layers: int = 4,
    vision_heads: int = 4,
    vision_intermediate: int | None = None,
    text_hidden: int = 32,
    text_layers: int = 2,
    text_heads: int = 4,
    text_kv_heads: int = 2,
    text_intermediate: int | None = None,
    vocab_size: int = 100,
    image_token_id: int = IMAGE_TOKEN,
    strategy: str = "default",
    feature_layer: int = -2,
    attn: str = "sdpa",
) -> LlavaConfig:
    """A LLaVA-1.5-style config; defaults are tiny, `llava_7b_config()` gives the real shapes."""
    vision = CLIPVisionConfig(
        hidden_size=vision_hidden,
        intermediate_size=vision_intermediate or 2 * vision_hidden,
        num_hidden_layers=vision_layers,
        num_attention_heads=vision_heads,
        image_size=image_size,
        patch_size=patch_size,
        projection_dim=vision_hidden,
    )
    text = LlamaConfig(
        hidden_size=text_hidden,
        intermediate_size=text_intermediate or 2 * text_hidden,
        num_hidden_layers=text_layers,
        num_attention_heads=text_heads,
        num_key_value_heads=text_kv_heads,
        vocab_size=vocab_size,
        max_position_embeddings=4096,
        pad_token_id=PAD,
        bos_token_id=1,
        eos_token_id=2,
    )
    cfg = LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_id=image_token_id,
        vision_feature_layer=feature_layer,
        vision_feature_select_strategy=strategy,
    )
    cfg._attn_implementation = attn
    return cfg


def llava_7b_config(attn: str = "sdpa") -> LlavaConfig:
    """LLaVA-1.5-7B shapes: CLIP ViT-L/14 at 336 px (576 visual tokens) + a 7B Llama."""
    return llava_config(
        image_size=336, patch_size=14, vision_hidden=1024, vision_layers=24, vision_heads=16,
        vision_intermediate=4096, text_hidden=4096, text_layers=32, text_heads=32, text_kv_heads=32,
        text_intermediate=11008, vocab_size=32064, image_token_id=32000, attn=attn,
    )


def tiny_llava(attn: str = "sdpa", seed: int = 0, **overrides) -> LlavaForConditionalGeneration:
    """A random LLaVA with a 4x4 grid of visual tokens (28 px images, patch 7)."""
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(llava_config(attn=attn, **overrides)).eval()
    model.generation_config.pad_token_id = PAD
    return model


def image_prompt(n_images: int, n_vis: int, before: int = 3, after: int = 4, seed: int = 0,
                 image_token: int = IMAGE_TOKEN, vocab: int = 90) -> list[int]:
    """Token ids: random text, each image's placeholder run followed by a text token, text."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (before,), generator=g).tolist()
    for _ in range(n_images):
        ids += [image_token] * n_vis + torch.randint(3, vocab, (1,), generator=g).tolist()
    return ids + torch.randint(3, vocab, (after,), generator=g).tolist()


def left_pad(rows: list[list[int]], pad: int = PAD) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask) with rows left-padded to the longest."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, width - len(r):] = torch.tensor(r, dtype=torch.long)
        mask[i, width - len(r):] = 1
    return ids, mask


# --- Qwen-VL families ------------------------------------------------------------------------------

QWEN_IMAGE, QWEN_VIDEO, QWEN_START, QWEN_END = 95, 96, 97, 98
"""Placeholder ids of the tiny Qwen models: image pad, video pad, vision start, vision end."""
QWEN_FAMILIES = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl")
QWEN_PATCH, QWEN_TEMPORAL, QWEN_MERGE = 4, 2, 2
QWEN3_FPS = 2.0  # the tiny Qwen3-VL videos' sampling rate (the processor's metadata fps)
QWEN3_TIME = {**{str(d): 80 + d for d in range(10)}, ".": 90, "<": 91, " seconds>": 92}
"""Text ids of a Qwen3-VL frame timestamp `<1.2 seconds>` in the tiny vocabulary: digits, dot, `<`, ` seconds>`."""


def qwen_config(family: str = "qwen2_vl", *, attn: str = "sdpa", vision_layers: int = 4, vision_hidden: int = 32,
                vision_heads: int = 4, text_hidden: int = 32, text_layers: int = 2, text_heads: int = 4,
                text_kv_heads: int = 2, vocab_size: int = 100, patch_size: int = QWEN_PATCH, window_size: int = 16,
                fullatt: tuple[int, ...] = (1, 3), vision_intermediate: int | None = None,
                text_intermediate: int | None = None, out_hidden: int | None = None, rope_theta: float = 10000.0,
                mrope_section: list[int] | None = None, deepstack: tuple[int, ...] = (0, 2)):
    """A Qwen2-VL / Qwen2.5-VL / Qwen3-VL config; defaults are tiny (4 px patches, 2x2 merge: one
    visual token per 8x8 px; Qwen2.5-VL: windows of 16 px, full attention in blocks `fullatt`;
    Qwen3-VL: deepstack features from blocks `deepstack`). `qwen2_5_vl_7b_config()` gives real shapes."""
    import transformers

    head_dim = text_hidden // text_heads
    half = head_dim // 2
    section = mrope_section or [half - 2 * ((half - half // 4) // 2)] + [(half - half // 4) // 2] * 2
    text = dict(vocab_size=vocab_size, hidden_size=text_hidden, intermediate_size=text_intermediate or 2 * text_hidden,
                num_hidden_layers=text_layers, num_attention_heads=text_heads, num_key_value_heads=text_kv_heads,
                max_position_embeddings=32768, pad_token_id=PAD, bos_token_id=1, eos_token_id=2,
                rope_parameters={"rope_type": "default", "mrope_section": section, "rope_theta": rope_theta})
    vision = dict(depth=vision_layers, num_heads=vision_heads, patch_size=patch_size, spatial_merge_size=QWEN_MERGE,
                  temporal_patch_size=QWEN_TEMPORAL, in_channels=3)
    out = out_hidden or text_hidden
    if family == "qwen2_vl":
        vision.update(embed_dim=vision_hidden, hidden_size=out, mlp_ratio=(vision_intermediate or 2 * vision_hidden) // vision_hidden)
        cls = transformers.Qwen2VLConfig
    elif family == "qwen2_5_vl":
        vision.update(hidden_size=vision_hidden, out_hidden_size=out, intermediate_size=vision_intermediate or 2 * vision_hidden,
                      window_size=window_size, fullatt_block_indexes=list(fullatt))
        cls = transformers.Qwen2_5_VLConfig
    elif family == "qwen3_vl":
        vision.update(hidden_size=vision_hidden, out_hidden_size=out, intermediate_size=vision_intermediate or 2 * vision_hidden,
                      deepstack_visual_indexes=list(deepstack), num_position_embeddings=64)
        text.update(head_dim=head_dim)
        cls = transformers.Qwen3VLConfig
    else:
        raise ValueError(f"family must be one of {QWEN_FAMILIES}, got {family!r}")
    cfg = cls(text_config=text, vision_config=vision, image_token_id=QWEN_IMAGE, video_token_id=QWEN_VIDEO,
              vision_start_token_id=QWEN_START, vision_end_token_id=QWEN_END)
    cfg._attn_implementation = attn
    return cfg


def qwen2_5_vl_7b_config(attn: str = "sdpa"):
    """Qwen2.5-VL-7B shapes: a 32-block ViT (1280 wide, 14 px patches, 112 px windows, full attention
    in blocks 7/15/23/31) merging 2x2 patches into a 28-layer 3584-wide Qwen2 decoder."""
    cfg = qwen_config("qwen2_5_vl", attn=attn, vision_layers=32, vision_hidden=1280, vision_heads=16,
                      vision_intermediate=3420, patch_size=14, window_size=112, fullatt=(7, 15, 23, 31),
                      text_hidden=3584, text_layers=28, text_heads=28, text_kv_heads=4, text_intermediate=18944,
                      vocab_size=152064, rope_theta=1e6, mrope_section=[16, 24, 24])
    cfg.image_token_id, cfg.video_token_id, cfg.vision_start_token_id, cfg.vision_end_token_id = 151655, 151656, 151652, 151653
    return cfg


def tiny_qwen(family: str = "qwen2_vl", attn: str = "sdpa", seed: int = 0, **overrides):
    """A random Qwen-VL model of `family` (see `qwen_config`)."""
    import transformers

    cfg = qwen_config(family, attn=attn, **overrides)
    cls = {"qwen2_vl": transformers.Qwen2VLForConditionalGeneration,
           "qwen2_5_vl": transformers.Qwen2_5_VLForConditionalGeneration,
           "qwen3_vl": getattr(transformers, "Qwen3VLForConditionalGeneration", None)}[family]
    torch.manual_seed(seed)
    model = cls(cfg).eval()
    model.generation_config.pad_token_id = PAD
    return model


def qwen3_video_placeholder(t: int, h: int, w: int, fps: float = QWEN3_FPS) -> list[int]:
    """A Qwen3-VL video's placeholder ids as `Qwen3VLProcessor.replace_video_token` writes them: per
    frame (temporal patch) its mid time as text `<{s:.1f} seconds>`, then vision start, the frame's
    h * w / 4 video pads, vision end (text spelt with `QWEN3_TIME`'s ids, one per character)."""
    ids = []
    for f in range(t):
        first = f * QWEN_TEMPORAL  # the patch's input frames: first .. first + temporal - 1
        seconds = (first + first + QWEN_TEMPORAL - 1) / 2 / fps
        ids += [QWEN3_TIME[c] for c in f"<{seconds:.1f}"] + [QWEN3_TIME[" seconds>"]]
        ids += [QWEN_START] + [QWEN_VIDEO] * (h * w // QWEN_MERGE**2) + [QWEN_END]
    return ids


def qwen_inputs(rows: list[list[tuple[str, tuple[int, int, int]]]], *, patch_size: int = QWEN_PATCH, seed: int = 0,
                before: int = 3, after: int = 4, vocab: int = 90, pad_side: str = "left",
                family: str = "qwen2_vl") -> dict[str, torch.Tensor]:
    """A padded batch for a Qwen-VL model: rows[b] lists the row's items as (kind, (t, h, w)) with
    kind "image" or "video" and (t, h, w) the patch grid (t frames after temporal merging; h, w
    multiples of the 2x2 merge), each item's placeholders between vision start/end tokens amid
    random text (`family="qwen3_vl"`: a video's frames as `qwen3_video_placeholder` lays them out).
    Gives input_ids, attention_mask, mm_token_type_ids, pixel_values(+_videos) and the grids, as
    the processor would."""
    if family not in QWEN_FAMILIES:
        raise ValueError(f"family must be one of {QWEN_FAMILIES}, got {family!r}")
    g = torch.Generator().manual_seed(seed)
    width = 3 * QWEN_TEMPORAL * patch_size * patch_size
    seqs, pixels, grids = [], {"image": [], "video": []}, {"image": [], "video": []}
    for b, items in enumerate(rows):
        ids = torch.randint(3, vocab, (before,), generator=g).tolist()
        for kind, (t, h, w) in items:
            n = t * h * w // QWEN_MERGE**2
            if kind == "video" and family == "qwen3_vl":
                body = qwen3_video_placeholder(t, h, w)
            else:
                body = [QWEN_IMAGE if kind == "image" else QWEN_VIDEO] * n
            ids += [QWEN_START] + body + [QWEN_END]
            pixels[kind].append(torch.randn(t * h * w, width, generator=g))
            grids[kind].append([t, h, w])
        ids += torch.randint(3, vocab, (after + b,), generator=g).tolist()
        seqs.append(ids)
    longest = max(len(s) for s in seqs)
    input_ids = torch.full((len(seqs), longest), PAD, dtype=torch.long)
    mask = torch.zeros_like(input_ids)
    for b, s in enumerate(seqs):
        cols = slice(longest - len(s), longest) if pad_side == "left" else slice(0, len(s))
        input_ids[b, cols] = torch.tensor(s)
        mask[b, cols] = 1
    out = {"input_ids": input_ids, "attention_mask": mask,
           "mm_token_type_ids": (input_ids == QWEN_IMAGE).int() + 2 * (input_ids == QWEN_VIDEO).int()}
    if pixels["image"]:
        out.update(pixel_values=torch.cat(pixels["image"]), image_grid_thw=torch.tensor(grids["image"]))
    if pixels["video"]:
        out.update(pixel_values_videos=torch.cat(pixels["video"]), video_grid_thw=torch.tensor(grids["video"]))
    return out


# --- any-resolution LLaVA families (LLaVA-NeXT, LLaVA-OneVision) -----------------------------------

ANYRES_VIDEO = 98
"""Video placeholder id of the tiny LLaVA-OneVision (images use `IMAGE_TOKEN`)."""
ANYRES_PINPOINTS = [[28, 56], [56, 28], [56, 56]]  # 1x2, 2x1 and 2x2 crops of the 28 px tower image


def llava_next_config(family: str = "llava_next", attn: str = "sdpa", **overrides):
    """A LLaVA-NeXT (CLIP + Llama) or LLaVA-OneVision (SigLIP + Qwen2, `full` features of the last
    layer) config with the tiny LLaVA's sizes: 28 px views of 4x4 patches, crops on `ANYRES_PINPOINTS`.
    `llava_next_7b_config()` gives LLaVA-NeXT-7B's shapes."""
    import transformers

    base = llava_config(attn=attn, **overrides)
    vision, text = base.vision_config, base.text_config
    common = {"text_config": text, "image_token_index": base.image_token_id,
              "image_grid_pinpoints": [[s * vision.image_size // 28 for s in p] for p in ANYRES_PINPOINTS]}
    if family == "llava_next":
        cfg = transformers.LlavaNextConfig(vision_config=vision, vision_feature_layer=base.vision_feature_layer,
                                           vision_feature_select_strategy=base.vision_feature_select_strategy,
                                           **common)
    elif family == "llava_onevision":
        siglip = transformers.SiglipVisionConfig(**{k: getattr(vision, k) for k in (
            "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "image_size", "patch_size")})
        qwen = transformers.Qwen2Config(**{k: getattr(text, k) for k in (
            "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
            "vocab_size", "max_position_embeddings", "pad_token_id", "bos_token_id", "eos_token_id")})
        common.update(text_config=qwen)
        cfg = transformers.LlavaOnevisionConfig(vision_config=siglip, video_token_index=ANYRES_VIDEO,
                                                vision_feature_layer=-1, vision_feature_select_strategy="full",
                                                **common)
    else:
        raise ValueError(f"family must be one of ['llava_next', 'llava_onevision'], got {family!r}")
    cfg._attn_implementation = attn
    return cfg


def llava_next_7b_config(attn: str = "sdpa"):
    """LLaVA-NeXT-7B (llava-v1.6-mistral-7b-hf shapes, a Llama-style 7B decoder): CLIP ViT-L/14 at 336 px
    per view, crops on 336 px multiples up to 672x672 (a 672x672 image: 5 views, 2,880 visual tokens)."""
    cfg = llava_next_config(
        image_size=336, patch_size=14, vision_hidden=1024, vision_layers=24, vision_heads=16,
        vision_intermediate=4096, text_hidden=4096, text_layers=32, text_heads=32, text_kv_heads=8,
        text_intermediate=14336, vocab_size=32064, image_token_id=32000, attn=attn,
    )
    cfg.image_grid_pinpoints = [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]
    return cfg


def tiny_llava_next(family: str = "llava_next", attn: str = "sdpa", seed: int = 0, **overrides):
    """A random LLaVA-NeXT or LLaVA-OneVision of `llava_next_config`'s tiny sizes."""
    import transformers

    cls = {"llava_next": transformers.LlavaNextForConditionalGeneration,
           "llava_onevision": transformers.LlavaOnevisionForConditionalGeneration}
    cfg = llava_next_config(family, attn=attn, **overrides)
    torch.manual_seed(seed)
    model = cls[family](cfg).eval()
    model.generation_config.pad_token_id = PAD
    return model


def anyres_inputs(model, rows: list[list[tuple[str, tuple[int, int]]]], *, seed: int = 0, before: int = 3,
                  after: int = 4, vocab: int = 90) -> dict[str, torch.Tensor]:
    """A left-padded batch for a tiny LLaVA-NeXT / OneVision: rows[b] lists the row's items as
    ("image", (height, width)) or ("video", (frames, 0)), each item's placeholder run (as many
    tokens as the model packs for it, newlines included) followed by a text token, amid random
    text. Gives input_ids, attention_mask, pixel_values [images, views, 3, S, S], image_sizes
    (OneVision: batch_num_images, and pixel_values_videos [videos, frames, 3, S, S])."""
    g = torch.Generator().manual_seed(seed)
    vc = model.config.vision_config
    side = vc.image_size
    onevision = model.config.model_type == "llava_onevision"
    sizes = [size for row in rows for kind, size in row if kind == "image"]
    per_row = [sum(kind == "image" for kind, _ in row) for row in rows]
    runs, pixels, videos = [], [], []
    if sizes:
        image_sizes = torch.tensor(sizes)
        extra = {"batch_num_images": torch.tensor(per_row)} if onevision else {}
        pixels = torch.randn(len(sizes), 5, 3, side, side, generator=g)
        with torch.no_grad():  # the run lengths, as the model packs them
            out = model.model.get_image_features(pixel_values=pixels.to(model.device, model.dtype),
                                                 image_sizes=image_sizes, return_dict=True, **extra)
        runs = [int(f.shape[0]) for f in out.pooler_output]
    pooled = -(-(side // vc.patch_size) // 2)  # OneVision pools each frame's patch grid 2x2 (ceil)
    seqs, run_at = [], iter(runs)
    for b, items in enumerate(rows):
        ids = torch.randint(3, vocab, (before,), generator=g).tolist()
        for kind, size in items:
            if kind == "image":
                ids += [model.config.image_token_id] * next(run_at)
            else:
                videos.append(torch.randn(size[0], 3, side, side, generator=g))
                ids += [ANYRES_VIDEO] * (size[0] * pooled * pooled + 1)
            ids += torch.randint(3, vocab, (1,), generator=g).tolist()
        seqs.append(ids + torch.randint(3, vocab, (after + b,), generator=g).tolist())
    input_ids, mask = left_pad(seqs)
    out = {"input_ids": input_ids, "attention_mask": mask}
    if sizes:
        out.update(pixel_values=pixels, image_sizes=image_sizes)
        if onevision:
            out["batch_num_images"] = torch.tensor(per_row)
    if videos:
        out["pixel_values_videos"] = torch.stack(videos)
    return out
