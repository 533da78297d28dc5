"""The radix prefix cache of hybrid models: KV per token as in `RadixCache`, plus, on some
nodes, the state slot of the linear layers after that node's path (`node.mamba_value`).

A prefix is only reusable up to a node that holds a state (a request resumes the recurrence
from it), so `match_prefix` stops at the deepest such node; a node without one is a tombstone.
Strategies (upstream's `MambaRadixCache`):
- extra_buffer: a request's track slots hold snapshots taken every `--mamba-track-interval`
  decode tokens (and at chunk boundaries of a prefill); a finished request caches its tokens up
  to its last snapshot (`req.mamba_last_track_seqlen`), giving the snapshot's slot to the node.
- no_buffer: a finished request caches all its tokens and gives its live state slot.
After a prefill the request's prefix is cached with a copy of the state (a forked slot).

State slots are evicted on their own (`evict_mamba`: a node keeps its KV as a tombstone, a leaf
goes) or with their KV (`evict`: least recently used leaves).
"""

from __future__ import annotations

import heapq
from typing import TYPE_CHECKING

import torch

from sglab.srt.mem_cache.radix_cache import MatchResult, RadixCache, TreeNode, _empty_indices
from sglab.srt.server_args import MAMBA_CACHE_CHUNK_SIZE

if TYPE_CHECKING:
    from sglab.srt.mem_cache.memory_pool import HybridReqToTokenPool, TokenToKVPoolAllocator


