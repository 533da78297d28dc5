"""Prefill CUDA graphs (--enable-prefill-cuda-graph): token buckets, padding, which batches
replay and which fall back to eager. On CPU an `EagerGraph` stands in for the CUDA graph
(the triton kernels through the interpreter), against the eager forward as the oracle; the
GPU test replays real graphs."""

from __future__ import annotations

import random

import pytest
import torch

from sglab.srt.model_executor.prefill_cuda_graph_runner import (
    PREFILL_GRAPH_MAX_REQS,
    get_prefill_capture_tokens,
)
from sglab.srt.server_args import ServerArgs, ServerArgsError
from sglab.srt.utils.dummy_model import get_default_model_path
from sglab.test.runners import SchedulerRunner, install_eager_graphs

GREEDY = {"temperature": 0, "max_new_tokens": 3, "ignore_eos": True}
SAMPLED = {"temperature": 0.7, "sampling_seed": 5, "max_new_tokens": 3, "ignore_eos": True}
MAX_TOKENS = 48


def _prompts(n: int, lo: int, hi: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(900) for _ in range(rng.randrange(lo, hi))] for _ in range(n)]


def _runner(graph: bool) -> SchedulerRunner:
    runner = SchedulerRunner(model_path=get_default_model_path(), attention_backend="triton",
                             cuda_graph_max_bs=2, enable_prefill_cuda_graph=True,
                             prefill_cuda_graph_max_tokens=MAX_TOKENS, disable_radix_cache=True)
    if graph:
        install_eager_graphs(runner.scheduler.tp_worker.model_runner)
    return runner


@pytest.fixture(scope="module")
def runners():
    return _runner(False), _runner(True)


def test_token_buckets():
    assert get_prefill_capture_tokens(48) == [16, 32, 48]
    assert get_prefill_capture_tokens(64) == [16, 32, 64]
    assert get_prefill_capture_tokens(10) == [10]


# (prompts, params, prompt logprobs, replays expected)
CASES = {
    "fits-one-request": (_prompts(1, 5, 12, 1), GREEDY, False, True),
    "fits-three-padded": (_prompts(3, 3, 14, 2), GREEDY, False, True),
    "sampled-after-replay": (_prompts(2, 3, 14, 3), SAMPLED, False, True),
    "above-the-largest-bucket": (_prompts(2, 30, 40, 4), GREEDY, False, False),
    "prompt-logprobs": (_prompts(2, 3, 10, 5), GREEDY, True, False),
    # One token each: what falls back is the prefill; the rows' decode steps add nothing.
    "more-requests-than-rows": (_prompts(PREFILL_GRAPH_MAX_REQS + 1, 2, 5, 6),
                                {**GREEDY, "max_new_tokens": 1}, False, False),
}


@pytest.mark.parametrize("case", list(CASES))
def test_graph_equals_eager_and_falls_back(runners, case):
    eager, graph = runners
    prompts, params, logprobs, replays = CASES[case]
    kwargs = dict(return_logprob=True, logprob_start_len=0 if logprobs else -1)
    prefill = graph.scheduler.tp_worker.model_runner.prefill_graph_runner
    before = prefill.num_replays
    want = eager.generate(prompts, params, **kwargs)
    got = graph.generate(prompts, params, **kwargs)
    assert (prefill.num_replays > before) == replays
    for g, w in zip(got, want):
        assert g.output_ids == w.output_ids
        # The graph's GEMMs run on the padded bucket: equal up to fp32 rounding.
        assert torch.allclose(torch.tensor(g.logprobs["output_token_logprobs_val"]),
                              torch.tensor(w.logprobs["output_token_logprobs_val"]), atol=1e-4)
    assert graph.integrity_error() is None


def test_padding_never_touches_a_live_request(runners):
    """A request decoding while another prefills through a padded graph keeps its tokens."""
    eager, graph = runners
    long_prompt = _prompts(1, 6, 8, 7)[0]
    outs = {}
    for name, runner in (("eager", eager), ("graph", graph)):
        rid = runner.submit(long_prompt, {**GREEDY, "max_new_tokens": 8})
        runner.scheduler.run_step()
        runner.scheduler.run_step()
        other = runner.submit(_prompts(1, 3, 6, 8)[0], GREEDY)
        done = runner.run()
        outs[name] = (done[rid].output_ids, done[other].output_ids)
    assert outs["graph"] == outs["eager"]


@pytest.mark.parametrize("kwargs,what", [
    ({"attention_backend": "torch_native"}, "--attention-backend torch_native"),
    ({"attention_backend": "triton", "enable_deterministic_inference": True},
     "--enable-deterministic-inference"),
    ({"attention_backend": "triton", "enable_lora": True, "lora_paths": None,
      "max_lora_rank": 8, "lora_target_modules": ["q_proj"]}, "--enable-lora"),
])
def test_prefill_graph_refuses_what_it_cannot_hold(kwargs, what):
    with pytest.raises(ServerArgsError, match=f"--enable-prefill-cuda-graph does not support "
                                              f"{what}"):
        ServerArgs(model_path=get_default_model_path(), enable_prefill_cuda_graph=True, **kwargs)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_prefill_graph_on_equals_off(tiny_model_dir):
    """Real CUDA graphs: prefill graph on vs off, identical tokens; small batches replay."""
    path = tiny_model_dir("tiny-qwen3")
    prompts = _prompts(6, 3, 40, 9)
    common = dict(model_path=path, device="cuda", attention_backend="triton", random_seed=0)
    off = SchedulerRunner(**common).generate(prompts, {**GREEDY, "max_new_tokens": 16})
    on_runner = SchedulerRunner(enable_prefill_cuda_graph=True, **common)
    on = on_runner.generate(prompts, {**GREEDY, "max_new_tokens": 16})
    assert [o.output_ids for o in on] == [o.output_ids for o in off]
    assert on_runner.scheduler.tp_worker.model_runner.prefill_graph_runner.num_replays > 0
