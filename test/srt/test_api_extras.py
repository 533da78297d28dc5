"""Upstream SGLang's scoring, Responses API, token_ids_logprob and custom logit processors on a
real server process (with --enable-custom-logit-processor), checked against HF's full logits
on the same model and with the official openai client."""

from __future__ import annotations

import json
import math
from concurrent.futures import ThreadPoolExecutor

import openai
import pytest
import torch
from transformers import AutoTokenizer

from conftest import ForceToken

from sglab.srt.sampling.custom_logit_processor import CustomLogitProcessor
from sglab.test.runners import HFRunner

SERVER_ARGS = ["--skip-server-warmup", "--enable-custom-logit-processor"]
LABELS = [3, 17, 250]


@pytest.fixture(scope="module")
def server_hf(server):
    return HFRunner(server.model_path)


@pytest.fixture(scope="module")
def tokenizer(server):
    return AutoTokenizer.from_pretrained(server.model_path)


def _post(http, server, path, body, status=200):
    res = http.post(f"{server.base_url}{path}", json=body, timeout=120)
    assert res.status_code == status, res.text
    return res.json()


def _next_logprobs(hf: HFRunner, ids: list[int]) -> torch.Tensor:
    return torch.log_softmax(hf.logits(ids)[-1], dim=-1)


class Raise(CustomLogitProcessor):
    def __call__(self, logits, custom_param_list=None):
        raise RuntimeError("no")


# --- token_ids_logprob on /generate ---------------------------------------------------------


def test_generate_token_ids_logprob_matches_hf(http, server, server_hf):
    prompt = [11, 12, 13, 14, 15]
    out = _post(http, server, "/generate", {
        "input_ids": prompt, "return_logprob": True, "logprob_start_len": 0,
        "token_ids_logprob": LABELS,
        "sampling_params": {"max_new_tokens": 3, "temperature": 0, "ignore_eos": True}})
    meta = out["meta_info"]
    ref = torch.log_softmax(server_hf.logits(prompt + out["output_ids"]), dim=-1)
    got = [[lp for lp, _, _ in position] for position in meta["output_token_ids_logprobs"]]
    torch.testing.assert_close(torch.tensor(got), ref[4:7][:, LABELS], atol=2e-5, rtol=1e-4)
    assert [[t for _, t, _ in p] for p in meta["output_token_ids_logprobs"]] == [LABELS] * 3
    inputs = meta["input_token_ids_logprobs"]
    assert inputs[0] is None and len(inputs) == len(prompt)
    got = [[lp for lp, _, _ in position] for position in inputs[1:]]
    torch.testing.assert_close(torch.tensor(got), ref[:4][:, LABELS], atol=2e-5, rtol=1e-4)


def test_prefill_only_token_ids_logprob_is_the_next_position(http, server, server_hf):
    """What /v1/score's prefill-only requests read: no token, the labels' next logprobs."""
    prompt = [31, 32, 33]
    out = _post(http, server, "/generate", {
        "input_ids": prompt, "return_logprob": True, "token_ids_logprob": LABELS,
        "sampling_params": {"max_new_tokens": 0}})
    meta = out["meta_info"]
    assert out["output_ids"] == [] and meta["completion_tokens"] == 0
    assert meta["output_token_logprobs"] == [] and len(meta["output_token_ids_logprobs"]) == 1
    got = [lp for lp, _, _ in meta["output_token_ids_logprobs"][0]]
    torch.testing.assert_close(torch.tensor(got), _next_logprobs(server_hf, prompt)[LABELS],
                               atol=2e-5, rtol=1e-4)

