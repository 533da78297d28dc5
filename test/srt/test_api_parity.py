"""Upstream SGLang's request features on a real server process: parallel sampling (`n` on
/generate, single and batch, streamed), logit_bias, stop_regex and /abort_request, with the official
openai client for the OpenAI routes and requests for the native ones."""

from __future__ import annotations

import json
import re
import time
import uuid
from concurrent.futures import ThreadPoolExecutor

import pytest
from conftest import session

SAMPLED = {"temperature": 1.0, "max_new_tokens": 6, "ignore_eos": True}


def _generate(http, server, body, status=200):
    res = http.post(f"{server.base_url}/generate", json=body, timeout=120)
    assert res.status_code == status, res.text
    return res.json()


def _unique_prompt() -> str:
    """A prompt no other test sent, so the radix cache holds none of it yet."""
    return f"parallel sampling {uuid.uuid4().hex}"


# --- n > 1 on /generate -------------------------------------------------------------------------


def test_n_samples_differ_repeat_for_a_seed_and_share_the_prompt(http, server):
    prompt, rid = _unique_prompt(), uuid.uuid4().hex
    params = {**SAMPLED, "n": 4, "sampling_seed": 77}
    outs = _generate(http, server, {"text": prompt, "sampling_params": params, "rid": rid})
    assert isinstance(outs, list) and len(outs) == 4
    ids = [o["output_ids"] for o in outs]
    assert len({tuple(i) for i in ids}) == 4, ids
    assert [o["meta_info"]["id"] for o in outs] == [f"{rid}-{j}" for j in range(4)]
    for o in outs:  # the prompt was prefilled once: every sample reuses all but its last token
        meta = o["meta_info"]
        assert meta["cached_tokens"] == meta["prompt_tokens"] - 1, meta
    again = _generate(http, server, {"text": prompt, "sampling_params": params})
    assert [o["output_ids"] for o in again] == ids
    one = _generate(http, server, {"text": prompt, "sampling_params": {**params, "n": 1}})
    assert one["output_ids"] == ids[0]
    other = _generate(http, server, {"text": prompt,
                                     "sampling_params": {**params, "sampling_seed": 78}})
    assert [o["output_ids"] for o in other] != ids


def test_n_samples_of_a_batch_are_prompt_major(http, server):
    prompts = [_unique_prompt(), _unique_prompt()]
    params = {**SAMPLED, "n": 2, "sampling_seed": 5}
    outs = _generate(http, server, {"text": prompts, "sampling_params": params})
    assert len(outs) == 4
    for p, prompt in enumerate(prompts):
        alone = _generate(http, server, {"text": prompt, "sampling_params": params})
        assert [o["output_ids"] for o in outs[2 * p:2 * p + 2]] == \
            [o["output_ids"] for o in alone]


def test_n_samples_stream_with_their_index(http, server):
    body = {"text": _unique_prompt(), "sampling_params": {**SAMPLED, "n": 3, "sampling_seed": 9}}
    final = _generate(http, server, body)
    res = http.post(f"{server.base_url}/generate", json={**body, "stream": True}, stream=True,
                    timeout=120)
    lines = [ln for ln in res.iter_lines() if ln]
    assert lines[-1] == b"data: [DONE]"
    last: dict[int, list[int]] = {}
    for ln in lines[:-1]:
        chunk = json.loads(ln[len(b"data: "):])
        last[chunk["index"]] = chunk["output_ids"]
    assert [last[i] for i in range(3)] == [o["output_ids"] for o in final]


@pytest.mark.parametrize("params,message", [
    ({"n": 0}, "n must be an integer in [1, 128], got 0."),
    ({"n": 129}, "n must be an integer in [1, 128], got 129."),
    ({"n": 2.0}, "n must be an integer in [1, 128], got 2.0."),
])
def test_bad_n_is_a_400(http, server, params, message):
    res = _generate(http, server, {"text": "a", "sampling_params": params}, 400)
    assert res["error"]["message"] == message


def test_n_must_agree_across_a_batch(http, server):
    res = _generate(http, server, {"text": ["a", "b"],
                                   "sampling_params": [{"n": 2}, {"n": 1}]}, 400)
    assert res["error"]["message"] == \
        "The parallel_sample_num should be the same for all samples in sample params."


def test_openai_n_samples_share_the_prompt(client):
    messages = [{"role": "user", "content": _unique_prompt()}]
    kw = {"model": "default", "messages": messages, "max_tokens": 4, "temperature": 1.0,
          "seed": 3, "extra_body": {"ignore_eos": True}}
    res = client.chat.completions.create(n=3, **kw)
    assert [c.index for c in res.choices] == [0, 1, 2]
    # Prompt tokens count once; the prompt was prefilled once for its three samples.
    one = client.chat.completions.create(n=1, **kw)
    assert res.usage.prompt_tokens == one.usage.prompt_tokens
    assert res.choices[0].message.content == one.choices[0].message.content


