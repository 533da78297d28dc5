"""DP attention on CPU (gloo, tp 2 / dp 2: two attention groups of one rank each, the MLP over
both), against tp=1 as the oracle: a real server (its round robin puts consecutive requests on
different groups), the Engine on the other dense families with retraction, one group idle while
the other runs, mixed extend/decode steps, aborts, patch 0003c off and on through the graph
runners, a rank failing inside a step, and the startup errors."""

from __future__ import annotations

import functools
import time

import psutil
import pytest
import torch

from sglab.srt.entrypoints import engine as engine_mod
from sglab.srt.entrypoints.engine import Engine, _launch_subprocesses
from sglab.srt.server_args import ServerArgs, ServerArgsError
from sglab.srt.utils.dummy_model import get_default_model_path
from sglab.test.runners import (
    SchedulerRunner,
    run_scheduler_failing_at_step,
    run_scheduler_with_eager_graphs,
)
from conftest import (
    PARITY_PROMPTS,
    SEEDED,
    alive_pids,
    assert_matches_tp1,
    close_logprobs,
    serve_until_sigterm,
    session,
)

DP_ARGS = ["--tp-size", "2", "--dp-size", "2", "--enable-dp-attention", "--skip-server-warmup",
           "--random-seed", "7", "--enable-integrity-check"]
DP = dict(tp_size=2, dp_size=2, enable_dp_attention=True)
PROMPTS = PARITY_PROMPTS
GREEDY = {"temperature": 0, "max_new_tokens": 24, "ignore_eos": True}


@pytest.fixture(scope="module")
def dp_server():
    yield from serve_until_sigterm(DP_ARGS)  # SIGTERM leaves no rank (nor the controller)


@pytest.fixture(scope="module")
def tp1():
    return SchedulerRunner(model_path=get_default_model_path())


def _post(srv, input_ids, params: dict, **extra) -> list[dict] | dict:
    res = session().post(f"{srv.base_url}/generate", timeout=120, json={
        "input_ids": input_ids, "sampling_params": params, "return_logprob": True,
        "logprob_start_len": 0, "top_logprobs_num": 2, **extra})
    assert res.status_code == 200, res.text
    return res.json()


def _states(srv) -> list[dict]:
    return session().get(f"{srv.base_url}/get_server_info",
                         timeout=30).json()["internal_states"]


def _tp1(runner: SchedulerRunner, prompts, params: dict) -> list:
    return runner.generate(prompts, params, return_logprob=True, logprob_start_len=0,
                           top_logprobs_num=2)


@pytest.mark.parametrize("params", [GREEDY, SEEDED], ids=["greedy", "seeded"])
def test_server_tokens_and_logprobs_equal_tp1(dp_server, tp1, params):
    before = [s["forward_ct"] for s in _states(dp_server)]
    got = _post(dp_server, PROMPTS, params)
    for out, ref in zip(got, _tp1(tp1, PROMPTS, params)):
        assert_matches_tp1(out, ref)
    states = _states(dp_server)
    assert len(states) == 2  # one per attention group
    steps = [s["forward_ct"] - b for s, b in zip(states, before)]
    assert steps[0] == steps[1] > 0  # the groups step together


def test_one_group_idle_while_the_other_runs(dp_server, tp1):
    """A lone request: its group runs, the other runs IDLE steps (no tokens) beside it."""
    before = [s["forward_ct"] for s in _states(dp_server)]
    got = _post(dp_server, PROMPTS[2], GREEDY)
    assert_matches_tp1(got, _tp1(tp1, [PROMPTS[2]], GREEDY)[0])
    states = _states(dp_server)
    steps = [s["forward_ct"] - b for s, b in zip(states, before)]
    assert steps[0] == steps[1] == GREEDY["max_new_tokens"]  # a prefill + 23 decode steps
    assert all(s["integrity_error"] is None for s in states)


def test_mixed_extend_and_decode_across_groups(dp_server, tp1):
    """One group decodes a long request while the other prefills the next ones (the steps
    that gather an extend and a decode together, SUM_LEN), then both decode (MAX_LEN)."""
    import threading

    long_params = {**GREEDY, "max_new_tokens": 60}
    results = {}
    first = threading.Thread(target=lambda: results.setdefault(
        "long", _post(dp_server, PROMPTS[2], long_params)))
    first.start()
    time.sleep(0.3)  # the long request is decoding by now
    results["short"] = [_post(dp_server, p, GREEDY) for p in PROMPTS[:2]]
    first.join(120)
    assert_matches_tp1(results["long"], _tp1(tp1, [PROMPTS[2]], long_params)[0])
    for out, ref in zip(results["short"], _tp1(tp1, PROMPTS[:2], GREEDY)):
        assert_matches_tp1(out, ref)


