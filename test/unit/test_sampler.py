"""The seeded sampler never draws a token of probability zero (masked by a grammar, filtered by
top-k), even where its hashed noise rounds to the edge of (0, 1)."""

from __future__ import annotations

import torch

from sglab.srt.layers.sampler import Sampler, SamplingBatchInfo
from sglab.srt.sampling.sampling_params import SamplingParams

VOCAB = 1024
# (seed, position, token) whose uniform draw rounds to 1.0 in float32 (seen as masked tokens
# drawn by n=3 regex requests at temperature 0.5).
EDGE_DRAWS = [(973647427, 22, 356), (188594927, 113, 899)]


def _info(seeds: list[int], **params) -> SamplingBatchInfo:
    batch = [SamplingParams(temperature=0.5, **params) for _ in seeds]
    for p in batch:
        p.normalize(None)
    return SamplingBatchInfo.from_params(batch, seeds)


def test_masked_tokens_are_never_drawn_at_the_noise_edge():
    seeds = [s for s, _, _ in EDGE_DRAWS] + list(range(64))
    positions = torch.tensor([p for _, p, _ in EDGE_DRAWS] + [22] * 64)
    logits = torch.randn(len(seeds), VOCAB, generator=torch.Generator().manual_seed(0))
    allowed = torch.tensor([117, 40] + [i * 7 for i in range(64)])
    masked = torch.full_like(logits, float("-inf"))
    masked[torch.arange(len(seeds)), allowed] = logits[torch.arange(len(seeds)), allowed]
    out = Sampler()(masked, _info(seeds), positions)
    assert out.next_token_ids.tolist() == allowed.tolist()


def test_top_k_filtered_tokens_are_never_drawn_at_the_noise_edge():
    seeds = [s for s, _, _ in EDGE_DRAWS]
    positions = torch.tensor([p for _, p, _ in EDGE_DRAWS])
    logits = torch.zeros(len(seeds), VOCAB)
    logits[:, :2] = 5.0  # the top 2; the edge tokens are filtered out
    out = Sampler()(logits, _info(seeds, top_k=2), positions)
    assert all(t in (0, 1) for t in out.next_token_ids.tolist()), out.next_token_ids