# --- logit_bias -------------------------------------------------------------------------------

GREEDY = {"temperature": 0, "max_new_tokens": 8, "ignore_eos": True}


def test_logit_bias_forbids_and_forces_tokens_on_generate(http, server):
    prompt = "The capital of France is"
    plain = _generate(http, server, {"text": prompt, "sampling_params": GREEDY})["output_ids"]
    banned = {str(t): -100 for t in plain}
    out = _generate(http, server, {"text": prompt,
                                   "sampling_params": {**GREEDY, "logit_bias": banned}})
    assert not set(out["output_ids"]) & set(plain), (plain, out["output_ids"])
    forced = next(t for t in range(100, 1000) if t not in plain)
    out = _generate(http, server, {"text": prompt, "sampling_params": {
        **GREEDY, "temperature": 1.0, "logit_bias": {str(forced): 100}}})
    assert out["output_ids"] == [forced] * 8


def test_logit_bias_through_the_openai_client(client):
    kw = {"model": "default", "prompt": "Once upon a time", "max_tokens": 6, "logprobs": 1,
          "extra_body": {"ignore_eos": True}}
    plain = client.completions.create(temperature=0, **kw).choices[0].logprobs
    forced = client.completions.create(temperature=1.0, logit_bias={"321": 100}, **kw)
    tokens = forced.choices[0].logprobs.tokens
    assert len(tokens) == 6 and len(set(tokens)) == 1 and tokens != plain.tokens
    # The logprobs are those of the biased distribution: the forced token has all the mass.
    assert all(lp > -1e-3 for lp in forced.choices[0].logprobs.token_logprobs)
    messages = [{"role": "user", "content": "Name three colors."}]
    chat = {"model": "default", "messages": messages, "max_tokens": 6, "temperature": 0,
            "logprobs": True, "extra_body": {"ignore_eos": True}}
    free = client.chat.completions.create(**chat).choices[0].logprobs.content
    again = client.chat.completions.create(logit_bias={"321": 100}, **chat)
    assert [t.token for t in again.choices[0].logprobs.content] == [tokens[0]] * 6
    assert [t.token for t in free] != [tokens[0]] * 6


@pytest.mark.parametrize("bias,message", [
    ({"5000000": 1}, "logit_bias must has keys in [0, "),
    ({"abc": 1}, "logit_bias keys must be token ids, got 'abc'."),
    ([1, 2], "logit_bias must be an object mapping token ids to biases."),
])
def test_bad_logit_bias_is_a_400_on_generate(http, server, bias, message):
    res = _generate(http, server, {"text": "a", "sampling_params": {"logit_bias": bias}}, 400)
    assert res["error"]["message"].startswith(message), res


# --- /abort_request ---------------------------------------------------------------------------

LONG = {"temperature": 0, "max_new_tokens": 2000, "ignore_eos": True}


def _start_stream(server, body):
    """A streaming /generate whose first chunk has arrived: (response, line iterator)."""
    res = session().post(f"{server.base_url}/generate", json={**body, "stream": True},
                         stream=True, timeout=120)
    lines = (ln for ln in res.iter_lines() if ln)
    assert next(lines).startswith(b"data: ")
    return res, lines


def _last_event(lines) -> dict:
    events = [ln for ln in lines if ln != b"data: [DONE]"]
    return json.loads(events[-1][len(b"data: "):])


def _wait_pool_full(http, server, timeout=30.0) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        info = http.get(f"{server.base_url}/get_server_info", timeout=30).json()
        if info["num_running_reqs"] == 0 and info["num_waiting_reqs"] == 0:
            assert info["available_kv_tokens"] + info["evictable_kv_tokens"] == \
                info["max_total_num_tokens"], info
            return
        time.sleep(0.1)
    raise AssertionError("server not idle")


def test_abort_request_by_rid_frees_its_kv_and_spares_the_others(http, server):
    prompt = "The capital of France is"
    short = {"text": prompt, "sampling_params": GREEDY}
    solo = _generate(http, server, short)["output_ids"]
    rid = uuid.uuid4().hex
    res, lines = _start_stream(server, {"text": "Once upon a time", "rid": rid,
                                        "sampling_params": LONG})
    with ThreadPoolExecutor(1) as pool:
        other = pool.submit(_generate, session(), server, short)
        ok = http.post(f"{server.base_url}/abort_request", json={"rid": rid}, timeout=30)
        assert ok.status_code == 200 and ok.content == b""
        last = _last_event(lines)
        assert other.result()["output_ids"] == solo
    assert last["meta_info"]["finish_reason"]["type"] == "abort"
    assert last["meta_info"]["completion_tokens"] < LONG["max_new_tokens"]
    res.close()
    _wait_pool_full(http, server)