@pytest.mark.parametrize("body,message", [
    ({"token_ids_logprob": [5, 10 ** 6]},
     "token_ids_logprob has an out-of-vocabulary token id 1000000 (vocab size: "),
    ({"token_ids_logprob": [[1], [2]], "sampling_params": {"n": 2}},
     "Cannot use list token_ids_logprob with parallel_sample_num > 1"),
    ({"token_ids_logprob": [[0]]}, "token_ids_logprob of a single request must be a flat list "
     "of integers"),
    ({"token_ids_logprob": [[0], [1, 2]]}, "must be a flat list of integers"),
    ({"token_ids_logprob": [1, "a"]}, "token_ids_logprob must be a flat list of integers"),
    ({"token_ids_logprob": "a"}, "token_ids_logprob must be a token id"),
])
def test_bad_token_ids_logprob_is_a_400(http, server, body, message):
    body = {"text": "hi", "return_logprob": True, "sampling_params": {"max_new_tokens": 1},
            **body}
    error = _post(http, server, "/generate", body, 400)["error"]
    assert message in error["message"], error


# --- /v1/score ----------------------------------------------------------------------------------


def test_score_text_items_match_hf(http, server, server_hf, tokenizer):
    query, items = "The sky is", [" blue", " a big green thing"]
    res = _post(http, server, "/v1/score", {"query": query, "items": items,
                                           "label_token_ids": LABELS})
    assert res["object"] == "scoring" and len(res["scores"]) == 2
    prompts = [tokenizer.encode(query + item) for item in items]
    for prompt, scores in zip(prompts, res["scores"]):
        want = _next_logprobs(server_hf, prompt)[LABELS].exp()
        torch.testing.assert_close(torch.tensor(scores), want, atol=1e-5, rtol=1e-4)
    assert res["usage"]["prompt_tokens"] == sum(map(len, prompts))
    soft = _post(http, server, "/v1/score", {"query": query, "items": items,
                                            "label_token_ids": LABELS, "apply_softmax": True})
    for prompt, scores in zip(prompts, soft["scores"]):
        want = torch.softmax(_next_logprobs(server_hf, prompt)[LABELS], dim=0)
        torch.testing.assert_close(torch.tensor(scores), want, atol=1e-5, rtol=1e-4)
        assert math.isclose(sum(scores), 1.0, rel_tol=1e-5)


