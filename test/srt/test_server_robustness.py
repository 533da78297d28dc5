"""A real server process: a request that fails inside the scheduler loop is answered with an
error while the others keep their greedy outputs; out-of-range seeds and non-finite floats are
400s; prompt logprobs survive a prefix-cache hit; penalties and min_tokens reach the engine."""

from __future__ import annotations

import os
import textwrap
from concurrent.futures import ThreadPoolExecutor

import openai
import pytest
from conftest import kill_server, popen_launch_server

from sglab.test.runners import SchedulerRunner

GREEDY = {"temperature": 0, "max_new_tokens": 8, "ignore_eos": True}
POISON = [997, 998, 999]  # a prompt starting with these fails in the scheduler loop
PROMPTS = [[11, 12, 13, 14, 15], [21, 22, 23, 24, 25, 26, 27], [31, 32, 33], [41] * 9]

# Imported by every Python process of the server: the scheduler's batch building fails for
# any batch holding the poisoned request.
_HOOK = f"""
from sglab.srt.managers.schedule_batch import ScheduleBatch

_real = ScheduleBatch.get_model_worker_batch


def _get_model_worker_batch(self):
    if any(r.origin_input_ids[:3] == {POISON!r} for r in self.reqs):
        raise RuntimeError("injected failure for the poisoned request")
    return _real(self)


ScheduleBatch.get_model_worker_batch = _get_model_worker_batch
"""


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    hook_dir = tmp_path_factory.mktemp("hook")
    (hook_dir / "sitecustomize.py").write_text(textwrap.dedent(_HOOK))
    pythonpath = os.pathsep.join([str(hook_dir), os.environ.get("PYTHONPATH", "")])
    srv = popen_launch_server(["--skip-server-warmup"], env={"PYTHONPATH": pythonpath})
    yield srv
    kill_server(srv)


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server.base_url}/v1", api_key="none", max_retries=0)


def _post(http, server, body: dict):
    return http.post(f"{server.base_url}/generate", json=body, timeout=120)


def _generate(http, server, input_ids: list[int], params: dict, **extra) -> dict:
    res = _post(http, server, {"input_ids": input_ids, "sampling_params": params, **extra})
    assert res.status_code == 200, res.text
    return res.json()


def _concurrently(http, server, bodies: list[dict]):
    with ThreadPoolExecutor(len(bodies)) as pool:
        return list(pool.map(lambda b: _post(http, server, b), bodies))


def _integrity_error(http, server):
    info = http.get(f"{server.base_url}/get_server_info", timeout=30).json()
    return info["internal_states"][0]["integrity_error"]


def test_a_failing_request_gets_an_error_and_the_others_their_outputs(http, server):
    bodies = [{"input_ids": p, "sampling_params": GREEDY} for p in PROMPTS]
    baseline = [r.json()["output_ids"] for r in _concurrently(http, server, bodies)]
    poisoned = {"input_ids": POISON + PROMPTS[0], "sampling_params": GREEDY}
    for _ in range(2):  # timing decides which batches it shares
        *others, bad = _concurrently(http, server, bodies + [poisoned])
        assert [r.json()["output_ids"] for r in others] == baseline
        assert bad.status_code == 500, bad.text
        assert "injected failure for the poisoned request" in bad.json()["error"]["message"]
    res = _concurrently(http, server, [poisoned])[0]
    assert res.status_code == 500
    assert _integrity_error(http, server) is None
    assert _generate(http, server, PROMPTS[1], GREEDY)["output_ids"] == baseline[1]


def test_out_of_range_seeds_are_400(http, server, client):
    with pytest.raises(openai.BadRequestError, match="seed"):
        client.completions.create(model="default", prompt="Hi", max_tokens=3, temperature=1,
                                  seed=18446744073709551616)
    for seed, temperature in ((2**63, 0), (-(2**63) - 1, 1.0)):
        res = _post(http, server, {"text": "Hi", "sampling_params": {
            "max_new_tokens": 3, "temperature": temperature, "sampling_seed": seed}})
        assert res.status_code == 400, res.text
        assert "sampling_seed" in res.json()["error"]["message"]
    edge = client.completions.create(model="default", prompt="Hi", max_tokens=3,
                                     temperature=1, seed=2**63 - 1)
    again = client.completions.create(model="default", prompt="Hi", max_tokens=3,
                                      temperature=1, seed=2**63 - 1)
    assert edge.choices[0].text == again.choices[0].text


