"""The scheduler's KV allocator under HiSparse: logical slots (host-backed) and device slots.

As upstream's `HiSparseTokenToKVPoolAllocator`: the scheduler allocates *logical* slots, one per
token of a request's full history, and `req_to_token_pool`'s host table holds them. In sglab a
logical slot is also the token's slot in the pinned host pool (`MHATokenToKVPoolHost`), so the
logical free list is the host pool's free list and the scheduler's KV budget is the host tier.
A prefill also takes device slots (its KV is written and attended on the device), recorded in
`mapping` (logical -> device slot, 0 = none); when the request is staged, its coordinator keeps
a hot buffer of them and frees the rest (`HiSparseCoordinator.alloc_device_buffer`). Decode
slots on the device are the coordinator's too (buffer or reserved slot), except for requests it
does not manage (shorter than `min_sparse_prompt_len`), whose decode slots come from `device`
and are mapped here like a prefill's.

`available_size()` is the smaller of the two free lists, as upstream. Everything is on the
host; the worker sees device slots only (`to_device`).
"""

from __future__ import annotations

import torch

from sglab.srt.mem_cache.memory_pool import TokenToKVPoolAllocator
from sglab.srt.mem_cache.memory_pool_host import MHATokenToKVPoolHost


class HiSparseTokenToKVPoolAllocator:
    def __init__(self, host_pool: MHATokenToKVPoolHost, device: TokenToKVPoolAllocator):
        self.host_pool = host_pool
        self.logical = host_pool.allocator
        self.device = device
        self.page_size = device.page_size
        assert self.logical.page_size == self.page_size
        self.size = device.size
        self.mapping = torch.zeros(self.logical.size + self.page_size, dtype=torch.int64)

    # --- the allocator contract the scheduler uses ---------------------------------------------

    def available_size(self) -> int:
        return min(self.logical.available_size(), self.device.available_size())

    def get_kvcache(self):
        return self.device.get_kvcache()

    def alloc(self, need_size: int) -> torch.Tensor | None:
        """Decode slots (page size 1): logical only; the device slot is the coordinator's."""
        return self.logical.alloc(need_size)

    def alloc_decode(self, seq_lens: list[int], last_loc: list[int]) -> torch.Tensor | None:
        return self.logical.alloc_decode(seq_lens, last_loc)

    def alloc_extend(self, prefix_lens: list[int], seq_lens: list[int], last_loc: list[int],
                     extend_num_tokens: int) -> torch.Tensor | None:
        """Logical and device slots for a prefill (both or neither), mapped."""
        ps = self.page_size
        new_pages = sum(-(-s // ps) - -(-p // ps) for p, s in zip(prefix_lens, seq_lens))
        if new_pages * ps > min(self.logical.available_size(), self.device.available_size()):
            return None
        logical = self.logical.alloc_extend(prefix_lens, seq_lens, last_loc, extend_num_tokens)
        device_last = self.to_device(torch.tensor(last_loc, dtype=torch.int64).clamp(min=0))
        device_last = torch.where(torch.tensor(last_loc) < 0, -1, device_last)
        device = self.device.alloc_extend(prefix_lens, seq_lens, device_last.tolist(),
                                          extend_num_tokens)
        assert logical is not None and device is not None
        self.mapping[logical] = device
        return logical

    def free(self, free_index: torch.Tensor) -> None:
        """Logical slots, and the device slots still mapped to them."""
        if free_index.numel() == 0:
            return
        free_index = free_index.to(torch.int64)
        device = self.mapping[free_index]
        self.mapping[free_index] = 0
        self.logical.free(free_index)
        self.device.free(device[device > 0])

    def clear(self) -> None:
        self.logical.clear()
        self.device.clear()
        self.mapping.zero_()

    # --- HiSparse ------------------------------------------------------------------------------

    def to_device(self, logical: torch.Tensor) -> torch.Tensor:
        """The device slots of logical slots whose KV is (still) mapped; 0 where none."""
        return self.mapping[logical.to(torch.int64)]

    def unmap(self, logical: torch.Tensor) -> None:
        self.mapping[logical.to(torch.int64)] = 0

    def map(self, logical: torch.Tensor, device: torch.Tensor) -> None:
        self.mapping[logical.to(torch.int64)] = device.to(torch.int64)
