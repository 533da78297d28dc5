"""Tensor parallelism on CPU (gloo, 2 ranks), against tp=1 as the oracle: a real
`--tp-size 2` server, the offline Engine on the other dense families (one from dummy weights),
startup errors, and a rank that fails or dies taking the whole server down."""

from __future__ import annotations

import subprocess
import sys
import time

import psutil
import pytest
import requests
import torch

from sglab.srt.entrypoints.engine import Engine, _launch_subprocesses
from sglab.srt.server_args import ServerArgs, ServerArgsError
from sglab.srt.utils.dummy_model import get_default_model_path
from sglab.srt.utils.process import kill_server
from sglab.test.runners import SchedulerRunner, run_scheduler_with_broken_rank
from conftest import (
    PARITY_PROMPTS,
    SEEDED,
    alive_pids,
    assert_matches_tp1,
    close_logprobs,
    popen_launch_server,
    serve_until_sigterm,
    session,
)

# The integrity check also compares every step's sampled tokens across ranks.
TP_ARGS = ["--tp-size", "2", "--skip-server-warmup", "--random-seed", "7",
           "--enable-integrity-check"]
PROMPTS = PARITY_PROMPTS
GREEDY = {"temperature": 0, "max_new_tokens": 32, "ignore_eos": True}


@pytest.fixture(scope="module")
def tp_server():
    yield from serve_until_sigterm(TP_ARGS)  # SIGTERM leaves no rank behind


@pytest.fixture(scope="module")
def tp1():
    """The tp=1 oracle: the same model, in-process."""
    return SchedulerRunner(model_path=get_default_model_path())


def _tp1_outputs(runner: SchedulerRunner, params: dict) -> list:
    return runner.generate(PROMPTS, params, return_logprob=True, logprob_start_len=0,
                           top_logprobs_num=2)


def _generate(srv, params: dict) -> list[dict]:
    res = session().post(f"{srv.base_url}/generate", json={
        "input_ids": PROMPTS, "sampling_params": params, "return_logprob": True,
        "logprob_start_len": 0, "top_logprobs_num": 2}, timeout=120)
    assert res.status_code == 200, res.text
    return res.json()


@pytest.mark.parametrize("params", [GREEDY, SEEDED], ids=["greedy", "seeded"])
def test_server_tokens_and_logprobs_equal_tp1(tp_server, tp1, params):
    got, want = _generate(tp_server, params), _tp1_outputs(tp1, params)
    for out, ref in zip(got, want):
        assert_matches_tp1(out, ref)


def test_aborted_stream_leaves_every_rank_in_step(tp_server, tp1):
    """A client disconnect aborts the request on every rank: their pools pass the idle
    integrity check (a rank that failed it would take the server down) and the next batch
    still equals tp=1."""
    http = session()
    with http.post(f"{tp_server.base_url}/generate", stream=True, timeout=120, json={
            "input_ids": PROMPTS[0], "stream": True,
            "sampling_params": {"max_new_tokens": 3500, "ignore_eos": True}}) as res:
        chunks = res.iter_lines()
        for _ in range(4):
            next(chunks)
    deadline = time.monotonic() + 10  # running to its end would take far longer
    while http.get(f"{tp_server.base_url}/get_server_info",
                   timeout=10).json()["internal_states"][0]["num_running_reqs"]:
        assert time.monotonic() < deadline, "the aborted request kept running"
        time.sleep(0.2)
    got, want = _generate(tp_server, GREEDY), _tp1_outputs(tp1, GREEDY)
    assert [o["output_ids"] for o in got] == [r.output_ids for r in want]
    assert tp_server.process.poll() is None


def test_openai_client_on_tp2_matches_tp1(tp_server, tp1):
    import openai

    client = openai.OpenAI(base_url=f"{tp_server.base_url}/v1", api_key="unused",
                           max_retries=0, timeout=120)
    prompt = "The quick brown fox"
    out = client.completions.create(model="default", prompt=prompt, max_tokens=24,
                                    temperature=0, extra_body={"ignore_eos": True})
    ids = tp1.tokenizer.encode(prompt)
    ref = tp1.generate([ids], {"temperature": 0, "max_new_tokens": 24, "ignore_eos": True})[0]
    assert out.choices[0].text == tp1.tokenizer.decode(ref.output_ids)
    assert out.usage.completion_tokens == 24


@pytest.mark.parametrize("preset,load_format,max_total_tokens", [
    ("tiny-llama", "dummy", None), ("tiny-qwen2", "auto", 128)])
def test_engine_tp2_equals_tp1(tiny_model_dir, preset, load_format, max_total_tokens):
    """Untied LM head and q/k/v bias; dummy weights shard the tp=1 draw; a KV pool too small
    for all three requests retracts on every rank alike."""
    path = tiny_model_dir(preset)
    args = dict(model_path=path, load_format=load_format, max_total_tokens=max_total_tokens,
                disable_radix_cache=max_total_tokens is not None)
    ref = SchedulerRunner(**args).generate(PROMPTS, GREEDY, return_logprob=True,
                                           logprob_start_len=0)
    if max_total_tokens is not None:
        assert sum(r.total_retractions for r in ref) > 0
    with Engine(tp_size=2, log_level="error", random_seed=0, **args) as engine:
        got = engine.generate(input_ids=PROMPTS, sampling_params=GREEDY, return_logprob=True,
                              logprob_start_len=0)
    for out, r in zip(got, ref):
        assert out["output_ids"] == r.output_ids
        assert out["meta_info"]["total_retractions"] == r.total_retractions
        assert close_logprobs([v for v, _, _ in out["meta_info"]["input_token_logprobs"]],
                              r.logprobs["input_token_logprobs_val"])


