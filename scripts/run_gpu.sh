#!/usr/bin/env bash
# GPU run: tests, determinism checks, engine benchmarks, patch A/Bs. Results land in $OUT/r
# (packed into $OUT/r.tgz after every step) and are copied into benchmark/results/ afterwards.
#   SGLAB_COMMIT=<sha of the tree that runs> bash scripts/run_gpu.sh STEP...
# The commit comes from the host side: the GPU machine's copy of the git metadata is stale.
# Steps (each with its own time limit, so one slow step never loses the others' results):
#   ab-0002-cold  deterministic 0002 A/B whose first server is the first on the machine (empty
#                 Triton cache), outputs and schedule traces saved
#   det-served    sglab.test.test_deterministic modes against a server, per 0002 index build
#   tests-det     GPU tests of deterministic mode, patch 0001's uploads, the patch audits,
#                 penalties and a failing request under CUDA graphs
#   tests-sched   the GPU schedule-invariance tests only
#   tests         every GPU test
#   tests-tp      tensor parallelism on 2+ GPUs (NCCL, eager and CUDA graphs) vs tp=1
#   tests-dp      DP attention on 2 GPUs (tp 2 / dp 2, NCCL, eager and graphs) vs tp=1
#   tests-prefill-graph  prefill CUDA graphs on one GPU: on == off
#   bench-tp      llama-3.1-8b served at tp 1 and tp 2 (bench_serving, same workload)
#   ab-0003c      patch 0003c off / on: tp 2 / dp 2 DP attention with prefill graphs, many
#                 small prompts (TTFT, throughput), 6 rounds (2 GPUs)
#   ab-prefill-graph  one GPU, --enable-prefill-cuda-graph off / on: TTFT of small prefills
#   h2d           patch 0001: host cost, host blocking and memcpy kinds per upload mode
#   ab-0001       patch 0001 off / PR / packed, 0.6B and 8B shapes, concurrency 1, 4, 32
#   ab-0001-c32   the same at concurrency 32 only
#   ab-0003a ab-0005 ab-0005b   the other patch A/Bs
#   bench unified profile       engine benchmarks (gpu_bench, 0002 per call, one step profile)
#   hostloop      the decode hot loop: ITL vs graph replay, host per component, saturation
#   qwen35        Qwen3.5 hybrid: GPU tests (fla / Triton GDN kernels, parity, the 9b shape with
#                 graphs and overlap, 0003b under set_sync_debug_mode), gpu_bench of qwen3.5-9b
#                 (ITL bs 1/8/64, throughput at 64, weight+state roofline, HF peer), and the
#                 0003b A/B: requests arriving and finishing every step, and long decodes
#                 crossing the track interval (extra_buffer); its parts run alone as
#                 qwen35-tests qwen35-bench ab-0003b-churn ab-0003b-long
#   hisparse      all of: tests-hisparse ab-0004 ab-0004-control hisparse-bench
#   tests-hisparse  HiSparse / patch 0004 GPU tests (stream order, UVA kernel, graphs)
#   ab-0004       patch 0004 off / PR / async_finish, llama-3.1-8b, 16 x 8192 in / 512 out,
#                 concurrency 4, overlap on;  ab-0004-control: off / PR with overlap off
#                 (AB_BUDGET: seconds of launch and rounds, default 470; AB_ROUNDS: rounds per
#                 variant, the first a warm-up, default 7; AB_VARIANTS: the variants)
#   hisparse-bench  capacity at 32k (dense vs HiSparse) and decode step time at 8k/32k/64k;
#                 its parts: hisparse-capacity hisparse-step; hisparse-step-8k (bs 1 / 4 only),
#                 hisparse-step-bs8 (bs 8 only), hisparse-profile (kernels of a decode step at
#                 8k, bs 4)
#   kernels       --kernel-fusion: GPU tests of the fused kernels, then kernel_bench (off vs on
#                 vs on without the small-M GEMM: decode graph time and kernels per replay at
#                 bs 1/8/64, small-M GEMM vs F.linear per decoder shape, 8k prefill MFU,
#                 long-context decode attention bandwidth)
#   kernels-splitk  the split-K GEMM: GPU tests, layouts at 1-64 rows vs cuBLASLt / cuBLAS and
#                 the table they imply, decode replays with it vs without (KS_TABLE: a table)
#   kernels-fold  split-K GPU tests; decode replays with the norms / SiLU folded into the
#                 split-K GEMM against without and without split-K
#   kernels-final split-K / fusion GPU tests, decode replays with and without split-K, and
#                 gpu_bench fusion off / on
#   kernels-attn-tune  the fused decode attention's warps / tile / stages at bs 64
#   kernels-tma   split-K TMA / 8-warp layouts at 1 and 64 rows of the 8B shape: GPU tests,
#                 the sweep and the refined table, 8B decode replays with the built-in table
#                 and with the refined one
#   kernels-tma-final  split-K / attention / norm / fusion GPU tests, 8B and 0.6B decode
#                 replays with the shipped defaults
#   kernels-attn-wide  the fused decode attention over a wider warps / tile / stages / splits
#                 grid at bs 64, 8B replays and GPU tests with the fastest one-split tile
#   tests-attn    the decode attention and kernel-fusion GPU tests
#   kernels-sweep the kernels alone: their GPU tests, the GEMM table, the small-M GEMM layouts
#                 at M = 1 / 4, and the decode attention sweep (splits, tile, stages, warps);
#                 kernels-decode: kernel_bench all (KB_VARIANTS="off on ..." picks variants)
#   kernels-quick GPU tests of PDL / small-M GEMM / attention, 0.6B decode off / on / on-m1 and
#                 both with PDL, 8B decode on / on-pdl, the attention sweep: one device call
#   kernels-splits  decode attention split bounds by batch size: GPU tests, 0.6B / 8B decode
#                 per bound, the graph-timed attention sweep (both head shapes): one call
#   kernels-final   small-M GEMM / PDL GPU tests, 0.6B decode (defaults, cuBLAS, PDL), the
#                 prefill attention sweep (8k causal, tiles / warps / stages): one call
#   kernels-prefill  extend-attention GPU tests, llama-3.1-8b decode and 8k prefill (`on`)
#   kernels-rope  decode attention with the q/k norm + RoPE and K/V write taken in, and the
#                 one-launch greedy argmax: GPU tests (with the unfenced variant caught),
#                 0.6B / 8B decode with and without the fused RoPE: one call
#   kernels-engine  the fused-RoPE GPU tests (the unfenced variant caught), then gpu_bench
#                 with --kernel-fusion off and on (the engine table): one call
#   kernels-replays  0.6B / 8B decode replays with and without the fused RoPE, one replay,
#                 back to back and the kernels' sum: one call
#   kernels-blas  fusion on's cuBLASLt preference vs cuBLAS: GPU tests, 0.6B / 8B decode and
#                 the 8k prefill: one call
#   structured    decode ITL with a simple JSON schema vs unconstrained, qwen3-0.6b dummy,
#                 concurrency 8, 6 ABBA rounds (target: within 10%), and the structured-output
#                 GPU tests
set -o pipefail
# Every multi-GPU process: no NVLink multicast (NVLS) in NCCL, torch symmetric memory, NVSHMEM.
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
OUT=${OUT:-/tmp/sglab-gpu}
R=$OUT/r
mkdir -p "$R"
export SGLAB_COMMIT=${SGLAB_COMMIT:-unknown}
# Autotuning results persist in the Triton cache, so each server of an A/B (and every later
# launch) reuses the first one's choices instead of tuning again (fla's GDN kernels autotune).
export TRITON_CACHE_AUTOTUNING=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee -a "$R/gpu.txt"
echo "commit $SGLAB_COMMIT" | tee -a "$R/gpu.txt"

