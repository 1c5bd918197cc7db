"""LLaVA-NeXT (1.6) family (`model_type == "llava_next"`): any-resolution images. Each image is
encoded as several views by the CLIP/SigLIP tower: a base view (the whole image at the tower's
size) and the crops of its best-fit resolution; HF packs an image's tokens as the base view's
patches, then the crops' patches laid out as one grid, unpadded to the image's aspect ratio, with
an `image_newline` token after every row of that grid (one after the base view alone when there
are no crops). LLaVA-OneVision (`llava_onevision.py`) packs the same way.

- Visual tokens: an image's base-view and crop tokens after unpadding, in the order the decoder
  sees them; `keep` / `prune_ratio` count them per image over all its views. The `image_newline`
  tokens are structure (`Encoded.structure`): never scored or counted, always kept, placed among
  the kept tokens where HF puts them. `last_selection` numbers an image's visual tokens without
  its newlines.
- Signals per view: every view is its own encoder image with its own CLS row (no CLS: the mean
  received attention), computed by the taps of `vit.py`; a view-level signal is packed onto the
  image's tokens by HF's own `pack_image_features` (the model's unpadding and, on OneVision, its
  bilinear downscale of large crop grids), so every token gets the signal of the patch it came
  from. Per-token encoder signals (`keys`, `value_norms`, `vision_hidden`) keep the base view's CLS
  entry at 0. No `attn_graph` (tokens of different views never attend to each other).
- Comparable views (`vlmprune.patch(..., view_scores=...)`): `"normalised"` (default) divides each
  view's attention row by its sum over the view's patches, so that every view's scores are a
  distribution over its own patches whatever mass its CLS row puts on itself; `"raw"` keeps the
  softmax values as each view computes them.
- Grids (`Signals.grids`): an image with crops has no single raster grid (base view and crop
  layout differ in size), so its grid is (1, N), the decoder order: `uniform` spreads its picks
  evenly over base view and crops in proportion to their tokens, `pool` averages runs of
  consecutive tokens, `hiprune`'s buffers are the left/right neighbours. An image with only the
  base view has the tower's grid (h, w).
- Positions: as LLaVA-1.5 (1-D RoPE, `compact` by default, `original` keeps the unpruned ids)."""

from __future__ import annotations

import contextlib
import sys
import weakref
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import torch

from vlmprune.adapters.base import (
    Encoded,
    Prompt,
    register_adapter,
    stack_padded,
    structure_merged,
)
from vlmprune.adapters.llava import LlavaAdapter, signal_tables, vit_layers
from vlmprune.adapters.vit import SignalHooks
from vlmprune.kernels.select import to_device
from vlmprune.scorers.base import EncoderInfo

ROWS = (
    "cls_attn",
    "cls_value_attn",
    "received_attn",
)  # per-patch attention rows (CLS already left out)
TOKENS = (
    "keys",
    "value_norms",
    "vision_hidden",
)  # per encoder token, CLS (if any) at 0
PROVIDES = frozenset({"features", "text_embeds", *ROWS, *TOKENS})


@dataclass
class Item:
    """One image's (or video's) placeholder run as HF packs it: how many encoder images (views or
    frames) it takes, which places of the run are `image_newline` tokens, its visual-token grid."""

    views: int
    newline: np.ndarray  # bool [run]
    grid: tuple[int, int]

    @property
    def visual(self) -> np.ndarray:
        return np.flatnonzero(~self.newline)


@dataclass
class AnyresEncoded(Encoded):
    """`Encoded` with each item's `Item` (its newline places)."""

    items: list[Item] | None = None


