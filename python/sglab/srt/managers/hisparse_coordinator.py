"""HiSparseCoordinator: each request's full KV on the host, a hot buffer on the device, and
sparse decode over Quest's top-k pages (upstream's coordinator, for GQA models).

Lifecycle (upstream's names):
  * `admit_request_into_staging` after a prefill: the prompt's KV device->host on the staging
    stream, and its pages' Quest summaries. `collect_ready_reqs` hands a request to decode once
    its staging finished; `alloc_device_buffer` then keeps `min(len, B)` of its prefill slots
    (page-rounded) as its hot buffer and frees the rest.
  * `map_last_loc_to_buffer` (host, `prepare_for_decode`): each row's new token goes to buffer
    slot `seq_len - 1` while `seq_len <= B` (the buffer grows a page at a time), then to the
    reserved slot `B`; which previous tokens to back up; the pages this step opens.
  * `begin_decode_step` (before the forward): `_eager_backup_previous_token` (patch 0004) and
    `wait_for_pending_backup`. `init_decode_state` (in the graph, or eager): the step's device
    state. `select` at every layer: Quest's pages, then `swap_in_selected_pages`.
  * `request_finished` / `retract_req` / `abort_staging_request`: wait for what is in flight,
    then free.

A token's host slot is its logical slot (`hisparse_memory_pool`). Per layer, `resident[host
slot]` says which buffer slot holds the token (-1: only on the host), so a hit test is a
lookup; `buffer_tokens` and `last_used` (a request's `seq_len` as the clock) say what each buffer
slot holds and when it last served. A row is *sparse* when `seq_len > B`: it attends to
`top_k` selected positions (fewer in its partial newest page); every other row attends densely
to its `req_to_token` row, which holds its buffer slots. Rows of requests shorter than
`min_sparse_prompt_len` are not managed: dense, all their KV on the device, no host copy.

Patch 0004 (`backup_mode`): `blocking` (off) is the backup before sglang#21932; `pr` is the
PR; `async_finish` is sglab's own mode beyond it (see `request_finished`).
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections import deque
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

import torch

from sglab.srt.debug.sync_audit import audit_region
from sglab.srt.mem_cache.sparsity.quest import QuestSelector
from sglab.srt.mem_cache.sparsity.swap_in import AGE_LEVELS, swap_in
from sglab.srt.utils.h2d import h2d, list_to_device

if TYPE_CHECKING:
    from sglab.srt.managers.overlap_utils import StepStreams
    from sglab.srt.managers.schedule_batch import Req
    from sglab.srt.mem_cache.hisparse_memory_pool import HiSparseTokenToKVPoolAllocator
    from sglab.srt.mem_cache.memory_pool import ReqToTokenPool
    from sglab.srt.mem_cache.sparsity.config import HiSparseConfig
    from sglab.srt.model_executor.forward_batch_info import ForwardBatch

logger = logging.getLogger(__name__)

BACKUP_MODES = ("blocking", "pr", "async_finish")
_NEVER = torch.iinfo(torch.int64).max


def backup_mode(async_backup: bool, mode: str) -> str:
    """Patch 0004 off: the blocking backup (before sglang#21932); on: the PR or sglab's mode."""
    return mode if async_backup else "blocking"


def device_bytes_per_token(config: "HiSparseConfig", num_layers: int, num_kv_heads: int,
                           head_dim: int) -> int:
    """Device memory per device-pool token spent on the host tier's tables: per host slot the
    residency map (int32 a layer), per host page Quest's fp32 min and max keys."""
    per_host_token = num_layers * 4 + num_layers * num_kv_heads * head_dim * 8 // config.page_size
    return int(per_host_token * config.host_to_device_ratio) + 1


def debug_hisparse() -> bool:
    return os.environ.get("SGLAB_DEBUG_HISPARSE", "0").lower() in ("1", "true")


@dataclass
class HiSparseStepPlan:
    """One decode step's HiSparse work, decided on the host (`map_last_loc_to_buffer`). Lists
    are per batch row unless said otherwise."""

    out_cache_loc: torch.Tensor  # the device slot each row's new token is written to
    rows: list[int]
    backup_device: list[int]  # the previous token's device slot (buffer or reserved slot)
    backup_host: list[int]  # and its host slot
    page_index: list[int]  # flat req_to_page cells of the pages this step opens (any number)
    page_value: list[int]  # and their host pages
    grow_index: list[int]  # flat req_to_device_buffer cells of grown buffers (any number)
    grow_value: list[int]
    grown: list[tuple[int, int]]  # (row, its buffer size before) of each grown buffer
    kv_lens: list[int]  # keys each row attends to
    sparse: list[bool]
    num_page_cols: int  # page-table columns an eager selection reads


@dataclass
class _DecodeState:
    """The step's device state, from the step's rows and lengths (`init_decode_state`)."""

    rows: torch.Tensor
    seq_lens: torch.Tensor
    sparse: torch.Tensor  # [bs] bool
    kv_lens: torch.Tensor  # [bs] int64
    newest_page: torch.Tensor  # host page of the newest token (0, the sink: not managed)
    reserved: torch.Tensor  # [bs] the rows' reserved slots
    num_page_cols: int


@dataclass
class _Staging:
    finish_event: "torch.cuda.Event | None"  # None: done (CPU, or a request not managed)
    req: "Req"


def _done(event) -> bool:
    return event is None or event.query()


def _on(stream):
    return torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext()


class HiSparseCoordinator:
    def __init__(self, config: "HiSparseConfig", req_to_token_pool: "ReqToTokenPool",
                 allocator: "HiSparseTokenToKVPoolAllocator", streams: "StepStreams",
                 mode: str, num_q_heads: int):
        assert mode in BACKUP_MODES, mode
        self.config = config
        self.top_k, self.buffer_size, self.page_size = (config.top_k, config.device_buffer_size,
                                                        config.page_size)
        self.req_to_token_pool = req_to_token_pool
        self.allocator = allocator
        self.device_allocator = allocator.device
        self.device_pool = allocator.get_kvcache()
        self.host_pool = allocator.host_pool
        self.streams = streams
        self.decode_producer_stream = streams.forward
        self.backup_mode = mode
        self.num_q_heads = num_q_heads
        self.debug = debug_hisparse()
        self._init_tables(req_to_token_pool.req_to_token.shape[0])
        # the swap-in kernel on CUDA (SGLAB_HISPARSE_SWAP_TORCH=1: its torch form everywhere)
        self.swap_kernel = self.device.type == "cuda" and \
            os.environ.get("SGLAB_HISPARSE_SWAP_TORCH", "0") != "1"
        pool = self.device_pool
        self.quest = QuestSelector(pool.layer_num, self.host_pool.size // self.page_size,
                                   pool.head_num, pool.head_dim, self.page_size,
                                   config.num_top_pages, config.num_recent_pages, self.device)
        self.staging_queue: deque[_Staging] = deque()
        self._has_pending_backup = False
        self.state: _DecodeState | None = None

    def _init_tables(self, num_rows: int) -> None:
        dev = self.device = torch.device(self.device_pool.device)
        layers, B, P = self.device_pool.layer_num, self.buffer_size, self.page_size
        self.padded_buffer_size = B + P  # the last page: the reserved slot (B) for long rows
        self.max_pages = max(-(-self.req_to_token_pool.max_context_len // P),
                             self.config.num_top_pages)
        # Per request row, on the device (read by the forward) with the host's mirrors.
        self.managed = torch.zeros(num_rows, dtype=torch.bool, device=dev)
        self.req_to_device_buffer = torch.zeros((num_rows, B + P), dtype=torch.int64, device=dev)
        self.req_to_page = torch.zeros((num_rows, self.max_pages), dtype=torch.int64, device=dev)
        self.managed_rows = [False] * num_rows
        self.req_to_device_buffer_cpu = torch.zeros((num_rows, B + P), dtype=torch.int64)
        self.req_device_buffer_size = [0] * num_rows
        self._skip_first_backup = [False] * num_rows
        self._newest_pos = [0] * num_rows  # the newest token's position as last planned
        # Per layer: the token each buffer slot holds and when it last served (the row's
        # seq_len); column B is a sink for masked writes. Per host slot: its token's buffer
        # slot, or -1 (host slot 0, in the never-allocated page 0, is the sink).
        self.buffer_tokens = torch.full((layers, num_rows, B + 1), -1, dtype=torch.int32,
                                        device=dev)
        self.last_used = torch.full((layers, num_rows, B + 1), -1, dtype=torch.int32, device=dev)
        self.resident = torch.full((layers, self.host_pool.size + P), -1, dtype=torch.int32,
                                   device=dev)

    # --- admission -----------------------------------------------------------------------------

    def manages(self, req: "Req") -> bool:
        return len(req.origin_input_ids) >= self.config.min_sparse_prompt_len

    def admit_request_into_staging(self, req: "Req") -> None:
        """After its prefill (the request unfinished): copy its KV to the host. A request not
        managed joins decode as it is."""
        if not self.manages(req):
            self.staging_queue.append(_Staging(None, req))
            return
        row, n, P = req.req_pool_idx, len(req.fill_ids), self.page_size
        logical = self.req_to_token_pool.req_to_token_cpu[row, :n].to(torch.int64)
        device = self.allocator.to_device(logical)
        start, finish = self.streams.event(), self.streams.event()
        if start is not None:
            start.record()
        with _on(self.streams.staging):
            if start is not None:
                self.streams.staging.wait_event(start)
            self._stage(row, n, logical, device, logical[::P] // P)
            if finish is not None:
                finish.record()
        self.staging_queue.append(_Staging(finish, req))

    def _stage(self, row: int, n: int, logical: torch.Tensor, device: torch.Tensor,
               pages: torch.Tensor) -> None:
        dev = self.device
        host_dev, device_dev = h2d(logical, torch.int64, dev, True), h2d(device, torch.int64,
                                                                          dev, True)
        pages_dev = h2d(pages, torch.int64, dev, True)
        self.host_pool.backup_from_device_all_layer(self.device_pool, host_dev, device_dev)
        self.req_to_page[row, :pages.numel()] = pages_dev
        for layer_id in range(self.device_pool.layer_num):
            keys = self.device_pool.get_key_buffer(layer_id)[device_dev]
            self.quest.update_prefill_reps(layer_id, pages_dev, keys, n)

    def has_ongoing_staging(self) -> bool:
        return bool(self.staging_queue)

    def collect_ready_reqs(self) -> list["Req"]:
        """The requests whose staging finished, in admission order, their buffers set up.
        (One rank: upstream all-reduces the ready count over TP so ranks agree.)"""
        ready = []
        while self.staging_queue and _done(self.staging_queue[0].finish_event):
            item = self.staging_queue.popleft()
            if self.manages(item.req):
                self.alloc_device_buffer(item.req)
            ready.append(item.req)
        return ready

    def alloc_device_buffer(self, req: "Req") -> None:
        """Keep the first `min(len, B + page)` prefill slots (whole pages) as the hot buffer,
        free the rest; the buffer holds tokens [0, min(len, B)) in slots of the same index."""
        row, n, B, P = req.req_pool_idx, len(req.fill_ids), self.buffer_size, self.page_size
        logical = self.req_to_token_pool.req_to_token_cpu[row, :n].to(torch.int64)
        device = self.allocator.to_device(logical)
        slots = (device[::P, None] // P * P + torch.arange(P)).reshape(-1)
        cap = min(slots.numel(), B + P)
        self.device_allocator.free(slots[cap:])
        self.allocator.unmap(logical)
        self.req_to_device_buffer_cpu[row].zero_()
        self.req_to_device_buffer_cpu[row, :cap] = slots[:cap]
        self.req_device_buffer_size[row] = cap
        self.managed_rows[row] = self._skip_first_backup[row] = True
        self._newest_pos[row] = n - 1
        held = min(n, B)
        tokens = torch.full((B + 1,), -1, dtype=torch.int32)
        tokens[:held] = torch.arange(held, dtype=torch.int32)
        dev = self.device
        self.req_to_device_buffer[row] = h2d(self.req_to_device_buffer_cpu[row], torch.int64,
                                             dev, True)
        self.buffer_tokens[:, row] = h2d(tokens, torch.int32, dev, True)
        self.last_used[:, row] = -1
        self.resident[:, h2d(logical[:held], torch.int64, dev, True)] = \
            h2d(tokens[:held], torch.int32, dev, True)
        self.managed[row].fill_(True)  # `[row] = True` would copy a host scalar, blocking

    def abort_staging(self, match: Callable[["Req"], bool]) -> list["Req"]:
        """Take the matching requests out of staging (their copies done first); the caller
        frees them as requests that never decoded."""
        taken = [s for s in self.staging_queue if match(s.req)]
        if not taken:
            return []
        if self.streams.staging is not None:
            self.streams.staging.synchronize()
        self.staging_queue = deque(s for s in self.staging_queue if not match(s.req))
        return [s.req for s in taken]

    def abort_staging_request(self, req: "Req") -> None:
        self.abort_staging(lambda r: r is req)

    def staging_reqs(self) -> list["Req"]:
        return [s.req for s in self.staging_queue]

    def is_staging(self, req: "Req") -> bool:
        return any(s.req is req for s in self.staging_queue)

    # --- a decode step on the host (prepare_for_decode) --------------------------------------

    def map_last_loc_to_buffer(self, rows: torch.Tensor, seq_lens: torch.Tensor,
                               out_logical: torch.Tensor) -> HiSparseStepPlan:
        """Where each row's new token goes on the device, what to back up and which pages
        open; `rows`, `seq_lens` (the new token included) and `out_logical` are the step's
        host tensors."""
        B, P = self.buffer_size, self.page_size
        managed = torch.tensor([self.managed_rows[r] for r in rows.tolist()], dtype=torch.bool)
        newest = seq_lens - 1
        grown, grow_index, grow_value = self._grow_device_buffers(rows, newest.clamp(max=B),
                                                                  managed)
        out = self.req_to_device_buffer_cpu[rows, newest.clamp(max=B)]
        if not bool(managed.all()):
            out = self._alloc_unmanaged(rows, seq_lens, out_logical, managed, out)
        prev = (seq_lens - 2).clamp(min=0)
        backup_device = self.req_to_device_buffer_cpu[rows, prev.clamp(max=B)]
        backup_host = self.req_to_token_pool.req_to_token_cpu[rows, prev].to(torch.int64)
        opens = managed & (newest % P == 0)
        sparse = managed & (seq_lens > B)
        kv_lens = torch.where(sparse, self.top_k - P + newest % P + 1, seq_lens)
        for r, pos in zip(rows.tolist(), newest.tolist()):
            self._newest_pos[r] = pos
        return HiSparseStepPlan(
            out_cache_loc=out, rows=rows.tolist(), backup_device=backup_device.tolist(),
            backup_host=backup_host.tolist(),
            page_index=(rows * self.max_pages + newest // P)[opens].tolist(),
            page_value=(out_logical // P)[opens].tolist(), grow_index=grow_index,
            grow_value=grow_value, grown=grown, kv_lens=kv_lens.tolist(), sparse=sparse.tolist(),
            num_page_cols=max(self.config.num_top_pages, -(-int(seq_lens.max()) // P)))

    def _grow_device_buffers(self, rows: torch.Tensor, slot_index: torch.Tensor,
                             managed: torch.Tensor) -> tuple[list, list[int], list[int]]:
        """One more page for each row whose new token's buffer slot is past its buffer."""
        caps = torch.tensor([self.req_device_buffer_size[r] for r in rows.tolist()])
        grow = managed & (slot_index >= caps)
        if not bool(grow.any()):
            return [], [], []
        P, width = self.page_size, self.padded_buffer_size
        grow_rows, grow_caps = rows[grow].tolist(), caps[grow].tolist()
        new = self.device_allocator.alloc(len(grow_rows) * P)
        if new is None:
            raise RuntimeError("HiSparse: no free device page to grow a hot buffer")
        index, value = [], new.tolist()
        for i, (row, cap) in enumerate(zip(grow_rows, grow_caps)):
            assert cap + P <= width, (row, cap)
            self.req_to_device_buffer_cpu[row, cap:cap + P] = new[i * P:(i + 1) * P]
            self.req_device_buffer_size[row] = cap + P
            index += range(row * width + cap, row * width + cap + P)
        return list(zip(grow_rows, grow_caps)), index, value

    def rollback_step(self, plan: HiSparseStepPlan) -> None:
        """Undo a step that failed: the pages its buffers grew by (the device rows keep stale
        columns past the size, rewritten when they grow again), and any residency its forward
        marked in the host pages it opened (the scheduler frees those)."""
        P = self.page_size
        if plan.page_value:
            pages = h2d(plan.page_value, torch.int64, self.device, True)
            self.resident.index_fill_(
                1, (pages[:, None] * P + torch.arange(P, device=self.device)).reshape(-1), -1)
        for row, cap in plan.grown:
            self.device_allocator.free(self.req_to_device_buffer_cpu[row, cap:cap + P].clone())
            self.req_to_device_buffer_cpu[row, cap:cap + P] = 0
            self.req_device_buffer_size[row] = cap

    def _alloc_unmanaged(self, rows: torch.Tensor, seq_lens: torch.Tensor,
                         out_logical: torch.Tensor, managed: torch.Tensor,
                         out: torch.Tensor) -> torch.Tensor:
        """Rows not managed take their decode slots from the device pool, mapped."""
        um = ~managed
        alloc = self.device_allocator
        if alloc.page_size == 1:
            dev = alloc.alloc(int(um.sum()))
        else:
            prev_logical = self.req_to_token_pool.req_to_token_cpu[rows[um], seq_lens[um] - 2]
            last = self.allocator.to_device(prev_logical)
            dev = alloc.alloc_decode(seq_lens[um].tolist(), last.tolist())
        if dev is None:
            raise RuntimeError("HiSparse: the device pool is out of memory during decode")
        self.allocator.map(out_logical[um], dev)
        out = out.clone()
        out[um] = dev
        return out

    # --- a decode step on the device, before the forward --------------------------------------

    def begin_decode_step(self, forward_batch: "ForwardBatch") -> None:
        """Back up the previous tokens, grow buffers, and order the forward after the backup
        (host side: before an eager forward or a graph replay)."""
        plan = forward_batch.hisparse_plan
        self._eager_backup_previous_token(forward_batch, plan)
        if plan.grow_index:
            dev = self.device
            self.req_to_device_buffer.view(-1)[h2d(plan.grow_index, torch.int64, dev, True)] = \
                h2d(plan.grow_value, torch.int64, dev, True)
        self.wait_for_pending_backup()

    def _eager_backup_previous_token(self, forward_batch: "ForwardBatch",
                                     plan: HiSparseStepPlan) -> None:
        """Back up each managed row's previous token (all layers) to its host slot, and write
        the pages the step opens into the page table; the first decode after staging skips
        the backup (staging copied the prompt).

        Before sglang#21932 (`blocking`): the rows read back from the device, the current
        stream made to wait for the forward stream, the index tensors built with blocking
        copies, the copy on the current stream: the host waits for forward N. With the PR:
        the host's own lists, one pinned non_blocking upload inside the backup stream, which
        waits for the schedule and forward streams; the forward waits on `backup_done`."""
        with audit_region("HiSparseCoordinator._eager_backup_previous_token"):
            if self.backup_mode == "blocking":
                rows = forward_batch.req_pool_indices[:len(plan.rows)].tolist()
                if self.decode_producer_stream is not None:
                    torch.cuda.current_stream().wait_stream(self.decode_producer_stream)
            else:
                rows = plan.rows
            backup = [i for i, r in enumerate(rows) if self._needs_backup(r)]
            if not backup and not plan.page_index:
                return
            host_locs = [plan.backup_host[i] for i in backup]
            if self.backup_mode == "blocking":
                backup_gpu = list_to_device(backup, torch.int64, self.device)
                pos = forward_batch.seq_lens[backup_gpu] - 2
                device_locs = self.req_to_device_buffer[
                    forward_batch.req_pool_indices[backup_gpu], pos.clamp(max=self.buffer_size)]
                meta = list_to_device(host_locs + plan.page_index + plan.page_value,
                                      torch.int64, self.device)
                self._backup(meta, device_locs, len(backup), len(plan.page_index))
                return
            self._backup_async([plan.backup_device[i] for i in backup], host_locs, plan)

    def _needs_backup(self, row: int) -> bool:
        if not self.managed_rows[row]:
            return False
        if self._skip_first_backup[row]:
            self._skip_first_backup[row] = False
            return False
        return True

    def _backup_async(self, device_locs: list[int], host_locs: list[int],
                      plan: HiSparseStepPlan) -> None:
        if self._has_pending_backup:
            torch.cuda.current_stream().wait_event(self.streams.backup_done)
            self._has_pending_backup = False
        schedule_stream = self.decode_producer_stream
        backup_stream = self.streams.backup
        with _on(backup_stream):
            if backup_stream is not None:
                backup_stream.wait_stream(schedule_stream)  # the step's uploads
                backup_stream.wait_stream(self.decode_producer_stream)  # forward N
            meta = h2d(device_locs + host_locs + plan.page_index + plan.page_value,
                       torch.int64, self.device, True)
            n = len(device_locs)
            self._backup(meta[n:], meta[:n], n, len(plan.page_index))
            if backup_stream is not None:
                self.streams.backup_done.record()
                self._has_pending_backup = True

    def _backup(self, meta: torch.Tensor, device_locs: torch.Tensor, num_tokens: int,
                num_pages: int) -> None:
        """`meta`: host slots, then page-table cells and their pages."""
        host_locs = meta[:num_tokens]
        cells, pages = meta[num_tokens:num_tokens + num_pages], meta[num_tokens + num_pages:]
        self.req_to_page.view(-1)[cells] = pages
        if num_tokens:
            self.host_pool.backup_from_device_all_layer(self.device_pool, host_locs, device_locs)

    def wait_for_pending_backup(self) -> None:
        """The current stream (the decode forward's, or a free's) waits for the last backup."""
        if not self._has_pending_backup:
            return
        torch.cuda.current_stream().wait_event(self.streams.backup_done)
        self._has_pending_backup = False

    # --- a decode step on the device: its state, and the selection at every layer --------------

    def init_decode_state(self, forward_batch: "ForwardBatch", bs: int,
                          num_page_cols: int) -> None:
        """From the step's rows and lengths only (so it runs inside the graph): which rows are
        sparse, how many keys each attends to, the newest token's page (emptied if it opens
        this step) and, for a dense row, the newest token marked resident in its slot."""
        B, P = self.buffer_size, self.page_size
        rows, lens = forward_batch.req_pool_indices[:bs], forward_batch.seq_lens[:bs]
        managed = self.managed[rows]
        newest = lens - 1
        sparse = managed & (lens > B)
        kv_lens = torch.where(sparse, self.top_k - P + newest % P + 1, lens)
        page = torch.where(managed, self.req_to_page[rows, newest // P], 0)
        self.quest.reset_pages(torch.where(managed & (newest % P == 0), page, 0))
        dense = managed & ~sparse
        col = torch.where(dense, newest, B)
        self.buffer_tokens[:, rows, col] = torch.where(dense, newest, -1).to(torch.int32)
        self.last_used[:, rows, col] = lens.to(torch.int32)
        host = torch.where(dense, page * P + newest % P, 0)
        self.resident[:, host] = torch.where(dense, newest, -1).to(torch.int32)
        self.state = _DecodeState(rows, lens, sparse, kv_lens, page,
                                  self.req_to_device_buffer[rows, B], num_page_cols)

    def decode_lens(self, forward_batch: "ForwardBatch") -> tuple[torch.Tensor, int, int]:
        """Eager: the keys each row attends to, on the device, and their host sum and max."""
        plan = forward_batch.hisparse_plan
        return self.state.kv_lens, sum(plan.kv_lens), max(plan.kv_lens)

    def select(self, layer_id: int, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        """At a decode layer, after its KV write: each sparse row's `top_k` selected device
        slots [bs, top_k] (its positions ascending; 0 past its `kv_len`), swapped in. Other
        rows' entries are meaningless."""
        st, P = self.state, self.page_size
        bs = st.rows.numel()
        self.quest.update_decode_reps(layer_id, st.newest_page, k.view(bs, *k.shape[-2:]))
        pages = self.req_to_page[st.rows, :st.num_page_cols]
        chosen, host_pages = self.quest.retrieve_topk(
            layer_id, q.view(bs, self.num_q_heads, -1), pages, st.seq_lens)
        offsets = torch.arange(P, device=self.device)
        positions = (chosen[:, :, None] * P + offsets).reshape(bs, -1)
        host = (host_pages[:, :, None] * P + offsets).reshape(bs, -1)
        return self.swap_in_selected_pages(layer_id, positions, host)

    def swap_in_selected_pages(self, layer_id: int, positions: torch.Tensor,
                               host: torch.Tensor) -> torch.Tensor:
        """Hits from the residency map; misses into the least recently used buffer slots not
        hit this step (recency saturating at `AGE_LEVELS` steps, then by slot), copied from
        the host; the newest token is in the reserved slot. Fixed shapes, no host read. On
        CUDA one kernel (`sparsity/swap_in.py`), here its torch form."""
        if self.swap_kernel:
            out, src, dst = swap_in(positions, host, self.state, self.resident[layer_id],
                                    self.last_used[layer_id], self.buffer_tokens[layer_id],
                                    self.req_to_device_buffer, self.req_to_page,
                                    self.buffer_size, self.page_size)
            self.host_pool.load_to_device_per_layer(self.device_pool, src, dst, layer_id)
            return out
        st, B, P = self.state, self.buffer_size, self.page_size
        rows, lens = st.rows[:, None], st.seq_lens[:, None]
        valid = positions < lens
        newest = positions == lens - 1
        wanted = st.sparse[:, None] & valid & ~newest
        slot = self.resident[layer_id][torch.where(wanted, host, 0)].to(torch.int64)
        hit, miss = wanted & (slot >= 0), wanted & (slot < 0)
        last_used = self.last_used[layer_id]
        last_used[rows, torch.where(hit, slot, B)] = lens.to(torch.int32)
        used = last_used[st.rows, :B].to(torch.int64)
        age = (lens - used).clamp(max=AGE_LEVELS)
        keys = (AGE_LEVELS - age) * (B + 1) + torch.arange(B, device=self.device)
        keys = torch.where(used >= lens, _NEVER, keys)
        victims = torch.topk(keys, self.top_k, dim=1, largest=False).indices
        victim = torch.gather(victims, 1, (miss.cumsum(1) - 1).clamp(min=0))
        old = self.buffer_tokens[layer_id][rows, victim].to(torch.int64)
        evicted = miss & (old >= 0)
        old_host = self.req_to_page[rows, old.clamp(min=0) // P] * P + old.clamp(min=0) % P
        # index_fill_: no host scalar to copy (a blocking upload, refused inside a capture)
        self.resident[layer_id].index_fill_(0, torch.where(evicted, old_host, 0).reshape(-1), -1)
        dst = self.req_to_device_buffer[rows, victim]
        self.host_pool.load_to_device_per_layer(self.device_pool, host.reshape(-1),
                                                torch.where(miss, dst, -1).reshape(-1), layer_id)
        self.resident[layer_id][torch.where(miss, host, 0)] = \
            torch.where(miss, victim, -1).to(torch.int32)
        col = torch.where(miss, victim, B)
        self.buffer_tokens[layer_id][rows, col] = positions.to(torch.int32)
        last_used[rows, col] = lens.to(torch.int32)
        out = self.req_to_device_buffer[rows, torch.where(hit, slot, victim)]
        out = torch.where(newest, st.reserved[:, None], out)
        return torch.where(valid, out, 0)

    def write_sparse_indices(self, kv_indices: torch.Tensor, kv_indptr: torch.Tensor,
                             selected: torch.Tensor) -> None:
        """Put each sparse row's selection into its span of a flat `kv_indices` (whose last
        element takes the masked writes)."""
        st = self.state
        bs, width = selected.shape
        col = torch.arange(width, device=self.device)
        keep = st.sparse[:, None] & (col < st.kv_lens[:, None])
        target = torch.where(keep, kv_indptr[:bs, None] + col, kv_indices.numel() - 1)
        kv_indices[target] = selected

    # --- CUDA graphs: a participant of CudaGraphRunner ---------------------------------------

    def init_cuda_graph_state(self, max_bs: int) -> None:
        """Nothing static beyond the tables: the state is computed in the graph's prologue."""

    def prepare_capture(self, bs: int) -> None:
        pass

    def graph_prologue(self, forward_batch: "ForwardBatch", bs: int) -> None:
        self.init_decode_state(forward_batch, bs, self.max_pages)

    def prepare_replay(self, forward_batch: "ForwardBatch", bs: int) -> None:
        self.begin_decode_step(forward_batch)

    # --- finish, retract, abort --------------------------------------------------------------

    def request_finished(self, req: "Req") -> None:
        """Free a managed request's hot buffer and reset its rows (its host slots are its
        logical slots: the scheduler frees those).

        Before the PR (`blocking`) and with it (`pr`): the current stream waits for the forward
        stream (and, with the PR, the pending backup), then the buffer is read back from the
        device: a step on which a request finishes blocks until the forward in flight ends
        (upstream's residual stall). sglab's `async_finish`: the forward stream only waits for
        the pending backup (on the device) and the buffer comes from the host mirror; the
        resets are queued behind the forward in flight."""
        row = req.req_pool_idx
        if row is None or not self.managed_rows[row]:
            return
        cap = self.req_device_buffer_size[row]
        with audit_region("HiSparseCoordinator.request_finished"):
            if self.backup_mode != "async_finish" and self.decode_producer_stream is not None:
                torch.cuda.current_stream().wait_stream(self.decode_producer_stream)
            if self.backup_mode != "blocking":
                self.wait_for_pending_backup()
            if self.backup_mode == "async_finish":
                slots = self.req_to_device_buffer_cpu[row, :cap]
            else:
                slots = self.req_to_device_buffer[row, :cap].cpu()
        self.device_allocator.free(slots.clone())
        self._reset_row(row)

    def _reset_row(self, row: int) -> None:
        B, P = self.buffer_size, self.page_size
        tokens = self.buffer_tokens[:, row, :B].to(torch.int64)
        host = self.req_to_page[row, tokens.clamp(min=0) // P] * P + tokens.clamp(min=0) % P
        self.resident.scatter_(1, torch.where(tokens >= 0, host, 0), -1)
        self.buffer_tokens[:, row] = -1
        self.last_used[:, row] = -1
        self.req_to_device_buffer[row] = 0
        self.managed[row].fill_(False)
        self.req_to_device_buffer_cpu[row].zero_()
        self.req_device_buffer_size[row] = 0
        self.managed_rows[row] = self._skip_first_backup[row] = False

    def retract_req(self, req: "Req") -> None:
        if self.is_staging(req):
            self.abort_staging_request(req)
        else:
            self.request_finished(req)

    # --- checks and stats ----------------------------------------------------------------------

    def get_token_stats(self) -> dict:
        device, host = self.device_allocator, self.allocator.logical
        return {"device_tokens": device.size - device.available_size(),
                "host_tokens": host.size - host.available_size(),
                "buffer_tokens": sum(self.req_device_buffer_size)}

    def check_integrity(self) -> str | None:
        """When idle: nothing staged or managed, every host and device slot free, the
        mapping and the device tables empty."""
        if self.staging_queue:
            return f"HiSparse: {len(self.staging_queue)} request(s) still staged while idle"
        if any(self.managed_rows) or any(self.req_device_buffer_size):
            return "HiSparse: a request row still holds a hot buffer while idle"
        for name, alloc in (("host", self.allocator.logical), ("device", self.device_allocator)):
            if alloc.available_size() != alloc.size:
                return (f"HiSparse: {alloc.size - alloc.available_size()} {name} KV slots "
                        "leaked while idle")
        if bool(self.allocator.mapping.any()):
            return "HiSparse: logical slots still mapped to device slots while idle"
        if bool((self.resident != -1).any()):
            return "HiSparse: the residency map still marks tokens resident while idle"
        tokens = self.buffer_tokens[:, :, :self.buffer_size]  # (column B is a sink)
        if bool(self.managed.any()) or bool((tokens != -1).any()):
            return "HiSparse: a device buffer table is not reset while idle"
        return None

    def check_invariants(self) -> str | None:
        """Debug, after a step (synchronizes): no device page held twice or both held and
        free, the free lists conserve the pool, and every resident token older than its
        row's newest holds in its buffer slot the KV of its host copy, per layer."""
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        problem = self._check_device_pages()
        if problem:
            return problem
        for row, managed in enumerate(self.managed_rows):
            problem = self._check_row(row) if managed else None
            if problem:
                return problem
        return None

    def _check_device_pages(self) -> str | None:
        P = self.page_size
        held = [self.req_to_device_buffer_cpu[r, :self.req_device_buffer_size[r]]
                for r, m in enumerate(self.managed_rows) if m]
        mapped = self.allocator.mapping[self.allocator.mapping > 0]
        pages = torch.cat([torch.unique(t // P) for t in held] + [torch.unique(mapped // P)])
        if pages.unique().numel() != pages.numel():
            return "HiSparse: a device page is held twice (hot buffers, mapped slots)"
        free = self.device_allocator.free_pages
        if bool(torch.isin(pages, free).any()):
            return "HiSparse: a device page is both free and held"
        if free.numel() + pages.numel() != self.device_allocator.num_pages:
            return (f"HiSparse: device pages not conserved: {free.numel()} free + "
                    f"{pages.numel()} held != {self.device_allocator.num_pages}")
        return None

    def _check_row(self, row: int) -> str | None:
        B, P = self.buffer_size, self.page_size
        tokens = self.buffer_tokens[:, row, :B].cpu().to(torch.int64)
        pages = self.req_to_page[row].cpu()
        buffer = self.req_to_device_buffer_cpu[row, :B]
        resident = self.resident.cpu()
        for layer_id in range(tokens.shape[0]):
            slots = torch.nonzero((tokens[layer_id] >= 0)
                                  & (tokens[layer_id] < self._newest_pos[row])).flatten()
            pos = tokens[layer_id, slots]
            host = pages[pos // P] * P + pos % P
            if not bool((resident[layer_id, host] == slots).all()):
                return f"HiSparse: row {row} layer {layer_id}: residency map disagrees"
            for dev_buf, host_buf in ((self.device_pool.k_buffer, self.host_pool.k_buffer),
                                      (self.device_pool.v_buffer, self.host_pool.v_buffer)):
                dev_kv = dev_buf[layer_id][buffer[slots].to(self.device)].cpu()
                if not torch.equal(dev_kv, host_buf[layer_id][host]):
                    return (f"HiSparse: row {row} layer {layer_id}: a resident slot's KV "
                            "differs from its host copy")
        return self._check_summaries(row, pages[:self._newest_pos[row] // P])

    def _check_summaries(self, row: int, full_pages: torch.Tensor) -> str | None:
        """Quest's min and max keys of a row's full pages are those of their host copies."""
        P = self.page_size
        slots = (full_pages[:, None] * P + torch.arange(P)).reshape(-1)
        keys = self.host_pool.k_buffer[:, slots].view(self.device_pool.dtype).float()
        keys = keys.view(keys.shape[0], -1, P, *keys.shape[2:])
        if not (torch.equal(self.quest.k_min[:, full_pages.to(self.device)].cpu(), keys.amin(2))
                and torch.equal(self.quest.k_max[:, full_pages.to(self.device)].cpu(),
                                keys.amax(2))):
            return f"HiSparse: row {row}: a page's Quest summary differs from its keys"
        return None
