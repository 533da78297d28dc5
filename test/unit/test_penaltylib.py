"""Penalizer state on the device against a recomputation from each request's token lists."""

from __future__ import annotations

import random
from collections import Counter

import pytest
import torch

from sglab.srt.managers.schedule_batch import Req
from sglab.srt.sampling.penaltylib import PENALIZERS, BatchedPenalizerOrchestrator
from sglab.srt.sampling.sampling_params import SamplingParams

VOCAB = 50
EOS = 49


def _req(rng: random.Random, **params) -> Req:
    prompt = [rng.randrange(VOCAB) for _ in range(rng.randrange(1, 12))]
    req = Req(f"r{rng.random()}", None, prompt, SamplingParams(**params), 0,
              eos_token_ids={EOS})
    req.output_ids = [rng.randrange(VOCAB) for _ in range(rng.randrange(0, 6))]
    return req


def reference(logits: torch.Tensor, req: Req) -> torch.Tensor:
    """Penalties recomputed from the token lists: frequency and presence (OpenAI), stop tokens
    masked before min_new_tokens, then repetition over prompt and output (HF transformers)."""
    p, out = req.sampling_params, req.output_ids
    x = logits.clone()
    for token, count in Counter(out).items():
        x[token] -= torch.tensor(count * p.frequency_penalty, dtype=torch.float32)
        x[token] -= torch.tensor(p.presence_penalty, dtype=torch.float32)
    if len(out) < p.min_new_tokens:
        stops = set(p.stop_token_ids or []) | (set() if p.ignore_eos else {EOS})
        for token in stops:
            x[token] = float("-inf")
    rep = torch.tensor(p.repetition_penalty, dtype=torch.float32)
    for token in set(req.origin_input_ids + out):
        x[token] = x[token] * rep if x[token] < 0 else x[token] / rep
    return x


MIXES = [
    {},
    {"frequency_penalty": 1.5},
    {"presence_penalty": -0.7},
    {"repetition_penalty": 1.8},
    {"repetition_penalty": 0.6, "frequency_penalty": -0.5},
    {"min_new_tokens": 4, "stop_token_ids": [3, 7]},
    {"min_new_tokens": 3, "ignore_eos": True, "stop_token_ids": [5]},
    {"frequency_penalty": 0.3, "presence_penalty": 0.4, "repetition_penalty": 1.2,
     "min_new_tokens": 6},
]


def _check(orch: BatchedPenalizerOrchestrator | None, reqs: list[Req], seed: int) -> None:
    logits = torch.randn(len(reqs), VOCAB, generator=torch.Generator().manual_seed(seed)) * 3
    got = orch.apply(logits) if orch is not None else logits
    want = torch.stack([reference(logits[i], r) for i, r in enumerate(reqs)])
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-6)


def _step(orch: BatchedPenalizerOrchestrator | None, reqs: list[Req],
          rng: random.Random) -> None:
    tokens = [rng.choice([3, 5, 7, EOS, rng.randrange(VOCAB)]) for _ in reqs]
    if orch is not None:
        orch.cumulate_output_tokens(torch.tensor(tokens))
    for req, token in zip(reqs, tokens):
        req.output_ids.append(token)


def _build(reqs: list[Req]) -> BatchedPenalizerOrchestrator | None:
    return BatchedPenalizerOrchestrator.from_reqs(PENALIZERS, reqs, VOCAB, "cpu")


@pytest.mark.parametrize("seed", range(4))
def test_state_follows_steps_filters_and_merges(seed):
    rng = random.Random(seed)
    ours = [_req(rng, **rng.choice(MIXES)) for _ in range(5)]
    theirs = [_req(rng, **rng.choice(MIXES)) for _ in range(3)]
    a, b = _build(ours), _build(theirs)
    for step in range(8):
        _check(a, ours, seed * 100 + step)
        _check(b, theirs, seed * 100 + 50 + step)
        _step(a, ours, rng)
        _step(b, theirs, rng)
        if step == 3:  # a batch loses requests, then takes in another batch's rows
            keep = sorted(rng.sample(range(len(ours)), 3))
            a = a.filter(keep, [ours[i] for i in keep]) if a is not None else None
            ours = [ours[i] for i in keep]
            a = BatchedPenalizerOrchestrator.merge(a, ours, b, theirs)
            ours, theirs = ours + theirs, [_req(rng, **rng.choice(MIXES))]
            b = _build(theirs)
    rebuilt = _build(ours)
    _check(rebuilt, ours, seed)


def test_no_penalty_no_orchestrator_and_merge_keeps_rows_neutral():
    rng = random.Random(7)
    plain = [_req(rng) for _ in range(3)]
    assert _build(plain) is None
    penalized = [_req(rng, frequency_penalty=2.0)]
    merged = BatchedPenalizerOrchestrator.merge(None, plain, _build(penalized), penalized)
    assert [type(p).__name__ for p in merged.penalizers] == ["BatchedFrequencyPenalizer"]
    _check(merged, plain + penalized, 0)
    # Once the penalized request leaves, the batch drops the orchestrator.
    assert merged.filter([0, 1, 2], plain) is None


def test_huge_min_new_tokens_and_out_of_vocab_stop_ids_are_safe():
    rng = random.Random(8)
    req = _req(rng, min_new_tokens=10**30, stop_token_ids=[3, VOCAB + 5])
    orch = _build([req])
    logits = orch.apply(torch.zeros(1, VOCAB))
    assert logits[0, 3] == float("-inf") and logits[0, EOS] == float("-inf")
    assert torch.isfinite(logits[0, :3]).all()
