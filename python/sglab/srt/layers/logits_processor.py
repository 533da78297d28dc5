"""Logits for sampling (last token of each request) and, when asked, prompt-token logprobs."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import nn

if TYPE_CHECKING:
    from sglab.srt.model_executor.forward_batch_info import ForwardBatch


@dataclass
class LogitsProcessorOutput:
    next_token_logits: torch.Tensor  # [bs, vocab] fp32
    # Prompt logprobs, flattened over the logprob positions of every request in the batch.
    input_token_logprobs: torch.Tensor | None = None  # [num_logprob_tokens]
    input_top_logprobs_val: torch.Tensor | None = None  # [num_logprob_tokens, max_k]
    input_top_logprobs_idx: torch.Tensor | None = None


class LogitsProcessor(nn.Module):
    def __init__(self, vocab_size: int, logit_scale: float | None = None):
        super().__init__()
        self.vocab_size = vocab_size
        self.logit_scale = logit_scale

    def forward(self, input_ids: torch.Tensor, hidden_states: torch.Tensor, lm_head: nn.Module,
                forward_batch: "ForwardBatch") -> LogitsProcessorOutput:
        fb = forward_batch
        if fb.forward_mode.is_decode():
            return LogitsProcessorOutput(self._get_logits(hidden_states, lm_head))
        last_index = fb.extend_start_loc + fb.extend_seq_lens.to(torch.int64) - 1
        out = LogitsProcessorOutput(self._get_logits(hidden_states[last_index], lm_head))
        pruned_lens = fb.extend_logprob_pruned_lens_cpu
        if fb.return_logprob and pruned_lens is not None and sum(pruned_lens) > 0:
            self._input_logprobs(out, hidden_states, lm_head, fb, pruned_lens)
        return out

    def _get_logits(self, hidden_states: torch.Tensor, lm_head: nn.Module) -> torch.Tensor:
        # The head may be the (tied) input embedding: project through its weight directly.
        logits = torch.nn.functional.linear(hidden_states, lm_head.weight).float()
        if self.logit_scale is not None:
            logits.mul_(self.logit_scale)
        return logits[:, : self.vocab_size]

    def _input_logprobs(self, out: LogitsProcessorOutput, hidden_states: torch.Tensor,
                        lm_head: nn.Module, fb: "ForwardBatch", pruned_lens: list[int]) -> None:
        device = hidden_states.device
        indices = []
        for start_loc, offset, n in zip(_prefix_sums(fb.extend_seq_lens_cpu),
                                        fb.extend_logprob_start_lens_cpu, pruned_lens):
            indices.extend(range(start_loc + offset, start_loc + offset + n))
        input_logprob_indices = torch.tensor(indices, dtype=torch.int64, device=device)
        logits = self._get_logits(hidden_states[input_logprob_indices], lm_head)
        temps = fb.sampling_info.temperatures
        pruned = torch.tensor(pruned_lens, device=device)
        logits = logits / torch.repeat_interleave(temps.view(-1), pruned).unsqueeze(1)
        logprobs = torch.log_softmax(logits, dim=-1)
        targets = fb.extend_input_logprob_token_ids_gpu
        out.input_token_logprobs = logprobs.gather(1, targets.unsqueeze(1)).squeeze(1)
        max_k = max(fb.top_logprobs_nums or [0])
        if max_k > 0:
            val, idx = logprobs.topk(max_k, dim=-1)
            out.input_top_logprobs_val, out.input_top_logprobs_idx = val, idx


def _prefix_sums(lens: list[int]) -> list[int]:
    out, total = [], 0
    for n in lens:
        out.append(total)
        total += n
    return out
