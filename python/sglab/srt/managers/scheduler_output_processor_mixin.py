"""Result processing and output building of the scheduler: a step's tokens and logprobs onto
its requests, then one BatchTokenIDOutput per step for the detokenizer."""

from __future__ import annotations

import dataclasses
import logging
from typing import TYPE_CHECKING

import torch

from sglab.srt.managers.io_struct import BatchTokenIDOutput
from sglab.srt.managers.schedule_batch import Req, ScheduleBatch, finish_abort, finish_length

if TYPE_CHECKING:
    from sglab.srt.managers.scheduler import Scheduler
    from sglab.srt.managers.tp_worker import GenerationBatchResult

logger = logging.getLogger(__name__)

# What a message sends up to, per request: len(output_ids), and each logprob list's length
# (None: the request returns no logprobs).
_Sent = tuple[int, "tuple[int, ...] | None"]
LOGPROB_FIELDS = (
    "input_token_logprobs_val", "input_token_logprobs_idx", "input_top_logprobs_val",
    "input_top_logprobs_idx", "output_token_logprobs_val", "output_token_logprobs_idx",
    "output_top_logprobs_val", "output_top_logprobs_idx", "input_token_ids_logprobs_val",
    "input_token_ids_logprobs_idx", "output_token_ids_logprobs_val",
    "output_token_ids_logprobs_idx",
)


