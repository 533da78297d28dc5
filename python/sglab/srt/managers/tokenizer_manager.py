"""The TokenizerManager: validates and tokenizes requests, tracks them by rid, builds outputs.

It lives in the main process on an asyncio loop: requests go to the scheduler over a PUSH
socket, and outputs (text from the detokenizer, or token ids straight from the scheduler with
--skip-tokenizer-init) come back on a PULL socket read by one receive task.
"""

from __future__ import annotations

import asyncio
import copy
import dataclasses
import json
import logging
import os
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, AsyncIterator

import zmq
import zmq.asyncio

from sglab.srt.managers.io_struct import (
    AbortReq,
    BatchStrOutput,
    BatchTokenIDOutput,
    FlushCacheReqInput,
    FlushCacheReqOutput,
    GenerateReqInput,
    GetInternalStateReq,
    GetInternalStateReqOutput,
    LoadLoRAAdapterReqInput,
    LoRAUpdateOutput,
    ProfileReq,
    ProfileReqOutput,
    SetInternalStateReq,
    SetInternalStateReqOutput,
    TokenizedGenerateReqInput,
    UnloadLoRAAdapterReqInput,
    invalid_unicode_path,
)
from sglab.srt.managers.request_validator import (
    CUSTOM_LOGIT_PROCESSOR_DISABLED,
    LORA_NOT_ENABLED,
    RequestValidator,
)
from sglab.srt.patches import PatchFlags, patch_status
from sglab.srt.sampling.sampling_params import SamplingParams, choice_seed
from sglab.srt.server_args import PortArgs, ServerArgs

logger = logging.getLogger(__name__)

DEFAULT_MAX_NEW_TOKENS = 128
_DISCONNECT_POLL_S = 2.0
_CONTROL_TIMEOUT_S = 300.0
# /get_server_info and /metrics wait this long for the scheduler, then answer with its last
# known state: a long forward step must not hold up an info request.
INTERNAL_STATE_WAIT_S = 1.0
PROFILE_DIR_ENV = "SGLANG_TORCH_PROFILER_DIR"
_MAX_PROFILE_PREFIX_LEN = 128
_GENERATION_DEFAULT_KEYS = ("temperature", "top_p", "top_k", "min_p", "repetition_penalty")
# (meta_info key, BatchTokenIDOutput value field, id field, what it needs): "top" lists need
# top_logprobs_num > 0 and "ids" lists token_ids_logprob, each one list per position.
_LOGPROB_KINDS = (
    ("input_token_logprobs", "input_token_logprobs_val", "input_token_logprobs_idx", None),
    ("output_token_logprobs", "output_token_logprobs_val", "output_token_logprobs_idx", None),
    ("input_top_logprobs", "input_top_logprobs_val", "input_top_logprobs_idx", "top"),
    ("output_top_logprobs", "output_top_logprobs_val", "output_top_logprobs_idx", "top"),
    ("input_token_ids_logprobs", "input_token_ids_logprobs_val", "input_token_ids_logprobs_idx",
     "ids"),
    ("output_token_ids_logprobs", "output_token_ids_logprobs_val",
     "output_token_ids_logprobs_idx", "ids"),
)
KV_STAT_KEYS = ("max_total_num_tokens", "available_kv_tokens", "evictable_kv_tokens",
                "num_running_reqs", "num_waiting_reqs", "last_gen_throughput", "memory_usage")


class RequestRefusedError(ValueError):
    """The scheduler refused a request; `status_code` is the HTTP status to answer with."""

    def __init__(self, message: str, status_code: int = 400):
        super().__init__(message)
        self.status_code = status_code


class EngineDeadError(RuntimeError):
    """A child process died or the server is shutting down: no request can be served."""

    status_code = 503


@dataclass
class ReqState:
    """Everything the TokenizerManager knows about one request in flight."""

    rid: str
    event: asyncio.Event  # shared by the requests of one generate_request call
    prompt_tokens: int
    return_logprob: bool
    top_logprobs_num: int
    token_ids_logprob: list[int] | None
    return_text_in_logprobs: bool
    created_time: float
    log_metrics: bool = True
    text: str = ""
    output_ids: list[int] = field(default_factory=list)
    completion_tokens: int = 0
    cached_tokens: int = 0
    total_retractions: int = 0
    finished_reason: dict | None = None
    finished_time: float | None = None
    last_output_time: float | None = None
    dirty: bool = False  # output changed since the consumer last looked
    abandoned: bool = False  # consumer gone; the state waits for the scheduler's abort
    logprobs: dict[str, list] = field(default_factory=dict)


