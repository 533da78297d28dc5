"""KV memory: the request-to-token table, the per-layer KV buffers and the KV slot allocators.

Allocation state lives on the host. The allocators hand out CPU int64 slot tensors, and
`ReqToTokenPool` keeps a host mirror (`req_to_token_cpu`) that the scheduler and the radix cache
read and write. The device copy (`req_to_token`) is only written by the worker, from
`out_cache_loc` and from the writes queued here (`pop_pending_writes`), so the scheduler never
reads a device tensor.

The Mamba state of hybrid models is the exception, as upstream: `MambaPool`'s free slots and the
row -> state-slot mappings of `HybridReqToTokenPool` live on the device and are written there,
in stream order, by the scheduler (patch 0003b keeps those writes free of host reads).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from sglab.srt.configs.mamba_utils import HybridLayout
from sglab.srt.debug.sync_audit import audit_region
from sglab.srt.utils.h2d import (
    h2d,
    index_put_with_list,
    index_with_list,
    list_to_device,
    setitem_scalar,
)

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

    def alloc_reqs(self, reqs: list) -> list[int] | None:
        """A row for each request that has none (upstream's `alloc(reqs)`); every request's row,
        or None when the rows ran out (nothing is then taken)."""
        need = [r for r in reqs if r.req_pool_idx is None]
        rows = self.alloc(len(need))
        if rows is None:
            return None
        for req, row in zip(need, rows):
            req.req_pool_idx = row
        return [r.req_pool_idx for r in reqs]

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

    def _buffer_index(self, layer_id: int) -> int:
        """A model layer's index into k_buffer / v_buffer."""
        return layer_id

    def get_key_buffer(self, layer_id: int) -> torch.Tensor:
        buf = self.k_buffer[self._buffer_index(layer_id)]
        return buf.view(self.dtype) if self.store_dtype != self.dtype else buf

    def get_value_buffer(self, layer_id: int) -> torch.Tensor:
        buf = self.v_buffer[self._buffer_index(layer_id)]
        return buf.view(self.dtype) if self.store_dtype != self.dtype else buf

    def get_kv_buffer(self, layer_id: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.get_key_buffer(layer_id), self.get_value_buffer(layer_id)

    def set_kv_buffer(
        self, layer, loc: torch.Tensor, cache_k: torch.Tensor, cache_v: torch.Tensor
    ) -> None:
        layer_id = self._buffer_index(layer.layer_id)
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


# --- hybrid linear-attention models ---------------------------------------------------------


class HybridLinearKVPool(MHATokenToKVPool):
    """The KV pool of a hybrid model: buffers for its full-attention layers only, reached by
    model layer id through `full_attention_layer_id_mapping`."""

    def __init__(self, size: int, page_size: int, dtype: torch.dtype, head_num: int,
                 head_dim: int, full_attention_layer_ids: list[int], device: str):
        super().__init__(size, page_size, dtype, head_num, head_dim,
                         len(full_attention_layer_ids), device)
        self.full_attention_layer_id_mapping = {
            layer_id: i for i, layer_id in enumerate(full_attention_layer_ids)}

    def _buffer_index(self, layer_id: int) -> int:
        return self.full_attention_layer_id_mapping[layer_id]


@dataclass(frozen=True, kw_only=True)
class MambaState:
    """Per state tensor: [num_linear_layers, size + 1, ...] (slot 0 is the padding slot)."""

    conv: list[torch.Tensor]
    temporal: torch.Tensor

    def at_layer_idx(self, layer: int) -> "MambaState":
        return MambaState(conv=[c[layer] for c in self.conv], temporal=self.temporal[layer])


class MambaPool:
    """The linear layers' recurrent state, one slot per running request, track buffer or
    cached prefix. Free slots live on the device (as upstream), so allocating and freeing
    never read a device value; slot 0 is never handed out (CUDA-graph padding rows use it).

    Patch 0003b (`sync_free`): `alloc` zeroes its slots with a device zero expanded to their
    shape (sglang#19639) instead of assigning the Python scalar 0 by index.
    """

    def __init__(self, size: int, layout: HybridLayout, conv_dtype: torch.dtype,
                 ssm_dtype: torch.dtype, device: str, sync_free: bool):
        num_layers = len(layout.linear_layer_ids)
        self.size = size
        self.device = device
        self.sync_free = sync_free
        conv = torch.zeros((num_layers, size + 1) + layout.conv_shape, dtype=conv_dtype,
                           device=device)
        temporal = torch.zeros((num_layers, size + 1) + layout.temporal_shape, dtype=ssm_dtype,
                               device=device)
        self.mamba_cache = MambaState(conv=[conv], temporal=temporal)
        self.layer_index = {layer_id: i for i, layer_id in enumerate(layout.linear_layer_ids)}
        self.clear()

    def mem_usage_bytes(self) -> int:
        tensors = self.mamba_cache.conv + [self.mamba_cache.temporal]
        return sum(t.numel() * t.element_size() for t in tensors)

    def mamba2_layer_cache(self, layer_id: int) -> MambaState:
        return self.mamba_cache.at_layer_idx(self.layer_index[layer_id])

    def available_size(self) -> int:
        return len(self.free_slots)

    def alloc(self, need_size: int) -> torch.Tensor | None:
        with audit_region("MambaPool.alloc"):
            if need_size > len(self.free_slots):
                return None
            select_index = self.free_slots[:need_size]
            self.free_slots = self.free_slots[need_size:]
            for t in self.mamba_cache.conv + [self.mamba_cache.temporal]:
                if self.sync_free:
                    z = torch.zeros(1, dtype=t.dtype, device=t.device).expand(
                        t.shape[0], need_size, *t.shape[2:])
                    t[:, select_index] = z
                else:  # before sglang#19639: a Python scalar assigned by index
                    setitem_scalar(t, (slice(None), select_index), 0)
            return select_index

    def free(self, free_index: torch.Tensor) -> None:
        if free_index.numel() == 0:
            return
        self.free_slots = torch.cat((self.free_slots, free_index))

    def clear(self) -> None:
        self.free_slots = torch.arange(1, self.size + 1, dtype=torch.int64, device=self.device)

    def copy_from(self, src_index: torch.Tensor, dst_index: torch.Tensor) -> None:
        for t in self.mamba_cache.conv + [self.mamba_cache.temporal]:
            t[:, dst_index] = t[:, src_index]

    def fork_from(self, src_index: torch.Tensor) -> torch.Tensor | None:
        dst_index = self.alloc(1)
        if dst_index is None:
            return None
        self.copy_from(src_index, dst_index)
        return dst_index


class HybridReqToTokenPool(ReqToTokenPool):
    """Request rows that also own Mamba state slots: each row maps to its request's live state
    slot (`req_index_to_mamba_index_mapping`, on the device) and, with the extra_buffer
    strategy, to a ping-pong pair of track slots (one without overlap scheduling) that hold the
    last snapshots taken every `track_interval` tokens for the prefix cache.

    Requests keep their slots as device tensors (`req.mamba_pool_idx`, 0-d;
    `req.mamba_ping_pong_track_buffer`, [pp]) as upstream, so nothing here reads a device value
    back, except where patch 0003b is off: `alloc_reqs` and `free_mamba_cache` then run the
    code before sglang#19639.
    """

    def __init__(self, size: int, max_context_len: int, device: str, mamba_size: int,
                 layout: HybridLayout, conv_dtype: torch.dtype, ssm_dtype: torch.dtype,
                 enable_mamba_extra_buffer: bool, enable_overlap_schedule: bool,
                 track_interval: int, sync_free: bool, host_track: bool):
        super().__init__(size, max_context_len, device)
        self.mamba_pool = MambaPool(mamba_size, layout, conv_dtype, ssm_dtype, device, sync_free)
        self.enable_mamba_extra_buffer = enable_mamba_extra_buffer
        self.mamba_ping_pong_track_buffer_size = 2 if enable_overlap_schedule else 1
        self.track_interval = track_interval
        # Patch 0003b and its sub-mode beyond the PR (PatchFlags, through the ModelRunner).
        self.sync_free = sync_free
        self.host_track = host_track
        rows = self.req_to_token.shape[0]
        self.req_index_to_mamba_index_mapping = torch.zeros(rows, dtype=torch.int32,
                                                            device=device)
        if enable_mamba_extra_buffer:
            self.req_index_to_mamba_ping_pong_track_buffer_mapping = torch.zeros(
                (rows, self.mamba_ping_pong_track_buffer_size), dtype=torch.int32,
                device=device)

    @property
    def mamba_slots_per_req(self) -> int:
        """State slots a new request takes: its live state, plus its track buffers."""
        extra = self.mamba_ping_pong_track_buffer_size if self.enable_mamba_extra_buffer else 0
        return 1 + extra

    def alloc_reqs(self, reqs: list) -> list[int] | None:
        select_index = super().alloc_reqs(reqs)
        if select_index is None:
            return None
        with audit_region("HybridReqToTokenPool.alloc"):
            mamba_indices, ping_pong_buffers = [], []
            for req in reqs:
                if req.mamba_pool_idx is None:
                    req.mamba_pool_idx = self._alloc_slots(1)[0]
                mamba_indices.append(req.mamba_pool_idx)
                if self.enable_mamba_extra_buffer:
                    if req.mamba_ping_pong_track_buffer is None:
                        req.mamba_ping_pong_track_buffer = self._alloc_slots(
                            self.mamba_ping_pong_track_buffer_size)
                        req.mamba_next_track_idx = 0
                    ping_pong_buffers.append(req.mamba_ping_pong_track_buffer)
            self._write_mappings(select_index, mamba_indices, ping_pong_buffers)
        return select_index

    def _alloc_slots(self, n: int) -> torch.Tensor:
        slots = self.mamba_pool.alloc(n)
        if slots is None:
            raise RuntimeError("Not enough Mamba state slots; raise --mamba-full-memory-ratio "
                               "or --max-mamba-cache-size")
        return slots

    def _write_mappings(self, select_index: list[int], mamba_indices: list[torch.Tensor],
                        ping_pong_buffers: list[torch.Tensor]) -> None:
        if self.sync_free:  # sglang#19639: stacked on the device
            slots = torch.stack(mamba_indices).to(dtype=torch.int32)
        else:  # before: the device 0-d slots read back one by one, then uploaded
            slots = list_to_device(mamba_indices, torch.int32, self.device)
        self._write_rows(self.req_index_to_mamba_index_mapping, select_index, slots)
        if not self.enable_mamba_extra_buffer:
            return
        if self.sync_free:
            buffers = torch.stack(ping_pong_buffers).to(dtype=torch.int32)
        else:
            buffers = list_to_device([b.tolist() for b in ping_pong_buffers], torch.int32,
                                     self.device)
        self._write_rows(self.req_index_to_mamba_ping_pong_track_buffer_mapping, select_index,
                         buffers)

    def _write_rows(self, mapping: torch.Tensor, rows: list[int], values: torch.Tensor) -> None:
        if self.host_track:  # sglab beyond the PR: the rows uploaded pinned, not list-indexed
            mapping[h2d(rows, torch.int64, self.device, pin=True)] = values
        else:  # upstream 0.5.11 too: a Python-list index of a device tensor
            index_put_with_list(mapping, rows, values)

    def get_mamba_indices(self, req_indices: torch.Tensor) -> torch.Tensor:
        return self.req_index_to_mamba_index_mapping[req_indices]

    def mamba2_layer_cache(self, layer_id: int) -> MambaState:
        return self.mamba_pool.mamba2_layer_cache(layer_id)

    def get_mamba_ping_pong_other_idx(self, mamba_next_track_idx: int) -> int:
        if self.mamba_ping_pong_track_buffer_size == 2:
            return 1 - mamba_next_track_idx
        return mamba_next_track_idx

    def free_mamba_cache(self, req, mamba_ping_pong_track_buffer_to_keep: int | None = None):
        """Free the request's live slot and its track slots, but the one kept (which a prefix
        cache node now owns)."""
        with audit_region("free_mamba_cache"):
            assert req.mamba_pool_idx is not None, "double free of a Mamba state slot"
            self.mamba_pool.free(req.mamba_pool_idx.unsqueeze(0))
            req.mamba_pool_idx = None
            if not self.enable_mamba_extra_buffer:
                return
            buf = self.req_index_to_mamba_ping_pong_track_buffer_mapping[req.req_pool_idx]
            if mamba_ping_pong_track_buffer_to_keep is not None:
                buf = self._track_slots_to_free(buf, mamba_ping_pong_track_buffer_to_keep)
            self.mamba_pool.free(buf.to(torch.int64))
            req.mamba_ping_pong_track_buffer = None

    def _track_slots_to_free(self, buf: torch.Tensor, keep: int) -> torch.Tensor:
        assert keep in (0, 1), keep
        size = self.mamba_ping_pong_track_buffer_size
        if not self.sync_free:  # before sglang#19639: a Python-list index of a device tensor
            return index_with_list(buf, [i for i in range(size) if i != keep])
        if size == 2:
            return buf[1 - keep:2 - keep]
        assert keep == 0
        return buf[0:0]

    def clear(self) -> None:
        super().clear()
        if not hasattr(self, "mamba_pool"):  # the base constructor's clear
            return
        self.mamba_pool.clear()
        self.req_index_to_mamba_index_mapping.zero_()
        if self.enable_mamba_extra_buffer:
            self.req_index_to_mamba_ping_pong_track_buffer_mapping.zero_()
