"""The native API of a real server process: /generate (single, batch, stream, input_ids,
logprobs, stop strings), parity with the offline Engine, input validation, aborts on
disconnect, a concurrent load, the info/control endpoints, auth, metrics and shutdown."""

from __future__ import annotations

import json
import os
import signal
import time
from concurrent.futures import ThreadPoolExecutor

import psutil
import pytest
import requests
from conftest import (
    alive_pids,
    check_default_patch_status,
    kill_server,
    popen_launch_server,
    session,
)
from transformers import AutoTokenizer

SERVER_ARGS = ["--skip-server-warmup"]
PROMPTS = ["The capital of France is", "Once upon a time", "1, 2, 3, 4,"]
GREEDY = {"temperature": 0, "max_new_tokens": 8, "ignore_eos": True}


@pytest.fixture(scope="module")
def tokenizer(server):
    return AutoTokenizer.from_pretrained(server.model_path)


def _generate(http, server, body, status=200):
    res = http.post(f"{server.base_url}/generate", json=body, timeout=120)
    assert res.status_code == status, res.text
    return res.json()


def _stream_events(http, server, body):
    res = http.post(f"{server.base_url}/generate", json={**body, "stream": True}, stream=True,
                    timeout=120)
    assert res.status_code == 200, res.text
    lines = [ln for ln in res.iter_lines() if ln]
    assert lines[-1] == b"data: [DONE]"
    return [json.loads(ln[len(b"data: "):]) for ln in lines[:-1]]


def _server_info(http, server):
    return http.get(f"{server.base_url}/get_server_info", timeout=30).json()


def _wait_idle(http, server, timeout=30.0):
    deadline = time.time() + timeout
    while time.time() < deadline:
        info = _server_info(http, server)
        if info["num_running_reqs"] == 0 and info["num_waiting_reqs"] == 0:
            return info
        time.sleep(0.1)
    raise AssertionError(f"server not idle after {timeout} s: {info}")


def _assert_pool_full(info):
    assert info["available_kv_tokens"] + info["evictable_kv_tokens"] == \
        info["max_total_num_tokens"]


# --- /generate --------------------------------------------------------------------------------


def test_single(http, server, tokenizer):
    out = _generate(http, server, {"text": PROMPTS[0], "sampling_params": GREEDY})
    meta = out["meta_info"]
    assert len(out["output_ids"]) == meta["completion_tokens"] == 8
    assert meta["finish_reason"] == {"type": "length", "length": 8}
    assert meta["prompt_tokens"] == len(tokenizer.encode(PROMPTS[0]))
    assert out["text"] == tokenizer.decode(out["output_ids"], skip_special_tokens=True)
    assert meta["e2e_latency"] > 0 and len(meta["id"]) == 32
    assert "input_token_logprobs" not in meta


def test_batch_and_input_ids_match_single_requests(http, server, tokenizer):
    singles = [_generate(http, server, {"text": p, "sampling_params": GREEDY}) for p in PROMPTS]
    batch = _generate(http, server, {"text": PROMPTS, "sampling_params": GREEDY})
    ids = _generate(http, server, {"input_ids": [tokenizer.encode(p) for p in PROMPTS],
                                   "sampling_params": GREEDY})
    assert isinstance(batch, list) and len(batch) == len(PROMPTS)
    assert [o["output_ids"] for o in batch] == [o["output_ids"] for o in singles]
    assert [o["output_ids"] for o in ids] == [o["output_ids"] for o in singles]
    assert len({o["meta_info"]["id"] for o in batch}) == len(PROMPTS)
    one = _generate(http, server, {"input_ids": tokenizer.encode(PROMPTS[1]),
                                   "sampling_params": GREEDY})
    assert one["text"] == singles[1]["text"]


def test_stream_is_cumulative_and_matches_non_stream(http, server):
    body = {"text": PROMPTS[1], "sampling_params": {**GREEDY, "max_new_tokens": 12}}
    final = _generate(http, server, body)
    events = _stream_events(http, server, body)
    assert len(events) >= 2
    for prev, cur in zip(events, events[1:]):
        assert cur["text"].startswith(prev["text"])
        assert cur["output_ids"][:len(prev["output_ids"])] == prev["output_ids"]
        assert cur["meta_info"]["completion_tokens"] >= prev["meta_info"]["completion_tokens"]
    assert all(e["meta_info"]["finish_reason"] is None for e in events[:-1])
    assert events[-1]["meta_info"]["finish_reason"]["type"] == "length"
    assert events[-1]["text"] == final["text"]
    assert events[-1]["output_ids"] == final["output_ids"]


