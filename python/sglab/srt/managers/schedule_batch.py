"""Req, ScheduleBatch and ModelWorkerBatch: request state and batches on the scheduler (host).

Everything here is host data. `prepare_for_extend` / `prepare_for_decode` allocate pool rows and
KV slots and fill host tensors; `ForwardBatch.init_new` uploads them and writes the device copy
of `req_to_token`.
"""

from __future__ import annotations

import copy
import dataclasses
import itertools
import re
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from sglab.srt.layers.sampler import SamplingBatchInfo
from sglab.srt.managers.schedule_batch_mamba import ScheduleBatchMambaMixin
from sglab.srt.model_executor.forward_batch_info import ForwardMode
from sglab.srt.sampling.penaltylib import PENALIZERS, BatchedPenalizerOrchestrator
from sglab.srt.sampling.sampling_params import SamplingParams

if TYPE_CHECKING:
    from concurrent.futures import Future

    from sglab.srt.constrained.grammar_backend import Grammar
    from sglab.srt.managers.hisparse_coordinator import HiSparseCoordinator, HiSparseStepPlan
    from sglab.srt.mem_cache.memory_pool import ReqToTokenPool, TokenToKVPoolAllocator
    from sglab.srt.mem_cache.radix_cache import RadixCache

_EMPTY = torch.empty(0, dtype=torch.int64)
_compositions = itertools.count()


def finish_length(n: int) -> dict:
    return {"type": "length", "length": n}


def finish_stop(matched: int | str) -> dict:
    return {"type": "stop", "matched": matched}


def finish_abort(message: str = "Abort request.", status_code: int | None = None) -> dict:
    reason: dict[str, Any] = {"type": "abort", "message": message}
    if status_code is not None:
        reason["status_code"] = status_code
    return reason