class _Communicator:
    """One control request to the scheduler at a time, answered by one reply type (under DP
    attention by each attention group: `fan_out` replies, returned as a list)."""

    def __init__(self, tm: "TokenizerManager", fan_out: int = 1):
        self.tm = tm
        self.fan_out = fan_out
        self.lock: asyncio.Lock | None = None
        self.future: asyncio.Future | None = None
        self.replies: list[Any] = []

    async def __call__(self, req: Any, timeout: float = _CONTROL_TIMEOUT_S) -> Any:
        if self.lock is None:
            self.lock = asyncio.Lock()
        async with self.lock:
            self.tm.check_alive()
            self.future = asyncio.get_running_loop().create_future()
            self.replies = []
            self.tm.send_to_scheduler.send_pyobj(req)
            try:
                return await asyncio.wait_for(self.future, timeout)
            except asyncio.TimeoutError:
                raise RuntimeError(
                    f"The scheduler did not answer {type(req).__name__} in {timeout:.0f} s."
                ) from None
            finally:
                self.future = None

    def handle(self, reply: Any) -> None:
        if self.future is None or self.future.done():
            return
        self.replies.append(reply)
        if len(self.replies) == self.fan_out:
            self.future.set_result(reply if self.fan_out == 1 else list(self.replies))

    def fail(self, error: BaseException) -> None:
        if self.future is not None and not self.future.done():
            self.future.set_exception(error)


