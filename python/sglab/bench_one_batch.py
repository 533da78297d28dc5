"""Static latency of one batch: prefill, then decode steps, per batch size.

    python -m sglab.bench_one_batch --model-path DIR --load-format dummy \\
        --batch-size 1 8 64 --input-len 256 --output-len 32

Runs the scheduler in-process (no HTTP, no overlap), so a step's time is the host scheduling
plus the device forward of that step.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import time

import numpy as np
import torch

from sglab.srt.managers.io_struct import TokenizedGenerateReqInput
from sglab.srt.managers.scheduler import Scheduler
from sglab.srt.sampling.sampling_params import SamplingParams
from sglab.srt.server_args import ServerArgs


@dataclasses.dataclass
class BatchLatency:
    batch_size: int
    input_len: int
    output_len: int
    prefill_latency_s: float
    median_decode_latency_s: float
    prefill_throughput: float
    decode_throughput: float
    total_latency_s: float


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def run_one(scheduler: Scheduler, batch_size: int, input_len: int, output_len: int,
            seed: int = 0) -> BatchLatency:
    rng = np.random.default_rng(seed)
    vocab = scheduler.model_config.vocab_size
    for i in range(batch_size):
        params = SamplingParams(max_new_tokens=output_len, temperature=0, ignore_eos=True)
        params.normalize(None)
        ids = rng.integers(0, vocab, input_len).tolist()
        scheduler.handle_generate_request(TokenizedGenerateReqInput(
            rid=f"bench-{seed}-{i}", input_text=None, input_ids=ids, sampling_params=params))
    device = scheduler.server_args.device
    step_times = []
    _sync(device)
    start = time.perf_counter()
    while True:
        tic = time.perf_counter()
        if not scheduler.run_step_normal():
            break
        _sync(device)
        step_times.append(time.perf_counter() - tic)
    total = time.perf_counter() - start
    scheduler.outputs.clear()
    scheduler.flush_cache()
    prefill, decode = step_times[0], step_times[1:] or [float("nan")]
    median_decode = statistics.median(decode)
    return BatchLatency(batch_size, input_len, output_len, prefill, median_decode,
                        batch_size * input_len / prefill, batch_size / median_decode, total)


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(prog="python -m sglab.bench_one_batch")
    ServerArgs.add_cli_args(parser)
    parser.add_argument("--batch-size", type=int, nargs="+", default=[1])
    parser.add_argument("--input-len", type=int, default=256)
    parser.add_argument("--output-len", type=int, default=32)
    parser.add_argument("--result-file", type=str, default=None)
    args = parser.parse_args(argv)
    server_args = ServerArgs.from_cli_args(args)
    server_args.disable_overlap_schedule = True
    scheduler = Scheduler(server_args)
    run_one(scheduler, 1, 16, 4, seed=12345)  # warmup: compilation, allocator, graphs
    results = []
    for bs in args.batch_size:
        r = run_one(scheduler, bs, args.input_len, args.output_len)
        print(f"batch {bs}: prefill {r.prefill_latency_s * 1e3:.2f} ms "
              f"({r.prefill_throughput:.0f} tok/s), median decode "
              f"{r.median_decode_latency_s * 1e3:.3f} ms ({r.decode_throughput:.0f} tok/s)")
        results.append(dataclasses.asdict(r))
    if args.result_file:
        with open(args.result_file, "a") as f:
            for r in results:
                f.write(json.dumps(r) + "\n")
    return results


if __name__ == "__main__":
    main()
