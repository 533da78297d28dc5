"""The host KV tier (HiSparse): every token of every request, in pinned host memory.

Layer-first buffers `[layer, slot, head, dim]` for K and V, page-aligned: a page of
`page_size` slots holds `page_size` consecutive positions of one request, so a request's
position maps to a host slot through its page table alone. The free list is a page allocator
on the host (`allocator`); page 0 is never handed out and is the sink that masked copies
write to. The device writes and reads these buffers directly (`kvcacheio.transfer_kv_rows`).
"""

from __future__ import annotations

import math

import torch

from sglab.srt.mem_cache.kvcacheio import transfer_kv_rows
from sglab.srt.mem_cache.memory_pool import (
    MHATokenToKVPool,
    PagedTokenToKVPoolAllocator,
    TokenToKVPoolAllocator,
)


class MHATokenToKVPoolHost:
    def __init__(self, device_pool: MHATokenToKVPool, size: int, pin_memory: bool):
        self.size = size
        self.page_size = device_pool.page_size
        self.layer_num = device_pool.layer_num
        self.dtype, self.store_dtype = device_pool.dtype, device_pool.store_dtype
        shape = (self.layer_num, size + self.page_size, device_pool.head_num,
                 device_pool.head_dim)
        need = 2 * math.prod(shape) * self.store_dtype.itemsize
        try:
            self.k_buffer = torch.empty(shape, dtype=self.store_dtype, pin_memory=pin_memory)
            self.v_buffer = torch.empty(shape, dtype=self.store_dtype, pin_memory=pin_memory)
        except RuntimeError as e:  # torch.OutOfMemoryError, AcceleratorError (cudaHostAlloc)
            kind = "pinned " if pin_memory else ""
            raise RuntimeError(
                f"HiSparse: the host KV tier ({size} tokens, {need / 2**30:.1f} GiB of {kind}host "
                f"memory) could not be allocated ({str(e).splitlines()[0]}); lower "
                "--hisparse-config host_to_device_ratio, --max-total-tokens or "
                "--mem-fraction-static") from None
        self.k_buffer[:, :self.page_size].zero_()  # the sink page: masked copies land here
        self.v_buffer[:, :self.page_size].zero_()
        alloc_cls = TokenToKVPoolAllocator if self.page_size == 1 else PagedTokenToKVPoolAllocator
        self.allocator = alloc_cls(size, self)

    def get_kv_size_bytes(self) -> int:
        return 2 * self.k_buffer.numel() * self.k_buffer.element_size()

    def backup_from_device_all_layer(self, device_pool: MHATokenToKVPool,
                                     host_indices: torch.Tensor,
                                     device_indices: torch.Tensor) -> None:
        """Device slots -> host slots, every layer (indices on the device)."""
        transfer_kv_rows(device_pool.k_all, self.k_buffer, device_indices, host_indices,
                         also=(device_pool.v_all, self.v_buffer))

    def load_to_device_per_layer(self, device_pool: MHATokenToKVPool, host_indices: torch.Tensor,
                                 device_indices: torch.Tensor, layer_id: int) -> None:
        """Host slots -> device slots of one layer; a negative device index skips the entry."""
        transfer_kv_rows(self.k_buffer[layer_id].unsqueeze(0),
                         device_pool.k_buffer[layer_id].unsqueeze(0), host_indices,
                         device_indices, also=(self.v_buffer[layer_id].unsqueeze(0),
                                               device_pool.v_buffer[layer_id].unsqueeze(0)))