class TokenizerManager:
    def __init__(self, server_args: ServerArgs, port_args: PortArgs):
        self.server_args = server_args
        self.port_args = port_args
        self.model_path = server_args.model_path
        self.served_model_name = server_args.served_model_name
        self.hf_config = _read_json(os.path.join(server_args.model_path, "config.json"))
        self.generation_defaults = _generation_defaults(server_args.model_path)
        self.patch_flags = PatchFlags.from_server_args(server_args)  # reported, never applied
        self.tokenizer = None
        if not server_args.skip_tokenizer_init:
            from sglab.srt.utils.hf_transformers_utils import get_tokenizer

            self.tokenizer = get_tokenizer(server_args.tokenizer_path,
                                           server_args.trust_remote_code)
        # Filled by set_scheduler_info() once the scheduler is ready.
        self.scheduler_info: dict = {}
        self.context_len: int | None = None
        self.max_req_input_len: int | None = None
        self.max_total_num_tokens: int | None = None
        self.vocab_size: int | None = None
        self.validator: RequestValidator | None = None

        self.zmq_context = zmq.Context(1)
        self.send_to_scheduler = self.zmq_context.socket(zmq.PUSH)
        self.send_to_scheduler.setsockopt(zmq.SNDHWM, 0)
        self.send_to_scheduler.bind(port_args.scheduler_input_ipc_name)
        self.async_zmq_context = zmq.asyncio.Context(1)
        self.recv_from_detokenizer = self.async_zmq_context.socket(zmq.PULL)
        self.recv_from_detokenizer.setsockopt(zmq.RCVHWM, 0)
        self.recv_from_detokenizer.bind(port_args.tokenizer_ipc_name)

        self.rid_to_state: dict[str, ReqState] = {}
        self.event_loop: asyncio.AbstractEventLoop | None = None
        self.handle_loop_task: asyncio.Task | None = None
        self.dead_message: str | None = None
        self.last_receive_tstamp = 0.0
        self.server_status = "Starting"  # "Starting" -> "Up"; "UnHealthy" once a child dies
        # Under DP attention every attention group answers a control request.
        fan_out = server_args.dp_size if server_args.enable_dp_attention else 1
        self.flush_cache_communicator = _Communicator(self, fan_out)
        # The scheduler's last reported internal state (DP attention: group 0's, and every
        # group's in internal_states), when, and the request fetching it.
        self.internal_state: dict | None = None
        self.internal_states: list[dict] = []
        self.internal_state_time = 0.0
        self._internal_state_task: asyncio.Task | None = None
        self.internal_state_communicator = _Communicator(self, fan_out)
        self.profile_communicator = _Communicator(self, fan_out)
        self.set_internal_state_communicator = _Communicator(self, fan_out)
        self.lora_update_communicator = _Communicator(self)
        # LoRA adapters by name -> path, as the scheduler last reported them.
        self.loaded_lora_adapters: dict[str, str] = {}
        self.metrics = None
        if server_args.enable_metrics:
            from sglab.srt.metrics.collector import TokenizerMetricsCollector

            self.metrics = TokenizerMetricsCollector({"model_name": self.served_model_name})

    # --- lifecycle ---------------------------------------------------------------------------

    def set_scheduler_info(self, info: dict) -> None:
        self.scheduler_info = dict(info)
        self.max_total_num_tokens = info["max_total_num_tokens"]
        self.max_req_input_len = info["max_req_input_len"]
        self.context_len = info.get("context_len") or self.max_req_input_len + 1
        self.vocab_size = info.get("vocab_size")
        self.validator = RequestValidator(
            self.vocab_size, self.context_len, self.max_req_input_len, self.max_total_num_tokens,
            enable_lora=bool(getattr(self.server_args, "enable_lora", False)))
        self.loaded_lora_adapters = dict(info.get("loaded_lora_adapters") or {})

    def auto_create_handle_loop(self) -> None:
        """Start the receive task on the running loop (once)."""
        if self.handle_loop_task is not None:
            return
        self.event_loop = asyncio.get_running_loop()
        self.handle_loop_task = self.event_loop.create_task(self.handle_loop())

    def notify_dead(self, message: str) -> None:
        """Fail every pending and future request; callable from any thread."""
        loop = self.event_loop
        if loop is not None and loop.is_running() and not _in_loop_thread(loop):
            loop.call_soon_threadsafe(self._set_dead, message)
        else:
            self._set_dead(message)

    def _set_dead(self, message: str) -> None:
        if self.dead_message is not None:
            return
        self.dead_message = message
        self.server_status = "UnHealthy"
        for state in self.rid_to_state.values():
            state.event.set()
        error = EngineDeadError(message)
        for communicator in (self.flush_cache_communicator, self.internal_state_communicator,
                             self.profile_communicator, self.lora_update_communicator,
                             self.set_internal_state_communicator):
            communicator.fail(error)

    def check_alive(self) -> None:
        if self.dead_message is not None:
            raise EngineDeadError(self.dead_message)

    def close(self) -> None:
        """Close the sockets and terminate the ZMQ contexts (a context collected with open
        sockets would block the garbage collector forever)."""
        if self.handle_loop_task is not None and self.event_loop is not None \
                and not self.event_loop.is_closed():
            self.event_loop.call_soon_threadsafe(self.handle_loop_task.cancel)
        self.send_to_scheduler.close(linger=0)
        self.recv_from_detokenizer.close(linger=0)
        self.zmq_context.term()
        self.async_zmq_context.term()

    # --- receiving ---------------------------------------------------------------------------

    async def handle_loop(self) -> None:
        while True:
            recv = await self.recv_from_detokenizer.recv_pyobj()
            self.last_receive_tstamp = time.time()
            for obj in recv if isinstance(recv, list) else [recv]:
                try:
                    self._dispatch(obj)
                except Exception:  # noqa: BLE001 - one bad message must not stop the loop
                    logger.exception("Failed to handle %s", type(obj).__name__)

    def _dispatch(self, obj: Any) -> None:
        if isinstance(obj, (BatchStrOutput, BatchTokenIDOutput)):
            self._handle_batch_output(obj)
        elif isinstance(obj, FlushCacheReqOutput):
            self.flush_cache_communicator.handle(obj)
        elif isinstance(obj, GetInternalStateReqOutput):
            self.internal_state_communicator.handle(obj)
        elif isinstance(obj, ProfileReqOutput):
            self.profile_communicator.handle(obj)
        elif isinstance(obj, SetInternalStateReqOutput):
            self.set_internal_state_communicator.handle(obj)
        elif isinstance(obj, LoRAUpdateOutput):
            self.lora_update_communicator.handle(obj)
        else:
            logger.warning("TokenizerManager ignores an unknown message: %r", type(obj).__name__)

    def _handle_batch_output(self, recv: BatchStrOutput | BatchTokenIDOutput) -> None:
        tok = recv.token_output if isinstance(recv, BatchStrOutput) else recv
        texts = recv.output_strs if isinstance(recv, BatchStrOutput) else None
        now = time.time()
        for i, rid in enumerate(tok.rids):
            state = self.rid_to_state.get(rid)
            if state is None:
                continue
            state.output_ids.extend(tok.output_ids[i])
            if texts is not None:
                state.text += texts[i]
            state.prompt_tokens = tok.prompt_tokens[i]
            state.completion_tokens = tok.completion_tokens[i]
            state.cached_tokens = tok.cached_tokens[i]
            if i < len(tok.total_retractions):
                state.total_retractions = tok.total_retractions[i]
            if state.return_logprob:
                self._append_logprobs(state, tok, i)
            self._observe_output(state, now, len(tok.output_ids[i]))
            if tok.finished_reasons[i] is not None:
                state.finished_reason = tok.finished_reasons[i]
                state.finished_time = now
                del self.rid_to_state[rid]
                self._observe_finished(state)
            state.dirty = True
            state.event.set()

    def _append_logprobs(self, state: ReqState, tok: BatchTokenIDOutput, i: int) -> None:
        for key, val_field, idx_field, needs in _LOGPROB_KINDS:
            if not _wants(state, needs):
                continue
            is_top = needs is not None
            vals, idxs = _at(getattr(tok, val_field), i), _at(getattr(tok, idx_field), i)
            if not vals:
                continue
            dst = state.logprobs.setdefault(key, [])
            with_text = state.return_text_in_logprobs
            if is_top:
                dst.extend(None if v is None else self._logprob_tuples(v, ix, with_text)
                           for v, ix in zip(vals, idxs))
            else:
                dst.extend(self._logprob_tuples(vals, idxs, with_text))

    def _logprob_tuples(self, vals: list, ids: list, with_text: bool) -> list[list]:
        if with_text and self.tokenizer is not None:
            texts = self.tokenizer.batch_decode([[t] for t in ids])
        else:
            texts = [None] * len(ids)
        return [[v, t, s] for v, t, s in zip(vals, ids, texts)]

    def _observe_output(self, state: ReqState, now: float, num_new: int) -> None:
        if self.metrics is not None and state.log_metrics and num_new:
            if state.last_output_time is None:
                self.metrics.observe_first_token(now - state.created_time)
            else:
                self.metrics.observe_inter_token(now - state.last_output_time, num_new)
        if num_new:
            state.last_output_time = now

    def _observe_finished(self, state: ReqState) -> None:
        if self.metrics is not None and state.log_metrics:
            self.metrics.observe_finished(
                state.prompt_tokens, state.completion_tokens, state.cached_tokens,
                state.finished_time - state.created_time,
                aborted=state.finished_reason.get("type") == "abort")

    # --- generate ----------------------------------------------------------------------------

    async def generate_request(
        self, obj: GenerateReqInput, request: Any = None
    ) -> AsyncIterator[dict | list[dict]]:
        """Yield upstream-shaped outputs.

        Single request: one dict per update when streaming (cumulative text and output_ids),
        else one final dict. Batch: dicts carrying "index" when streaming, else one final list.
        Invalid input raises ValueError before anything reaches the scheduler. `request` (a
        Starlette request) is polled so a disconnected client aborts its requests.
        """
        self.auto_create_handle_loop()
        self.check_alive()
        if self.context_len is None:
            raise RuntimeError("The scheduler is not ready yet.")
        obj.normalize_batch_and_arguments()
        tokenized = [self._tokenize_one_request(obj, i) for i in range(obj.batch_size)]
        if obj.parallel_sample_num > 1:
            self._check_new_rids(tokenized)
            await self._cache_prefixes(tokenized, request)
            tokenized = parallel_samples(tokenized, obj.parallel_sample_num)
        self._check_new_rids(tokenized)
        event = asyncio.Event()
        states = self._register(tokenized, event, obj)
        self.send_to_scheduler.send_pyobj(tokenized if obj.answers_as_batch else tokenized[0])
        try:
            if not obj.answers_as_batch:
                async for _, state, finished in self._updates(states, event, request):
                    if obj.stream or finished:
                        yield self._build_output(state)
            elif obj.stream:
                async for i, state, _ in self._updates(states, event, request):
                    yield {**self._build_output(state), "index": i}
            else:
                async for _ in self._updates(states, event, request):
                    pass
                yield [self._build_output(state) for state in states]
        finally:
            self._abort_unfinished(states)

    def _check_new_rids(self, reqs: list[TokenizedGenerateReqInput]) -> None:
        for req in reqs:
            if req.rid in self.rid_to_state:
                raise ValueError(f"Duplicate request ID detected: {req.rid}")  # upstream's

    def _register(self, reqs: list[TokenizedGenerateReqInput], event: asyncio.Event,
                  obj: GenerateReqInput, log_metrics: bool = True) -> list[ReqState]:
        now = time.time()
        states = [ReqState(req.rid, event, len(req.input_ids), req.return_logprob,
                           req.top_logprobs_num, req.token_ids_logprob,
                           bool(obj.return_text_in_logprobs), now,
                           log_metrics=log_metrics and bool(obj.log_metrics))
                  for req in reqs]
        for state in states:
            self.rid_to_state[state.rid] = state
        return states

    async def _cache_prefixes(self, reqs: list[TokenizedGenerateReqInput], request: Any) -> None:
        """As upstream before n > 1 samples: prefill each prompt once (no output token), so
        that its samples find it in the radix cache and prefill only their last token."""
        if self.server_args.disable_radix_cache:
            return
        prefills = [prefill_only(req) for req in reqs]
        event = asyncio.Event()
        states = self._register(prefills, event, GenerateReqInput(), log_metrics=False)
        self.send_to_scheduler.send_pyobj(prefills)
        try:
            async for _ in self._updates(states, event, request):
                pass
        finally:
            self._abort_unfinished(states)

    async def _updates(self, states: list[ReqState], event: asyncio.Event,
                       request: Any) -> AsyncIterator[tuple[int, ReqState, bool]]:
        """(index, state, finished) for each request whose output changed, until all finish."""
        pending = list(range(len(states)))
        while pending:
            await self._wait_event(event, request)
            self.check_alive()
            for i in list(pending):
                state = states[i]
                if not state.dirty:
                    continue
                state.dirty = False
                finished = state.finished_reason is not None
                if finished:
                    pending.remove(i)
                    _raise_if_refused(state.finished_reason)
                yield i, state, finished

    async def _wait_event(self, event: asyncio.Event, request: Any) -> None:
        while True:
            try:
                await asyncio.wait_for(event.wait(), timeout=_DISCONNECT_POLL_S)
            except asyncio.TimeoutError:
                if request is not None and await request.is_disconnected():
                    raise ValueError(
                        "Request is disconnected from the client side. Abort request."
                    ) from None
                continue
            event.clear()
            return

    def _abort_unfinished(self, states: list[ReqState]) -> None:
        for state in states:
            if state.finished_reason is not None or state.abandoned:
                continue
            if self.dead_message is not None:
                self.rid_to_state.pop(state.rid, None)
                continue
            state.abandoned = True
            self.abort_request(state.rid)

    def abort_request(self, rid: str = "", abort_all: bool = False) -> None:
        """Ask the scheduler to finish `rid` (or every request) with an abort; the states go
        when those finishes arrive. An unknown rid is ignored, as upstream."""
        if self.dead_message is not None or (not abort_all and rid not in self.rid_to_state):
            return
        self.send_to_scheduler.send_pyobj(AbortReq(rid=rid, abort_all=abort_all))

    def _build_output(self, state: ReqState) -> dict:
        meta: dict[str, Any] = {
            "id": state.rid,
            "finish_reason": state.finished_reason,
            "prompt_tokens": state.prompt_tokens,
            "weight_version": "default",
            "total_retractions": state.total_retractions,
            "reasoning_tokens": 0,
            "completion_tokens": state.completion_tokens,
            "cached_tokens": state.cached_tokens,
        }
        if state.finished_time is not None:
            meta["e2e_latency"] = state.finished_time - state.created_time
        if state.return_logprob:
            for key, _, _, needs in _LOGPROB_KINDS:
                if _wants(state, needs):
                    meta[key] = list(state.logprobs.get(key, []))
        out: dict[str, Any] = {}
        if self.tokenizer is not None:
            out["text"] = state.text
        out["output_ids"] = list(state.output_ids)
        out["meta_info"] = meta
        return out

    # --- validation and tokenization ---------------------------------------------------------

    def _tokenize_one_request(self, obj: GenerateReqInput, i: int) -> TokenizedGenerateReqInput:
        item = obj.item(i)
        text, input_ids = item["text"], item["input_ids"]
        if input_ids is None:
            if self.tokenizer is None:
                raise ValueError("The server runs with --skip-tokenizer-init: send input_ids, "
                                 "not text.")
            if text == "":
                raise ValueError("The prompt is empty.")
            if invalid_unicode_path(text) is not None:
                raise ValueError("text is not valid Unicode (it holds a lone surrogate).")
            input_ids = self.tokenizer.encode(text)
        input_ids = list(input_ids)
        params = item["sampling_params"]
        req = TokenizedGenerateReqInput(
            rid=item["rid"], input_text=text, input_ids=input_ids,
            sampling_params=self._parse_sampling_params(params),
            return_logprob=item["return_logprob"], logprob_start_len=item["logprob_start_len"],
            top_logprobs_num=item["top_logprobs_num"], stream=obj.stream,
            lora_path=item["lora_path"], token_ids_logprob=item["token_ids_logprob"],
            custom_logit_processor=item["custom_logit_processor"],
        )
        if req.custom_logit_processor is not None and \
                not self.server_args.enable_custom_logit_processor:
            raise ValueError(CUSTOM_LOGIT_PROCESSOR_DISABLED)
        self.validator.validate(req, self.loaded_lora_adapters)
        self._resolve_max_new_tokens(req.sampling_params, len(input_ids),
                                     "max_new_tokens" in params)
        req.sampling_params.normalize(self.tokenizer)
        return req

    @staticmethod
    def _parse_sampling_params(params: dict) -> SamplingParams:
        path = invalid_unicode_path(params)
        if path is not None:
            raise ValueError(f"sampling_params.{path} is not valid Unicode (it holds a lone "
                             "surrogate).")
        try:
            return SamplingParams.from_dict(params)
        except TypeError as e:
            raise ValueError(f"Invalid sampling parameters: {e}") from None

    def _resolve_max_new_tokens(self, sampling_params: SamplingParams, prompt_len: int,
                                given: bool) -> None:
        """As upstream: prompt + output stays below the context length (and the KV pool)."""
        max_req_len = min(self.context_len, self.max_total_num_tokens or self.context_len) - 1
        budget = max_req_len - prompt_len
        max_new = sampling_params.max_new_tokens
        if not given:
            sampling_params.max_new_tokens = max(0, min(DEFAULT_MAX_NEW_TOKENS, budget))
        elif max_new is None:
            sampling_params.max_new_tokens = max(0, budget)
        elif prompt_len + max_new >= self.context_len:
            raise ValueError(
                f"Requested token count exceeds the model's maximum context length of "
                f"{self.context_len} tokens. You requested a total of {prompt_len + max_new} "
                f"tokens: {prompt_len} tokens from the input messages and {max_new} tokens for "
                f"the completion. Please reduce the number of tokens in the input messages or "
                f"the completion to fit within the limit."
            )
        else:
            sampling_params.max_new_tokens = max(0, min(max_new, budget))

    # --- control -----------------------------------------------------------------------------

    async def flush_cache(self) -> FlushCacheReqOutput:
        self.auto_create_handle_loop()
        replies = _as_list(await self.flush_cache_communicator(FlushCacheReqInput()))
        return FlushCacheReqOutput(success=all(r.success for r in replies))

    async def get_internal_state(self, max_wait: float | None = None) -> dict:
        """The scheduler's internal state. With `max_wait`, a scheduler busy for longer gets
        the last known state instead, carrying its age in `age_s`."""
        self.auto_create_handle_loop()
        task = self._internal_state_task
        if task is None or task.done():
            task = asyncio.ensure_future(self._fetch_internal_state())
            task.add_done_callback(_retrieve_exception)
            self._internal_state_task = task
        done, _ = await asyncio.wait({task}, timeout=max_wait)
        if done:
            return dict(task.result())
        known = self.internal_state or {
            "max_total_num_tokens": self.max_total_num_tokens,
            "effective_max_running_requests_per_dp":
                self.scheduler_info.get("max_running_requests"),
        }
        age = time.time() - self.internal_state_time if self.internal_state else None
        return {**known, "age_s": age}

    async def _fetch_internal_state(self) -> dict:
        replies = _as_list(await self.internal_state_communicator(GetInternalStateReq()))
        self.internal_states = [r.internal_state for r in replies]
        self.internal_state, self.internal_state_time = self.internal_states[0], time.time()
        return self.internal_state

    async def set_internal_state(self, server_args: dict) -> list[SetInternalStateReqOutput]:
        """One reply per attention group (one without DP attention), as upstream."""
        self.auto_create_handle_loop()
        return _as_list(await self.set_internal_state_communicator(
            SetInternalStateReq(server_args)))

    async def start_profile(self, output_dir: str | None = None, num_steps: int | None = None,
                            activities: list[str] | None = None, with_stack: bool | None = None,
                            record_shapes: bool | None = None,
                            profile_prefix: str | None = None) -> ProfileReqOutput:
        """Start the scheduler's profiler; the trace goes under SGLANG_TORCH_PROFILER_DIR."""
        self.auto_create_handle_loop()
        output_dir = resolve_profile_dir(output_dir)
        _check_profile_prefix(profile_prefix)
        req = ProfileReq(type="start", output_dir=output_dir, num_steps=num_steps,
                         activities=activities, with_stack=with_stack,
                         record_shapes=record_shapes, profile_prefix=profile_prefix)
        return _first_failed(await self.profile_communicator(req))

    async def stop_profile(self) -> ProfileReqOutput:
        self.auto_create_handle_loop()
        return _first_failed(await self.profile_communicator(ProfileReq(type="stop")))

    # --- LoRA --------------------------------------------------------------------------------

    async def load_lora_adapter(self, obj: LoadLoRAAdapterReqInput) -> LoRAUpdateOutput:
        return await self._update_lora(obj)

    async def unload_lora_adapter(self, obj: UnloadLoRAAdapterReqInput) -> LoRAUpdateOutput:
        return await self._update_lora(obj)

    async def _update_lora(self, obj: Any) -> LoRAUpdateOutput:
        if not getattr(self.server_args, "enable_lora", False):
            return LoRAUpdateOutput(success=False, error_message=LORA_NOT_ENABLED)
        self.auto_create_handle_loop()
        result = await self.lora_update_communicator(obj)
        if result.success:
            self.loaded_lora_adapters = dict(result.loaded_adapters or {})
        return result

    def get_model_info(self) -> dict:
        return {
            "model_path": self.model_path,
            "tokenizer_path": self.server_args.tokenizer_path,
            "is_generation": True,
            "preferred_sampling_params": None,
            "weight_version": "default",
            "has_image_understanding": False,
            "has_audio_understanding": False,
            "model_type": self.hf_config.get("model_type"),
            "architectures": self.hf_config.get("architectures"),
        }

    def observe_scheduler_state(self, state: dict) -> None:
        """Refresh the scheduler gauges, unless the scheduler never reported yet."""
        if self.metrics is not None and "available_kv_tokens" in state:
            self.metrics.update_scheduler_state(state)

    async def get_server_info(self) -> dict:
        internal_state = await self.get_internal_state(INTERNAL_STATE_WAIT_S)
        self.observe_scheduler_state(internal_state)
        args = self.server_args.to_dict()
        if args.get("api_key"):
            args["api_key"] = "<hidden>"
        states = self.internal_states if len(self.internal_states) > 1 and \
            "age_s" not in internal_state else [internal_state]
        info = {**args, **self.scheduler_info, "internal_states": states,
                "version": _version(), "active_patches": self.patch_flags.active_ids(),
                "patch_status": patch_status(self.patch_flags, self.server_args)}
        for key in KV_STAT_KEYS:
            if key in internal_state:
                info[key] = internal_state[key]
        return info




