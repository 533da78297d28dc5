#!/usr/bin/env bash
# One complete GPU run: GPU tests, engine benchmarks, then patch A/Bs. Results land in $OUT
# (the device tool's output folder) and are copied into benchmark/results/ afterwards.
#   bash scripts/run_gpu.sh [tests|bench|ab|all]
set -o pipefail
OUT=${OUT:-/tmp/sglab-gpu}
mkdir -p "$OUT"
what=${1:-all}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
if [[ $what == tests || $what == all ]]; then
  python3 -m pytest -q -m gpu test 2>&1 | tee "$OUT/gpu_tests.log" | tail -n 30
fi
if [[ $what == bench || $what == all ]]; then
  python3 benchmark/gpu_bench.py all --out "$OUT" 2>&1 | tee "$OUT/gpu_bench.log" | tail -n 30
fi
if [[ $what == ab || $what == all ]]; then
  model=/tmp/sglab-ab-qwen3-0.6b
  python3 scripts/make_dummy_model.py --preset qwen3-0.6b --out $model
  common="--load-format dummy"
  bench="--dataset-name random-ids --random-range-ratio 1 --tokenizer $model --disable-tqdm"
  python3 -m sglab.bench_ab --patch 0001 --model-path $model --server-args "$common" \
    --repeats 2 --out-dir "$OUT" --tag ab-0001 -- $bench --num-prompts 64 \
    --random-input-len 128 --random-output-len 128 --max-concurrency 4 2>&1 | tail -n 14
  python3 -m sglab.bench_ab --patch 0002 --model-path $model \
    --server-args "$common --enable-deterministic-inference" --repeats 2 --out-dir "$OUT" \
    --tag ab-0002 -- --dataset-name generated-shared-prefix --gsp-num-groups 8 \
    --gsp-prompts-per-group 16 --gsp-system-prompt-len 1024 --gsp-question-len 64 \
    --gsp-output-len 16 --tokenizer $model --disable-tqdm 2>&1 | tail -n 14
  python3 -m sglab.bench_ab --patch 0003a --model-path $model --server-args "$common" \
    --repeats 2 --out-dir "$OUT" --tag ab-0003a -- $bench --num-prompts 64 \
    --random-input-len 256 --random-output-len 16 --return-logprob --logprob-start-len 0 \
    2>&1 | tail -n 14
  lora=/tmp/sglab-ab-lora
  python3 -m sglab.test.lora_utils --model-path $model --out $lora --rank 16
  for p in 0005 0005b; do for rate in 1 8; do
    python3 -m sglab.bench_ab --patch $p --model-path $model \
      --server-args "$common --lora-paths lora=$lora --max-loras-per-batch 1" --repeats 2 \
      --out-dir "$OUT" --tag ab-$p-rate$rate -- $bench --num-prompts 96 \
      --random-input-len 256 --random-output-len 128 --request-rate $rate --lora-name lora \
      2>&1 | tail -n 14
  done; done
fi