class Req:
    """One request's state on the scheduler."""

    def __init__(self, rid: str, origin_input_text: str | None, origin_input_ids: list[int],
                 sampling_params: SamplingParams, seed: int, return_logprob: bool = False,
                 logprob_start_len: int = -1, top_logprobs_num: int = 0, stream: bool = False,
                 eos_token_ids: set[int] | None = None, lora_id: str | None = None,
                 token_ids_logprob: list[int] | None = None):
        self.rid = rid
        self.origin_input_text = origin_input_text
        self.origin_input_ids = origin_input_ids
        self.sampling_params = sampling_params
        self.seed = seed
        self.stream = stream
        self.eos_token_ids = eos_token_ids or set()
        self.lora_id = lora_id  # the adapter's id (not its name); None = the base model
        self.output_ids: list[int] = []
        # Overlap scheduling: tokens sampled on the device that the host has not read yet (the
        # next decode reads the last one from the worker's future map, by request row).
        self.num_pending_tokens = 0
        self.fill_ids: list[int] = []
        self.finished_reason: dict | None = None
        # A finish (abort) decided while the request is mid-step; it takes effect at its next
        # output token.
        self.to_finish: dict | None = None
        # Memory: pool row, the prefix whose KV is already in the row, and its tree node.
        self.req_pool_idx: int | None = None
        self.prefix_indices: torch.Tensor = _EMPTY
        self.last_node: Any = None
        self.extend_input_len = 0
        self.is_chunked = 0
        self.cached_tokens = 0
        self.total_retractions = 0
        # perf_counter() times: queued (upstream's timeouts; 0: not yet), first scheduled.
        self.wait_queue_entry_time = 0.0
        self.forward_entry_time = 0.0
        # Hybrid models: the state slots (device tensors, as upstream) and prefix-cache tracking
        # (the next ping-pong track slot, the length of its last snapshot).
        self.mamba_pool_idx: torch.Tensor | None = None
        self.mamba_ping_pong_track_buffer: torch.Tensor | None = None
        self.mamba_next_track_idx: int | None = None
        self.mamba_last_track_seqlen: int | None = None
        self.mamba_branching_seqlen: int | None = None
        # The prefix length the tree owns, where a hybrid model's cache_unfinished_req set it.
        self.cache_protected_len: int | None = None
        # Logprobs. The prompt's are computed once, on its first full prefill.
        self.return_logprob = return_logprob
        self.top_logprobs_num = top_logprobs_num
        prompt_len = len(origin_input_ids)
        start = prompt_len - 1 if logprob_start_len < 0 else logprob_start_len
        self.logprob_start_len = min(max(start, 0), max(prompt_len - 1, 0))
        self.input_logprobs_done = not return_logprob or logprob_start_len < 0
        self.input_token_logprobs_val: list[float | None] = []
        self.input_token_logprobs_idx: list[int] = []
        self.input_top_logprobs_val: list[list[float] | None] = []
        self.input_top_logprobs_idx: list[list[int] | None] = []
        self.output_token_logprobs_val: list[float] = []
        self.output_token_logprobs_idx: list[int] = []
        self.output_top_logprobs_val: list[list[float]] = []
        self.output_top_logprobs_idx: list[list[int]] = []
        # token_ids_logprob: per logprob position, the logprobs of these ids.
        self.token_ids_logprob = token_ids_logprob if return_logprob else None
        self.input_token_ids_logprobs_val: list[list[float] | None] = []
        self.input_token_ids_logprobs_idx: list[list[int] | None] = []
        self.output_token_ids_logprobs_val: list[list[float]] = []
        self.output_token_ids_logprobs_idx: list[list[int]] = []
        # A CustomLogitProcessor (set_custom_logit_processor), the string it came from, and
        # its custom_params, which carry the request under "__req__" as upstream's do.
        self.custom_logit_processor: Any = None
        self.custom_logit_processor_key: str | None = None
        self.custom_params: dict | None = None
        # How much was already sent to the detokenizer: of output_ids, of each logprob list.
        self.send_token_offset = 0
        self.send_offsets: dict[str, int] = {}
        # Structured outputs: the grammar's compilation while waiting, then its matcher.
        self.grammar_future: Future | None = None
        self.grammar: Grammar | None = None

    def set_custom_logit_processor(self, key: str, processor: Any) -> None:
        self.custom_logit_processor_key, self.custom_logit_processor = key, processor
        params = self.sampling_params.custom_params
        self.custom_params = {**params, "__req__": self} if isinstance(params, dict) else None

    # --- lengths ------------------------------------------------------------------------------

    @property
    def seqlen(self) -> int:
        return len(self.origin_input_ids) + len(self.output_ids) + self.num_pending_tokens

    def will_finish_by_length(self) -> bool:
        max_new = self.sampling_params.max_new_tokens
        return max_new is not None and len(self.output_ids) + self.num_pending_tokens >= max_new

    def finished(self) -> bool:
        return self.finished_reason is not None

    def init_next_round_input(self, tree_cache: "RadixCache | None") -> None:
        """Tokens to prefill next, and the longest cached prefix to reuse."""
        self.fill_ids = self.origin_input_ids + self.output_ids
        max_prefix_len = len(self.fill_ids) - 1
        if not self.input_logprobs_done:
            # The logprob of prompt token i comes from the hidden state at i - 1: recompute
            # from logprob_start_len - 1 on.
            max_prefix_len = min(max_prefix_len, max(self.logprob_start_len - 1, 0))
        if tree_cache is not None:
            match = tree_cache.match_prefix(self.fill_ids[:max(max_prefix_len, 0)])
            self.prefix_indices, self.last_node = match.device_indices, match.last_device_node
            self.mamba_branching_seqlen = match.mamba_branching_seqlen
            self.cache_protected_len = None
        self.extend_input_len = len(self.fill_ids) - len(self.prefix_indices)

    def reset_for_retract(self) -> None:
        self.prefix_indices = _EMPTY
        self.last_node = None
        self.req_pool_idx = None
        self.extend_input_len = 0
        self.is_chunked = 0
        self.total_retractions += 1
        self.mamba_pool_idx = self.mamba_ping_pong_track_buffer = None
        self.mamba_next_track_idx = self.mamba_last_track_seqlen = None
        self.mamba_branching_seqlen = self.cache_protected_len = None

    # --- finish -------------------------------------------------------------------------------

    def check_finished(self, tokenizer: Any, context_len: int) -> None:
        if self.finished_reason is not None:
            return
        if self.to_finish is not None:
            self.finished_reason, self.to_finish = self.to_finish, None
            return
        params = self.sampling_params
        if params.max_new_tokens is not None and len(self.output_ids) >= params.max_new_tokens:
            self.finished_reason = finish_length(params.max_new_tokens)
            return
        if len(self.origin_input_ids) + len(self.output_ids) >= context_len:
            self.finished_reason = finish_length(len(self.output_ids))
            return
        if self.grammar is not None and self.grammar.is_terminated():
            self.finished_reason = finish_stop(self.output_ids[-1])
            return
        if len(self.output_ids) < params.min_new_tokens:
            return
        last = self.output_ids[-1]
        if last in (params.stop_token_ids or ()) or (
            not params.ignore_eos and last in self.eos_token_ids
        ):
            self.finished_reason = finish_stop(last)
            return
        if params.stop_strs and tokenizer is not None:
            tail = tokenizer.decode(self.output_ids[-(params.stop_str_max_len + 1):])
            for stop in params.stop_strs:
                if stop in tail:
                    self.finished_reason = finish_stop(stop)
                    return
        if params.stop_regex_strs and tokenizer is not None:
            # As upstream: a match is at most stop_regex_max_len characters, so that many
            # tokens (plus one) hold it; an unbounded pattern (`*`, `+`) searches all the output.
            text = tokenizer.decode(self.output_ids[-(params.stop_regex_max_len + 1):])
            for pattern in params.stop_regex_strs:
                if re.search(pattern, text):
                    self.finished_reason = finish_stop(pattern)
                    return

    def __repr__(self) -> str:
        return f"Req(rid={self.rid}, input_len={len(self.origin_input_ids)}, " \
               f"output_len={len(self.output_ids)})"


