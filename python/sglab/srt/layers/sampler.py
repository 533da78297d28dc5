"""Batched sampling: greedy, temperature, top-k, top-p, min-p; per-request seeds.

Every operation is row-wise, so a request samples the same token whatever else is in its batch.
Non-greedy draws use noise hashed from (seed, position, token id): reproducible for a given
`sampling_seed` and independent of batch composition.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import TYPE_CHECKING

import torch
from torch import nn

from sglab.srt.layers.argmax import greedy_argmax
from sglab.srt.sampling.sampling_params import TOP_K_ALL
from sglab.srt.utils.h2d import h2d

if TYPE_CHECKING:
    from sglab.srt.constrained.grammar_backend import Grammar
    from sglab.srt.sampling.penaltylib import BatchedPenalizerOrchestrator


@dataclass
class SamplingBatchInfo:
    temperatures: torch.Tensor  # [bs, 1] fp32
    top_ps: torch.Tensor  # [bs] fp32
    top_ks: torch.Tensor  # [bs] int64
    min_ps: torch.Tensor  # [bs] fp32
    seeds: torch.Tensor  # [bs] int64
    is_all_greedy: bool
    need_min_p_sampling: bool
    need_top_p_top_k: bool
    # The batch's penalty state (already on the device), or None.
    penalizer_orchestrator: "BatchedPenalizerOrchestrator | None" = None
    # Each row's grammar (None where a request has none), or None: no request has one. The
    # step's vocab mask is built from them just before sampling (`VocabMask.from_grammars`).
    grammars: "list[Grammar | None] | None" = None
    # Per row, (key, CustomLogitProcessor, custom_params) or None; None: no row has one.
    custom_logit_processors: list | None = None

    @classmethod
    def from_params(cls, params: list, seeds: list[int],
                    penalizer_orchestrator: "BatchedPenalizerOrchestrator | None" = None,
                    ) -> "SamplingBatchInfo":
        """Host tensors from each request's (normalized) SamplingParams."""
        top_ks = [min(p.top_k, TOP_K_ALL) for p in params]
        top_ps = [p.top_p for p in params]
        min_ps = [p.min_p for p in params]
        return cls(
            temperatures=torch.tensor([p.temperature for p in params],
                                      dtype=torch.float32).view(-1, 1),
            top_ps=torch.tensor(top_ps, dtype=torch.float32),
            top_ks=torch.tensor(top_ks, dtype=torch.int64),
            min_ps=torch.tensor(min_ps, dtype=torch.float32),
            seeds=torch.tensor(seeds, dtype=torch.int64),
            is_all_greedy=all(k == 1 for k in top_ks),
            need_min_p_sampling=any(m > 0 for m in min_ps),
            need_top_p_top_k=any(k != TOP_K_ALL for k in top_ks) or any(p < 1 for p in top_ps),
            penalizer_orchestrator=penalizer_orchestrator,
        )

    def host_tensors(self) -> dict[str, tuple[torch.Tensor, torch.dtype]]:
        """The per-request tensors to upload, keyed `sampling_<field>`."""
        return {f"sampling_{f.name}": (v, v.dtype) for f in fields(self)
                if isinstance(v := getattr(self, f.name), torch.Tensor)}

    def with_tensors(self, device_tensors: dict[str, torch.Tensor]) -> "SamplingBatchInfo":
        """A copy whose tensors are the uploaded ones from `device_tensors`."""
        kw = {f.name: device_tensors.get(f"sampling_{f.name}", getattr(self, f.name))
              for f in fields(self)}
        return SamplingBatchInfo(**kw)


@dataclass
class SampleOutput:
    next_token_ids: torch.Tensor  # [bs] int64
    next_token_logprobs: torch.Tensor | None = None  # [bs] fp32
    top_logprobs_val: torch.Tensor | None = None  # [bs, max_k]
    top_logprobs_idx: torch.Tensor | None = None
    # token_ids_logprob: each row's requested ids' logprobs, flattened in row order.
    token_ids_logprobs_val: torch.Tensor | None = None
    # Host: the rows whose custom logit processor failed this step, with why.
    custom_logit_processor_errors: dict[int, str] = field(default_factory=dict)
    # Host: the rows whose grammar failed to fill this step's mask, with the error.
    grammar_errors: dict[int, Exception] = field(default_factory=dict)