models=/tmp/sglab-ab-models
mk() { [[ -f $models/$1/config.json ]] || python3 scripts/make_dummy_model.py --preset "$1" \
  --out "$models/$1" > /dev/null; echo "$models/$1"; }
rnd() { echo "--dataset-name random-ids --random-range-ratio 1 --tokenizer $1 --disable-tqdm"; }
AB="python3 -m sglab.bench_ab --out-dir $R --save-outputs"
DET="--load-format dummy --enable-deterministic-inference --cuda-graph-max-bs 32"
GSP="--dataset-name generated-shared-prefix --gsp-num-groups 8 --gsp-prompts-per-group 16 \
  --gsp-system-prompt-len 1024 --gsp-question-len 128 --gsp-output-len 32 --disable-tqdm"

HS="--enable-hisparse --disable-radix-cache \
  --hisparse-config '{\"top_k\":2048,\"device_buffer_size\":4096}'"
ab_0004() {  # $1: tag, $2: extra server args, $3: variants
  local m; m=$(mk llama-3.1-8b)
  # The 8B shape at 8k context: --time-budget keeps the rounds that fit one device call (in
  # ABBA order) and reports how many of the planned ones ran.
  timeout $((${AB_BUDGET:-470} + 40)) $AB --patch 0004 --model-path $m --variants $3 \
    --rounds ${AB_ROUNDS:-7} --time-budget ${AB_BUDGET:-470} --audit first --server-args "--load-format dummy $HS $2" \
    --tag $1 --max-concurrencies 4 -- $(rnd $m) --num-prompts 16 --random-input-len 8192 \
    --random-output-len 512 2>&1 | tail -n 40
}
ab_0003b() {  # $1: ab-0003b-churn (arrive and finish every step) or ab-0003b-long
  # Three launches of the 9b shape and 21 rounds take minutes: one step per device call.
  local m q; m=$(mk qwen3.5-9b)
  q="--load-format dummy --mamba-scheduler-strategy extra_buffer --cuda-graph-max-bs 64"
  if [[ $1 == ab-0003b-churn ]]; then
    timeout 560 $AB --patch 0003b --model-path $m --variants off on on:host --audit first \
      --server-args "$q" --tag $1 --request-rates 32 -- $(rnd $m) \
      --num-prompts 192 --random-input-len 128 --random-output-len 16 2>&1 | tail -n 30
  else
    timeout 560 $AB --patch 0003b --model-path $m --variants off on on:host --audit first \
      --server-args "$q --mamba-track-interval 64" --tag $1 --max-concurrencies 16 \
      -- $(rnd $m) --num-prompts 32 --random-input-len 256 --random-output-len 512 2>&1 \
      | tail -n 30
  fi
}
serve_bench() {  # $1: tag, $2: model, $3: server args, rest: bench_serving args
  local tag=$1 m=$2 sargs=$3 port=31877; shift 3
  python3 -m sglab.launch_server --model-path $m --port $port $sargs > "$R/$tag.server.log" 2>&1 &
  local pid=$!
  for _ in $(seq 600); do
    curl -sf localhost:$port/health_generate > /dev/null && break; sleep 1
  done
  timeout 400 python3 -m sglab.bench_serving --backend sglab --port $port \
    --output-file "$R/$tag.jsonl" "$@" 2>&1 | tail -n 30
  kill $pid; wait $pid 2>/dev/null
}
SMALL="--num-prompts 256 --random-input-len 64 --random-output-len 8 --request-rate 64"
multi_gpu_steps() {
  case $1 in
  tests-dp)
    timeout 420 python3 -m pytest -q -m gpu test/srt/test_dp_attention.py 2>&1 \
      | tee "$R/gpu_tests_dp.log" | tail -n 8 ;;
  bench-tp)
    m=$(mk llama-3.1-8b)
    for tp in 1 2; do
      serve_bench bench-tp$tp $m "--load-format dummy --tp $tp" $(rnd $m) \
        --num-prompts 64 --random-input-len 512 --random-output-len 128 --max-concurrency 16
    done ;;
  ab-0003c)
    m=$(mk qwen3-0.6b)
    timeout 900 $AB --patch 0003c --model-path $m --audit first --tag ab-0003c --server-args \
      "--load-format dummy --tp 2 --dp 2 --enable-dp-attention --enable-prefill-cuda-graph" \
      -- $(rnd $m) $SMALL 2>&1 | tail -n 30 ;;
  esac
}
hisparse_steps() {
  local hb="python3 benchmark/hisparse_bench.py"
  case $1 in
  tests-hisparse)
    timeout 300 python3 -m pytest -q -m gpu test/srt/test_hisparse.py \
      test/srt/test_hisparse_streams.py test/kernels/test_kvcacheio.py test/unit/test_quest.py \
      test/unit/test_hisparse_swap_in.py 2>&1 | tee "$R/gpu_tests_hisparse.log" | tail -n 15 ;;
  ab-0004) ab_0004 ab-0004 "" "${AB_VARIANTS:-off on:pr on:async_finish}" ;;
  ab-0004-control) ab_0004 ab-0004-no-overlap "--disable-overlap-schedule" \
    "${AB_VARIANTS:-off on:pr}" ;;
  hisparse-step-8k)
    timeout 200 $hb step --out "$R/step-8k" --contexts 8192 --batch-sizes 1 4 2>&1 | tail -n 8 ;;
  hisparse-profile)
    timeout 200 $hb profile --out "$R" --contexts 8192 --batch-sizes 4 2>&1 | tail -n 60 ;;
  hisparse-capacity)
    timeout 250 $hb capacity --out "$R" 2>&1 | tail -n 8 ;;
  hisparse-step)
    timeout 500 $hb step --out "$R" 2>&1 | tail -n 12 ;;
  hisparse-step-64k-bs8)
    timeout 170 $hb step --out "$R/step-64k-bs8" --contexts 65536 --batch-sizes 8 \
      --modes hisparse 2>&1 | tail -n 4 ;;
  hisparse-profile-32k-bs8)
    timeout 150 $hb profile --out "$R/profile-32k-bs8" --contexts 32768 --batch-sizes 8 2>&1 \
      | tail -n 100 ;;
  hisparse-step-bs8)
    timeout 330 $hb step --out "$R/step-bs8" --batch-sizes 8 2>&1 | tail -n 12 ;;
  hisparse-bench)
    hisparse_steps hisparse-capacity; hisparse_steps hisparse-step ;;
  esac
}

