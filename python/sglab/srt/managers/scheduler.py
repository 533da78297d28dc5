"""The scheduler process: receives requests, forms batches, runs them, streams tokens out."""

from __future__ import annotations

import faulthandler
import logging
import os
import random
import signal
import time
from collections import deque
from typing import Any

import torch
import zmq

from sglab.srt.debug.schedule_trace import ScheduleTrace
from sglab.srt.debug.sync_audit import AUDIT
from sglab.srt.distributed.parallel_state import get_attention_tp_group
from sglab.srt.managers.io_struct import (
    AbortReq,
    BatchTokenIDOutput,
    FlushCacheReqInput,
    FlushCacheReqOutput,
    GetInternalStateReq,
    GetInternalStateReqOutput,
    LoadLoRAAdapterReqInput,
    ProfileReq,
    SetInternalStateReq,
    SetInternalStateReqOutput,
    TokenizedGenerateReqInput,
    UnloadLoRAAdapterReqInput,
)
from sglab.srt.managers.request_validator import (
    CUSTOM_LOGIT_PROCESSOR_DISABLED,
    InvalidRequestError,
    RequestValidator,
)
from sglab.srt.managers.schedule_batch import Req, ScheduleBatch, finish_abort
from sglab.srt.managers.schedule_policy import PrefillAdder, SchedulePolicy
from sglab.srt.managers.scheduler_dp_attention_mixin import SchedulerDPAttentionMixin
from sglab.srt.managers.scheduler_grammar_mixin import SchedulerGrammarMixin
from sglab.srt.managers.scheduler_lora_mixin import SchedulerLoRAMixin
from sglab.srt.managers.scheduler_metrics_mixin import SchedulerMetricsMixin
from sglab.srt.managers.scheduler_output_processor_mixin import (
    SchedulerOutputProcessorMixin,
    internal_error,
)
from sglab.srt.managers.scheduler_profiler_mixin import SchedulerProfilerMixin
from sglab.srt.managers.scheduler_runtime_checker_mixin import SchedulerRuntimeCheckerMixin
from sglab.srt.managers.tp_worker import GenerationBatchResult, TpModelWorker
from sglab.srt.mem_cache.radix_cache import create_prefix_cache
from sglab.srt.sampling.custom_logit_processor import load_processor
from sglab.srt.sampling.sampling_params import SamplingParams
from sglab.srt.server_args import PortArgs, ServerArgs, configure_logging

logger = logging.getLogger(__name__)

DETERMINISTIC_DEFAULT_SEED = 42
DP_IDLE_POLL_MS = 5
# Upstream's timeouts, in seconds (<= 0: off), and the millisecond names they replaced.
REQ_WAITING_TIMEOUT_ENV = "SGLANG_REQ_WAITING_TIMEOUT"
REQ_RUNNING_TIMEOUT_ENV = "SGLANG_REQ_RUNNING_TIMEOUT"
_DEPRECATED_MS_ENVS = {REQ_WAITING_TIMEOUT_ENV: "SGLANG_QUEUED_TIMEOUT_MS",
                       REQ_RUNNING_TIMEOUT_ENV: "SGLANG_FORWARD_TIMEOUT_MS"}
# Upstream's retraction test hooks: retract every SGLANG_TEST_RETRACT_INTERVAL-th step, and
# admit no prefill while more than SGLANG_TEST_RETRACT_NO_PREFILL_BS requests run.
TEST_RETRACT_ENV = "SGLANG_TEST_RETRACT"
ABORT_IN_WAITING_QUEUE = "Abort in waiting queue"  # upstream's message
_DEVICE_FAULTS = tuple(getattr(torch, name) for name in ("AcceleratorError",)
                       if hasattr(torch, name))



