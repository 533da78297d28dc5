"""RequestValidator: each check refuses what it should, naming it, and lets a good request by."""

from __future__ import annotations

import pytest

from sglab.srt.managers.io_struct import TokenizedGenerateReqInput
from sglab.srt.managers.request_validator import InvalidRequestError, RequestValidator
from sglab.srt.sampling.sampling_params import SamplingParams

VALIDATOR = RequestValidator(vocab_size=100, context_len=64, max_req_input_len=63,
                             max_total_num_tokens=50, enable_lora=True)


def _req(input_ids=(1, 2, 3), params=None, **kwargs) -> TokenizedGenerateReqInput:
    sp = params if isinstance(params, SamplingParams) else SamplingParams.from_dict(params)
    return TokenizedGenerateReqInput(rid="r", input_text=None, input_ids=list(input_ids),
                                     sampling_params=sp, **kwargs)


def test_a_good_request_passes_unchanged():
    req = _req(params={"temperature": 0.5, "stop_token_ids": [99, 119690]}, return_logprob=True,
               logprob_start_len=2, top_logprobs_num=100, lora_path="a")
    before = repr(req)
    VALIDATOR.validate(req, loaded_adapters={"a": "/path"})
    assert repr(req) == before


@pytest.mark.parametrize("req, message", [
    (_req([]), "The input is empty"),
    (_req([1] * 64), "longer than the model's context length (64 tokens; at most 63"),
    (_req([1] * 50), "does not fit in the KV cache (50 tokens)"),
    (_req([1, 100]), "Token id 100 in input_ids is out of the vocabulary [0, 100)"),
    (_req([-1]), "Token id -1 in input_ids"),
    (_req(params={"top_p": 0}), "top_p must be in (0, 1]"),
    (_req(params={"stop_token_ids": [2**64]}), "stop_token_ids must be 64-bit signed"),
    (_req(params={"ignore_eos": 1}), "ignore_eos must be a boolean"),
    (_req(params={"stream_interval": 2}), "stream_interval is not supported"),
    (_req(params={"min_new_tokens": 9, "max_new_tokens": 3}), "min_new_tokens must be <="),
    (_req(params={}, return_logprob=True, logprob_start_len=3), "logprob_start_len (3) must"),
    (_req(params={}, return_logprob=True, logprob_start_len="0"), "logprob_start_len ('0')"),
    (_req(params={}, return_logprob=True, top_logprobs_num=101), "top_logprobs_num must be"),
    (_req(params={}, return_logprob=True, top_logprobs_num=True), "got True"),
    (_req(params={}, lora_path="b"), "adapter 'b' is not loaded. Loaded adapters: a."),
], ids=lambda x: x if isinstance(x, str) else "")
def test_bad_requests_are_refused_by_name(req, message):
    with pytest.raises(InvalidRequestError) as e:
        VALIDATOR.validate(req, loaded_adapters={"a": "/path"})
    assert message in str(e.value)


def test_logprob_args_are_checked_only_when_logprobs_are_asked_for():
    VALIDATOR.validate(_req(logprob_start_len=7, top_logprobs_num=10**9))


def test_lora_needs_enable_lora_and_the_pool_limit_is_optional():
    without = RequestValidator(vocab_size=100, context_len=64, max_req_input_len=63)
    without.validate(_req([1] * 60))
    with pytest.raises(InvalidRequestError, match="--enable-lora"):
        without.validate(_req(lora_path="a"), loaded_adapters={"a": "/path"})
    with pytest.raises(InvalidRequestError, match="Loaded adapters: none"):
        VALIDATOR.validate(_req(lora_path="a"))


def test_a_foreign_sampling_params_object_is_refused():
    with pytest.raises(InvalidRequestError, match="sampling_params has the wrong type: dict"):
        VALIDATOR.validate(TokenizedGenerateReqInput(rid="r", input_text=None, input_ids=[1],
                                                     sampling_params={"top_p": 1}))
