"""The Triton backend (CPU: Triton's interpreter) against the torch_native reference."""

from __future__ import annotations

import random

import pytest
import torch

from sglab.test.runners import SchedulerRunner

PARAMS = {"temperature": 0, "max_new_tokens": 4, "ignore_eos": True}


def _prompts() -> list[list[int]]:
    rng = random.Random(0)
    shared = [rng.randrange(1000) for _ in range(24)]
    return [shared + [rng.randrange(1000) for _ in range(n)] for n in (3, 17)] + [
        [rng.randrange(1000) for _ in range(9)]]


@pytest.fixture(scope="module")
def reference(tiny_model_dir):
    path = tiny_model_dir("tiny-qwen3")
    runner = SchedulerRunner(model_path=path, attention_backend="torch_native")
    return path, [o.output_ids for o in runner.generate(_prompts(), PARAMS)]


@pytest.mark.parametrize("extra", [
    {},
    {"enable_deterministic_inference": True},
    {"page_size": 16, "chunked_prefill_size": 16},
], ids=["two-stage", "unified", "paged-chunked"])
def test_triton_matches_torch_native(reference, extra):
    path, expect = reference
    runner = SchedulerRunner(model_path=path, attention_backend="triton", **extra)
    prompts = _prompts()
    first = runner.generate(prompts[:1], PARAMS)
    rest = runner.generate(prompts[1:], PARAMS)
    assert rest[0].cached_tokens >= 16  # the shared prefix came from the radix cache
    assert [o.output_ids for o in first + rest] == expect
    assert runner.integrity_error() is None


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("preset", ["tiny-qwen3", "tiny-llama"])
def test_gpu_fast_path_matches_eager_reference(tiny_model_dir, preset):
    """triton + CUDA graphs + overlap == torch_native eager without overlap (fp32, greedy)."""
    path = tiny_model_dir(preset)
    rng = random.Random(1)
    prompts = [[rng.randrange(1000) for _ in range(rng.randrange(1, 200))] for _ in range(24)]
    params = {"temperature": 0, "max_new_tokens": 32, "ignore_eos": True}
    ref = SchedulerRunner(model_path=path, device="cuda", dtype="float32",
                          attention_backend="torch_native", disable_cuda_graph=True,
                          disable_overlap_schedule=True).generate(prompts, params)
    fast = SchedulerRunner(model_path=path, device="cuda", dtype="float32",
                           attention_backend="triton", cuda_graph_max_bs=16,
                           chunked_prefill_size=64)
    assert fast.scheduler.tp_worker.model_runner.graph_runner is not None
    outs = fast.generate(prompts, params)
    assert [o.output_ids for o in outs] == [o.output_ids for o in ref]
    assert fast.integrity_error() is None
