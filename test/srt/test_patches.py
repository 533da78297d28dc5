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


def _run(path: str, prompts, params: dict = GREEDY, **kwargs):
    runner = SchedulerRunner(model_path=path, enable_sync_audit=True, **kwargs)
    first = runner.generate(prompts[:1], params, return_logprob=True)
    rest = runner.generate(prompts[1:], params, return_logprob=True)
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


UNIFIED = {"attention_backend": "triton", "enable_deterministic_inference": True}
UNIFIED_PARAMS = {**GREEDY, "max_new_tokens": 4}  # the counts checked are the prefills'


@pytest.fixture(scope="module")
def unified_off(path):
    """Patch 0002 off: outputs and audited steps, shared by the index builds."""
    try:
        return _run(path, _prompts(1), UNIFIED_PARAMS, patches="none", **UNIFIED)
    finally:
        AUDIT.enabled = False
        AUDIT.reset()


@pytest.mark.parametrize("build", ["batched", "kernel"])
def test_0002_unified_extend_index_build(path, audit, unified_off, build):
    off, off_steps = unified_off
    on, on_steps = _run(path, _prompts(1), UNIFIED_PARAMS, patches="0002",
                        unified_index_build=build, **UNIFIED)
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


# --- 0003b: the Mamba state pool of hybrid models ----------------------------------------------

MAMBA = {"mamba_scheduler_strategy": "extra_buffer", "mamba_track_interval": 4,
         "disable_overlap_schedule": True}
SITES = ("MambaPool.alloc", "HybridReqToTokenPool.alloc", "free_mamba_cache",
         "prepare_for_decode.mamba_track")
LEFT_BY_THE_PR = ("prepare_for_extend.mamba_track", "GDNAttnBackend.init_forward_metadata")


def _run_0003b(path: str, monkeypatch, **kwargs):
    """Two prompts (one long enough to snapshot in its prefill), then one sharing its prefix;
    per launched step (decode?, batch size) and the calls of the sites that run per call."""
    AUDIT.reset()
    runner = SchedulerRunner(model_path=path, enable_sync_audit=True, **MAMBA, **kwargs)
    launches, calls = [], {"alloc": 0, "rows": [], "free_keep": 0}
    with monkeypatch.context() as m:
        _count_site_calls(m, runner.scheduler, launches, calls)
        rng = random.Random(7)
        shared = [rng.randrange(1000) for _ in range(70)]
        params = {**GREEDY, "max_new_tokens": 6}
        outs = runner.generate([shared + [1, 2], [5, 6, 7]], params, return_logprob=True)
        outs += runner.generate([shared + [3]], params, return_logprob=True)
    AUDIT.step_end()  # the last step's result processing
    assert outs[-1].cached_tokens == 64 and runner.integrity_error() is None
    return outs, list(AUDIT.steps), launches, calls


def _count_site_calls(m, sched, launches: list, calls: dict) -> None:
    from sglab.srt.mem_cache.memory_pool import HybridReqToTokenPool, MambaPool

    launch, alloc = sched._launch, MambaPool.alloc
    alloc_reqs, free = HybridReqToTokenPool.alloc_reqs, HybridReqToTokenPool.free_mamba_cache

    def count(key, n=1):
        calls[key] = calls[key] + n if key != "rows" else calls[key] + [n]

    m.setattr(sched, "_launch", lambda b: launches.append(
        (b.forward_mode.is_decode(), b.batch_size())) or launch(b))
    m.setattr(MambaPool, "alloc", lambda self, n: count("alloc") or alloc(self, n))
    m.setattr(HybridReqToTokenPool, "alloc_reqs",
              lambda self, reqs: count("rows", len(reqs)) or alloc_reqs(self, reqs))
    m.setattr(HybridReqToTokenPool, "free_mamba_cache", lambda self, req, keep=None: count(
        "free_keep", int(keep is not None)) or free(self, req, keep))


def _site_totals(steps, region: str) -> dict[str, int]:
    totals: dict[str, int] = {}
    for step in steps:
        for (r, kind), n in step.items():
            if r == region:
                totals[kind] = totals.get(kind, 0) + n
    return totals


@pytest.fixture(scope="module")
def hybrid_path(tiny_model_dir):
    return tiny_model_dir("tiny-qwen3.5")


