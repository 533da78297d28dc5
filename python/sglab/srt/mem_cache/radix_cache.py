"""Radix prefix cache over token ids; values are CPU int64 KV slot tensors.

With page_size > 1 the tree only holds page-aligned keys: a request's unaligned tail page stays
owned by the request and is freed with it. All state is on the host.
"""

from __future__ import annotations

import heapq
import itertools
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from sglab.srt.mem_cache.memory_pool import ReqToTokenPool, TokenToKVPoolAllocator

# A logical clock: strictly increasing, so LRU order never ties.
_access_clock = itertools.count()
_node_ids = itertools.count()


def _empty_indices() -> torch.Tensor:
    return torch.empty((0,), dtype=torch.int64)


class TreeNode:
    def __init__(self):
        self.children: dict[Any, TreeNode] = {}
        self.parent: TreeNode | None = None
        self.key: list[int] = []
        self.value: torch.Tensor = _empty_indices()
        self.lock_ref = 0
        self.last_access_time = next(_access_clock)
        self.hit_count = 0
        self.id = next(_node_ids)
        # Hybrid models (MambaRadixCache): the state slot after this node's path (None: a
        # tombstone, whose path has no state to resume from), locked by requests using it.
        self.mamba_value: torch.Tensor | None = None
        self.mamba_lock_ref = 0

    def touch(self) -> None:
        self.last_access_time = next(_access_clock)

    def __lt__(self, other: TreeNode) -> bool:
        return self.last_access_time < other.last_access_time


@dataclass
class MatchResult:
    device_indices: torch.Tensor  # CPU int64 slots of the matched prefix
    last_device_node: TreeNode
    # Hybrid models (MambaRadixCache): where a longer cached path without a state ends, aligned.
    mamba_branching_seqlen: int | None = None


def _key_match_token(key0: list[int], key1: list[int]) -> int:
    n = min(len(key0), len(key1))
    if key0[:n] == key1[:n]:
        return n
    i = 0
    while key0[i] == key1[i]:
        i += 1
    return i


def _key_match_paged(key0: list[int], key1: list[int], page_size: int) -> int:
    n = min(len(key0), len(key1)) // page_size * page_size
    if key0[:n] == key1[:n]:
        return n
    i = 0
    while key0[i : i + page_size] == key1[i : i + page_size]:
        i += page_size
    return i