def test_abort_all_ends_every_request(http, server):
    streams = [_start_stream(server, {"text": f"story {i}", "sampling_params": LONG})
               for i in range(2)]
    res = http.post(f"{server.base_url}/abort_request", json={"abort_all": True}, timeout=30)
    assert res.status_code == 200
    for response, lines in streams:
        assert _last_event(lines)["meta_info"]["finish_reason"]["type"] == "abort"
        response.close()
    _wait_pool_full(http, server)
    # An unknown rid is ignored, as upstream; the server keeps serving.
    res = http.post(f"{server.base_url}/abort_request", json={"rid": "nope"}, timeout=30)
    assert res.status_code == 200
    assert _generate(http, server, {"text": "a", "sampling_params": GREEDY})["output_ids"]


@pytest.mark.parametrize("body,message", [
    ({"rid": 5}, "rid must be a string."),
    ({"abort_all": "yes"}, "abort_all must be a boolean."),
    ([1], "The request body must be a JSON object."),
])
def test_bad_abort_request_is_a_400(http, server, body, message):
    res = http.post(f"{server.base_url}/abort_request", json=body, timeout=30)
    assert res.status_code == 400 and res.json()["error"]["message"] == message


# --- upstream's error wording ----------------------------------------------------------------


def test_duplicate_rid_and_too_many_completion_tokens_use_upstream_wording(http, server):
    rid = uuid.uuid4().hex
    res, lines = _start_stream(server, {"text": "a", "rid": rid, "sampling_params": LONG})
    dup = _generate(http, server, {"text": "b", "rid": rid}, 400)
    assert dup["error"]["message"] == f"Duplicate request ID detected: {rid}"
    batch = _generate(http, server, {"text": ["b", "c", "d"], "rid": ["x", "y", "x"]}, 400)
    assert batch["error"]["message"] == "Duplicate request IDs detected within the request: ['x']"
    http.post(f"{server.base_url}/abort_request", json={"rid": rid}, timeout=30)
    assert _last_event(lines)["meta_info"]["finish_reason"]["type"] == "abort"
    res.close()
    context_len = http.get(f"{server.base_url}/v1/models/default",
                           timeout=30).json()["max_model_len"]
    body = {"model": "default", "messages": [{"role": "user", "content": "a"}],
            "max_completion_tokens": context_len + 1}
    err = http.post(f"{server.base_url}/v1/chat/completions", json=body, timeout=30).json()
    assert err["error"]["message"] == (
        f"max_completion_tokens is too large: {context_len + 1}. This model supports at most "
        f"{context_len} completion tokens.")
    assert err["error"]["param"] == "max_completion_tokens"


# --- stop_regex -------------------------------------------------------------------------------


def test_stop_regex_stops_at_the_first_match(http, server, client):
    prompt = "Once upon a time"
    params = {"temperature": 0, "max_new_tokens": 12, "ignore_eos": True}
    plain = _generate(http, server, {"text": prompt, "sampling_params": params})
    ids = plain["output_ids"]
    tok = _tokenizer(server)
    # A pattern first matched once the fourth token is out (and not before).
    k = next(k for k in range(4, 12) if tok.decode(ids[k - 1:k]).strip()
             and tok.decode(ids[k - 1:k]) not in tok.decode(ids[:k - 1]))
    pattern = re.escape(tok.decode(ids[k - 1:k])) + "$"
    out = _generate(http, server, {"text": prompt,
                                   "sampling_params": {**params, "stop_regex": [pattern]}})
    assert out["output_ids"] == ids[:k]
    assert out["meta_info"]["finish_reason"] == {"type": "stop", "matched": pattern}
    res = client.completions.create(model="default", prompt=prompt, max_tokens=12,
                                    temperature=0, extra_body={"stop_regex": pattern,
                                                               "ignore_eos": True})
    assert res.choices[0].finish_reason == "stop" and res.choices[0].matched_stop == pattern
    bad = _generate(http, server, {"text": "a", "sampling_params": {"stop_regex": "("}}, 400)
    assert bad["error"]["message"].startswith("stop_regex '(' is not a valid regular expression")


def _tokenizer(server):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(server.model_path)
