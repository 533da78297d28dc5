"""Messages between the TokenizerManager, the scheduler and the detokenizer (pickled over ZMQ)."""

from __future__ import annotations

import json
import uuid
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from sglab.srt.sampling.sampling_params import SamplingParams


@dataclass
class GenerateReqInput:
    """A /generate request (or one from the Engine / OpenAI layer); any field may be a batch."""

    text: str | list[str] | None = None
    input_ids: list[int] | list[list[int]] | None = None
    input_embeds: Any = None
    sampling_params: dict | list[dict] | None = None
    rid: str | list[str] | None = None
    stream: bool = False
    return_logprob: bool | list[bool] = False
    logprob_start_len: int | list[int] = -1
    top_logprobs_num: int | list[int] = 0
    token_ids_logprob: Any = None
    return_text_in_logprobs: bool = False
    lora_path: str | list[str | None] | None = None
    return_hidden_states: bool = False
    return_routed_experts: bool = False
    image_data: Any = None
    session_params: Any = None
    custom_logit_processor: Any = None
    priority: int | None = None
    extra_key: str | None = None
    routed_dp_rank: int | None = None
    log_metrics: bool = True
    # Set by normalize_batch_and_arguments(): `batch_size` prompts, each sampled
    # `parallel_sample_num` times (sampling_params' `n`, the same for every prompt).
    is_single: bool = True
    batch_size: int = 1
    parallel_sample_num: int = 1

    def normalize_batch_and_arguments(self) -> None:
        """Validate the shape of the request and expand every per-item field to a list."""
        given = [x is not None for x in (self.text, self.input_ids, self.input_embeds)]
        if sum(given) != 1:
            raise ValueError("Exactly one of text, input_ids or input_embeds must be given.")
        if self.input_embeds is not None:
            raise ValueError("input_embeds is not supported by sglab.")
        for name in ("image_data", "session_params"):
            if getattr(self, name) is not None:
                raise ValueError(f"{name} is not supported by sglab.")
        if self.text is not None:
            self.is_single = isinstance(self.text, str)
            if not self.is_single and not (isinstance(self.text, list)
                                           and all(isinstance(t, str) for t in self.text)):
                raise ValueError("text must be a string or a list of strings, got "
                                 f"{_type_name(self.text)}.")
            self.batch_size = 1 if self.is_single else len(self.text)
        else:
            self.is_single, self.batch_size = _ids_shape(self.input_ids)
        if self.batch_size == 0:
            raise ValueError("The batch is empty.")
        n = self.batch_size
        self.sampling_params = _expand(self.sampling_params, n, "sampling_params", dict, {})
        self.parallel_sample_num = _parallel_sample_num(self.sampling_params)
        self.rid = _expand(self.rid, n, "rid", str, None)
        self.rid = [r if r is not None else uuid.uuid4().hex for r in self.rid]
        if len(set(self.rid)) != n:
            duplicates = [r for r, count in Counter(self.rid).items() if count > 1]
            raise ValueError(f"Duplicate request IDs detected within the request: {duplicates}")
        self.return_logprob = _expand(self.return_logprob, n, "return_logprob", bool, False)
        self.logprob_start_len = _expand(self.logprob_start_len, n, "logprob_start_len", int, -1)
        self.top_logprobs_num = _expand(self.top_logprobs_num, n, "top_logprobs_num", int, 0)
        self.lora_path = _expand(self.lora_path, n, "lora_path", str, None)
        self.token_ids_logprob = _expand_token_ids_logprob(
            self.token_ids_logprob, n, self.parallel_sample_num, self.is_single)
        self.custom_logit_processor = _expand_custom_logit_processor(
            self.custom_logit_processor, n, self.parallel_sample_num)

    @property
    def answers_as_batch(self) -> bool:
        """A list of outputs (or indexed stream chunks): a batch, or n > 1 samples (upstream)."""
        return not self.is_single or self.parallel_sample_num > 1

    def item(self, i: int) -> dict:
        """The i-th request of a normalized batch, as keyword arguments."""
        prompt = self.text if self.text is not None else self.input_ids
        return {
            "text": prompt[i] if self.text is not None and not self.is_single else self.text,
            "input_ids": None if self.input_ids is None
            else (self.input_ids if self.is_single else self.input_ids[i]),
            "sampling_params": self.sampling_params[i],
            "rid": self.rid[i],
            "return_logprob": self.return_logprob[i],
            "logprob_start_len": self.logprob_start_len[i],
            "top_logprobs_num": self.top_logprobs_num[i],
            "lora_path": self.lora_path[i],
            "token_ids_logprob": self.token_ids_logprob[i],
            "custom_logit_processor": self.custom_logit_processor[i],
        }