class Scheduler(SchedulerOutputProcessorMixin, SchedulerLoRAMixin, SchedulerProfilerMixin,
                SchedulerRuntimeCheckerMixin, SchedulerGrammarMixin, SchedulerDPAttentionMixin,
                SchedulerMetricsMixin):
    """The loop: receive, schedule, launch, process. Result processing and output building,
    LoRA, the profiler, the idle checks, grammars, DP attention's per-step agreement and the
    decode statistics live in the mixins (upstream's layout)."""

    def __init__(self, server_args: ServerArgs, port_args: PortArgs | None = None,
                 tp_rank: int = 0):
        self.server_args = server_args
        self.tp_rank = tp_rank
        self.tp_worker = TpModelWorker(server_args, tp_rank, _dist_init_method(port_args))
        self.tp_group = self.tp_worker.model_runner.tp_group
        runner = self.tp_worker.model_runner
        # Under DP attention each attention group schedules its own requests: its rank 0
        # receives them and broadcasts them to the group (the whole TP group without DP).
        self.dp_info = runner.dp_info
        self.attn_tp_group = get_attention_tp_group()
        self.dp_peers_busy = False  # some rank had a batch at the last agreement
        self.patch_flags = runner.patch_flags
        self.model_config = self.tp_worker.model_config
        self.req_to_token_pool = runner.req_to_token_pool
        self.token_to_kv_pool_allocator = runner.token_to_kv_pool_allocator
        self.max_total_num_tokens = runner.max_total_num_tokens
        self.max_running_requests = runner.max_running_requests
        self.page_size = server_args.page_size
        self.lora_manager = runner.lora_manager  # None unless --enable-lora
        self.hisparse = runner.hisparse_coordinator  # None unless --enable-hisparse
        self.tree_cache = create_prefix_cache(server_args, self.req_to_token_pool,
                                              self.token_to_kv_pool_allocator)
        self.policy = SchedulePolicy(server_args.schedule_policy, self.tree_cache,
                                     server_args.random_seed or 0)
        self.context_len = self.model_config.context_len
        self.max_req_input_len = self.context_len - 1
        self.validator = RequestValidator(
            self.model_config.vocab_size, self.context_len, self.max_req_input_len,
            self.max_total_num_tokens, enable_lora=self.lora_manager is not None)
        self.tokenizer = self._load_tokenizer()
        self.eos_token_ids = self._eos_token_ids()
        self.init_grammar_backend()
        self.seed_rng = random.Random(server_args.random_seed)
        self.req_waiting_timeout_s = env_timeout_s(REQ_WAITING_TIMEOUT_ENV)
        self.req_running_timeout_s = env_timeout_s(REQ_RUNNING_TIMEOUT_ENV)
        self.test_retract = os.environ.get(TEST_RETRACT_ENV, "").lower() in ("1", "true")
        self.test_retract_interval = int(os.environ.get("SGLANG_TEST_RETRACT_INTERVAL", 3))
        self.test_retract_no_prefill_bs = int(
            os.environ.get("SGLANG_TEST_RETRACT_NO_PREFILL_BS", 2 ** 31))
        self.waiting_queue: list[Req] = []
        self.running_batch: ScheduleBatch = self._new_batch([])
        self.chunked_req: Req | None = None
        self.last_batch: ScheduleBatch | None = None
        self.forward_ct = 0
        self.init_metrics()
        self.init_profiler()
        self.outputs: list[BatchTokenIDOutput] = []
        # Set when a failed batch's requests ran one by one during this step.
        self.ran_alone = False
        self.enable_overlap = not server_args.disable_overlap_schedule
        if server_args.enable_sync_audit:
            AUDIT.enabled = True
            AUDIT.reset()
        self.schedule_trace = ScheduleTrace()
        # Overlap: launched batches whose results were not processed yet (at most one old one).
        self.result_queue: deque[tuple[ScheduleBatch, GenerationBatchResult]] = deque()
        self._init_sockets(port_args)

    # --- setup --------------------------------------------------------------------------------

    def _init_sockets(self, port_args: PortArgs | None) -> None:
        """Rank 0 (of each attention group, under DP attention) talks to the tokenizer manager
        and the detokenizer; the group's other ranks get their requests from it
        (recv_requests) and send nothing. Under DP attention requests come from the
        data-parallel controller, each group on its own socket."""
        self.recv_from_tokenizer = self.send_to_detokenizer = self.send_to_tokenizer = None
        leader = self.attn_tp_group.rank == 0
        self.discard_outputs = port_args is not None and not leader
        if port_args is None or not leader:
            return
        ctx = zmq.Context(2)
        self.recv_from_tokenizer = ctx.socket(zmq.PULL)
        self.recv_from_tokenizer.connect(
            port_args.dp_scheduler_ipc_names[self.dp_info.dp_rank] if self.dp_info.enabled
            else port_args.scheduler_input_ipc_name)
        out_name = (port_args.tokenizer_ipc_name if self.server_args.skip_tokenizer_init
                    else port_args.detokenizer_ipc_name)
        self.send_to_detokenizer = ctx.socket(zmq.PUSH)
        self.send_to_detokenizer.connect(out_name)
        self.send_to_tokenizer = ctx.socket(zmq.PUSH)
        self.send_to_tokenizer.connect(port_args.tokenizer_ipc_name)

    def _load_tokenizer(self):
        if self.server_args.skip_tokenizer_init:
            return None
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(self.server_args.tokenizer_path,
                                             trust_remote_code=self.server_args.trust_remote_code)

    def _eos_token_ids(self) -> set[int]:
        ids: set[int] = set()
        eos = getattr(self.model_config.hf_config, "eos_token_id", None)
        try:
            from transformers import GenerationConfig

            gen_eos = GenerationConfig.from_pretrained(self.server_args.model_path).eos_token_id
        except (OSError, ValueError):
            gen_eos = None
        for value in (eos, gen_eos, getattr(self.tokenizer, "eos_token_id", None)):
            if isinstance(value, int):
                ids.add(value)
            elif isinstance(value, (list, tuple)):
                ids.update(v for v in value if isinstance(v, int))
        return ids

    def _new_batch(self, reqs: list[Req]) -> ScheduleBatch:
        return ScheduleBatch.init_new(reqs, self.req_to_token_pool,
                                      self.token_to_kv_pool_allocator, self.tree_cache,
                                      self.model_config.vocab_size, self.hisparse)

    def ready_info(self) -> dict:
        return {
            "status": "ready",
            "max_total_num_tokens": self.max_total_num_tokens,
            "max_req_input_len": self.max_req_input_len,
            "context_len": self.context_len,
            "vocab_size": self.model_config.vocab_size,
            "max_running_requests": self.max_running_requests,
            "loaded_lora_adapters": (self.lora_manager.loaded_adapters()
                                     if self.lora_manager is not None else {}),
        }

    # --- the loop -----------------------------------------------------------------------------

    def event_loop_normal(self) -> None:
        while True:
            self.process_input_requests(self.recv_requests(block=self.should_block_on_recv()))
            self.run_step_normal()
            self.flush_outputs()

    def event_loop_overlap(self) -> None:
        while True:
            self.process_input_requests(self.recv_requests(block=self.should_block_on_recv()))
            self.run_step_overlap()
            self.flush_outputs()

    def run_step(self) -> bool:
        """One scheduling step; False when there was nothing to run."""
        if self.enable_overlap:
            return self.run_step_overlap()
        return self.run_step_normal()

    def next_batch(self) -> ScheduleBatch | None:
        """This step's batch; under DP attention agreed with the other ranks (maybe IDLE)."""
        batch = self.get_next_batch_to_run()
        if self.dp_info.enabled:
            batch = self.prepare_mlp_sync_batch(batch)
        return batch

    def run_step_normal(self) -> bool:
        self.ran_alone = False
        batch = self.next_batch()
        result = self.run_batch(batch) if batch is not None else None
        if result is None or batch.forward_mode.is_idle():
            if not self.ran_alone:
                self.on_idle()
            return self.ran_alone
        result.synchronize()
        self.process_batch_result(batch, result)
        self.last_batch = batch
        return True

    def run_step_overlap(self) -> bool:
        """Launch batch N+1, then process batch N's result while N+1 runs on the device.

        Safe by stream order: every device write (KV, req_to_token) is issued in
        `ForwardBatch.init_new` or the forward itself, on one stream, in batch order. Slots and
        rows the host frees while N+1 is in flight are handed only to batches launched later,
        whose writes the device runs after N+1 has read them.
        """
        self.ran_alone = False
        batch = self.next_batch()
        result = self.run_batch(batch) if batch is not None else None
        if result is None or batch.forward_mode.is_idle():
            batch = None
        else:
            self._mark_pending(batch, result)
            self.result_queue.append((batch.copy(), result))
        self.last_batch = batch
        if len(self.result_queue) > (1 if batch is not None else 0):
            self.process_pending_result()
        elif batch is None and not self.ran_alone:
            self.on_idle()
            return False
        if batch is not None:  # a grammar batch samples now: its masks need the tokens just seen
            self._launch_delayed_sample(batch, result)
        return True

    def _launch_delayed_sample(self, batch: ScheduleBatch, result: GenerationBatchResult) -> None:
        """The delayed sample of the step just queued; if it fails, the step is undone (out of
        the queue) and its requests run one by one, as for a step that fails in `run_batch`."""
        try:
            result.launch_delayed_sample()
        except Exception as e:  # noqa: BLE001 - see _isolate_failed_batch
            self.result_queue.pop()
            self._mark_pending(batch, result, count=-1)
            self._on_step_failure(batch, e)

    def process_pending_result(self) -> None:
        batch, result = self.result_queue.popleft()
        result.synchronize()
        self.process_batch_result(batch, result)

    def is_idle(self) -> bool:
        return not self.waiting_queue and self.running_batch.is_empty() and \
            self.chunked_req is None and not self.result_queue and \
            (self.hisparse is None or not self.hisparse.has_ongoing_staging())

    def recv_requests(self, block: bool) -> list[Any]:
        """This step's messages; under TP, rank 0's, broadcast to every rank of the attention
        group (upstream's `broadcast_pyobj` over the CPU group), so they schedule the same
        batches."""
        group = self.attn_tp_group
        reqs = self._recv_from_tokenizer(block) if group.rank == 0 else None
        return group.broadcast_object(reqs, src=0)

    def _recv_from_tokenizer(self, block: bool) -> list[Any]:
        if self.recv_from_tokenizer is None:
            return []
        reqs = []
        # Under DP attention the other groups' ranks poll too: a request that arrives here
        # waits for them at the next agreement, so they wait for messages only briefly.
        timeout_ms = DP_IDLE_POLL_MS if self.dp_info.enabled else 1000
        if block and self.recv_from_tokenizer.poll(timeout=timeout_ms) == 0:
            return reqs
        while True:
            try:
                reqs.append(self.recv_from_tokenizer.recv_pyobj(zmq.NOBLOCK))
            except zmq.ZMQError:
                return reqs

    def process_input_requests(self, recv_reqs: list[Any]) -> None:
        for obj in recv_reqs:
            for item in obj if isinstance(obj, list) else [obj]:
                self._dispatch(item)

    def _dispatch(self, obj: Any) -> None:
        if isinstance(obj, TokenizedGenerateReqInput):
            self.handle_generate_request(obj)
        elif isinstance(obj, AbortReq):
            self.abort_request(obj)
        elif isinstance(obj, FlushCacheReqInput):
            self._reply(FlushCacheReqOutput(success=self.flush_cache()))
        elif isinstance(obj, GetInternalStateReq):
            self._reply(GetInternalStateReqOutput(internal_state=self.get_internal_state()))
        elif isinstance(obj, SetInternalStateReq):
            self._reply(self.set_internal_state(obj))
        elif isinstance(obj, ProfileReq):
            self._reply(self.profile(obj))
        elif isinstance(obj, LoadLoRAAdapterReqInput):
            self._reply(self.load_lora_adapter(obj))
        elif isinstance(obj, UnloadLoRAAdapterReqInput):
            self._reply(self.unload_lora_adapter(obj))
        else:
            logger.warning("Ignoring unknown message %r", type(obj).__name__)

    def _reply(self, obj: Any) -> None:
        if self.send_to_tokenizer is not None:
            self.send_to_tokenizer.send_pyobj(obj)

    # --- requests -----------------------------------------------------------------------------

    def handle_generate_request(self, recv_req: TokenizedGenerateReqInput) -> Req:
        params = recv_req.sampling_params
        try:
            self.validator.validate(recv_req, self._loaded_lora_adapters(recv_req.lora_path))
            req = self._make_req(recv_req)
            error = self.submit_grammar(req)
        except InvalidRequestError as e:
            req, error = Req(recv_req.rid, None, [], SamplingParams(), 0), str(e)
        except Exception as e:  # noqa: BLE001 - a malformed request is refused, never fatal
            logger.warning("Refusing malformed request %s", recv_req.rid, exc_info=True)
            req = Req(recv_req.rid, None, [], SamplingParams(), 0)
            error = f"Invalid request: {type(e).__name__}: {e}"
        if error is not None:
            req.finished_reason = finish_abort(error, status_code=400)
            self.stream_output([req])
            return req
        if params.max_new_tokens is None:
            params.max_new_tokens = self.context_len - len(req.origin_input_ids)
        req.wait_queue_entry_time = time.perf_counter()
        self.waiting_queue.append(req)
        return req

    def _make_req(self, recv_req: TokenizedGenerateReqInput) -> Req:
        params = recv_req.sampling_params
        seed = params.sampling_seed
        if seed is None:
            # Deterministic mode: upstream's default seed, so a request's samples never depend
            # on its arrival order; otherwise one draw per request from --random-seed.
            seed = DETERMINISTIC_DEFAULT_SEED if self.server_args.enable_deterministic_inference \
                else self.seed_rng.randrange(1 << 30)
        req = Req(recv_req.rid, recv_req.input_text, list(recv_req.input_ids), params, seed,
                  recv_req.return_logprob, recv_req.logprob_start_len,
                  recv_req.top_logprobs_num, recv_req.stream, self.eos_token_ids,
                  self._lora_id(recv_req.lora_path), recv_req.token_ids_logprob)
        processor = recv_req.custom_logit_processor
        if processor is not None:
            if not self.server_args.enable_custom_logit_processor:
                raise InvalidRequestError(CUSTOM_LOGIT_PROCESSOR_DISABLED)
            try:
                req.set_custom_logit_processor(processor, load_processor(processor))
            except ValueError as e:
                raise InvalidRequestError(str(e)) from None
        return req

    def abort_request(self, recv_req: AbortReq) -> None:
        def match(req: Req) -> bool:
            return recv_req.abort_all or req.rid == recv_req.rid

        aborted = [r for r in self.waiting_queue if match(r)]
        self.waiting_queue = [r for r in self.waiting_queue if not match(r)]
        for req in aborted:
            logger.debug("Abort queued request. req.rid=%r", req.rid)  # upstream's line
            req.finished_reason = finish_abort(ABORT_IN_WAITING_QUEUE)
        self.stream_output(aborted)
        for req in self.running_batch.reqs + ([self.chunked_req] if self.chunked_req else []):
            if match(req):
                logger.debug("Abort running request. req.rid=%r", req.rid)
                req.to_finish = finish_abort(recv_req.message)
        if self.hisparse is not None:
            self._abort_hisparse_staging(match, recv_req.message)

    def _abort_hisparse_staging(self, match, message: str) -> None:
        """HiSparse: requests outside the running batch, between their prefill and decode: in
        staging (freed now) or with their prefill's result still to land (finished by it)."""
        aborted = self.hisparse.abort_staging(match)
        for req in aborted:
            req.finished_reason = finish_abort(message)
            self.tree_cache.cache_finished_req(req, len(req.fill_ids))
        self.stream_output(aborted)
        for batch, _ in self.result_queue:
            for req in batch.reqs:
                if match(req) and not req.finished():
                    req.to_finish = finish_abort(message)

    # --- batching -----------------------------------------------------------------------------

    def get_next_batch_to_run(self) -> ScheduleBatch | None:
        self._abort_on_waiting_timeout()
        self._abort_on_running_timeout()
        if self.lora_manager is not None and self.lora_manager.unloading:
            self.lora_manager.release_unloaded(self._lora_ids_in_use())
        last = self.last_batch
        self.last_batch = None
        if last is not None and last.forward_mode.is_extend():
            self._merge_prefill(last)
        if self.hisparse is not None:
            self._merge_staged()
        new_batch = self.get_new_batch_prefill()
        if new_batch is not None:
            return new_batch
        return self.running_batch if self.update_running_batch() else None

    def _abort_on_waiting_timeout(self) -> None:
        """Upstream's SGLANG_REQ_WAITING_TIMEOUT: a request queued for longer ends with a 503
        (it holds no KV while it waits)."""
        if self.req_waiting_timeout_s <= 0:
            return
        deadline = time.perf_counter() - self.req_waiting_timeout_s
        expired = [r for r in self.waiting_queue if 0 < r.wait_queue_entry_time < deadline]
        if not expired:
            return
        self.waiting_queue = [r for r in self.waiting_queue if r not in expired]
        for req in expired:
            req.finished_reason = finish_abort("Request waiting timeout reached.",
                                               status_code=503)
        self.stream_output(expired)

    def _abort_on_running_timeout(self) -> None:
        """Upstream's SGLANG_REQ_RUNNING_TIMEOUT: a request running for longer ends with a 503
        at its next token, which frees its KV."""
        if self.req_running_timeout_s <= 0:
            return
        deadline = time.perf_counter() - self.req_running_timeout_s
        for req in self.running_batch.reqs:
            if not req.finished() and 0 < req.forward_entry_time < deadline:
                req.to_finish = finish_abort("Request running timeout reached.",
                                             status_code=503)

    def _merge_prefill(self, batch: ScheduleBatch) -> None:
        """After a prefill step: cache the chunked request's progress; the batch's other
        unfinished requests join the running batch, with their penalty rows."""
        chunked = batch.chunked_req
        if chunked is not None and not chunked.finished():
            self.tree_cache.cache_unfinished_req(chunked)
        if self.hisparse is not None:  # requests join once staged (_merge_staged)
            return
        batch.filter_batch([r for r in batch.reqs if not r.finished() and r is not chunked])
        self.running_batch.merge_batch(batch)

    def _merge_staged(self) -> None:
        """HiSparse: the requests whose KV reached the host join the running batch (their
        penalty rows rebuilt from their tokens, all on the host by then)."""
        ready = self.hisparse.collect_ready_reqs()
        if ready:
            batch = self._new_batch(ready)
            batch.rebuild_penalizer()
            self.running_batch.merge_batch(batch)

    def get_new_batch_prefill(self) -> ScheduleBatch | None:
        if not self.waiting_queue and self.chunked_req is None:
            return None
        running = len(self.running_batch.reqs)
        if self.hisparse is not None:  # staged and prefilled requests hold rows too
            running = self.req_to_token_pool.size - self.req_to_token_pool.available_size()
        max_new = self.max_running_requests - running
        if max_new <= 0 and self.chunked_req is None:
            return None
        if self.test_retract and len(self.running_batch.reqs) > self.test_retract_no_prefill_bs:
            return None
        prefix_computed = self.policy.calc_priority(self.waiting_queue, self._match_prefix)
        adder = PrefillAdder(
            self.tree_cache, self.running_batch.reqs,
            self.token_to_kv_pool_allocator.available_size(),
            self.server_args.max_prefill_tokens, self.server_args.chunked_prefill_size,
            self.page_size, max_new)
        if self.chunked_req is not None:
            self.chunked_req.init_next_round_input(None)
            self.chunked_req = adder.add_chunked_req(self.chunked_req)
        self._add_waiting_reqs(adder, prefix_computed)
        if adder.new_chunked_req is not None:
            self.chunked_req = adder.new_chunked_req
        if not adder.can_run_list:
            return None
        chosen = set(map(id, adder.can_run_list))
        self.waiting_queue = [r for r in self.waiting_queue if id(r) not in chosen]
        now = time.perf_counter()
        for req in adder.can_run_list:
            if req.req_pool_idx is None:
                req.cached_tokens += len(req.prefix_indices)
            if req.forward_entry_time == 0:
                req.forward_entry_time = now
        batch = self._new_batch(adder.can_run_list)
        batch.chunked_req = self.chunked_req
        return batch if self._prepare(batch, extend=True) else None

    def _add_waiting_reqs(self, adder: PrefillAdder, prefix_computed: bool) -> None:
        """Admit waiting requests in queue order until one does not fit, matching each one's
        prefix as it comes up unless the policy matched the whole queue."""
        lora_ids = self._lora_admission()
        for req in list(self.waiting_queue):
            if not adder.has_room():
                break
            if not self.grammar_ready(req):
                continue
            if not prefix_computed and not self._match_prefix(req):
                continue
            if not self._lora_admits(lora_ids, req) or not adder.add_one_req(req):
                break

    def _match_prefix(self, req: Req) -> bool:
        """Match a waiting request's cached prefix; False if that failed (it is then aborted
        and out of the queue)."""
        try:
            req.init_next_round_input(self.tree_cache)
        except Exception as e:  # noqa: BLE001 - one request's failure is its own
            self.waiting_queue.remove(req)
            self._fail_in_place(req, e, "matching its prefix", mid_step=False)
            self.stream_output([req])
            return False
        return True

    def update_running_batch(self) -> bool:
        """Filter, retract if memory is short, prepare the decode step; False when there is
        nothing to launch (no request left, or the step already ran request by request)."""
        batch = self.running_batch
        _drop_finishing(batch)
        if batch.is_empty():
            return False
        forced = self.test_retract and self.forward_ct % self.test_retract_interval == 0
        if self.result_queue and (forced or not batch.check_decode_mem()):
            # Retraction needs every token on the host: land the in-flight step first.
            self.process_pending_result()
            _drop_finishing(batch)
            if batch.is_empty():
                return False
        full = not batch.check_decode_mem()
        if forced or full:
            retracted = batch.retract_decode()
            if full:
                logger.info("KV cache full: retracted %d request(s)", len(retracted))
            self.waiting_queue = retracted + self.waiting_queue
        return self._prepare(batch, extend=False)

    def _prepare(self, batch: ScheduleBatch, extend: bool) -> bool:
        """prepare_for_extend / prepare_for_decode; False when it failed (the batch's requests
        then ran one by one)."""
        try:
            if extend:
                batch.prepare_for_extend()
            else:
                batch.prepare_for_decode()
        except Exception as e:  # noqa: BLE001 - see _isolate_failed_batch
            self._isolate_failed_batch(batch, e)
            return False
        return True

    def run_batch(self, batch: ScheduleBatch) -> GenerationBatchResult | None:
        """Launch one batch; None when it failed (its requests then ran one by one)."""
        try:
            return self._launch(batch)
        except Exception as e:  # noqa: BLE001 - see _isolate_failed_batch
            self._on_step_failure(batch, e)
            return None

    def _on_step_failure(self, batch: ScheduleBatch, error: Exception) -> None:
        if self.dp_info.enabled:  # the other ranks are in (or heading to) its collectives
            raise RuntimeError(
                f"DP attention: TP rank {self.tp_rank} (DP rank {self.dp_info.dp_rank}) "
                f"failed inside a step that every rank runs together: "
                f"{type(error).__name__}: {error}") from error
        self._isolate_failed_batch(batch, error)

    def _launch(self, batch: ScheduleBatch) -> GenerationBatchResult:
        self.forward_ct += 1
        self.schedule_trace.record(self.forward_ct, batch)
        worker_batch = batch.get_model_worker_batch()
        assert all(r.delay_sample_func is None for _, r in self.result_queue), \
            "a delayed sample must run before the next forward reads the future map"
        worker_batch.delay_sample = self.enable_overlap and batch.forward_mode.is_decode()
        if self.lora_manager is not None:
            worker_batch.lora_inflight_ids = {r.lora_id for b, _ in self.result_queue
                                              for r in b.reqs}
        result = self.tp_worker.forward_batch_generation(worker_batch)
        AUDIT.step_end()
        self._profile_step()
        return result

    def _mark_pending(self, batch: ScheduleBatch, result: GenerationBatchResult,
                      count: int = 1) -> None:
        """Count the token each request sampled on the device (the worker's future map holds it
        at the request's row) until the host reads it (count=-1: the step was undone)."""
        for req in batch.reqs:
            if req is batch.chunked_req or req.sampling_params.max_new_tokens == 0:
                continue
            req.num_pending_tokens += count

    # --- results ------------------------------------------------------------------------------

    def process_batch_result(self, batch: ScheduleBatch, result: GenerationBatchResult) -> None:
        if batch.forward_mode.is_idle():
            return
        self.check_tp_agreement(result.next_token_ids_cpu)
        if batch.forward_mode.is_extend():
            self.process_batch_result_prefill(batch, result)
        else:
            self.process_batch_result_decode(batch, result)
        self.check_step_invariants()

    # --- failures -----------------------------------------------------------------------------
    # A value that passed validation must never stop the loop. A batch that fails before it
    # launches is undone and its requests run one by one: the one that fails alone is aborted
    # (500, with the error), the others advance as they would have in the batch (sampling is
    # row-wise and batch-invariant). A failure on one request's result or output aborts that
    # request. A device fault (a CUDA error, sticky for the whole context) is not recoverable:
    # it propagates and the scheduler exits, as upstream's does.

    def _isolate_failed_batch(self, batch: ScheduleBatch, error: Exception) -> None:
        if isinstance(error, _DEVICE_FAULTS):
            raise error
        if len(batch.reqs) > 1:  # the traceback comes with the request that fails alone
            logger.error("A batch of %d requests failed (%s: %s); running each alone",
                         len(batch.reqs), type(error).__name__, error)
        self.ran_alone = True
        batch.rollback_step()
        while self.result_queue:  # the batch in flight lands first: its tokens are inputs here
            self.process_pending_result()
        if not batch.forward_mode.is_extend():
            live = [r for r in batch.reqs if not r.finished()]
            self.tp_worker.restore_future_tokens([r.req_pool_idx for r in live],
                                                 [r.output_ids[-1] for r in live])
        for req in [r for r in batch.reqs if not r.finished()]:
            # Under DP attention a step alone would leave the other ranks' collectives behind.
            if len(batch.reqs) == 1 or self.dp_info.enabled:
                self._abort_failed(req, batch, error)
            else:
                self._run_alone(req, batch)
        if not batch.forward_mode.is_extend():
            batch.filter_batch()
            batch.rebuild_penalizer()

    def _run_alone(self, req: Req, failed: ScheduleBatch) -> None:
        """One step of `req` as its own batch, synchronously; abort it if that fails too."""
        alone = self._new_batch([req])
        try:
            if failed.forward_mode.is_extend():
                alone.chunked_req = req if req is failed.chunked_req else None
                alone.prepare_for_extend()
            else:
                alone.rebuild_penalizer()
                alone.prepare_for_decode()
            result = self._launch(alone)
        except Exception as e:  # noqa: BLE001 - this request is the cause: abort it
            alone.rollback_step()
            self._abort_failed(req, failed, e)
            return
        result.synchronize()
        self.process_batch_result(alone, result)
        if alone.forward_mode.is_extend():
            self._merge_prefill(alone)

    def _abort_failed(self, req: Req, failed: ScheduleBatch, error: Exception) -> None:
        """Abort a request whose step failed (and was undone), freeing its row and KV."""
        logger.error("Request %s fails on its own; aborting it", req.rid, exc_info=error)
        if req.req_pool_idx is None:  # admitted, no row yet: only its prefix lock to drop
            self.tree_cache.dec_lock_ref(req.last_node)
        else:  # KV is valid up to the step that failed
            num_kv = len(req.prefix_indices) if failed.forward_mode.is_extend() else None
            if self.hisparse is not None:
                self.hisparse.request_finished(req)
            self.tree_cache.cache_finished_req(req, num_kv)
        if self.chunked_req is req:
            self.chunked_req = None
        req.finished_reason = internal_error("running the request", error)
        self.stream_output([req])

    def _fail_in_place(self, req: Req, error: Exception, what: str, mid_step: bool) -> None:
        """Abort a request whose own work failed; a request in the middle of its prefill
        finishes at its next output token (as a client abort does)."""
        logger.error("Request %s failed while %s; aborting it", req.rid, what, exc_info=error)
        if mid_step:
            req.to_finish = internal_error(what, error)
        else:
            req.finished_reason = internal_error(what, error)

    # --- control ------------------------------------------------------------------------------

    def flush_cache(self) -> bool:
        if not self.is_idle():
            logger.warning("Cache not flushed: there are running or waiting requests")
            return False
        self.tree_cache.reset()
        self.token_to_kv_pool_allocator.clear()
        self.req_to_token_pool.clear()
        logger.info("Cache flushed successfully")
        return True

    def get_internal_state(self) -> dict:
        return {
            "max_total_num_tokens": self.max_total_num_tokens,
            "available_kv_tokens": self.token_to_kv_pool_allocator.available_size(),
            "evictable_kv_tokens": self.tree_cache.evictable_size(),
            "num_running_reqs": len(self.running_batch.reqs),
            "num_waiting_reqs": len(self.waiting_queue),
            "last_gen_throughput": self.last_gen_throughput,
            "forward_ct": self.forward_ct,
            "integrity_error": self.check_integrity(),
            "memory_usage": self._memory_usage(),
            "effective_max_running_requests_per_dp": self.max_running_requests,
            "sync_audit": AUDIT.report(),
            "cuda_graph_replays": {r.name: r.num_replays
                                   for r in self.tp_worker.model_runner.graph_runners()},
            "hisparse": self.hisparse.get_token_stats() if self.hisparse is not None else None,
        }

    def set_internal_state(self, req: SetInternalStateReq) -> SetInternalStateReqOutput:
        """Only RUNTIME_SERVER_ARGS (the HTTP layer refuses others). Switching the audit on
        starts its counts afresh."""
        enable = req.server_args.get("enable_sync_audit")
        if enable is not None:
            if enable and not AUDIT.enabled:
                AUDIT.reset()
            AUDIT.enabled = self.server_args.enable_sync_audit = bool(enable)
        return SetInternalStateReqOutput(
            updated=True, server_args={"enable_sync_audit": self.server_args.enable_sync_audit})

    def _memory_usage(self) -> dict:
        runner = self.tp_worker.model_runner
        weight = sum(p.numel() * p.element_size() for p in runner.model.parameters())
        return {"weight": weight / (1 << 30),
                "kvcache": runner.token_to_kv_pool.get_kv_size_bytes() / (1 << 30),
                "token_capacity": self.max_total_num_tokens, "graph": 0}