def test_abort_under_dp_leaves_both_groups_in_step(dp_server, tp1):
    http = session()
    with http.post(f"{dp_server.base_url}/generate", stream=True, timeout=120, json={
            "input_ids": PROMPTS[0], "stream": True,
            "sampling_params": {"max_new_tokens": 3500, "ignore_eos": True}}) as res:
        chunks = res.iter_lines()
        for _ in range(4):
            next(chunks)
    deadline = time.monotonic() + 10
    while any(s["num_running_reqs"] for s in _states(dp_server)):
        assert time.monotonic() < deadline, "the aborted request kept running"
        time.sleep(0.2)
    got = _post(dp_server, PROMPTS, GREEDY)
    assert [o["output_ids"] for o in got] == [r.output_ids for r in _tp1(tp1, PROMPTS, GREEDY)]
    assert all(s["integrity_error"] is None for s in _states(dp_server))


def test_openai_client_and_flush_on_dp(dp_server, tp1):
    import openai

    client = openai.OpenAI(base_url=f"{dp_server.base_url}/v1", api_key="unused",
                           max_retries=0, timeout=120)
    out = client.completions.create(model="default", prompt="The quick brown fox",
                                    max_tokens=16, temperature=0,
                                    extra_body={"ignore_eos": True})
    ids = tp1.tokenizer.encode("The quick brown fox")
    ref = tp1.generate([ids], {"temperature": 0, "max_new_tokens": 16, "ignore_eos": True})[0]
    assert out.choices[0].text == tp1.tokenizer.decode(ref.output_ids)
    res = session().post(f"{dp_server.base_url}/flush_cache", timeout=30)
    assert res.status_code == 200  # every group flushed
    assert all(s["evictable_kv_tokens"] == 0 for s in _states(dp_server))


@pytest.mark.parametrize("preset,load_format,max_total_tokens", [
    ("tiny-llama", "dummy", None), ("tiny-qwen2", "auto", 80)])
def test_engine_dp_equals_tp1(tiny_model_dir, preset, load_format, max_total_tokens):
    """Llama (dummy weights) and Qwen2 (q/k/v bias); with 80 KV slots per rank the group that
    holds two of the three requests retracts, as tp=1 does."""
    path = tiny_model_dir(preset)
    args = dict(model_path=path, load_format=load_format, max_total_tokens=max_total_tokens,
                disable_radix_cache=max_total_tokens is not None)
    ref = SchedulerRunner(**args).generate(PROMPTS, GREEDY, return_logprob=True,
                                           logprob_start_len=0)
    with Engine(log_level="error", random_seed=0, enable_integrity_check=True, **DP,
                **args) as engine:
        got = engine.generate(input_ids=PROMPTS, sampling_params=GREEDY, return_logprob=True,
                              logprob_start_len=0)
    for out, r in zip(got, ref):
        assert out["output_ids"] == r.output_ids
        assert close_logprobs([v for v, _, _ in out["meta_info"]["input_token_logprobs"]],
                              r.logprobs["input_token_logprobs_val"])
    if max_total_tokens is not None:
        assert sum(r.total_retractions for r in ref) > 0
        assert sum(o["meta_info"]["total_retractions"] for o in got) > 0


@pytest.fixture
def eager_graph_launch(monkeypatch):
    """Engines whose ranks replay EagerGraphs (the graph runners' CPU stand-in)."""
    monkeypatch.setattr(engine_mod, "_launch_subprocesses", functools.partial(
        _launch_subprocesses, scheduler_target=run_scheduler_with_eager_graphs))


GRAPHS_0003C = dict(attention_backend="triton", cuda_graph_max_bs=2,
                    enable_prefill_cuda_graph=True, prefill_cuda_graph_max_tokens=32,
                    disable_radix_cache=True)
PROMPTS_0003C = [list(range(100, 134)), list(range(200, 238))]
GREEDY_0003C = {**GREEDY, "max_new_tokens": 4}  # the Triton kernels run interpreted on CPU


@pytest.fixture(scope="module")
def tp1_0003c():
    runner = SchedulerRunner(model_path=get_default_model_path(), chunked_prefill_size=16,
                             **GRAPHS_0003C)
    return runner.generate(PROMPTS_0003C + PROMPTS[1:2], GREEDY_0003C)


