#!/usr/bin/env bash
# One prepared GPU check (run on a lent GPU machine; about 3 minutes): the CUDA tests of the metrics engines,
# issue 15's GPU goals (bench_metrics_cuda.py: 10^6 x K=1000 < 50 ms with CUDA events, no sync in update),
# the CPU-vs-GPU engine bench, and a short real run with AMP. Output: runs/gpu_check/summary.txt.
# Usage: OPENWORLD_DATA=../shared/data bench/gpu_check.sh
set -uo pipefail
cd "$(dirname "$0")/.."
out=runs/gpu_check
mkdir -p "$out"
{
  nvidia-smi --query-gpu=name,memory.total --format=csv,noheader 2>/dev/null || echo "no GPU visible"
  echo "## CUDA tests"
  python -m pytest -q -rs tests/test_metrics_engine.py tests/test_metrics_open_set.py tests/test_metrics_nonfinite.py \
      -k cuda 2>&1 | tail -5
  echo "## issue 15 GPU goals"
  python bench/bench_metrics_cuda.py
  echo "## bench_metrics on cuda (K = 1000, batch 4096)"
  python bench/bench_metrics.py --n 1000000 --classes 1000 --device cuda --repeats 3 --batches 4096 --topk-n 0 \
      --no-torchmetrics 2>&1 | tail -12
  echo "## quickstart with AMP on cuda"
  timeout 240 openworld run scenarios/quickstart.yaml --device cuda --set amp=true --out "$out" --no-progress 2>&1 | tail -8
} 2>&1 | tee "$out/summary.txt"
