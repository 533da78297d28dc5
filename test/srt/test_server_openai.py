"""The OpenAI-compatible API of a real server process, driven by the official `openai` client:
completions and chat, stream and not, usage, stop strings, logprobs, models, errors."""

from __future__ import annotations

import json

import openai
import pytest
from transformers import AutoTokenizer

SERVER_ARGS = ["--skip-server-warmup"]
PROMPT = "The quick brown fox"
MESSAGES = [{"role": "system", "content": "You are terse."},
            {"role": "user", "content": "Name three colors."}]
GREEDY = {"temperature": 0, "extra_body": {"ignore_eos": True}}


@pytest.fixture(scope="module")
def model(server):
    return server.model_path  # served under its path (no --served-model-name)


@pytest.fixture(scope="module")
def tokenizer(server):
    return AutoTokenizer.from_pretrained(server.model_path)


def _native(http, server, body):
    res = http.post(f"{server.base_url}/generate", json=body, timeout=120)
    assert res.status_code == 200, res.text
    return res.json()


def _stop_candidate(text: str) -> str:
    """A stop string that first occurs after the start of `text`."""
    for size in (3, 2, 1):
        for start in range(1, len(text) - size + 1):
            stop = text[start:start + size]
            if stop.strip() and "\ufffd" not in stop and text.find(stop) == start:
                return stop
    pytest.skip(f"no usable stop string in {text!r}")


def _chat_ids(tokenizer, messages=MESSAGES):
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return tokenizer.encode(text, add_special_tokens=False)


# --- completions ------------------------------------------------------------------------------


def test_completion_matches_native_generate(client, model, http, server, tokenizer):
    res = client.completions.create(model=model, prompt=PROMPT, max_tokens=10, **GREEDY)
    native = _native(http, server, {"text": PROMPT, "sampling_params": {
        "temperature": 0, "max_new_tokens": 10, "ignore_eos": True}})
    choice = res.choices[0]
    assert res.object == "text_completion" and res.model == model
    assert choice.text == native["text"] and choice.finish_reason == "length"
    assert res.usage.prompt_tokens == len(tokenizer.encode(PROMPT))
    assert res.usage.completion_tokens == 10
    assert res.usage.total_tokens == res.usage.prompt_tokens + 10


def test_completion_stream_matches_non_stream(client, model):
    full = client.completions.create(model=model, prompt=PROMPT, max_tokens=12, **GREEDY)
    chunks = list(client.completions.create(model=model, prompt=PROMPT, max_tokens=12,
                                            stream=True, **GREEDY))
    assert all(c.choices for c in chunks)  # no usage chunk unless asked
    assert "".join(c.choices[0].text for c in chunks) == full.choices[0].text
    assert chunks[-1].choices[0].finish_reason == "length"
    assert all(c.choices[0].finish_reason is None for c in chunks[:-1])
    assert len({c.id for c in chunks}) == 1


def test_completion_stream_usage(client, model):
    chunks = list(client.completions.create(
        model=model, prompt=PROMPT, max_tokens=5, stream=True,
        stream_options={"include_usage": True}, **GREEDY))
    assert chunks[-1].choices == []
    assert chunks[-1].usage.completion_tokens == 5
    assert all(c.usage is None for c in chunks[:-1])


def test_completion_batch_and_n(client, model, tokenizer):
    res = client.completions.create(model=model, prompt=[PROMPT, "Hello there"], max_tokens=4,
                                    **GREEDY)
    assert [c.index for c in res.choices] == [0, 1]
    single = client.completions.create(model=model, prompt="Hello there", max_tokens=4,
                                       **GREEDY)
    assert res.choices[1].text == single.choices[0].text
    ids = tokenizer.encode(PROMPT)
    res = client.completions.create(model=model, prompt=ids, max_tokens=4, n=2,
                                    temperature=1.0, seed=None)
    assert len(res.choices) == 2
    assert res.usage.prompt_tokens == len(ids) and res.usage.completion_tokens <= 8


def test_completion_stop_string(client, model):
    full = client.completions.create(model=model, prompt=PROMPT, max_tokens=16,
                                     **GREEDY).choices[0].text
    stop = _stop_candidate(full)
    res = client.completions.create(model=model, prompt=PROMPT, max_tokens=16, stop=[stop],
                                    **GREEDY)
    assert res.choices[0].text == full[:full.index(stop)]
    assert res.choices[0].finish_reason == "stop"
    chunks = list(client.completions.create(model=model, prompt=PROMPT, max_tokens=16,
                                            stop=stop, stream=True, **GREEDY))
    assert "".join(c.choices[0].text for c in chunks) == full[:full.index(stop)]


def test_completion_logprobs_and_echo(client, model, tokenizer):
    res = client.completions.create(model=model, prompt=PROMPT, max_tokens=5, logprobs=2,
                                    **GREEDY)
    lp = res.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == 5
    assert "".join(lp.tokens) == res.choices[0].text
    assert all(len(top) <= 2 and max(top.values()) >= v
               for top, v in zip(lp.top_logprobs, lp.token_logprobs))
    assert lp.text_offset == sorted(lp.text_offset)
    echo = client.completions.create(model=model, prompt=PROMPT, max_tokens=3, echo=True,
                                     logprobs=0, **GREEDY)
    assert echo.choices[0].text.startswith(PROMPT)
    n_prompt = len(tokenizer.encode(PROMPT))
    assert len(echo.choices[0].logprobs.tokens) == n_prompt + 3
    assert echo.choices[0].logprobs.token_logprobs[0] is None


