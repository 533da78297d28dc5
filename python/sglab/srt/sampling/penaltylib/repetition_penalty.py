"""repetition_penalty: the logit of a token seen in the prompt or the output is divided by the
penalty when positive and multiplied by it when negative (HF transformers' and vLLM's rule)."""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar

import torch

from sglab.srt.sampling.penaltylib.orchestrator import _BatchedPenalizer, per_row, token_counts

if TYPE_CHECKING:
    from sglab.srt.managers.schedule_batch import Req


class BatchedRepetitionPenalizer(_BatchedPenalizer):
    is_multiplicative: ClassVar[bool] = True

    @staticmethod
    def is_required(req: "Req") -> bool:
        return req.sampling_params.repetition_penalty != 1.0

    def __init__(self, reqs: list["Req"], vocab_size: int, device: torch.device | str):
        tokens = [r.origin_input_ids + r.output_ids if self.is_required(r) else [] for r in reqs]
        self.seen = token_counts(tokens, vocab_size, device) > 0
        self.repetition_penalties = per_row(
            [float(r.sampling_params.repetition_penalty) for r in reqs], torch.float32, device)

    def cumulate_output_tokens(self, next_token_ids: torch.Tensor) -> None:
        self.seen.scatter_(1, next_token_ids.view(-1, 1), True)

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        rep = self.repetition_penalties
        scaled = torch.where(logits < 0, logits * rep, logits / rep)
        return torch.where(self.seen, scaled, logits)
