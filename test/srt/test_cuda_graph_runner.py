"""The decode graph runner: static inputs, padding, the in-graph prologue, participants and
sampling kinds. On CPU an `EagerGraph` stands in for the CUDA graph (replay runs the captured
step again on the same static tensors), so the plumbing is checked against the eager path;
what only a real capture shows is checked on the GPU (test_triton_backend.py and the gpu tests
below)."""

from __future__ import annotations

import collections
import random

import pytest
import torch

from sglab.srt.model_executor.cuda_graph_runner import CudaGraphRunner, EagerGraph
from sglab.test.runners import SchedulerRunner

GREEDY = {"temperature": 0, "max_new_tokens": 4, "ignore_eos": True}
SAMPLED = {"temperature": 0.8, "top_p": 0.9, "sampling_seed": 3, "max_new_tokens": 4,
           "ignore_eos": True}
PLAIN_SAMPLED = {"temperature": 0.7, "sampling_seed": 5, "max_new_tokens": 4,
                 "ignore_eos": True}
PENALIZED = {"temperature": 0, "repetition_penalty": 1.3, "max_new_tokens": 4,
             "ignore_eos": True}


def _runner(path: str, graph: bool, **kw) -> SchedulerRunner:
    runner = SchedulerRunner(model_path=path, attention_backend="triton",
                             enable_deterministic_inference=True, cuda_graph_max_bs=4, **kw)
    if graph:
        mr = runner.scheduler.tp_worker.model_runner
        mr.graph_runner = CudaGraphRunner(mr, graph_factory=EagerGraph)
    return runner


def _prompts(n: int, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(900) for _ in range(rng.randrange(3, 22))] for _ in range(n)]


def _run(runner: SchedulerRunner, groups: list[tuple[list[list[int]], dict, bool]]) -> list:
    """Each group (prompts, params, logprobs) as one generate call; tokens and logprob bits."""
    outs = []
    for prompts, params, logprob in groups:
        for o in runner.generate(prompts, params, return_logprob=logprob):
            outs.append((o.output_ids, o.logprobs.get("output_token_logprobs_val")))
    return outs


GROUPS = [(_prompts(3, 1), GREEDY, False),  # 3 rows padded to the graph of 4
          (_prompts(4, 2), PLAIN_SAMPLED, False),  # a sampling graph, captured on first use
          (_prompts(2, 3), SAMPLED, False),  # with top-p: another sampling kind
          (_prompts(2, 4), PENALIZED, False),  # penalties: sampled after the replay
          (_prompts(2, 5), GREEDY, True),  # logprobs: sampled after the replay
          (_prompts(5, 6), GREEDY, False)]  # above the largest graph: eager


@pytest.fixture(scope="module")
def path(tiny_model_dir):
    return tiny_model_dir("tiny-qwen3")


@pytest.fixture(scope="module")
def eager(path):
    """The eager steps' outputs (deterministic mode: the same with or without overlap)."""
    return _run(_runner(path, False, chunked_prefill_size=16), GROUPS)


@pytest.mark.parametrize("overlap", [True, False], ids=["overlap", "normal"])
def test_graph_steps_equal_eager_steps(path, eager, overlap, monkeypatch):
    replays = collections.Counter()
    replay = EagerGraph.replay

    def counted(graph):
        replays[id(graph)] += 1
        replay(graph)

    monkeypatch.setattr(EagerGraph, "replay", counted)
    kw = {"disable_overlap_schedule": not overlap, "chunked_prefill_size": 16}
    graphed_runner = _runner(path, True, **kw)
    assert _run(graphed_runner, GROUPS) == eager
    gr = graphed_runner.scheduler.tp_worker.model_runner.graph_runner
    kinds = {k for _, k in gr.graphs}
    assert ("greedy",) in kinds and ("sample", False, False) in kinds
    assert ("sample", True, False) in kinds
    # every decode step of the five groups that fit a graph
    assert sum(replays.values()) >= 5 * (GREEDY["max_new_tokens"] - 1)
    assert graphed_runner.integrity_error() is None


def test_padding_rows_touch_only_the_padding_row_and_sink(path):
    """A batch of 3 replays the graph of 4: the 4th row reads and writes the pool's padding row
    and KV slot 0 only; live rows' tables are what the host mirror says."""
    runner = _runner(path, True)
    rids = [runner.submit(p, GREEDY) for p in _prompts(3, 7)]
    for _ in range(3):
        runner.scheduler.run_step()
    pool = runner.scheduler.req_to_token_pool
    for req in runner.scheduler.running_batch.reqs:
        n = req.seqlen - 1 - req.num_pending_tokens
        assert torch.equal(pool.req_to_token[req.req_pool_idx, :n],
                           pool.req_to_token_cpu[req.req_pool_idx, :n])
    assert set(pool.free_slots).isdisjoint({0})
    outs = runner.run()
    assert all(len(outs[r].output_ids) == GREEDY["max_new_tokens"] for r in rids)


@pytest.mark.parametrize("mode", ["pageable", "pinned", "packed"])
def test_graph_inputs_upload_modes_fill_the_same_static_buffers(path, eager, mode):
    """Patch 0001's three forms of the graph's per-step upload give the same outputs."""
    kw = {"patches": "none"} if mode == "pageable" else \
        {"pinned_h2d_mode": "pr" if mode == "pinned" else "packed"}
    runner = _runner(path, True, chunked_prefill_size=16, **kw)
    assert runner.scheduler.tp_worker.model_runner.graph_runner.inputs.h2d_mode == mode
    assert _run(runner, GROUPS[:2]) == eager[:len(GROUPS[0][0]) + len(GROUPS[1][0])]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_steady_decode_step_is_one_upload_one_replay_one_download(tiny_model_dir):
    """A steady greedy decode step through a graph (patch 0001 packed): one H2D copy, one
    graph launch, one D2H copy, and no kernel launched outside the graph."""
    from torch.profiler import ProfilerActivity, profile

    runner = SchedulerRunner(model_path=tiny_model_dir("tiny-qwen3"), device="cuda",
                             attention_backend="triton", cuda_graph_max_bs=8,
                             pinned_h2d_mode="packed")
    for p in _prompts(4, 9):
        runner.submit(p, {"temperature": 0, "max_new_tokens": 64, "ignore_eos": True})
    for _ in range(8):  # prefill, then into steady decode
        runner.scheduler.run_step()
    torch.cuda.synchronize()
    steps = 10
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            runner.scheduler.run_step()
        torch.cuda.synchronize()
    calls = collections.Counter(e.name for e in prof.events())
    assert calls["cudaGraphLaunch"] == steps, calls
    assert calls["cudaLaunchKernel"] == 0, calls
    copies = sum(n for name, n in calls.items() if name.startswith("cudaMemcpy"))
    assert copies == 2 * steps, calls
    runner.run()
    assert runner.integrity_error() is None
