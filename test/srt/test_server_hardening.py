"""What a careless or hostile client can send to a real server, and what it must get back:
invalid Unicode, wrong types, fields sglab does not implement, out-of-range logprobs, unknown
models, malformed JSON, profiler paths; plus n/best_of with seeds, the model cards, and
/health and /get_server_info while the scheduler is busy."""

from __future__ import annotations

import http.client as http_client
import json
import os
import re
import time
import uuid

import openai
import psutil
import pytest
from conftest import session
from transformers import AutoTokenizer

PROMPT = "The quick brown fox"
MESSAGES = [{"role": "user", "content": "Name three colors."}]
SAMPLED = {"temperature": 1.0, "extra_body": {"ignore_eos": True}}


def _post(http, server, path, body, status):
    res = http.post(server.base_url + path, json=body, timeout=120)
    assert res.status_code == status, (body, res.text)
    return res.json()


def _error(http, server, path, body, status=400):
    error = _post(http, server, path, body, status)["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    return error


def _completion(**kw):
    return {"model": "default", "prompt": PROMPT, "max_tokens": 2, **kw}


def _chat(**kw):
    return {"model": "default", "messages": MESSAGES, "max_tokens": 2, **kw}


def _generate(**kw):
    return {"text": PROMPT, "sampling_params": {"max_new_tokens": 2}, **kw}


# --- invalid Unicode --------------------------------------------------------------------------

SURROGATE_BODIES = [
    ("/v1/completions", '{"model": "default", "prompt": "a\\ud800b", "max_tokens": 2}'),
    ("/v1/completions", '{"model": "default", "prompt": ["ok", "\\udfff"], "max_tokens": 2}'),
    ("/v1/completions", '{"model": "default", "prompt": "a", "stop": ["\\ud800"]}'),
    ("/v1/chat/completions", '{"model": "default", "max_tokens": 2, '
                             '"messages": [{"role": "user", "content": "\\ud800"}]}'),
    ("/v1/chat/completions", '{"model": "default", "max_tokens": 2, "messages": [{"role": '
                             '"user", "content": [{"type": "text", "text": "\\ud83d"}]}]}'),
    ("/v1/chat/completions", '{"model": "default", "messages": [{"role": "user", "content": '
                             '"hi"}], "chat_template_kwargs": {"x": "\\ud800"}}'),
    ("/generate", '{"text": "\\ud800", "sampling_params": {"max_new_tokens": 2}}'),
    ("/generate", '{"text": ["a", "\\ud800"], "sampling_params": {"max_new_tokens": 2}}'),
    ("/generate", '{"text": "a", "sampling_params": {"stop": "\\ud800"}}'),
    ("/generate", '{"text": "a", "rid": "\\ud800"}'),
]
VALID_BODIES = {
    "/v1/completions": _completion(),
    "/v1/chat/completions": _chat(),
    "/generate": _generate(),
}


@pytest.mark.parametrize("path,body", SURROGATE_BODIES)
def test_lone_surrogate_is_a_400_and_the_connection_survives(server, path, body):
    host, port = server.base_url.removeprefix("http://").split(":")
    conn = http_client.HTTPConnection(host, int(port), timeout=60)
    try:
        headers = {"Content-Type": "application/json"}
        conn.request("POST", path, body=body.encode(), headers=headers)
        res = conn.getresponse()
        error = json.loads(res.read())["error"]
        assert res.status == 400 and "unicode" in error["message"].lower(), error
        assert res.getheader("connection") != "close"
        sock = conn.sock
        conn.request("POST", path, body=json.dumps(VALID_BODIES[path]).encode(),
                     headers=headers)
        res = conn.getresponse()
        assert res.status == 200, res.read()
        res.read()
        assert conn.sock is sock  # the same keep-alive connection, not a reconnect
    finally:
        conn.close()


# --- wrong types ------------------------------------------------------------------------------


@pytest.mark.parametrize("body,field", [
    ({"text": 5}, "text"),
    ({"text": {"a": "b"}}, "text"),
    ({"text": ["a", 5]}, "text"),
    ({"text": True}, "text"),
    ({"input_ids": "1 2 3"}, "input_ids"),
    ({"input_ids": 7}, "input_ids"),
    ({"input_ids": [[1, 2], "x"]}, "input_ids"),
    ({"input_ids": [1, 2.5]}, "input_ids"),
    ({"text": "a", "input_ids": [1]}, "input_ids"),
])
def test_wrong_prompt_types_name_the_field(http, server, body, field):
    for stream in (False, True):
        error = _error(http, server, "/generate", {**body, "stream": stream})
        assert field in error["message"], error


# --- fields sglab does not implement ----------------------------------------------------------

COMPLETION_REFUSED = {
    "suffix": " the end", "priority": 1,
    "return_hidden_states": True, "session_params": {"id": "s"}, "extra_key": "k",
    "routed_dp_rank": 0,
}
CHAT_REFUSED = {
    "tools": [{"type": "function", "function": {"name": "f", "parameters": {}}}],
    "tool_choice": "required", "functions": [{"name": "f"}], "function_call": {"name": "f"},
    "reasoning_effort": "low",
    "return_cached_tokens_details": True,
}
GENERATE_REFUSED = {
    "priority": 1, "extra_key": "k", "routed_dp_rank": 0,
    "return_hidden_states": True, "bootstrap_host": "h", "data_parallel_rank": 0,
    "return_entropy": True,
}
SAMPLING_REFUSED = {"stream_interval": 2}
REFUSED = (
    [("/v1/completions", _completion(**{k: v}), k) for k, v in COMPLETION_REFUSED.items()]
    + [("/v1/chat/completions", _chat(**{k: v}), k) for k, v in CHAT_REFUSED.items()]
    + [("/generate", _generate(**{k: v}), k) for k, v in GENERATE_REFUSED.items()]
    + [("/generate", {"text": "a", "sampling_params": {k: v}}, k)
       for k, v in SAMPLING_REFUSED.items()]
)


@pytest.mark.parametrize("path,body,field", REFUSED,
                         ids=[f"{p.removeprefix('/v1/')}-{f}" for p, _, f in REFUSED])
def test_unimplemented_fields_are_refused_by_name(http, server, path, body, field):
    error = _error(http, server, path, body)
    assert field in error["message"], error
    if path != "/generate":
        assert error["param"] == field


@pytest.mark.parametrize("path,body", [
    ("/v1/completions", _completion(best_of=1, stop_regex=[], regex=None, suffix="",
                                    logit_bias={}, return_hidden_states=False,
                                    response_format={"type": "text"}, user="u")),
    ("/v1/chat/completions", _chat(tool_choice="none", tools=[], parallel_tool_calls=True,
                                   stop_regex=[], response_format={"type": "text"})),
    ("/generate", _generate(return_hidden_states=False, priority=None, lora_path=None,
                            unknown_field=1, sampling_params={
                                "max_new_tokens": 2, "stop_regex": [], "regex": None,
                                "json_schema": None, "n": 1})),
])
def test_no_op_values_of_unimplemented_fields_are_accepted(http, server, path, body):
    _post(http, server, path, body, 200)


# --- logprobs cap, models, malformed JSON -----------------------------------------------------


def test_one_logprobs_cap_for_completions_and_chat(http, server):
    for path, body, field in (("/v1/completions", _completion(logprobs=21), "logprobs"),
                              ("/v1/chat/completions",
                               _chat(logprobs=True, top_logprobs=21), "top_logprobs")):
        error = _error(http, server, path, body)
        assert error["message"] == f"{field} must be in [0, 20], got 21."
        assert error["param"] == field
    res = _post(http, server, "/v1/completions", _completion(logprobs=20), 200)
    assert len(res["choices"][0]["logprobs"]["top_logprobs"][0]) >= 1
    _post(http, server, "/v1/chat/completions", _chat(logprobs=True, top_logprobs=20), 200)


def test_unknown_model_is_404_model_not_found(client):
    for call in (lambda: client.completions.create(model="gpt-4", prompt="hi", max_tokens=1),
                 lambda: client.chat.completions.create(model="gpt-4", messages=MESSAGES,
                                                        max_tokens=1)):
        with pytest.raises(openai.NotFoundError) as e:
            call()
        assert e.value.body["code"] == "model_not_found" and e.value.body["param"] == "model"
        assert e.value.body["message"] == "The model `gpt-4` does not exist."


def test_every_accepted_model_name_has_a_card(client, http, server):
    served = server.model_path
    for name in ("default", served):
        card = client.models.retrieve(name)
        assert card.id == name and card.root == served
        client.completions.create(model=name, prompt="hi", max_tokens=1)
    res = http.get(f"{server.base_url}/v1/models/nope", timeout=30)
    assert res.status_code == 404 and res.json()["error"]["code"] == "model_not_found"


@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions", "/generate"])
def test_malformed_json_says_so_without_a_byte_offset_param(http, server, path):
    res = http.post(server.base_url + path, data=b'{"prompt": "a",', timeout=30,
                    headers={"Content-Type": "application/json"})
    error = res.json()["error"]
    assert res.status_code == 400 and error["param"] is None
    assert re.fullmatch(r"The request body is not valid JSON: .+ at character 15\.",
                        error["message"]), error


# --- n, best_of and seeds ---------------------------------------------------------------------


def _texts(choices):
    return [c.text if hasattr(c, "text") else c.message.content for c in choices]


def _streamed(chunks):
    texts: dict[int, str] = {}
    for chunk in chunks:
        for c in chunk.choices:
            piece = c.text if hasattr(c, "text") else (c.delta.content or "")
            texts[c.index] = texts.get(c.index, "") + piece
    return [texts[i] for i in sorted(texts)]


@pytest.mark.parametrize("route", ["completions", "chat"])
def test_n_with_seed_gives_distinct_reproducible_choices(client, route):
    if route == "completions":
        def create(**kw):
            return client.completions.create(model="default", prompt=PROMPT, max_tokens=8,
                                             **SAMPLED, **kw)
    else:
        def create(**kw):
            return client.chat.completions.create(model="default", messages=MESSAGES,
                                                  max_tokens=8, **SAMPLED, **kw)
    texts = _texts(create(n=3, seed=1234).choices)
    assert len(set(texts)) == 3, texts
    assert _texts(create(n=3, seed=1234).choices) == texts
    assert _streamed(create(n=3, seed=1234, stream=True)) == texts
    assert _texts(create(n=1, seed=1234).choices) == texts[:1]
    assert _texts(create(n=3, seed=1235).choices) != texts


def test_generate_batch_items_with_one_seed_sample_alike(http, server):
    """An explicit sampling_seed is the seed of each request it is given to (upstream's
    meaning, which the deterministic-inference tests rely on)."""
    params = {"max_new_tokens": 8, "temperature": 1.0, "ignore_eos": True, "sampling_seed": 5}
    outs = _post(http, server, "/generate", {"text": [PROMPT] * 3, "sampling_params": params},
                 200)
    assert len({tuple(o["output_ids"]) for o in outs}) == 1
    other = _post(http, server, "/generate", {"text": PROMPT, "sampling_params": {
        **params, "sampling_seed": 6}}, 200)
    assert other["output_ids"] != outs[0]["output_ids"]


def test_best_of_returns_the_highest_cumulative_logprob(client):
    kw = {"model": "default", "prompt": PROMPT, "max_tokens": 6, **SAMPLED}
    picked_other_than_first = False
    for seed in (1, 2, 3, 4):
        every = client.completions.create(n=4, seed=seed, logprobs=0, **kw)
        sums = [sum(c.logprobs.token_logprobs) for c in every.choices]
        order = sorted(range(4), key=lambda i: -sums[i])
        best = client.completions.create(n=2, best_of=4, seed=seed, **kw)
        assert _texts(best.choices) == [every.choices[i].text for i in order[:2]]
        assert [c.index for c in best.choices] == [0, 1]
        assert all(c.logprobs is None for c in best.choices)
        assert best.usage.completion_tokens == 4 * 6
        picked_other_than_first |= order[0] != 0
    assert picked_other_than_first


@pytest.mark.parametrize("kw,message", [
    ({"n": 3, "best_of": 2}, "best_of must be in"),
    ({"best_of": 1000}, "best_of must be in"),
    ({"best_of": 2, "stream": True}, "cannot be streamed"),
])
def test_bad_best_of_is_a_400(http, server, kw, message):
    error = _error(http, server, "/v1/completions", _completion(**kw))
    assert message in error["message"] and error["param"] == "best_of"


# --- chat template ----------------------------------------------------------------------------


def test_continue_final_message_continues_the_assistant_turn(client, server, http):
    """As upstream: the final assistant text follows the generation prompt, as tokens; the
    greedy reply is the one /generate gives for exactly those tokens."""
    tokenizer = AutoTokenizer.from_pretrained(server.model_path)
    prefix = "Red, green and"
    messages = MESSAGES + [{"role": "assistant", "content": prefix}]
    res = client.chat.completions.create(model="default", messages=messages, max_tokens=4,
                                         temperature=0,
                                         extra_body={"continue_final_message": True})
    want = tokenizer.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=True)
    ids = tokenizer.encode(want, add_special_tokens=False) + tokenizer.encode(prefix)
    assert res.usage.prompt_tokens == len(ids)
    native = _post(http, server, "/generate", {
        "input_ids": ids, "sampling_params": {"max_new_tokens": 4, "temperature": 0}}, 200)
    assert res.choices[0].message.content == native["text"]