def test_score_token_items_item_first(http, server, server_hf):
    query, items = [40, 41], [[7, 8, 9], [100]]
    res = _post(http, server, "/v1/score", {"query": query, "items": items,
                                           "label_token_ids": LABELS, "item_first": True})
    for item, scores in zip(items, res["scores"]):
        want = _next_logprobs(server_hf, item + query)[LABELS].exp()
        torch.testing.assert_close(torch.tensor(scores), want, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("body,message", [
    ({"query": "q", "items": ["a"]}, "label_token_ids is required for generation"),
    ({"query": "q", "label_token_ids": [1]}, "items must be provided"),
    ({"query": "q", "items": ["a"], "label_token_ids": [5000]},
     "Token ID 5000 is out of vocabulary (vocab size: "),
    ({"query": "q", "items": [[1, 2]], "label_token_ids": [1]},
     "Invalid combination of query/items types for score_request."),
    ({"query": "q", "items": ["a"], "label_token_ids": [1], "return_pooled_hidden_states": True},
     "return_pooled_hidden_states is not supported by sglab"),
    ({"query": "q", "items": ["a"], "label_token_ids": "x"}, "label_token_ids"),
])
def test_bad_score_requests_are_400s(http, server, body, message):
    error = _post(http, server, "/v1/score", body, 400)["error"]
    assert message in error["message"], error


def test_score_of_no_items_is_empty(http, server):
    res = _post(http, server, "/v1/score", {"query": "q", "items": [], "label_token_ids": [1]})
    assert res["scores"] == [] and res["usage"]["prompt_tokens"] == 0


# --- custom logit processors --------------------------------------------------------------------


def test_custom_logit_processor_on_generate_and_completions(http, server, client):
    out = _post(http, server, "/generate", {
        "text": "hello", "custom_logit_processor": ForceToken.to_str(),
        "sampling_params": {"max_new_tokens": 4, "temperature": 1.0,
                            "custom_params": {"token_id": 99}}})
    assert out["output_ids"] == [99] * 4
    res = client.completions.create(
        model="default", prompt="hello", max_tokens=3, temperature=1.0,
        extra_body={"custom_logit_processor": ForceToken.to_str(),
                    "custom_params": {"token_id": 98}})
    assert res.usage.completion_tokens == 3
    assert res.choices[0].text == server_tokenizer_decode(server, [98] * 3)


def server_tokenizer_decode(server, ids: list[int]) -> str:
    return AutoTokenizer.from_pretrained(server.model_path).decode(ids)


def test_a_failing_processor_fails_only_its_request(http, server):
    plain = {"text": "side by side", "sampling_params": {"max_new_tokens": 8, "temperature": 0,
                                                         "ignore_eos": True}}
    failing = {"text": "side by side", "custom_logit_processor": Raise.to_str(),
               "sampling_params": {"max_new_tokens": 8}}
    with ThreadPoolExecutor(4) as pool:
        futures = [pool.submit(http.post, f"{server.base_url}/generate", json=b, timeout=120)
                   for b in (plain, failing, plain, failing)]
        results = [f.result() for f in futures]
    for res in results[1::2]:
        assert res.status_code == 400
        assert "The custom logit processor failed: RuntimeError: no" in res.json()["error"][
            "message"]
    assert all(r.status_code == 200 and len(r.json()["output_ids"]) == 8 for r in results[::2])


def test_custom_logit_processor_needs_the_flag(shared_server, http):
    body = {"text": "hi", "custom_logit_processor": ForceToken.to_str(),
            "sampling_params": {"max_new_tokens": 1}}
    error = _post(http, shared_server, "/generate", body, 400)["error"]
    assert error["message"] == (
        "The server is not configured to enable custom logit processor. Please set "
        "`--enable-custom-logit-processor` to enable this feature.")
    chat = {"model": "default", "messages": [{"role": "user", "content": "hi"}],
            "custom_logit_processor": ForceToken.to_str()}
    error = _post(http, shared_server, "/v1/chat/completions", chat, 400)["error"]
    assert "--enable-custom-logit-processor" in error["message"]


# --- /v1/responses ------------------------------------------------------------------------------


def _greedy_reply(http, server, tokenizer, messages, max_new_tokens):
    prompt = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    ids = tokenizer.encode(prompt, add_special_tokens=False)
    out = _post(http, server, "/generate", {"input_ids": ids, "sampling_params": {
        "max_new_tokens": max_new_tokens, "temperature": 0, "ignore_eos": True}})
    return out["text"], len(ids)


def test_responses_create_and_retrieve(client, http, server, tokenizer):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    res = client.responses.create(model="default", instructions="Be brief.", input="Hi",
                                  max_output_tokens=6, temperature=0)
    want, prompt_len = _greedy_reply(http, server, tokenizer, messages, 6)
    assert res.object == "response" and res.status == "completed" and res.id.startswith("resp_")
    assert res.output_text == want and res.output[0].role == "assistant"
    assert (res.usage.input_tokens, res.usage.output_tokens) == (prompt_len, 6)
    again = client.responses.retrieve(res.id)
    assert again.id == res.id and again.output_text == want


def test_responses_usage_has_upstream_usage_info_names(http, server, tokenizer):
    body = {"model": "default", "input": "Hi", "max_output_tokens": 5, "temperature": 0,
            "ignore_eos": True}
    usage = _post(http, server, "/v1/responses", body)["usage"]
    _, prompt_len = _greedy_reply(http, server, tokenizer, [{"role": "user", "content": "Hi"}], 5)
    assert (usage["prompt_tokens"], usage["completion_tokens"]) == (prompt_len, 5)
    assert (usage["input_tokens"], usage["output_tokens"]) == (prompt_len, 5)
    assert usage["total_tokens"] == prompt_len + 5 and usage["reasoning_tokens"] == 0


def test_responses_stream_openai_events(client, http, server, tokenizer):
    input_items = [{"role": "user", "content": [{"type": "input_text", "text": "Count"}]}]
    with client.responses.stream(model="default", input=input_items, max_output_tokens=7,
                                 temperature=0) as stream:
        events = list(stream)
        final = stream.get_final_response()
    types = [e.type for e in events]
    assert types[:4] == ["response.created", "response.in_progress",
                         "response.output_item.added", "response.content_part.added"]
    assert types[-4:] == ["response.output_text.done", "response.content_part.done",
                          "response.output_item.done", "response.completed"]
    assert [e.sequence_number for e in events] == list(range(len(events)))
    deltas = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    want, _ = _greedy_reply(http, server, tokenizer, [{"role": "user", "content": "Count"}], 7)
    assert deltas == final.output_text == want
    assert client.responses.retrieve(final.id).output_text == want


def test_responses_continue_a_previous_response(client, server, tokenizer):
    first = client.responses.create(model="default", input="Hello", max_output_tokens=4,
                                    temperature=0)
    second = client.responses.create(model="default", input="And then?", max_output_tokens=2,
                                     previous_response_id=first.id, temperature=0)
    messages = [{"role": "user", "content": "Hello"},
                {"role": "assistant", "content": first.output_text},
                {"role": "user", "content": "And then?"}]
    prompt = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert second.usage.input_tokens == len(tokenizer.encode(prompt, add_special_tokens=False))


def test_background_responses_can_be_cancelled(client):
    res = client.responses.create(model="default", input="Go on", max_output_tokens=400,
                                  background=True, extra_body={"ignore_eos": True})
    assert res.status == "queued"
    assert client.responses.cancel(res.id).status == "cancelled"
    assert client.responses.retrieve(res.id).status == "cancelled"
    done = client.responses.create(model="default", input="x", max_output_tokens=1)
    with pytest.raises(openai.BadRequestError) as e:
        client.responses.cancel(done.id)
    assert e.value.body["message"] == "Cannot cancel a synchronous response."


def test_responses_errors(client):
    with pytest.raises(openai.NotFoundError) as e:
        client.responses.retrieve("resp_missing")
    assert e.value.body["message"] == "Response with id 'resp_missing' not found."
    with pytest.raises(openai.BadRequestError) as e:
        client.responses.retrieve("nope")
    assert e.value.body["param"] == "response_id"
    assert "Expected an ID that begins with 'resp'" in e.value.body["message"]
    with pytest.raises(openai.BadRequestError) as e:  # a function tool: not a built-in one
        client.responses.create(model="default", input="x", tools=[
            {"type": "function", "name": "f", "parameters": {}}])
    assert e.value.body["param"] == "tools.0.type"
    with pytest.raises(openai.BadRequestError) as e:
        client.responses.create(model="default", input="x",
                                tools=[{"type": "web_search_preview"}])
    assert e.value.body["param"] == "tools" and "tool server" in e.value.body["message"]
    with pytest.raises(openai.BadRequestError) as e:
        client.responses.create(model="default", input=[
            {"role": "user", "content": [{"type": "input_image", "image_url": "x"}]}])
    assert "text" in e.value.body["message"]
    with pytest.raises(openai.NotFoundError):
        client.responses.create(model="gpt-5", input="x")
    with pytest.raises(openai.NotFoundError):
        client.responses.create(model="default", input="x", previous_response_id="resp_gone")


def test_responses_stream_reports_a_refusal_before_any_event(http, server):
    res = http.post(f"{server.base_url}/v1/responses", json={
        "model": "default", "input": "x", "stream": True, "max_output_tokens": 10 ** 6},
        timeout=60)
    assert res.status_code == 400 and "maximum context length" in json.loads(res.text)[
        "error"]["message"]
