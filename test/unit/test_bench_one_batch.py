"""bench_one_batch: a prefill larger than the chunk size is timed over all of its chunks, and
its model FLOPs (for MFU) match a count by hand."""

from __future__ import annotations

import math

import pytest

from sglab.bench_one_batch import prefill_flops, run_one, summary_line
from sglab.srt.managers.scheduler import Scheduler
from sglab.srt.server_args import ServerArgs


@pytest.fixture(scope="module")
def scheduler(tiny_model_dir):
    args = ServerArgs(model_path=tiny_model_dir("tiny-qwen3"), chunked_prefill_size=16,
                      disable_overlap_schedule=True, random_seed=0)
    return Scheduler(args)


def test_prefill_flops_by_hand(scheduler):
    # tiny-qwen3: hidden 64, 4 q heads and 2 kv heads of 32, MLP 128, 2 layers, vocab 1024.
    per_token_layer_macs = (64 * 128 + 64 * 64 + 64 * 64  # q, k, v
                            + 128 * 64  # o
                            + 64 * 128 * 2 + 128 * 64)  # gate, up, down
    batch, length = 2, 3
    linear = 2 * per_token_layer_macs * 2 * batch * length
    # Each of 4 heads: q.k and p.v over the keys each token sees (1 + 2 + 3), 32 dims, 2 layers.
    attention = 2 * 2 * 4 * 32 * 2 * batch * (1 + 2 + 3)
    logits = 2 * 64 * 1024 * batch
    assert prefill_flops(scheduler.model_config, batch, length) == linear + attention + logits


def test_every_prefill_chunk_is_timed(scheduler):
    r = run_one(scheduler, batch_size=2, input_len=24, output_len=4, peak_tflops=1.0)
    assert len(r.prefill_chunk_latencies_s) == 3  # 48 prompt tokens, 16 per chunk
    assert r.prefill_latency_s == pytest.approx(sum(r.prefill_chunk_latencies_s))
    assert r.prefill_throughput == pytest.approx(48 / r.prefill_latency_s)
    assert math.isfinite(r.median_decode_latency_s)
    flops = prefill_flops(scheduler.model_config, 2, 24)
    assert r.prefill_tflops == pytest.approx(flops / r.prefill_latency_s / 1e12)
    assert r.prefill_mfu == pytest.approx(r.prefill_tflops)  # of a 1 TFLOP/s peak
    assert "3 chunk(s)" in summary_line(r)


def test_unchunked_prefill_is_one_step(scheduler):
    r = run_one(scheduler, batch_size=1, input_len=10, output_len=3)
    assert len(r.prefill_chunk_latencies_s) == 1 and r.prefill_mfu is None
