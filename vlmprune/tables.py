"""README tables generated from the registries, so the docs cannot drift from the code.

`python -m vlmprune.tables` rewrites the blocks between the markers in README.md."""

from __future__ import annotations

import re
import sys
from pathlib import Path

from vlmprune.adapters.base import _ADAPTERS
from vlmprune.scorers import EncoderInfo, available_methods, build_scorer, scorer_class, scorer_options

# CLIP ViT-L/14-336 as LLaVA-1.5 uses it: the layers each method reads are shown for this encoder
CLIP_L = EncoderInfo(num_layers=24, feature_layer=22, has_cls=True, grid=(24, 24))

MARK = "<!-- {name}:start -->\n{body}<!-- {name}:end -->"


def _first_line(doc: str | None) -> str:
    return " ".join((doc or "").strip().split("\n\n")[0].split())


def signals_text(name: str) -> str:
    """The signals a method reads with its defaults on CLIP-L (0-based encoder layers)."""
    req = build_scorer(name).needs(CLIP_L)
    parts = (["features"] if req.features else []) + (["text_embeds"] if req.text_embeds else [])
    for field in ("cls_attn", "cls_value_attn", "received_attn", "keys", "value_norms", "vision_hidden",
                  "attn_graph", "text_attn", "transitions", "key_norms"):
        layers = getattr(req, field)
        if layers:
            span = f"{layers[0]}..{layers[-1]}" if len(layers) > 2 else ",".join(map(str, layers))
            where = " (LLM)" if field in ("text_attn", "transitions", "key_norms") else ""
            parts.append(f"{field}[{span}]{where}")
    return ", ".join(parts) or "—"


def methods_markdown() -> str:
    """One row per registered method: stage, paper, signals, options, what it does."""
    rows = ["| method | stage | paper | signals (CLIP-L) | options | rule |", "|---|---|---|---|---|---|"]
    for name in available_methods():
        cls = scorer_class(name)
        opts = ", ".join(f"`{k}={v!r}`" for k, v in scorer_options(name).items()) or "—"
        rows.append(
            f"| `{name}` | {cls.stage} | {cls.paper or '—'} | {signals_text(name)} | {opts} | {_first_line(cls.__doc__)} |"
        )
    return "\n".join(rows) + "\n"


def models_markdown() -> str:
    """One row per adapter: HF model types, classes, default position mode."""
    rows = ["| model_type | classes | positions (default) | notes |", "|---|---|---|---|"]
    for a in sorted(_ADAPTERS, key=lambda a: a.model_types):
        classes = ", ".join(f"`{c}`" for c in a.model_classes)
        types = ", ".join(f"`{t}`" for t in a.model_types)
        rows.append(f"| {types} | {classes} | {a.default_positions} | {_first_line(a.__doc__)} |")
    return "\n".join(rows) + "\n"


def support_text(name: str, adapter) -> dict[str, str]:
    """model_type -> how `name` runs on it: native, fallback (what), or unsupported."""
    out = {}
    for model_type, (info, have) in adapter.reference.items():
        try:
            req = build_scorer(name).needs(info)
        except ValueError:
            out[model_type] = "unsupported"
            continue
        used = [f for f in ("cls_attn", "cls_value_attn", "received_attn", "keys", "value_norms", "vision_hidden",
                            "attn_graph", "features", "text_embeds") if getattr(req, f)]
        if any(f not in have for f in used):
            out[model_type] = "unsupported"
            continue
        notes = [adapter.fallbacks[f] for f in used if f in adapter.fallbacks]
        out[model_type] = f"fallback: {', '.join(notes)}" if notes else "native"
    return out


def decoder_support(name: str, model_type: str) -> str:
    """How a decoder-stage method runs on a family: natively inside its HF decoder."""
    return "native (layers >= 3 on Qwen3-VL-8B: deepstack)" if model_type == "qwen3_vl" else "native"


def support_markdown() -> str:
    """One row per vision method, one column per model family: native / fallback (what) / unsupported."""
    adapters = sorted(_ADAPTERS, key=lambda a: a.model_types)
    types = [(t, a) for a in adapters for t in a.reference]
    rows = ["| method | " + " | ".join(f"`{t}`" for t, _ in types) + " |", "|---|" + "---|" * len(types)]
    for name in available_methods():
        if scorer_class(name).stage != "vision":  # decoder stages run on every family's HF decoder
            cells = [decoder_support(name, t) for t, _ in types]
            rows.append(f"| `{name}` | " + " | ".join(cells) + " |")
            continue
        cells = [support_text(name, a)[t] for t, a in types]
        rows.append(f"| `{name}` | " + " | ".join(cells) + " |")
    return "\n".join(rows) + "\n"


TABLES = {"methods": methods_markdown, "models": models_markdown, "support": support_markdown}


def render(text: str) -> str:
    """`text` with every marked table block replaced by its current content."""
    for name, fn in TABLES.items():
        pattern = re.compile(rf"<!-- {name}:start -->\n.*?<!-- {name}:end -->", re.S)
        text = pattern.sub(lambda _: MARK.format(name=name, body=fn()), text)
    return text


if __name__ == "__main__":
    path = Path(sys.argv[1] if len(sys.argv) > 1 else "README.md")
    path.write_text(render(path.read_text()))
    print(f"updated tables in {path}")
