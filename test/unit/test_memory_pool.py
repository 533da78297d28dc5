from __future__ import annotations

import random

import pytest
import torch
from sglab.srt.mem_cache.memory_pool import (
    MHATokenToKVPool,
    PagedTokenToKVPoolAllocator,
    ReqToTokenPool,
    TokenToKVPoolAllocator,
)


def make_allocator(num_tokens: int, page_size: int):
    kvcache = MHATokenToKVPool(
        num_tokens, page_size, torch.float32, head_num=1, head_dim=2, layer_num=1, device="cpu"
    )
    cls = TokenToKVPoolAllocator if page_size == 1 else PagedTokenToKVPoolAllocator
    allocator = cls(num_tokens, kvcache)
    allocator.debug_mode = True
    return allocator


# ---- ReqToTokenPool ----


def test_req_to_token_pool_alloc_free():
    pool = ReqToTokenPool(size=4, max_context_len=8, device="cpu")
    rows = pool.alloc(3)
    assert sorted(rows) == rows and len(set(rows)) == 3
    assert pool.available_size() == 1
    assert pool.alloc(2) is None
    assert pool.available_size() == 1
    pool.free(rows[0])
    pool.free(rows[1:])
    assert pool.available_size() == 4
    assert sorted(pool.alloc(4)) == [1, 2, 3, 4]  # the padding row is never handed out
    assert pool.req_to_token.shape[0] == 5
    pool.clear()
    assert pool.available_size() == 4


def test_req_to_token_pool_pending_writes_replay_to_device_copy():
    pool = ReqToTokenPool(size=3, max_context_len=6, device="cpu")
    pool.write(0, 0, torch.tensor([5, 6, 7], dtype=torch.int64))
    pool.write(2, 1, torch.tensor([9, 9], dtype=torch.int32))
    pool.write(1, 0, torch.tensor([4, 4]), sync_device=False)  # host only (e.g. out_cache_loc)
    pool.write(0, 1, torch.tensor([60, 70, 80]))  # overwrites two cells of the first write

    expected_host = torch.zeros_like(pool.req_to_token_cpu)  # 3 rows + the padding row
    expected_host[0, :4] = torch.tensor([5, 60, 70, 80])
    expected_host[2, 1:3] = 9
    expected_host[1, :2] = 4
    assert torch.equal(pool.req_to_token_cpu, expected_host)

    flat_index, values = pool.pop_pending_writes()
    assert flat_index.dtype == torch.int64 and values.dtype == torch.int32
    assert flat_index.device.type == "cpu" and values.device.type == "cpu"
    assert len(torch.unique(flat_index)) == len(flat_index)
    # Queue order of the surviving (last) writes per cell.
    assert flat_index.tolist() == [0, 13, 14, 1, 2, 3]
    assert values.tolist() == [5, 9, 9, 60, 70, 80]

    device_copy = torch.zeros_like(pool.req_to_token_cpu)
    device_copy.view(-1).index_put_((flat_index,), values)
    expected_device = expected_host.clone()
    expected_device[1] = 0  # the host-only write never reaches the queue
    assert torch.equal(device_copy, expected_device)
    assert pool.pop_pending_writes() is None


def test_req_to_token_pool_free_drops_the_rows_pending_writes():
    pool = ReqToTokenPool(size=3, max_context_len=4, device="cpu")
    rows = pool.alloc(2)
    pool.write(rows[0], 0, torch.tensor([1, 2]))
    pool.write(rows[1], 0, torch.tensor([3]))
    pool.free(rows[0])
    flat_index, values = pool.pop_pending_writes()
    assert flat_index.tolist() == [rows[1] * 4] and values.tolist() == [3]


def test_req_to_token_pool_restored_writes_land_before_newer_ones():
    """A failed step gives back the writes it took: they replay, then the newer writes win."""
    pool = ReqToTokenPool(size=3, max_context_len=4, device="cpu")
    rows = pool.alloc(3)
    pool.write(rows[0], 0, torch.tensor([1, 2, 3]))
    pool.write(rows[1], 0, torch.tensor([4]))
    taken = pool.take_pending_writes()
    assert pool.pop_pending_writes() is None
    pool.write(rows[0], 1, torch.tensor([20]))  # queued after the take
    pool.write(rows[2], 0, torch.tensor([7]))
    pool.restore_pending_writes(taken)
    pool.free(rows[2])  # a row freed since: its writes must not reach the next owner
    flat_index, values = pool.pop_pending_writes()
    device_copy = torch.zeros_like(pool.req_to_token_cpu)
    device_copy.view(-1)[flat_index] = values
    assert device_copy[rows[0]].tolist() == [1, 20, 3, 0]
    assert device_copy[rows[1]].tolist() == [4, 0, 0, 0]
    assert device_copy[rows[2]].tolist() == [0, 0, 0, 0]