MAX_PARALLEL_SAMPLE_NUM = 128


def _parallel_sample_num(sampling_params: list[dict]) -> int:
    """The prompts' common `n`, removed from each of their (copied) sampling params."""
    nums = [params.pop("n", 1) for params in sampling_params]
    n = nums[0]
    if any(m != n for m in nums):
        raise ValueError(
            "The parallel_sample_num should be the same for all samples in sample params.")
    if not _is_int(n) or not 1 <= n <= MAX_PARALLEL_SAMPLE_NUM:
        raise ValueError(f"n must be an integer in [1, {MAX_PARALLEL_SAMPLE_NUM}], got {n!r}.")
    return n


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _expand_token_ids_logprob(value: Any, n: int, parallel_sample_num: int,
                              is_single: bool) -> list:
    """Per prompt, the token ids to report logprobs of (upstream's shapes: one id, one list for
    every prompt, or one list per prompt of a batch)."""
    if value is None or value == []:
        return [None] * n
    if _is_int(value):
        return [[value] for _ in range(n)]
    if not isinstance(value, list):
        raise ValueError("token_ids_logprob must be a token id, a list of token ids or a list "
                         f"of such lists, got {_type_name(value)}.")
    if not isinstance(value[0], list):
        return [list(value) for _ in range(n)]
    if parallel_sample_num > 1:  # upstream's wording
        raise ValueError("Cannot use list token_ids_logprob with parallel_sample_num > 1")
    if is_single:
        raise ValueError("token_ids_logprob of a single request must be a flat list of integers "
                         "(nested lists are one list per prompt of a batch).")
    if len(value) != n:
        raise ValueError(f"token_ids_logprob has {len(value)} lists for a batch of {n}.")
    return [ids or None for ids in value]


def _expand_custom_logit_processor(value: Any, n: int, parallel_sample_num: int) -> list:
    if value is None:
        return [None] * n
    if not isinstance(value, list):
        return [value] * n
    if parallel_sample_num > 1:  # upstream's wording
        raise ValueError("Cannot use list custom_logit_processor with parallel_sample_num > 1")
    if len(value) != n:
        raise ValueError(f"custom_logit_processor has {len(value)} entries for a batch of {n}.")
    return list(value)


def invalid_unicode_path(obj: Any) -> str | None:
    """The dotted path (`messages.0.content`) of the first string or key in a JSON value that
    is not valid Unicode (a lone surrogate, which no tokenizer or UTF-8 encoder accepts)."""
    try:  # the common case at C speed (long token id lists)
        json.dumps(obj, ensure_ascii=False, default=str).encode("utf-8")
        return None
    except UnicodeEncodeError:
        pass
    stack: list[tuple[str, Any]] = [("", obj)]
    while stack:
        path, value = stack.pop()
        if isinstance(value, str):
            if not _is_valid_unicode(value):
                return path or "body"
        elif isinstance(value, dict):
            for key, item in reversed(list(value.items())):
                sub = f"{path}.{_printable(key)}" if path else _printable(key)
                if isinstance(key, str) and not _is_valid_unicode(key):
                    return sub
                stack.append((sub, item))
        elif isinstance(value, (list, tuple)):
            stack.extend((f"{path}.{i}" if path else str(i), item)
                         for i, item in reversed(list(enumerate(value))))
    return None


def _is_valid_unicode(s: str) -> bool:
    try:
        s.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _printable(key: Any) -> str:
    return str(key).encode("utf-8", "backslashreplace").decode()


def _type_name(value: Any) -> str:
    return "null" if value is None else type(value).__name__


def _ids_shape(input_ids: Any) -> tuple[bool, int]:
    if not isinstance(input_ids, list):
        raise ValueError("input_ids must be a list of integers or a list of lists of integers, "
                         f"got {_type_name(input_ids)}.")
    if input_ids and all(isinstance(x, list) for x in input_ids):
        for ids in input_ids:
            _check_ids(ids)
        return False, len(input_ids)
    _check_ids(input_ids)
    return True, 1


def _check_ids(ids: list) -> None:
    if not all(isinstance(t, int) and not isinstance(t, bool) for t in ids):
        raise ValueError("input_ids must contain only integers.")


def _expand(value: Any, n: int, name: str, kind: type, default: Any) -> list:
    if isinstance(value, list):
        if len(value) != n:
            raise ValueError(f"{name} has {len(value)} entries for a batch of {n}.")
        items = value
    else:
        items = [value] * n
    out = []
    for v in items:
        if v is None:
            v = default
        elif kind is int and (isinstance(v, bool) or not isinstance(v, int)):
            raise ValueError(f"{name} must be an integer.")
        elif kind is not int and not isinstance(v, kind):
            raise ValueError(f"{name} has the wrong type: {type(v).__name__}.")
        out.append(dict(v) if kind is dict and v is not None else v)
    return out