def test_upstream_client_payloads_are_accepted(http, server):
    """bench_serving and the gsm8k client send these keys; unknown top-level keys are ignored."""
    params = {"temperature": 0.0, "max_new_tokens": 4, "ignore_eos": True, "regex": None,
              "json_schema": None, "stop_token_ids": [], "stop_regex": [], "n": 1,
              "min_new_tokens": 0}
    body = {"text": "bench", "sampling_params": params, "lora_path": None,
            "return_logprob": False, "return_routed_experts": False, "logprob_start_len": -1,
            "a_field_from_a_newer_client": 1}
    events = _stream_events(http, server, body)
    assert events[-1]["meta_info"]["completion_tokens"] == 4
    res = http.put(f"{server.base_url}/generate", json=body, timeout=60)
    assert res.status_code == 200 and res.json()["text"] == events[-1]["text"]


def test_stream_batch_carries_index(http, server):
    events = _stream_events(http, server, {"text": PROMPTS[:2], "sampling_params": GREEDY})
    finals = {e["index"]: e for e in events if e["meta_info"]["finish_reason"]}
    assert sorted(finals) == [0, 1]
    singles = [_generate(http, server, {"text": p, "sampling_params": GREEDY})
               for p in PROMPTS[:2]]
    assert [finals[i]["text"] for i in (0, 1)] == [s["text"] for s in singles]


def test_logprobs(http, server):
    out = _generate(http, server, {
        "text": PROMPTS[2], "sampling_params": GREEDY, "return_logprob": True,
        "logprob_start_len": 0, "top_logprobs_num": 3, "return_text_in_logprobs": True})
    meta = out["meta_info"]
    inputs, outputs = meta["input_token_logprobs"], meta["output_token_logprobs"]
    assert len(inputs) == meta["prompt_tokens"] and inputs[0][0] is None
    assert all(lp <= 0 for lp, _, _ in inputs[1:])
    assert [t for _, t, _ in outputs] == out["output_ids"]
    assert "".join(text for _, _, text in outputs) == out["text"]
    for (lp, tid, _), top in zip(outputs, meta["output_top_logprobs"]):
        assert len(top) == 3
        assert [v for v, _, _ in top] == sorted((v for v, _, _ in top), reverse=True)
        assert top[0][1] == tid and top[0][0] == pytest.approx(lp)  # greedy picks the top-1
    assert meta["input_top_logprobs"][0] is None
    assert all(len(t) == 3 for t in meta["input_top_logprobs"][1:])


def test_prefill_only_request_returns_prompt_logprobs(http, server):
    out = _generate(http, server, {
        "text": PROMPTS[0], "sampling_params": {"max_new_tokens": 0}, "return_logprob": True,
        "logprob_start_len": 0})
    meta = out["meta_info"]
    assert out["output_ids"] == [] and meta["completion_tokens"] == 0
    assert len(meta["input_token_logprobs"]) == meta["prompt_tokens"]
    assert meta["output_token_logprobs"] == []


def test_default_max_new_tokens_fits_the_context(http, server):
    context_len = _server_info(http, server)["context_len"]
    n = context_len - 5
    out = _generate(http, server, {"input_ids": [7] * n,
                                   "sampling_params": {"ignore_eos": True}})
    assert out["meta_info"]["completion_tokens"] == 4  # prompt + output < context length
    out = _generate(http, server, {"input_ids": [7] * 10, "sampling_params": {
        "ignore_eos": True, "temperature": 0}})
    assert out["meta_info"]["completion_tokens"] == 128  # upstream's default
    res = http.post(f"{server.base_url}/generate", json={
        "input_ids": [7] * n, "sampling_params": {"max_new_tokens": 5}}, timeout=60)
    assert res.status_code == 400 and "maximum context length" in res.text
    out = _generate(http, server, {"input_ids": [7] * n, "sampling_params": {
        "max_new_tokens": 4, "ignore_eos": True}})
    assert out["meta_info"]["completion_tokens"] == 4


