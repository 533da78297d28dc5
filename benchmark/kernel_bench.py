"""--kernel-fusion off vs on, measured side by side in one run:

    python benchmark/kernel_bench.py all --out DIR [--presets qwen3-0.6b llama-3.1-8b]

- decode: GPU time of one CUDA-graph replay (CUDA events, median) at bs 1, 8 and 64, against
  the roofline (weight bytes / measured copy bandwidth), and the kernels in one replay
  (profiler); fusion off, on (every matmul through F.linear), on with the small-M GEMM up
  to 1 and 16 rows (`on-m1`, `on-m16`: SGLAB_SKINNY_GEMM_MAX_M), and `on` / `on-m1` with
  programmatic dependent launch (`-pdl`: SGLAB_TRITON_PDL=1);
- gemm: each decoder matmul shape of both models at M = 1, 4, 8, 16, 32, 64: skinny_gemm vs
  F.linear, GPU time and weight bytes per second (the table behind SGLAB_SKINNY_GEMM_MAX_M);
- prefill: llama-3.1-8b, 8192 new tokens in one chunk: latency (the TTFT of one 8k prompt
  without HTTP), model FLOPs / latency, and MFU against the measured bf16 matmul peak;
- decode attention (qwen3-0.6b and llama-3.1-8b heads) at bs 1 / 8 / 64 x 264, 4096 and
  32768 keys: GPU time and KV bytes read per second against the copy bandwidth, the serving
  configuration (one launch and two stages) next to the fixed split bound before it, and one
  launch swept over max KV splits, keys per tile and pipeline stages.

Each scheduler runs in its own process (one at a time on the GPU). Writes DIR/kernel_bench.json
and DIR/kernel_bench.md.
"""

from __future__ import annotations

import collections
import json
import os
import statistics
import subprocess
import sys

import torch
import triton

sys.path.insert(0, os.path.dirname(__file__))
from decode_host_profile import graph_replay_us  # noqa: E402
from gpu_bench import (  # noqa: E402
    _drain,
    _scheduler,
    _submit,
    bench_parser,
    measure_bandwidth,
    write_results,
)

from sglab.srt.utils.provenance import provenance, provenance_line  # noqa: E402

FUSION = ("off", "on")
# name: (--kernel-fusion, environment); pdl: SGLAB_TRITON_PDL=1 (layers/pdl.py)
VARIANTS = {"off": ("off", {}), "on": ("on", {}),
            "on-m1": ("on", {"SGLAB_SKINNY_GEMM_MAX_M": "1"}),
            "on-m16": ("on", {"SGLAB_SKINNY_GEMM_MAX_M": "16"}),
            "on-pdl": ("on", {"SGLAB_TRITON_PDL": "1"}),
            "on-m1-pdl": ("on", {"SGLAB_SKINNY_GEMM_MAX_M": "1", "SGLAB_TRITON_PDL": "1"}),
            # decode attention splits: -fixed up to 16 at every batch size (the bound before),
            # -wN bounded for N stage-1 programs per SM (SGLAB_DECODE_SPLIT_WAVES)
            "on-fixed": ("on", {"SGLAB_DECODE_SPLIT_WAVES": "0"}),
            # the shipped defaults: nothing set (the small-M GEMM bound by the hidden size)
            "on-default": ("on", None),
            "on-m1-fixed": ("on", {"SGLAB_SKINNY_GEMM_MAX_M": "1",
                                   "SGLAB_DECODE_SPLIT_WAVES": "0"}),
            **{f"on-m1-w{w}": ("on", {"SGLAB_SKINNY_GEMM_MAX_M": "1",
                                      "SGLAB_DECODE_SPLIT_WAVES": str(w)}) for w in (1, 2, 8)},
            # -rope0: the q/k norm + RoPE in its own kernel, not in decode attention
            "on-rope0": ("on", {"SGLAB_DECODE_FUSED_ROPE": "0"}),
            "on-m1-rope0": ("on", {"SGLAB_SKINNY_GEMM_MAX_M": "1",
                                   "SGLAB_DECODE_FUSED_ROPE": "0"}),
            # -cublas: torch's matmuls through cuBLAS, not cuBLASLt (fusion on's choice)
            "on-cublas": ("on", {"TORCH_BLAS_PREFER_CUBLASLT": "0"}),
            "on-m1-cublas": ("on", {"SGLAB_SKINNY_GEMM_MAX_M": "1",
                                    "TORCH_BLAS_PREFER_CUBLASLT": "0"}),
            # -nosplitk: no matmul through the split-K GEMM (F.linear where its table has one)
            "on-nosplitk": ("on", {"SGLAB_SPLITK_TABLE": "none"}),
            "on-m1-nosplitk": ("on", {"SGLAB_SKINNY_GEMM_MAX_M": "1",
                                      "SGLAB_SPLITK_TABLE": "none"}),
            # -fold0: no norm folded into the split-K GEMM; -silu0: no SiLU folded into gate_up
            "on-fold0": ("on", {"SGLAB_SPLITK_FOLD_MAX_M": "0"}),
            "on-silu0": ("on", {"SGLAB_SPLITK_SILU": "0"}),
            "on-m1-silu0": ("on", {"SGLAB_SKINNY_GEMM_MAX_M": "1", "SGLAB_SPLITK_SILU": "0"})}
PREFILL_VARIANTS = ("off", "on", "on-cublas")
DECODE_BS = [1, 8, 64]
GEMM_ROTATE_BYTES = 256 << 20  # over 2x the H100/H200 L2 (50/60 MB)
INPUT_LEN, DECODE_STEPS = 256, 8
PREFILL_PRESET, PREFILL_LEN = "llama-3.1-8b", 8192
# (batch, context): long context, and the decode step of the graph benchmark (256-token prompts)
# (batch, context): the graph benchmark's decode step (256-token prompts), 4k and 32k context
ATTN_SHAPES = [(1, 264), (8, 264), (64, 264), (1, 4096), (8, 4096), (64, 4096), (1, 32768),
               (8, 32768)]