def _as_list(reply: Any) -> list:
    return reply if isinstance(reply, list) else [reply]


def _first_failed(reply: Any) -> Any:
    """One answer for several groups': the first that failed, else the first."""
    replies = _as_list(reply)
    return next((r for r in replies if not r.success), replies[0])


def profile_root() -> str:
    """Where traces may go: $SGLANG_TORCH_PROFILER_DIR, else the temp dir (upstream: /tmp)."""
    return os.path.realpath(os.environ.get(PROFILE_DIR_ENV) or tempfile.gettempdir())


def resolve_profile_dir(output_dir: Any) -> str:
    """`output_dir` (relative to the profile root, or absolute) as a created directory inside
    the root; ValueError otherwise."""
    root = profile_root()
    if output_dir is None:
        output_dir = ""
    if not isinstance(output_dir, str) or "\0" in output_dir:
        raise ValueError(f"output_dir must be a path string, got {output_dir!r}.")
    path = os.path.realpath(os.path.join(root, output_dir))
    if os.path.commonpath([path, root]) != root:
        raise ValueError(f"output_dir must be inside the profile directory {root} (set by "
                         f"{PROFILE_DIR_ENV}), got {output_dir!r}.")
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as e:
        raise ValueError(f"output_dir {output_dir!r} cannot be created: {e.strerror}.") from None
    return path


