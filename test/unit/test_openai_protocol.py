"""OpenAI layer without a server: request models, sampling-param mapping, logprob formats,
usage, and the order and content of streamed chunks."""

from __future__ import annotations

import asyncio
import json
from types import SimpleNamespace

import pytest
from pydantic import ValidationError
from sglab.srt.entrypoints.openai.protocol import (
    ChatCompletionRequest,
    ChatCompletionStreamResponse,
    CompletionRequest,
)
from sglab.srt.entrypoints.openai.serving_base import ParamError, usage_from_outputs
from sglab.srt.entrypoints.openai.serving_chat import OpenAIServingChat, to_chat_logprobs
from sglab.srt.entrypoints.openai.serving_completions import (
    OpenAIServingCompletion,
    _split_prompts,
    to_legacy_logprobs,
)
from sglab.srt.sampling.sampling_params import SamplingParams

MODEL = "/models/tiny"


def _fake_tm(generation_defaults=None):
    return SimpleNamespace(served_model_name=MODEL, model_path=MODEL, tokenizer=None,
                           generation_defaults=generation_defaults or {},
                           server_args=SimpleNamespace(enable_cache_report=False))


def _out(text, completion_tokens, reason=None, prompt_tokens=3, index=None, logprobs=None):
    meta = {"id": "r", "finish_reason": reason, "prompt_tokens": prompt_tokens,
            "completion_tokens": completion_tokens, "cached_tokens": 0,
            "weight_version": "default"}
    if logprobs is not None:
        meta["output_token_logprobs"] = logprobs
    out = {"text": text, "output_ids": list(range(completion_tokens)), "meta_info": meta}
    if index is not None:
        out["index"] = index
    return out


async def _aiter(items):
    for item in items:
        yield item


def _chunks(serving, outputs, request, context):
    async def run():
        return [c async for c in serving._generate_chunks(_aiter(outputs), request, context)]

    raw = asyncio.run(run())
    assert all(c.startswith(b"data: ") and c.endswith(b"\n\n") for c in raw)
    return [json.loads(c[len(b"data: "):]) for c in raw]


# --- request models -------------------------------------------------------------------------


def test_completion_prompt_shapes():
    assert _split_prompts(CompletionRequest(prompt="hi").prompt) == (["hi"], True)
    assert _split_prompts(CompletionRequest(prompt=["a", "b"]).prompt) == (["a", "b"], True)
    assert _split_prompts(CompletionRequest(prompt=[1, 2, 3]).prompt) == ([[1, 2, 3]], False)
    assert _split_prompts(CompletionRequest(prompt=[[1], [2, 3]]).prompt) == ([[1], [2, 3]],
                                                                             False)


def test_defaults_follow_upstream():
    req = CompletionRequest(prompt="hi")
    assert (req.model, req.max_tokens, req.temperature, req.n, req.stream) == \
        ("default", 16, 1.0, 1, False)
    chat = ChatCompletionRequest(messages=[{"role": "user", "content": "hi"}])
    assert chat.temperature is None and chat.max_tokens is None and chat.logprobs is False


@pytest.mark.parametrize("body", [
    {"prompt": "hi", "max_tokens": "many"},
    {"prompt": "hi", "temperature": "hot"},
    {"prompt": {"text": "hi"}},
    {"prompt": "hi", "logprobs": -1},
    {"max_tokens": 3},
])
def test_completion_rejects_wrong_types(body):
    with pytest.raises(ValidationError):
        CompletionRequest(**body)


@pytest.mark.parametrize("body", [
    {"messages": []},
    {"messages": [{"role": "wizard", "content": "hi"}]},
    {"messages": [{"role": "user", "content": "hi"}], "top_logprobs": -2},
    {"messages": "hi"},
])
def test_chat_rejects_wrong_types(body):
    with pytest.raises(ValidationError):
        ChatCompletionRequest(**body)


# --- mapping to sampling params -------------------------------------------------------------


