"""Which waiting requests go into the next prefill, within the token budgets."""

from __future__ import annotations

import random
from typing import TYPE_CHECKING, Callable

from sglab.srt.managers.schedule_batch import Req

if TYPE_CHECKING:
    from sglab.srt.mem_cache.radix_cache import RadixCache

# Share of each running request's remaining max_new_tokens that a new prefill must leave free.
NEW_TOKEN_RATIO = 0.4
CLIP_MAX_NEW_TOKENS = 4096
# lpm sorts by prefix match only while the queue is short enough for that to be cheap.
LPM_MAX_QUEUE = 128


# Upstream's cache-aware policies fall back to fcfs without a prefix cache; the others do not.
CACHE_AWARE_POLICIES = ("lpm",)


class SchedulePolicy:
    def __init__(self, policy: str, tree_cache: "RadixCache | None", seed: int = 0):
        no_cache = tree_cache is None or tree_cache.disable
        self.policy = "fcfs" if no_cache and policy in CACHE_AWARE_POLICIES else policy
        self.tree_cache = tree_cache
        self.rng = random.Random(seed)  # random: a reproducible shuffle per --random-seed

    def calc_priority(self, waiting_queue: list[Req],
                      match_prefix: Callable[[Req], bool]) -> bool:
        """Order the queue in place; True when every request's prefix was matched for it.

        lpm matches the whole queue (`match_prefix(req)`, which drops a request whose match
        failed) and sorts it by the cached prefix, while the queue has at most LPM_MAX_QUEUE
        requests; above that, and under fcfs, the order stays and admission matches only the
        requests it considers (upstream's fcfs fallback). random shuffles the queue and lof
        puts the longest max_new_tokens first (upstream's cache-agnostic policies)."""
        if self.policy == "random":
            self.rng.shuffle(waiting_queue)
            return False
        if self.policy == "lof":
            waiting_queue.sort(key=lambda r: -(r.sampling_params.max_new_tokens or 0))
            return False
        if self.policy != "lpm" or len(waiting_queue) > LPM_MAX_QUEUE:
            return False
        for req in list(waiting_queue):
            match_prefix(req)
        waiting_queue.sort(key=lambda r: -len(r.prefix_indices))
        return True


class PrefillAdder:
    """Adds requests to a prefill batch while the total, input and chunk budgets allow."""

    def __init__(self, tree_cache: "RadixCache", running_reqs: list[Req], available_tokens: int,
                 max_prefill_tokens: int, chunked_prefill_size: int, page_size: int,
                 max_new_reqs: int):
        self.tree_cache = tree_cache
        self.page_size = page_size
        reserved = sum(_remaining_new_tokens(r) for r in running_reqs)
        self.rem_total_tokens = available_tokens - reserved
        self.rem_input_tokens = max_prefill_tokens
        self.rem_chunk_tokens = chunked_prefill_size if chunked_prefill_size > 0 else None
        self.max_new_reqs = max_new_reqs
        # Hybrid models: state slots left for new requests, and what each one takes.
        budget = tree_cache.state_slot_budget() if tree_cache is not None else None
        self.rem_state_slots, self.state_slots_per_req = budget or (None, 0)
        self.can_run_list: list[Req] = []
        self.new_chunked_req: Req | None = None

    def add_chunked_req(self, req: Req) -> Req | None:
        """Continue a request whose prompt is being prefilled in chunks; returns it if unfinished.

        The next chunk shrinks to the free memory; with none free it waits for decodes to finish.
        """
        room = self.rem_total_tokens + self._unlocked_evictable()
        room -= room % self.page_size
        if room <= 0:
            return req
        if self.rem_chunk_tokens is None or room < self.rem_chunk_tokens:
            self.rem_chunk_tokens = room
        truncated = self._truncate(req)
        self.can_run_list.append(req)
        self._spend(req.extend_input_len, 0)
        return req if truncated else None

    def has_room(self) -> bool:
        """Whether another request could be added at all, whatever its prefix and length."""
        if len(self.can_run_list) >= self.max_new_reqs:
            return False
        return self.rem_chunk_tokens is None or self.rem_chunk_tokens >= self.page_size

    def add_one_req(self, req: Req) -> bool:
        """Try to add a waiting request (its prefix matched); False means stop adding (budget
        exhausted)."""
        if not self.has_room():
            return False
        future = _remaining_new_tokens(req)
        if req.extend_input_len > self.rem_input_tokens and self.can_run_list:
            return False
        if not self._take_state_slots(req):
            return False
        # Lock first: the prefix it reuses stops being evictable room.
        self.tree_cache.inc_lock_ref(req.last_node)
        if req.extend_input_len + future > self.rem_total_tokens + self._unlocked_evictable():
            self.tree_cache.dec_lock_ref(req.last_node)
            return False
        truncated = self._truncate(req)
        self.can_run_list.append(req)
        self._spend(req.extend_input_len, 0 if truncated else future)
        if truncated:
            self.new_chunked_req = req
            return False
        return True

    def _take_state_slots(self, req: Req) -> bool:
        """A new request of a hybrid model needs its state slots; False when none are left."""
        if self.rem_state_slots is None or req.mamba_pool_idx is not None:
            return True
        if self.rem_state_slots < self.state_slots_per_req:
            return False
        self.rem_state_slots -= self.state_slots_per_req
        return True

    def _truncate(self, req: Req) -> bool:
        """Cut the request's extend to the chunk budget (page aligned); True if it was cut."""
        limit = self.rem_chunk_tokens
        if limit is None or req.extend_input_len <= limit:
            return False
        limit -= limit % self.page_size
        req.extend_input_len = limit
        req.fill_ids = req.fill_ids[: len(req.prefix_indices) + limit]
        req.is_chunked += 1
        return True

    def _spend(self, extend_len: int, future: int) -> None:
        self.rem_total_tokens -= extend_len + future
        self.rem_input_tokens -= extend_len
        if self.rem_chunk_tokens is not None:
            self.rem_chunk_tokens -= extend_len

    def _unlocked_evictable(self) -> int:
        return self.tree_cache.evictable_size() if self.tree_cache is not None else 0


def _remaining_new_tokens(req: Req) -> int:
    """Decode tokens to keep free for a request: a share of what it may still generate."""
    max_new = req.sampling_params.max_new_tokens
    remaining = CLIP_MAX_NEW_TOKENS if max_new is None else max(max_new - len(req.output_ids), 0)
    return int(min(remaining, CLIP_MAX_NEW_TOKENS) * NEW_TOKEN_RATIO)
