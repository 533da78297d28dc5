#!/usr/bin/env bash
# GPU run: tests, engine benchmarks, patch A/Bs. Results land in $OUT/r (packed into
# $OUT/r.tgz after every step) and are copied into benchmark/results/ afterwards.
#   bash scripts/run_gpu.sh STEP...   STEP: tests bench unified profile ab (= ab-0001 ab-0002
#   ab-0003a) ab-0002-noaudit ab-lora ab-8b, or all
# Each step has its own time limit, so one slow step never loses the others' results.
set -o pipefail
OUT=${OUT:-/tmp/sglab-gpu}
R=$OUT/r
mkdir -p "$R"
steps=("$@")
[[ ${#steps[@]} -eq 0 || ${steps[0]} == all ]] && \
  steps=(tests bench unified profile ab ab-lora ab-8b)
expanded=()
for st in "${steps[@]}"; do
  [[ $st == ab ]] && expanded+=(ab-0001 ab-0002 ab-0003a) || expanded+=("$st")
done
steps=("${expanded[@]}")
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee -a "$R/gpu.txt"
git rev-parse HEAD >> "$R/gpu.txt" 2>/dev/null

models=/tmp/sglab-ab-models
mk() { [[ -f $models/$1/config.json ]] || python3 scripts/make_dummy_model.py --preset "$1" \
  --out "$models/$1" > /dev/null; echo "$models/$1"; }
rnd() { echo "--dataset-name random-ids --random-range-ratio 1 --tokenizer $1 --disable-tqdm"; }

for step in "${steps[@]}"; do
  echo "=== $step $(date +%T)"
  case $step in
  tests)
    timeout 240 python3 -m pytest -q -m gpu --continue-on-collection-errors test 2>&1 | tee "$R/gpu_tests.log" | tail -n 15 ;;
  bench)
    timeout 360 python3 benchmark/gpu_bench.py all --out "$R" 2>&1 | tail -n 30 ;;
  unified)
    for p in qwen3-0.6b llama-3.1-8b; do
      timeout 150 python3 benchmark/bench_unified_extend.py --preset $p --out "$R/unified-$p" \
        2>&1 | tail -n 8
    done ;;
  profile)
    timeout 120 python3 benchmark/profile_step.py --preset qwen3-0.6b --batch-size 1 \
      --overlap > "$R/profile-qwen3-0.6b-bs1.txt" 2>&1
    grep '^==' "$R/profile-qwen3-0.6b-bs1.txt" ;;
  ab-0001)
    m=$(mk qwen3-0.6b)
    timeout 140 python3 -m sglab.bench_ab --patch 0001 --model-path $m --repeats 2 \
      --server-args "--load-format dummy --cuda-graph-max-bs 8" --out-dir "$R" --tag ab-0001 \
      -- $(rnd $m) --num-prompts 32 --random-input-len 128 --random-output-len 128 \
      --max-concurrency 4 2>&1 | tail -n 14 ;;
  ab-0002)  # deterministic mode: every prefill goes through _forward_extend_unified
    m=$(mk qwen3-0.6b)
    timeout 240 python3 -m sglab.bench_ab --patch 0002 --model-path $m --repeats 2 \
      --server-args "--load-format dummy --enable-deterministic-inference --cuda-graph-max-bs 32" \
      --out-dir "$R" --tag ab-0002 -- --dataset-name generated-shared-prefix \
      --gsp-num-groups 8 --gsp-prompts-per-group 16 --gsp-system-prompt-len 1024 \
      --gsp-question-len 128 --gsp-output-len 32 --tokenizer $m --disable-tqdm 2>&1 | tail -n 14 ;;
  ab-0002-noaudit)  # the same, no audited round: is output identity broken by the audit's schedule?
    m=$(mk qwen3-0.6b)
    timeout 240 python3 -m sglab.bench_ab --patch 0002 --model-path $m --repeats 2 --audit none \
      --server-args "--load-format dummy --enable-deterministic-inference --cuda-graph-max-bs 32" \
      --out-dir "$R" --tag ab-0002-noaudit -- --dataset-name generated-shared-prefix \
      --gsp-num-groups 8 --gsp-prompts-per-group 16 --gsp-system-prompt-len 1024 \
      --gsp-question-len 128 --gsp-output-len 32 --tokenizer $m --disable-tqdm 2>&1 | tail -n 16 ;;
  ab-0003a)
    m=$(mk qwen3-0.6b)
    timeout 220 python3 -m sglab.bench_ab --patch 0003a --model-path $m --repeats 3 \
      --server-args "--load-format dummy --cuda-graph-max-bs 64" --out-dir "$R" \
      --tag ab-0003a -- $(rnd $m) --num-prompts 64 --random-input-len 256 \
      --random-output-len 16 --return-logprob --logprob-start-len 0 2>&1 | tail -n 14 ;;
  ab-lora)
    m=$(mk qwen3-0.6b)
    lora=/tmp/sglab-ab-lora
    python3 -m sglab.test.lora_utils --model-path $m --out $lora --rank 16 > /dev/null
    for p in 0005 0005b; do
      timeout 210 python3 -m sglab.bench_ab --patch $p --model-path $m --repeats 2 \
        --server-args "--load-format dummy --lora-paths lora=$lora --max-loras-per-batch 1 \
        --cuda-graph-max-bs 16" --out-dir "$R" --tag ab-$p --request-rates 1 8 \
        -- $(rnd $m) --num-prompts 12 --random-input-len 256 --random-output-len 128 \
        --lora-name lora 2>&1 | tail -n 30
    done ;;
  ab-8b)
    m=$(mk llama-3.1-8b)
    timeout 240 python3 -m sglab.bench_ab --patch 0001 --model-path $m --repeats 2 \
      --server-args "--load-format dummy --cuda-graph-max-bs 8" --out-dir "$R" \
      --tag ab-0001-llama-3.1-8b -- $(rnd $m) --num-prompts 16 --random-input-len 128 \
      --random-output-len 128 --max-concurrency 2 2>&1 | tail -n 14 ;;
  *) echo "unknown step $step" ;;
  esac
  # A step stopped at its limit leaves its server behind, holding GPU memory.
  nvidia-smi --query-compute-apps=pid --format=csv,noheader | xargs -r kill -9 2>/dev/null
  tar czf "$OUT/r.tgz" -C "$OUT" r  # after every step: a later timeout loses nothing
done
rm -rf "$R"
