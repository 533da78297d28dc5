"""presence_penalty: the logit of a token drops by the penalty once it occurs in the output."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from sglab.srt.sampling.penaltylib.orchestrator import _BatchedPenalizer, per_row, token_counts

if TYPE_CHECKING:
    from sglab.srt.managers.schedule_batch import Req


class BatchedPresencePenalizer(_BatchedPenalizer):
    @staticmethod
    def is_required(req: "Req") -> bool:
        return req.sampling_params.presence_penalty != 0.0

    def __init__(self, reqs: list["Req"], vocab_size: int, device: torch.device | str):
        self.output_seen = token_counts(
            [r.output_ids if self.is_required(r) else [] for r in reqs], vocab_size, device) > 0
        self.presence_penalties = per_row(
            [float(r.sampling_params.presence_penalty) for r in reqs], torch.float32, device)

    def cumulate_output_tokens(self, next_token_ids: torch.Tensor) -> None:
        self.output_seen.scatter_(1, next_token_ids.view(-1, 1), True)

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        return logits - self.output_seen * self.presence_penalties