def test_rank_disagreement_is_caught():
    """The debug check itself: a rank whose tokens differ from rank 0's raises."""
    from types import SimpleNamespace

    from sglab.srt.managers.scheduler_runtime_checker_mixin import SchedulerRuntimeCheckerMixin

    rank1 = SimpleNamespace(
        attn_tp_group=SimpleNamespace(world_size=2, rank=1,
                                      broadcast_object=lambda obj, src: [4, 5]),
        server_args=SimpleNamespace(enable_integrity_check=True), forward_ct=3)
    SchedulerRuntimeCheckerMixin.check_tp_agreement(rank1, [4, 5])
    with pytest.raises(AssertionError, match="TP rank 1 sampled"):
        SchedulerRuntimeCheckerMixin.check_tp_agreement(rank1, [4, 6])


@pytest.mark.parametrize("kwargs,message", [
    ({"tp_size": 3}, "--tp-size 3 must divide the model's num_attention_heads"),
    ({"tp_size": 0}, "--tp-size"),
])
def test_bad_tp_sizes_are_errors_naming_the_flag(kwargs, message):
    with pytest.raises(ServerArgsError, match=message):
        ServerArgs(model_path=get_default_model_path(), **kwargs)


def test_in_process_scheduler_refuses_tp():
    with pytest.raises(ValueError, match="--tp-size 2 needs one process per rank"):
        SchedulerRunner(model_path=get_default_model_path(), tp_size=2)


def test_kv_heads_must_divide_or_be_divided(tmp_path):
    import json
    import shutil

    path = tmp_path / "six-heads"
    shutil.copytree(get_default_model_path(), path)
    cfg = json.loads((path / "config.json").read_text())
    cfg.update(num_attention_heads=6, num_key_value_heads=3)
    (path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ServerArgsError, match="num_key_value_heads"):
        ServerArgs(model_path=str(path), tp_size=2)


def test_launch_server_refuses_a_bad_tp_size():
    done = subprocess.run([sys.executable, "-m", "sglab.launch_server", "--model-path",
                           get_default_model_path(), "--tp", "3"], capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 2 and "--tp-size 3" in done.stderr


def test_one_rank_failing_to_start_fails_the_launch():
    """Rank 0 would wait for rank 1 in the rendezvous: the launcher must not."""
    before = set(c.pid for c in psutil.Process().children(recursive=True))
    args = ServerArgs(model_path=get_default_model_path(), tp_size=2, log_level="error")
    start = time.monotonic()
    with pytest.raises(RuntimeError, match="scheduler of TP rank 1 failed to start"):
        _launch_subprocesses(args, run_scheduler_with_broken_rank)
    assert time.monotonic() - start < 120
    time.sleep(0.5)
    new = [c.pid for c in psutil.Process().children(recursive=True) if c.pid not in before]
    assert alive_pids(new) == []


def test_a_dying_rank_shuts_the_server_down():
    srv = popen_launch_server(TP_ARGS)
    try:
        ranks = sorted((c for c in psutil.Process(srv.process.pid).children()
                        if c.name().startswith("sglab::sched")), key=lambda c: c.create_time())
        assert len(ranks) == 2
        ranks[1].kill()
        assert srv.process.wait(60) == 1
        assert "sglab::scheduler_TP1" in srv.log()
        res = None
        try:
            res = requests.get(f"{srv.base_url}/health", timeout=2)
        except requests.RequestException:
            pass
        assert res is None  # the server is gone, not hanging
    finally:
        kill_server(srv)
    assert alive_pids(srv.child_pids) == []


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.device_count() < 2,
                    reason="needs 2 CUDA GPUs")
@pytest.mark.parametrize("graphs", [False, True], ids=["eager", "cuda-graph"])
def test_gpu_tp2_nccl_equals_tp1(tiny_model_dir, graphs):
    """NCCL collectives, one GPU per rank; with graphs the all-reduces are captured per rank."""
    path = tiny_model_dir("tiny-qwen3")
    common = dict(model_path=path, device="cuda", attention_backend="triton",
                  disable_cuda_graph=not graphs, log_level="error", random_seed=0)
    ref = SchedulerRunner(**common).generate(PROMPTS, GREEDY, return_logprob=True,
                                             logprob_start_len=0)
    with Engine(tp_size=2, **common) as engine:
        got = engine.generate(input_ids=PROMPTS, sampling_params=GREEDY, return_logprob=True,
                              logprob_start_len=0)
    for out, r in zip(got, ref):
        assert out["output_ids"] == r.output_ids
        assert close_logprobs([v for v, _, _ in out["meta_info"]["output_token_logprobs"]],
                              r.logprobs["output_token_logprobs_val"])