class MambaRadixCache(RadixCache):
    def __init__(self, req_to_token_pool: "HybridReqToTokenPool",
                 token_to_kv_pool_allocator: "TokenToKVPoolAllocator", page_size: int,
                 disable: bool, enable_mamba_extra_buffer: bool):
        self.enable_mamba_extra_buffer = enable_mamba_extra_buffer
        self.mamba_cache_chunk_size = max(MAMBA_CACHE_CHUNK_SIZE, page_size)
        super().__init__(req_to_token_pool, token_to_kv_pool_allocator, page_size, disable)

    @property
    def mamba_pool(self):
        return self.req_to_token_pool.mamba_pool

    def reset(self) -> None:
        super().reset()
        self.mamba_evictable_size_ = 0
        self.mamba_protected_size_ = 0

    # ---- lookup and insertion ----

    def match_prefix(self, key: list[int]) -> MatchResult:
        """The longest cached prefix that ends at a node holding a state."""
        key = key[: len(key) // self.page_size * self.page_size]
        if self.disable or len(key) == 0:
            return MatchResult(_empty_indices(), self.root_node)
        values, last_node = self._match_prefix_helper(self.root_node, key)
        best_len, best_node, matched = 0, self.root_node, 0
        for node in self._path_to(last_node):
            matched += len(node.value)
            if node.mamba_value is not None:
                best_len, best_node = matched, node
        branching = None
        if matched > best_len:  # a longer cached path without a state: snapshot there next
            aligned = matched // self.mamba_cache_chunk_size * self.mamba_cache_chunk_size
            branching = aligned if aligned > 0 else None
        value = torch.cat(values) if values else _empty_indices()
        return MatchResult(value[:best_len], best_node, branching)

    def _path_to(self, node: TreeNode) -> list[TreeNode]:
        path = []
        while node is not self.root_node:
            path.append(node)
            node = node.parent
        return path[::-1]

    def insert_with_state(self, key: list[int], value: torch.Tensor,
                          mamba_value: torch.Tensor) -> tuple[int, bool]:
        """Cache key -> value with the state after it; (tokens already cached, whether the
        node already had a state, in which case `mamba_value` stays the caller's)."""
        if self.disable or len(key) == 0:
            return 0, True
        assert len(key) % self.page_size == 0 and len(value) == len(key)
        prefix_len, node = self._insert_nodes(self.root_node, key, value)
        if node.mamba_value is not None:
            return prefix_len, True
        node.mamba_value = mamba_value
        self.mamba_evictable_size_ += 1
        return prefix_len, False

    # ---- request hooks ----

    def cache_finished_req(self, req, num_kv_tokens: int | None = None) -> None:
        if num_kv_tokens is None:
            num_kv_tokens = len(req.origin_input_ids) + max(len(req.output_ids) - 1, 0)
        kv_indices = self._row_indices(req.req_pool_idx, num_kv_tokens)
        allocator, pool = self.token_to_kv_pool_allocator, self.req_to_token_pool
        if self.disable:
            allocator.free(kv_indices)
            pool.free_mamba_cache(req)
            pool.free(req.req_pool_idx)
            return
        cache_len, keep, mamba_value = self._finished_state(req, num_kv_tokens)
        protected_len = self._cache_protected_len(req)
        allocator.free(kv_indices[max(cache_len, protected_len):])
        token_ids = (req.origin_input_ids + req.output_ids)[:cache_len]
        new_prefix_len, mamba_exist = self.insert_with_state(token_ids, kv_indices[:cache_len],
                                                             mamba_value)
        allocator.free(kv_indices[protected_len:new_prefix_len])
        if mamba_exist or self.enable_mamba_extra_buffer:
            pool.free_mamba_cache(req, None if mamba_exist else keep)
        else:  # no_buffer: the live slot now belongs to the tree
            req.mamba_pool_idx = None
        pool.free(req.req_pool_idx)
        self.dec_lock_ref(req.last_node)

    def _finished_state(self, req, num_kv_tokens: int) -> tuple[int, int | None, torch.Tensor]:
        """(tokens to cache, the track slot kept, the state slot given to the tree)."""
        if not self.enable_mamba_extra_buffer:
            cache_len = num_kv_tokens // self.page_size * self.page_size
            return cache_len, None, req.mamba_pool_idx.unsqueeze(-1).clone()
        keep = self.req_to_token_pool.get_mamba_ping_pong_other_idx(req.mamba_next_track_idx)
        cache_len = min(req.mamba_last_track_seqlen or 0, num_kv_tokens)
        return cache_len, keep, req.mamba_ping_pong_track_buffer[keep].unsqueeze(-1).clone()

    def cache_unfinished_req(self, req) -> None:
        """After a prefill: cache the prefix up to the state it can resume from (a copy of it),
        and re-point the request's row at the tree's KV."""
        kv_orig = self._row_indices(req.req_pool_idx, len(req.fill_ids))
        cache_len = req.mamba_last_track_seqlen if self.enable_mamba_extra_buffer \
            else len(req.fill_ids) // self.page_size * self.page_size
        forked = None if self.disable or not cache_len else self._fork_state(req)
        protected_len = self._cache_protected_len(req)
        if forked is None:  # nothing new to cache: the row keeps the request's own slots
            req.prefix_indices, req.cache_protected_len = kv_orig, protected_len
            return
        token_ids = req.fill_ids[:cache_len]
        new_prefix_len, mamba_exist = self.insert_with_state(token_ids, kv_orig[:cache_len],
                                                             forked)
        self.token_to_kv_pool_allocator.free(kv_orig[protected_len:new_prefix_len])
        if mamba_exist:
            self.mamba_pool.free(forked)
        match = self.match_prefix(token_ids)
        new_indices, new_last_node = match.device_indices, match.last_device_node
        assert len(new_indices) == cache_len, (len(new_indices), cache_len)
        self.req_to_token_pool.write(req.req_pool_idx, protected_len,
                                     new_indices[protected_len:], sync_device=True)
        self.dec_lock_ref(req.last_node)
        self.inc_lock_ref(new_last_node)
        req.prefix_indices = torch.cat([new_indices, kv_orig[cache_len:]])
        req.cache_protected_len = cache_len
        req.last_node = new_last_node
        req.mamba_last_track_seqlen = None

    def _fork_state(self, req) -> torch.Tensor | None:
        """A copy of the state to cache (the last snapshot, or the live state), in a new slot;
        None when no slot can be freed for it (the prefix is then not cached)."""
        if self.enable_mamba_extra_buffer:
            keep = self.req_to_token_pool.get_mamba_ping_pong_other_idx(req.mamba_next_track_idx)
            src = req.mamba_ping_pong_track_buffer[keep]
        else:
            src = req.mamba_pool_idx
        forked = self.mamba_pool.fork_from(src.unsqueeze(-1))
        if forked is None:
            self.evict_mamba(1)
            forked = self.mamba_pool.fork_from(src.unsqueeze(-1))
        return forked

    def _cache_protected_len(self, req) -> int:
        protected = getattr(req, "cache_protected_len", None)
        return super()._cache_protected_len(req) if protected is None else protected

    # ---- eviction and locking ----

    def _delete_leaf(self, node: TreeNode) -> None:
        super()._delete_leaf(node)
        if node.mamba_value is not None:
            self.mamba_pool.free(node.mamba_value)
            self.mamba_evictable_size_ -= 1
            node.mamba_value = None

    def evict_mamba(self, num_states: int) -> None:
        """Free at least `num_states` state slots (if possible), least recently used first: an
        inner node becomes a tombstone, a leaf goes with its KV."""
        if self.disable or num_states <= 0:
            return
        nodes = [n for n in self._all_nodes()
                 if n.mamba_value is not None and n.mamba_lock_ref == 0
                 and (n.children or n.lock_ref == 0)]
        heapq.heapify(nodes)
        freed = 0
        while freed < num_states and nodes:
            node = heapq.heappop(nodes)
            freed += 1
            if node.children:
                self.mamba_pool.free(node.mamba_value)
                node.mamba_value = None
                self.mamba_evictable_size_ -= 1
            else:
                self._evict_leaf_and_tombstones(node)

    def _evict_leaf_and_tombstones(self, node: TreeNode) -> None:
        """Delete a leaf, then the tombstones left as unlocked leaves above it."""
        while True:
            self.token_to_kv_pool_allocator.free(node.value)
            parent = node.parent
            self._delete_leaf(node)
            if parent is self.root_node or parent.children or parent.lock_ref \
                    or parent.mamba_value is not None:
                return
            node = parent

    def inc_lock_ref(self, node: TreeNode) -> int:
        if not self.disable and node.mamba_value is not None:
            if node.mamba_lock_ref == 0:
                self.mamba_evictable_size_ -= 1
                self.mamba_protected_size_ += 1
            node.mamba_lock_ref += 1
        return super().inc_lock_ref(node)

    def dec_lock_ref(self, node: TreeNode) -> int:
        if not self.disable and node.mamba_value is not None:
            assert node.mamba_lock_ref > 0, "dec_lock_ref on an unlocked state"
            if node.mamba_lock_ref == 1:
                self.mamba_evictable_size_ += 1
                self.mamba_protected_size_ -= 1
            node.mamba_lock_ref -= 1
        return super().dec_lock_ref(node)

    # ---- sizes and introspection ----

    def mamba_evictable_size(self) -> int:
        return self.mamba_evictable_size_

    def mamba_protected_size(self) -> int:
        return self.mamba_protected_size_

    def all_mamba_values_flatten(self) -> torch.Tensor:
        values = [n.mamba_value for n in self._all_nodes() if n.mamba_value is not None]
        return torch.cat(values) if values else torch.empty((0,), dtype=torch.int64)

    def state_slot_budget(self) -> tuple[int, int]:
        """(state slots a prefill may take: free or evictable, the slots a new request takes)."""
        room = self.mamba_pool.available_size() + self.mamba_evictable_size()
        return room, self.req_to_token_pool.mamba_slots_per_req

