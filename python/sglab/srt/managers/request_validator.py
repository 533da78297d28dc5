"""The checks of one tokenized generate request, shared by the TokenizerManager and the scheduler.

The TokenizerManager runs them before a request leaves the main process, so a bad request is
answered with HTTP 400 and never reaches the scheduler. The scheduler runs them again on every
request it receives, with its own limits, because it is the authority on them and anything can
reach its socket: no request it accepts may stop its loop. Checks that need the raw JSON or the
tokenizer (text, unknown fields, the max_new_tokens default) stay in the TokenizerManager; the
adapter id a LoRA name stands for is bound by the scheduler, whose registry is the live one.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass

from sglab.srt.managers.io_struct import TokenizedGenerateReqInput
from sglab.srt.sampling.sampling_params import SamplingParams

_BOOL_SAMPLING_PARAMS = ("ignore_eos", "skip_special_tokens", "spaces_between_special_tokens",
                         "no_stop_trim")
# SamplingParams fields that nothing downstream reads: refused rather than ignored (the
# scheduler streams at the server's --stream-interval).
_IGNORED_SAMPLING_PARAMS = ("stream_interval",)
LORA_NOT_ENABLED = "LoRA is not enabled. Please set `--enable-lora` to enable LoRA."
CUSTOM_LOGIT_PROCESSOR_DISABLED = (  # upstream's wording
    "The server is not configured to enable custom logit processor. Please set "
    "`--enable-custom-logit-processor` to enable this feature.")


class InvalidRequestError(ValueError):
    """A request the server refuses; the message says why (HTTP 400)."""


@dataclass(frozen=True)
class RequestValidator:
    vocab_size: int
    context_len: int
    max_req_input_len: int
    max_total_num_tokens: int | None = None  # the KV pool; a prompt must fit in it
    enable_lora: bool = False

    def validate(self, req: TokenizedGenerateReqInput,
                 loaded_adapters: Collection[str] = ()) -> None:
        """Raise InvalidRequestError naming the first thing wrong with `req`."""
        self.check_input_ids(req.input_ids)
        self.check_sampling_params(req.sampling_params)
        if req.return_logprob:
            self.check_logprob_args(req.logprob_start_len, req.top_logprobs_num,
                                    len(req.input_ids))
        self.check_token_ids_logprob(req.token_ids_logprob)
        self.check_lora(req.lora_path, loaded_adapters)

    def check_input_ids(self, input_ids: list[int]) -> None:
        n = len(input_ids)
        if n == 0:
            raise InvalidRequestError("The input is empty: the prompt has no tokens.")
        if n > self.max_req_input_len:
            raise InvalidRequestError(
                f"The input ({n} tokens) is longer than the model's context length "
                f"({self.context_len} tokens; at most {self.max_req_input_len} input tokens).")
        if self.max_total_num_tokens is not None and n >= self.max_total_num_tokens:
            raise InvalidRequestError(f"The input ({n} tokens) does not fit in the KV cache "
                                      f"({self.max_total_num_tokens} tokens).")
        vocab = self.vocab_size
        bad = next((t for t in input_ids if not 0 <= t < vocab), None)
        if bad is not None:
            raise InvalidRequestError(
                f"Token id {bad!r} in input_ids is out of the vocabulary [0, {vocab}).")

    def check_sampling_params(self, params: SamplingParams) -> None:
        if not isinstance(params, SamplingParams):
            raise InvalidRequestError(
                f"sampling_params has the wrong type: {type(params).__name__}.")
        try:
            params.verify(self.vocab_size)
        except (TypeError, ValueError) as e:
            raise InvalidRequestError(str(e)) from None
        for name in _BOOL_SAMPLING_PARAMS:
            if not isinstance(getattr(params, name), bool):
                raise InvalidRequestError(f"{name} must be a boolean.")
        for name in _IGNORED_SAMPLING_PARAMS:
            if getattr(params, name) not in (None, {}):
                raise InvalidRequestError(f"{name} is not supported by sglab (per request).")
        if params.custom_params is not None and not isinstance(params.custom_params, dict):
            raise InvalidRequestError("custom_params must be an object.")

    def check_logprob_args(self, logprob_start_len: int, top_logprobs_num: int,
                           prompt_len: int) -> None:
        start = logprob_start_len
        if not _is_int(start) or (start != -1 and not 0 <= start < prompt_len):
            raise InvalidRequestError(
                f"logprob_start_len ({start!r}) must be -1 or in [0, {prompt_len}) for an "
                f"input of {prompt_len} tokens.")
        top = top_logprobs_num
        if not _is_int(top) or not 0 <= top <= self.vocab_size:
            raise InvalidRequestError(
                f"top_logprobs_num must be an integer in [0, {self.vocab_size}], got {top!r}.")

    def check_token_ids_logprob(self, token_ids: list[int] | None) -> None:
        if token_ids is None:
            return
        if not isinstance(token_ids, list) or not all(_is_int(t) for t in token_ids):
            raise InvalidRequestError("token_ids_logprob must be a flat list of integers "
                                      "(token ids).")
        check_vocab_ids(token_ids, self.vocab_size, field="token_ids_logprob")

    def check_lora(self, lora_name: str | None, loaded_adapters: Collection[str]) -> None:
        """`lora_name` is None (the base model) or the name of a loaded adapter."""
        if lora_name is None:
            return
        if not self.enable_lora:
            raise InvalidRequestError(LORA_NOT_ENABLED)
        if lora_name not in loaded_adapters:
            loaded = ", ".join(sorted(loaded_adapters)) or "none"
            raise InvalidRequestError(f"The requested LoRA adapter {lora_name!r} is not loaded. "
                                      f"Loaded adapters: {loaded}.")


def check_vocab_ids(token_ids: list[int], vocab_size: int, field: str | None = None) -> None:
    """Every id in [0, vocab_size), in upstream's words: its /v1/score check's, or with `field`
    its request-field check's."""
    for token_id in token_ids:
        if not 0 <= token_id < vocab_size:
            raise InvalidRequestError(
                f"{field} has an out-of-vocabulary token id {token_id} (vocab size: "
                f"{vocab_size})" if field else
                f"Token ID {token_id} is out of vocabulary (vocab size: {vocab_size})")


def _is_int(x: object) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)