class SchedulerOutputProcessorMixin:
    def process_batch_result_prefill(self: Scheduler, batch: ScheduleBatch,
                                     result: GenerationBatchResult) -> None:
        input_lp_offset = input_ids_offset = 0
        result.token_ids_offsets = _token_ids_offsets(batch)
        for i, req in enumerate(batch.reqs):
            offset, ids_offset = input_lp_offset, input_ids_offset
            input_lp_offset += batch.extend_logprob_pruned_lens[i]
            input_ids_offset += batch.extend_logprob_pruned_lens[i] * len(req.token_ids_logprob
                                                                          or ())
            chunked = req is batch.chunked_req
            try:
                if not req.input_logprobs_done:
                    self._add_input_logprobs(req, batch, i, result, offset, ids_offset)
                if not chunked:
                    self._append_first_token(req, result, i)
            except Exception as e:  # noqa: BLE001 - aborts this request only
                self._fail_in_place(req, e, "processing its prefill", mid_step=chunked)
            if chunked:
                continue
            req.is_chunked = 0
            if req.finished():
                self.tree_cache.cache_finished_req(req, len(req.fill_ids))
            else:
                self.tree_cache.cache_unfinished_req(req)
                if self.hisparse is not None:
                    self.hisparse.admit_request_into_staging(req)
        self.stream_output(batch.reqs)

    def _append_first_token(self: Scheduler, req: Req, result: GenerationBatchResult,
                            i: int) -> None:
        if req.sampling_params.max_new_tokens == 0:
            # Prefill only: no token, but the next position's token_ids_logprob (scoring's).
            req.finished_reason = finish_length(0)
            if req.return_logprob and req.token_ids_logprob is not None:
                _add_next_token_ids_logprobs(req, result, i)
        else:
            self._append_token(req, result, i)

    def process_batch_result_decode(self: Scheduler, batch: ScheduleBatch,
                                    result: GenerationBatchResult) -> None:
        result.token_ids_offsets = _token_ids_offsets(batch)
        for i, req in enumerate(batch.reqs):
            if req.finished_reason is not None:
                self._release_overlap_slot(req, batch.out_cache_loc[i],
                                           int(batch.seq_lens_cpu[i]) - 1)
                continue
            try:
                self._append_token(req, result, i)
            except Exception as e:  # noqa: BLE001 - aborts this request only
                self._fail_in_place(req, e, "processing its output", mid_step=False)
            if req.mamba_ping_pong_track_buffer is not None:
                self._mamba_prefix_cache_update(req)
            if req.finished_reason is not None:
                if self.hisparse is not None:
                    self.hisparse.request_finished(req)
                # This step's KV is written even when its token is dropped (a failed processor).
                self.tree_cache.cache_finished_req(req, int(batch.seq_lens_cpu[i]))
        self.num_generated_tokens += len(batch.reqs)
        self.report_decode_stats(batch)
        self.stream_output(batch.reqs)

    def _mamba_prefix_cache_update(self: Scheduler, req: Req) -> None:
        """extra_buffer: a step that snapshot the request's state (its length a multiple of the
        track interval) makes that track slot the kept one; the next snapshot goes to the other."""
        seq_len = len(req.origin_input_ids) + len(req.output_ids) - 1
        pool = self.req_to_token_pool
        if seq_len % pool.track_interval == 0:
            req.mamba_next_track_idx = pool.get_mamba_ping_pong_other_idx(
                req.mamba_next_track_idx)
            req.mamba_last_track_seqlen = seq_len

    def _release_overlap_slot(self: Scheduler, req: Req, slot: torch.Tensor, pos: int) -> None:
        """A request that finished one step earlier was decoded once more (its slot at `pos`);
        drop that step."""
        req.num_pending_tokens -= 1
        if self.page_size == 1 or pos % self.page_size == 0:
            self.token_to_kv_pool_allocator.free(slot.view(1))

    def _append_token(self: Scheduler, req: Req, result: GenerationBatchResult, i: int) -> None:
        pending = req.num_pending_tokens
        req.num_pending_tokens = pending - 1 if pending > 0 else 0
        if result.sample_output.custom_logit_processor_errors:
            error = result.sample_output.custom_logit_processor_errors.get(i)
            if error is not None:  # the token came from logits the processor never saw
                req.finished_reason = finish_abort(error, status_code=400)
                return
        token = result.next_token_ids_cpu[i]
        req.output_ids.append(token)
        grammar_error = result.sample_output.grammar_errors.get(i)
        if grammar_error is not None:  # the token was sampled without its grammar's mask
            req.finished_reason = internal_error("filling its grammar's mask", grammar_error)
        elif req.grammar is not None and not req.grammar.accept_token(token):
            req.finished_reason = finish_abort(f"The grammar does not accept token {token}.")
        if req.return_logprob:
            req.output_token_logprobs_val.append(result.next_token_logprobs_cpu[i])
            req.output_token_logprobs_idx.append(result.next_token_ids_cpu[i])
            if req.top_logprobs_num > 0:
                k = req.top_logprobs_num
                req.output_top_logprobs_val.append(result.top_logprobs_val_cpu[i][:k])
                req.output_top_logprobs_idx.append(result.top_logprobs_idx_cpu[i][:k])
            if req.token_ids_logprob is not None:
                _add_next_token_ids_logprobs(req, result, i)
        req.check_finished(self.tokenizer, self.context_len)

    def _add_input_logprobs(self: Scheduler, req: Req, batch: ScheduleBatch, i: int,
                            result: GenerationBatchResult, offset: int, ids_offset: int) -> None:
        prefix_len = batch.prefix_lens[i]
        if prefix_len == 0 and req.logprob_start_len == 0:
            req.input_token_logprobs_val.append(None)
            req.input_token_logprobs_idx.append(req.origin_input_ids[0])
            req.input_top_logprobs_val.append(None)
            req.input_top_logprobs_idx.append(None)
            if req.token_ids_logprob is not None:
                req.input_token_ids_logprobs_val.append(None)
                req.input_token_ids_logprobs_idx.append(None)
        n = batch.extend_logprob_pruned_lens[i]
        if req.token_ids_logprob is not None and n:
            ids = list(req.token_ids_logprob)
            flat = result.input_token_ids_logprobs_cpu[ids_offset:ids_offset + n * len(ids)]
            for p in range(n):
                req.input_token_ids_logprobs_val.append(flat[p * len(ids):(p + 1) * len(ids)])
                req.input_token_ids_logprobs_idx.append(ids)
        lo = prefix_len + batch.extend_logprob_start_lens[i]
        req.input_token_logprobs_val.extend(result.input_token_logprobs_cpu[offset:offset + n]
                                            if n else [])
        req.input_token_logprobs_idx.extend(req.origin_input_ids[lo + 1:lo + 1 + n])
        if req.top_logprobs_num > 0 and n:
            k = req.top_logprobs_num
            req.input_top_logprobs_val.extend(
                row[:k] for row in result.input_top_logprobs_val_cpu[offset:offset + n])
            req.input_top_logprobs_idx.extend(
                row[:k] for row in result.input_top_logprobs_idx_cpu[offset:offset + n])
        if prefix_len + batch.extend_lens[i] >= len(req.origin_input_ids):
            req.input_logprobs_done = True



    def stream_output(self: Scheduler, reqs: list[Req]) -> None:
        """Queue a BatchTokenIDOutput with what each request has new since its last message:
        one pass over the requests, column by column; where that fails, request by request,
        so only the request whose output cannot be built is aborted."""
        interval = self.server_args.stream_interval
        chosen = [r for r in reqs if r.finished_reason is not None or (
            r.stream and len(r.output_ids) > r.send_token_offset
            and (len(r.output_ids) % interval == 0 or len(r.output_ids) == 1))]
        if not chosen:
            return
        try:
            out, sent = self._token_output(chosen)
        except Exception:  # noqa: BLE001 - one request's output is the cause: find it
            out = self._token_output_one_by_one(chosen)
        else:
            _mark_sent(chosen, sent)
        if out.rids:
            self.outputs.append(out)

    def _token_output(self: Scheduler,
                      reqs: list[Req]) -> tuple[BatchTokenIDOutput, list[_Sent]]:
        """The message for `reqs` and, for `_mark_sent`, the list lengths it sends up to; the
        requests are left as they were."""
        ends = [len(r.output_ids) for r in reqs]
        params = [r.sampling_params for r in reqs]
        out = BatchTokenIDOutput(
            rids=[r.rid for r in reqs],
            finished_reasons=[r.finished_reason for r in reqs],
            output_ids=[r.output_ids[r.send_token_offset:n] for r, n in zip(reqs, ends)],
            prompt_tokens=[len(r.origin_input_ids) for r in reqs],
            completion_tokens=ends,
            cached_tokens=[r.cached_tokens for r in reqs],
            skip_special_tokens=[p.skip_special_tokens for p in params],
            spaces_between_special_tokens=[p.spaces_between_special_tokens for p in params],
            no_stop_trim=[p.no_stop_trim for p in params],
            stop_strs=[p.stop_strs for p in params],
            total_retractions=[r.total_retractions for r in reqs])
        logprob_ends = [_logprob_lens(r) if r.return_logprob else None for r in reqs]
        any_logprob = any(logprob_ends)
        for k, name in enumerate(LOGPROB_FIELDS):
            setattr(out, name, [getattr(r, name)[r.send_offsets.get(name, 0):lens[k]]
                                if lens is not None else None
                                for r, lens in zip(reqs, logprob_ends)]
                    if any_logprob else [None] * len(reqs))
        return out, list(zip(ends, logprob_ends))

    def _token_output_one_by_one(self: Scheduler, reqs: list[Req]) -> BatchTokenIDOutput:
        out = _empty_token_output()
        for req in reqs:
            try:
                row, sent = self._token_output([req])
            except Exception as e:  # noqa: BLE001 - aborts this request only
                if not req.finished():  # it finishes, and is freed, at its next token
                    self._fail_in_place(req, e, "building its output", mid_step=True)
                    continue
                logger.error("Output of request %s failed", req.rid, exc_info=e)
                row = _failed_output_row(req, internal_error("building its output", e))
            else:
                _mark_sent([req], sent)
            for f in dataclasses.fields(out):
                getattr(out, f.name).extend(getattr(row, f.name))
        return out

    def flush_outputs(self: Scheduler) -> None:
        if self.send_to_detokenizer is not None:
            for out in self.outputs:
                self.send_to_detokenizer.send_pyobj(out)
            self.outputs = []
        elif self.discard_outputs:  # a TP rank other than 0: rank 0 sends the same outputs
            self.outputs = []