def test_req_to_token_pool_pending_writes_random_replay():
    rng = random.Random(0)
    pool = ReqToTokenPool(size=5, max_context_len=16, device="cpu")
    device_copy = torch.zeros_like(pool.req_to_token_cpu)
    for _ in range(30):
        for _ in range(rng.randint(1, 6)):
            row, start = rng.randrange(5), rng.randrange(16)
            n = rng.randint(0, 16 - start)
            pool.write(row, start, torch.randint(0, 1000, (n,)))
        popped = pool.pop_pending_writes()
        if popped is not None:
            flat_index, values = popped
            assert len(torch.unique(flat_index)) == len(flat_index)
            device_copy.view(-1)[flat_index] = values
        assert torch.equal(device_copy, pool.req_to_token_cpu)


# ---- MHATokenToKVPool ----


class _Layer:
    def __init__(self, layer_id: int):
        self.layer_id = layer_id


def test_kv_pool_shapes_and_sizes():
    pool = MHATokenToKVPool(
        32, 4, torch.bfloat16, head_num=2, head_dim=8, layer_num=3, device="cpu"
    )
    assert len(pool.k_buffer) == len(pool.v_buffer) == 3
    assert pool.get_key_buffer(1).shape == (36, 2, 8)
    assert pool.get_value_buffer(2).dtype == torch.bfloat16
    cell = MHATokenToKVPool.cell_size_bytes(2, 8, 3, torch.bfloat16)
    assert cell == 2 * 8 * 3 * 2 * 2
    assert pool.get_kv_size_bytes() == cell * 36


def test_kv_pool_set_kv_buffer_writes_slots_and_casts():
    pool = MHATokenToKVPool(
        16, 1, torch.bfloat16, head_num=2, head_dim=4, layer_num=2, device="cpu"
    )
    loc = torch.tensor([3, 7, 1])
    k = torch.randn(3, 2, 4, dtype=torch.float32)
    v = torch.randn(3, 8, dtype=torch.float32)  # flattened heads are accepted too
    pool.set_kv_buffer(_Layer(1), loc, k, v)
    k_buf, v_buf = pool.get_kv_buffer(1)
    assert torch.equal(k_buf[loc], k.to(torch.bfloat16))
    assert torch.equal(v_buf[loc], v.view(3, 2, 4).to(torch.bfloat16))
    untouched = torch.ones(17, dtype=torch.bool)
    untouched[loc] = False
    assert not k_buf[untouched].any() and not v_buf[untouched].any()
    assert not pool.get_key_buffer(0).any()


@pytest.mark.skipif(not hasattr(torch, "float8_e4m3fn"), reason="no fp8 dtype")
def test_kv_pool_fp8_roundtrip():
    pool = MHATokenToKVPool(
        8, 1, torch.float8_e4m3fn, head_num=1, head_dim=4, layer_num=1, device="cpu"
    )
    loc = torch.tensor([2, 5])
    k = torch.tensor([[[0.5, 1.0, -2.0, 4.0]], [[0.25, 8.0, -1.0, 0.0]]])
    pool.set_kv_buffer(_Layer(0), loc, k, -k)
    assert pool.get_key_buffer(0).dtype == torch.float8_e4m3fn
    assert torch.equal(pool.get_key_buffer(0)[loc].float(), k)
    assert torch.equal(pool.get_value_buffer(0)[loc].float(), -k)


# ---- TokenToKVPoolAllocator (page_size 1) ----


