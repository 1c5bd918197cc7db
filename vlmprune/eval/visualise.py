"""Pictures: kept-patch overlays on the image the encoder saw, and sweep plots."""

from __future__ import annotations

from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
from PIL import Image

import vlmprune

DIM = 0.3  # pruned patches are multiplied by this
GAP = 4  # px of white between the panels of an any-resolution image (`views_overlay`)


def patch_mask(
    kept: torch.Tensor, grid: tuple[int, int], n_visual: int | None = None
) -> torch.Tensor:
    """[h, w] bool, True at kept patches. With one extra leading token (a CLS kept as a visual
    token, `vision_feature_select_strategy="full"`) indices are shifted past it."""
    h, w = grid
    offset = (n_visual or h * w) - h * w
    if offset not in (0, 1):
        raise ValueError(f"{n_visual} visual tokens do not form the {h}x{w} patch grid")
    idx = kept.long().cpu() - offset
    mask = torch.zeros(h * w, dtype=torch.bool)
    mask[idx[idx >= 0]] = True
    return mask.view(h, w)


def overlay(
    image: Image.Image, mask: torch.Tensor, dim: float = DIM, scale: int = 1
) -> Image.Image:
    """`image` (the encoder's view, H x W divisible by the grid) with the patches where `mask` is
    False multiplied by `dim` (rounded), the kept ones untouched; upscaled by `scale` (nearest)."""
    h, w = mask.shape
    arr = torch.from_numpy(np.asarray(image.convert("RGB")).copy())
    H, W = arr.shape[:2]
    if H % h or W % w:
        raise ValueError(
            f"image of {W}x{H} px does not split into the {w}x{h} patch grid"
        )
    pixel_mask = mask.repeat_interleave(H // h, 0).repeat_interleave(W // w, 1)
    dimmed = (arr.double() * dim).round().to(torch.uint8)  # float64, round half to even
    out = torch.where(pixel_mask[..., None], arr, dimmed)
    result = Image.fromarray(out.numpy(), "RGB")
    return result.resize((W * scale, H * scale), Image.NEAREST) if scale > 1 else result


class Overlay(NamedTuple):
    """`kept_overlay`'s result: the picture, the kept indices, and a line saying what is drawn."""

    picture: Image.Image
    kept: torch.Tensor
    caption: str


@torch.no_grad()
def kept_overlay(
    vlm: Any,
    image: Image.Image,
    method: str = "cls",
    prompt: str = "Describe the image.",
    dim: float = DIM,
    **patch_kwargs: Any,
) -> Overlay:
    """Run one prefill of `vlm` (a `sweep.VLM`) pruned with `method` on `image`; returns the
    overlay of its kept patches on the image as the encoder saw it, and the kept indices. The grid
    is the image's own (`vlm.token_grid`): LLaVA's 24 x 24 patches of 14 px, or Qwen-VL's
    (h / 2, w / 2) tokens of 28 x 28 px from the image's `image_grid_thw` row. Families whose
    images have several views (LLaVA-NeXT, OneVision: the adapter's `token_layout`) are drawn on
    the original image, one panel per view kind (`views_overlay`)."""
    inputs = vlm.inputs([image], [prompt])
    with vlmprune.pruning(vlm.model, method, **patch_kwargs):
        vlm.model(**inputs)
        kept = vlmprune.last_selection(vlm.model)[0][0]
        layout = getattr(vlm.model.__dict__["_vlmprune_adapter"], "token_layout", None)
        layout = layout(inputs)[0] if layout is not None else None
    if layout is not None:
        picture, caption = views_overlay(
            image.convert("RGB"), kept, layout, vlm.model.config, dim
        )
        return Overlay(picture, kept, caption)
    view = vlm.view(inputs)
    (rows, cols), n = vlm.token_grid(inputs), vlm.visual_counts(inputs)[0][0]
    picture = overlay(
        view, patch_mask(kept, (rows, cols), n), dim, display_scale(view.size)
    )
    caption = (
        f"kept {len(kept)} of {n} visual tokens ({rows}x{cols} grid of {picture.width // cols}x"
        f"{picture.height // rows} px blocks as drawn)"
    )
    return Overlay(picture, kept, caption)


def shown_image(vlm: Any, image: Image.Image, prompt: str) -> Image.Image:
    """The picture `kept_overlay` draws on, nothing dimmed, at its display scale: the original
    image for any-resolution families (config with `image_grid_pinpoints`), else the encoder's view."""
    if getattr(vlm.model.config, "image_grid_pinpoints", None):
        view = image.convert("RGB")
    else:
        view = vlm.view(vlm.inputs([image], [prompt]))
    scale = display_scale(view.size)
    return view.resize((view.width * scale, view.height * scale), Image.NEAREST)


def views_overlay(
    image: Image.Image,
    kept: torch.Tensor,
    layout: torch.Tensor,
    config: Any,
    dim: float = DIM,
) -> tuple[Image.Image, str]:
    """Any-resolution images (LLaVA-NeXT, OneVision): the original image twice side by side, the
    base view's kept tokens kept bright on the left, the crops' on the right (one panel when the
    image has only its base view), pruned ones dimmed; and the caption. `layout`: the adapter's
    `token_layout` row of the image.

    Mapping (pixel centres of the original W x H image): the base view is the image resized to the
    tower's square, so pixel (y, x) lies in base patch (y h / H, x w / W). The crops tile the best
    fit of `image_grid_pinpoints` (HF's `select_best_resolution`), on which the image is resized
    keeping its aspect ratio and centred (`get_patch_output_size`, padding split evenly), so the
    pixel lies at (top + y nh / H, left + x nw / W) px of that canvas, / patch_size in patches;
    each pixel takes the crop token whose centre on the canvas is nearest (the tokens' centres come
    from HF's packing, so unpadding and OneVision's downscale are HF's own). Approximate: resampling
    blends neighbouring pixels across block edges; unpadding rounds to whole patches, so the edge
    tokens may cover a sliver of padding (or a sliver of image is drawn with its nearest token); a
    token of a downscaled grid is drawn as the cell around the point it samples, although bilinear
    interpolation mixes its four neighbouring patches."""
    from transformers.image_processing_utils import (
        get_patch_output_size,
        select_best_resolution,
    )
    from transformers.image_utils import ChannelDimension

    W, H = image.size
    vc = config.vision_config
    side = vc.image_size // vc.patch_size  # patches per view side
    ys, xs = torch.arange(H) + 0.5, torch.arange(W) + 0.5
    chosen = torch.zeros(len(layout), dtype=torch.bool)
    chosen[kept.cpu()] = True
    base = layout[:, 0] == 0
    masks = [
        nearest_tokens(layout[base, 1:], chosen[base], ys * side / H, xs * side / W)
    ]
    caption = f"base view {side}x{side}: {int(chosen[base].sum())} kept"
    if not base.all():
        th, tw = select_best_resolution((H, W), config.image_grid_pinpoints)
        nh, nw = get_patch_output_size(
            np.empty((1, H, W)), (th, tw), ChannelDimension.FIRST
        )
        top, left = (th - nh) // 2, (tw - nw) // 2
        crops = layout[~base, 1:]
        masks.append(
            nearest_tokens(
                crops,
                chosen[~base],
                (top + ys * nh / H) / vc.patch_size,
                (left + xs * nw / W) / vc.patch_size,
            )
        )
        rows, cols = grid_shape(crops)
        caption += f"; crops {rows}x{cols} as packed (unpadded; OneVision: downscaled): {int(chosen[~base].sum())} kept"
    scale = display_scale(image.size)
    panels = [overlay(image, m, dim, scale) for m in masks]
    picture = Image.new(
        "RGB",
        (sum(p.width for p in panels) + GAP * (len(panels) - 1), H * scale),
        "white",
    )
    for i, panel in enumerate(panels):
        picture.paste(panel, (i * (W * scale + GAP), 0))
    where = "base view left, crops right" if len(panels) > 1 else "base view only"
    return picture, (
        f"kept {len(kept)} of {len(layout)} visual tokens ({caption}; drawn on the {W}x{H} px "
        f"image, {where}; newlines not counted)"
    )


def grid_shape(centres: torch.Tensor) -> tuple[int, int]:
    """(rows, columns) of tokens laid out as a row-major raster, from their (row, column) centres."""
    cols = int(((centres[:, 0] - centres[0, 0]).abs() < 1e-3).sum())
    return len(centres) // cols, cols


def nearest_tokens(
    centres: torch.Tensor, chosen: torch.Tensor, ys: torch.Tensor, xs: torch.Tensor
) -> torch.Tensor:
    """[len(ys), len(xs)] bool: `chosen` of the token whose centre is nearest each point (ys x xs,
    in the centres' units), for tokens laid out as a row-major raster (ties: the lower token)."""
    rows, cols = grid_shape(centres)
    r, c = centres[::cols, 0], centres[:cols, 1]
    at_r = (ys[:, None] - r[None]).abs().argmin(1)
    at_c = (xs[:, None] - c[None]).abs().argmin(1)
    return chosen.view(rows, cols)[at_r][:, at_c]


def display_scale(size: tuple[int, int], target: int = 336) -> int:
    """Integer upscale so small encoder inputs (tiny models) are visible."""
    return max(1, target // max(size))


BASELINE = "pool"  # drawn black, dash-dotted, in every sweep plot


def plot_sweep(rows: list[dict[str, Any]], path: str | Path, title: str = "") -> None:
    """Two panels against kept visual tokens per image, one line per method: the metric, and the
    prefill time (left out when no row has one); the unpruned model is a horizontal reference line,
    `pool` (the downsampling baseline) a black dash-dotted one."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ref = next((r for r in rows if r["method"] == "unpruned"), None)
    methods = list(
        dict.fromkeys(r["method"] for r in rows if r["method"] != "unpruned")
    )
    metric_name = (ref or rows[0])["metric_name"] if rows else "metric"
    panels = [("metric", metric_name)]
    if any(
        r.get("prefill_ms") is not None for r in rows
    ):  # no timings (e.g. dropped as unreliable): one panel
        panels.append(("prefill_ms", "prefill time (ms, median per batch)"))
    fig, axes = plt.subplots(
        1,
        len(panels),
        figsize=(5.5 * len(panels) + 0.5 * (len(panels) == 1), 4.2),
        squeeze=False,
    )
    axes = axes[0]
    for ax, (key, label) in zip(axes, panels):
        for i, m in enumerate(methods):
            pts = sorted(
                (r["visual_tokens"], r[key])
                for r in rows
                if r["method"] == m and r[key] is not None
            )
            if (
                pts and m == BASELINE
            ):  # plain downsampling: the reference every method should beat (VTC-Bench)
                ax.plot(
                    *zip(*pts),
                    color="black",
                    linestyle="-.",
                    linewidth=2.2,
                    marker="x",
                    label=f"{m} (baseline)",
                )
            elif pts:
                ax.plot(
                    *zip(*pts),
                    marker="osD^v<>p"[i % 8],
                    markersize=8 - 1.5 * (i % 3),
                    color=f"C{i}" if len(methods) <= 10 else plt.cm.tab20(i % 20),  # beyond the default cycle
                    label=m,
                    linewidth=2.5 - 0.6 * (i % 3),
                )  # sizes vary so coinciding lines stay visible
        if ref is not None and ref[key] is not None:
            ax.axhline(
                ref[key],
                color="0.3",
                linestyle="--",
                label=f"unpruned ({ref['visual_tokens']} tokens)",
            )
        xs = sorted({r["visual_tokens"] for r in rows})
        if xs and xs[0] > 0:
            ax.set_xscale("log", base=2)
        ax.set_xticks(xs, [str(x) for x in xs], minor=False)
        ax.minorticks_off()
        ax.set_xlabel("visual tokens kept per image")
        ax.set_ylabel(label)
        ax.grid(True, alpha=0.3)
    axes[0].legend(fontsize=8)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


CAPTION_PX = 18  # caption strip above each tile of an overlay grid


def overlay_grid(
    vlm: Any,
    images: list[Image.Image],
    prompts: list[str],
    methods: list[str],
    path: str | Path,
    **patch_kwargs: Any,
) -> Image.Image:
    """One row per image: the picture drawn on (`shown_image`), then the kept-patch overlay of each
    method (same `patch_kwargs`, e.g. keep=64), each tile captioned; saved to `path` as PNG."""
    from PIL import ImageDraw

    rows = []
    for image, prompt in zip(images, prompts):
        tiles = [("image", shown_image(vlm, image, prompt))]
        tiles += [
            (m, kept_overlay(vlm, image, m, prompt, **patch_kwargs).picture)
            for m in methods
        ]
        rows.append(tiles)
    # one cell per tile, as large as the largest (Qwen-VL's images keep their own size)
    width = max(tile.width for tiles in rows for _, tile in tiles)
    height = max(tile.height for tiles in rows for _, tile in tiles)
    grid = Image.new(
        "RGB", (width * len(rows[0]), (height + CAPTION_PX) * len(rows)), "white"
    )
    draw = ImageDraw.Draw(grid)
    amount = ", ".join(f"{k}={v}" for k, v in patch_kwargs.items())
    for r, tiles in enumerate(rows):
        y = r * (height + CAPTION_PX)
        for c, (label, tile) in enumerate(tiles):
            grid.paste(tile, (c * width, y + CAPTION_PX))
            draw.text(
                (c * width + 4, y + 3),
                label if label == "image" else f"{label} ({amount})",
                fill="black",
            )
    grid.save(path)
    return grid
