"""Prefill CUDA graphs (sglab's `--enable-prefill-cuda-graph`): one graph per token-count
bucket for small extend batches, replayed with padding; larger batches run eagerly.

Upstream's nearest is its piecewise CUDA graphs (`--enable-piecewise-cuda-graph`): they graph
the layers between the attention calls, which run eagerly, so any batch shape fits a token
bucket. sglab's graph holds the whole forward, attention included: the batch is padded to the
bucket's tokens and to a fixed number of request rows. The padding tokens form one extra
request (at `ReqToTokenPool`'s padding row, KV slot 0, no prefix), the other padding rows have
no tokens, so no live request's state is touched.

A step through a graph: the host uploads the batch's tokens and per-request lengths into the
static buffers (and applies the row writes the batch queued), the attention backend prepares
its extend metadata views (`prepare_replay`), and one replay runs the prologue (positions, the
`req_to_token` write, the attention metadata in `graph_prologue`), the model, the sampler and
the future-map store. Batches that want prompt logprobs, MIXED batches and batches with more
requests than the graph's rows run eagerly.

Under DP attention (patch 0003c) every rank must replay the same bucket, with MAX_LEN padding:
a graph runs only when every rank runs a pure EXTEND that fits (`all_extend_in_batch`), at the
bucket of the largest rank's tokens.
"""

from __future__ import annotations

import bisect
from typing import TYPE_CHECKING, Any, Callable

import torch

from sglab.srt.layers.dp_attention import DpPaddingMode, DpStepInfo
from sglab.srt.mem_cache.memory_pool import PADDING_ROW
from sglab.srt.model_executor.cuda_graph_runner import (
    _INPUTS,
    GREEDY,
    CudaGraphRunner,
    _static_sampling_info,
    sampling_after_replay,
)
from sglab.srt.model_executor.forward_batch_info import (
    ForwardBatch,
    ForwardMode,
    compute_position,
)
from sglab.srt.utils.h2d import h2d, h2d_into

if TYPE_CHECKING:
    from sglab.srt.managers.schedule_batch import ModelWorkerBatch, ScheduleBatch
    from sglab.srt.model_executor.model_runner import ModelRunner

# Request rows of every prefill graph (the last one at least is free for the padding tokens).
PREFILL_GRAPH_MAX_REQS = 8
_TOKEN_INPUTS = (("input_ids", torch.int64, 0), ("out_cache_loc", torch.int64, 0))
_ROW_INPUTS = (("req_pool_indices", torch.int64, PADDING_ROW), ("seq_lens", torch.int64, 0),
               ("extend_seq_lens", torch.int32, 0), ("extend_prefix_lens", torch.int32, 0),
               *_INPUTS[3:])


def get_prefill_capture_tokens(max_tokens: int) -> list[int]:
    """Token buckets: powers of two from 16, and `max_tokens` itself."""
    sizes, n = [], 16
    while n < max_tokens:
        sizes.append(n)
        n *= 2
    return sorted(set(sizes + [max_tokens]))


def wants_input_logprobs(batch: "ScheduleBatch | ModelWorkerBatch") -> bool:
    return bool(batch.return_logprob and sum(batch.extend_logprob_pruned_lens or []) > 0)


class PrefillGraphInputs:
    """Static per-token and per-row inputs of the prefill graphs, and their padded upload."""

    def __init__(self, max_tokens: int, num_rows: int, device: torch.device, pin: bool):
        self.num_rows, self.pin = num_rows, pin
        self.views = {name: torch.zeros(max_tokens, dtype=dtype, device=device)
                      for name, dtype, _ in _TOKEN_INPUTS}
        self.views.update({name: torch.zeros(num_rows, dtype=dtype, device=device)
                           for name, dtype, _ in _ROW_INPUTS})

    def fill_padding(self) -> None:
        for name, _, pad in _TOKEN_INPUTS + _ROW_INPUTS:
            self.views[name].fill_(pad)

    def upload(self, batch: "ModelWorkerBatch", num_tokens: int) -> None:
        n, bs = int(batch.extend_num_tokens), len(batch.seq_lens_cpu)
        pad_tokens = num_tokens - n
        # The padding request: the padding tokens at the padding row, from position 0.
        rows = {"req_pool_indices": list(batch.req_pool_indices.tolist()) + [PADDING_ROW],
                "seq_lens": list(batch.seq_lens_cpu.tolist()) + [pad_tokens],
                "extend_seq_lens": list(batch.extend_seq_lens) + [pad_tokens],
                "extend_prefix_lens": list(batch.extend_prefix_lens) + [0]}
        for name, (t, _) in batch.sampling_info.host_tensors().items():
            rows[name] = t.view(-1).tolist() + [_pad_value(name)]
        items = {"input_ids": batch.input_ids.tolist() + [0] * pad_tokens,
                 "out_cache_loc": batch.out_cache_loc.tolist() + [0] * pad_tokens}
        for name, values in rows.items():
            items[name] = values + [_pad_value(name)] * (self.num_rows - bs - 1)
        for name, values in items.items():
            view = self.views[name]
            h2d_into(view[:len(values)], torch.tensor(values, dtype=view.dtype), self.pin)