@dataclass
class ModelWorkerBatch:
    """What the worker needs for one forward, all on the host."""

    forward_mode: ForwardMode
    input_ids: torch.Tensor
    req_pool_indices: torch.Tensor
    seq_lens_cpu: torch.Tensor
    seq_lens_sum: int
    seq_lens_max: int
    out_cache_loc: torch.Tensor
    sampling_info: SamplingBatchInfo
    return_logprob: bool = False
    top_logprobs_nums: list[int] | None = None
    extend_num_tokens: int | None = None
    extend_seq_lens: list[int] | None = None
    extend_prefix_lens: list[int] | None = None
    extend_logprob_start_lens: list[int] | None = None
    extend_logprob_pruned_lens: list[int] | None = None
    extend_input_logprob_token_ids: torch.Tensor | None = None
    # token_ids_logprob of each request (None: no request asks for any).
    token_ids_logprobs: list[list[int] | None] | None = None
    req_to_token_writes: tuple[torch.Tensor, torch.Tensor] | None = None
    # Overlap: a decode step with grammars samples only once the previous step's result was
    # processed (its mask needs the grammars to have accepted the previous tokens).
    delay_sample: bool = False
    # Which requests, in which order (ScheduleBatch.composition): while it stays, the worker
    # keeps their device rows, lengths and sampling tensors from one decode step to the next.
    composition: int = -1
    # LoRA: each request's adapter id, and the adapters of the batch still in flight.
    lora_ids: list[str | None] | None = None
    lora_inflight_ids: set[str | None] | None = None
    # HiSparse: the decode step's plan (backups, buffer growth, sparse rows).
    hisparse_plan: "HiSparseStepPlan | None" = None
    # Hybrid models, extra_buffer: which requests snapshot their state into which track slot
    # (device, as upstream); a prefill also says where (and, host_track, keeps host copies).
    mamba_track_indices: torch.Tensor | None = None
    mamba_track_mask: torch.Tensor | None = None
    mamba_track_seqlens: torch.Tensor | None = None
    mamba_track_mask_cpu: list[bool] | None = None
    mamba_track_seqlens_cpu: list[int] | None = None
    # DP attention (Scheduler.prepare_mlp_sync_batch): every DP rank's token count, whether any
    # rank extends (MAX), whether all can replay a CUDA graph (MIN) and, patch 0003c, whether
    # all extend (MIN).
    global_num_tokens: list[int] | None = None
    is_extend_in_batch: bool = False
    can_run_dp_cuda_graph: bool = False
    all_extend_in_batch: bool = False


