"""Time per call of TritonAttnBackend._forward_extend_unified for each index build (patch 0002).

    python benchmark/bench_unified_extend.py --preset qwen3-0.6b --batch-size 32 \\
        --prefix-len 1024 --extend-len 64 --out DIR

Deterministic inference (the path that uses the unified kernel), in-process scheduler, one
shared prefix already in the radix cache, then rounds of `batch-size` requests that each extend
it by fresh tokens. Every call is timed from a synchronized start to a synchronized end, so the
host reads of the pre-PR build (`loop`) count in full. The three builds alternate round by round
on the same engine and batch shapes. Writes DIR/unified_extend.{json,md}.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(__file__))
from gpu_bench import _drain, _scheduler, _submit_ids, write_results  # noqa: E402

from sglab.srt.utils.provenance import add_provenance_args, provenance, provenance_line

MODES = ["loop", "batched", "kernel"]


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--preset", default="qwen3-0.6b")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--prefix-len", type=int, default=1024)
    parser.add_argument("--extend-len", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--out", default=".")
    add_provenance_args(parser)
    args = parser.parse_args()
    sched = _scheduler(args.preset, attention_backend="triton",
                       enable_deterministic_inference=True, disable_overlap_schedule=True,
                       disable_cuda_graph=True)
    backend = sched.tp_worker.model_runner.attn_backend
    timings: dict[str, list[float]] = {m: [] for m in MODES}
    step_times: dict[str, list[float]] = {m: [] for m in MODES}
    mode = {"now": MODES[0]}
    original = backend._forward_extend_unified

    def timed(*a, **kw):
        _sync()
        tic = time.perf_counter()
        original(*a, **kw)
        _sync()
        timings[mode["now"]].append(time.perf_counter() - tic)

    rng = np.random.default_rng(0)
    vocab = sched.model_config.vocab_size
    prefix = rng.integers(0, vocab, args.prefix_len).tolist()
    _submit_ids(sched, [prefix], 1, "prefix")
    _drain(sched)
    backend._forward_extend_unified = timed
    for rnd in range(args.rounds + 1):  # round 0 warms every mode up and is dropped
        for m in MODES:
            mode["now"] = m
            backend._build_unified = getattr(backend, f"_build_unified_{m}")
            n_before = len(timings[m])
            prompts = [prefix + rng.integers(0, vocab, args.extend_len).tolist()
                       for _ in range(args.batch_size)]
            _submit_ids(sched, prompts, 1, f"r{rnd}-{m}")
            _sync()
            tic = time.perf_counter()
            _drain(sched)
            if rnd == 0:
                del timings[m][n_before:]
            else:
                step_times[m].append(time.perf_counter() - tic)
    report = {**provenance(args.commit), "preset": args.preset, "batch_size": args.batch_size,
              "prefix_len": args.prefix_len, "extend_len": args.extend_len,
              "rounds": args.rounds, "layers": sched.model_config.num_hidden_layers,
              "modes": {}}
    for m in MODES:
        t = timings[m]
        report["modes"][m] = {"calls": len(t), "median_us": statistics.median(t) * 1e6,
                              "mean_us": statistics.fmean(t) * 1e6,
                              "prefill_round_ms": statistics.median(step_times[m]) * 1e3}
    write_results(args.out, "unified_extend", report, _markdown(report))


def _markdown(r: dict) -> str:
    base = r["modes"]["loop"]["median_us"]
    lines = [provenance_line(r),
             f"{r['preset']}, deterministic inference, {r['batch_size']} requests x "
             f"(prefix {r['prefix_len']} cached + {r['extend_len']} new tokens), "
             f"{r['rounds']} rounds", "",
             "| index build | calls | median us/call | mean us/call | ratio vs loop | "
             "prefill round (ms) |", "|---|---|---|---|---|---|"]
    for m, v in r["modes"].items():
        lines.append(f"| {m} | {v['calls']} | {v['median_us']:.0f} | {v['mean_us']:.0f} | "
                     f"{v['median_us'] / base:.3f} | {v['prefill_round_ms']:.2f} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
