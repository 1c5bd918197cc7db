"""How the embedded models are made: the trainer of `shapes-llava` and `shapes-qwen2-vl`.

`python -m vlmprune.embedded.train --out DIR [--family qwen2_vl]` trains one from scratch on the
embedded shapes benchmark (docs/training.md). `core` is what every family shares, `llava` and
`qwen2_vl` what differs, `train` the families by name, evaluation and the two-stage run. The
benchmark itself (`vlmprune.eval.shapes`) and the shipped checkpoints (`vlmprune/eval/assets/`)
are read from `vlmprune.eval`, which never imports this package.
"""
