"""HiSparse swap-in on the device: one kernel per layer, one program per batch row.

For a sparse row's selected pages it finds each position's hot-buffer slot (a hit, from the
residency map) or takes one (a miss): the victims are the slots not hit this step, least
recently used first. Recency is counted in steps and saturates at `AGE_LEVELS` (older slots
are all equally old, taken by slot index), so the order needs no sort: a prefix count per
age level ranks every slot. It then updates the residency map, the slots' tokens and
recency, lists the host -> device copies (`transfer_kv_rows` does them) and returns each
selected position's device slot. `HiSparseCoordinator.swap_in_selected_pages` holds the torch
form of the same step, the reference.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

AGE_LEVELS = 8


@triton.jit
def _swap_in_kernel(positions, hosts, rows_ptr, lens_ptr, sparse_ptr, reserved_ptr, resident,
                    last_used, buffer_tokens, req_to_device_buffer, req_to_page, out_ptr,
                    copy_src, copy_dst, victims, stride_sel, stride_lu, stride_bt, stride_rdb,
                    stride_rtp, stride_victims,
                    B: tl.constexpr, P: tl.constexpr, TOP_K: tl.constexpr,
                    BLOCK_T: tl.constexpr, BLOCK_B: tl.constexpr, LEVELS: tl.constexpr):
    b = tl.program_id(0)
    t = tl.arange(0, BLOCK_T)
    in_k = t < TOP_K
    copy_at = b * TOP_K + t
    tl.store(copy_dst + copy_at, tl.full([BLOCK_T], -1, tl.int64), mask=in_k)
    tl.store(out_ptr + copy_at, tl.zeros([BLOCK_T], tl.int64), mask=in_k)
    if tl.load(sparse_ptr + b) == 0:  # a dense row: its entries are never read
        return
    row = tl.load(rows_ptr + b).to(tl.int64)
    lens = tl.load(lens_ptr + b).to(tl.int64)
    pos = tl.load(positions + b * stride_sel + t, mask=in_k, other=0)
    host = tl.load(hosts + b * stride_sel + t, mask=in_k, other=0)
    valid = in_k & (pos < lens)
    newest = pos == lens - 1
    wanted = valid & ~newest
    slot = tl.load(resident + host, mask=wanted, other=-1).to(tl.int64)
    hit = wanted & (slot >= 0)
    miss = wanted & (slot < 0)
    lu_row = last_used + row * stride_lu
    tl.store(lu_row + slot, lens.to(tl.int32), mask=hit)
    tl.debug_barrier()

    # Rank the slots not hit this step: oldest level first, then by slot index (int32: scans
    # over the whole buffer are the kernel's cost).
    s = tl.arange(0, BLOCK_B)
    now = lens.to(tl.int32)
    used = tl.load(lu_row + s, mask=s < B, other=0)
    free = (s < B) & (used < now)
    level = tl.minimum(now - used, LEVELS)
    rank = tl.zeros([BLOCK_B], dtype=tl.int32)
    offset = tl.sum(tl.zeros([BLOCK_B], dtype=tl.int32), 0)
    for i in range(LEVELS):
        at = free & (level == LEVELS - i)
        m = at.to(tl.int32)
        rank = tl.where(at, offset + tl.cumsum(m, 0) - 1, rank)
        offset += tl.sum(m, 0)
    v_row = victims + b * stride_victims
    tl.store(v_row + rank, s.to(tl.int32), mask=free & (rank < TOP_K))
    tl.debug_barrier()

    nth = tl.cumsum(miss.to(tl.int32), 0) - 1
    victim = tl.load(v_row + nth, mask=miss, other=0).to(tl.int64)
    bt_row = buffer_tokens + row * stride_bt
    old = tl.load(bt_row + victim, mask=miss, other=-1).to(tl.int64)
    evicted = miss & (old >= 0)
    old_c = tl.maximum(old, 0)
    old_host = tl.load(req_to_page + row * stride_rtp + old_c // P, mask=evicted,
                       other=0) * P + old_c % P
    tl.store(resident + old_host, tl.full([BLOCK_T], -1, tl.int32), mask=evicted)
    tl.debug_barrier()
    tl.store(resident + host, victim.to(tl.int32), mask=miss)
    tl.store(bt_row + victim, pos.to(tl.int32), mask=miss)
    tl.store(lu_row + victim, lens.to(tl.int32), mask=miss)
    rdb_row = req_to_device_buffer + row * stride_rdb
    dst = tl.load(rdb_row + victim, mask=miss, other=-1)
    tl.store(copy_src + copy_at, host, mask=in_k)
    tl.store(copy_dst + copy_at, dst, mask=miss)

    out = tl.load(rdb_row + tl.where(hit, slot, victim), mask=wanted, other=0)
    out = tl.where(newest, tl.load(reserved_ptr + b), out)
    tl.store(out_ptr + copy_at, tl.where(valid, out, 0), mask=in_k)


def swap_in(positions: torch.Tensor, hosts: torch.Tensor, state, resident: torch.Tensor,
            last_used: torch.Tensor, buffer_tokens: torch.Tensor,
            req_to_device_buffer: torch.Tensor, req_to_page: torch.Tensor, buffer_size: int,
            page_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`positions`, `hosts` [bs, top_k]: the selected positions and their host slots; `state`
    the step's `_DecodeState`; the tables are one layer's. Returns each entry's device slot
    [bs, top_k] (0 where invalid; dense rows: 0) and the copies to make, (host slots,
    device slots) [bs * top_k] with device slot -1 where none."""
    bs, top_k = positions.shape
    assert positions.stride(1) == 1 and hosts.stride() == positions.stride()
    assert resident.is_contiguous() and last_used.stride(1) == buffer_tokens.stride(1) == 1
    out = torch.empty((bs, top_k), dtype=torch.int64, device=positions.device)
    copy_src = torch.empty(bs * top_k, dtype=torch.int64, device=positions.device)
    copy_dst = torch.empty_like(copy_src)
    victims = torch.empty((bs, top_k), dtype=torch.int32, device=positions.device)
    _swap_in_kernel[(bs,)](
        positions, hosts, state.rows, state.seq_lens, state.sparse, state.reserved, resident,
        last_used, buffer_tokens, req_to_device_buffer, req_to_page, out, copy_src, copy_dst,
        victims, positions.stride(0), last_used.stride(0), buffer_tokens.stride(0),
        req_to_device_buffer.stride(0), req_to_page.stride(0), victims.stride(0),
        B=buffer_size, P=page_size, TOP_K=top_k, BLOCK_T=triton.next_power_of_2(top_k),
        BLOCK_B=triton.next_power_of_2(buffer_size), LEVELS=AGE_LEVELS, num_warps=8)
    return out, copy_src, copy_dst
