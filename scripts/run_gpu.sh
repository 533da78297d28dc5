#!/usr/bin/env bash
# One complete GPU run: GPU tests, then benchmarks. Results land in $OUT (the device tool's
# output folder) and are copied into benchmark/results/ afterwards.
#   bash scripts/run_gpu.sh [tests|bench|all]
set -o pipefail
OUT=${OUT:-/tmp/sglab-gpu}
mkdir -p "$OUT"
what=${1:-all}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
if [[ $what == tests || $what == all ]]; then
  python3 -m pytest -q -x -m gpu test 2>&1 | tee "$OUT/gpu_tests.log" | tail -n 40
fi
if [[ $what == bench || $what == all ]]; then
  python3 benchmark/gpu_bench.py all --out "$OUT" 2>&1 | tee "$OUT/gpu_bench.log" | tail -n 40
fi