def test_completion_sampling_params_are_all_known_and_carry_values():
    serving = OpenAIServingCompletion(_fake_tm())
    req = CompletionRequest(prompt="hi", max_tokens=7, temperature=0.5, top_k=3, stop=["x"],
                            ignore_eos=True, seed=11, min_tokens=2)
    obj, context = serving._convert_to_internal_request(req)
    params = obj.sampling_params
    SamplingParams.from_dict(params).verify(100)  # every key is a real sampling parameter
    assert params["max_new_tokens"] == 7 and params["temperature"] == 0.5
    assert params["top_k"] == 3 and params["stop"] == ["x"] and params["ignore_eos"] is True
    assert params["sampling_seed"] == 11 and params["min_new_tokens"] == 2
    assert obj.text == "hi" and obj.rid == context["id"]


def test_completion_n_is_parallel_sampling_of_each_prompt():
    serving = OpenAIServingCompletion(_fake_tm())
    obj, context = serving._convert_to_internal_request(
        CompletionRequest(prompt=["a", "b"], n=2, logit_bias={"3": -100}))
    assert obj.text == ["a", "b"] and obj.sampling_params["n"] == 2
    assert obj.sampling_params["logit_bias"] == {"3": -100.0}
    assert len(set(obj.rid)) == 2 and context["n"] == 2
    obj.normalize_batch_and_arguments()
    assert obj.parallel_sample_num == 2 and obj.answers_as_batch
    assert all("n" not in p for p in obj.sampling_params)


def test_chat_uses_model_defaults_only_when_unset():
    serving = OpenAIServingChat(_fake_tm({"temperature": 0.6, "top_p": 0.95}))
    req = ChatCompletionRequest(messages=[{"role": "user", "content": "hi"}], top_p=0.5,
                                max_completion_tokens=9, max_tokens=100)
    params = serving._sampling_params(req, req.max_completion_tokens)
    assert params["temperature"] == 0.6 and params["top_p"] == 0.5
    assert params["max_new_tokens"] == 9
    assert "top_k" not in params
    SamplingParams.from_dict(params).verify(100)


def test_model_validation():
    serving = OpenAIServingCompletion(_fake_tm())
    for name in (MODEL, "default"):
        serving._validate_model(name)
    with pytest.raises(ParamError, match="does not exist") as e:
        serving._validate_model("gpt-4")
    assert e.value.param == "model"
    with pytest.raises(ParamError, match="LoRA"):
        serving._validate_model(f"{MODEL}:adapter")


@pytest.mark.parametrize("n", [0, 1000])
def test_n_out_of_range(n):
    with pytest.raises(ParamError, match="n must be"):
        OpenAIServingCompletion(_fake_tm())._sampling_params(
            CompletionRequest(prompt="x", n=n), 4)


# --- logprobs and usage ---------------------------------------------------------------------


def test_legacy_logprobs_offsets_and_top():
    tokens = [[-0.5, 10, "Hel"], [-1.0, 11, "lo"]]
    tops = [[[-0.5, 10, "Hel"], [-2.0, 12, "He"]], [[-1.0, 11, "lo"]]]
    logprobs, end = to_legacy_logprobs(tokens, tops, 4)
    assert logprobs.tokens == ["Hel", "lo"] and logprobs.token_logprobs == [-0.5, -1.0]
    assert logprobs.text_offset == [4, 7] and end == 9
    assert logprobs.top_logprobs == [{"Hel": -0.5, "He": -2.0}, {"lo": -1.0}]


def test_chat_logprobs_bytes():
    content = to_chat_logprobs([[-0.1, 5, "é"]], [[[-0.1, 5, "é"], [-3.0, 6, "e"]]]).content
    assert content[0].token == "é" and content[0].bytes == [0xC3, 0xA9]
    assert [t.token for t in content[0].top_logprobs] == ["é", "e"]


def test_usage_counts_each_prompt_once_per_n():
    outs = [_out("a", 4, prompt_tokens=3), _out("b", 5, prompt_tokens=3),
            _out("c", 6, prompt_tokens=7), _out("d", 1, prompt_tokens=7)]
    usage = usage_from_outputs(outs, n=2, enable_cache_report=False)
    assert (usage.prompt_tokens, usage.completion_tokens, usage.total_tokens) == (10, 16, 26)


# --- streaming chunks -----------------------------------------------------------------------


