"""SamplingParams.verify: whatever it accepts is representable where the scheduler puts it."""

from __future__ import annotations

import math

import pytest
import torch

from sglab.srt.layers.sampler import SamplingBatchInfo
from sglab.srt.sampling.sampling_params import INT64_MAX, INT64_MIN, SamplingParams

FLOATS = ["temperature", "top_p", "min_p", "frequency_penalty", "presence_penalty",
          "repetition_penalty"]


@pytest.mark.parametrize("name", FLOATS)
@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf, 10**400])
def test_non_finite_floats_are_refused(name, value):
    with pytest.raises(ValueError, match=f"{name} must be a finite number"):
        SamplingParams(**{name: value}).verify(1000)


@pytest.mark.parametrize("name", FLOATS)
def test_float_params_refuse_other_types(name):
    with pytest.raises(ValueError, match=f"{name} has the wrong type"):
        SamplingParams(**{name: "1.0"}).verify(1000)


@pytest.mark.parametrize("seed", [INT64_MAX + 1, INT64_MIN - 1, 2**64, -(2**100)])
def test_seeds_outside_int64_are_refused(seed):
    with pytest.raises(ValueError, match="sampling_seed must be a 64-bit signed integer"):
        SamplingParams(sampling_seed=seed).verify(1000)


def _batch_info(params: list[SamplingParams]) -> SamplingBatchInfo:
    for p in params:
        p.verify(1000)
        p.normalize(None)
    return SamplingBatchInfo.from_params(params, [p.sampling_seed or 0 for p in params], None)


def test_accepted_extremes_build_a_batch():
    params = [SamplingParams(sampling_seed=INT64_MAX, temperature=10**30, top_k=10**30),
              SamplingParams(sampling_seed=INT64_MIN, max_new_tokens=10**30,
                             min_new_tokens=10**20, temperature=1e-30),
              SamplingParams(top_p=1e-300, min_p=1, repetition_penalty=1e-300)]
    info = _batch_info(params)
    assert info.seeds.tolist() == [INT64_MAX, INT64_MIN, 0]
    assert info.top_ks.tolist()[0] == info.top_ks.tolist()[2] == 1 << 30
    assert info.top_ks.tolist()[1] == 1  # 1e-30 is greedy
    assert torch.isfinite(info.temperatures).all()
