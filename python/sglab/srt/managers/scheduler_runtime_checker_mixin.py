"""The scheduler's idle-time work: throughput bookkeeping and the integrity check of its pools
and prefix cache."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from sglab.srt.managers.scheduler import Scheduler


class SchedulerRuntimeCheckerMixin:
    def on_idle(self: Scheduler) -> None:
        now = time.perf_counter()
        if now - self.last_decode_stats_tic > 1 and self.num_generated_tokens:
            self.update_gen_throughput(now)
        if self.server_args.enable_integrity_check:
            problem = self.check_integrity()
            if problem:
                raise AssertionError(problem)

    def check_integrity(self: Scheduler) -> str | None:
        """When idle: every KV slot is free or held by the tree, and every pool row is free."""
        if not self.is_idle():
            return None
        free = self.token_to_kv_pool_allocator.available_size()
        tree = self.tree_cache.evictable_size() + self.tree_cache.protected_size()
        if free + tree != self.max_total_num_tokens:
            return (f"KV slots leaked: free {free} + cached {tree} != "
                    f"{self.max_total_num_tokens}")
        if self.tree_cache.protected_size() != 0:
            return f"{self.tree_cache.protected_size()} cached tokens still locked while idle"
        rows = self.req_to_token_pool.available_size()
        if rows != self.req_to_token_pool.size:
            return f"Pool rows leaked: {self.req_to_token_pool.size - rows} in use while idle"
        if self.hisparse is not None:
            problem = self.hisparse.check_integrity()
            if problem:
                return problem
        return self._check_slot_sets() or self._check_state_slots()

    def check_step_invariants(self: Scheduler) -> None:
        """Debug (SGLAB_DEBUG_HISPARSE=1): HiSparse's invariants after every step."""
        if self.hisparse is not None and self.hisparse.debug:
            problem = self.hisparse.check_invariants()
            if problem:
                raise AssertionError(problem)

    def check_tp_agreement(self: Scheduler, next_token_ids_cpu: list[int]) -> None:
        """Debug (--enable-integrity-check, TP): every rank sampled rank 0's tokens this step.
        They run the same schedule from the same all-gathered logits; a rank that drifted
        would schedule differently and hang or corrupt the next collectives."""
        group = self.attn_tp_group  # under DP attention each group samples its own requests
        if group.world_size == 1 or not self.server_args.enable_integrity_check:
            return
        expected = group.broadcast_object(next_token_ids_cpu, src=0)
        if expected != next_token_ids_cpu:
            raise AssertionError(f"TP rank {group.rank} sampled {next_token_ids_cpu}, rank 0 "
                                 f"{expected} (step {self.forward_ct})")

    def _check_slot_sets(self: Scheduler) -> str | None:
        alloc = self.token_to_kv_pool_allocator
        held = self.tree_cache.all_values_flatten()
        if held.numel() and held.unique().numel() != held.numel():
            return "A KV slot is held twice by the radix cache"
        if held.numel() and alloc.page_size == 1:
            free = torch.zeros(alloc.num_pages + 1, dtype=torch.bool)
            free[alloc.free_pages] = True
            if bool(free[held].any()):
                return "A KV slot is both free and held by the radix cache"
        return None

    def _check_state_slots(self: Scheduler) -> str | None:
        """Hybrid models: every Mamba state slot is free or held by one tree node."""
        pool = getattr(self.req_to_token_pool, "mamba_pool", None)
        if pool is None:
            return None
        held = self.tree_cache.all_mamba_values_flatten() if not self.tree_cache.disable \
            else torch.empty((0,), dtype=torch.int64)
        free = pool.available_size()
        if free + held.numel() != pool.size:
            return f"Mamba state slots leaked: free {free} + cached {held.numel()} != {pool.size}"
        if self.tree_cache.mamba_protected_size() != 0:
            return "Mamba states still locked while idle"
        slots = torch.cat([pool.free_slots.cpu(), held.cpu()]).to(torch.int64)
        if slots.unique().numel() != slots.numel() or bool((slots == 0).any()):
            return "A Mamba state slot is held twice (or the padding slot was handed out)"
        return None