ATTN_HEADS = {"qwen3-0.6b": (16, 8, 128), "llama-3.1-8b": (32, 8, 128)}  # q, kv heads, dim
ATTN_ROTATE_BYTES, ATTN_MAX_COPIES = 256 << 20, 64
# (model, layer, N, K) of each decoder matmul at tp 1.
GEMM_SHAPES = [("qwen3-0.6b", "qkv", 4096, 1024), ("qwen3-0.6b", "o", 1024, 2048),
               ("qwen3-0.6b", "gate_up", 6144, 1024), ("qwen3-0.6b", "down", 1024, 3072),
               ("llama-3.1-8b", "qkv", 6144, 4096), ("llama-3.1-8b", "o", 4096, 4096),
               ("llama-3.1-8b", "gate_up", 28672, 4096), ("llama-3.1-8b", "down", 4096, 14336)]
GEMM_M = [1, 4, 8, 16, 32, 64]
# (BLOCK_M, BLOCK_N, warps, stages) of the prefill attention sweep
EXTEND_SWEEP = [(bm, bn, nw, st) for bm in (64, 128) for bn in (32, 64, 128) for nw in (4, 8)
                for st in (1, 2, 3) if bm * bn <= 8192 and (bm, nw) != (128, 4)]
# (warps, keys per tile, pipeline stages) of the decode attention with the q/k norm + RoPE,
# at the serving splits (attention-tune)
ATTN_TUNE = [(w, bn, st) for w in (2, 4, 8) for bn in (16, 32, 64) for st in (2, 3)]
ATTN_TUNE_SHAPES = [(64, 264)]  # KB_ATTN_BS=32,64: other batch sizes at the same context
# KB_ATTN_TUNE=wide: 2 or 4 warps, 32-128 keys, 2-5 stages (those whose K/V stages fit an
# H200's shared memory), at KB_ATTN_SPLITS max splits (default: the serving bound and 2), for
# KB_ATTN_MODELS (default both)
ATTN_TUNE_WIDE = [(w, bn, st) for w in (2, 4) for bn in (32, 64, 128) for st in (2, 3, 4, 5)
                  if st * bn * 2 * 128 * 2 + 16 * 128 * 2 <= 227 * 1024]
# (max KV splits, keys per tile, pipeline stages) of the one-launch attention sweep
ATTN_SWEEP = [(sp, bn, st) for sp in (1, 2, 4, 8, 16) for bn in (32, 64, 128) for st in (2, 3)]
# Split-K GEMM layouts swept at decode batch sizes (splitk_gemm, the graph sizes up to 64 in
# ranges): BLOCK_N, BLOCK_K, SPLIT_K.
SPLITK_M = (1, 4, 8, 16, 32, 64)
SPLITK_SWEEP = [{"BLOCK_N": bn, "BLOCK_K": bk, "SPLIT_K": sk, "num_warps": 4, "num_stages": 4}
                for bn in (32, 64, 128) for bk in (64, 128) for sk in (1, 2, 4, 8)]
# KB_SPLITK_WIDE=1: the layouts for 32-64 rows, where cuBLASLt's tiles led: TMA loads (TMA),
# 8 warps, 256-column tiles; at KB_SPLITK_M rows (default 32, 64) of KB_SPLITK_MODELS' shapes
# (default llama-3.1-8b) and KB_SPLITK_LAYERS (default all), and gate_up with SiLU out next
# to F.linear + the SiLU kernel.
SPLITK_SWEEP_WIDE = [
    {"BLOCK_N": bn, "BLOCK_K": bk, "SPLIT_K": sk, "TMA": 1, "num_warps": w, "num_stages": st}
    for bn in (64, 128, 256) for bk in (64, 128) for sk in (1, 2, 4, 8)
    for w, st in ((4, 4), (8, 3))] + [
    {"BLOCK_N": bn, "BLOCK_K": bk, "SPLIT_K": sk, "num_warps": 8, "num_stages": 3}
    for bn in (64, 128, 256) for bk in (64, 128) for sk in (1, 2, 4)]
# Small-M GEMM layouts swept at M = 1 and 4 (FMA tiles): BLOCK_N, BLOCK_K (per row), warps,
# the reduction over K per tile or deferred to the end.
GEMM_SWEEP_M = (1, 4)
GEMM_SWEEP = [{"BLOCK_N": bn, "BLOCK_K": bk, "num_warps": nw, "DEFER_REDUCE": d}
              for bn in (4, 8, 16) for bk in (256, 512, 1024) for nw in (4, 8)
              for d in (False, True) if bn * bk <= 8192]


def _graph(sched, bs: int):
    gr = sched.tp_worker.model_runner.graph_runner
    return [g for k, g in gr.graphs.items() if k[0] == bs][-1]


def back_to_back_replay_us(graph, replays: int = 20, rounds: int = 7) -> float:
    """GPU µs per replay with the next one already queued (median of rounds of `replays`): the
    host's launch overlaps the device's work, as in a serving loop that runs ahead. One replay
    between two events also counts the launch wait when the launch takes longer than the
    GPU's idle start (graph_replay_us)."""
    times = []
    for _ in range(rounds):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        graph.replay()  # the queue is not empty at the first event
        start.record()
        for _ in range(replays):
            graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e3 / replays)
    return statistics.median(times)


def kernels_per_replay(graph) -> dict:
    """The kernels of one replay (_device_time_by_name)."""
    return _device_time_by_name(graph.replay)


def _device_time_by_name(fn) -> dict:
    """Kernels (and copies/memsets) the profiler sees while fn runs: by name, how many and
    their summed device µs (largest first)."""
    from torch.autograd import DeviceType

    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    events = [e for e in prof.events() if e.device_type == DeviceType.CUDA]
    count, device_us = collections.Counter(), collections.Counter()
    for e in events:
        count[e.name] += 1
        device_us[e.name] += e.time_range.end - e.time_range.start
    return {"count": len(events), "by_name": count.most_common(),
            "device_us_by_name": [(n, round(t, 2), count[n]) for n, t in device_us.most_common()]}


