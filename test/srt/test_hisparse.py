"""HiSparse on GQA models and patch 0004: outputs against HiSparse off and across backup modes,
swap-in against the host copies, the lifecycle (staging, finish, abort, retract, failures), the
integrity checks and the sync audit of the backup path. GPU-only behaviour (stream order, the
host's blocked time, the UVA kernel) is in the gpu tests at the end."""

from __future__ import annotations

import json
import random

import pytest
import torch

from sglab.srt.debug.sync_audit import AUDIT
from sglab.srt.managers.hisparse_coordinator import HiSparseCoordinator
from sglab.srt.managers.tp_worker import TpModelWorker
from sglab.test.runners import SchedulerRunner
from sglab.test.schedule_invariance import forced_retraction

GREEDY = {"temperature": 0, "ignore_eos": True}
PAGE = 4
# Sparse: past 24 tokens a row attends to 4 pages (sink, newest, 2 by score) of 4 tokens.
SPARSE = {"top_k": 16, "device_buffer_size": 24, "num_recent_pages": 1}
BACKUP_MODES = {"blocking": {"enable_hisparse_async_backup": False},
                "pr": {"hisparse_backup_mode": "pr"},
                "async_finish": {"hisparse_backup_mode": "async_finish"}}
BACKUP_REGION = "HiSparseCoordinator._eager_backup_previous_token"
FINISH_REGION = "HiSparseCoordinator.request_finished"


@pytest.fixture(scope="module")
def path(tiny_model_dir):
    return tiny_model_dir("tiny-qwen3")


def _prompts(lens, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(900) for _ in range(n)] for n in lens]


def _hisparse(path: str, config: dict | None = None, **kwargs) -> SchedulerRunner:
    kwargs.setdefault("max_total_tokens", 512)
    return SchedulerRunner(model_path=path, disable_radix_cache=True, enable_hisparse=True,
                           page_size=PAGE, hisparse_config=json.dumps(config or SPARSE), **kwargs)


def _same(a, b) -> None:
    assert [o.output_ids for o in a] == [o.output_ids for o in b]
    assert [o.logprobs for o in a] == [o.logprobs for o in b]


class SwapInProbe:
    """Wraps the swap-in: every selected slot must hold its position's host copy; counts the
    sparse entries and the misses (loads from the host). Inside a CUDA-graph capture it only
    adds the misses into a device counter, which each replay adds to again (the debug
    invariants check the slots after every step)."""

    def __init__(self, monkeypatch, device: str = "cpu"):
        self.entries = self.calls = 0
        self.eager_misses = 0
        self.graph_misses = torch.zeros((), dtype=torch.int64, device=device)
        real = HiSparseCoordinator.swap_in_selected_pages
        probe = self

        def checked(coord, layer_id, positions, host):
            st = coord.state
            lens = st.seq_lens[:, None]
            older = st.sparse[:, None] & (positions < lens - 1)
            was_resident = coord.resident[layer_id][torch.where(older, host, 0)] >= 0
            out = real(coord, layer_id, positions, host)
            missed = (older & ~was_resident).sum()
            if torch.cuda.is_available() and torch.cuda.is_current_stream_capturing():
                probe.graph_misses.add_(missed)
                return out
            for dev, hst in ((coord.device_pool.k_buffer, coord.host_pool.k_buffer),
                             (coord.device_pool.v_buffer, coord.host_pool.v_buffer)):
                assert torch.equal(dev[layer_id][out[older]].cpu(),
                                   hst[layer_id][host[older].cpu()])
            probe.calls += 1
            probe.entries += int(older.sum())
            probe.eager_misses += int(missed)
            return out

        monkeypatch.setattr(HiSparseCoordinator, "swap_in_selected_pages", checked)

    @property
    def misses(self) -> int:
        return self.eager_misses + int(self.graph_misses)


# --- HiSparse against HiSparse off ------------------------------------------------------------


@pytest.mark.parametrize("overlap", [False, True], ids=["normal", "overlap"])
def test_buffer_and_top_k_past_every_length_equal_hisparse_off(path, overlap):
    """Every row stays dense over its hot buffer: the same tokens and logprob bits as without
    HiSparse, through staging, buffer growth and the host backups."""
    prompts = _prompts((5, 23, 40, 61))
    params = {**GREEDY, "max_new_tokens": 20}
    kw = {"disable_overlap_schedule": not overlap, "page_size": PAGE}
    off = SchedulerRunner(model_path=path, disable_radix_cache=True, **kw).generate(
        prompts, params, return_logprob=True, top_logprobs_num=2)
    runner = _hisparse(path, {"top_k": 96, "device_buffer_size": 96},
                       disable_overlap_schedule=not overlap)
    host_k = runner.scheduler.hisparse.host_pool.k_buffer
    host_k.zero_()  # allocated uninitialized: zero, so what the backups wrote shows
    on = runner.generate(prompts, params, return_logprob=True, top_logprobs_num=2)
    _same(off, on)
    assert runner.integrity_error() is None
    assert host_k.abs().sum() > 0


