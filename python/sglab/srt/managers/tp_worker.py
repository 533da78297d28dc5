"""TpModelWorker: turns a ModelWorkerBatch into a forward and a sample on the device."""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Callable

import torch

from sglab.srt.configs.model_config import ModelConfig
from sglab.srt.layers.logits_processor import LogitsProcessorOutput
from sglab.srt.layers.sampler import SampleOutput
from sglab.srt.managers.overlap_utils import PendingResult, ResultRing
from sglab.srt.managers.schedule_batch import ModelWorkerBatch
from sglab.srt.model_executor.forward_batch_info import ForwardBatch
from sglab.srt.model_executor.model_runner import ModelRunner
from sglab.srt.server_args import ServerArgs
from sglab.srt.utils.h2d import h2d


@dataclass
class GenerationBatchResult:
    """Device results of one step and, after `synchronize`, their host copies."""

    logits_output: LogitsProcessorOutput
    sample_output: SampleOutput
    next_token_ids_cpu: list[int] | None = None
    next_token_logprobs_cpu: list[float] | None = None
    top_logprobs_val_cpu: list | None = None
    top_logprobs_idx_cpu: list | None = None
    input_token_logprobs_cpu: list[float] | None = None
    input_top_logprobs_val_cpu: list | None = None
    input_top_logprobs_idx_cpu: list | None = None
    token_ids_logprobs_cpu: list[float] | None = None
    input_token_ids_logprobs_cpu: list[float] | None = None
    # Set on the host while processing: where each row's token_ids_logprobs values start.
    token_ids_offsets: list[int] | None = None
    pending: PendingResult | None = None
    # Set while the step's sample waits (overlap, grammars): it samples, stores the tokens in
    # the future map and starts the copy. It must run before the next forward is launched.
    delay_sample_func: Callable[[], None] | None = None

    def launch_delayed_sample(self) -> None:
        """Sample now if the sample was delayed (the grammars have accepted the last tokens)."""
        if self.delay_sample_func is not None:
            func, self.delay_sample_func = self.delay_sample_func, None
            func()

    def copy_to_cpu(self, ring: ResultRing) -> None:
        """Start the one device->host copy of the step (non-blocking on an accelerator)."""
        s, lo = self.sample_output, self.logits_output
        self.pending = ring.copy({
            "next_token_ids_cpu": s.next_token_ids,
            "next_token_logprobs_cpu": s.next_token_logprobs,
            "top_logprobs_val_cpu": s.top_logprobs_val,
            "top_logprobs_idx_cpu": s.top_logprobs_idx,
            "input_token_logprobs_cpu": lo.input_token_logprobs,
            "input_top_logprobs_val_cpu": lo.input_top_logprobs_val,
            "input_top_logprobs_idx_cpu": lo.input_top_logprobs_idx,
            "token_ids_logprobs_cpu": s.token_ids_logprobs_val,
            "input_token_ids_logprobs_cpu": lo.input_token_ids_logprobs_val,
        })

    def synchronize(self) -> None:
        """Wait for the copy and expose the host values as lists."""
        self.launch_delayed_sample()
        for name, value in self.pending.read().items():
            setattr(self, name, value)


class TpModelWorker:
    def __init__(self, server_args: ServerArgs, tp_rank: int = 0,
                 dist_init_method: str | None = None):
        self.tp_rank = tp_rank
        self.model_config = ModelConfig(server_args.model_path, server_args.dtype,
                                        server_args.context_length, server_args.device,
                                        server_args.trust_remote_code)
        self.model_runner = ModelRunner(self.model_config, server_args, tp_rank,
                                        dist_init_method)
        runner = self.model_runner
        self.streams = runner.streams
        self.future_map = runner.future_map
        self.result_ring = ResultRing(self.streams)

    def forward_batch_generation(self, batch: ModelWorkerBatch) -> GenerationBatchResult:
        """Forward and sample; with `batch.delay_sample`, a batch that samples after its forward
        (grammars) leaves the sample to `GenerationBatchResult.launch_delayed_sample`."""
        graph = self.model_runner.graph_for(batch)
        if graph is not None:
            logits_output, sample_output = graph.replay(batch)
            sample = functools.partial(graph.sample_after_replay, batch, logits_output)
        else:
            forward_batch = ForwardBatch.init_new(batch, self.model_runner)
            logits_output, sample_output = self._forward_eager(forward_batch), None
            sample = functools.partial(self._sample_eager, forward_batch, logits_output)
        result = GenerationBatchResult(logits_output, sample_output)
        if sample_output is not None:
            result.copy_to_cpu(self.result_ring)
        elif batch.delay_sample and batch.sampling_info.grammars is not None:
            result.delay_sample_func = functools.partial(self._sample_into, result, sample)
        else:
            self._sample_into(result, sample)
        return result

    def _sample_into(self, result: GenerationBatchResult,
                     sample: Callable[[], SampleOutput]) -> None:
        result.sample_output = sample()
        result.copy_to_cpu(self.result_ring)

    def _forward_eager(self, forward_batch: ForwardBatch) -> LogitsProcessorOutput:
        if forward_batch.forward_mode.is_decode():
            forward_batch.input_ids = self.future_map.gather(forward_batch.req_pool_indices)
        return self.model_runner.forward(forward_batch)

    def _sample_eager(self, forward_batch: ForwardBatch,
                      logits_output: LogitsProcessorOutput) -> SampleOutput:
        sample_output = self.model_runner.sample(logits_output, forward_batch)
        if not forward_batch.forward_mode.is_idle():
            self.future_map.store(forward_batch.req_pool_indices, sample_output.next_token_ids)
        return sample_output

    def restore_future_tokens(self, rows: list[int], tokens: list[int]) -> None:
        """After a failed step (which may have sampled and stored before it failed): each row's
        next input is again the last token the host kept."""
        if rows:
            device = self.model_runner.device
            self.future_map.store(h2d(rows, torch.int64, device, pin=True),
                                  h2d(tokens, torch.int64, device, pin=True))