def _check_profile_prefix(prefix: Any) -> None:
    if prefix is None:
        return
    if not isinstance(prefix, str) or len(prefix) > _MAX_PROFILE_PREFIX_LEN:
        raise ValueError(f"profile_prefix must be a string of at most "
                         f"{_MAX_PROFILE_PREFIX_LEN} characters.")
    bad = {"/", "\\", "\0", os.sep, os.altsep} - {None}
    if any(c in prefix for c in bad) or invalid_unicode_path(prefix) is not None:
        raise ValueError(f"profile_prefix must be a file name prefix without path separators, "
                         f"got {prefix!r}.")


def prefill_only(req: TokenizedGenerateReqInput) -> TokenizedGenerateReqInput:
    """`req` under a new rid, asking for no output token (and no logprobs)."""
    params = copy.copy(req.sampling_params)
    params.max_new_tokens, params.min_new_tokens = 0, 0
    return dataclasses.replace(req, rid=uuid.uuid4().hex, sampling_params=params,
                               return_logprob=False, top_logprobs_num=0, stream=False,
                               token_ids_logprob=None, custom_logit_processor=None)


def parallel_samples(reqs: list[TokenizedGenerateReqInput],
                     n: int) -> list[TokenizedGenerateReqInput]:
    """`n` samples of each request, prompt-major (upstream's order), rids `<rid>-<j>`; a seeded
    request's sample j is seeded `choice_seed(seed, j)`, so the samples differ and repeat."""
    out = []
    for req in reqs:
        seed = req.sampling_params.sampling_seed
        for j in range(n):
            params = copy.copy(req.sampling_params)
            if seed is not None:
                params.sampling_seed = choice_seed(seed, j)
            out.append(dataclasses.replace(req, rid=f"{req.rid}-{j}", sampling_params=params))
    return out


def _retrieve_exception(task: asyncio.Task) -> None:
    if not task.cancelled():
        task.exception()


def _raise_if_refused(reason: dict) -> None:
    if reason.get("type") == "abort" and reason.get("status_code") is not None:
        raise RequestRefusedError(reason.get("message", "Request refused."),
                                  int(reason["status_code"]))


def _wants(state: ReqState, needs: str | None) -> bool:
    if needs == "top":
        return state.top_logprobs_num > 0
    if needs == "ids":
        return state.token_ids_logprob is not None
    return True


def _at(values: list, i: int) -> Any:
    return values[i] if i < len(values) else None


def _in_loop_thread(loop: asyncio.AbstractEventLoop) -> bool:
    try:
        return asyncio.get_running_loop() is loop
    except RuntimeError:
        return False


def _read_json(path: str) -> dict:
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return {}


def _generation_defaults(model_path: str) -> dict:
    """Sampling defaults from generation_config.json (upstream's `--sampling-defaults model`)."""
    config = _read_json(os.path.join(model_path, "generation_config.json"))
    return {k: config[k] for k in _GENERATION_DEFAULT_KEYS if config.get(k) is not None}


def _version() -> str:
    from sglab import __version__

    return __version__

