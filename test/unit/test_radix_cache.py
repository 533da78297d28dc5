from __future__ import annotations

import random
from dataclasses import dataclass, field

import pytest
import torch
from sglab.srt.mem_cache.memory_pool import (
    MHATokenToKVPool,
    PagedTokenToKVPoolAllocator,
    ReqToTokenPool,
    TokenToKVPoolAllocator,
)
from sglab.srt.mem_cache.radix_cache import RadixCache, TreeNode


@dataclass
class FakeReq:
    origin_input_ids: list[int]
    output_ids: list[int] = field(default_factory=list)
    fill_ids: list[int] = field(default_factory=list)
    req_pool_idx: int = -1
    prefix_indices: torch.Tensor = field(default_factory=lambda: torch.empty(0, dtype=torch.int64))
    last_node: TreeNode | None = None
    num_kv_tokens: int = 0  # test bookkeeping: positions of the row that hold a slot


class Env:
    """A miniature scheduler around one radix cache, with host-only bookkeeping for checks."""

    def __init__(self, num_tokens: int, page_size: int, disable: bool = False, num_rows: int = 8):
        self.page_size = page_size
        self.req_to_token_pool = ReqToTokenPool(num_rows, 256, device="cpu")
        kvcache = MHATokenToKVPool(num_tokens, page_size, torch.float32, 1, 2, 1, device="cpu")
        cls = TokenToKVPoolAllocator if page_size == 1 else PagedTokenToKVPoolAllocator
        self.allocator = cls(num_tokens, kvcache)
        self.allocator.debug_mode = True
        self.tree = RadixCache(self.req_to_token_pool, self.allocator, page_size, disable=disable)
        self.live: list[FakeReq] = []
        # slot -> the token sequence whose last position it holds: the "KV content" oracle.
        self.slot_content: dict[int, tuple[int, ...]] = {}
        # Replays the host writes the way the worker does; must equal the host mirror.
        self.req_to_token_device = torch.zeros_like(self.req_to_token_pool.req_to_token_cpu)

    def row(self, req: FakeReq) -> list[int]:
        return self.req_to_token_pool.req_to_token_cpu[
            req.req_pool_idx, : req.num_kv_tokens
        ].tolist()

    def admit(self, input_ids: list[int]) -> FakeReq:
        req = FakeReq(list(input_ids))
        match = self.tree.match_prefix(input_ids[:-1])
        req.prefix_indices, req.last_node = match.device_indices, match.last_device_node
        self.tree.inc_lock_ref(req.last_node)
        req.req_pool_idx = self.req_to_token_pool.alloc(1)[0]
        self.req_to_token_pool.write(req.req_pool_idx, 0, req.prefix_indices)
        req.num_kv_tokens = len(req.prefix_indices)
        self.live.append(req)
        return req

    def alloc_or_evict(self, alloc_fn, num_tokens: int) -> torch.Tensor:
        out = alloc_fn()
        if out is None:
            self.tree.evict(num_tokens + self.page_size * 8)
            out = alloc_fn()
        assert out is not None, "out of KV memory: a leak"
        return out

    def extend(self, reqs: list[FakeReq], seq_lens: list[int]) -> None:
        """Allocates and "computes" KV for positions [num_kv_tokens, seq_len) of each request."""
        prefix_lens = [r.num_kv_tokens for r in reqs]
        last_loc = [self.row(r)[-1] if r.num_kv_tokens else -1 for r in reqs]
        num = sum(s - p for s, p in zip(seq_lens, prefix_lens))
        out = self.alloc_or_evict(
            lambda: self.allocator.alloc_extend(prefix_lens, seq_lens, last_loc, num), num
        )
        start = 0
        for req, pre, seq in zip(reqs, prefix_lens, seq_lens):
            slots = out[start : start + seq - pre]
            start += seq - pre
            self.req_to_token_pool.write(req.req_pool_idx, pre, slots, sync_device=False)
            self.req_to_token_device[req.req_pool_idx, pre:seq] = slots.to(torch.int32)
            tokens = req.origin_input_ids + req.output_ids
            for pos, slot in zip(range(pre, seq), slots.tolist()):
                self.slot_content[slot] = tuple(tokens[: pos + 1])
            req.num_kv_tokens = seq

    def prefill_chunk(self, req: FakeReq, chunk: int, first_token: int = 0) -> bool:
        """Runs one prefill chunk; returns True (and samples a token) when the prompt is done."""
        end = min(len(req.origin_input_ids), req.num_kv_tokens + chunk)
        self.extend([req], [end])
        req.fill_ids = req.origin_input_ids[:end]
        if end < len(req.origin_input_ids):
            self.tree.cache_unfinished_req(req)
            assert len(req.prefix_indices) == end
            assert req.prefix_indices.tolist() == self.row(req)
            return False
        req.output_ids.append(first_token)
        return True

    def decode(self, reqs: list[FakeReq], rng: random.Random) -> None:
        """Feeds each request's last sampled token, then samples the next one."""
        seq_lens = [r.num_kv_tokens + 1 for r in reqs]
        last_loc = [self.row(r)[-1] for r in reqs]
        out = self.alloc_or_evict(
            lambda: self.allocator.alloc_decode(seq_lens, last_loc), len(reqs)
        )
        for req, slot in zip(reqs, out.tolist()):
            pos = req.num_kv_tokens
            self.req_to_token_pool.write(
                req.req_pool_idx, pos, torch.tensor([slot]), sync_device=False
            )
            self.req_to_token_device[req.req_pool_idx, pos] = slot
            self.slot_content[slot] = tuple((req.origin_input_ids + req.output_ids)[: pos + 1])
            req.num_kv_tokens += 1
            req.output_ids.append(rng.randrange(50))

    def finish(self, req: FakeReq) -> None:
        # The last sampled token was never fed back: it has no KV.
        assert req.num_kv_tokens == len(req.origin_input_ids) + len(req.output_ids) - 1
        self.tree.cache_finished_req(req)
        self.live.remove(req)

    def apply_pending_writes(self) -> None:
        popped = self.req_to_token_pool.pop_pending_writes()
        if popped is not None:
            self.req_to_token_device.view(-1)[popped[0]] = popped[1]

    def check(self) -> None:
        """No leak, no double ownership, rows hold the right KV, device copy follows the host."""
        self.apply_pending_writes()  # as the worker does before the next forward
        ps = self.page_size
        free = self.allocator.free_pages.tolist()
        free_pages = set(free)
        assert len(free_pages) == len(free), "page twice in the free list"
        tree_slots = self.tree.all_values_flatten().tolist()
        assert len(set(tree_slots)) == len(tree_slots), "slot twice in the tree"
        tree_pages = {s // ps for s in tree_slots}
        assert len(tree_slots) == len(tree_pages) * ps, "tree holds a partial page"
        req_pages: set[int] = set()
        for req in self.live:
            row = self.row(req)
            tokens = req.origin_input_ids + req.output_ids
            for pos, slot in enumerate(row):
                assert self.slot_content[slot] == tuple(tokens[: pos + 1]), "row points at wrong KV"
            own = {s // ps for s in row} - tree_pages
            assert not own & req_pages, "two requests own one page"
            req_pages |= own
            device_row = self.req_to_token_device[req.req_pool_idx, : req.num_kv_tokens]
            assert device_row.tolist() == row, "device copy diverged from the host mirror"
        assert not free_pages & (tree_pages | req_pages), "a free page is in use"
        assert 0 not in free_pages | tree_pages | req_pages
        assert len(free_pages) + len(tree_pages) + len(req_pages) == self.allocator.num_pages
        assert self.tree.evictable_size() + self.tree.protected_size() == self.tree.total_size()


def tree_with(page_size: int = 1, num_tokens: int = 256) -> RadixCache:
    return Env(num_tokens, page_size).tree


# ---- match / insert / split ----


def test_insert_and_match_split():
    tree = tree_with()
    v = torch.arange(100, 105)
    assert tree.insert([1, 2, 3, 4, 5], v) == 0
    m = tree.match_prefix([1, 2, 3, 9])
    assert m.device_indices.tolist() == [100, 101, 102]
    assert m.last_device_node.key == [1, 2, 3]  # split at the match end
    assert [c.key for c in m.last_device_node.children.values()] == [[4, 5]]
    assert tree.insert([1, 2, 3, 9, 9], torch.arange(200, 205)) == 3
    assert tree.match_prefix([1, 2, 3, 9, 9, 9]).device_indices.tolist() == [
        100,
        101,
        102,
        203,
        204,
    ]
    assert tree.match_prefix([1, 2, 3, 4, 5, 6]).device_indices.tolist() == list(range(100, 105))
    assert tree.match_prefix([7]).device_indices.numel() == 0
    assert tree.match_prefix([]).last_device_node is tree.root_node
    assert tree.total_size() == 7 == tree.evictable_size()
    assert sorted(tree.all_values_flatten().tolist()) == [100, 101, 102, 103, 104, 203, 204]
    assert tree.insert([1, 2], torch.arange(2)) == 2  # fully cached: nothing new stored
    assert tree.total_size() == 7


def test_insert_default_value_is_the_key():
    tree = tree_with()
    tree.insert([5, 6, 7])
    assert tree.match_prefix([5, 6]).device_indices.tolist() == [5, 6]


def test_page_aligned_match_and_insert():
    tree = tree_with(page_size=4)
    key = list(range(10, 22))  # 3 pages
    assert tree.insert(key, torch.arange(12) + 40) == 0
    assert tree.match_prefix(key[:7]).device_indices.tolist() == list(range(40, 44))
    # A mismatch inside the second page leaves only the first page matched.
    other = key[:5] + [99] + key[6:]
    m = tree.match_prefix(other)
    assert m.device_indices.tolist() == list(range(40, 44))
    assert m.last_device_node.key == key[:4]
    assert tree.insert(other, torch.arange(12) + 80) == 4
    assert tree.match_prefix(other).device_indices.tolist() == list(range(40, 44)) + list(
        range(84, 92)
    )
    with pytest.raises(AssertionError):
        tree.insert([1, 2, 3], torch.arange(3))


# ---- locks and eviction ----


def test_lock_ref_accounting_and_eviction_frees_everything():
    env = Env(64, 1)
    tree = env.tree
    slots = env.allocator.alloc(6)
    tree.insert([1, 2, 3, 4], slots[:4])
    tree.insert([1, 2, 7, 8], torch.cat([slots[:2], slots[4:6]]))  # [1, 2] already cached
    assert tree.total_size() == 6
    node = tree.match_prefix([1, 2, 3, 4]).last_device_node
    assert tree.inc_lock_ref(node) == -4
    assert tree.inc_lock_ref(node) == 0
    assert (tree.evictable_size(), tree.protected_size()) == (2, 4)
    available = env.allocator.available_size()
    tree.evict(100)  # only the unlocked [7, 8] leaf can go
    assert env.allocator.available_size() == available + 2
    assert tree.match_prefix([1, 2, 7, 8]).device_indices.tolist() == slots[:2].tolist()
    assert tree.match_prefix([1, 2, 3, 4]).device_indices.tolist() == slots[:4].tolist()
    assert tree.dec_lock_ref(node) == 0
    assert tree.dec_lock_ref(node) == 4
    tree.evict(100)
    assert tree.total_size() == tree.evictable_size() == tree.protected_size() == 0
    assert env.allocator.available_size() == 64


def test_evict_is_lru_and_cascades_to_parents():
    env = Env(64, 1)
    tree = env.tree
    for key in [[1, 1], [2, 2], [3, 3]]:
        tree.insert(key, env.allocator.alloc(2))
    tree.match_prefix([1, 1])  # [1, 1] is now the most recently used
    tree.evict(2)
    assert tree.match_prefix([2, 2]).device_indices.numel() == 0
    assert tree.match_prefix([3, 3]).device_indices.numel() == 2
    tree.evict(1)  # [3, 3] was touched after [1, 1] by the match above
    assert tree.match_prefix([1, 1]).device_indices.numel() == 0
    assert env.allocator.available_size() == 64 - 2

    # A parent whose children are all evicted becomes an eviction candidate itself.
    tree.reset()
    env.allocator.clear()
    tree.insert([5, 6, 7], env.allocator.alloc(3))
    tree.insert(
        [5, 6, 8], torch.cat([tree.match_prefix([5, 6]).device_indices, env.allocator.alloc(1)])
    )
    tree.evict(4)
    assert tree.total_size() == 0 and env.allocator.available_size() == 64


def test_evict_stops_when_enough():
    env = Env(64, 4)
    tree = env.tree
    for first in range(3):
        tree.insert([first] * 8, env.allocator.alloc(8))
    tree.evict(5)  # leaves are whole: evicting one 8-token leaf is enough
    assert tree.total_size() == 16
    assert env.allocator.available_size() == 64 - 16


# ---- request hooks ----


def test_cache_finished_req_shares_prefix_and_frees_duplicates():
    env = Env(128, 1)
    rng = random.Random(0)
    a = env.admit([1, 2, 3, 4, 5, 6])
    b = env.admit([1, 2, 3, 4, 5, 6])  # same prompt, admitted before a is cached
    env.extend([a, b], [6, 6])
    a.output_ids.append(7)
    b.output_ids.append(7)
    env.decode([a, b], rng)
    env.check()
    env.finish(a)
    env.check()
    assert env.tree.total_size() == 7
    env.finish(b)  # b's first 6 positions duplicate a's and are freed
    env.check()
    c = env.admit([1, 2, 3, 4, 5, 6, 9])
    assert len(c.prefix_indices) == 6
    assert (
        c.prefix_indices.tolist()
        == env.tree.match_prefix([1, 2, 3, 4, 5, 6]).device_indices.tolist()
    )
    env.extend([c], [7])
    c.output_ids.append(7)
    env.check()
    env.finish(c)
    env.check()
    env.tree.evict(10**6)
    assert env.allocator.available_size() == 128
    assert env.req_to_token_pool.available_size() == 8


@pytest.mark.parametrize("page_size", [4, 16])
def test_cache_finished_req_paged_frees_unaligned_tail(page_size):
    env = Env(16 * page_size, page_size)
    prompt = list(range(2 * page_size + 3))
    a = env.admit(prompt)
    env.extend([a], [len(prompt)])
    a.output_ids.append(7)
    env.finish(a)  # len(prompt) tokens with KV: two full pages cached, the tail page freed
    env.check()
    assert env.tree.total_size() == 2 * page_size
    assert env.allocator.available_size() == 14 * page_size
    b = env.admit(prompt + [1])
    assert len(b.prefix_indices) == 2 * page_size
    env.extend([b], [len(prompt) + 1])
    b.output_ids.append(7)
    env.check()
    env.finish(b)
    env.check()
    assert env.tree.total_size() == (len(prompt) + 1) // page_size * page_size


@pytest.mark.parametrize("page_size", [1, 4])
def test_cache_unfinished_req_chunked_prefill(page_size):
    env = Env(64, page_size)
    prompt = list(range(100, 114))
    a = env.admit(prompt)
    assert not env.prefill_chunk(a, 6)
    env.check()
    assert env.tree.total_size() == 6 // page_size * page_size
    assert env.tree.protected_size() == env.tree.total_size()  # a's chunk is locked
    env.tree.evict(10**6)
    assert env.tree.total_size() == 6 // page_size * page_size
    assert env.prefill_chunk(a, 6) is False
    env.check()
    assert env.prefill_chunk(a, 6) is True
    env.check()
    env.finish(a)
    env.check()
    assert env.tree.protected_size() == 0


def test_cache_unfinished_req_repoints_row_at_tree_duplicates():
    """Another request cached the same tokens meanwhile: the chunked request drops its own copy
    (including the earlier tail-page positions) and its row, host and device, follows the tree."""
    ps = 4
    env = Env(64, ps)
    prompt = list(range(200, 214))
    a = env.admit(prompt)
    env.prefill_chunk(a, 6)  # tree: positions 0..3; a owns a partial page for 4..5
    env.apply_pending_writes()
    b = env.admit(prompt)
    assert len(b.prefix_indices) == 4
    env.extend([b], [14])
    b.output_ids.append(7)
    env.finish(b)  # 14 tokens with KV: the tree now holds b's first 3 pages (12 tokens)
    env.check()
    a_pages_before = {s // ps for s in env.row(a)}
    available = env.allocator.available_size()
    env.prefill_chunk(a, 4)  # fills 6..9; positions 4..7 are duplicates of b's page
    row = env.row(a)
    assert row[:8] == env.tree.match_prefix(prompt[:8]).device_indices.tolist()
    assert (row[4] // ps) not in a_pages_before
    # a took a page for its new tail 8..9 and gave back its duplicate page for 4..7.
    assert env.allocator.available_size() == available
    assert (row[8] // ps) not in a_pages_before and row[8] // ps != row[4] // ps
    device_row = env.req_to_token_device[a.req_pool_idx, :10].tolist()
    assert device_row[4:8] != row[4:8]  # only the queued writes carry the re-pointing
    env.apply_pending_writes()
    assert env.req_to_token_device[a.req_pool_idx, :10].tolist() == row
    env.check()
    assert env.prefill_chunk(a, 8)
    env.apply_pending_writes()
    env.check()
    env.finish(a)
    env.check()


def test_disabled_cache_frees_everything():
    env = Env(64, 4, disable=True)
    tree = env.tree
    assert tree.insert([1, 2, 3, 4], torch.arange(4)) == 0
    assert tree.match_prefix([1, 2, 3, 4]).device_indices.numel() == 0
    assert tree.total_size() == 0
    rng = random.Random(0)
    a = env.admit(list(range(11)))
    assert env.prefill_chunk(a, 5) is False
    assert len(a.prefix_indices) == 5 and a.prefix_indices.tolist() == env.row(a)
    assert env.prefill_chunk(a, 5) is False
    assert env.prefill_chunk(a, 5) is True
    env.decode([a], rng)
    env.check()
    assert env.allocator.available_size() == 64 - 3 * 4
    tree.evict(100)
    assert env.allocator.available_size() == 64 - 3 * 4
    env.finish(a)
    assert env.allocator.available_size() == 64
    assert env.req_to_token_pool.available_size() == 8
    assert tree.total_size() == 0


# ---- randomized: a small scheduler over shared prefixes ----


@pytest.mark.parametrize("page_size,seed", [(1, 0), (1, 1), (4, 0), (4, 1), (16, 2)])
def test_random_requests_keep_accounting(page_size, seed):
    rng = random.Random(seed)
    bases = [[rng.randrange(50) for _ in range(40)] for _ in range(3)]
    max_live, max_len = 4, 40 + 8 + 8
    pages_per_req = -(-max_len // page_size) + 1
    env = Env(max_live * pages_per_req * page_size, page_size, num_rows=max_live)
    prefilling: dict[int, int] = {}  # id(req) -> chunk size
    budget: dict[int, int] = {}  # id(req) -> max new tokens

    for _ in range(250):
        if len(env.live) < max_live and rng.random() < 0.5:
            base = rng.choice(bases)
            prompt = base[: rng.randint(1, 40)] + [
                rng.randrange(50) for _ in range(rng.randint(1, 8))
            ]
            req = env.admit(prompt)
            prefilling[id(req)] = rng.randint(1, 20)
            budget[id(req)] = rng.randint(1, 8)
        for req in [r for r in env.live if id(r) in prefilling]:
            if env.prefill_chunk(req, prefilling[id(req)], first_token=rng.randrange(50)):
                del prefilling[id(req)]
        decoding = [r for r in env.live if id(r) not in prefilling]
        for req in decoding:
            if len(req.output_ids) >= budget[id(req)]:
                env.finish(req)
        decoding = [r for r in env.live if id(r) not in prefilling]
        if decoding:
            env.decode(decoding, rng)
        if rng.random() < 0.1:
            env.tree.evict(rng.randint(1, 64))
        env.apply_pending_writes()
        env.check()

    for req in list(env.live):
        if id(req) in prefilling:
            while not env.prefill_chunk(req, 20):
                pass
        env.finish(req)
    env.check()
    assert env.tree.protected_size() == 0
    env.tree.evict(10**9)
    assert env.tree.total_size() == 0
    assert env.allocator.available_size() == env.allocator.size // page_size * page_size
    assert env.req_to_token_pool.available_size() == max_live