for step in "$@"; do
  echo "=== $step $(date +%T)"
  case $step in
  ab-0002-cold)
    m=$(mk qwen3-0.6b)
    export TRITON_CACHE_DIR=$(mktemp -d)  # nothing compiled yet, as on a fresh machine
    SGLAB_SCHEDULE_TRACE=$R/trace-0002 timeout 420 \
      $AB --patch 0002 --model-path $m --audit none --server-args "$DET" --tag ab-0002 \
      -- $GSP --tokenizer $m 2>&1 | tail -n 30
    unset TRITON_CACHE_DIR ;;
  det-served)
    m=$(mk qwen3-0.6b)
    timeout 420 python3 benchmark/deterministic_served.py --model-path $m --out "$R" \
      --n-trials 12 --max-new-tokens 48 2>&1 | tail -n 8 ;;  # long prompt: trial 11 on
  tests-det)
    timeout 420 python3 -m pytest -q -m gpu test/srt/test_deterministic.py test/unit/test_h2d.py \
      test/srt/test_patches.py test/srt/test_triton_backend.py test/srt/test_penalties.py \
      test/srt/test_scheduler_failures.py 2>&1 | tee "$R/gpu_tests_det.log" | tail -n 15 ;;
  tests-sched)
    timeout 240 python3 -m pytest -q -m gpu test/srt/test_deterministic.py -k schedule_invariance \
      2>&1 | tee "$R/gpu_tests_sched.log" | tail -n 5 ;;
  tests)
    timeout 540 python3 -m pytest -q -m gpu --continue-on-collection-errors test 2>&1 \
      | tee "$R/gpu_tests.log" | tail -n 15 ;;
  tests-tp)
    timeout 300 python3 -m pytest -q -m gpu test/srt/test_tensor_parallel.py 2>&1 \
      | tee "$R/gpu_tests_tp.log" | tail -n 8 ;;
  h2d)
    timeout 300 python3 benchmark/h2d_0001.py --out "$R" 2>&1 | tail -n 24 ;;
  ab-0001|ab-0001-c32)
    # at concurrency 32 the 32 requests are all in flight: 64 prompts keep the batch full
    [[ $step == ab-0001 ]] && conc="1 4 32" np=8 || conc=32 np=64
    for p in qwen3-0.6b llama-3.1-8b; do
      m=$(mk $p)
      timeout 330 $AB --patch 0001 --model-path $m --variants off on:pr on:packed --audit none \
        --server-args "--load-format dummy --cuda-graph-max-bs 32" --tag ab-0001-$p \
        --max-concurrencies $conc -- $(rnd $m) --num-prompts $np --random-input-len 128 \
        --random-output-len 48 2>&1 | tail -n 40  # never head: a closed pipe kills bench_ab
    done ;;
  ab-0003a)
    m=$(mk qwen3-0.6b)
    timeout 240 $AB --patch 0003a --model-path $m --audit none \
      --server-args "--load-format dummy --cuda-graph-max-bs 64" --tag ab-0003a \
      -- $(rnd $m) --num-prompts 64 --random-input-len 256 --random-output-len 16 \
      --return-logprob --logprob-start-len 0 2>&1 | tail -n 24 ;;
  ab-0005|ab-0005b)
    m=$(mk qwen3-0.6b)
    lora=/tmp/sglab-ab-lora
    [[ -d $lora ]] || python3 -m sglab.test.lora_utils --model-path $m --out $lora --rank 16 \
      > /dev/null
    timeout 300 $AB --patch ${step#ab-} --model-path $m --audit none --server-args \
      "--load-format dummy --lora-paths lora=$lora --max-loras-per-batch 1 --cuda-graph-max-bs 16" \
      --tag $step --request-rates 8 -- $(rnd $m) --num-prompts 8 --random-input-len 256 \
      --random-output-len 64 --lora-name lora 2>&1 | tail -n 24 ;;
  bench)
    timeout 360 python3 benchmark/gpu_bench.py all --out "$R" 2>&1 | tail -n 30 ;;
  hostloop)  # decode: host per component vs one graph replay, outside-graph calls, saturation
    timeout 420 python3 benchmark/decode_host_profile.py --out "$R" --saturated --deterministic \
      2>&1 \
      | tail -n 20 ;;
  unified)
    for p in qwen3-0.6b llama-3.1-8b; do
      timeout 150 python3 benchmark/bench_unified_extend.py --preset $p --out "$R/unified-$p" \
        2>&1 | tail -n 8
    done ;;
  qwen35-tests)
    timeout 420 python3 -m pytest -q -m gpu test/kernels/test_gdn_kernels.py \
      test/srt/test_qwen35.py test/srt/test_patches.py -k "gdn or qwen35 or 0003b" 2>&1 \
      | tee "$R/gpu_tests_qwen35.log" | tail -n 15 ;;
  qwen35-bench)
    timeout 420 python3 benchmark/gpu_bench.py all --presets qwen3.5-9b --out "$R/qwen35" \
      2>&1 | tail -n 20 ;;
  ab-0003b-churn|ab-0003b-long) ab_0003b $step ;;
  qwen35)
    for part in qwen35-tests qwen35-bench ab-0003b-churn ab-0003b-long; do
      bash "$0" "$part"
    done ;;
  structured)
    m=$(mk qwen3-0.6b)
    timeout 420 python3 benchmark/structured_itl.py --model-path $m --out "$R" --rounds 6 \
      --concurrency 8 2>&1 | tail -n 12
    timeout 240 python3 -m pytest -q -m gpu test/srt/test_structured_outputs.py 2>&1 \
      | tee "$R/gpu_tests_structured.log" | tail -n 5 ;;
  profile)
    timeout 120 python3 benchmark/profile_step.py --preset qwen3-0.6b --batch-size 1 \
      --overlap > "$R/profile-qwen3-0.6b-bs1.txt" 2>&1
    grep '^==' "$R/profile-qwen3-0.6b-bs1.txt" ;;
  kernels)
    timeout 200 python3 -m pytest -q -m gpu test/kernels/test_elementwise.py \
      test/kernels/test_skinny_gemm.py test/kernels/test_triton_attention.py \
      test/srt/test_kernel_fusion.py 2>&1 | tee "$R/gpu_tests_kernels.log" | tail -n 8
    timeout 380 python3 benchmark/kernel_bench.py all --out "$R" 2>&1 | tail -n 60 ;;
  kernels-sweep)  # the kernels alone: GPU tests, then GEMM table + layouts, attention sweep
    timeout 200 python3 -m pytest -q -m gpu test/kernels/test_skinny_gemm.py \
      test/kernels/test_triton_attention.py test/kernels/test_pdl.py \
      test/srt/test_kernel_fusion.py 2>&1 | tee "$R/gpu_tests_kernels.log" | tail -n 8
    timeout 340 python3 benchmark/kernel_bench.py sweep --out "$R" 2>&1 | tail -n 30 ;;
  kernels-decode)  # decode graph replays per variant (KB_VARIANTS, default all) + 8k prefill
    timeout 560 python3 benchmark/kernel_bench.py all --out "$R" \
      ${KB_VARIANTS:+--variants $KB_VARIANTS} 2>&1 | tail -n 40 ;;
  kernels-quick)  # one call: GPU tests, the attention sweep, 0.6B and 8B decode with and
    # without PDL (each part under its own limit, results kept as they come)
    timeout 120 python3 -m pytest -q -m gpu test/kernels/test_pdl.py \
      test/kernels/test_skinny_gemm.py test/kernels/test_triton_attention.py 2>&1 \
      | tee "$R/gpu_tests_kernels.log" | tail -n 8
    kb="python3 benchmark/kernel_bench.py all --parts"  # no kernel parts after the decode
    timeout 180 $kb --presets qwen3-0.6b --variants off on on-m1 on-pdl on-m1-pdl \
      --out "$R/q06" 2>&1 | tail -n 12
    timeout 150 $kb --presets llama-3.1-8b --variants on on-pdl --out "$R/l8b" 2>&1 | tail -n 6
    timeout 100 python3 benchmark/kernel_bench.py sweep --parts attention --out "$R/attn" 2>&1 \
      | tail -n 6 ;;
  kernels-splits)  # one call: attention GPU tests, 0.6B decode per split bound, 8B decode
    # fixed vs bounded, the graph-timed attention sweep (both head shapes; KB_ATTN_SWEEP=0:
    # the serving and fixed rows only)
    timeout 170 python3 -m pytest -q -m gpu test/kernels/test_triton_attention.py \
      test/srt/test_kernel_fusion.py test/srt/test_decode_splits.py 2>&1 \
      | tee "$R/gpu_tests_splits.log" | tail -n 8
    kb="python3 benchmark/kernel_bench.py all --parts"
    q06=${KS_Q06:-on-default on-m1-fixed on-m1 on-m1-pdl}
    timeout 150 $kb --presets qwen3-0.6b --variants $q06 --out "$R/q06" 2>&1 | tail -n 12
    timeout 150 $kb --presets llama-3.1-8b --variants ${KS_L8B:-on on-default} --out "$R/l8b" 2>&1 \
      | tail -n 6
    timeout ${KS_ATTN_S:-190} python3 benchmark/kernel_bench.py sweep --parts attention \
      --out "$R/attn" 2>&1 | tail -n 6 ;;
  kernels-final)  # one call: small-M GEMM and PDL GPU tests, 0.6B decode with the shipped
    # defaults, through cuBLAS, and with PDL; the prefill attention sweep
    timeout 90 python3 -m pytest -q -m gpu test/kernels/test_skinny_gemm.py \
      test/kernels/test_pdl.py 2>&1 | tee "$R/gpu_tests_final.log" | tail -n 8
    timeout 130 python3 benchmark/kernel_bench.py all --parts --presets qwen3-0.6b \
      --variants ${KS_Q06:-on-default on on-m1-pdl} --out "$R/q06" 2>&1 | tail -n 12
    timeout 130 python3 benchmark/kernel_bench.py sweep --parts extend --out "$R/ext" 2>&1 \
      | tail -n 12 ;;
  kernels-prefill)  # one call: the extend-attention GPU tests, the 8B decode and 8k prefill
    timeout 60 python3 -m pytest -q -m gpu test/kernels/test_triton_attention.py -k "extend or \
      unified or head_dims" 2>&1 | tee "$R/gpu_tests_prefill.log" | tail -n 4
    timeout 120 python3 benchmark/kernel_bench.py all --parts --presets llama-3.1-8b \
      --variants on --out "$R/l8b" 2>&1 | tail -n 12 ;;
  kernels-rope)  # one call: the fused-RoPE decode attention and argmax GPU tests, 0.6B / 8B
    # decode with the RoPE in decode attention vs in its own kernel (-rope0)
    timeout 200 python3 -m pytest -q -m gpu test/kernels/test_triton_attention.py \
      test/kernels/test_argmax.py test/srt/test_kernel_fusion.py -k "not extend and not \
      unified and not head_dims" 2>&1 | tee "$R/gpu_tests_rope.log" | tail -n 8
    kb="python3 benchmark/kernel_bench.py all --parts"
    timeout 140 $kb --presets qwen3-0.6b --variants ${KR_Q06:-on-m1 on-m1-rope0 on-default} \
      --out "$R/q06" 2>&1 | tail -n 12
    timeout 160 $kb --presets llama-3.1-8b --variants ${KR_L8B:-on on-rope0} --out "$R/l8b" \
      2>&1 | tail -n 6 ;;
  kernels-engine)  # one call: fused-RoPE tests, gpu_bench fusion off / on
    timeout 100 python3 -m pytest -q -m gpu test/kernels/test_triton_attention.py \
      test/kernels/test_argmax.py -k "rope or argmax" 2>&1 | tee "$R/gpu_tests_engine.log" \
      | tail -n 6
    timeout ${KE_BENCH_S:-420} python3 benchmark/gpu_bench.py all --fusions off on \
      --out "$R/engine" 2>&1 | tail -n 30 ;;
  kernels-replays)  # one call: 0.6B / 8B decode replays (single, back to back, kernel sum)
    kb="python3 benchmark/kernel_bench.py all --parts"
    timeout 150 $kb --presets qwen3-0.6b --variants ${KR_Q06:-on-default on-m1-rope0} \
      --out "$R/q06" 2>&1 | tail -n 8
    timeout 200 $kb --presets llama-3.1-8b --variants ${KR_L8B:-on on-rope0} --out "$R/l8b" \
      2>&1 | tail -n 6 ;;
  kernels-blas)  # one call: fusion GPU tests under cuBLASLt, 0.6B / 8B decode and the 8k
    # prefill with cuBLASLt (fusion on's default) vs cuBLAS
    timeout 150 python3 -m pytest -q -m gpu test/srt/test_kernel_fusion.py \
      test/kernels/test_skinny_gemm.py 2>&1 | tee "$R/gpu_tests_blas.log" | tail -n 6
    kb="python3 benchmark/kernel_bench.py all --parts"
    timeout 100 $kb --presets qwen3-0.6b --variants on-default on-m1-cublas --out "$R/q06" \
      2>&1 | tail -n 8
    timeout 200 $kb --presets llama-3.1-8b --variants on on-cublas --out "$R/l8b" 2>&1 \
      | tail -n 12 ;;
  kernels-splitk)  # one call: the split-K GEMM's GPU tests, its layout sweep at 1-64 rows
    # against cuBLASLt / cuBLAS (writing the table it implies), then decode replays with that
    # table against none (SGLAB_SPLITK_TABLE=none)
    timeout 120 python3 -m pytest -q -m gpu test/kernels/test_splitk_gemm.py 2>&1 \
      | tee "$R/gpu_tests_splitk.log" | tail -n 6
    timeout ${KS_SPLITK_S:-240} python3 benchmark/kernel_bench.py sweep --parts splitk-sweep \
      --out "$R/sweep" 2>&1 | tail -n 40
    export SGLAB_SPLITK_TABLE=${KS_TABLE:-$R/sweep/splitk_table.json}
    kb="python3 benchmark/kernel_bench.py all --parts"
    timeout 170 $kb --presets llama-3.1-8b --variants on on-nosplitk --out "$R/l8b" 2>&1 \
      | tail -n 12
    timeout 110 $kb --presets qwen3-0.6b --variants on-m1 on-m1-nosplitk --out "$R/q06" 2>&1 \
      | tail -n 8 ;;
  kernels-fold)  # one call: split-K / fusion GPU tests, then decode replays with the built-in
    # split-K table: norms folded at one row, SiLU in gate_up, against neither and no split-K
    timeout 150 python3 -m pytest -q -m gpu test/kernels/test_splitk_gemm.py \
      test/srt/test_kernel_fusion.py test/kernels/test_skinny_gemm.py 2>&1 \
      | tee "$R/gpu_tests_fold.log" | tail -n 6
    kb="python3 benchmark/kernel_bench.py all --parts"
    timeout 260 $kb --presets llama-3.1-8b --variants on on-fold0 on-silu0 on-nosplitk \
      --out "$R/l8b" 2>&1 | tail -n 14
    timeout 130 $kb --presets qwen3-0.6b --variants on-m1 on-m1-silu0 on-m1-nosplitk \
      --out "$R/q06" 2>&1 | tail -n 10 ;;
  kernels-final)  # one call: split-K / fusion GPU tests, 8B and 0.6B decode replays with and
    # without split-K, gpu_bench fusion off / on (each part under its own limit)
    timeout 90 python3 -m pytest -q -m gpu test/kernels/test_splitk_gemm.py \
      test/srt/test_kernel_fusion.py 2>&1 | tee "$R/gpu_tests_final.log" | tail -n 4
    kb="python3 benchmark/kernel_bench.py all --parts"
    timeout 140 $kb --presets llama-3.1-8b --variants on on-nosplitk --out "$R/l8b" 2>&1 \
      | tail -n 8
    timeout 80 $kb --presets qwen3-0.6b --variants on-default on-m1-nosplitk --out "$R/q06" \
      2>&1 | tail -n 8
    timeout ${KF_BENCH_S:-260} python3 benchmark/gpu_bench.py all --fusions off on \
      --out "$R/engine" 2>&1 | tail -n 30 ;;
  kernels-attn-tune)  # one call: split-K / fusion GPU tests, the fused decode attention's
    # warps / tile / stages at the bs-64 step, then decode replays with split-K (and without),
    # and with the tuned tile of each model (SGLAB_DECODE_ONE_SPLIT_TILE)
    timeout 90 python3 -m pytest -q -m gpu test/kernels/test_splitk_gemm.py \
      test/srt/test_kernel_fusion.py 2>&1 | tee "$R/gpu_tests_final.log" | tail -n 4
    timeout 120 python3 benchmark/kernel_bench.py sweep --parts attention-tune --out "$R/tune" \
      2>&1 | grep "x 264"
    kb="python3 benchmark/kernel_bench.py all --parts"
    timeout 120 $kb --presets llama-3.1-8b --variants on on-nosplitk --out "$R/l8b" 2>&1 \
      | grep "^| llama"
    [ "${KT_Q06:-1}" = 1 ] && timeout 70 $kb --presets qwen3-0.6b --variants on-default \
      on-m1-nosplitk --out "$R/q06" 2>&1 | grep "^| qwen"
    for m in ${KT_MODELS:-llama-3.1-8b qwen3-0.6b}; do
      tile=$(python3 -c "import json,sys; rows=[r for r in json.load(open('$R/tune/kernel_sweep.json'))['attention_tune']['rows'] if r['model']=='$m' and 'median_s' in r]; b=min(rows,key=lambda r:r['median_s']); print(f\"{b['block_n'] or 32},{b['num_stages'] or 3},{b['num_warps'] or 4}\")")
      echo "$m tile $tile"
      v=on; [ $m = qwen3-0.6b ] && v=on-default
      SGLAB_DECODE_ONE_SPLIT_TILE=$tile timeout 70 $kb --presets $m --variants $v \
        --out "$R/tile-$m" 2>&1 | grep "^| [lq]"
    done ;;
  kernels-tma)  # one call: the TMA split-K and one-split attention tile GPU tests, the
    # split-K sweep at KM_M rows (default 1 and 64) with TMA, 8-warp and 256-column layouts
    # next to the built-in ones (KB_SPLITK_WIDE=1, llama-3.1-8b, SiLU out for gate_up), then
    # 8B decode replays with the built-in table and with the built-in table refined by the sweep
    timeout ${KM_TESTS_S:-100} python3 -m pytest -q -m gpu test/kernels/test_splitk_gemm.py \
      test/kernels/test_triton_attention.py -k "tma or one_split" 2>&1 \
      | tee "$R/gpu_tests_tma.log" | tail -n 4
    KB_SPLITK_WIDE=1 KB_SPLITK_M=${KM_M:-1,64} timeout ${KM_SWEEP_S:-240} python3 \
      benchmark/kernel_bench.py sweep --parts splitk-sweep --out "$R/sweep" 2>&1 \
      | grep "^| llama"
    kb="python3 benchmark/kernel_bench.py all --parts"
    timeout 100 $kb --presets llama-3.1-8b --variants on --out "$R/l8b" 2>&1 | grep "^| llama"
    SGLAB_SPLITK_TABLE=$R/sweep/splitk_table.json timeout 100 $kb --presets llama-3.1-8b \
      --variants on --out "$R/l8b-tma" 2>&1 | grep "^| llama" ;;
  kernels-tma-final)  # one call: split-K / attention / norm / fusion GPU tests, then 8B
    # (with the 8k prefill) and 0.6B decode replays with the shipped defaults
    timeout ${KM_TESTS_S:-220} python3 -m pytest -q -m gpu test/kernels/test_splitk_gemm.py \
      test/kernels/test_elementwise.py test/srt/test_kernel_fusion.py \
      test/kernels/test_triton_attention.py 2>&1 | tee "$R/gpu_tests_tma_final.log" | tail -n 4
    kb="python3 benchmark/kernel_bench.py all --parts"
    timeout 100 $kb --presets llama-3.1-8b --variants on --out "$R/l8b" 2>&1 | grep "^| llama"
    timeout 80 $kb --presets qwen3-0.6b --variants on-default --out "$R/q06" 2>&1 \
      | grep "^| qwen" ;;
  kernels-attn-wide)  # one call: the fused decode attention at bs 64 x 264 over 2-4 warps,
    # 32-128 keys, 2-5 stages and 1 or 2 splits (KB_ATTN_TUNE=wide, llama-3.1-8b), then 8B
    # decode replays with the fastest one-split tile (SGLAB_DECODE_ONE_SPLIT_TILE) and its GPU
    # test
    KB_ATTN_TUNE=wide KB_ATTN_MODELS=${KA_MODELS:-llama-3.1-8b} timeout ${KA_TUNE_S:-200} \
      python3 benchmark/kernel_bench.py sweep --parts attention-tune --out "$R/tune" 2>&1 \
      | grep "x 264"
    tile=$(python3 -c "import json; rows=[r for r in json.load(open('$R/tune/kernel_sweep.json'))['attention_tune']['rows'] if 'median_s' in r and r['max_kv_splits'] == 1 and r['num_warps'] and r['model'] == 'llama-3.1-8b']; b=min(rows,key=lambda r:r['median_s']); print(f\"{b['block_n']},{b['num_stages']},{b['num_warps']}\")")
    echo "one-split tile $tile"
    kb="python3 benchmark/kernel_bench.py all --parts"
    SGLAB_DECODE_ONE_SPLIT_TILE=$tile timeout 100 $kb --presets llama-3.1-8b --variants on \
      --out "$R/l8b-tile" 2>&1 | grep "^| llama"
    SGLAB_DECODE_ONE_SPLIT_TILE=$tile timeout 100 python3 -m pytest -q -m gpu \
      test/kernels/test_triton_attention.py -k one_split 2>&1 | tail -n 3 ;;
  tests-attn)  # the decode attention and fusion GPU tests
    timeout 150 python3 -m pytest -q -m gpu test/kernels/test_triton_attention.py \
      test/srt/test_kernel_fusion.py 2>&1 | tee "$R/gpu_tests_attn.log" | tail -n 4 ;;
  tests-prefill-graph)
    timeout 300 python3 -m pytest -q -m gpu test/srt/test_prefill_cuda_graph.py 2>&1 \
      | tee "$R/gpu_tests_prefill_graph.log" | tail -n 8 ;;
  ab-prefill-graph)  # sglab's prefill CUDA graphs off vs on: TTFT of many small prompts
    m=$(mk qwen3-0.6b)
    timeout 300 $AB --feature=--enable-prefill-cuda-graph --model-path $m --audit none \
      --time-budget 220 \
      --server-args "--load-format dummy" --tag ab-prefill-graph -- $(rnd $m) $SMALL 2>&1 \
      | tail -n 30 ;;
  tests-dp|bench-tp|ab-0003c) multi_gpu_steps $step ;;
  tests-hisparse|ab-0004|ab-0004-control|hisparse-*) hisparse_steps $step ;;
  hisparse)
    for part in tests-hisparse ab-0004 ab-0004-control hisparse-bench; do
      hisparse_steps $part
    done ;;
  *) echo "unknown step $step" ;;
  esac
  # A step stopped at its limit leaves its server behind, holding GPU memory.
  nvidia-smi --query-compute-apps=pid --format=csv,noheader | xargs -r kill -9 2>/dev/null
  tar czf "$OUT/r.tgz" -C "$OUT" r  # after every step: a later timeout loses nothing
done
