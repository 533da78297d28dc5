"""Decode split counts by batch size (`SGLAB_DECODE_SPLIT_WAVES`): a batch of many requests
splits less. The bound per batch size, and the tokens it gives against the fixed bound, in one
launch and in two stages."""

from __future__ import annotations

import pytest
import torch
from sglab.srt.layers.attention import triton_backend
from sglab.srt.layers.attention.triton_backend import MAX_KV_SPLITS
from sglab.test.runners import SchedulerRunner

PARAMS = {"temperature": 0, "max_new_tokens": 3, "ignore_eos": True}


@pytest.mark.parametrize("programs,per_split,bs,want", [
    (264, 8, 1, MAX_KV_SPLITS), (264, 8, 8, 4), (264, 8, 16, 2), (264, 8, 64, 1),
    (264, 8, 256, 1), (100, 8, 2, 6), (0, 8, 64, MAX_KV_SPLITS)])
def test_max_splits_fill_the_target_programs(programs, per_split, bs, want):
    assert triton_backend.decode_max_splits(bs, programs, per_split) == want


def test_split_programs_env_and_cpu_default(monkeypatch):
    monkeypatch.delenv("SGLAB_DECODE_SPLIT_WAVES", raising=False)
    assert triton_backend.split_programs(torch.device("cpu")) == 0
    monkeypatch.setenv("SGLAB_DECODE_SPLIT_WAVES", "40")
    assert triton_backend.split_programs(torch.device("cpu")) == 40
    monkeypatch.setenv("SGLAB_DECODE_SPLIT_WAVES", "-1")
    with pytest.raises(ValueError, match="SGLAB_DECODE_SPLIT_WAVES"):
        triton_backend.split_programs(torch.device("cpu"))


def _prompts() -> list[list[int]]:
    """Three requests past 64 keys: several splits each under the fixed bound."""
    g = torch.Generator().manual_seed(0)
    return [torch.randint(0, 1000, (n,), generator=g).tolist() for n in (66, 100, 140)]


def test_fewer_splits_same_tokens(tiny_model_dir, monkeypatch):
    """Two programs per split in tiny-qwen3 (4 q heads, 2 kv heads): a target of 6 programs
    (6 "waves" of the CPU's one SM)
    gives the three-request batch one split each, where the fixed bound gives up to 3; the
    tokens are the same and the logprobs within fp32 rounding. In two stages (one launch
    gives their bits: test_triton_attention)."""
    seen = []
    decode = triton_backend.decode_attention_fwd

    def spy(q, k, v, o, indptr, indices, logits, lse, splits, max_splits, *a, **kw):
        seen.append((q.shape[0], max_splits, int(splits.max())))
        return decode(q, k, v, o, indptr, indices, logits, lse, splits, max_splits, *a, **kw)

    monkeypatch.setattr(triton_backend, "decode_attention_fwd", spy)
    outs = {}
    for programs in ("0", "6"):
        monkeypatch.setenv("SGLAB_DECODE_SPLIT_WAVES", programs)
        seen.clear()
        runner = SchedulerRunner(model_path=tiny_model_dir("tiny-qwen3"), kernel_fusion="off",
                                 attention_backend="triton")
        outs[programs] = runner.generate(_prompts(), PARAMS, return_logprob=True)
        full = [s for s in seen if s[0] == 3]
        assert full, "no decode step with all three requests"
        if programs == "0":
            assert all(m == MAX_KV_SPLITS for _, m, _ in full)
            assert max(n for *_, n in full) >= 3
        else:
            assert all(m == 1 and n == 1 for _, m, n in full)
    assert [o.output_ids for o in outs["6"]] == [o.output_ids for o in outs["0"]]
    for a, b in zip(outs["6"], outs["0"]):
        torch.testing.assert_close(torch.tensor(a.logprobs["output_token_logprobs_val"]),
                                   torch.tensor(b.logprobs["output_token_logprobs_val"]),
                                   atol=1e-4, rtol=0)


@pytest.mark.parametrize("hq,hkv,want", [(16, 8, 8), (32, 8, 8), (64, 2, 4), (8, 8, 8)])
def test_programs_per_split(hq, hkv, want):
    assert triton_backend.decode_programs_per_split(hq, hkv) == want
