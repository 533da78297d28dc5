"""KV memory: the request-to-token table, the per-layer KV buffers and the KV slot allocators.

Allocation state lives on the host. The allocators hand out CPU int64 slot tensors, and
`ReqToTokenPool` keeps a host mirror (`req_to_token_cpu`) that the scheduler and the radix cache
read and write. The device copy (`req_to_token`) is only written by the worker, from
`out_cache_loc` and from the writes queued here (`pop_pending_writes`), so the scheduler never
reads a device tensor.
"""

from __future__ import annotations

import os

import torch

_FP8_DTYPES = tuple(
    getattr(torch, name) for name in ("float8_e4m3fn", "float8_e5m2") if hasattr(torch, name)
)


def _debug_memory_pool() -> bool:
    return os.environ.get("SGLAB_DEBUG_MEMORY_POOL", "0").lower() in ("1", "true")


PADDING_ROW = 0


class ReqToTokenPool:
    """Maps (request row, token position) to a KV slot. `size` rows are handed out; one more,
    `PADDING_ROW`, never is: the padding rows of a CUDA-graph batch read and write it."""

    def __init__(self, size: int, max_context_len: int, device: str):
        self.size = size
        self.max_context_len = max_context_len
        self.device = device
        # Read by the attention backends; written by the worker only.
        self.req_to_token = torch.zeros((size + 1, max_context_len), dtype=torch.int32,
                                        device=device)
        # Host mirror: the scheduler and the radix cache read and write this one.
        self.req_to_token_cpu = torch.zeros((size + 1, max_context_len), dtype=torch.int32)
        # Host writes not yet applied to the device copy: (row, start column, int32 values).
        self._pending_writes: list[tuple[int, int, torch.Tensor]] = []
        self.clear()

    def available_size(self) -> int:
        return len(self.free_slots)

    def alloc(self, need_size: int) -> list[int] | None:
        if need_size > len(self.free_slots):
            return None
        select_index = self.free_slots[:need_size]
        self.free_slots = self.free_slots[need_size:]
        return select_index

    def free(self, free_index: int | list[int]) -> None:
        rows = [free_index] if isinstance(free_index, int) else list(free_index)
        self.free_slots.extend(rows)
        # A freed row's queued writes must not land on the row's next owner.
        if self._pending_writes:
            freed = set(rows)
            self._pending_writes = [w for w in self._pending_writes if w[0] not in freed]

    def write(self, row: int, start: int, values: torch.Tensor, sync_device: bool = True) -> None:
        n = len(values)
        assert 0 <= start and start + n <= self.max_context_len, (row, start, n)
        assert values.device.type == "cpu", "the scheduler writes host tensors only"
        values_cpu = values.to(dtype=torch.int32)
        self.req_to_token_cpu[row, start : start + n] = values_cpu
        if sync_device and n > 0:
            self._pending_writes.append((row, start, values_cpu.clone()))

    def pop_pending_writes(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        return self.flatten_writes(self.take_pending_writes())

    def take_pending_writes(self) -> list[tuple[int, int, torch.Tensor]]:
        """The queued host writes, in order; the queue is left empty."""
        writes, self._pending_writes = self._pending_writes, []
        return writes

    def restore_pending_writes(self, writes: list[tuple[int, int, torch.Tensor]]) -> None:
        """Queue taken writes again, ahead of newer ones (the step that took them failed)."""
        self._pending_writes = list(writes) + self._pending_writes

    def flatten_writes(
        self, writes: list[tuple[int, int, torch.Tensor]]
    ) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(flat index into req_to_token, int32 values), the last write of each cell kept."""
        if not writes:
            return None
        starts = [row * self.max_context_len + start for row, start, _ in writes]
        flat_index = torch.cat(
            [torch.arange(s, s + len(v), dtype=torch.int64) for s, (_, _, v) in zip(starts, writes)]
        )
        values = torch.cat([v for _, _, v in writes])
        return _keep_last_write_per_cell(flat_index, values)

    def clear(self) -> None:
        self.free_slots = [r for r in range(self.size + 1) if r != PADDING_ROW]
        self._pending_writes = []


def _keep_last_write_per_cell(
    flat_index: torch.Tensor, values: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    unique_index, inverse = torch.unique(flat_index, return_inverse=True)
    if len(unique_index) == len(flat_index):
        return flat_index, values
    position = torch.arange(len(flat_index), dtype=torch.int64)
    last_position = torch.full((len(unique_index),), -1, dtype=torch.int64)
    last_position.scatter_reduce_(0, inverse, position, reduce="amax")
    keep = torch.sort(last_position).values
    return flat_index[keep], values[keep]


class MHATokenToKVPool:
    """Per-layer K and V buffers indexed by KV slot. Slots [0, page_size) are a padding sink."""

    def __init__(
        self,
        size: int,
        page_size: int,
        dtype: torch.dtype,
        head_num: int,
        head_dim: int,
        layer_num: int,
        device: str,
    ):
        self.size = size
        self.page_size = page_size
        self.dtype = dtype
        self.head_num = head_num
        self.head_dim = head_dim
        self.layer_num = layer_num
        self.device = device
        # index_put is not implemented for fp8, so fp8 caches are stored as bytes.
        self.store_dtype = torch.uint8 if dtype in _FP8_DTYPES else dtype
        # One allocation per K and V ([layer, slot, head, dim]; per-layer views below), so a
        # copy of some slots across all layers is one kernel (HiSparse's backup and staging).
        shape = (layer_num, size + page_size, head_num, head_dim)
        self.k_all = torch.zeros(shape, dtype=self.store_dtype, device=device)
        self.v_all = torch.zeros(shape, dtype=self.store_dtype, device=device)
        self.k_buffer = list(self.k_all.unbind(0))
        self.v_buffer = list(self.v_all.unbind(0))

    def get_key_buffer(self, layer_id: int) -> torch.Tensor:
        if self.store_dtype != self.dtype:
            return self.k_buffer[layer_id].view(self.dtype)
        return self.k_buffer[layer_id]

    def get_value_buffer(self, layer_id: int) -> torch.Tensor:
        if self.store_dtype != self.dtype:
            return self.v_buffer[layer_id].view(self.dtype)
        return self.v_buffer[layer_id]

    def get_kv_buffer(self, layer_id: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.get_key_buffer(layer_id), self.get_value_buffer(layer_id)

    def set_kv_buffer(
        self, layer, loc: torch.Tensor, cache_k: torch.Tensor, cache_v: torch.Tensor
    ) -> None:
        layer_id = layer.layer_id
        cache_k = cache_k.view(-1, self.head_num, self.head_dim)
        cache_v = cache_v.view(-1, self.head_num, self.head_dim)
        if cache_k.dtype != self.dtype:
            cache_k = cache_k.to(self.dtype)
            cache_v = cache_v.to(self.dtype)
        if self.store_dtype != self.dtype:
            cache_k = cache_k.view(self.store_dtype)
            cache_v = cache_v.view(self.store_dtype)
        self.k_buffer[layer_id][loc] = cache_k
        self.v_buffer[layer_id][loc] = cache_v

    def get_kv_size_bytes(self) -> int:
        return sum(buf.numel() * buf.element_size() for buf in self.k_buffer + self.v_buffer)

    @staticmethod
    def cell_size_bytes(head_num: int, head_dim: int, layer_num: int, dtype: torch.dtype) -> int:
        itemsize = torch.empty((), dtype=dtype).element_size()
        return head_num * head_dim * layer_num * 2 * itemsize


class TokenToKVPoolAllocator:
    """Hands out KV slots one token at a time (page_size == 1). Slot 0 is never handed out.

    The free list is a CPU int64 tensor of page ids; with page_size 1 a page is a slot.
    """

    def __init__(self, size: int, kvcache: MHATokenToKVPool):
        self.size = size
        self.page_size = kvcache.page_size
        self.num_pages = size // self.page_size
        self._kvcache = kvcache
        self.debug_mode = _debug_memory_pool()
        self.clear()

    def clear(self) -> None:
        self.free_pages = torch.arange(1, self.num_pages + 1, dtype=torch.int64)
        self._free_group: list[torch.Tensor] | None = None
        # Debug only: page id -> is free; page 0 is reserved, so never free.
        self._page_is_free = torch.ones(self.num_pages + 1, dtype=torch.bool)
        self._page_is_free[0] = False

    def available_size(self) -> int:
        return len(self.free_pages) * self.page_size

    def get_kvcache(self) -> MHATokenToKVPool:
        return self._kvcache

    def alloc(self, need_size: int) -> torch.Tensor | None:
        assert self.page_size == 1
        if need_size > len(self.free_pages):
            return None
        select_index = self.free_pages[:need_size]
        self.free_pages = self.free_pages[need_size:]
        self._debug_mark_allocated(select_index)
        return select_index

    def alloc_extend(
        self,
        prefix_lens: list[int],
        seq_lens: list[int],
        last_loc: list[int],
        extend_num_tokens: int,
    ) -> torch.Tensor | None:
        return self.alloc(extend_num_tokens)

    def alloc_decode(self, seq_lens: list[int], last_loc: list[int]) -> torch.Tensor | None:
        return self.alloc(len(seq_lens))

    def free(self, free_index: torch.Tensor) -> None:
        if free_index.numel() == 0:
            return
        if self._free_group is not None:
            self._free_group.append(free_index)
            return
        free_index = free_index.to(torch.int64)
        self._debug_mark_freed(free_index)
        self.free_pages = torch.cat((self.free_pages, free_index))

    def free_group_begin(self) -> None:
        self._free_group = []

    def free_group_end(self) -> None:
        group, self._free_group = self._free_group, None
        if group:
            self.free(torch.cat(group))

    def _debug_mark_allocated(self, pages: torch.Tensor) -> None:
        if self.debug_mode:
            assert bool(self._page_is_free[pages].all()), "allocated a page that is not free"
            self._page_is_free[pages] = False

    def _debug_mark_freed(self, pages: torch.Tensor) -> None:
        if self.debug_mode:
            assert len(torch.unique(pages)) == len(pages), "page freed twice in one call"
            assert bool((pages >= 1).all() and (pages <= self.num_pages).all()), "bad page"
            assert not bool(self._page_is_free[pages].any()), "double free"
            self._page_is_free[pages] = True


class PagedTokenToKVPoolAllocator(TokenToKVPoolAllocator):
    """Hands out whole pages (page_size > 1); page p holds slots [p*page_size, (p+1)*page_size).

    A request owns its pages: its tokens fill them in order, and a new page is taken only when
    the last one is full. Pages 1..num_pages are handed out; page 0 is the padding sink.
    """

    def alloc(self, need_size: int) -> torch.Tensor | None:
        assert need_size % self.page_size == 0, "paged alloc takes whole pages"
        num_pages = need_size // self.page_size
        if num_pages > len(self.free_pages):
            return None
        out_pages = self.free_pages[:num_pages]
        self.free_pages = self.free_pages[num_pages:]
        self._debug_mark_allocated(out_pages)
        return self._page_slots(out_pages)

    def alloc_extend(
        self,
        prefix_lens: list[int],
        seq_lens: list[int],
        last_loc: list[int],
        extend_num_tokens: int,
    ) -> torch.Tensor | None:
        ps = self.page_size
        prefix_lens_t = torch.tensor(prefix_lens, dtype=torch.int64)
        seq_lens_t = torch.tensor(seq_lens, dtype=torch.int64)
        last_loc_t = torch.tensor(last_loc, dtype=torch.int64)
        extend_lens = seq_lens_t - prefix_lens_t
        assert int(extend_lens.sum()) == extend_num_tokens
        prefix_pages = (prefix_lens_t + ps - 1) // ps
        num_new_pages = (seq_lens_t + ps - 1) // ps - prefix_pages
        total_new_pages = int(num_new_pages.sum())
        if total_new_pages > len(self.free_pages):
            return None
        new_pages = self.free_pages[:total_new_pages]

        # One entry per new token: its request and its position in that request's sequence.
        bs = len(prefix_lens)
        req = torch.repeat_interleave(torch.arange(bs), extend_lens, output_size=extend_num_tokens)
        token_starts = torch.cumsum(extend_lens, 0) - extend_lens
        pos = torch.arange(extend_num_tokens) - token_starts[req] + prefix_lens_t[req]

        # Tokens before the first page boundary continue the request's last partial page.
        in_old_page = pos < prefix_pages[req] * ps
        if self.debug_mode and bool(in_old_page.any()):
            partial = prefix_lens_t % ps != 0
            assert bool(((last_loc_t + 1) % ps == prefix_lens_t % ps)[partial].all())
        old_page_slots = last_loc_t[req] + 1 + pos - prefix_lens_t[req]
        page_starts = torch.cumsum(num_new_pages, 0) - num_new_pages
        page_idx = (page_starts[req] + pos // ps - prefix_pages[req]).clamp_(min=0)
        page_idx = page_idx.clamp_(max=max(total_new_pages - 1, 0))
        if total_new_pages > 0:
            new_page_slots = new_pages[page_idx] * ps + pos % ps
            out_indices = torch.where(in_old_page, old_page_slots, new_page_slots)
        else:
            out_indices = old_page_slots

        self.free_pages = self.free_pages[total_new_pages:]
        self._debug_mark_allocated(new_pages)
        return out_indices

    def alloc_decode(self, seq_lens: list[int], last_loc: list[int]) -> torch.Tensor | None:
        # seq_lens include the token being decoded; last_loc is the slot of the token before it.
        ps = self.page_size
        seq_lens_t = torch.tensor(seq_lens, dtype=torch.int64)
        out_indices = torch.tensor(last_loc, dtype=torch.int64) + 1
        needs_page = (seq_lens_t - 1) % ps == 0
        num_new_pages = int(needs_page.sum())
        if num_new_pages > len(self.free_pages):
            return None
        new_pages = self.free_pages[:num_new_pages]
        self.free_pages = self.free_pages[num_new_pages:]
        out_indices[needs_page] = new_pages * ps
        self._debug_mark_allocated(new_pages)
        return out_indices

    def free(self, free_index: torch.Tensor) -> None:
        # Frees every page the indices touch: callers only free pages they own entirely.
        if free_index.numel() == 0:
            return
        if self._free_group is not None:
            self._free_group.append(free_index)
            return
        free_pages = torch.unique(free_index.to(torch.int64) // self.page_size)
        self._debug_mark_freed(free_pages)
        self.free_pages = torch.cat((free_pages, self.free_pages))

    def _page_slots(self, pages: torch.Tensor) -> torch.Tensor:
        return (pages[:, None] * self.page_size + torch.arange(self.page_size)).reshape(-1)
