"""TpModelWorker: turns a ModelWorkerBatch into a forward and a sample on the device."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from sglab.srt.configs.model_config import ModelConfig
from sglab.srt.layers.logits_processor import LogitsProcessorOutput
from sglab.srt.layers.sampler import SampleOutput
from sglab.srt.managers.schedule_batch import ModelWorkerBatch
from sglab.srt.model_executor.forward_batch_info import ForwardBatch
from sglab.srt.model_executor.model_runner import ModelRunner
from sglab.srt.server_args import ServerArgs


@dataclass
class GenerationBatchResult:
    """Device results of one step and, after `copy_to_cpu`, their host copies."""

    logits_output: LogitsProcessorOutput
    sample_output: SampleOutput
    next_token_ids_cpu: list[int] | None = None
    next_token_logprobs_cpu: list[float] | None = None
    top_logprobs_val_cpu: list | None = None
    top_logprobs_idx_cpu: list | None = None
    input_token_logprobs_cpu: list[float] | None = None
    input_top_logprobs_val_cpu: list | None = None
    input_top_logprobs_idx_cpu: list | None = None

    def copy_to_cpu(self) -> None:
        """The one device→host read of a step."""
        s, lo = self.sample_output, self.logits_output
        self.next_token_ids_cpu = s.next_token_ids.tolist()
        self.next_token_logprobs_cpu = _tolist(s.next_token_logprobs)
        self.top_logprobs_val_cpu = _tolist(s.top_logprobs_val)
        self.top_logprobs_idx_cpu = _tolist(s.top_logprobs_idx)
        self.input_token_logprobs_cpu = _tolist(lo.input_token_logprobs)
        self.input_top_logprobs_val_cpu = _tolist(lo.input_top_logprobs_val)
        self.input_top_logprobs_idx_cpu = _tolist(lo.input_top_logprobs_idx)


def _tolist(t: torch.Tensor | None):
    return None if t is None else t.cpu().tolist()


class TpModelWorker:
    def __init__(self, server_args: ServerArgs):
        self.model_config = ModelConfig(server_args.model_path, server_args.dtype,
                                        server_args.context_length, server_args.device,
                                        server_args.trust_remote_code)
        self.model_runner = ModelRunner(self.model_config, server_args)

    def forward_batch_generation(self, batch: ModelWorkerBatch) -> GenerationBatchResult:
        forward_batch = ForwardBatch.init_new(batch, self.model_runner)
        logits_output = self.model_runner.forward(forward_batch)
        sample_output = self.model_runner.sample(logits_output, forward_batch)
        return GenerationBatchResult(logits_output, sample_output)
