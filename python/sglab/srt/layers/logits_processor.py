"""Logits for sampling (last token of each request) and, when asked, prompt-token logprobs."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import nn

from sglab.srt.batch_invariant_ops import linear_batch_invariant
from sglab.srt.debug.sync_audit import audit_region
from sglab.srt.layers.sampler import gather_token_ids_logprobs
from sglab.srt.utils.h2d import h2d, list_to_device

if TYPE_CHECKING:
    from sglab.srt.model_executor.forward_batch_info import ForwardBatch


@dataclass
class LogitsProcessorOutput:
    next_token_logits: torch.Tensor  # [bs, vocab] fp32
    # Prompt logprobs, flattened over the logprob positions of every request in the batch.
    input_token_logprobs: torch.Tensor | None = None  # [num_logprob_tokens]
    input_top_logprobs_val: torch.Tensor | None = None  # [num_logprob_tokens, max_k]
    input_top_logprobs_idx: torch.Tensor | None = None
    # token_ids_logprob: per request asking, per logprob position, its ids' logprobs (flat).
    input_token_ids_logprobs_val: torch.Tensor | None = None


class LogitsProcessor(nn.Module):
    def __init__(self, vocab_size: int, logit_scale: float | None = None, *,
                 sync_free_metadata: bool, batch_invariant: bool = False,
                 fp32_gemm_out: bool = False):
        super().__init__()
        self.vocab_size = vocab_size
        self.logit_scale = logit_scale
        self.sync_free_metadata = sync_free_metadata  # patch 0003a
        self.batch_invariant = batch_invariant  # --enable-deterministic-inference
        self.fp32_gemm_out = fp32_gemm_out  # --kernel-fusion on

    def forward(self, input_ids: torch.Tensor, hidden_states: torch.Tensor, lm_head: nn.Module,
                forward_batch: "ForwardBatch") -> LogitsProcessorOutput:
        fb = forward_batch
        if fb.forward_mode.is_decode() or fb.forward_mode.is_idle():
            return LogitsProcessorOutput(self._get_logits(hidden_states, lm_head))
        with audit_region("LogitsProcessor"):
            pruned_lens = fb.extend_logprob_pruned_lens_cpu
            if not (fb.return_logprob and pruned_lens is not None and sum(pruned_lens) > 0):
                last_index = fb.extend_start_loc + fb.extend_seq_lens.to(torch.int64) - 1
                return LogitsProcessorOutput(self._get_logits(hidden_states[last_index],
                                                              lm_head))
            return self._with_input_logprobs(hidden_states, lm_head, fb, pruned_lens)

    def _get_logits(self, hidden_states: torch.Tensor, lm_head: nn.Module) -> torch.Tensor:
        # The head may be the (tied) input embedding: project through its weight directly.
        if self.batch_invariant:
            logits = linear_batch_invariant(hidden_states, lm_head.weight).float()
        elif self.fp32_gemm_out:
            logits = linear_fp32_out(hidden_states, lm_head.weight)
        else:
            logits = torch.nn.functional.linear(hidden_states, lm_head.weight).float()
        # Each TP rank holds a slice of the vocabulary: every rank gets all of it, bit for bit.
        logits = lm_head.group.all_gather(logits, dim=-1)
        if self.logit_scale is not None:
            logits.mul_(self.logit_scale)
        return logits[:, : self.vocab_size]

    def _with_input_logprobs(self, hidden_states: torch.Tensor, lm_head: nn.Module,
                             fb: "ForwardBatch", pruned_lens: list[int]) -> LogitsProcessorOutput:
        """Next-token logits plus the logprobs of the prompt tokens each request asked for."""
        sample_indices, input_logprob_indices = [], []
        for start_loc, offset, n, ext in zip(_prefix_sums(fb.extend_seq_lens_cpu),
                                             fb.extend_logprob_start_lens_cpu, pruned_lens,
                                             fb.extend_seq_lens_cpu):
            sample_indices.append(start_loc + ext - 1)
            input_logprob_indices.extend(range(start_loc + offset, start_loc + offset + n))
        device, num_logprob_tokens = hidden_states.device, len(input_logprob_indices)
        if self.sync_free_metadata:
            # Patch 0003a: pinned + non_blocking uploads; output_size from the host list.
            sample_idx = h2d(sample_indices, torch.int64, device, pin=True)
            logprob_idx = h2d(input_logprob_indices, torch.int64, device, pin=True)
            pruned = h2d(pruned_lens, torch.int64, device, pin=True)
            temps = torch.repeat_interleave(fb.sampling_info.temperatures.view(-1), pruned,
                                            output_size=num_logprob_tokens)
        else:
            # Before sglang#19190: blocking uploads from lists, repeat_interleave that syncs.
            sample_idx = list_to_device(sample_indices, torch.int64, device)
            logprob_idx = list_to_device(input_logprob_indices, torch.int64, device)
            pruned = list_to_device(pruned_lens, torch.int64, device)
            temps = torch.repeat_interleave(fb.sampling_info.temperatures.view(-1), pruned)
        out = LogitsProcessorOutput(self._get_logits(hidden_states[sample_idx], lm_head))
        logits = self._get_logits(hidden_states[logprob_idx], lm_head) / temps.unsqueeze(1)
        logprobs = torch.log_softmax(logits, dim=-1)
        targets = fb.extend_input_logprob_token_ids_gpu
        out.input_token_logprobs = logprobs.gather(1, targets.unsqueeze(1)).squeeze(1)
        max_k = max(fb.top_logprobs_nums or [0])
        if max_k > 0:
            out.input_top_logprobs_val, out.input_top_logprobs_idx = logprobs.topk(max_k, dim=-1)
        if fb.token_ids_logprobs is not None:
            groups = list(zip(_prefix_sums(pruned_lens), pruned_lens, fb.token_ids_logprobs))
            out.input_token_ids_logprobs_val = gather_token_ids_logprobs(logprobs, groups)
        return out


def linear_fp32_out(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x @ weight^T in fp32: on CUDA, a half-precision GEMM that writes fp32 itself (cuBLAS
    accumulates in fp32 either way), so there is no bf16 rounding and no separate cast."""
    if x.is_cuda and x.dtype in (torch.bfloat16, torch.float16) and x.dim() == 2:
        return torch.mm(x, weight.t(), out_dtype=torch.float32)
    return torch.nn.functional.linear(x, weight).float()


def _prefix_sums(lens: list[int]) -> list[int]:
    out, total = [], 0
    for n in lens:
        out.append(total)
        total += n
    return out
