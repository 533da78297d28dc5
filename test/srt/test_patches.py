"""Patches: flags and registry, sync-audit counts off vs on, identical outputs off vs on."""

from __future__ import annotations

import random

import pytest
import torch

from sglab.srt.debug.sync_audit import AUDIT
from sglab.srt.patches import PATCHES, active_patch_ids
from sglab.srt.server_args import ServerArgs, ServerArgsError, prepare_server_args
from sglab.test.runners import SchedulerRunner

GREEDY = {"temperature": 0, "max_new_tokens": 8, "ignore_eos": True}


@pytest.fixture(scope="module")
def path(tiny_model_dir):
    return tiny_model_dir("tiny-qwen3")


def _prompts(seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    shared = [rng.randrange(1000) for _ in range(40)]
    return [shared + [rng.randrange(1000) for _ in range(n)] for n in (5, 11, 23)]


def test_patch_flags(path):
    assert set(active_patch_ids(ServerArgs(model_path=path))) == {p.id for p in PATCHES}
    assert active_patch_ids(ServerArgs(model_path=path, patches="none")) == []
    args = prepare_server_args(["--model-path", path, "--patches", "0001,0003a",
                                "--disable-pinned-h2d", "--enable-sync-free-unified-extend"])
    assert active_patch_ids(args) == ["0002", "0003a"]
    with pytest.raises(ServerArgsError, match="unknown patch id.*0042"):
        ServerArgs(model_path=path, patches="0001,0042")
    for patch in PATCHES:
        assert hasattr(ServerArgs, patch.field), patch.field


def _run(path: str, prompts, **kwargs):
    runner = SchedulerRunner(model_path=path, enable_sync_audit=True, **kwargs)
    first = runner.generate(prompts[:1], GREEDY, return_logprob=True)
    rest = runner.generate(prompts[1:], GREEDY, return_logprob=True)
    outs = first + rest
    assert rest[0].cached_tokens >= 40
    assert runner.integrity_error() is None
    return outs, list(AUDIT.steps)


def _same_outputs(a, b) -> None:
    assert [o.output_ids for o in a] == [o.output_ids for o in b]
    assert [o.logprobs for o in a] == [o.logprobs for o in b]


@pytest.mark.parametrize("mode", ["pr", "packed"])
def test_0001_pinned_h2d(path, audit, mode):
    prompts = _prompts()
    off, off_steps = _run(path, prompts, patches="none")
    AUDIT.reset()
    on, on_steps = _run(path, prompts, patches="0001", pinned_h2d_mode=mode)
    _same_outputs(off, on)
    region = "ForwardBatch.init_new"
    assert all(step.get((region, "pageable_h2d"), 0) == 0 for step in on_steps)
    # Before the patch every upload in init_new is a pageable copy. Prefill: ids, slots, rows,
    # lengths, 2 extend lengths, 5 sampling tensors (11), + 2 with queued row writes (a prefix
    # hit). Decode: the new slots only (1) while the batch keeps its requests; + 2 (rows,
    # lengths) + 5 (sampling) on its first step; + 2 when queued row writes land (the rows the
    # radix cache re-pointed after the prefill).
    counts = [step.get((region, "pageable_h2d"), 0) for step in off_steps]
    assert counts == [11, 8, 3, 1, 1, 1, 1, 1, 13, 8, 3, 1, 1, 1, 1, 1]


@pytest.mark.parametrize("build", ["batched", "kernel"])
def test_0002_unified_extend_index_build(path, audit, build):
    prompts = _prompts(1)
    kwargs = {"attention_backend": "triton", "enable_deterministic_inference": True}
    off, off_steps = _run(path, prompts, patches="none", **kwargs)
    AUDIT.reset()
    on, on_steps = _run(path, prompts, patches="0002", unified_index_build=build, **kwargs)
    _same_outputs(off, on)
    layers = 2
    region = "_forward_extend_unified"
    extend_steps = [s for s in off_steps if (region, "d2h") in s]
    assert len(extend_steps) == 2  # the two prefill batches
    for step, bs in zip(extend_steps, (1, 2)):
        assert step[(region, "d2h")] == layers * 4 * bs
        assert step[(region, "blocking_h2d")] == layers * 2
    on_extend = [s for s in on_steps if any(r == region for r, _ in s)]
    if build == "batched":
        assert [s.get((region, "d2h")) for s in on_extend] == [layers, layers]
        assert all(k == "d2h" for s in on_extend for (r, k) in s if r == region)
    else:
        assert on_extend == [] or all(r != region for s in on_extend for (r, _) in s)


def test_0003a_logits_metadata(path, audit):
    prompts = _prompts(2)
    runs = {}
    for patches in ("none", "0003a"):
        AUDIT.reset()
        runner = SchedulerRunner(model_path=path, enable_sync_audit=True, patches=patches)
        outs = runner.generate(prompts, GREEDY, return_logprob=True, logprob_start_len=3,
                               top_logprobs_num=2)
        runs[patches] = (outs, list(AUDIT.steps))
    _same_outputs(runs["none"][0], runs["0003a"][0])
    assert all(len(o.logprobs["input_token_logprobs_val"]) == len(p) - 3
               for o, p in zip(runs["0003a"][0], prompts))
    region = "LogitsProcessor"
    prefill = [s for s in runs["none"][1] if any(r == region for r, _ in s)]
    assert len(prefill) == 1
    # Before: three lists uploaded with blocking copies, one repeat_interleave that syncs.
    assert prefill[0][(region, "blocking_h2d")] == 3
    assert prefill[0][(region, "repeat_interleave_no_output_size")] == 1
    assert all(r != region for s in runs["0003a"][1] for (r, _) in s)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_sync_debug_mode_sees_the_syncs(path, audit):
    """On CUDA the audit counts what torch.cuda.set_sync_debug_mode reports."""
    prompts = _prompts(3)
    kwargs = {"device": "cuda", "attention_backend": "triton",
              "enable_deterministic_inference": True, "disable_cuda_graph": True}
    counts = {}
    for patches in ("none", "all"):
        AUDIT.reset()
        runner = SchedulerRunner(model_path=path, enable_sync_audit=True, patches=patches,
                                 unified_index_build="kernel", **kwargs)
        outs = runner.generate(prompts, GREEDY, return_logprob=True, logprob_start_len=0)
        counts[patches] = (outs, AUDIT.report()["totals"])
    _same_outputs(counts["none"][0], counts["all"][0])
    off, on = counts["none"][1], counts["all"][1]
    assert off["_forward_extend_unified"]["cuda_sync"] > 0
    assert off["LogitsProcessor"]["cuda_sync"] > 0
    assert off["ForwardBatch.init_new"]["pageable_h2d"] > 0
    for region in ("_forward_extend_unified", "LogitsProcessor", "ForwardBatch.init_new"):
        assert not on.get(region), (region, on.get(region))