@pytest.mark.parametrize("name", ["temperature", "top_p", "min_p", "frequency_penalty",
                                  "presence_penalty", "repetition_penalty"])
def test_non_finite_sampling_floats_are_400(http, server, name):
    for value in ("NaN", "Infinity", "-Infinity"):
        raw = '{"text": "Hi", "sampling_params": {"max_new_tokens": 2, "%s": %s}}' % (name, value)
        res = http.post(f"{server.base_url}/generate", data=raw,
                        headers={"Content-Type": "application/json"}, timeout=60)
        assert res.status_code == 400, (name, value, res.text)
        assert name in res.json()["error"]["message"]
    assert _generate(http, server, PROMPTS[2], GREEDY)["meta_info"]["completion_tokens"] == 8


@pytest.mark.parametrize("start", [0, 1, 50, 99])
def test_prompt_logprobs_are_the_same_on_a_cache_hit(http, server, start):
    assert http.post(f"{server.base_url}/flush_cache", timeout=30).status_code == 200
    kwargs = {"return_logprob": True, "logprob_start_len": start}
    params = {"max_new_tokens": 4, "temperature": 0}
    cold = _generate(http, server, list(range(100)), params, **kwargs)["meta_info"]
    hot = _generate(http, server, list(range(100)), params, **kwargs)["meta_info"]
    assert hot["cached_tokens"] > 0 or start <= 1
    assert len(cold["input_token_logprobs"]) == len(hot["input_token_logprobs"]) == 100 - start
    for (v0, i0, *_), (v1, i1, *_) in zip(cold["input_token_logprobs"],
                                          hot["input_token_logprobs"]):
        assert i0 == i1
        assert (v0 is None and v1 is None) or abs(v0 - v1) < 1e-5


PENALTIES = {"frequency": {"frequency_penalty": 2.0}, "presence": {"presence_penalty": 2.0},
             "repetition": {"repetition_penalty": 2.0}, "min_tokens": {"min_new_tokens": 6}}
LONG = {**GREEDY, "max_new_tokens": 16}


@pytest.fixture(scope="module")
def reference(server):
    """The requests through the scheduler in this process, the reference for the server.
    min_new_tokens stops on a token the greedy output has early."""
    runner = SchedulerRunner(model_path=server.model_path)
    (plain,) = runner.generate([PROMPTS[0]], LONG)
    cases = {**PENALTIES, "min_tokens": {"min_new_tokens": 6, "ignore_eos": False,
                                          "stop_token_ids": [plain.output_ids[1]]}}
    outs = {name: runner.generate([PROMPTS[0]], {**LONG, **p})[0].output_ids
            for name, p in cases.items()}
    return plain.output_ids, cases, outs


@pytest.mark.parametrize("name", PENALTIES)
def test_penalties_reach_the_engine(http, server, client, reference, name):
    plain, cases, outs = reference
    params = cases[name]
    out = _generate(http, server, PROMPTS[0], {**LONG, **params})
    assert out["output_ids"] == outs[name] != plain
    openai_kwargs = {k: v for k, v in params.items()
                     if k in ("frequency_penalty", "presence_penalty")}
    extra = {k: v for k, v in params.items() if k not in openai_kwargs}
    if "min_new_tokens" in extra:
        extra["min_tokens"] = extra.pop("min_new_tokens")
    completion = client.completions.create(
        model="default", prompt=PROMPTS[0], max_tokens=16, temperature=0,
        extra_body={"ignore_eos": True, **extra}, **openai_kwargs)
    assert completion.choices[0].text == out["text"]