@dataclass
class TokenizedGenerateReqInput:
    """TokenizerManager -> scheduler: one validated, tokenized request."""

    rid: str
    input_text: str | None
    input_ids: list[int]
    sampling_params: SamplingParams
    return_logprob: bool = False
    logprob_start_len: int = -1
    top_logprobs_num: int = 0
    stream: bool = False
    lora_path: str | None = None
    # Token ids whose logprobs are reported at every logprob position (return_logprob).
    token_ids_logprob: list[int] | None = None
    # A serialized CustomLogitProcessor (its `to_str()`), run on this request's logits.
    custom_logit_processor: str | None = None


@dataclass
class BatchTokenIDOutput:
    """Scheduler -> detokenizer (or -> TokenizerManager with --skip-tokenizer-init).

    Token and logprob lists are deltas since the previous message for the same rid; counts are
    running totals. Logprob fields hold None for a request that did not ask for them.
    """

    rids: list[str]
    finished_reasons: list[dict | None]
    output_ids: list[list[int]]
    prompt_tokens: list[int]
    completion_tokens: list[int]
    cached_tokens: list[int]
    skip_special_tokens: list[bool]
    spaces_between_special_tokens: list[bool]
    no_stop_trim: list[bool]
    stop_strs: list[list[str]]
    input_token_logprobs_val: list[list[float | None] | None] = field(default_factory=list)
    input_token_logprobs_idx: list[list[int] | None] = field(default_factory=list)
    input_top_logprobs_val: list[list[list[float]] | None] = field(default_factory=list)
    input_top_logprobs_idx: list[list[list[int]] | None] = field(default_factory=list)
    output_token_logprobs_val: list[list[float] | None] = field(default_factory=list)
    output_token_logprobs_idx: list[list[int] | None] = field(default_factory=list)
    output_top_logprobs_val: list[list[list[float]] | None] = field(default_factory=list)
    output_top_logprobs_idx: list[list[list[int]] | None] = field(default_factory=list)
    input_token_ids_logprobs_val: list[list[list[float]] | None] = field(default_factory=list)
    input_token_ids_logprobs_idx: list[list[list[int]] | None] = field(default_factory=list)
    output_token_ids_logprobs_val: list[list[list[float]] | None] = field(default_factory=list)
    output_token_ids_logprobs_idx: list[list[list[int]] | None] = field(default_factory=list)
    total_retractions: list[int] = field(default_factory=list)


@dataclass
class BatchStrOutput:
    """Detokenizer -> TokenizerManager: the same fields plus the new text of each request."""

    token_output: BatchTokenIDOutput
    output_strs: list[str]


@dataclass
class AbortReq:
    rid: str = ""
    abort_all: bool = False
    message: str = "Abort request."


@dataclass
class FlushCacheReqInput:
    pass


@dataclass
class FlushCacheReqOutput:
    success: bool
    message: str = ""


@dataclass
class GetInternalStateReq:
    pass


@dataclass
class GetInternalStateReqOutput:
    internal_state: dict


@dataclass
class SetInternalStateReq:
    server_args: dict  # of the names in RUNTIME_SERVER_ARGS


@dataclass
class SetInternalStateReqOutput:
    updated: bool
    server_args: dict


# Server args `/set_internal_state` may change while serving: switching the sync audit on for
# one run and off again lets an A/B audit a live server instead of launching another.
RUNTIME_SERVER_ARGS = {"enable_sync_audit": bool}


@dataclass
class ProfileReq:
    type: str  # "start" or "stop"
    output_dir: str | None = None
    num_steps: int | None = None
    activities: list[str] | None = None
    with_stack: bool | None = None
    record_shapes: bool | None = None
    profile_prefix: str | None = None


@dataclass
class ProfileReqOutput:
    success: bool
    message: str = ""


@dataclass
class LoadLoRAAdapterReqInput:
    lora_name: str
    lora_path: str
    pinned: bool = False


@dataclass
class UnloadLoRAAdapterReqInput:
    lora_name: str


@dataclass
class LoRAUpdateOutput:
    """Reply to a load/unload; serialized as the HTTP body, upstream's field order."""

    rid: str | None = None
    http_worker_ipc: str | None = None
    success: bool = True
    error_message: str = ""
    loaded_adapters: dict[str, str] | None = None
