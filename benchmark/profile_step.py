"""Where a scheduler step's time goes: host (Python, op dispatch) vs device (kernels).

    python benchmark/profile_step.py --preset qwen3-0.6b --batch-size 1 [--overlap]

Runs the in-process scheduler on a dummy model, then profiles a prefill step and a window of
decode steps with torch.profiler (CPU + CUDA) and cProfile. Prints per-step wall time, device
kernel time per step, the top host ops by self time and the top Python functions.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import os
import pstats
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(__file__))
from gpu_bench import _scheduler, _submit, _time_steps  # noqa: E402

from sglab.srt.utils.provenance import add_provenance_args, provenance, provenance_line


def _kernel_us(prof) -> float:
    from torch.autograd import DeviceType

    return sum(e.time_range.end - e.time_range.start for e in prof.events()
               if e.device_type == DeviceType.CUDA)


def _profile_steps(sched, steps: int, label: str) -> None:
    torch.cuda.synchronize()
    acts = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
    tic = time.perf_counter()
    with torch.profiler.profile(activities=acts) as prof:
        for _ in range(steps):
            sched.run_step()
        torch.cuda.synchronize()
    wall = (time.perf_counter() - tic) / steps
    print(f"== {label}: {steps} steps, wall {wall * 1e3:.3f} ms/step (profiled), "
          f"kernels {_kernel_us(prof) / steps / 1e3:.3f} ms/step")
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25))


def _cprofile_steps(sched, steps: int, label: str) -> None:
    torch.cuda.synchronize()
    pr = cProfile.Profile()
    tic = time.perf_counter()
    pr.enable()
    for _ in range(steps):
        sched.run_step()
    torch.cuda.synchronize()
    pr.disable()
    wall = (time.perf_counter() - tic) / steps
    buf = io.StringIO()
    pstats.Stats(pr, stream=buf).sort_stats("cumulative").print_stats(40)
    print(f"== {label} cProfile: {wall * 1e3:.3f} ms/step\n{buf.getvalue()[-9000:]}")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--preset", default="qwen3-0.6b")
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--input-len", type=int, default=256)
    parser.add_argument("--overlap", action="store_true")
    parser.add_argument("--steps", type=int, default=30)
    add_provenance_args(parser)
    args = parser.parse_args()
    print(f"== {provenance_line(provenance(args.commit))}")
    sched = _scheduler(args.preset, disable_overlap_schedule=not args.overlap)
    _submit(sched, args.batch_size, 16, 8, "warm")
    while sched.run_step():
        pass
    _submit(sched, args.batch_size, args.input_len, 1000, "prof")
    acts = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
    torch.cuda.synchronize()
    tic = time.perf_counter()
    with torch.profiler.profile(activities=acts) as prof:
        sched.run_step()
        torch.cuda.synchronize()
    print(f"== prefill step: wall {(time.perf_counter() - tic) * 1e3:.2f} ms, kernels "
          f"{_kernel_us(prof) / 1e3:.3f} ms")
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15))
    for _ in range(10):
        sched.run_step()
    print(f"== unprofiled decode: {_time_steps(sched, args.steps) * 1e3:.3f} ms/step")
    _profile_steps(sched, args.steps, "decode")
    _cprofile_steps(sched, args.steps, "decode")


if __name__ == "__main__":
    main()