def _stop_candidate(text: str) -> str:
    """A stop string that first occurs after the start of `text`."""
    for size in (3, 2, 1):
        for start in range(1, len(text) - size + 1):
            stop = text[start:start + size]
            if stop.strip() and "\ufffd" not in stop and text.find(stop) == start:
                return stop
    pytest.skip(f"no usable stop string in {text!r}")


def test_stop_string_is_honoured(http, server):
    params = {"temperature": 0, "max_new_tokens": 16, "ignore_eos": True}
    full = _generate(http, server, {"text": PROMPTS[0], "sampling_params": params})["text"]
    stop = _stop_candidate(full)
    stopped = _generate(http, server, {"text": PROMPTS[0],
                                       "sampling_params": {**params, "stop": stop}})
    assert stopped["text"] == full[:full.index(stop)]
    assert stopped["meta_info"]["finish_reason"] == {"type": "stop", "matched": stop}
    kept = _generate(http, server, {"text": PROMPTS[0], "sampling_params": {
        **params, "stop": [stop], "no_stop_trim": True}})
    assert kept["text"].startswith(full[:full.index(stop)]) and stop in kept["text"]
    events = _stream_events(http, server, {"text": PROMPTS[0],
                                           "sampling_params": {**params, "stop": stop}})
    assert all(stop not in e["text"] for e in events)
    assert events[-1]["text"] == stopped["text"]


def test_greedy_output_equals_offline_engine(http, server):
    from sglab import Engine

    served = [_generate(http, server, {"text": p, "sampling_params": GREEDY}) for p in PROMPTS]
    with Engine(model_path=server.model_path, log_level="warning") as engine:
        offline = engine.generate(PROMPTS, GREEDY)
        streamed = list(engine.generate(PROMPTS[0], GREEDY, stream=True))
        with pytest.raises(ValueError, match="max_new_tokens"):
            engine.generate(PROMPTS[0], {"max_new_tokens": -1})
        again = engine.generate(PROMPTS[0], GREEDY)
    assert [o["output_ids"] for o in offline] == [o["output_ids"] for o in served]
    assert [o["text"] for o in offline] == [o["text"] for o in served]
    assert streamed[-1]["text"] == served[0]["text"]
    assert again["output_ids"] == served[0]["output_ids"]


# --- validation -------------------------------------------------------------------------------


BAD_BODIES = {
    "text_and_ids": {"text": "a", "input_ids": [1, 2]},
    "no_prompt": {"sampling_params": {"max_new_tokens": 2}},
    "empty_text": {"text": ""},
    "empty_ids": {"input_ids": []},
    "ids_out_of_vocab": {"input_ids": [1, 10**9]},
    "negative_id": {"input_ids": [-1]},
    "ids_wrong_type": {"input_ids": ["a", "b"]},
    "unknown_sampling_param": {"text": "a", "sampling_params": {"temprature": 0.5}},
    "negative_temperature": {"text": "a", "sampling_params": {"temperature": -1}},
    "top_p_zero": {"text": "a", "sampling_params": {"top_p": 0}},
    "top_k_zero": {"text": "a", "sampling_params": {"top_k": 0}},
    "max_new_tokens_str": {"text": "a", "sampling_params": {"max_new_tokens": "x"}},
    "penalty_str": {"text": "a", "sampling_params": {"frequency_penalty": "x"}},
    "ignore_eos_str": {"text": "a", "sampling_params": {"ignore_eos": "yes"}},
    "stop_int": {"text": "a", "sampling_params": {"stop": 5}},
    "stream_str": {"text": "a", "stream": "yes"},
    "rid_int": {"text": "a", "rid": 5},
    "params_not_dict": {"text": "a", "sampling_params": [1, 2]},
    "params_len_mismatch": {"text": ["a", "b"], "sampling_params": [{}, {}, {}]},
    "logprob_start_too_far": {"text": "a", "return_logprob": True, "logprob_start_len": 99},
    "n_zero": {"text": "a", "sampling_params": {"n": 0}},
    "n_str": {"text": "a", "sampling_params": {"n": "2"}},
    "n_differs": {"text": ["a", "b"], "sampling_params": [{"n": 2}, {"n": 3}]},
    "regex_invalid": {"text": "a", "sampling_params": {"regex": "(a"}},
    "body_is_list": ["a"],
    "too_long_prompt": {"input_ids": [1] * 5000},
    "too_many_new_tokens": {"text": "a", "sampling_params": {"max_new_tokens": 10**6}},
}