@register_adapter
class LlavaNextAdapter(LlavaAdapter):
    """Vision-stage pruning for `LlavaNextForConditionalGeneration` (any-resolution images)."""

    model_types = ("llava_next",)
    model_classes = ("LlavaNextForConditionalGeneration",)
    reference: ClassVar[dict[str, tuple[EncoderInfo, frozenset[str]]]] = {
        "llava_next": (
            EncoderInfo(num_layers=24, feature_layer=22, has_cls=True, grid=None),
            PROVIDES,
        )
    }
    options = ("view_scores",)

    def __init__(self, model, config):
        super().__init__(model, config)
        self.view_scores = config.extra.get(
            "view_scores", "normalised"
        )  # see the module's docstring
        self._recorded: dict[
            tuple[int, int], tuple[weakref.ref, torch.Tensor, Item]
        ] = {}  # see `packed_row`
        self._keys: list[
            tuple[int, int]
        ] = []  # the items of the encoder call being recorded
        self._newlines: list[np.ndarray] | None = (
            None  # this prefill's newline places per item, for `decoder_run`
        )

    def encoder_info(self) -> EncoderInfo:
        info = super().encoder_info()
        return EncoderInfo(
            info.num_layers, info.feature_layer, info.has_cls, grid=None
        )  # each image its own

    def provides(self) -> set[str]:
        return set(PROVIDES) - (
            set() if self.info.has_cls else {"cls_attn", "cls_value_attn"}
        )

    # --- layout of the placeholder runs ----------------------------------------------------------
    def pack(
        self,
        views: list[torch.Tensor],
        inputs: dict[str, Any],
        newline: torch.Tensor | None,
    ) -> list[torch.Tensor]:
        """HF's own packing of per-view tensors [views, P, C] into each image's [run, C] rows."""
        return list(
            self.model.model.pack_image_features(
                views,
                inputs["image_sizes"],
                image_newline=newline,
                **self.pack_options(inputs),
            )[0]
        )

    def pack_options(self, inputs: dict[str, Any]) -> dict[str, Any]:
        """The family's own arguments of HF's `pack_image_features`."""
        return {"vision_feature_select_strategy": self.strategy(inputs)}

    def strategy(self, inputs: dict[str, Any]) -> str:
        return (
            inputs.get("vision_feature_select_strategy")
            or self.model.config.vision_feature_select_strategy
        )

    def view_counts(self, inputs: dict[str, Any]) -> list[int]:
        """Encoder images (base view + crops) of each image, as HF's `get_image_features` counts them."""
        hf = sys.modules[type(self.model.model).__module__]
        cfg = self.model.config
        return [
            hf.image_size_to_num_patches(
                size, cfg.image_grid_pinpoints, cfg.vision_config.image_size
            )
            for size in inputs["image_sizes"].tolist()
        ]

    def patches(self) -> tuple[int, int]:
        side = (
            self.model.config.vision_config.image_size
            // self.model.config.vision_config.patch_size
        )
        return side, side

    def image_items(self, inputs: dict[str, Any]) -> list[Item]:
        """Each image's `Item`, from its size (on the host, before the encoder runs): HF's packing of
        zeros with a newline of ones marks the newline places."""
        if inputs.get("image_sizes") is None:
            raise ValueError(
                "vlmprune: LLaVA-NeXT images need image_sizes (one (height, width) per image) to find "
                "their newline tokens; pass the processor's image_sizes, or the pixels with them"
            )
        h, w = self.patches()
        counts = self.view_counts(inputs)
        host = {**inputs, "image_sizes": inputs["image_sizes"].cpu()}
        packed = self.pack(
            [torch.zeros(v, h * w, 1) for v in counts], host, torch.ones(1)
        )
        items = []
        for v, rows in zip(counts, packed):
            newline = rows[:, 0].numpy() > 0.5
            n = int((~newline).sum())
            items.append(Item(v, newline, (h, w) if n == h * w else (1, n)))
        return items

    def token_layout(self, inputs: dict[str, Any]) -> list[torch.Tensor]:
        """Per image, [N, 3] for its visual tokens (`last_selection`'s numbering): (0, row, column) of
        the base-view patch centre, or (1, row, column) of the centre on the crop canvas (the crops
        side by side, before unpadding), in patches, packed by HF as the tokens are (unpadding,
        OneVision's bilinear downscale: the point the cell samples); for `vlmprune show`."""
        hf = sys.modules[type(self.model.model).__module__]
        h, w = self.patches()
        side = self.model.config.vision_config.image_size
        host = {**inputs, "image_sizes": inputs["image_sizes"].cpu()}
        rows = torch.arange(h).repeat_interleave(w) + 0.5
        cols = torch.arange(w).repeat(h) + 0.5
        views = []
        for size, v in zip(host["image_sizes"].tolist(), self.view_counts(host)):
            across = hf.get_anyres_image_grid_shape(
                size, self.model.config.image_grid_pinpoints, side
            )[1]
            crop = torch.arange(v)[:, None] - 1  # -1: the base view
            views.append(
                torch.stack(
                    [
                        (crop >= 0).float().expand(-1, h * w),
                        rows + h * (crop.clamp(min=0) // across),
                        cols + w * (crop.clamp(min=0) % across),
                    ],
                    -1,
                )
            )
        return self.pack(views, host, None)

    # --- signals ------------------------------------------------------------------------------
    @contextlib.contextmanager
    def collecting(self, inputs: dict[str, Any]):
        off = self.cls_offset(inputs)
        items = self.encoder_items(inputs)  # on the host, before the encoder runs
        if self._hooks is None:
            self._hooks = SignalHooks(vit_layers(self.vision_tower), self.request)
        with self._hooks.capture(skip=off) as got:
            yield lambda out: self.item_tables(signal_tables(got), items, inputs, out)

    def encoder_items(self, inputs: dict[str, Any]) -> list[Item]:
        """The items of one encoder call (NeXT: its images)."""
        return self.image_items(inputs)

    def pack_signal(
        self, x: torch.Tensor, items: list[Item], inputs: dict[str, Any]
    ) -> list[torch.Tensor]:
        """Per-view signal rows [views, P, C] -> each item's [N_i, C] over its visual tokens."""
        packed = self.pack(list(x.split([it.views for it in items])), inputs, None)
        return packed

    def item_tables(
        self,
        tables: dict[str, dict[int, torch.Tensor]],
        items: list[Item],
        inputs: dict[str, Any],
        out: Any,
    ) -> dict[str, dict[int, torch.Tensor]]:
        """The encoder call's per-view signals packed per item ([items, N, ...], zero-padded); each
        item's visual rows are remembered under its packed features (`record` keys on them)."""
        self._keys = []  # for `record`, which the base calls next with this output's items
        for j, it in enumerate(items):
            anchor, f = packed_row(out.pooler_output, j)
            self._keys.append((id(anchor), j))
            self._recorded[self._keys[-1]] = (
                weakref.ref(anchor),
                visual_rows(f, it),
                it,
            )
        parts: list[tuple[str, int, torch.Tensor]] = []
        p = self.patch_count()
        for name, table in tables.items():
            for layer, t in table.items():
                t = t.float()
                if name in ROWS and self.view_scores == "normalised":
                    t = t / t.sum(-1, keepdim=True).clamp_min(torch.finfo(t.dtype).tiny)
                t = t[:, t.shape[1] - p :]  # per patch (TOKENS: CLS left out)
                parts.append((name, layer, t if t.ndim == 3 else t[..., None]))
        packed_tables: dict[str, dict[int, torch.Tensor]] = {
            name: {} for name in tables
        }
        if not parts:
            return packed_tables
        packed = self.pack_signal(
            torch.cat([t for _, _, t in parts], -1), items, inputs
        )
        bounds = np.cumsum([0] + [t.shape[-1] for _, _, t in parts])
        first_view = torch.as_tensor(np.cumsum([0] + [it.views for it in items])[:-1])
        for (name, layer, t), a, b in zip(parts, bounds[:-1], bounds[1:]):
            rows = [q[:, a:b] for q in packed]
            full = tables[name][layer]
            if (
                full.shape[1] > p
            ):  # TOKENS with a CLS: the item's first view's CLS entry at 0
                cls = full.float()[first_view, :1].reshape(len(items), 1, -1)
                rows = [torch.cat([c, r]) for c, r in zip(cls, rows)]
            table = stack_padded(rows)
            packed_tables[name][layer] = table[..., 0] if full.ndim == 2 else table
        return packed_tables

    def patch_count(self) -> int:
        h, w = self.patches()
        return h * w

    def record(
        self,
        feats: list[torch.Tensor],
        tables: dict[str, dict[int, torch.Tensor]],
        grids: list[tuple[int, int]] | None = None,
    ) -> None:
        """As the base, keyed on each item's visual rows (what the scorer sees), with its grid."""
        self._recorded = {k: v for k, v in self._recorded.items() if v[0]() is not None}
        got = [self._recorded[key] for key in self._keys]
        super().record([g[1] for g in got], tables, [g[2].grid for g in got])

    # --- prefill ------------------------------------------------------------------------------
    def recorded(self, pooler: Any, items_of) -> list[tuple[torch.Tensor, Item]]:
        """(visual rows, `Item`) of each item of an encoder output: those recorded when it was
        encoded, else made from `items_of()` (features encoded before the model was patched)."""
        n = len(pooler)
        got = []
        for j in range(n):
            anchor, _ = packed_row(pooler, j)
            ref, rows, item = self._recorded.get((id(anchor), j), (None, None, None))
            got.append((rows, item) if ref is not None and ref() is anchor else None)
        if None in got:
            items = items_of()
            got = [
                g or (visual_rows(packed_row(pooler, j)[1], items[j]), items[j])
                for j, g in enumerate(got)
            ]
        return got

    def encode(self, inputs: dict[str, Any], prompt: Prompt) -> Encoded:
        """The images encoded (or taken from `mm_encoder_outputs`), their newlines split off."""
        out = self.encode_images(inputs)
        pairs = self.recorded(out.pooler_output, lambda: self.image_items(inputs))
        return self.encoded(
            [("image", j) for j in range(len(pairs))], {"image": pairs}, {"image": out}
        )

    def encoded(
        self,
        order: list[tuple[str, int]],
        pairs: dict[str, list],
        outputs: dict[str, Any],
    ) -> AnyresEncoded:
        """`Encoded` of the items in prompt `order` ((kind, index) pairs) from their (visual rows, `Item`)."""
        items = [pairs[kind][j][1] for kind, j in order]
        self._newlines = [it.newline for it in items]
        return AnyresEncoded(
            feats=[pairs[kind][j][0] for kind, j in order],
            grids=[it.grid for it in items],
            outputs=outputs,
            kinds=[kind for kind, _ in order],
            index=[j for _, j in order],
            structure=[int(it.newline.sum()) for it in items],
            items=items,
        )

    def pruned_inputs(self, inputs, layout, idx, visual, kept, enc):
        """The kept visual rows merged with every newline row, in run order, then as the base."""
        items = enc.items
        extra = [int(it.newline.sum()) for it in items]
        if not any(extra):
            return super().pruned_inputs(inputs, layout, idx, visual, kept, enc)
        places, order = structure_merged(
            idx,
            [it.visual for it in items],
            [np.flatnonzero(it.newline) for it in items],
        )
        width = max(k + e for k, e in zip(kept, extra))
        places, order = places[:, :width], order[:, :width]
        newline = self.model.model.image_newline.to(visual.device, visual.dtype)
        rows = torch.cat([visual, newline.expand(len(items), max(extra), -1)], 1)
        rows = rows.gather(1, order[..., None].expand(-1, -1, rows.shape[-1]))
        run_kept = [k + e for k, e in zip(kept, extra)]
        if (
            self.decoder is not None
        ):  # the decoder stages' places skip the newlines: which ranks they hold
            is_line = (order >= idx.shape[1]).cpu().numpy()
            self._newlines = [is_line[i, :c] for i, c in enumerate(run_kept)]
        return super().pruned_inputs(inputs, layout, places, rows, run_kept, enc)

    def decoder_run(self, places, per_image, rows, mask, valid):
        """As the base, over the visual tokens' places only (the newlines are never scored), the
        newlines' places marked as structure (never instruction text for `query="text"`)."""
        lines = None
        if self.decoder is not None and self._newlines:
            is_line = np.concatenate(self._newlines)
            places, lines = places[~is_line], places[is_line]
        run = super().decoder_run(places, per_image, rows, mask, valid)
        if run is not None:
            run.structure = lines
        return run


def packed_row(pooler: Any, j: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(anchor, rows) of item j of an encoder output's `pooler_output`: a list of per-image tensors
    (images: the anchor is the item's own tensor) or one [items, run, D] tensor (OneVision videos:
    the anchor is that tensor, whose rows `list()` makes anew each time)."""
    if isinstance(pooler, torch.Tensor):
        return pooler, pooler[j]
    return pooler[j], pooler[j]


def visual_rows(packed: torch.Tensor, item: Item) -> torch.Tensor:
    """An item's packed rows without its newline rows."""
    return packed.index_select(0, to_device(item.visual, packed.device))