def test_min_sparse_prompt_len_keeps_short_prompts_dense(path, monkeypatch):
    """Prompts shorter than min_sparse_prompt_len are not managed (all their KV on the
    device, dense to the end) while longer ones go sparse in the same batches."""
    prompts = _prompts((9, 11, 40, 50), seed=5)
    params = {**GREEDY, "max_new_tokens": 24}
    off = SchedulerRunner(model_path=path, disable_radix_cache=True, page_size=PAGE).generate(
        prompts, params, return_logprob=True)
    probe = SwapInProbe(monkeypatch)
    runner = _hisparse(path, {**SPARSE, "min_sparse_prompt_len": 20})
    on = runner.generate(prompts, params, return_logprob=True)
    # The short ones (9 + 24 and 11 + 24 tokens, past the buffer) never went sparse.
    _same(off[:2], on[:2])
    assert [o.output_ids for o in off[2:]] != [o.output_ids for o in on[2:]]
    assert probe.misses > 0 and runner.integrity_error() is None


# --- patch 0004: backup modes -----------------------------------------------------------------


def _host_tier_run(path, monkeypatch, mode: str):
    prompts = _prompts((30, 41, 47, 52, 58, 60), seed=1)
    probe = SwapInProbe(monkeypatch)
    runner = _hisparse(path, {**SPARSE, "host_to_device_ratio": 4}, max_total_tokens=160,
                       **BACKUP_MODES[mode])
    outs = runner.generate(prompts, {**GREEDY, "max_new_tokens": 30}, return_logprob=True,
                           top_logprobs_num=2)
    assert runner.integrity_error() is None
    total_kv = sum(len(p) + 30 for p in prompts)
    assert total_kv > runner.scheduler.max_total_num_tokens  # the device pool alone is short
    assert probe.misses > 0 and probe.entries > probe.misses  # swap-ins, and hits
    assert all(o.total_retractions == 0 for o in outs)
    return outs


def test_0004_off_and_on_give_identical_tokens_and_logprobs(path, monkeypatch):
    """Patch 0004 reschedules the backup only: off, the PR and sglab's mode give the same bits
    on a workload whose KV overflows the device pool (the host tier and swap-in at work)."""
    runs = {mode: _host_tier_run(path, monkeypatch, mode) for mode in BACKUP_MODES}
    _same(runs["blocking"], runs["pr"])
    _same(runs["blocking"], runs["async_finish"])


def test_0004_sync_audit_of_the_backup_path(path, audit):
    """Off (before sglang#21932): per decode step the rows read back from the device and two
    blocking uploads, and a finishing request reads its buffer back; the PR: no sync in the
    backup path, the finish still reads back; sglab's async_finish: none at all."""
    prompts = _prompts((26, 33, 45), seed=2)
    counts = {}
    for mode in BACKUP_MODES:
        AUDIT.reset()
        runner = _hisparse(path, enable_sync_audit=True, **BACKUP_MODES[mode])
        runner.generate(prompts, {**GREEDY, "max_new_tokens": 12})
        AUDIT.step_end()  # the finishes, after the last launch
        steps, times = list(AUDIT.steps), list(AUDIT.step_ms)
        ran = [BACKUP_REGION in t for t in times]
        assert sum(ran) == 11  # every decode step but none of the prefill ones
        backup = [{k: n for (r, k), n in s.items() if r == BACKUP_REGION}
                  for s, r in zip(steps, ran) if r]
        finish = [{k: n for (r, k), n in s.items() if r == FINISH_REGION} for s in steps]
        counts[mode] = (backup, [f for f in finish if f],
                        sum(FINISH_REGION in t for t in times))
    off, pr, ours = counts["blocking"], counts["pr"], counts["async_finish"]
    # The first decode step only skips (staging copied the prompts); then 3 backups a step.
    assert off[0] == [{"d2h": 1}] + [{"d2h": 1, "blocking_h2d": 2}] * 10
    assert pr[0] == ours[0] == [{}] * 11
    assert off[1] == pr[1] == [{"d2h": 3}]  # the three requests finish in one step
    assert ours[1] == [] and ours[2] >= 1  # the region ran, with no sync


# --- lifecycle ----------------------------------------------------------------------------------