@pytest.mark.parametrize("name", list(BAD_BODIES))
def test_bad_input_is_a_400_and_the_server_keeps_serving(http, server, name):
    for stream in (False, True):
        body = BAD_BODIES[name]
        if isinstance(body, dict) and name != "stream_str":
            body = {**body, "stream": stream}
        res = http.post(f"{server.base_url}/generate", json=body, timeout=60)
        assert res.status_code == 400, (name, res.text)
        assert res.json()["error"]["message"]
    ok = _generate(http, server, {"text": "a", "sampling_params": {"max_new_tokens": 1}})
    assert ok["meta_info"]["completion_tokens"] == 1


def test_malformed_json_and_messages(http, server):
    res = http.post(f"{server.base_url}/generate", data=b'{"text": "a",', timeout=30)
    assert res.status_code == 400 and "JSON" in res.json()["error"]["message"]
    res = http.post(f"{server.base_url}/generate", json={"input_ids": [1] * 5000}, timeout=30)
    assert "longer than the model's context length" in res.json()["error"]["message"]
    res = http.post(f"{server.base_url}/generate",
                    json={"text": "a", "sampling_params": {"temperature": -1}}, timeout=30)
    assert "temperature" in res.json()["error"]["message"]


# --- aborts and load --------------------------------------------------------------------------


def _long_request(prompt: str) -> dict:
    return {"text": prompt, "sampling_params": {"max_new_tokens": 3500, "ignore_eos": True}}


def _check_aborted(http, server, tokenizer, prompt):
    info = _wait_idle(http, server)
    _assert_pool_full(info)
    # A finished request would leave prompt + 3500 tokens in the radix cache.
    assert info["evictable_kv_tokens"] < len(tokenizer.encode(prompt)) + 3500 - 100


def test_disconnected_stream_is_aborted_and_frees_kv(http, server, tokenizer):
    assert http.post(f"{server.base_url}/flush_cache", timeout=30).status_code == 200
    prompt = "A disconnected streaming client"
    res = session().post(f"{server.base_url}/generate", json={**_long_request(prompt),
                                                             "stream": True},
                         stream=True, timeout=60)
    lines = res.iter_lines()
    assert next(ln for ln in lines if ln).startswith(b"data: {")
    res.close()
    _check_aborted(http, server, tokenizer, prompt)


def test_disconnected_non_stream_request_is_aborted(http, server, tokenizer):
    assert http.post(f"{server.base_url}/flush_cache", timeout=30).status_code == 200
    prompt = "A client that gives up waiting"
    with pytest.raises(requests.exceptions.ReadTimeout):
        session().post(f"{server.base_url}/generate", json=_long_request(prompt), timeout=1.0)
    _check_aborted(http, server, tokenizer, prompt)


def test_300_requests_at_concurrency_64(http, server):
    def one(i: int) -> tuple[int, int]:
        s = session()
        max_new = 1 + i % 16
        body = {"text": f"Request number {i} says", "stream": i % 3 == 0,
                "sampling_params": {"max_new_tokens": max_new, "ignore_eos": True,
                                    "temperature": 0.7}}
        res = s.post(f"{server.base_url}/generate", json=body, timeout=300)
        if res.status_code != 200:
            return -res.status_code, max_new
        if body["stream"]:
            events = [ln for ln in res.text.split("\n\n") if ln]
            assert events[-1] == "data: [DONE]"
            out = json.loads(events[-2][len("data: "):])
        else:
            out = res.json()
        return out["meta_info"]["completion_tokens"], max_new

    with ThreadPoolExecutor(64) as pool:
        results = list(pool.map(one, range(300)))
    assert [got for got, _ in results] == [want for _, want in results]
    info = _wait_idle(http, server)
    _assert_pool_full(info)
    assert http.get(f"{server.base_url}/flush_cache", timeout=30).status_code == 200
    info = _server_info(http, server)
    assert info["available_kv_tokens"] == info["max_total_num_tokens"]


# --- info and control -------------------------------------------------------------------------


