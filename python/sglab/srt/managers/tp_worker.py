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

    copy_done: torch.cuda.Event | None = None
    _host: dict | None = None

    def copy_to_cpu(self) -> None:
        """Start the one device→host copy of a step (non-blocking on an accelerator)."""
        s, lo = self.sample_output, self.logits_output
        tensors = {
            "next_token_ids_cpu": s.next_token_ids,
            "next_token_logprobs_cpu": s.next_token_logprobs,
            "top_logprobs_val_cpu": s.top_logprobs_val,
            "top_logprobs_idx_cpu": s.top_logprobs_idx,
            "input_token_logprobs_cpu": lo.input_token_logprobs,
            "input_top_logprobs_val_cpu": lo.input_top_logprobs_val,
            "input_top_logprobs_idx_cpu": lo.input_top_logprobs_idx,
        }
        on_device = s.next_token_ids.is_cuda
        self._host = {k: _to_host(v, on_device) for k, v in tensors.items()}
        if on_device:
            self.copy_done = torch.cuda.Event()
            self.copy_done.record()

    def synchronize(self) -> None:
        """Wait for the copy and expose the host values as lists."""
        if self.copy_done is not None:
            self.copy_done.synchronize()
        for name, value in self._host.items():
            setattr(self, name, None if value is None else value.tolist())


def _to_host(t: torch.Tensor | None, on_device: bool) -> torch.Tensor | None:
    if t is None or not on_device:
        return t
    out = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
    return out.copy_(t, non_blocking=True)


class FutureMap:
    """Device ring of sampled token ids that the next batch reads before the host sees them."""

    def __init__(self, size: int, device: torch.device):
        self.size = size
        self.token_ids = torch.zeros(size, dtype=torch.int64, device=device)
        self.ct = 0

    def store(self, next_token_ids: torch.Tensor) -> int:
        """Write a batch's tokens; returns the ring index of its first one."""
        n = next_token_ids.numel()
        if self.ct + n > self.size:
            self.ct = 0
        start = self.ct
        self.token_ids[start:start + n] = next_token_ids
        self.ct += n
        return start

    def resolve(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Replace future references (-(index + 1)) by the tokens stored there."""
        refs = (-input_ids - 1).clamp(min=0)
        return torch.where(input_ids < 0, self.token_ids[refs], input_ids)


class TpModelWorker:
    def __init__(self, server_args: ServerArgs):
        self.model_config = ModelConfig(server_args.model_path, server_args.dtype,
                                        server_args.context_length, server_args.device,
                                        server_args.trust_remote_code)
        self.model_runner = ModelRunner(self.model_config, server_args)
        # Room for several batches in flight: a slot is rewritten only after the ring wraps.
        runner = self.model_runner
        self.future_map = FutureMap(4 * runner.max_running_requests + 64, runner.device)

    def forward_batch_generation(self, batch: ModelWorkerBatch) -> GenerationBatchResult:
        forward_batch = ForwardBatch.init_new(batch, self.model_runner)
        if batch.has_future_input_ids:
            forward_batch.input_ids = self.future_map.resolve(forward_batch.input_ids)
        logits_output = self.model_runner.forward(forward_batch)
        sample_output = self.model_runner.sample(logits_output, forward_batch)
        return GenerationBatchResult(logits_output, sample_output)