def test_a_final_assistant_message_is_sent_as_the_user_s(client, server):
    """Without continue_final_message, upstream turns a final assistant message into a user
    message, so the model always answers a user turn."""
    tokenizer = AutoTokenizer.from_pretrained(server.model_path)
    messages = MESSAGES + [{"role": "assistant", "content": "Blue?"}]
    res = client.chat.completions.create(model="default", messages=messages, max_tokens=1)
    want = tokenizer.apply_chat_template(MESSAGES + [{"role": "user", "content": "Blue?"}],
                                         tokenize=False, add_generation_prompt=True)
    assert res.usage.prompt_tokens == len(tokenizer.encode(want, add_special_tokens=False))


# --- profiler paths ---------------------------------------------------------------------------


@pytest.mark.parametrize("body,message", [
    ({"output_dir": "/sglab-outside-the-profile-dir"}, "inside the profile directory"),
    ({"output_dir": "../" * 20 + "sglab-escape"}, "inside the profile directory"),
    ({"output_dir": 5}, "output_dir"),
    ({"profile_prefix": "../../x"}, "path separators"),
    ({"profile_prefix": "a\\b"}, "path separators"),
    ({"profile_prefix": "x" * 300}, "at most"),
    ({"start_step": 3}, "start_step"),
    ({"profile_by_stage": True}, "profile_by_stage"),
    ({"activities": ["MEM"]}, "activities"),
    ({"num_steps": 0}, "num_steps"),
    ({"with_stack": "yes"}, "with_stack"),
])
def test_start_profile_is_confined_to_the_profile_dir(http, server, body, message):
    error = _error(http, server, "/start_profile", body)
    assert message in error["message"], error
    assert not os.path.exists("/sglab-outside-the-profile-dir")
    assert not os.path.exists("/sglab-escape")