@pytest.mark.parametrize("patch_on", [False, True], ids=["0003c-off", "0003c-on"])
def test_0003c_off_and_on_equal_tp1(eager_graph_launch, tp1_0003c, patch_on):
    """Decode graphs under DP attention (MAX_LEN, an IDLE group padding) either way. Two
    prompts chunked in 16-token pieces, one per group: their prefills overlap for steps where
    both groups extend, which with 0003c on replay a prefill graph of the larger group's
    bucket and off (upstream 0.5.11) run eagerly. Tokens equal tp=1 both ways."""
    with Engine(model_path=get_default_model_path(), log_level="error", random_seed=0,
                enable_dp_prefill_cuda_graph=patch_on, chunked_prefill_size=32, **DP,
                **GRAPHS_0003C) as engine:
        got = engine.generate(input_ids=PROMPTS_0003C, sampling_params=GREEDY_0003C)
        lone = engine.generate(input_ids=PROMPTS[1], sampling_params=GREEDY_0003C)
        states = engine.get_server_info()["internal_states"]
    assert [o["output_ids"] for o in got] + [lone["output_ids"]] == \
        [r.output_ids for r in tp1_0003c]
    replays = [s["cuda_graph_replays"] for s in states]
    assert all(r["decode"] > 0 for r in replays)
    if patch_on:
        assert all(r["prefill"] > 0 for r in replays)
    else:
        assert all("prefill" not in r for r in replays)


def test_a_rank_failing_inside_a_step_shuts_the_server_down():
    """TP rank 1 raises in its 3rd forward while rank 0 waits in that step's collectives: the
    server exits with the rank's error, no process left behind."""
    before = {c.pid for c in psutil.Process().children(recursive=True)}
    args = ServerArgs(model_path=get_default_model_path(), log_level="error", **DP)
    tm, _ = _launch_subprocesses(args, run_scheduler_failing_at_step)
    try:
        import asyncio

        from sglab.srt.managers.io_struct import GenerateReqInput

        tm.child_processes.start_watchdog(tm.notify_dead)

        async def generate():
            obj = GenerateReqInput(input_ids=PROMPTS[:2], sampling_params=GREEDY)
            async for out in tm.generate_request(obj, None):
                return out

        with pytest.raises(Exception, match="exited unexpectedly"):
            asyncio.run(asyncio.wait_for(generate(), 120))
    finally:
        tm.child_processes.kill()
        tm.close()
    time.sleep(0.5)
    new = [c.pid for c in psutil.Process().children(recursive=True) if c.pid not in before]
    assert alive_pids(new) == []


@pytest.mark.parametrize("kwargs,message", [
    ({"tp_size": 2, "dp_size": 3, "enable_dp_attention": True},
     "--dp-size 3 must divide --tp-size 2"),
    ({"tp_size": 2, "dp_size": 1, "enable_dp_attention": True},
     "--enable-dp-attention needs --dp-size > 1"),
    ({"tp_size": 2, "dp_size": 2}, "--dp-size 2 without --enable-dp-attention"),
    ({"tp_size": 2, "dp_size": 0, "enable_dp_attention": True}, "--dp-size"),
    ({"tp_size": 2, "dp_size": 2, "enable_dp_attention": True, "enable_lora": True,
      "lora_paths": None, "max_lora_rank": 8, "lora_target_modules": ["q_proj"]},
     "--enable-dp-attention does not support --enable-lora"),
    ({"enable_prefill_cuda_graph": True, "attention_backend": "torch_native"},
     "--enable-prefill-cuda-graph does not support --attention-backend torch_native"),
])
def test_bad_dp_args_are_errors_naming_the_flag(kwargs, message):
    with pytest.raises(ServerArgsError, match=message):
        ServerArgs(model_path=get_default_model_path(), **kwargs)


def test_dp_attention_divides_the_chunk_and_request_budgets():
    args = ServerArgs(model_path=get_default_model_path(), chunked_prefill_size=1024,
                      max_running_requests=64, **DP)
    assert (args.chunked_prefill_size, args.max_running_requests, args.attn_tp_size) == \
        (512, 32, 1)


def test_launch_server_refuses_dp_attention_with_dp_1():
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-m", "sglab.launch_server", "--model-path",
                           get_default_model_path(), "--tp", "2", "--enable-dp-attention"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "--enable-dp-attention" in done.stderr


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.device_count() < 2,
                    reason="needs 2 CUDA GPUs")
@pytest.mark.parametrize("graphs", [False, True], ids=["eager", "cuda-graph"])
def test_gpu_dp_attention_nccl_equals_tp1(tiny_model_dir, graphs):
    """NCCL, one GPU per rank; with graphs, decode (MAX_LEN) and, 0003c, prefill graphs."""
    path = tiny_model_dir("tiny-qwen3")
    common = dict(model_path=path, device="cuda", attention_backend="triton",
                  disable_cuda_graph=not graphs, log_level="error", random_seed=0)
    ref = SchedulerRunner(**common).generate(PROMPTS, GREEDY)
    with Engine(enable_prefill_cuda_graph=graphs, **DP, **common) as engine:
        got = engine.generate(input_ids=PROMPTS, sampling_params=GREEDY)
        states = engine.get_server_info()["internal_states"]
    assert [o["output_ids"] for o in got] == [r.output_ids for r in ref]
    if graphs:
        assert all(s["cuda_graph_replays"]["decode"] > 0 for s in states)
