"""Patch 0004's stream order, on one request driven by hand: forward N writes the newest token
into the reserved slot, the backup copies it to the host before forward N+1 overwrites the
slot, and a finish frees nothing a backup still reads. On the GPU the forward is delayed with
`torch.cuda._sleep`: the off path blocks the host for about the delay, the PR for microseconds,
and the variants without the done event are caught by the same checks."""

from __future__ import annotations

import time
from dataclasses import dataclass

import pytest
import torch

from sglab.srt.managers.hisparse_coordinator import HiSparseCoordinator
from sglab.srt.managers.overlap_utils import StepStreams
from sglab.srt.managers.schedule_batch import Req
from sglab.srt.mem_cache.hisparse_memory_pool import HiSparseTokenToKVPoolAllocator
from sglab.srt.mem_cache.memory_pool import (
    MHATokenToKVPool,
    PagedTokenToKVPoolAllocator,
    ReqToTokenPool,
)
from sglab.srt.mem_cache.memory_pool_host import MHATokenToKVPoolHost
from sglab.srt.mem_cache.sparsity.config import HiSparseConfig
from sglab.srt.model_executor.forward_batch_info import ForwardBatch, ForwardMode
from sglab.srt.sampling.sampling_params import SamplingParams

LAYERS, HEADS, DIM, PAGE, BUFFER, PROMPT = 2, 2, 64, 4, 8, 20
gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@dataclass
class OneRequest:
    """A coordinator, its pools, and one staged request past its buffer (sparse)."""

    coord: HiSparseCoordinator
    alloc: HiSparseTokenToKVPoolAllocator
    req: Req
    seq_len: int = PROMPT

    @classmethod
    def make(cls, device: str, mode: str) -> "OneRequest":
        pool = MHATokenToKVPool(256, PAGE, torch.bfloat16, HEADS, DIM, LAYERS, device)
        host = MHATokenToKVPoolHost(pool, 512, pin_memory=device == "cuda")
        alloc = HiSparseTokenToKVPoolAllocator(host, PagedTokenToKVPoolAllocator(256, pool))
        r2t = ReqToTokenPool(4, 128, device)
        config = HiSparseConfig(top_k=8, device_buffer_size=BUFFER, page_size=PAGE,
                                num_recent_pages=1)
        coord = HiSparseCoordinator(config, r2t, alloc, StepStreams(torch.device(device), True),
                                    mode, num_q_heads=2 * HEADS)
        req = Req("r", None, list(range(PROMPT)), SamplingParams(), 0)
        req.req_pool_idx, req.fill_ids = r2t.alloc(1)[0], list(range(PROMPT))
        logical = alloc.alloc_extend([0], [PROMPT], [-1], PROMPT)
        r2t.req_to_token_cpu[req.req_pool_idx, :PROMPT] = logical.to(torch.int32)
        slots = alloc.to_device(logical).to(device)
        pool.k_all[:, slots] = torch.randn(LAYERS, PROMPT, HEADS, DIM, device=device).bfloat16()
        pool.v_all[:, slots] = torch.randn(LAYERS, PROMPT, HEADS, DIM, device=device).bfloat16()
        coord.admit_request_into_staging(req)
        _sync(device)
        assert coord.collect_ready_reqs() == [req]
        return cls(coord, alloc, req)

    def plan_step(self) -> ForwardBatch:
        """The host side of the next decode step, and the step's forward batch."""
        row, dev = self.req.req_pool_idx, self.coord.device
        table = self.coord.req_to_token_pool.req_to_token_cpu
        out = self.alloc.alloc_decode([self.seq_len + 1], [int(table[row, self.seq_len - 1])])
        table[row, self.seq_len] = out.to(torch.int32)
        self.seq_len += 1
        rows, lens = torch.tensor([row]), torch.tensor([self.seq_len])
        plan = self.coord.map_last_loc_to_buffer(rows, lens, out)
        return ForwardBatch(forward_mode=ForwardMode.DECODE, batch_size=1, input_ids=None,
                            req_pool_indices=rows.to(dev), seq_lens=lens.to(dev),
                            out_cache_loc=plan.out_cache_loc.to(dev), positions=None,
                            seq_lens_sum=self.seq_len, seq_lens_cpu=lens, hisparse_plan=plan)

    def host_copy(self, pos: int) -> torch.Tensor:
        slot = int(self.coord.req_to_token_pool.req_to_token_cpu[self.req.req_pool_idx, pos])
        return self.coord.host_pool.k_buffer[:, slot].clone()


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def _write(pool: MHATokenToKVPool, slot: torch.Tensor, value: float, sleep_cycles: int = 0):
    """A forward's KV write of the newest token, after `sleep_cycles` of GPU time."""
    if sleep_cycles:
        torch.cuda._sleep(sleep_cycles)
    # index_fill_ takes the value as a kernel argument: `t[:, slot] = value` would copy it
    # host->device blocking, so the host would wait out the sleep here
    pool.k_all.index_fill_(1, slot, value)
    pool.v_all.index_fill_(1, slot, value)


def _backup_and_overwrite(one: OneRequest, sleep_cycles: int = 0) -> tuple[float, float]:
    """Forward N writes 1.0 (after a delay); the backup of that token is issued (host time
    measured); forward N+1 writes 2.0 into the same reserved slot. Returns (host seconds in
    the backup call, the host copy of the token once everything ran)."""
    pool = one.coord.device_pool
    fb = one.plan_step()  # the first decode after staging: it backs up nothing
    one.coord.begin_decode_step(fb)
    token = one.seq_len - 1
    # Step N+1's host side (its uploads block, so before forward N is in flight).
    fb_next = one.plan_step()
    assert fb_next.out_cache_loc.item() == fb_next.hisparse_plan.backup_device[0]  # reserved
    _write(pool, fb.out_cache_loc, 1.0, sleep_cycles)  # forward N
    fb = fb_next
    start = time.perf_counter()
    one.coord.begin_decode_step(fb)  # backup N, then forward N+1 waits for it
    blocked = time.perf_counter() - start
    _write(pool, fb.out_cache_loc, 2.0)  # forward N+1 overwrites the reserved slot
    _sync(pool.device)
    return blocked, float(one.host_copy(token).float().unique().item())