def test_invariants_after_every_step(path, monkeypatch):
    """Debug mode checks after every step that resident buffer slots hold their host copies,
    no device page is held twice and the free lists conserve the pool."""
    monkeypatch.setenv("SGLAB_DEBUG_HISPARSE", "1")
    checked = []
    real = HiSparseCoordinator.check_invariants
    monkeypatch.setattr(HiSparseCoordinator, "check_invariants",
                        lambda self: checked.append(1) or real(self))
    runner = _hisparse(path, max_total_tokens=160)
    outs = runner.generate(_prompts((30, 44, 57), seed=3), {**GREEDY, "max_new_tokens": 25})
    assert all(len(o.output_ids) == 25 for o in outs) and len(checked) >= 25


def test_swap_in_kernel_serves_what_its_torch_form_serves(path, monkeypatch):
    """The swap-in kernel (Triton's interpreter here) against the torch form, in a scheduler:
    the same tokens and logprobs, the invariants checked after every step."""
    monkeypatch.setenv("SGLAB_DEBUG_HISPARSE", "1")
    outs, misses, probe = {}, {}, SwapInProbe(monkeypatch)
    for kernel in (False, True):
        before = probe.misses
        runner = _hisparse(path, max_total_tokens=160)
        runner.scheduler.hisparse.swap_kernel = kernel
        outs[kernel] = runner.generate(_prompts((30, 44, 57), seed=3),
                                       {**GREEDY, "max_new_tokens": 25})
        misses[kernel] = probe.misses - before
    _same(outs[False], outs[True])
    assert misses[False] == misses[True] > 0


def _mid_run(path, **kwargs) -> SchedulerRunner:
    """A runner stopped while its rows are sparse."""
    runner = _hisparse(path, **kwargs)
    for prompt in _prompts((30, 44), seed=4):
        runner.submit(prompt, {**GREEDY, "max_new_tokens": 20})
    for _ in range(8):
        runner.scheduler.run_step()
    assert any(runner.scheduler.hisparse.managed_rows)
    return runner


