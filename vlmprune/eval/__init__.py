"""Evaluation: sweeps, fidelity, benchmarks, overlays, the embedded benchmark and models, lmms-eval.

Only the defaults live here, so that the `vlmprune` command can show them without importing torch."""

# Trained on the embedded benchmark and shipped in the package (trainer: `vlmprune.embedded`,
# docs/training.md): name -> folder under vlmprune/eval/assets, loaded like any checkpoint.
EMBEDDED_MODELS = {"shapes-llava": "tiny-llava", "shapes-qwen2-vl": "tiny-qwen2-vl"}
DEFAULT_MODEL = "shapes-llava"  # what `vlmprune sweep` and `vlmprune show` run with no --model
DEFAULT_METHODS = ("cls", "divprune", "random")
SHAPES_DEFAULT_LIMIT = 100  # test-split items of a sweep on the embedded benchmark, unless --limit
