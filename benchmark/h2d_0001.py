"""Patch 0001 on the GPU, off vs the PR vs sglab's packed mode, in the real decode loop.

    python benchmark/h2d_0001.py --out DIR [--presets qwen3-0.6b llama-3.1-8b] [--bs 1 4 32]

Per preset, batch size and upload mode (pageable = patch off, pinned = the PR, packed = one
staging copy per step), with overlap scheduling and CUDA graphs on:
* host microseconds per `ForwardBatch.init_new` over steady decode steps (median, p90);
* the host time of `init_new` right after ~50 ms of GPU work was queued with
  `torch.cuda._sleep`: does the host block behind the stream (pageable copies may)?
* the profiler's host-to-device memcpy kinds per decode step
  (`Memcpy HtoD (Pageable -> Device)` vs `(Pinned -> Device)`).
Writes DIR/h2d_0001.json and DIR/h2d_0001.md.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from collections import Counter

import torch

sys.path.insert(0, os.path.dirname(__file__))
from gpu_bench import _scheduler, _submit, write_results  # noqa: E402

from sglab.srt.model_executor.forward_batch_info import ForwardBatch  # noqa: E402
from sglab.srt.utils.h2d import H2D_MODES, StepUploader  # noqa: E402
from sglab.srt.utils.provenance import (  # noqa: E402
    add_provenance_args,
    provenance,
    provenance_line,
)

INPUT_LEN, DECODE_STEPS, WARMUP_STEPS = 128, 120, 20
SLEEP_MS = 50.0


class InitNewTimer:
    """Wraps ForwardBatch.init_new: host time of every decode call; optionally queue GPU work
    right before one call."""

    def __init__(self):
        self.original = ForwardBatch.__dict__["init_new"].__func__
        self.decode_us: list[float] = []
        self.sleep_cycles = 0  # > 0: the next decode call first queues this much GPU sleep
        self.after_sleep_us: list[float] = []

    def __enter__(self) -> "InitNewTimer":
        timer = self

        def init_new(cls, batch, model_runner):
            sleep, timer.sleep_cycles = timer.sleep_cycles, 0
            if sleep and batch.forward_mode.is_decode():
                torch.cuda._sleep(sleep)
            tic = time.perf_counter()
            out = timer.original(cls, batch, model_runner)
            us = (time.perf_counter() - tic) * 1e6
            if batch.forward_mode.is_decode():
                (timer.after_sleep_us if sleep else timer.decode_us).append(us)
            return out

        ForwardBatch.init_new = classmethod(init_new)
        return self

    def __exit__(self, *exc) -> None:
        ForwardBatch.init_new = classmethod(self.original)


def sleep_cycles_per_ms() -> float:
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    cycles = 20_000_000
    torch.cuda._sleep(1000)  # warm
    start.record()
    torch.cuda._sleep(cycles)
    end.record()
    end.synchronize()
    return cycles / start.elapsed_time(end)


def memcpy_kinds(sched, steps: int) -> dict:
    """HtoD memcpy kinds per decode step over `steps` scheduler steps."""
    from torch.profiler import ProfilerActivity, profile

    cuda = torch.cuda.is_available()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities) as prof:
        for _ in range(steps):
            sched.run_step()
        if cuda:
            torch.cuda.synchronize()
    kinds = Counter(e.name for e in prof.events() if e.name.startswith("Memcpy HtoD"))
    return {k: v / steps for k, v in kinds.items()}


def measure(sched, mode: str, bs: int, cycles_per_ms: float) -> dict:
    runner = sched.tp_worker.model_runner
    runner.h2d_uploader = StepUploader(runner.device, mode)
    _submit(sched, bs, INPUT_LEN, WARMUP_STEPS + DECODE_STEPS + 40, f"{mode}-{bs}-{time.time()}")
    with InitNewTimer() as timer:
        for _ in range(WARMUP_STEPS):
            sched.run_step()
        timer.decode_us.clear()
        for i in range(DECODE_STEPS):
            if i % 30 == 15 and cycles_per_ms:  # a few probes of the host-blocking question
                timer.sleep_cycles = int(SLEEP_MS * cycles_per_ms)
            sched.run_step()
        kinds = memcpy_kinds(sched, 10)
    while sched.run_step():
        pass
    sched.outputs.clear()
    sched.flush_cache()
    us = sorted(timer.decode_us)
    return {"mode": mode, "bs": bs, "init_new_us_median": statistics.median(us),
            "init_new_us_p90": us[int(0.9 * (len(us) - 1))], "samples": len(us),
            "init_new_us_after_50ms_queued": timer.after_sleep_us,
            "memcpy_htod_per_step": kinds}


def run_preset(preset: str, batch_sizes: list[int], cycles_per_ms: float) -> list[dict]:
    sched = _scheduler(preset, cuda_graph_max_bs=max(batch_sizes), max_total_tokens=1 << 17)
    sched.enable_overlap = True
    rows = []
    for bs in batch_sizes:
        for mode in H2D_MODES:
            row = {"preset": preset, **measure(sched, mode, bs, cycles_per_ms)}
            print(json.dumps(row), flush=True)
            rows.append(row)
    del sched
    torch.cuda.empty_cache()
    return rows


def to_markdown(rows: list[dict], meta: dict) -> str:
    lines = ["# Patch 0001: host cost of the per-step uploads, off vs PR vs packed", "",
             provenance_line(meta["provenance"]), "",
             "Decode with overlap and CUDA graphs; `python benchmark/h2d_0001.py`; the "
             "after-50-ms column is each probe's init_new time right after ~50 ms of GPU work "
             "was queued (a host that blocks behind the stream shows ~50000).", "",
             "| preset | bs | mode | init_new µs (median) | p90 | init_new µs after 50 ms "
             "queued | HtoD pageable / pinned per step |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        k = r["memcpy_htod_per_step"]
        pageable = sum(v for n, v in k.items() if "Pageable" in n)
        pinned = sum(v for n, v in k.items() if "Pinned" in n)
        after = ", ".join(f"{x:.0f}" for x in r["init_new_us_after_50ms_queued"])
        lines.append(f"| {r['preset']} | {r['bs']} | {r['mode']} | "
                     f"{r['init_new_us_median']:.1f} | {r['init_new_us_p90']:.1f} | {after} | "
                     f"{pageable:.1f} / {pinned:.1f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--presets", nargs="+", default=["qwen3-0.6b", "llama-3.1-8b"])
    parser.add_argument("--bs", type=int, nargs="+", default=[1, 4, 32])
    add_provenance_args(parser)
    args = parser.parse_args()
    cycles = sleep_cycles_per_ms() if torch.cuda.is_available() else 0.0  # CPU: a smoke run
    rows = [r for p in args.presets for r in run_preset(p, args.bs, cycles)]
    meta = {"provenance": provenance(args.commit), "sleep_cycles_per_ms": cycles}
    write_results(args.out, "h2d_0001", {"meta": meta, "rows": rows}, to_markdown(rows, meta))


if __name__ == "__main__":
    main()