def test_invariant_check_catches_stale_copies_and_summaries_and_a_double_held_page(path):
    coord = _mid_run(path, disable_overlap_schedule=True).scheduler.hisparse
    assert coord.check_invariants() is None
    row = coord.managed_rows.index(True)
    tok = int(coord.buffer_tokens[1, row, 3])
    host = int(coord.req_to_page[row, tok // PAGE]) * PAGE + tok % PAGE
    saved = coord.host_pool.v_buffer[1, host].clone()
    coord.host_pool.v_buffer[1, host] += 1
    assert "differs from its host copy" in coord.check_invariants()
    coord.host_pool.v_buffer[1, host] = saved
    first_page = int(coord.req_to_page[row, 0])
    saved = coord.quest.k_max[0, first_page].clone()
    coord.quest.k_max[0, first_page] += 1
    assert "Quest summary differs" in coord.check_invariants()
    coord.quest.k_max[0, first_page] = saved
    assert coord.check_invariants() is None
    other = coord.managed_rows.index(True, row + 1)
    coord.req_to_device_buffer_cpu[other, 0] = coord.req_to_device_buffer_cpu[row, 0]
    assert "held twice" in coord.check_invariants()


@pytest.mark.parametrize("leak", ["resident", "buffer", "host"])
def test_idle_integrity_check_covers_the_host_tier(path, leak):
    runner = _hisparse(path)
    runner.generate(_prompts((30, 40), seed=6), {**GREEDY, "max_new_tokens": 10})
    assert runner.integrity_error() is None
    coord = runner.scheduler.hisparse
    if leak == "resident":
        coord.resident[0, 9] = 2
    elif leak == "buffer":
        coord.device_allocator.alloc(PAGE)
    else:
        coord.allocator.logical.alloc(PAGE)
    expected = {"resident": "residency map", "buffer": "KV slots leaked",
                "host": "host KV slots leaked"}[leak]
    assert expected in runner.integrity_error()


@pytest.mark.parametrize("overlap", [False, True], ids=["normal", "overlap"])
def test_abort_in_staging_and_before_the_prefill_lands(path, overlap):
    """A request aborted while staged is freed at once; one aborted before its prefill's result
    landed (overlap) finishes with it; the others are unaffected and nothing leaks."""
    runner = _hisparse(path, disable_overlap_schedule=not overlap)
    keep = runner.submit(_prompts((33,), seed=7)[0], {**GREEDY, "max_new_tokens": 12})
    runner.scheduler.run_step()
    gone = runner.submit(_prompts((41,), seed=8)[0], {**GREEDY, "max_new_tokens": 12})
    runner.scheduler.run_step()  # gone's prefill ran: staged (normal), or its result pending
    sched = runner.scheduler
    staged = [s.req.rid for s in sched.hisparse.staging_queue]
    pending = [r.rid for b, _ in sched.result_queue for r in b.reqs]
    assert (gone in pending) if overlap else (gone in staged)
    runner.abort(gone)
    outs = runner.run()
    assert outs[gone].finish_reason["type"] == "abort" and len(outs[gone].output_ids) <= 1
    assert len(outs[keep].output_ids) == 12 and runner.integrity_error() is None


def test_retraction_frees_the_hot_buffer_and_readmits(path):
    """Retracted requests free their hot buffers and host slots and are staged again after
    their second prefill: the same bits as HiSparse off under the same retractions."""
    prompts = _prompts((20, 28, 35), seed=9)
    params = {**GREEDY, "max_new_tokens": 16}
    with forced_retraction() as forced:
        off = SchedulerRunner(model_path=path, disable_radix_cache=True, page_size=PAGE,
                              disable_overlap_schedule=True).generate(prompts, params,
                                                                      return_logprob=True)
    with forced_retraction() as forced:
        runner = _hisparse(path, {"top_k": 96, "device_buffer_size": 96},
                           disable_overlap_schedule=True)
        on = runner.generate(prompts, params, return_logprob=True)
    assert forced[0] > 0 and sum(o.total_retractions for o in on) > 0
    _same(off, on)
    assert runner.integrity_error() is None


def test_host_pool_exhaustion_defers_admission_and_never_crashes(path):
    """A host tier no larger than the device pool: admission waits for host slots (and decode
    retracts when they run out); every request completes and nothing leaks."""
    prompts = _prompts([40 + 3 * i for i in range(8)], seed=10)
    runner = _hisparse(path, {**SPARSE, "host_to_device_ratio": 1}, max_total_tokens=160)
    assert runner.scheduler.hisparse.allocator.logical.size == 160
    outs = runner.generate(prompts, {**GREEDY, "max_new_tokens": 40})
    assert all(len(o.output_ids) == 40 for o in outs)
    assert runner.integrity_error() is None


def test_a_host_tier_too_large_to_allocate_is_a_startup_error_naming_the_key(path):
    """10^12 host slots (petabytes): the allocation fails, and the error says how large the
    tier was and which settings size it."""
    with pytest.raises(RuntimeError) as e:
        _hisparse(path, {**SPARSE, "host_to_device_ratio": 6.25e9}, max_total_tokens=160)
    msg = str(e.value)
    assert msg.startswith("HiSparse: the host KV tier (1000000000000 tokens, ")
    assert "host_to_device_ratio" in msg and "could not be allocated" in msg


def test_a_failing_decode_step_is_undone_and_the_others_continue(path, monkeypatch):
    """A forward that fails after its HiSparse work (backups, a grown buffer, swap-ins): the
    step is undone, the others advance alone and the failing request is aborted."""
    runner = _hisparse(path, disable_overlap_schedule=True)
    rids = [runner.submit(p, {**GREEDY, "max_new_tokens": 14})
            for p in _prompts((9, 13, 17), seed=11)]
    poison_rows: set[int] = set()
    real = TpModelWorker.forward_batch_generation

    def failing(worker, batch):
        out = real(worker, batch)
        plan = batch.hisparse_plan
        if plan is not None and poison_rows & {row for row, _ in plan.grown}:
            raise RuntimeError("injected")
        return out

    monkeypatch.setattr(TpModelWorker, "forward_batch_generation", failing)
    runner.scheduler.run_step()  # the prefill; the requests are staged
    poison_rows.add(next(s.req.req_pool_idx for s in runner.scheduler.hisparse.staging_queue
                         if s.req.rid == rids[1]))
    outs = runner.run()
    assert outs[rids[1]].finish_reason["type"] == "abort"
    assert "injected" in outs[rids[1]].finish_reason["message"]
    assert all(len(outs[r].output_ids) == 14 for r in (rids[0], rids[2]))
    assert runner.integrity_error() is None


# --- GPU ----------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_hisparse_graphs_overlap_and_modes(path, monkeypatch):
    """On the GPU, with decode CUDA graphs and overlap: the three backup modes give the same
    bits, every selected slot holds its host copy, and the invariants hold after every step."""
    monkeypatch.setenv("SGLAB_DEBUG_HISPARSE", "1")
    kw = {"device": "cuda", "attention_backend": "triton", "cuda_graph_max_bs": 8}
    runs = {}
    for mode in BACKUP_MODES:
        probe = SwapInProbe(monkeypatch, "cuda")
        runner = _hisparse(path, {**SPARSE, "host_to_device_ratio": 4}, max_total_tokens=160,
                           **BACKUP_MODES[mode], **kw)
        runs[mode] = runner.generate(_prompts((30, 41, 47, 52, 58, 60), seed=1),
                                     {**GREEDY, "max_new_tokens": 30}, return_logprob=True)
        assert probe.misses > 0 and runner.integrity_error() is None
    _same(runs["blocking"], runs["pr"])
    _same(runs["blocking"], runs["async_finish"])
