"""logit_bias: a fixed amount added to the logit of each listed token id, every step (OpenAI's
`logit_bias`, upstream's `SamplingParams.logit_bias`: {"<token id>": bias}). It applies after
the penalties, as upstream's `apply_logits_bias`; -100 in effect forbids a token and +100
forces it."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from sglab.srt.sampling.penaltylib.orchestrator import _BatchedPenalizer
from sglab.srt.utils.h2d import h2d

if TYPE_CHECKING:
    from sglab.srt.managers.schedule_batch import Req


class BatchedLogitBiasPenalizer(_BatchedPenalizer):
    @staticmethod
    def is_required(req: "Req") -> bool:
        return bool(req.sampling_params.logit_bias)

    def __init__(self, reqs: list["Req"], vocab_size: int, device: torch.device | str):
        rows, cols, biases = [], [], []
        for i, r in enumerate(reqs):
            for token, bias in (r.sampling_params.logit_bias or {}).items():
                rows.append(i)
                cols.append(int(token))
                biases.append(float(bias))
        self.logit_bias = torch.zeros((len(reqs), vocab_size), dtype=torch.float32,
                                      device=device)
        if rows:
            index = h2d([rows, cols], torch.int64, device, pin=True)
            values = h2d(biases, torch.float32, device, pin=True)
            self.logit_bias.index_put_((index[0], index[1]), values)

    def cumulate_output_tokens(self, next_token_ids: torch.Tensor) -> None:
        pass

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        return logits + self.logit_bias