class Sampler(nn.Module):
    def forward(self, logits: torch.Tensor, info: SamplingBatchInfo, positions: torch.Tensor,
                return_logprob: bool = False, top_logprobs_num: int = 0,
                token_ids_logprobs: list[list[int] | None] | None = None) -> SampleOutput:
        if info.is_all_greedy:
            next_ids = greedy_argmax(logits)
        else:
            probs = torch.softmax(logits / info.temperatures, dim=-1)
            probs = _filter_probs(probs, info)
            next_ids = _seeded_sample(probs, info.seeds, positions)
            greedy = info.top_ks == 1
            next_ids = torch.where(greedy, greedy_argmax(logits), next_ids)
        out = SampleOutput(next_token_ids=next_ids)
        if return_logprob:
            logprobs = torch.log_softmax(logits / info.temperatures, dim=-1)
            out.next_token_logprobs = logprobs.gather(1, next_ids.unsqueeze(1)).squeeze(1)
            if top_logprobs_num > 0:
                out.top_logprobs_val, out.top_logprobs_idx = logprobs.topk(top_logprobs_num, -1)
            if token_ids_logprobs is not None:
                groups = [(i, 1, ids) for i, ids in enumerate(token_ids_logprobs)]
                out.token_ids_logprobs_val = gather_token_ids_logprobs(logprobs, groups)
        return out


def gather_token_ids_logprobs(logprobs: torch.Tensor,
                              groups: list[tuple[int, int, list[int] | None]]) -> torch.Tensor:
    """logprobs[row, id] for each (first row, number of rows, ids) group: for each of its rows,
    each of its ids, flattened in that order (one gather; the indices go up pinned)."""
    rows, cols = [], []
    for start, num_rows, ids in groups:
        for row in range(start, start + num_rows):
            rows.extend([row] * len(ids or ()))
            cols.extend(ids or ())
    device = logprobs.device
    return logprobs[h2d(rows, torch.int64, device, pin=True),
                    h2d(cols, torch.int64, device, pin=True)]


def _filter_probs(probs: torch.Tensor, info: SamplingBatchInfo) -> torch.Tensor:
    if info.need_top_p_top_k:
        sorted_probs, sorted_idx = probs.sort(dim=-1, descending=True)
        rank = torch.arange(probs.shape[-1], device=probs.device).unsqueeze(0)
        drop = rank >= info.top_ks.unsqueeze(1)
        cum = sorted_probs.cumsum(dim=-1)
        drop |= (cum - sorted_probs) > info.top_ps.unsqueeze(1)
        sorted_probs = sorted_probs.masked_fill(drop, 0.0)
        probs = torch.zeros_like(probs).scatter_(1, sorted_idx, sorted_probs)
    if info.need_min_p_sampling:
        threshold = probs.max(dim=-1, keepdim=True).values * info.min_ps.unsqueeze(1)
        probs = probs.masked_fill(probs < threshold, 0.0)
    return probs


def _seeded_sample(probs: torch.Tensor, seeds: torch.Tensor, positions: torch.Tensor):
    """Exponential-race sampling (argmax p / E) with E drawn from hashed (seed, pos, id)."""
    vocab = probs.shape[-1]
    token = torch.arange(vocab, device=probs.device, dtype=torch.int64).unsqueeze(0)
    x = seeds.unsqueeze(1) * 0x9E3779B1 + positions.unsqueeze(1) * 0x85EBCA77 + token * 0xC2B2AE3D
    x = x ^ (x >> 15)
    x = x * 0x2C1B3C6D
    x = x ^ (x >> 12)
    x = x * 0x297A2D39
    x = x ^ (x >> 15)
    u = ((x & 0xFFFFFF).float() + 0.5) / float(1 << 24)
    # The top draw rounds to u == 1.0 in float32: E would be -0.0, and p / E NaN (the argmax)
    # for every zero-probability (masked, filtered) token. 2**-25 is -log(1 - 2**-25).
    exp_noise = (-torch.log(u)).clamp_min(2.0 ** -25)
    return (probs / exp_noise).argmax(dim=-1)