def test_health_and_info_endpoints(http, server):
    for path in ("/health", "/health_generate"):
        assert http.get(server.base_url + path, timeout=30).status_code == 200
    for path in ("/get_model_info", "/model_info"):
        info = http.get(server.base_url + path, timeout=30).json()
        assert info["model_path"] == server.model_path and info["is_generation"] is True
        assert info["architectures"] == ["Qwen3ForCausalLM"]
    for path in ("/get_server_info", "/server_info"):
        info = http.get(server.base_url + path, timeout=30).json()
        assert info["model_path"] == server.model_path and info["disable_radix_cache"] is False
        assert info["status"] == "ready" and info["max_req_input_len"] > 0
        assert isinstance(info["active_patches"], list) and info["version"]
        check_default_patch_status(info)
        assert info["internal_states"][0]["max_total_num_tokens"] == \
            info["max_total_num_tokens"]
        assert 0 < info["available_kv_tokens"] <= info["max_total_num_tokens"]


def test_flush_cache_both_methods(http, server):
    _wait_idle(http, server)
    for method in ("GET", "POST"):
        res = http.request(method, f"{server.base_url}/flush_cache", timeout=30)
        assert res.status_code == 200 and res.text.startswith("Cache flushed.")


def test_profile(http, server):
    assert http.post(f"{server.base_url}/stop_profile", timeout=30).status_code == 400
    tmp_path = os.path.join(server.profile_dir, "test_profile")
    res = http.post(f"{server.base_url}/start_profile",
                    json={"output_dir": tmp_path, "num_steps": None}, timeout=30)
    assert res.status_code == 200 and res.text == "Start profiling.\n"
    assert http.post(f"{server.base_url}/start_profile", timeout=30).status_code == 400
    _generate(http, server, {"text": "profile me", "sampling_params": GREEDY})
    res = http.get(f"{server.base_url}/stop_profile", timeout=120)
    assert res.status_code == 200
    assert any(name.endswith(".json") for name in os.listdir(tmp_path))


# --- a second server: warmup, auth, metrics, clean shutdown; a third: a dying child -----------


def test_warmup_auth_metrics_and_clean_shutdown():
    key = "sk-test"
    srv = popen_launch_server(["--enable-metrics"], api_key=key)
    try:
        http = session()
        assert "The server is fired up and ready to roll!" in srv.log()
        body = {"text": "hi", "sampling_params": {"max_new_tokens": 2}}
        assert http.post(f"{srv.base_url}/generate", json=body).status_code == 401
        bad = {"Authorization": "Bearer wrong"}
        assert http.post(f"{srv.base_url}/generate", json=body, headers=bad).status_code == 401
        res = http.post(f"{srv.base_url}/generate", json=body, headers=srv.headers())
        assert res.status_code == 200
        assert http.get(f"{srv.base_url}/health").status_code == 200
        metrics = http.get(f"{srv.base_url}/metrics").text
        assert "sglang:num_requests_total" in metrics
        assert "sglang:e2e_request_latency_seconds_count" in metrics
        assert "sglang:max_total_num_tokens" in metrics
    finally:
        srv.process.send_signal(signal.SIGTERM)
        code = srv.process.wait(60)
        kill_server(srv)
    assert code == 0, srv.log()[-3000:]
    assert alive_pids(srv.child_pids) == []


def test_dying_child_makes_server_exit_nonzero():
    srv = popen_launch_server(["--skip-server-warmup"])
    try:
        children = psutil.Process(srv.process.pid).children()
        scheduler = next(c for c in children if _is_scheduler(c))
        with ThreadPoolExecutor(1) as pool:
            pending = pool.submit(session().post, f"{srv.base_url}/generate",
                                  json=_long_request("doomed"), timeout=120)
            time.sleep(1.0)
            scheduler.kill()
            res = pending.result()
        assert res.status_code == 503 and "exited unexpectedly" in res.json()["error"]["message"]
        assert srv.process.wait(60) == 1
    finally:
        kill_server(srv)
    assert alive_pids(srv.child_pids) == []
    assert "sglab::scheduler" in srv.log()



def _is_scheduler(proc: psutil.Process) -> bool:
    try:
        return proc.name().startswith("sglab::sched")
    except psutil.Error:
        return False