def test_profile_trace_lands_inside_the_profile_dir(http, server):
    sub = f"sglab-test-profile-{uuid.uuid4().hex[:8]}"
    res = http.post(f"{server.base_url}/start_profile", timeout=30,
                    json={"output_dir": sub, "profile_prefix": "mine", "num_steps": 1,
                          "activities": ["CPU", "GPU"], "profile_by_stage": False})
    assert res.status_code == 200, res.text
    _post(http, server, "/generate", _generate(), 200)
    folder = os.path.join(server.profile_dir, sub)
    deadline = time.time() + 60
    while time.time() < deadline and not os.listdir(folder):
        time.sleep(0.2)
    try:
        assert [n for n in os.listdir(folder) if re.fullmatch(r"mine-\d+\.trace\.json", n)]
    finally:
        for name in os.listdir(folder):
            os.remove(os.path.join(folder, name))
        os.rmdir(folder)


# --- a busy scheduler -------------------------------------------------------------------------


def _scheduler(server) -> psutil.Process:
    for child in psutil.Process(server.process.pid).children():
        if child.name().startswith("sglab::sched"):
            return child
    raise AssertionError("no scheduler process")


def test_health_and_server_info_answer_while_the_scheduler_is_busy(http, server):
    """A stopped scheduler stands in for one in a long forward step."""
    fresh = http.get(f"{server.base_url}/get_server_info", timeout=30).json()
    assert "age_s" not in fresh["internal_states"][0]
    stream = session().post(f"{server.base_url}/generate", stream=True, timeout=120, json={
        "text": "busy", "stream": True,
        "sampling_params": {"max_new_tokens": 3500, "ignore_eos": True}})
    lines = stream.iter_lines()
    assert next(ln for ln in lines if ln).startswith(b"data: {")
    scheduler = _scheduler(server)
    scheduler.suspend()
    try:
        tic = time.time()
        assert http.get(f"{server.base_url}/health", timeout=5).status_code == 200
        info = http.get(f"{server.base_url}/get_server_info", timeout=5).json()
        assert time.time() - tic < 4
        state = info["internal_states"][0]
        assert state["age_s"] >= 0 and state["max_total_num_tokens"] == \
            fresh["max_total_num_tokens"]
    finally:
        scheduler.resume()
        stream.close()
    assert "age_s" not in http.get(f"{server.base_url}/get_server_info",
                                   timeout=30).json()["internal_states"][0]