def decode_child(preset: str, fusion: str, with_prefill: bool) -> dict:
    from sglab.bench_one_batch import measure_matmul_tflops, run_one

    prefill = with_prefill and preset == PREFILL_PRESET
    sched = _scheduler(preset, kernel_fusion=fusion, cuda_graph_bs=DECODE_BS,
                       disable_overlap_schedule=True,
                       chunked_prefill_size=PREFILL_LEN if prefill else None)
    out: dict = {"preset": preset, "fusion": fusion,
                 "weight_bytes": sched.model_config.weight_bytes(), "decode": []}
    run_one(sched, 1, 16, 4, seed=99)  # compile and warm up
    for bs in DECODE_BS:
        _submit(sched, bs, INPUT_LEN, DECODE_STEPS + 40, f"d{bs}")
        for _ in range(DECODE_STEPS):
            sched.run_step()
        graph = _graph(sched, bs)
        gpu_us, launch_us = graph_replay_us(sched, bs)
        kernels = kernels_per_replay(graph)
        out["decode"].append({"bs": bs, "graph_gpu_us": gpu_us, "graph_launch_idle_us": launch_us,
                              "back_to_back_us": back_to_back_replay_us(graph),
                              "kernel_sum_us": sum(t for _, t, _ in kernels["device_us_by_name"]),
                              "kernels": kernels})
        _drain(sched)
        sched.flush_cache()
    if prefill:
        peak = measure_matmul_tflops("cuda", torch.bfloat16)
        runs = [run_one(sched, 1, PREFILL_LEN, 2, seed=s, peak_tflops=peak) for s in (1, 2, 3)]
        best = min(runs, key=lambda r: r.prefill_latency_s)
        out["prefill"] = {**best.__dict__,
                          "latencies_s": [r.prefill_latency_s for r in runs]}
        kernels = _device_time_by_name(lambda: run_one(sched, 1, PREFILL_LEN, 2, seed=4))
        out["prefill"]["kernels_top"] = kernels["device_us_by_name"][:12]
    return out


def attention_child() -> dict:
    """Per head shape and (bs, context): the serving configuration (splits bounded by the
    batch size, the default tile) in one launch and in two stages, the fixed bound of
    MAX_KV_SPLITS splits before it, and one launch swept over ATTN_SWEEP."""
    from sglab.srt.layers.attention.triton_backend import (
        MAX_KV_SPLITS, decode_max_splits, decode_programs_per_split, split_programs)

    programs = split_programs(torch.device("cuda"))
    rows = []
    for model, heads in ATTN_HEADS.items():
        for bs, ctx in ATTN_SHAPES:
            run = _attention_case(heads, bs, ctx)
            serving = decode_max_splits(bs, programs, decode_programs_per_split(*heads[:2]))
            for merge in (True, False):
                rows.append({**run(serving, None, None, merge), "model": model,
                             "config": "serving"})
            rows.append({**run(MAX_KV_SPLITS, None, None, True), "model": model,
                         "config": "fixed"})
            if os.environ.get("KB_ATTN_SWEEP", "1") != "0":  # 0: serving and fixed only
                rows += [{**run(sp, bn, st, True), "model": model, "config": "sweep"}
                         for sp, bn, st in ATTN_SWEEP]
    return {"split_programs": programs, "rows": rows}


def attention_tune_child() -> dict:
    """Decode attention as the fused decode step runs it (one launch, the q/k norm + RoPE and
    the new token's K/V write taken in, the serving splits) over ATTN_TUNE (KB_ATTN_TUNE=wide:
    ATTN_TUNE_WIDE), per head shape and ATTN_TUNE_SHAPES, CUDA-graph timed over L2-missing KV
    copies as attention_child."""
    from sglab.srt.layers.attention.triton_backend import (
        decode_max_splits, decode_programs_per_split, split_programs)

    programs = split_programs(torch.device("cuda"))
    wide = os.environ.get("KB_ATTN_TUNE") == "wide"
    models = os.environ.get("KB_ATTN_MODELS", ",".join(ATTN_HEADS)).split(",")
    shapes = [(int(bs), ATTN_TUNE_SHAPES[0][1]) for bs in os.environ["KB_ATTN_BS"].split(",")] \
        if os.environ.get("KB_ATTN_BS") else ATTN_TUNE_SHAPES
    rows = []
    for model, heads in ATTN_HEADS.items():
        if model not in models:
            continue
        for bs, ctx in shapes:
            run = _attention_case(heads, bs, ctx, rope_norm=model == "qwen3-0.6b")
            serving = decode_max_splits(bs, programs, decode_programs_per_split(*heads[:2]))
            splits = sorted({serving, *(int(v) for v in os.environ.get(
                "KB_ATTN_SPLITS", f"{serving},2").split(","))}) if wide else [serving]
            rows.append({**run(serving, None, None, True), "model": model, "num_warps": None})
            for sp in splits:
                for w, bn, st in ATTN_TUNE_WIDE if wide else ATTN_TUNE:
                    rows.append({**run(sp, bn, st, True, num_warps=w), "model": model,
                                 "num_warps": w})
    return {"split_programs": programs, "rows": rows}


