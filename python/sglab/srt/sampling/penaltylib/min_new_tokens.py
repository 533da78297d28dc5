"""min_new_tokens: the tokens that would stop a request get logit -inf until it has that many
output tokens. Those are its stop_token_ids and, unless ignore_eos, the EOS ids (as vLLM; an
ignored EOS does not stop, so it is not masked)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from sglab.srt.sampling.penaltylib.orchestrator import _BatchedPenalizer, per_row, token_counts

if TYPE_CHECKING:
    from sglab.srt.managers.schedule_batch import Req

_INT32_MAX = (1 << 31) - 1


def stop_token_ids(req: "Req", vocab_size: int) -> list[int]:
    params = req.sampling_params
    ids = set(params.stop_token_ids or ())
    if not params.ignore_eos:
        ids |= req.eos_token_ids
    return sorted(t for t in ids if 0 <= t < vocab_size)


class BatchedMinNewTokensPenalizer(_BatchedPenalizer):
    @staticmethod
    def is_required(req: "Req") -> bool:
        return req.sampling_params.min_new_tokens > 0

    def __init__(self, reqs: list["Req"], vocab_size: int, device: torch.device | str):
        stops = [stop_token_ids(r, vocab_size) if self.is_required(r) else [] for r in reqs]
        self.stop_tokens = token_counts(stops, vocab_size, device) > 0
        self.min_new_tokens = per_row(
            [min(r.sampling_params.min_new_tokens, _INT32_MAX) for r in reqs], torch.int32, device)
        self.num_output_tokens = per_row([len(r.output_ids) for r in reqs], torch.int32, device)

    def cumulate_output_tokens(self, next_token_ids: torch.Tensor) -> None:
        self.num_output_tokens += 1

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        masked = self.stop_tokens & (self.num_output_tokens < self.min_new_tokens)
        return logits.masked_fill(masked, float("-inf"))