class RadixCache:
    def __init__(
        self,
        req_to_token_pool: ReqToTokenPool,
        token_to_kv_pool_allocator: TokenToKVPoolAllocator,
        page_size: int,
        disable: bool = False,
    ):
        self.req_to_token_pool = req_to_token_pool
        self.token_to_kv_pool_allocator = token_to_kv_pool_allocator
        self.page_size = page_size
        self.disable = disable
        if page_size == 1:
            self.key_match_fn = _key_match_token
            self.get_child_key_fn = lambda key: key[0]
        else:
            self.key_match_fn = lambda k0, k1: _key_match_paged(k0, k1, page_size)
            self.get_child_key_fn = lambda key: tuple(key[:page_size])
        self.reset()

    def reset(self) -> None:
        self.root_node = TreeNode()
        self.root_node.lock_ref = 1
        self.evictable_size_ = 0
        self.protected_size_ = 0

    # ---- lookup and insertion ----

    def match_prefix(self, key: list[int]) -> MatchResult:
        """Longest cached (page-aligned) prefix of `key`; splits a node to end exactly there."""
        key = key[: len(key) // self.page_size * self.page_size]
        if self.disable or len(key) == 0:
            return MatchResult(_empty_indices(), self.root_node)
        values, last_node = self._match_prefix_helper(self.root_node, key)
        value = torch.cat(values) if values else _empty_indices()
        return MatchResult(value, last_node)

    def insert(self, key: list[int], value: torch.Tensor | None = None) -> int:
        """Adds key -> value; returns how many leading tokens of key were already cached."""
        if self.disable:
            return 0
        assert len(key) % self.page_size == 0, "radix keys are page-aligned"
        if value is None:
            value = torch.tensor(key, dtype=torch.int64)
        assert len(value) == len(key)
        return self._insert_helper(self.root_node, key, value)

    def _match_prefix_helper(
        self, node: TreeNode, key: list[int]
    ) -> tuple[list[torch.Tensor], TreeNode]:
        node.touch()
        values = []
        while len(key) > 0:
            child = node.children.get(self.get_child_key_fn(key))
            if child is None:
                break
            child.touch()
            prefix_len = self.key_match_fn(child.key, key)
            if prefix_len < len(child.key):
                node = self._split_node(child, prefix_len)
                values.append(node.value)
                break
            values.append(child.value)
            node = child
            key = key[prefix_len:]
        return values, node

    def _split_node(self, child: TreeNode, split_len: int) -> TreeNode:
        # parent -> new_node (child.key[:split_len]) -> child (the rest)
        new_node = TreeNode()
        new_node.parent = child.parent
        new_node.lock_ref = child.lock_ref
        new_node.key = child.key[:split_len]
        new_node.value = child.value[:split_len]
        new_node.children = {self.get_child_key_fn(child.key[split_len:]): child}
        child.parent = new_node
        child.key = child.key[split_len:]
        child.value = child.value[split_len:]
        new_node.parent.children[self.get_child_key_fn(new_node.key)] = new_node
        return new_node

    def _insert_helper(self, node: TreeNode, key: list[int], value: torch.Tensor) -> int:
        return self._insert_nodes(node, key, value)[0]

    def _insert_nodes(self, node: TreeNode, key: list[int],
                      value: torch.Tensor) -> tuple[int, TreeNode]:
        """Insert below `node`; (how many leading tokens were already cached, the node that
        ends at the key's end)."""
        node.touch()
        total_prefix_len = 0
        while len(key) > 0:
            child = node.children.get(self.get_child_key_fn(key))
            if child is None:
                break
            child.touch()
            prefix_len = self.key_match_fn(child.key, key)
            total_prefix_len += prefix_len
            key = key[prefix_len:]
            value = value[prefix_len:]
            node = self._split_node(child, prefix_len) if prefix_len < len(child.key) else child
        if len(key) > 0:
            new_node = TreeNode()
            new_node.parent = node
            new_node.key = list(key)
            new_node.value = value.clone()
            node.children[self.get_child_key_fn(key)] = new_node
            self.evictable_size_ += len(key)
            node = new_node
        return total_prefix_len, node

    # ---- request hooks ----

    def cache_finished_req(self, req, num_kv_tokens: int | None = None) -> None:
        """Hands a finished request's KV to the tree (page-aligned part) and frees the rest.

        `num_kv_tokens`: how many leading positions of its row hold KV; by default all but the
        last generated token, which was never fed back.
        """
        if num_kv_tokens is None:
            num_kv_tokens = len(req.origin_input_ids) + max(len(req.output_ids) - 1, 0)
        kv_indices = self._row_indices(req.req_pool_idx, num_kv_tokens)
        allocator = self.token_to_kv_pool_allocator
        if self.disable:
            allocator.free(kv_indices)
            self.req_to_token_pool.free(req.req_pool_idx)
            return

        token_ids = (req.origin_input_ids + req.output_ids)[:num_kv_tokens]
        aligned_len = num_kv_tokens // self.page_size * self.page_size
        protected_len = self._cache_protected_len(req)
        new_prefix_len = self.insert(token_ids[:aligned_len], kv_indices[:aligned_len])
        # [protected_len, new_prefix_len) duplicates what the tree already holds.
        allocator.free(kv_indices[protected_len:new_prefix_len])
        allocator.free(kv_indices[aligned_len:])
        self.req_to_token_pool.free(req.req_pool_idx)
        self.dec_lock_ref(req.last_node)

    def cache_unfinished_req(self, req) -> None:
        """After a prefill chunk: caches fill_ids' page-aligned part and re-points the row at it."""
        kv_indices = self._row_indices(req.req_pool_idx, len(req.fill_ids))
        if self.disable:
            req.prefix_indices = kv_indices
            return

        aligned_len = len(kv_indices) // self.page_size * self.page_size
        aligned_token_ids = req.fill_ids[:aligned_len]
        protected_len = self._cache_protected_len(req)
        new_prefix_len = self.insert(aligned_token_ids, kv_indices[:aligned_len])
        self.token_to_kv_pool_allocator.free(kv_indices[protected_len:new_prefix_len])

        match = self.match_prefix(aligned_token_ids)
        new_indices, new_last_node = match.device_indices, match.last_device_node
        assert len(new_indices) == aligned_len, (len(new_indices), aligned_len)
        self.req_to_token_pool.write(
            req.req_pool_idx, protected_len, new_indices[protected_len:], sync_device=True
        )
        self.dec_lock_ref(req.last_node)
        self.inc_lock_ref(new_last_node)
        req.prefix_indices = torch.cat([new_indices, kv_indices[aligned_len:]])
        req.last_node = new_last_node

    def _row_indices(self, row: int, length: int) -> torch.Tensor:
        return self.req_to_token_pool.req_to_token_cpu[row, :length].to(torch.int64)

    def _cache_protected_len(self, req) -> int:
        # The tree-owned part of prefix_indices: a match result is page-aligned, and
        # cache_unfinished_req appends less than a page of the request's own slots to it.
        return len(req.prefix_indices) // self.page_size * self.page_size

    # ---- eviction and locking ----

    def evict(self, num_tokens: int) -> None:
        """Frees at least num_tokens slots (if possible), least recently used unlocked leaves first."""
        if self.disable:
            return
        leaves = self._collect_evictable_leaves()
        heapq.heapify(leaves)
        num_evicted = 0
        while num_evicted < num_tokens and leaves:
            x = heapq.heappop(leaves)
            self.token_to_kv_pool_allocator.free(x.value)
            num_evicted += len(x.value)
            self._delete_leaf(x)
            parent = x.parent
            if parent is not self.root_node and not parent.children and parent.lock_ref == 0:
                heapq.heappush(leaves, parent)

    def inc_lock_ref(self, node: TreeNode) -> int:
        if self.disable:
            return 0
        delta = 0
        while node is not self.root_node:
            if node.lock_ref == 0:
                self.evictable_size_ -= len(node.value)
                self.protected_size_ += len(node.value)
                delta -= len(node.value)
            node.lock_ref += 1
            node = node.parent
        return delta

    def dec_lock_ref(self, node: TreeNode) -> int:
        if self.disable:
            return 0
        delta = 0
        while node is not self.root_node:
            assert node.lock_ref > 0, "dec_lock_ref on an unlocked node"
            if node.lock_ref == 1:
                self.evictable_size_ += len(node.value)
                self.protected_size_ -= len(node.value)
                delta += len(node.value)
            node.lock_ref -= 1
            node = node.parent
        return delta

    def _collect_evictable_leaves(self) -> list[TreeNode]:
        leaves = []
        stack = list(self.root_node.children.values())
        while stack:
            node = stack.pop()
            if node.children:
                stack.extend(node.children.values())
            elif node.lock_ref == 0:
                leaves.append(node)
        return leaves

    def _delete_leaf(self, node: TreeNode) -> None:
        del node.parent.children[self.get_child_key_fn(node.key)]
        self.evictable_size_ -= len(node.key)

    # ---- sizes and introspection ----

    def evictable_size(self) -> int:
        return self.evictable_size_

    def state_slot_budget(self) -> tuple[int, int] | None:
        """Hybrid models: (state slots a prefill may take, slots per new request); None here."""
        return None

    def protected_size(self) -> int:
        return self.protected_size_

    def total_size(self) -> int:
        return sum(len(node.value) for node in self._all_nodes())

    def all_values_flatten(self) -> torch.Tensor:
        values = [node.value for node in self._all_nodes()]
        return torch.cat(values) if values else _empty_indices()

    def _all_nodes(self) -> list[TreeNode]:
        nodes, stack = [], list(self.root_node.children.values())
        while stack:
            node = stack.pop()
            nodes.append(node)
            stack.extend(node.children.values())
        return nodes

    def pretty_print(self) -> None:
        self._print_helper(self.root_node, 0)
        print(f"#tokens: {self.total_size()}")

    def _print_helper(self, node: TreeNode, indent: int) -> None:
        for child in node.children.values():
            print(" " * indent, len(child.key), child.key[:10], f"r={child.lock_ref}")
            self._print_helper(child, indent + 2)


def create_prefix_cache(server_args, req_to_token_pool: ReqToTokenPool,
                        token_to_kv_pool_allocator: TokenToKVPoolAllocator) -> RadixCache:
    """The prefix cache of a pool: a MambaRadixCache for hybrid models (their request rows own
    state slots), else a RadixCache; disabled by --disable-radix-cache."""
    disable, page = server_args.disable_radix_cache, server_args.page_size
    if hasattr(req_to_token_pool, "mamba_pool"):
        from sglab.srt.mem_cache.mamba_radix_cache import MambaRadixCache

        return MambaRadixCache(req_to_token_pool, token_to_kv_pool_allocator, page, disable,
                               server_args.enable_mamba_extra_buffer())
    return RadixCache(req_to_token_pool, token_to_kv_pool_allocator, page, disable=disable)