def _attention_case(heads: tuple[int, int, int], bs: int, ctx: int,
                    rope_norm: bool | None = None):
    """A closure timing decode_attention_fwd over bs requests of ctx keys each (bf16,
    contiguous slots) in a CUDA graph. Each captured call reads its own slots of one KV
    buffer, as each layer reads its own cache, so the graph's calls together read at least
    ATTN_ROTATE_BYTES (up to ATTN_MAX_COPIES calls) and small shapes do not run from L2.
    rope_norm not None: the q/k norm (True) + RoPE and the last key's K/V write taken in."""
    from sglab.srt.layers.attention.triton_backend import MIN_KEYS_PER_SPLIT
    from sglab.srt.layers.attention.triton_ops.decode_attention import (
        DecodeRope, decode_attention_fwd)
    from sglab.srt.layers.elementwise import QKNormRope

    hq, hkv, d = heads
    n = bs * ctx
    kv_bytes = 2 * n * hkv * d * 2 + n * 8
    copies = max(1, min(ATTN_MAX_COPIES, -(-ATTN_ROTATE_BYTES // kv_bytes)))
    k_buf = torch.randn(copies * n + 1, hkv, d, device="cuda", dtype=torch.bfloat16)
    v_buf = torch.randn_like(k_buf)
    q = torch.randn(bs, hq, d, device="cuda", dtype=torch.bfloat16)
    o = torch.empty_like(q)
    indptr = (torch.arange(bs + 1, device="cuda") * ctx).to(torch.int32)
    indices = [torch.arange(1 + i * n, 1 + (i + 1) * n, device="cuda") for i in range(copies)]
    max_splits = max(sp for sp, _, _ in ATTN_SWEEP)
    logits = torch.empty(bs, hq, max_splits, d, device="cuda")
    lse = torch.empty(bs, hq, max_splits, device="cuda")
    counts = torch.zeros(bs * hq, dtype=torch.int32, device="cuda")
    ropes = [None] * copies
    if rope_norm is not None:
        weight = (lambda: torch.rand(d, device="cuda", dtype=torch.bfloat16) + 0.5) \
            if rope_norm else (lambda: None)
        spec = QKNormRope(torch.full((bs,), ctx - 1, device="cuda"),
                          torch.randn(ctx, d, device="cuda"), d, weight(), weight())
        new_kv = torch.randn(2, bs, hkv * d, device="cuda", dtype=torch.bfloat16)
        ropes = [DecodeRope(spec, new_kv[0], new_kv[1], idx[indptr[1:].long() - 1])
                 for idx in indices]

    def run(splits_max, block_n, stages, merge, num_warps=None) -> dict:
        tile = max(MIN_KEYS_PER_SPLIT, -(-ctx // splits_max))
        splits = torch.full((bs,), min(splits_max, -(-ctx // tile)), dtype=torch.int32,
                            device="cuda")
        row = {"bs": bs, "context": ctx, "heads": list(heads), "one_launch": merge,
               "max_kv_splits": splits_max, "block_n": block_n, "num_stages": stages,
               "graph_calls": copies}

        def call(idx, rope):
            return lambda: decode_attention_fwd(
                q, k_buf, v_buf, o, indptr, idx, logits, lse, splits, splits_max, d ** -0.5,
                block_n=block_n, num_stages=stages, num_warps=num_warps,
                merge_count=counts if merge else None, rope=rope)
        try:
            t = _graph_time([call(idx, rope) for idx, rope in zip(indices, ropes)])
        except Exception as e:  # a tile that does not fit shared memory
            return {**row, "error": f"{type(e).__name__}: {str(e)[:200]}"}
        return {**row, "median_s": t, "kv_read_gbps": kv_bytes / t / 1e9}
    return run


def extend_child() -> dict:
    """The prefill attention kernel alone: one causal prompt of PREFILL_LEN new tokens with
    llama-3.1-8b heads (bf16), the default launch and EXTEND_SWEEP, against the model FLOPs of
    causal attention and the measured bf16 matmul peak."""
    from sglab.bench_one_batch import measure_matmul_tflops
    from sglab.srt.layers.attention.triton_ops.extend_attention import extend_attention_fwd

    hq, hkv, d = ATTN_HEADS["llama-3.1-8b"]
    n = PREFILL_LEN
    q = torch.randn(n, hq, d, device="cuda", dtype=torch.bfloat16)
    k, v = (torch.randn(n, hkv, d, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    o = torch.empty_like(q)
    qo = torch.tensor([0, n], dtype=torch.int32, device="cuda")
    kv_indptr = torch.zeros(2, dtype=torch.int32, device="cuda")
    empty = torch.zeros(0, dtype=torch.int64, device="cuda")
    flops = 4 * hq * d * n * (n + 1) // 2
    peak = measure_matmul_tflops("cuda", torch.bfloat16)
    rows = []
    for cfg in [None, *EXTEND_SWEEP]:
        bm, bn, nw, st = cfg or (None,) * 4
        row = {"config": cfg, "default": cfg is None}
        try:
            t = _cuda_time(lambda: extend_attention_fwd(
                q, k, v, o, k, v, qo, kv_indptr, empty, None, True, None, n,
                block_m=bm, block_n=bn, num_warps=nw, num_stages=st), reps=10)
        except Exception as e:  # a tile that does not fit
            rows.append({**row, "error": f"{type(e).__name__}: {str(e)[:200]}"})
            continue
        rows.append({**row, "median_s": t, "tflops": flops / t / 1e12,
                     "of_peak": flops / t / 1e12 / peak})
    return {"tokens": n, "heads": [hq, hkv, d], "flops": flops, "peak_tflops": peak,
            "rows": rows}


def gemm_sweep_child() -> dict:
    """GEMM_SWEEP at M in GEMM_SWEEP_M for every decoder shape, CUDA-graph timed as in
    gemm_child, next to F.linear."""
    import torch.nn.functional as F

    from sglab.srt.layers.skinny_gemm import skinny_gemm

    rows = []
    for model, layer, n, k in GEMM_SHAPES:
        ws = _rotating_weights(n, k)
        for m in GEMM_SWEEP_M:
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            cublas = _graph_time([lambda w=w: F.linear(x, w) for w in ws])
            bm = triton.next_power_of_2(m)
            for cfg in GEMM_SWEEP:
                cfg = {**cfg, "BLOCK_K": cfg["BLOCK_K"] // bm, "BLOCK_M": bm, "USE_DOT": False}
                t = _graph_time([lambda w=w: skinny_gemm(x, w, config=cfg) for w in ws])
                rows.append({"model": model, "layer": layer, "n": n, "k": k, "m": m,
                             "config": cfg, "skinny_us": t * 1e6, "cublas_us": cublas * 1e6,
                             "weight_gbps_skinny": 2 * n * k / t / 1e9})
        del ws
    return {"rows": rows}


def splitk_sweep_child() -> dict:
    """SPLITK_SWEEP at M in SPLITK_M for every decoder shape (KB_SPLITK_WIDE=1:
    SPLITK_SWEEP_WIDE, see there), CUDA-graph timed as in gemm_child, next to F.linear through
    cuBLASLt (fusion on's choice) and cuBLAS."""
    import torch.nn.functional as F

    from sglab.srt.layers.elementwise import silu_and_mul
    from sglab.srt.layers.splitk_gemm import splitk_gemm

    wide = os.environ.get("KB_SPLITK_WIDE") == "1"
    layouts = SPLITK_SWEEP_WIDE if wide else SPLITK_SWEEP
    ms = [int(v) for v in os.environ.get("KB_SPLITK_M", "32,64").split(",")] if wide \
        else SPLITK_M
    models = os.environ.get("KB_SPLITK_MODELS", "llama-3.1-8b").split(",") if wide else None
    layers = os.environ.get("KB_SPLITK_LAYERS", ",".join(GEMM_LAYERS)).split(",")
    rows = []
    for model, layer, n, k in GEMM_SHAPES:
        if models is not None and model not in models or layer not in layers:
            continue
        ws = _rotating_weights(n, k)
        silu = wide and layer == "gate_up"
        for m in ms:
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            blas = {}
            for lib in ("cublaslt", "cublas"):
                torch.backends.cuda.preferred_blas_library(lib)
                blas[lib] = _graph_time([lambda w=w: F.linear(x, w) for w in ws]) * 1e6
                if silu:
                    blas[lib + "_silu"] = _graph_time(
                        [lambda w=w: silu_and_mul(F.linear(x, w)) for w in ws]) * 1e6
            for cfg in layouts + (_built_in_layouts(n, k, m) if wide else []):
                rows.append(_splitk_row(model, layer, n, k, m, x, ws, cfg, blas, False))
                if silu:
                    rows.append(_splitk_row(model, layer + "+silu", n, k, m, x, ws, cfg,
                                            blas, True))
        del ws
    return {"rows": rows}


def _built_in_layouts(n: int, k: int, m: int) -> list[dict]:
    """The built-in tables' layouts for m rows (plain, SiLU out) not already swept, so a
    refined table only replaces an entry with a faster one."""
    from sglab.srt.layers import splitk_gemm as sk

    found = [sk._lookup(t, n, k, m, True) for t in (sk.SPLITK_TABLE, sk.SILU_OUT_TABLE)]
    out = []
    for cfg in found:
        if cfg is not None and cfg not in SPLITK_SWEEP_WIDE and cfg not in out:
            out.append(dict(cfg))
    return out


def _splitk_row(model, layer, n, k, m, x, ws, cfg, blas, silu_out) -> dict:
    import torch.nn.functional as F

    from sglab.srt.layers.elementwise import silu_and_mul
    from sglab.srt.layers.splitk_gemm import splitk_gemm

    suffix = "_silu" if silu_out else ""
    row = {"model": model, "layer": layer, "n": n, "k": k, "m": m, "config": cfg,
           "silu_out": silu_out, "cublaslt_us": blas["cublaslt" + suffix],
           "cublas_us": blas["cublas" + suffix]}
    try:
        t = _graph_time([lambda w=w: splitk_gemm(x, w, config=cfg, silu_out=silu_out)
                         for w in ws])
        want = F.linear(x, ws[-1])
        want = (silu_and_mul(want) if silu_out else want).float()
        err = (splitk_gemm(x, ws[-1], config=cfg, silu_out=silu_out).float() - want).abs().max()
        row.update(splitk_us=t * 1e6, max_abs_err=err.item(), weight_gbps=2 * n * k / t / 1e9)
    except Exception as e:  # a tile that does not fit shared memory
        row["error"] = repr(e)[:300]
    return row


def _rotating_weights(n: int, k: int) -> list[torch.Tensor]:
    """Enough [n, k] weight copies that a pass over them does not fit in L2, as in a decode
    step."""
    return [torch.randn(n, k, device="cuda", dtype=torch.bfloat16)
            for _ in range(max(1, -(-GEMM_ROTATE_BYTES // (2 * n * k))))]


def gemm_child() -> dict:
    import torch.nn.functional as F

    from sglab.srt.layers.skinny_gemm import skinny_gemm

    rows = []
    for model, layer, n, k in GEMM_SHAPES:
        ws = _rotating_weights(n, k)
        for m in GEMM_M:
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            t_skinny = _graph_time([lambda w=w: skinny_gemm(x, w) for w in ws])
            t_cublas = _graph_time([lambda w=w: F.linear(x, w) for w in ws])
            rows.append({"model": model, "layer": layer, "n": n, "k": k, "m": m,
                         "skinny_us": t_skinny * 1e6, "cublas_us": t_cublas * 1e6,
                         "weight_gbps_skinny": 2 * n * k / t_skinny / 1e9,
                         "weight_gbps_cublas": 2 * n * k / t_cublas / 1e9})
        del ws
    return {"rows": rows}


def _graph_time(calls: list, reps: int = 20) -> float:
    """GPU time of one call: all of `calls` captured in one CUDA graph, its replays timed with
    events and divided by the calls, so no host launch time is in it (a single launch between
    two events times the launch)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up: autotuning and cuBLAS workspaces, before capture
        for fn in calls:
            fn()
    torch.cuda.current_stream().wait_stream(side)
    passes = max(1, -(-16 // len(calls)))  # at least 16 calls per replay
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(passes):
            for fn in calls:
                fn()
    return _cuda_time(graph.replay, reps=reps) / (passes * len(calls))


def _cuda_time(fn, reps: int = 20, warmup: int = 3) -> float:
    times = []
    for i in range(warmup + reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        if i >= warmup:
            times.append(start.elapsed_time(end) / 1e3)
    return statistics.median(times)


DEFAULT_KNOBS = ("SGLAB_SKINNY_GEMM_MAX_M", "SGLAB_TRITON_PDL", "SGLAB_DECODE_SPLIT_WAVES",
                 "SGLAB_DECODE_FUSED_ROPE", "SGLAB_SPLITK_TABLE", "SGLAB_SPLITK_FOLD_MAX_M",
                 "SGLAB_SPLITK_SILU")


def _child(args: list[str], env: dict | None = None, unset=()) -> dict:
    child_env = {k: v for k, v in os.environ.items() if k not in unset}
    proc = subprocess.run([sys.executable, __file__, *args], capture_output=True, text=True,
                          env={**child_env, **(env or {})})
    if proc.returncode != 0:
        return {"error": proc.stderr[-3000:]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


KERNEL_PARTS = ("gemm", "gemm-sweep", "splitk-sweep", "attention", "attention-tune", "extend")


def run_all(presets: list[str], out_dir: str, commit: str | None, variants: list[str],
            parts: list[str]) -> dict:
    """Decode variants per preset, then the kernel parts; the results are rewritten after each
    child, so a run stopped at its time limit keeps what it measured."""
    report = {**provenance(commit), "bandwidth": measure_bandwidth(), "models": {}}
    for preset in presets:
        report["models"][preset] = {}
        for v, (fusion, env) in VARIANTS.items():
            if v not in variants:
                continue
            report["models"][preset][v] = _child(
                ["decode", "--preset", preset, "--fusion", fusion]
                + (["--prefill"] if v in PREFILL_VARIANTS else []),
                {"SGLAB_SKINNY_GEMM_MAX_M": "0", "SGLAB_TRITON_PDL": "0", **env}
                if env is not None else None, unset=DEFAULT_KNOBS if env is None else ())
            print(preset, v, json.dumps(report["models"][preset][v])[:600], flush=True)
            write_results(out_dir, "kernel_bench", report, to_markdown(report))
    for kind in parts:
        report[kind.replace("-", "_")] = _child([kind])
        write_results(out_dir, "kernel_bench", report, to_markdown(report))
    return report


def run_sweep(out_dir: str, commit: str | None, parts: list[str]) -> dict:
    """The kernels alone, without the decode models: GEMM table, GEMM sweep, attention."""
    report = {**provenance(commit), "bandwidth": measure_bandwidth(), "models": {}}
    for kind in parts:
        report[kind.replace("-", "_")] = _child([kind])
        print(kind, str(report[kind.replace("-", "_")])[:300], flush=True)
        write_results(out_dir, "kernel_sweep", report, to_markdown(report))
    if "rows" in report.get("splitk_sweep", {}):
        table = splitk_table(report["splitk_sweep"]["rows"],
                             refine=os.environ.get("KB_SPLITK_WIDE") == "1")
        with open(os.path.join(out_dir, "splitk_table.json"), "w") as f:
            json.dump(table, f, indent=1)
        print("splitk table", json.dumps(table), flush=True)
    return report


SPLITK_WIN = 0.97  # a layout enters the table when it takes at most this share of cuBLASLt's time


def splitk_table(rows: list[dict], refine: bool = False) -> dict:
    """The split-K sweep's tables for SGLAB_SPLITK_TABLE: per weight shape (gate_up's SiLU-out
    product as "NxK+silu") and measured M, the fastest layout and whether it beats cuBLASLt
    (+ the SiLU kernel) by SPLITK_WIN, for the rows from the measured M below (exclusive; the
    lowest measured M for the first) up to this one. refine (a sweep of some M only): the
    built-in tables' entries, each whose highest M was measured replaced by the sweep's."""
    from sglab.srt.layers import splitk_gemm as sk

    table: dict = {}
    for silu in (False, True):
        base = sk.SILU_OUT_TABLE if silu else sk.SPLITK_TABLE
        ok = [r for r in rows if "splitk_us" in r and bool(r.get("silu_out")) == silu]
        for n, k in sorted({(r["n"], r["k"]) for r in ok}):
            best = {}
            for m in {r["m"] for r in ok if (r["n"], r["k"]) == (n, k)}:
                b = min((r for r in ok if (r["n"], r["k"], r["m"]) == (n, k, m)),
                        key=lambda r: r["splitk_us"])
                best[m] = [b["config"], b["splitk_us"] <= SPLITK_WIN * b["cublaslt_us"]]
            if refine and (n, k) in base:
                entries = [[lo, hi, *best.get(hi, [cfg, wins])]
                           for lo, hi, cfg, wins in base[n, k]]
            else:
                bounds = sorted(best)
                entries = [[lo + 1 if i else m, m, *best[m]]
                           for i, (lo, m) in enumerate(zip([0] + bounds, bounds))]
            table[f"{n}x{k}" + (sk.SILU_SUFFIX if silu else "")] = entries
    return table


def to_markdown(report: dict) -> str:
    bw = report["bandwidth"]["bandwidth_gbps"]
    lines = [provenance_line(report), f"Measured device copy bandwidth: {bw:.0f} GB/s", "",
             "Decode: GPU time of one CUDA-graph replay (and the host time of its launch with "
             "the GPU idle), per replay back to back (the next launch queued), and the sum of "
             "its kernels' device time; variants in kernel_bench.VARIANTS (on: every matmul "
             "through cuBLASLt; -cublas: through cuBLAS; -m1 / -m16: the small-M GEMM up to "
             "1 / 16 rows; -pdl: SGLAB_TRITON_PDL=1); ref: off, or the first variant run:", "",
             "| model | bs | variant | replay GPU (µs) | / ref | / roofline | kernels | "
             "launch (µs) | back to back (µs) | / roofline | kernel sum (µs) |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for preset, m in report["models"].items():
        ok = [v for v in m if "decode" in m[v]]
        if not ok:
            lines.append(f"| {preset} | error | | | | | | |")
            continue
        ref = "off" if "off" in ok else ok[0]  # the "/ off" column is against this variant
        roof = m[ref]["weight_bytes"] / (bw * 1e9) * 1e6
        for i, base in enumerate(m[ref]["decode"]):
            for v, r in m.items():
                if "error" in r:
                    lines.append(f"| {preset} | {base['bs']} | {v} | error | | | | |")
                    continue
                d = r["decode"][i]
                t = d["graph_gpu_us"]
                b2b = d.get("back_to_back_us")
                lines.append(f"| {preset} | {d['bs']} | {v} | {t:.0f} | "
                             f"{t / base['graph_gpu_us']:.3f} | {t / roof:.2f} | "
                             f"{d['kernels']['count']} | {d['graph_launch_idle_us']:.0f} | "
                             + (f"{b2b:.0f} | {b2b / roof:.2f} | {d['kernel_sum_us']:.0f} |"
                                if b2b is not None else "| | |"))
    lines += _gemm_lines(report, bw) + _gemm_sweep_lines(report, bw) + _splitk_lines(report, bw)
    lines += _top_kernel_lines(report)
    lines += _prefill_lines(report) + _attention_lines(report, bw) + _attention_tune_lines(report, bw)
    lines += _extend_lines(report)
    return "\n".join(lines) + "\n"


def _top_kernel_lines(report: dict, top: int = 8) -> list[str]:
    """Per model, variant and batch size: the kernels with the most device time in a replay."""
    lines = ["", "Where a replay's device time goes (profiler, one replay; name: µs / launches):",
             ""]
    for preset, m in report["models"].items():
        for v in m:
            for d in m[v].get("decode", []):
                rows = d["kernels"].get("device_us_by_name", [])[:top]
                items = "; ".join(f"`{n[:48]}` {t:.0f} / {c}" for n, t, c in rows)
                lines.append(f"- {preset} {v} bs {d['bs']}: {items}")
    return lines


def _gemm_lines(report: dict, bw: float) -> list[str]:
    g = report.get("gemm", {})
    if "rows" not in g:
        return ["", f"GEMM: {g.get('error', 'not run')[-300:]}"]
    lines = ["", "Decoder matmuls alone, bf16 (GPU µs; weight bytes per second as a share of the "
             "copy bandwidth):", "", "| model | layer | N x K | M | skinny (µs) | F.linear (µs) "
             "| skinny / F.linear | skinny BW | F.linear BW |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in g["rows"]:
        lines.append(f"| {r['model']} | {r['layer']} | {r['n']} x {r['k']} | {r['m']} | "
                     f"{r['skinny_us']:.1f} | {r['cublas_us']:.1f} | "
                     f"{r['skinny_us'] / r['cublas_us']:.2f} | "
                     f"{r['weight_gbps_skinny'] / bw:.0%} | {r['weight_gbps_cublas'] / bw:.0%} |")
    return lines


def _gemm_sweep_lines(report: dict, bw: float) -> list[str]:
    g = report.get("gemm_sweep", {})
    if "rows" not in g:
        return ["", f"GEMM sweep: {g.get('error', 'not run')[-300:]}"] if g else []
    lines = ["", "Small-M GEMM layouts (FMA tiles) swept: per shape and M the best layout next to "
             "the default one and F.linear:", "", "| model | layer | M | best: BLOCK_N / BLOCK_K "
             "/ warps / deferred | best (µs) | best BW | default (µs) | F.linear (µs) | best / "
             "F.linear |", "|---|---|---|---|---|---|---|---|---|"]
    keys = sorted({(r["model"], r["layer"], r["m"]) for r in g["rows"]},
                  key=lambda t: (t[0], GEMM_LAYERS.index(t[1]), t[2]))
    for model, layer, m in keys:
        rows = [r for r in g["rows"] if (r["model"], r["layer"], r["m"]) == (model, layer, m)]
        best = min(rows, key=lambda r: r["skinny_us"])
        c = best["config"]
        default = next((r["skinny_us"] for r in rows
                        if _is_default(r["config"], m, r["k"])), None)
        lines.append(f"| {model} | {layer} | {m} | {c['BLOCK_N']} / {c['BLOCK_K']} / "
                     f"{c['num_warps']} / {c['DEFER_REDUCE']} | {best['skinny_us']:.1f} | "
                     f"{best['weight_gbps_skinny'] / bw:.0%} | "
                     f"{'-' if default is None else f'{default:.1f}'} | "
                     f"{best['cublas_us']:.1f} | {best['skinny_us'] / best['cublas_us']:.2f} |")
    return lines


def _splitk_lines(report: dict, bw: float) -> list[str]:
    g = report.get("splitk_sweep", {})
    if "rows" not in g:
        return ["", f"Split-K sweep: {g.get('error', 'not run')[-300:]}"] if g else []
    lines = ["", "Split-K GEMM (splitk_gemm) swept: per shape and M the fastest layout next to "
             "F.linear through cuBLASLt and cuBLAS (weight bytes per second against the copy "
             "bandwidth; gate_up+silu: SiLU out, against F.linear + the SiLU kernel):", "",
             "| model | layer | M | best: BLOCK_N / BLOCK_K / SPLIT_K | "
             "best (µs) | BW | cuBLASLt (µs) | BW | cuBLAS (µs) | best / cuBLASLt | max err |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    ok = [r for r in g["rows"] if "splitk_us" in r]
    keys = sorted({(r["model"], r["layer"], r["m"]) for r in ok},
                  key=lambda t: (t[0], GEMM_LAYERS.index(t[1].split("+")[0]), t[1], t[2]))
    for model, layer, m in keys:
        rows = [r for r in ok if (r["model"], r["layer"], r["m"]) == (model, layer, m)]
        best = min(rows, key=lambda r: r["splitk_us"])
        c, wb = best["config"], 2 * best["n"] * best["k"] / 1e9
        lines.append(f"| {model} | {layer} | {m} | {_layout_name(c)} | "
                     f"{best['splitk_us']:.1f} | "
                     f"{best['weight_gbps'] / bw:.0%} | {best['cublaslt_us']:.1f} | "
                     f"{wb / best['cublaslt_us'] * 1e6 / bw:.0%} | {best['cublas_us']:.1f} | "
                     f"{best['splitk_us'] / best['cublaslt_us']:.2f} | "
                     f"{max(r['max_abs_err'] for r in rows):.3g} |")
    lines += _failures(g["rows"], "swept layouts")
    return lines


def _layout_name(c: dict) -> str:
    extra = [f"{c['num_warps']}w" if c.get("num_warps", 4) != 4 else "",
             f"{c['num_stages']}st" if c.get("num_stages", 4) != 4 else "",
             "TMA" if c.get("TMA") else ""]
    return " / ".join(str(c[key]) for key in ("BLOCK_N", "BLOCK_K", "SPLIT_K")) + \
        "".join(f" {e}" for e in extra if e)


def _failures(rows: list[dict], what: str) -> list[str]:
    """A line counting the rows that did not launch, with the first one's error."""
    failed = [r for r in rows if "error" in r]
    if not failed:
        return []
    return [f"\n{len(failed)} {what} did not launch (e.g. {failed[0]['error'][:120]})."]


GEMM_LAYERS = ("qkv", "o", "gate_up", "down")


def _is_default(cfg: dict, m: int, k: int) -> bool:
    from sglab.srt.layers.skinny_gemm import _config
    d = _config(m, k, True)
    return all(cfg[key] == d[key] for key in ("BLOCK_N", "BLOCK_K", "num_warps", "DEFER_REDUCE"))


def _prefill_lines(report: dict) -> list[str]:
    m = report["models"].get(PREFILL_PRESET, {})
    runs = [f for f in PREFILL_VARIANTS if "prefill" in m.get(f, {})]
    if not runs:
        return []
    lines = ["", f"Prefill, {PREFILL_PRESET}, one prompt of {PREFILL_LEN} new tokens (best of 3):",
             "", "| variant | chunks | latency (ms) | TFLOP/s | MFU | bf16 matmul peak (TFLOP/s) |",
             "|---|---|---|---|---|---|"]
    for f in runs:
        p = m[f]["prefill"]
        lines.append(f"| {f} | {len(p['prefill_chunk_latencies_s'])} | "
                     f"{p['prefill_latency_s'] * 1e3:.1f} | {p['prefill_tflops']:.0f} | "
                     f"{p['prefill_mfu']:.1%} | {p['peak_tflops']:.0f} |")
    for f in runs:
        top = m[f]["prefill"].get("kernels_top")
        if top:
            lines += ["", f"Where a prefill's device time goes ({f}; name: µs / launches): "
                      + "; ".join(f"`{n[:48]}` {t:.0f} / {c}" for n, t, c in top)]
    return lines


def _attention_tune_lines(report: dict, bw: float) -> list[str]:
    g = report.get("attention_tune", {})
    if "rows" not in g:
        return ["", f"Attention tuning: {g.get('error', 'not run')[-300:]}"] if g else []
    lines = ["", "Decode attention with the q/k norm + RoPE and the K/V write (one launch, the "
             "serving splits): the default launch and the fastest of warps x keys per tile x "
             "stages (KV read per second against the copy bandwidth):", "",
             "| model | bs x context | default (µs) | BW | best (µs) | BW | warps / tile / "
             "stages / max splits | best / default |", "|---|---|---|---|---|---|---|---|"]
    ok = [r for r in g["rows"] if "median_s" in r]
    for model, bs, ctx in sorted({(r["model"], r["bs"], r["context"]) for r in ok}):
        rows = [r for r in ok if (r["model"], r["bs"], r["context"]) == (model, bs, ctx)]
        base = next((r for r in rows if r["num_warps"] is None), None)
        best = min(rows, key=lambda r: r["median_s"])
        if base is None:
            continue
        lines.append(f"| {model} | {bs} x {ctx} | {base['median_s'] * 1e6:.1f} | "
                     f"{base['kv_read_gbps'] / bw:.0%} | {best['median_s'] * 1e6:.1f} | "
                     f"{best['kv_read_gbps'] / bw:.0%} | {best['num_warps']} / "
                     f"{best['block_n']} / {best['num_stages']} / {best['max_kv_splits']} | "
                     f"{best['median_s'] / base['median_s']:.2f} |")
    lines += _failures(g["rows"], "configurations")
    return lines


def _extend_lines(report: dict) -> list[str]:
    ext = report.get("extend")
    if not ext:
        return []
    if "rows" not in ext:
        return ["", f"Prefill attention: {ext.get('error', '')[-300:]}"]
    ok = sorted((r for r in ext["rows"] if "median_s" in r), key=lambda r: r["median_s"])
    default = next((r for r in ok if r["default"]), None)
    lines = ["", f"Prefill attention alone: one causal prompt of {ext['tokens']} tokens, heads "
             f"{ext['heads']}, {ext['flops'] / 1e12:.2f} TFLOP (one layer); of the bf16 "
             f"matmul peak ({ext['peak_tflops']:.0f} TFLOP/s). Default and the five fastest "
             "(BLOCK_M, BLOCK_N, warps, stages):", "", "| config | ms | TFLOP/s | of peak |",
             "|---|---|---|---|"]
    for r in ([default] if default else []) + [r for r in ok if not r["default"]][:5]:
        name = "default" if r["default"] else " / ".join(map(str, r["config"]))
        lines.append(f"| {name} | {r['median_s'] * 1e3:.2f} | {r['tflops']:.0f} | "
                     f"{r['of_peak']:.0%} |")
    return lines


def _attention_lines(report: dict, bw: float) -> list[str]:
    att = report.get("attention", {})
    if "rows" not in att:
        return ["", f"Decode attention: {att.get('error', 'not run')[-300:]}"]
    rows = [r for r in att["rows"] if "median_s" in r]
    lines = ["", "Decode attention alone (bf16, CUDA-graph replays over L2-missing KV copies): "
             "GPU µs and KV bytes read per second against the copy bandwidth. serving: splits "
             f"bounded by the batch size ({att.get('split_programs')} programs), the default "
             "tile; fixed: up to 16 splits at every batch size, the default tile; best: the "
             "sweep's fastest (max splits / BLOCK_N / stages), one launch:", "",
             "| model | bs x context | serving | two stages | fixed | serving / fixed | best "
             "| best config | serving BW | best BW |", "|---" * 10 + "|"]
    for model in dict.fromkeys(r.get("model") for r in rows):
        for shape in dict.fromkeys((r["bs"], r["context"]) for r in rows if r["model"] == model):
            pick = [r for r in rows if r["model"] == model and (r["bs"], r["context"]) == shape]
            by = {(r["config"], r["one_launch"]): r for r in pick if r["config"] != "sweep"}
            sweep = sorted((r for r in pick if r["config"] == "sweep"),
                           key=lambda r: r["median_s"])
            serve, two, fixed = (by.get(k) for k in (("serving", True), ("serving", False),
                                                    ("fixed", True)))
            if not (serve and two and fixed):
                continue
            us = lambda r: f"{r['median_s'] * 1e6:.1f}"  # noqa: E731
            best = (f"{us(sweep[0])} | {sweep[0]['max_kv_splits']} / {sweep[0]['block_n']} / "
                    f"{sweep[0]['num_stages']}" if sweep else "- | -")
            best_bw = f"{sweep[0]['kv_read_gbps'] / bw:.0%}" if sweep else "-"
            lines.append(
                f"| {model} | {shape[0]} x {shape[1]} | {us(serve)} (≤{serve['max_kv_splits']}) "
                f"| {us(two)} | {us(fixed)} | {serve['median_s'] / fixed['median_s']:.2f} | "
                f"{best} | {serve['kv_read_gbps'] / bw:.0%} | {best_bw} |")
    lines += _failures(att["rows"], "swept configurations")
    return lines


def main() -> None:
    parser = bench_parser(["all", "sweep", "decode", "gemm", "gemm-sweep", "splitk-sweep",
                           "attention", "attention-tune", "extend"])
    parser.add_argument("--fusion", choices=FUSION, default="off")
    parser.add_argument("--prefill", action="store_true", help="decode: the 8k prefill too")
    parser.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=list(VARIANTS),
                        help="all: the decode variants")
    parser.add_argument("--parts", nargs="*", choices=KERNEL_PARTS, default=list(KERNEL_PARTS),
                        help="all: the kernel benchmarks after the decode variants; sweep: "
                        "the kernel benchmarks")
    args = parser.parse_args()
    if args.kind == "all":
        run_all(args.presets, args.out, args.commit, args.variants, args.parts)
        return
    if args.kind == "sweep":
        run_sweep(args.out, args.commit, args.parts)
        return
    child = {"decode": lambda: decode_child(args.preset, args.fusion, args.prefill),
             "gemm": gemm_child, "gemm-sweep": gemm_sweep_child,
             "splitk-sweep": splitk_sweep_child, "attention-tune": attention_tune_child,
             "attention": attention_child, "extend": extend_child}[args.kind]
    result = child()
    print(json.dumps(result))


if __name__ == "__main__":
    main()