def test_0003b_sync_free_mamba_pool(hybrid_path, audit, monkeypatch):
    runs = {"off": _run_0003b(hybrid_path, monkeypatch, patches="none"),
            "pr": _run_0003b(hybrid_path, monkeypatch, patches="0003b"),
            "host": _run_0003b(hybrid_path, monkeypatch, patches="0003b",
                               mamba_track_setup="host")}
    for name in ("pr", "host"):
        _same_outputs(runs["off"][0], runs[name][0])
    _, steps, launches, calls = runs["off"]
    assert len(steps) == len(launches) + 1 and calls["free_keep"] > 0
    # Before sglang#19639: alloc assigns the scalar 0 into the conv and the temporal state
    # (a blocking copy each); the row mappings read every request's device slots back
    # (.item() each, .tolist() of each ping-pong pair), upload both lists and write them
    # list-indexed; free_mamba_cache list-indexes the pair; each decode step reads every
    # request's track slot back and uploads two lists (the mask's elements are host tensors:
    # host reads the CPU proxy counts, no sync on a GPU).
    assert _site_totals(steps, "MambaPool.alloc") == {"blocking_h2d": 2 * calls["alloc"]}
    assert _site_totals(steps, "HybridReqToTokenPool.alloc") == {
        "d2h": 2 * sum(calls["rows"]), "blocking_h2d": 4 * len(calls["rows"])}
    assert _site_totals(steps, "free_mamba_cache") == {"blocking_h2d": calls["free_keep"]}
    decode = [(step, bs) for step, (is_decode, bs) in zip(steps, launches) if is_decode]
    assert len(decode) >= 8
    for step, bs in decode:
        assert {k: n for (r, k), n in step.items() if r == SITES[3]} == \
            {"d2h": 2 * bs, "blocking_h2d": 2}
    # The PR: the four sites make no host sync, except the list-indexed writes of the two row
    # mappings, which it keeps (sglab's host mode uploads the rows pinned instead).
    _, pr_steps, _, pr_calls = runs["pr"]
    assert _site_totals(pr_steps, "HybridReqToTokenPool.alloc") == {
        "blocking_h2d": 2 * len(pr_calls["rows"])}
    for region in (SITES[0], SITES[2], SITES[3]):
        assert _site_totals(pr_steps, region) == {}, region
    # What the PR leaves: each prefill reads every track slot back and uploads three lists;
    # the backend tests mask.any() (each decode step once), and reads the plan back.
    assert _site_totals(pr_steps, LEFT_BY_THE_PR[0])["blocking_h2d"] == \
        3 * sum(not d for d, _ in runs["pr"][2])
    # Per eager decode step one bool(mask.any()); the prefill that snapshots: the mask tested
    # twice, six .cpu(), a bool-mask gather and a nonzero; the one that does not: two tests.
    backend = _site_totals(pr_steps, LEFT_BY_THE_PR[1])
    assert backend == {"d2h": sum(d for d, _ in runs["pr"][2]) + 8 + 2, "nonzero": 1,
                       "bool_mask_index": 1}
    host_steps = runs["host"][1]
    for region in SITES + LEFT_BY_THE_PR:
        assert _site_totals(host_steps, region) == {}, region


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_0003b_sync_debug_mode(hybrid_path, audit, monkeypatch):
    """On CUDA, torch.cuda.set_sync_debug_mode sees the syncs of the sites before
    sglang#19639, none in the PR's (but its list-indexed row writes), and none at all in
    sglab's host mode, the PR's leftovers included."""
    kw = {"device": "cuda", "disable_cuda_graph": True}
    runs = {"off": _run_0003b(hybrid_path, monkeypatch, patches="none", **kw),
            "pr": _run_0003b(hybrid_path, monkeypatch, patches="0003b", **kw),
            "host": _run_0003b(hybrid_path, monkeypatch, patches="0003b",
                               mamba_track_setup="host", **kw)}
    for name in ("pr", "host"):
        _same_outputs(runs["off"][0], runs[name][0])
    syncs = {name: {region: _site_totals(run[1], region).get("cuda_sync", 0)
                    for region in SITES + LEFT_BY_THE_PR} for name, run in runs.items()}
    print("cuda syncs per site:", syncs)
    # free_mamba_cache's list index uploads its index from pageable memory, which on CUDA
    # does not synchronize: sync-debug mode sees no sync there (the CPU audit counts the copy).
    for region in (SITES[0], SITES[1], SITES[3]):
        assert syncs["off"][region] > 0, region
    for region in (SITES[0], SITES[2], SITES[3]):
        assert syncs["pr"][region] == 0, region
    assert syncs["pr"][LEFT_BY_THE_PR[0]] > 0
    assert all(n == 0 for n in syncs["host"].values()), syncs["host"]