def _token_ids_offsets(batch: ScheduleBatch) -> list[int] | None:
    """Where each request's token_ids_logprob values start in a step's flat list (one extra
    entry: the total); None when no request of the batch asks for any."""
    ids = batch.request_facts().token_ids_logprobs
    if ids is None:
        return None
    offsets = [0]
    for x in ids:
        offsets.append(offsets[-1] + len(x or ()))
    return offsets


def _add_next_token_ids_logprobs(req: Req, result: GenerationBatchResult, i: int) -> None:
    ids, start = req.token_ids_logprob, result.token_ids_offsets[i]
    flat = result.token_ids_logprobs_cpu
    req.output_token_ids_logprobs_val.append(flat[start:start + len(ids)])
    req.output_token_ids_logprobs_idx.append(list(ids))


def internal_error(what: str, error: Exception) -> dict:
    return finish_abort(f"Internal error while {what}: {type(error).__name__}: {error}",
                        status_code=500)


def _logprob_lens(req: Req) -> tuple[int, ...]:
    return tuple(len(getattr(req, name)) for name in LOGPROB_FIELDS)


def _mark_sent(reqs: list[Req], sent: list[_Sent]) -> None:
    for req, (num_ids, logprob_lens) in zip(reqs, sent):
        req.send_token_offset = num_ids
        if logprob_lens is not None:
            req.send_offsets.update(zip(LOGPROB_FIELDS, logprob_lens))


def _empty_token_output() -> BatchTokenIDOutput:
    return BatchTokenIDOutput(**{f.name: [] for f in dataclasses.fields(BatchTokenIDOutput)})


def _failed_output_row(req: Req, finished_reason: dict) -> BatchTokenIDOutput:
    """The entry of a finished request whose output could not be built: its abort only."""
    return BatchTokenIDOutput(
        rids=[req.rid], finished_reasons=[finished_reason], output_ids=[[]],
        prompt_tokens=[len(req.origin_input_ids)], completion_tokens=[len(req.output_ids)],
        cached_tokens=[req.cached_tokens], skip_special_tokens=[True],
        spaces_between_special_tokens=[True], no_stop_trim=[False], stop_strs=[[]],
        total_retractions=[req.total_retractions],
        **{name: [None] for name in LOGPROB_FIELDS})
