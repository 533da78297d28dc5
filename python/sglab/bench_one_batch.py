"""Static latency of one batch: prefill, then decode steps, per batch size.

    python -m sglab.bench_one_batch --model-path DIR --load-format dummy \\
        --batch-size 1 8 64 --input-len 256 --output-len 32

Runs the scheduler in-process (no HTTP, no overlap), so a step's time is the host scheduling
plus the device forward of that step. A prefill larger than --chunked-prefill-size runs as
several steps: the prefill latency is their sum, each chunk is reported, and the prefill's model
FLOPs utilisation is its model FLOPs / latency / the measured dense matmul peak of the device.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import time

import numpy as np
import torch

from sglab.srt.configs.model_config import ModelConfig
from sglab.srt.managers.io_struct import TokenizedGenerateReqInput
from sglab.srt.managers.scheduler import Scheduler
from sglab.srt.sampling.sampling_params import SamplingParams
from sglab.srt.server_args import ServerArgs


@dataclasses.dataclass
class BatchLatency:
    batch_size: int
    input_len: int
    output_len: int
    prefill_latency_s: float  # every prefill chunk
    median_decode_latency_s: float
    prefill_throughput: float
    decode_throughput: float
    total_latency_s: float
    prefill_chunk_latencies_s: list[float] = dataclasses.field(default_factory=list)
    prefill_flops: float | None = None  # model FLOPs (None: a hybrid model)
    prefill_tflops: float | None = None
    prefill_mfu: float | None = None  # of `peak_tflops`
    peak_tflops: float | None = None


def prefill_flops(mc: ModelConfig, batch_size: int, input_len: int) -> float | None:
    """Model FLOPs of prefilling `batch_size` prompts of `input_len` new tokens: the linear
    layers (2 per weight per token), causal attention (q k^T and p v: 4 * heads * head_dim per
    visible key, token i seeing i keys) and the logits of each prompt's last token. None for a
    hybrid model (its linear-attention layers are not counted here)."""
    if mc.hybrid is not None:
        return None
    h, inter = mc.hidden_size, mc.hf_text_config.intermediate_size
    q, kv = mc.num_attention_heads * mc.head_dim, mc.num_key_value_heads * mc.head_dim
    layer_weights = h * (q + 2 * kv) + q * h + 3 * h * inter
    tokens = batch_size * input_len
    linear = 2 * layer_weights * mc.num_hidden_layers * tokens
    keys_seen = batch_size * input_len * (input_len + 1) // 2
    attention = 4 * q * mc.num_hidden_layers * keys_seen
    return float(linear + attention + 2 * h * mc.vocab_size * batch_size)


def measure_matmul_tflops(device: str, dtype: torch.dtype, n: int | None = None) -> float:
    """Dense n x n x n matmul rate at `dtype` (median of 10 after 3 warm-ups), in TFLOP/s."""
    n = n or (8192 if device == "cuda" else 512)
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    times = []
    for i in range(13):
        _sync(device)
        tic = time.perf_counter()
        torch.matmul(a, b)
        _sync(device)
        if i >= 3:
            times.append(time.perf_counter() - tic)
    return 2 * n ** 3 / statistics.median(times) / 1e12


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def run_one(scheduler: Scheduler, batch_size: int, input_len: int, output_len: int,
            seed: int = 0, peak_tflops: float | None = None) -> BatchLatency:
    rng = np.random.default_rng(seed)
    vocab = scheduler.model_config.vocab_size
    for i in range(batch_size):
        params = SamplingParams(max_new_tokens=output_len, temperature=0, ignore_eos=True)
        params.normalize(None)
        ids = rng.integers(0, vocab, input_len).tolist()
        scheduler.handle_generate_request(TokenizedGenerateReqInput(
            rid=f"bench-{seed}-{i}", input_text=None, input_ids=ids, sampling_params=params))
    device = scheduler.server_args.device
    chunks, decode = [], []
    _sync(device)
    start = time.perf_counter()
    while True:
        tic = time.perf_counter()
        if not scheduler.run_step_normal():
            break
        _sync(device)
        step = time.perf_counter() - tic
        (decode if scheduler.last_batch.forward_mode.is_decode() else chunks).append(step)
    total = time.perf_counter() - start
    scheduler.outputs.clear()
    scheduler.flush_cache()
    prefill, median_decode = sum(chunks), statistics.median(decode or [float("nan")])
    flops = prefill_flops(scheduler.model_config, batch_size, input_len)
    tflops = flops / prefill / 1e12 if flops is not None else None
    return BatchLatency(
        batch_size, input_len, output_len, prefill, median_decode,
        batch_size * input_len / prefill, batch_size / median_decode, total, chunks, flops,
        tflops, tflops / peak_tflops if tflops is not None and peak_tflops else None,
        peak_tflops)


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
    peak = measure_matmul_tflops(server_args.device, scheduler.model_config.dtype)
    print(f"measured {scheduler.model_config.dtype} matmul peak: {peak:.1f} TFLOP/s")
    results = []
    for bs in args.batch_size:
        r = run_one(scheduler, bs, args.input_len, args.output_len, peak_tflops=peak)
        print(summary_line(r))
        results.append(dataclasses.asdict(r))
    if args.result_file:
        with open(args.result_file, "a") as f:
            for r in results:
                f.write(json.dumps(r) + "\n")
    return results


def summary_line(r: BatchLatency) -> str:
    chunks = ", ".join(f"{t * 1e3:.2f}" for t in r.prefill_chunk_latencies_s)
    mfu = f", {r.prefill_tflops:.1f} TFLOP/s" if r.prefill_tflops is not None else ""
    if r.prefill_mfu is not None:
        mfu += f" = {r.prefill_mfu:.1%} MFU"
    return (f"batch {r.batch_size}: prefill {r.prefill_latency_s * 1e3:.2f} ms in "
            f"{len(r.prefill_chunk_latencies_s)} chunk(s) [{chunks}] "
            f"({r.prefill_throughput:.0f} tok/s{mfu}), median decode "
            f"{r.median_decode_latency_s * 1e3:.3f} ms ({r.decode_throughput:.0f} tok/s)")


if __name__ == "__main__":
    main()