@dataclass(frozen=True)
class RequestFacts:
    """Per-request values that hold as long as a batch keeps its requests (a composition)."""

    composition: int
    return_logprob: bool
    top_logprobs_nums: list[int]
    lora_ids: list[str | None]
    has_grammar: bool
    # Per request the ids of token_ids_logprob (None: no request asks for any).
    token_ids_logprobs: list[list[int] | None] | None

    @classmethod
    def of(cls, reqs: list[Req], composition: int) -> "RequestFacts":
        return cls(composition, any(r.return_logprob for r in reqs),
                   [r.top_logprobs_num if r.return_logprob else 0 for r in reqs],
                   [r.lora_id for r in reqs], any(r.grammar is not None for r in reqs),
                   _token_ids_logprobs(reqs))


@dataclass
class ScheduleBatch(ScheduleBatchMambaMixin):
    reqs: list[Req]
    req_to_token_pool: "ReqToTokenPool"
    token_to_kv_pool_allocator: "TokenToKVPoolAllocator"
    tree_cache: "RadixCache"
    vocab_size: int
    forward_mode: ForwardMode = ForwardMode.DECODE
    # Device state of the penalties, one row per request (None: no request has any).
    penalizer_orchestrator: BatchedPenalizerOrchestrator | None = None
    # The request this prefill batch leaves half-prefilled (it yields no token this step).
    chunked_req: Req | None = None
    # Changes (a fresh number) whenever the requests or their order change.
    composition: int = field(default_factory=lambda: next(_compositions))
    # Host tensors of the current step (decode: no input ids, the worker's future map has them).
    input_ids: torch.Tensor = field(default_factory=lambda: _EMPTY)
    req_pool_indices: torch.Tensor = field(default_factory=lambda: _EMPTY)
    seq_lens_cpu: torch.Tensor = field(default_factory=lambda: _EMPTY)
    out_cache_loc: torch.Tensor = field(default_factory=lambda: _EMPTY)
    # Extend only.
    prefix_lens: list[int] = field(default_factory=list)
    extend_lens: list[int] = field(default_factory=list)
    extend_num_tokens: int = 0
    extend_logprob_start_lens: list[int] = field(default_factory=list)
    extend_logprob_pruned_lens: list[int] = field(default_factory=list)
    extend_input_logprob_token_ids: torch.Tensor | None = None
    # What this step took, until it launches (see rollback_step): each request's length before
    # its new KV slots (set once they are allocated) and the row writes taken from the pool.
    step_prev_lens: list[int] | torch.Tensor | None = None
    step_row_writes: list | None = None
    # The composition the decode mirrors (req_pool_indices, seq_lens_cpu) and the host
    # SamplingBatchInfo were built for.
    decode_composition: int = -1
    sampling_info: SamplingBatchInfo | None = None
    sampling_composition: int = -1
    facts: RequestFacts | None = None
    # HiSparse (None: off): the allocator's slots are logical (host-backed) ones; the
    # coordinator gives the device slots of a decode step (its plan) and manages the rows.
    hisparse: "HiSparseCoordinator | None" = None
    hisparse_plan: "HiSparseStepPlan | None" = None
    # Hybrid models (schedule_batch_mamba.py): this step's Mamba-state snapshots.
    mamba_track_indices: torch.Tensor | None = None
    mamba_track_mask: torch.Tensor | None = None
    mamba_track_seqlens: torch.Tensor | None = None
    mamba_track_mask_cpu: list[bool] | None = None
    mamba_track_seqlens_cpu: list[int] | None = None
    # DP attention: the step's agreement over ranks (see ModelWorkerBatch).
    global_num_tokens: list[int] | None = None
    is_extend_in_batch: bool = False
    can_run_dp_cuda_graph: bool = False
    all_extend_in_batch: bool = False

    @classmethod
    def init_new(cls, reqs: list[Req], req_to_token_pool, token_to_kv_pool_allocator,
                 tree_cache, vocab_size: int,
                 hisparse: "HiSparseCoordinator | None" = None) -> "ScheduleBatch":
        return cls(reqs=reqs, req_to_token_pool=req_to_token_pool,
                   token_to_kv_pool_allocator=token_to_kv_pool_allocator, tree_cache=tree_cache,
                   vocab_size=vocab_size, hisparse=hisparse)

    def batch_size(self) -> int:
        return len(self.reqs)

    def is_empty(self) -> bool:
        return not self.reqs

    def request_facts(self) -> RequestFacts:
        if self.facts is None or self.facts.composition != self.composition:
            self.facts = RequestFacts.of(self.reqs, self.composition)
        return self.facts

    @property
    def return_logprob(self) -> bool:
        return self.request_facts().return_logprob

    # --- memory -------------------------------------------------------------------------------

    def _alloc_rows(self, reqs: list[Req]) -> None:
        need = [r for r in reqs if r.req_pool_idx is None]
        self._evict_mamba_for(reqs)
        if self.req_to_token_pool.alloc_reqs(reqs) is None:
            raise RuntimeError("req_to_token_pool is out of rows; max_running_requests too large")
        for req in need:
            if len(req.prefix_indices):
                self.req_to_token_pool.write(req.req_pool_idx, 0, req.prefix_indices,
                                             sync_device=True)
        self._copy_prefix_states(need)

    def _evict_for(self, num_tokens: int) -> None:
        allocator = self.token_to_kv_pool_allocator
        if allocator.available_size() < num_tokens and self.tree_cache is not None:
            self.tree_cache.evict(num_tokens)

    def _last_locs(self, prefix_lens: list[int]) -> list[int]:
        table = self.req_to_token_pool.req_to_token_cpu
        return [int(table[r.req_pool_idx, n - 1]) if n > 0 else -1
                for r, n in zip(self.reqs, prefix_lens)]

    # --- extend -------------------------------------------------------------------------------

    def prepare_for_extend(self) -> None:
        self.forward_mode = ForwardMode.EXTEND
        self._begin_step()
        reqs = self.reqs
        self._alloc_rows(reqs)
        self.prefix_lens = [len(r.prefix_indices) for r in reqs]
        self.extend_lens = [r.extend_input_len for r in reqs]
        seq_lens = [p + e for p, e in zip(self.prefix_lens, self.extend_lens)]
        self.extend_num_tokens = sum(self.extend_lens)
        self._evict_for(self.extend_num_tokens + len(reqs) * self._page_size())
        out = self.token_to_kv_pool_allocator.alloc_extend(
            self.prefix_lens, seq_lens, self._last_locs(self.prefix_lens), self.extend_num_tokens)
        if out is None:
            raise RuntimeError("KV cache is out of memory during prefill")
        self.out_cache_loc, self.step_prev_lens = out, self.prefix_lens
        start = 0
        for req, prefix_len, ext in zip(reqs, self.prefix_lens, self.extend_lens):
            self.req_to_token_pool.write(req.req_pool_idx, prefix_len, out[start:start + ext],
                                         sync_device=False)
            start += ext
        ids = [t for r, p in zip(reqs, self.prefix_lens) for t in r.fill_ids[p:len(r.fill_ids)]]
        self.input_ids = torch.tensor(ids, dtype=torch.int64)
        self.req_pool_indices = torch.tensor([r.req_pool_idx for r in reqs], dtype=torch.int64)
        self.seq_lens_cpu = torch.tensor(seq_lens, dtype=torch.int64)
        self._prepare_mamba_track_for_extend()
        self._prepare_input_logprobs()
        self.rebuild_penalizer()

    def _prepare_input_logprobs(self) -> None:
        """Which extend positions give prompt logprobs, and the prompt tokens they score."""
        self.extend_logprob_start_lens, self.extend_logprob_pruned_lens = [], []
        targets: list[int] = []
        for req, a, n in zip(self.reqs, self.prefix_lens, self.extend_lens):
            lo, hi = a, a
            if not req.input_logprobs_done:
                prompt_len = len(req.origin_input_ids)
                lo = max(a, req.logprob_start_len - 1)
                hi = max(lo, min(a + n, prompt_len - 1))
                targets.extend(req.origin_input_ids[lo + 1:hi + 1])
            self.extend_logprob_start_lens.append(lo - a)
            self.extend_logprob_pruned_lens.append(hi - lo)
        self.extend_input_logprob_token_ids = (
            torch.tensor(targets, dtype=torch.int64) if targets else None)

    # --- decode -------------------------------------------------------------------------------

    def prepare_for_decode(self) -> None:
        """Host mirrors of one decode step, with no per-request Python while the batch keeps
        its requests: lengths grow by one, rows stay, the new slots go in with one write."""
        self.forward_mode = ForwardMode.DECODE
        self._begin_step()
        if self.decode_composition != self.composition:
            self.req_pool_indices = torch.tensor([r.req_pool_idx for r in self.reqs],
                                                 dtype=torch.int64)
            prev_lens = torch.tensor([r.seqlen - 1 for r in self.reqs], dtype=torch.int64)
            self.decode_composition = self.composition
        else:
            prev_lens = self.seq_lens_cpu
        self._evict_for(len(self.reqs) * self._page_size())
        out = self._alloc_decode(prev_lens)
        if out is None:
            raise RuntimeError("KV cache is out of memory during decode")
        self.out_cache_loc, self.step_prev_lens = out, prev_lens
        self.req_to_token_pool.req_to_token_cpu[self.req_pool_indices, prev_lens] = \
            out.to(torch.int32)
        self.seq_lens_cpu = prev_lens + 1
        if self.hisparse is not None:
            self.hisparse_plan = self.hisparse.map_last_loc_to_buffer(
                self.req_pool_indices, self.seq_lens_cpu, out)
        self._prepare_mamba_track_for_decode()
        self.input_ids = _EMPTY
        self.prefix_lens, self.extend_lens, self.extend_num_tokens = [], [], 0

    def _alloc_decode(self, prev_lens: torch.Tensor) -> torch.Tensor | None:
        allocator = self.token_to_kv_pool_allocator
        if allocator.page_size == 1:
            return allocator.alloc(len(self.reqs))
        table = self.req_to_token_pool.req_to_token_cpu
        last_locs = table[self.req_pool_indices, prev_lens - 1].to(torch.int64)
        return allocator.alloc_decode((prev_lens + 1).tolist(), last_locs.tolist())

    def check_decode_mem(self) -> bool:
        need = _decode_need(self.reqs, self._page_size())
        self._evict_for(need)
        return self.token_to_kv_pool_allocator.available_size() >= need

    def retract_decode(self) -> list[Req]:
        """Free requests (longest-waiting keep their place) until the next decodes fit."""
        order = sorted(range(len(self.reqs)),
                       key=lambda i: (len(self.reqs[i].output_ids),
                                      -len(self.reqs[i].origin_input_ids)))
        retracted: list[Req] = []
        while len(self.reqs) - len(retracted) > 1:
            idx = order.pop(0)
            req = self.reqs[idx]
            retracted.append(req)
            if self.hisparse is not None:
                self.hisparse.retract_req(req)
            self.tree_cache.cache_finished_req(req)
            req.reset_for_retract()
            keep = [r for r in self.reqs if r not in retracted]
            needed = _decode_need(keep, self._page_size()) * 2
            self._evict_for(needed)
            if self.token_to_kv_pool_allocator.available_size() >= needed:
                break
        self.filter_batch([r for r in self.reqs if r not in retracted])
        return retracted

    def _page_size(self) -> int:
        return self.token_to_kv_pool_allocator.page_size

    # --- batch composition --------------------------------------------------------------------

    def filter_batch(self, keep: list[Req] | None = None) -> None:
        """Keep `keep` (in order; default: the unfinished requests), with their penalty rows."""
        keep = [r for r in self.reqs if not r.finished()] if keep is None else keep
        if len(keep) == len(self.reqs):  # `keep` is a subsequence: the same requests
            return
        if self.penalizer_orchestrator is not None:
            row = {id(r): i for i, r in enumerate(self.reqs)}
            self.penalizer_orchestrator = self.penalizer_orchestrator.filter(
                [row[id(r)] for r in keep], keep)
        self.reqs = keep
        self.composition = next(_compositions)

    def merge_batch(self, other: "ScheduleBatch") -> None:
        self.penalizer_orchestrator = BatchedPenalizerOrchestrator.merge(
            self.penalizer_orchestrator, self.reqs, other.penalizer_orchestrator, other.reqs)
        self.reqs = self.reqs + other.reqs
        if other.reqs:
            self.composition = next(_compositions)

    def rebuild_penalizer(self) -> None:
        """Penalty state from the requests' host tokens (they must all be on the host)."""
        self.penalizer_orchestrator = BatchedPenalizerOrchestrator.from_reqs(
            PENALIZERS, self.reqs, self.vocab_size, self.req_to_token_pool.device)

    # --- failure ------------------------------------------------------------------------------

    def _begin_step(self) -> None:
        self.out_cache_loc, self.step_prev_lens, self.step_row_writes = _EMPTY, None, None
        self.hisparse_plan = None
        self._clear_mamba_track()

    def rollback_step(self) -> None:
        """Undo what this step took before it launched: its KV slots (whole new pages only: a
        request's partly filled page stays its own) and the queued row writes it popped."""
        if self.step_prev_lens is not None:
            page, out, start = self._page_size(), self.out_cache_loc, 0
            extend = self.forward_mode.is_extend()
            taken = []
            prev_lens = self.step_prev_lens
            for i, prev_len in enumerate(prev_lens.tolist() if isinstance(prev_lens, torch.Tensor)
                                         else prev_lens):
                n = self.extend_lens[i] if extend else 1
                continued = min((-prev_len) % page, n)  # slots that fill the last partial page
                taken.append(out[start + continued:start + n])
                start += n
            if taken:
                self.token_to_kv_pool_allocator.free(torch.cat(taken))
        if self.step_row_writes:
            self.req_to_token_pool.restore_pending_writes(self.step_row_writes)
        if self.hisparse_plan is not None:
            self.hisparse.rollback_step(self.hisparse_plan)
        self._begin_step()
        # The requests may have advanced one by one since: rebuild the mirrors from them.
        self.composition = next(_compositions)

    def copy(self) -> "ScheduleBatch":
        """A snapshot for processing this step's result after the batch moved on (overlap)."""
        snapshot = copy.copy(self)
        snapshot.reqs = list(self.reqs)
        return snapshot

    def _sampling_batch_info(self) -> SamplingBatchInfo:
        """The batch's sampling tensors, rebuilt only when its requests change."""
        if self.sampling_composition != self.composition or self.sampling_info is None:
            self.sampling_info = SamplingBatchInfo.from_params(
                [r.sampling_params for r in self.reqs], [r.seed for r in self.reqs])
            self.sampling_info.custom_logit_processors = _custom_logit_processors(self.reqs)
            if self.request_facts().has_grammar:
                self.sampling_info.grammars = [r.grammar for r in self.reqs]
            self.sampling_composition = self.composition
        if self.penalizer_orchestrator is None:
            return self.sampling_info
        return dataclasses.replace(self.sampling_info,
                                   penalizer_orchestrator=self.penalizer_orchestrator)

    def _device_out_cache_loc(self) -> torch.Tensor:
        """The slots the worker writes the step's KV to (with HiSparse the allocator's are
        logical: a prefill's map to device slots, a decode step's are the plan's)."""
        if self.hisparse is None:
            return self.out_cache_loc
        if self.hisparse_plan is not None:
            return self.hisparse_plan.out_cache_loc
        return self.hisparse.allocator.to_device(self.out_cache_loc)

    def prepare_for_idle(self) -> None:
        """DP attention: no tokens this step, only the other ranks' collectives."""
        self.forward_mode = ForwardMode.IDLE
        self._begin_step()
        self.input_ids = self.req_pool_indices = self.seq_lens_cpu = _EMPTY
        self.prefix_lens, self.extend_lens, self.extend_num_tokens = [], [], 0

    def num_tokens(self) -> int:
        """Tokens this step runs (DP attention's per-rank count)."""
        if self.forward_mode.is_extend():
            return self.extend_num_tokens
        return 0 if self.forward_mode.is_idle() else len(self.reqs)

    def _dp_worker_fields(self, mwb: ModelWorkerBatch) -> None:
        mwb.global_num_tokens = self.global_num_tokens
        mwb.is_extend_in_batch = self.is_extend_in_batch
        mwb.can_run_dp_cuda_graph = self.can_run_dp_cuda_graph
        mwb.all_extend_in_batch = self.all_extend_in_batch

    def get_model_worker_batch(self) -> ModelWorkerBatch:
        if self.forward_mode.is_idle():
            mwb = ModelWorkerBatch(ForwardMode.IDLE, _EMPTY, _EMPTY, _EMPTY, 0, 0, _EMPTY,
                                   self._sampling_batch_info(), top_logprobs_nums=[])
            self._dp_worker_fields(mwb)
            return mwb
        facts = self.request_facts()
        self.step_row_writes = self.req_to_token_pool.take_pending_writes()
        mwb = ModelWorkerBatch(
            forward_mode=self.forward_mode,
            input_ids=self.input_ids,
            req_pool_indices=self.req_pool_indices,
            seq_lens_cpu=self.seq_lens_cpu,
            seq_lens_sum=int(self.seq_lens_cpu.sum()),
            seq_lens_max=int(self.seq_lens_cpu.max()),
            out_cache_loc=self._device_out_cache_loc(),
            sampling_info=self._sampling_batch_info(),
            return_logprob=facts.return_logprob,
            top_logprobs_nums=facts.top_logprobs_nums,
            token_ids_logprobs=facts.token_ids_logprobs,
            req_to_token_writes=self.req_to_token_pool.flatten_writes(self.step_row_writes),
            composition=self.composition,
            lora_ids=facts.lora_ids,
            hisparse_plan=self.hisparse_plan,
        )
        self._mamba_worker_fields(mwb)
        self._dp_worker_fields(mwb)
        if self.forward_mode.is_extend():
            mwb.extend_num_tokens = self.extend_num_tokens
            mwb.extend_seq_lens = self.extend_lens
            mwb.extend_prefix_lens = self.prefix_lens
            mwb.extend_logprob_start_lens = self.extend_logprob_start_lens
            mwb.extend_logprob_pruned_lens = self.extend_logprob_pruned_lens
            mwb.extend_input_logprob_token_ids = self.extend_input_logprob_token_ids
        return mwb


def _token_ids_logprobs(reqs: list[Req]) -> list[list[int] | None] | None:
    ids = [r.token_ids_logprob for r in reqs]
    return ids if any(x is not None for x in ids) else None


def _custom_logit_processors(reqs: list[Req]) -> list | None:
    rows = [None if r.custom_logit_processor is None else
            (r.custom_logit_processor_key, r.custom_logit_processor, r.custom_params)
            for r in reqs]
    return rows if any(row is not None for row in rows) else None


def _decode_need(reqs: list[Req], page: int) -> int:
    """KV slots the next decode step may take (whole pages when page_size > 1)."""
    if page == 1:
        return len(reqs)
    return sum(page for r in reqs if (r.seqlen - 1) % page == 0)