@pytest.mark.parametrize("mode", ["blocking", "pr", "async_finish"])
def test_backup_copies_what_forward_n_wrote(mode):
    one = OneRequest.make("cpu", mode)
    assert _backup_and_overwrite(one)[1] == 1.0


def _sleep_cycles_for(seconds: float) -> int:
    """GPU sleep cycles for `seconds`; first runs one backup and one finish of a throwaway
    request, so no kernel compiles inside a timed region."""
    warm = OneRequest.make("cuda", "pr")
    _backup_and_overwrite(warm)
    warm.coord.request_finished(warm.req)
    torch.cuda._sleep(1000)
    torch.cuda.synchronize()
    start = time.perf_counter()
    torch.cuda._sleep(10 ** 7)
    torch.cuda.synchronize()
    return int(10 ** 7 * seconds / (time.perf_counter() - start))


def _delay_backups(monkeypatch, cycles: int) -> None:
    """Every backup starts late on its stream: a race with the next forward is then certain."""
    real = MHATokenToKVPoolHost.backup_from_device_all_layer

    def late(self, *args):
        torch.cuda._sleep(cycles)
        real(self, *args)

    monkeypatch.setattr(MHATokenToKVPoolHost, "backup_from_device_all_layer", late)


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("mode", ["blocking", "pr"])
def test_gpu_off_path_blocks_for_the_forward_the_pr_does_not(mode):
    delay = 0.05
    cycles = _sleep_cycles_for(delay)
    one = OneRequest.make("cuda", mode)
    blocked, host = _backup_and_overwrite(one, cycles)
    assert host == 1.0  # the host copy is what forward N wrote, never forward N+1's
    if mode == "blocking":
        assert blocked > 0.6 * delay, blocked
    else:
        assert blocked < 0.1 * delay, blocked


@pytest.mark.gpu
@gpu
def test_gpu_without_the_done_event_the_host_copy_is_caught_stale(monkeypatch):
    cycles = _sleep_cycles_for(0.02)
    _delay_backups(monkeypatch, cycles)
    one = OneRequest.make("cuda", "pr")
    assert _backup_and_overwrite(one)[1] == 1.0  # with the event: correct despite the delay
    monkeypatch.setattr(HiSparseCoordinator, "wait_for_pending_backup", lambda self: None)
    one = OneRequest.make("cuda", "pr")
    assert _backup_and_overwrite(one)[1] == 2.0  # forward N+1 won the race: caught


def _finish_during_backup(one: OneRequest) -> float:
    """Backup N in flight (late), the request finishes, a later prefill reuses its freed
    reserved slot: the host copy must still be forward N's token."""
    pool = one.coord.device_pool
    fb = one.plan_step()
    one.coord.begin_decode_step(fb)
    _write(pool, fb.out_cache_loc, 1.0)
    token = one.seq_len - 1
    fb = one.plan_step()
    reserved = fb.hisparse_plan.backup_device[0]
    one.coord._eager_backup_previous_token(fb, fb.hisparse_plan)  # issued, not yet waited for
    one.coord.request_finished(one.req)
    assert reserved // PAGE in one.coord.device_allocator.free_pages.tolist()  # freed
    _write(pool, torch.tensor([reserved], device=pool.device), 3.0)  # the next prefill's KV
    _sync(pool.device)
    return float(one.host_copy(token).float().unique().item())


@pytest.mark.parametrize("mode", ["blocking", "pr", "async_finish"])
def test_finish_frees_the_buffer_after_the_backup(mode):
    one = OneRequest.make("cpu", mode)
    assert _finish_during_backup(one) == 1.0
    assert one.coord.device_allocator.available_size() == 256  # prefill and buffer slots


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("mode", ["pr", "async_finish"])
def test_gpu_finish_while_a_backup_is_in_flight_loses_nothing(monkeypatch, mode):
    _delay_backups(monkeypatch, _sleep_cycles_for(0.02))
    assert _finish_during_backup(OneRequest.make("cuda", mode)) == 1.0
    monkeypatch.setattr(HiSparseCoordinator, "wait_for_pending_backup", lambda self: None)
    assert _finish_during_backup(OneRequest.make("cuda", mode)) == 3.0  # the variant: caught


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("mode", ["pr", "async_finish"])
def test_gpu_finishing_step_blocks_with_the_pr_not_with_async_finish(mode):
    """The PR's residual stall: a finish reads the buffer back behind the forward in flight."""
    delay = 0.05
    cycles = _sleep_cycles_for(delay)
    one = OneRequest.make("cuda", mode)
    fb = one.plan_step()
    one.coord.begin_decode_step(fb)
    _write(one.coord.device_pool, fb.out_cache_loc, 1.0, cycles)  # the forward in flight
    start = time.perf_counter()
    # async_finish: any synchronizing call raises here, naming its line
    torch.cuda.set_sync_debug_mode("error" if mode == "async_finish" else "default")
    try:
        one.coord.request_finished(one.req)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    blocked = time.perf_counter() - start
    torch.cuda.synchronize()
    assert (blocked > 0.6 * delay) if mode == "pr" else (blocked < 0.1 * delay), blocked