# --- chat -------------------------------------------------------------------------------------


def test_chat_matches_native_generate(client, model, http, server, tokenizer):
    res = client.chat.completions.create(model=model, messages=MESSAGES,
                                         max_completion_tokens=10, **GREEDY)
    ids = _chat_ids(tokenizer)
    native = _native(http, server, {"input_ids": ids, "sampling_params": {
        "temperature": 0, "max_new_tokens": 10, "ignore_eos": True}})
    msg = res.choices[0].message
    assert res.object == "chat.completion" and msg.role == "assistant"
    assert msg.content == native["text"]
    assert res.usage.prompt_tokens == len(ids) and res.usage.completion_tokens == 10
    assert res.choices[0].finish_reason == "length"


def test_chat_stream_chunks(client, model):
    full = client.chat.completions.create(model=model, messages=MESSAGES, max_tokens=8,
                                          **GREEDY)
    chunks = list(client.chat.completions.create(
        model=model, messages=MESSAGES, max_tokens=8, stream=True,
        stream_options={"include_usage": True}, **GREEDY))
    first, *middle, finish, usage = chunks
    assert first.choices[0].delta.role == "assistant" and first.choices[0].delta.content == ""
    assert "".join(c.choices[0].delta.content for c in middle) == \
        full.choices[0].message.content
    assert finish.choices[0].finish_reason == "length"
    assert finish.choices[0].delta.content is None
    assert usage.choices == [] and usage.usage.completion_tokens == 8
    assert usage.usage.prompt_tokens == full.usage.prompt_tokens


def test_chat_stop_and_max_completion_tokens(client, model):
    res = client.chat.completions.create(model=model, messages=MESSAGES,
                                         max_completion_tokens=3, max_tokens=50, **GREEDY)
    assert res.usage.completion_tokens == 3
    full = client.chat.completions.create(model=model, messages=MESSAGES, max_tokens=16,
                                          **GREEDY).choices[0].message.content
    stop = _stop_candidate(full)
    res = client.chat.completions.create(model=model, messages=MESSAGES, max_tokens=16,
                                         stop=stop, **GREEDY)
    assert res.choices[0].message.content == full[:full.index(stop)]
    assert res.choices[0].finish_reason == "stop"


def test_chat_logprobs(client, model):
    res = client.chat.completions.create(model=model, messages=MESSAGES, max_tokens=4,
                                         logprobs=True, top_logprobs=3, **GREEDY)
    content = res.choices[0].logprobs.content
    assert len(content) == 4
    assert "".join(t.token for t in content) == res.choices[0].message.content
    for t in content:
        assert len(t.top_logprobs) == 3 and t.top_logprobs[0].token == t.token


# --- models and errors ------------------------------------------------------------------------


def test_models(client, model, http, server):
    models = client.models.list()
    assert [m.id for m in models.data] == [model]
    assert models.data[0].max_model_len == 4096
    assert client.models.retrieve(model).id == model
    res = http.get(f"{server.base_url}/v1/models/no-such-model", timeout=30)
    assert res.status_code == 404
    assert res.json()["error"]["code"] == "model_not_found"


@pytest.mark.parametrize("kwargs", [
    {"max_tokens": -1},
    {"temperature": -1.0},
    {"top_p": 0.0},
    {"n": 0},
    {"prompt": "x" * 20000},
    {"prompt": []},
    {"prompt": [10**9]},
    {"extra_body": {"logit_bias_typo": 1, "top_k": 0}},
    {"extra_body": {"regex": "(a"}},
    {"logit_bias": {"1000000": 1.0}},
    {"logit_bias": {"x": 1.0}},
])
def test_completion_errors_are_400(client, model, kwargs):
    args = {"model": model, "prompt": PROMPT, "max_tokens": 2, **kwargs}
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(**args)
    body = e.value.body
    assert body["message"] and body["type"] == "invalid_request_error" and "code" in body
    assert client.completions.create(model=model, prompt="ok", max_tokens=1).choices


@pytest.mark.parametrize("kwargs", [
    {"messages": []},
    {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]},
    {"response_format": {"type": "json_schema", "json_schema": {"name": "no_schema"}}},
    {"top_logprobs": 3},
    {"max_tokens": 10**6},
])
def test_chat_errors_are_400(client, model, kwargs):
    args = {"model": model, "messages": MESSAGES, "max_tokens": 2, **kwargs}
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(**args)
    assert client.chat.completions.create(model=model, messages=MESSAGES,
                                          max_tokens=1).choices


def test_malformed_bodies_are_400(http, server):
    url = f"{server.base_url}/v1/chat/completions"
    for data in (b"{not json", b'"a string"', json.dumps({"messages": "hi"}).encode(),
                 json.dumps({"messages": [{"role": "user"}], "max_tokens": "two"}).encode()):
        res = http.post(url, data=data, headers={"Content-Type": "application/json"},
                        timeout=30)
        assert res.status_code == 400, res.text
        error = res.json()["error"]
        assert set(error) == {"message", "type", "param", "code"}
    res = http.post(f"{server.base_url}/v1/completions",
                    json={"prompt": "hi", "max_tokens": "two"}, timeout=30)
    assert res.status_code == 400 and res.json()["error"]["param"] == "max_tokens"