_PAD_VALUES = {name: pad for name, _, pad in _TOKEN_INPUTS + _ROW_INPUTS}


def _pad_value(name: str) -> float:
    return _PAD_VALUES[name]


class PrefillCudaGraphRunner(CudaGraphRunner):
    name = "prefill"

    def __init__(self, model_runner: "ModelRunner",
                 graph_factory: Callable[[], Any] | None = None):
        self.model_runner = model_runner
        args = model_runner.server_args
        max_tokens = min(args.prefill_cuda_graph_max_tokens, model_runner.model_config.context_len)
        self.capture_bs = get_prefill_capture_tokens(max_tokens)  # token buckets
        self.max_bs = self.capture_bs[-1]
        self.max_reqs = min(PREFILL_GRAPH_MAX_REQS, model_runner.max_running_requests)
        self.num_rows = self.max_reqs + 1
        self.graph_factory = graph_factory or torch.cuda.CUDAGraph
        self.inputs = PrefillGraphInputs(self.max_bs, self.num_rows, model_runner.device,
                                         model_runner.h2d_mode != "pageable")
        self.participants = [model_runner.attn_backend]
        model_runner.attn_backend.init_cuda_graph_state(self.num_rows, ForwardMode.EXTEND)
        self.graphs: dict[tuple, Any] = {}
        self.outputs: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}
        self.pool = None
        self.num_replays = 0
        self.starting = True
        for num_tokens in reversed(self.capture_bs):
            self._capture(num_tokens, GREEDY)
        self.starting = False

    # --- capture ------------------------------------------------------------------------------

    def _static_batch(self, num_tokens: int, kind: tuple) -> ForwardBatch:
        mr, v, rows = self.model_runner, self.inputs.views, self.num_rows
        fb = ForwardBatch(
            forward_mode=ForwardMode.EXTEND, batch_size=rows,
            input_ids=v["input_ids"][:num_tokens], req_pool_indices=v["req_pool_indices"],
            seq_lens=v["seq_lens"], out_cache_loc=v["out_cache_loc"][:num_tokens],
            positions=None,  # type: ignore[arg-type]
            seq_lens_sum=num_tokens, seq_lens_cpu=torch.zeros(rows, dtype=torch.int64),
            extend_num_tokens=num_tokens, extend_seq_lens=v["extend_seq_lens"],
            extend_prefix_lens=v["extend_prefix_lens"], req_to_token_pool=mr.req_to_token_pool,
            token_to_kv_pool=mr.token_to_kv_pool, attn_backend=mr.attn_backend,
            dp_step=self._dp_step(num_tokens))
        fb.sampling_info = _static_sampling_info(v, rows, kind)
        return fb

    def _dp_step(self, num_tokens: int) -> DpStepInfo | None:
        info = self.model_runner.dp_info
        if not info.enabled:
            return None
        return DpStepInfo([num_tokens] * info.dp_size, DpPaddingMode.MAX_LEN)

    def _prepare_capture(self, num_tokens: int) -> None:
        """At start-up the padding request holds every token (the lengths must add up to the
        bucket); a capture while serving runs on the batch just uploaded."""
        if self.starting:
            self.inputs.fill_padding()
            for name in ("seq_lens", "extend_seq_lens"):
                self.inputs.views[name][0] = num_tokens
        self.model_runner.attn_backend.prepare_capture(self.num_rows, ForwardMode.EXTEND,
                                                       num_tokens)

    def _step(self, fb: ForwardBatch, num_tokens: int,
              kind: tuple) -> tuple[torch.Tensor, torch.Tensor]:
        """One extend step from the static inputs: what a graph replays."""
        mr = self.model_runner
        fb.positions, fb.extend_start_loc = compute_position(
            fb.extend_prefix_lens, fb.extend_seq_lens, num_tokens)
        rows = torch.repeat_interleave(fb.req_pool_indices, fb.extend_seq_lens,
                                       output_size=num_tokens)
        mr.req_to_token_pool.req_to_token[rows, fb.positions] = fb.out_cache_loc.to(torch.int32)
        for p in self.participants:
            p.graph_prologue(fb, self.num_rows)
        logits = mr.model.forward(fb.input_ids, fb.positions, fb).next_token_logits
        next_ids = mr.sampler(logits, fb.sampling_info, fb.seq_lens).next_token_ids
        mr.future_map.store(fb.req_pool_indices, next_ids)
        return logits, next_ids

    # --- replay -------------------------------------------------------------------------------

    def fits_locally(self, batch: "ScheduleBatch") -> bool:
        return batch.forward_mode == ForwardMode.EXTEND and \
            batch.batch_size() <= self.max_reqs and \
            batch.extend_num_tokens <= self.max_bs and not wants_input_logprobs(batch)

    def can_run(self, batch: "ModelWorkerBatch") -> bool:
        if batch.global_num_tokens is not None:  # patch 0003c: every rank extends and fits
            return batch.all_extend_in_batch and batch.can_run_dp_cuda_graph and \
                max(batch.global_num_tokens) <= self.max_bs
        return batch.forward_mode == ForwardMode.EXTEND and \
            len(batch.seq_lens_cpu) <= self.max_reqs and \
            batch.extend_num_tokens <= self.max_bs and not wants_input_logprobs(batch)

    def _graph_bs(self, batch: "ModelWorkerBatch") -> int:
        """The token bucket to replay: the batch's, or under DP attention the largest
        rank's."""
        num_tokens = int(batch.extend_num_tokens)
        if batch.global_num_tokens is not None:
            num_tokens = max(batch.global_num_tokens)
        return self.capture_bs[bisect.bisect_left(self.capture_bs, num_tokens)]

    def _apply_row_writes(self, batch: "ModelWorkerBatch") -> None:
        """The rows the batch queued (its prefixes' slots), before the replay reads them."""
        if batch.req_to_token_writes is not None:
            index, values = batch.req_to_token_writes
            device = self.model_runner.device
            self.model_runner.req_to_token_pool.req_to_token.view(-1).index_copy_(
                0, h2d(index, torch.int64, device, pin=self.inputs.pin),
                h2d(values, torch.int32, device, pin=self.inputs.pin))

    def _replay_batch(self, batch: "ModelWorkerBatch", num_tokens: int) -> ForwardBatch:
        v = self.inputs.views
        return ForwardBatch(
            forward_mode=ForwardMode.EXTEND, batch_size=self.num_rows, input_ids=None,
            req_pool_indices=v["req_pool_indices"], seq_lens=v["seq_lens"],
            out_cache_loc=v["out_cache_loc"][:num_tokens],
            positions=None,  # type: ignore[arg-type]
            seq_lens_sum=batch.seq_lens_sum, seq_lens_cpu=batch.seq_lens_cpu,
            extend_num_tokens=num_tokens, dp_step=self._dp_step(num_tokens))

    def _eager_sampling_batch(self, batch: "ModelWorkerBatch", raw_bs: int) -> ForwardBatch:
        v = self.inputs.views
        fb = ForwardBatch(
            forward_mode=ForwardMode.EXTEND, batch_size=raw_bs, input_ids=None,
            req_pool_indices=v["req_pool_indices"][:raw_bs], seq_lens=v["seq_lens"][:raw_bs],
            out_cache_loc=None, positions=None,  # type: ignore[arg-type]
            seq_lens_sum=batch.seq_lens_sum, seq_lens_cpu=batch.seq_lens_cpu,
            return_logprob=batch.return_logprob, top_logprobs_nums=batch.top_logprobs_nums,
            token_ids_logprobs=batch.token_ids_logprobs)
        fb.sampling_info = sampling_after_replay(v, batch, raw_bs)
        return fb