def test_token_allocator_accounting():
    allocator = make_allocator(10, 1)
    assert allocator.available_size() == 10
    a = allocator.alloc(4)
    assert a.dtype == torch.int64 and a.device.type == "cpu"
    b = allocator.alloc(6)
    got = torch.cat([a, b]).tolist()
    assert sorted(got) == list(range(1, 11))  # slot 0 is never handed out
    assert allocator.available_size() == 0
    assert allocator.alloc(1) is None
    allocator.free(a)
    assert allocator.available_size() == 4
    assert allocator.alloc(5) is None and allocator.available_size() == 4
    assert sorted(allocator.alloc_extend([0, 3], [2, 5], [-1, 9], 4).tolist()) == sorted(a.tolist())
    allocator.free(b)
    assert len(allocator.alloc_decode([7, 8, 9], [1, 2, 3])) == 3
    allocator.clear()
    assert allocator.available_size() == 10


def test_token_allocator_free_group_batches_frees():
    allocator = make_allocator(8, 1)
    a, b = allocator.alloc(3), allocator.alloc(2)
    allocator.free_group_begin()
    allocator.free(a)
    allocator.free(b)
    assert allocator.available_size() == 3
    allocator.free_group_end()
    assert allocator.available_size() == 8
    allocator.free_group_begin()
    allocator.free_group_end()  # an empty group frees nothing
    assert allocator.available_size() == 8


def test_token_allocator_debug_detects_double_free():
    allocator = make_allocator(8, 1)
    a = allocator.alloc(3)
    allocator.free(a[:1])
    with pytest.raises(AssertionError):
        allocator.free(a[:2])


# ---- PagedTokenToKVPoolAllocator ----


def reference_alloc_extend(free_pages, prefix_lens, seq_lens, last_loc, page_size):
    """Per-request, per-token oracle: fill the last partial page, then take pages in order."""
    pages = iter(free_pages)
    out = []
    for pre, seq, last in zip(prefix_lens, seq_lens, last_loc):
        page = None
        for pos in range(pre, seq):
            if pos % page_size == 0:
                page = next(pages)
                out.append(page * page_size)
            elif page is None:  # still inside the request's partial page from before
                out.append(last + pos - pre + 1)
            else:
                out.append(page * page_size + pos % page_size)
    return out


def test_paged_alloc_whole_pages():
    allocator = make_allocator(64, 16)
    assert allocator.num_pages == 4 and allocator.available_size() == 64
    out = allocator.alloc(32)
    assert out.tolist() == list(range(16, 48))
    assert allocator.available_size() == 32
    assert allocator.alloc(48) is None
    with pytest.raises(AssertionError):
        allocator.alloc(5)