def _chat_request(**kw):
    return ChatCompletionRequest(messages=[{"role": "user", "content": "hi"}], stream=True,
                                 **kw)


STREAM = [_out("He", 1), _out("Hello", 2), _out("Hello wo", 3),
          _out("Hello world", 4, {"type": "stop", "matched": 7})]


def test_chat_stream_chunk_order():
    serving = OpenAIServingChat(_fake_tm())
    chunks = _chunks(serving, STREAM, _chat_request(), {"id": "x", "created": 1, "n": 1})
    first, *content, finish = chunks
    assert first["choices"][0]["delta"] == {"role": "assistant", "content": "",
                                            "reasoning_content": None, "tool_calls": None}
    assert "".join(c["choices"][0]["delta"]["content"] for c in content) == "Hello world"
    assert all(c["choices"][0]["finish_reason"] is None for c in content)
    assert finish["choices"][0]["delta"] == {"role": None, "content": None,
                                             "reasoning_content": None, "tool_calls": None}
    assert finish["choices"][0]["finish_reason"] == "stop"
    assert finish["choices"][0]["matched_stop"] == 7
    assert all(c["choices"] for c in chunks)  # no usage chunk unless asked


def test_chat_stream_usage_chunk_when_asked():
    serving = OpenAIServingChat(_fake_tm())
    req = _chat_request(stream_options={"include_usage": True})
    chunks = _chunks(serving, STREAM, req, {"id": "x", "created": 1, "n": 1})
    assert chunks[-1]["choices"] == []
    assert chunks[-1]["usage"]["completion_tokens"] == 4
    assert chunks[-1]["usage"]["total_tokens"] == 7
    assert ChatCompletionStreamResponse.model_validate(chunks[-1]).usage.prompt_tokens == 3


def test_completion_stream_deltas_and_final_chunk():
    serving = OpenAIServingCompletion(_fake_tm())
    req = CompletionRequest(prompt="hi", stream=True)
    outs = [_out("", 1), *STREAM]
    chunks = _chunks(serving, outs, req, {"id": "x", "created": 1, "n": 1, "echo": None})
    assert "".join(c["choices"][0]["text"] for c in chunks) == "Hello world"
    assert [c["choices"][0]["finish_reason"] for c in chunks][-1] == "stop"
    assert all(c["choices"][0]["finish_reason"] is None for c in chunks[:-1])
    assert all(c["choices"][0]["text"] for c in chunks[:-1])  # empty updates are skipped
    assert all(c["usage"] is None for c in chunks)


def test_completion_stream_batch_indices_and_logprobs():
    serving = OpenAIServingCompletion(_fake_tm())
    req = CompletionRequest(prompt=["a", "b"], stream=True, logprobs=0,
                            stream_options={"include_usage": True})
    lp = [[-0.1, 1, "x"], [-0.2, 2, "y"]]
    outs = [_out("x", 1, index=1, logprobs=lp[:1]), _out("x", 1, index=0, logprobs=lp[:1]),
            _out("xy", 2, {"type": "length", "length": 2}, index=1, logprobs=lp),
            _out("xy", 2, {"type": "length", "length": 2}, index=0, logprobs=lp)]
    chunks = _chunks(serving, outs, req, {"id": "x", "created": 1, "n": 1, "echo": None})
    for index in (0, 1):
        mine = [c["choices"][0] for c in chunks if c["choices"] and
                c["choices"][0]["index"] == index]
        assert "".join(c["text"] for c in mine) == "xy"
        assert sum((c["logprobs"]["token_logprobs"] for c in mine), []) == [-0.1, -0.2]
        assert [c["logprobs"]["text_offset"] for c in mine] == [[0], [1]]
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 4


@pytest.mark.parametrize("seed", [1 << 63, -(1 << 63) - 1, 1 << 64])
def test_seed_outside_int64_is_refused_by_name(seed):
    for model, body in ((CompletionRequest, {"prompt": "Hi"}),
                        (ChatCompletionRequest, {"messages": [{"role": "user", "content": "Hi"}]})):
        with pytest.raises(ValidationError, match="seed"):
            model(**body, seed=seed)
        for edge in ((1 << 63) - 1, -(1 << 63)):
            assert model(**body, seed=edge).seed == edge