def env_timeout_s(name: str) -> float:
    """A timeout from the environment in seconds (its deprecated name in ms); -1: off."""
    value, source, scale, unit = os.environ.get(name), name, 1.0, "seconds"
    if value is None and _DEPRECATED_MS_ENVS[name] in os.environ:
        source, scale, unit = _DEPRECATED_MS_ENVS[name], 1e-3, "milliseconds"
        value = os.environ[source]
    if value is None or not value.strip():
        return -1.0
    try:
        return float(value) * scale
    except ValueError:
        raise ValueError(f"{source} must be a number of {unit}, got {value!r}.") from None


def _drop_finishing(batch: ScheduleBatch) -> None:
    """Requests that will have all their tokens once the in-flight step lands sit out."""
    batch.filter_batch([r for r in batch.reqs
                        if r.finished_reason is None and not r.will_finish_by_length()])


def _dist_init_method(port_args: PortArgs | None) -> str | None:
    if port_args is None or port_args.nccl_port is None:
        return None
    return f"tcp://127.0.0.1:{port_args.nccl_port}"


def run_scheduler_process(server_args: ServerArgs, port_args: PortArgs, pipe_writer,
                          tp_rank: int = 0) -> None:
    """Process target: build the scheduler, report readiness on the pipe, then serve forever."""
    prefix = " Scheduler" if server_args.tp_size == 1 else f" Scheduler TP{tp_rank}"
    if server_args.enable_dp_attention:
        prefix += f" DP{tp_rank // server_args.attn_tp_size}"
    configure_logging(server_args.log_level, prefix)
    faulthandler.enable()
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        scheduler = Scheduler(server_args, port_args, tp_rank)
    except Exception as e:  # noqa: BLE001 - reported to the parent, which exits with it
        logger.exception("Scheduler failed to start")
        pipe_writer.send({"status": "error", "message": f"{type(e).__name__}: {e}"})
        return
    pipe_writer.send(scheduler.ready_info())
    try:
        if scheduler.enable_overlap:
            scheduler.event_loop_overlap()
        else:
            scheduler.event_loop_normal()
    except Exception:
        logger.exception("Scheduler hit an exception")
        raise

