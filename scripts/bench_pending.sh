#!/bin/bash
# The accelerator tables BENCHMARKS.md still lacks, in one run of under ten minutes on one H100 /
# H200, in priority order, each bench under its own time limit and all within $1 seconds (default
# 585). Results land in $OUT (default ./bench_out); the logs in $OUT/logs.tgz after every bench.
#
#     bash scripts/bench_pending.sh            # from the repository root, on a machine with a GPU
#
# decoder stages (issue 18), LLaVA-NeXT-7B (issue 21), the five newest vision methods' overhead
# (issue 20), Qwen2.5-VL `cls` with the Triton received-attention kernel (issue 17 follow-up).
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/bench_out}
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
total=${1:-585}
L=$(mktemp -d)/logs
mkdir -p "$L" "$OUT"
nvidia-smi > "$L/nvidia-smi.txt" 2>&1
t0=$(date +%s)
step() {
  local name=$1 limit=$2 left
  shift 2
  left=$((total - ($(date +%s) - t0) - 5))
  ((left < limit)) && limit=$left
  ((limit < 30)) && { echo "== $name skipped (time)"; return; }
  echo "== $name start $(($(date +%s) - t0)) s, limit $limit s"
  timeout "$limit" "$@" > "$L/$name.log" 2>&1
  echo "== $name rc=$? at $(($(date +%s) - t0)) s"
  tail -22 "$L/$name.log"
  tar -czf "$OUT/logs.tgz" -C "$(dirname "$L")" logs
}
step decoder 200 python scripts/bench_decoder.py --device cuda --batch 8 --out "$OUT/decoder_llava7b_b8.json"
step next 100 python scripts/bench_llava_next.py --device cuda --out "$OUT/llava_next_7b_shapes.json" --md "$OUT/llava_next.md"
step methods 150 python scripts/bench_methods.py --batch-sizes 8 --keep 64 \
  --methods cls,divprune,pool,zero_tprune,cdpruner,vflowopt,quota --repeats 20 --e2e --out "$OUT/methods_new_b8.json"
step qwen 600 python scripts/bench_qwen.py --device cuda --batch-sizes 8 --methods cls --inputs image \
  --repeats 5 --warmup 1 --out "$OUT/qwen25vl_cls_received.json"