@pytest.mark.parametrize("page_size", [4, 16])
def test_paged_alloc_extend_matches_reference(page_size):
    allocator = make_allocator(40 * page_size, page_size)
    rows = {}  # request -> slots of its tokens, in order
    # Give three requests an existing partial or aligned prefix.
    for req, prefix_len in enumerate([0, 3, page_size, page_size + 5]):
        rows[req] = []
        if prefix_len:
            rows[req] = allocator.alloc_extend([0], [prefix_len], [-1], prefix_len).tolist()

    prefix_lens = [len(rows[r]) for r in range(4)]
    seq_lens = [pre + ext for pre, ext in zip(prefix_lens, [7, 1, 2 * page_size + 1, page_size])]
    last_loc = [rows[r][-1] if rows[r] else -1 for r in range(4)]
    num_new = sum(s - p for s, p in zip(seq_lens, prefix_lens))
    free_before = allocator.free_pages.tolist()
    available_before = allocator.available_size()

    out = allocator.alloc_extend(prefix_lens, seq_lens, last_loc, num_new)
    expected = reference_alloc_extend(free_before, prefix_lens, seq_lens, last_loc, page_size)
    assert out.dtype == torch.int64 and out.tolist() == expected

    num_new_pages = sum(
        -(-s // page_size) - -(-p // page_size) for s, p in zip(seq_lens, prefix_lens)
    )
    assert allocator.available_size() == available_before - num_new_pages * page_size
    start = 0
    for r in range(4):
        rows[r] += out[start : start + seq_lens[r] - prefix_lens[r]].tolist()
        start += seq_lens[r] - prefix_lens[r]
    check_rows_page_structure(rows.values(), page_size, allocator.num_pages)


def check_rows_page_structure(rows, page_size, num_pages):
    """Each row fills its own pages in order; no page is shared; no reserved or out-of-range slot."""
    owner = {}
    for r, row in enumerate(rows):
        for pos, slot in enumerate(row):
            assert page_size <= slot < (num_pages + 1) * page_size
            assert slot % page_size == pos % page_size
            assert slot // page_size == row[pos - pos % page_size] // page_size
            assert owner.setdefault(slot // page_size, r) == r


def test_paged_alloc_decode_continues_and_crosses_pages():
    ps = 4
    allocator = make_allocator(8 * ps, ps)
    a = allocator.alloc_extend([0, 0], [3, 4], [-1, -1], 7)
    row0, row1 = a[:3].tolist(), a[3:].tolist()
    available = allocator.available_size()
    # row0 has 3 tokens: the 4th fits its page; row1 has 4: the 5th needs a new page.
    out = allocator.alloc_decode([4, 5], [row0[-1], row1[-1]])
    assert out[0].item() == row0[-1] + 1
    assert out[1].item() % ps == 0 and out[1].item() // ps not in {row0[0] // ps, row1[0] // ps}
    assert allocator.available_size() == available - ps
    row0.append(out[0].item())
    row1.append(out[1].item())
    check_rows_page_structure([row0, row1], ps, allocator.num_pages)


def test_paged_alloc_fails_without_side_effects():
    ps = 4
    allocator = make_allocator(2 * ps, ps)
    a = allocator.alloc_extend([0], [5], [-1], 5)  # two pages
    free_before = allocator.free_pages.clone()
    assert allocator.alloc_extend([5], [9], [a[-1].item()], 4) is None  # needs a third page
    assert torch.equal(allocator.free_pages, free_before)
    out = allocator.alloc_decode([6], [a[-1].item()])  # position 5 is still in page 2
    assert out.tolist() == [a[-1].item() + 1]
    assert allocator.alloc_decode([9, 6], [a[-1].item() + 3, a[-1].item()]) is None
    assert torch.equal(allocator.free_pages, free_before)


def test_paged_free_releases_touched_pages_once():
    ps = 4
    allocator = make_allocator(6 * ps, ps)
    out = allocator.alloc_extend([0, 0], [6, 3], [-1, -1], 9)
    assert allocator.available_size() == 3 * ps
    allocator.free(out[:6])  # pages of request 0, one of them partial
    assert allocator.available_size() == 5 * ps
    allocator.free_group_begin()
    allocator.free(out[6:7])
    allocator.free(out[7:9])  # same page twice inside one group
    assert allocator.available_size() == 5 * ps
    allocator.free_group_end()
    assert allocator.available_size() == 6 * ps
    assert sorted(allocator.free_pages.tolist()) == list(range(1, 7))
    with pytest.raises(AssertionError):
        allocator.free(out[:1])  # double free


@pytest.mark.parametrize("page_size", [1, 16])
def test_allocator_random_requests_never_overlap(page_size):
    rng = random.Random(page_size)
    allocator = make_allocator(24 * 16, page_size)
    capacity_pages = allocator.num_pages
    live: dict[int, list[int]] = {}
    next_id = 0
    for _ in range(300):
        op = rng.random()
        if op < 0.3 and len(live) < 6:
            live[next_id] = []
            next_id += 1
        elif op < 0.45 and live:
            rid = rng.choice(list(live))
            allocator.free(torch.tensor(live.pop(rid), dtype=torch.int64))
        elif op < 0.7 and live:
            rids = rng.sample(list(live), rng.randint(1, len(live)))
            ext = [rng.randint(1, 40) for _ in rids]
            pre = [len(live[r]) for r in rids]
            out = allocator.alloc_extend(
                pre,
                [p + e for p, e in zip(pre, ext)],
                [live[r][-1] if live[r] else -1 for r in rids],
                sum(ext),
            )
            if out is not None:
                start = 0
                for r, e in zip(rids, ext):
                    live[r] += out[start : start + e].tolist()
                    start += e
        elif live:
            rids = [r for r in live if live[r]]
            if rids:
                out = allocator.alloc_decode(
                    [len(live[r]) + 1 for r in rids], [live[r][-1] for r in rids]
                )
                if out is not None:
                    for r, slot in zip(rids, out.tolist()):
                        live[r].append(slot)
        rows = list(live.values())
        check_rows_page_structure(rows, page_size, capacity_pages)
        used_pages = {s // page_size for row in rows for s in row}
        free_pages = allocator.free_pages.tolist()
        assert len(set(free_pages)) == len(free_pages)
        assert not used_pages & set(free_pages)
        assert len(used_pages) + len(free_pages) == capacity_pages