def test_startup_log_names_model_source_device_dtype_and_url(server):
    line = next(ln for ln in server.log().splitlines() if "Serving model" in ln)
    assert re.search(rf"Serving model '{re.escape(server.model_path)}' from "
                     rf"{re.escape(server.model_path)} \(sglab's default tiny-qwen3 model .*\) "
                     rf"on (cpu|cuda), dtype (float32|float16|bfloat16), at "
                     rf"{re.escape(server.base_url)}$", line), line


@pytest.mark.parametrize("body, message", [
    ({"server_args": {"max_running_requests": 4}}, "Updating max_running_requests is not"),
    ({"server_args": {"enable_sync_audit": 1}}, "must be a bool"),
    ({"server_args": {}}, "at least one entry"),
    ({"enable_sync_audit": True}, '{"server_args"'),
    ([1], '{"server_args"'),
])
def test_set_internal_state_refuses_what_it_cannot_change(http, server, body, message):
    error = _error(http, server, "/set_internal_state", body)
    assert message in error["message"] and error["param"] == "server_args", error


def test_sync_audit_switched_on_and_off_while_serving(http, server):
    def audit():
        info = http.get(f"{server.base_url}/get_server_info", timeout=60).json()
        return info["internal_states"][0]["sync_audit"]

    def generate():
        res = http.post(f"{server.base_url}/generate", timeout=120,
                        json={"text": PROMPT, "sampling_params": {"max_new_tokens": 3}})
        assert res.status_code == 200, res.text

    def switch(on):
        res = http.post(f"{server.base_url}/set_internal_state", timeout=60,
                        json={"server_args": {"enable_sync_audit": on}})
        assert res.status_code == 200 and res.json() == [
            {"updated": True, "server_args": {"enable_sync_audit": on}}], res.text

    try:
        switch(True)
        assert audit()["steps"] == 0  # switching on starts the counts afresh
        generate()
        counted = audit()
        assert counted["enabled"] and counted["steps"] >= 3 and counted["host_ms_per_step"]
    finally:
        switch(False)
    generate()
    after = audit()
    assert not after["enabled"] and after["steps"] == counted["steps"]
