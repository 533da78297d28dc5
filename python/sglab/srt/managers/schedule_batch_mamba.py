"""ScheduleBatch's steps for the Mamba state of hybrid models (upstream keeps them inline in
`schedule_batch.py`): a new request's slot starts from its cached prefix's state, and, with the
extra_buffer strategy, each step says which requests snapshot their state into which track
slot (`mamba_track_indices` / `mamba_track_mask`, device tensors as upstream; a prefill also
`mamba_track_seqlens`: where in its extend).

Patch 0003b decides how the decode step builds them (sglang#19639); its sub-mode beyond the PR
(`host_track`) also builds the prefill's without host reads.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from sglab.srt.debug.sync_audit import audit_region
from sglab.srt.server_args import MAMBA_CACHE_CHUNK_SIZE
from sglab.srt.utils.h2d import h2d, list_to_device

if TYPE_CHECKING:
    from sglab.srt.managers.schedule_batch import ModelWorkerBatch, Req
    from sglab.srt.mem_cache.memory_pool import HybridReqToTokenPool


class ScheduleBatchMambaMixin:
    def _hybrid_pool(self) -> "HybridReqToTokenPool | None":
        pool = self.req_to_token_pool
        return pool if hasattr(pool, "mamba_pool") else None

    def _evict_mamba_for(self, reqs: list["Req"]) -> None:
        """Make room in the state pool for the slots these requests are about to take."""
        pool = self._hybrid_pool()
        if pool is None:
            return
        need = sum(1 + (pool.mamba_ping_pong_track_buffer_size
                        if pool.enable_mamba_extra_buffer else 0)
                   for r in reqs if r.mamba_pool_idx is None)
        short = need - pool.mamba_pool.available_size()
        if short > 0 and self.tree_cache is not None:
            self.tree_cache.evict_mamba(short)

    def _copy_prefix_states(self, new_reqs: list["Req"]) -> None:
        """A request that reuses a cached prefix starts from the state cached with it."""
        pool = self._hybrid_pool()
        hits = [r for r in new_reqs if len(r.prefix_indices)
                and getattr(r.last_node, "mamba_value", None) is not None]
        if pool is None or not hits:
            return
        src = torch.cat([r.last_node.mamba_value for r in hits])
        dst = torch.stack([r.mamba_pool_idx for r in hits])
        pool.mamba_pool.copy_from(src, dst)

    # --- prefill -------------------------------------------------------------------------------

    def _prepare_mamba_track_for_extend(self) -> None:
        """Per request: snapshot after the last whole chunk of its extend (or at the branching
        point a prefix match found), as upstream's `_mamba_radix_cache_v2_req_prepare_for_extend`;
        the chunk is upstream's max(FLA_CHUNK_SIZE, page_size)."""
        pool = self._hybrid_pool()
        if pool is None or not pool.enable_mamba_extra_buffer:
            return
        chunk = max(MAMBA_CACHE_CHUNK_SIZE, self.token_to_kv_pool_allocator.page_size)
        with audit_region("prepare_for_extend.mamba_track"):
            mask, seqlens, indices = [], [], []
            if pool.host_track:  # before the loop flips the ping-pong indices
                self.mamba_track_indices = _track_slots(self.reqs, pool.device)
            for req, prefix_len in zip(self.reqs, self.prefix_lens):
                if not pool.host_track:
                    indices.append(
                        req.mamba_ping_pong_track_buffer[req.mamba_next_track_idx].item())
                seqlens.append(_extend_track_seqlen(req, prefix_len, chunk, pool))
                mask.append(seqlens[-1] >= 0)
            if pool.host_track:
                self.mamba_track_mask = h2d(mask, torch.bool, pool.device, pin=True)
                self.mamba_track_seqlens = h2d(seqlens, torch.int64, pool.device, pin=True)
                self.mamba_track_mask_cpu, self.mamba_track_seqlens_cpu = mask, seqlens
            else:  # upstream 0.5.11 (unchanged by sglang#19639)
                self.mamba_track_indices = list_to_device(indices, torch.int64, pool.device)
                self.mamba_track_mask = list_to_device(mask, torch.bool, pool.device)
                self.mamba_track_seqlens = list_to_device(seqlens, torch.int64, pool.device)

    # --- decode --------------------------------------------------------------------------------

    def _prepare_mamba_track_for_decode(self) -> None:
        """Which requests snapshot after this step (`seq_lens % mamba_track_interval == 0`) and
        into which track slot (`ping_pong[mamba_next_track_idx]`)."""
        pool = self._hybrid_pool()
        if pool is None or not pool.enable_mamba_extra_buffer:
            return
        with audit_region("prepare_for_decode.mamba_track"):
            interval = pool.track_interval
            if pool.sync_free:  # sglang#19639: gathered on the device, mask uploaded pinned
                self.mamba_track_indices = _track_slots(self.reqs, pool.device)
                self.mamba_track_mask = h2d(self.seq_lens_cpu % interval == 0, torch.bool,
                                            pool.device, pin=True)
            else:  # before: each slot read back, both lists uploaded blocking
                self.mamba_track_indices = list_to_device(
                    [r.mamba_ping_pong_track_buffer[r.mamba_next_track_idx] for r in self.reqs],
                    torch.int64, pool.device)
                self.mamba_track_mask = list_to_device(
                    [sl % interval == 0 for sl in self.seq_lens_cpu], torch.bool, pool.device)

    def _clear_mamba_track(self) -> None:
        self.mamba_track_indices = self.mamba_track_mask = self.mamba_track_seqlens = None
        self.mamba_track_mask_cpu = self.mamba_track_seqlens_cpu = None

    def _mamba_worker_fields(self, mwb: "ModelWorkerBatch") -> None:
        mwb.mamba_track_indices = self.mamba_track_indices
        mwb.mamba_track_mask = self.mamba_track_mask
        mwb.mamba_track_seqlens = self.mamba_track_seqlens
        mwb.mamba_track_mask_cpu = self.mamba_track_mask_cpu
        mwb.mamba_track_seqlens_cpu = self.mamba_track_seqlens_cpu


def _track_slots(reqs: list["Req"], device) -> torch.Tensor:
    """Each request's next track slot, gathered on the device from its ping-pong buffer."""
    if not reqs:
        return torch.empty((0,), dtype=torch.int64, device=device)
    all_buffers = torch.stack([r.mamba_ping_pong_track_buffer for r in reqs])
    idx = h2d([r.mamba_next_track_idx for r in reqs], torch.int64, device, pin=True)
    return torch.gather(all_buffers, 1, idx.unsqueeze(1)).squeeze(1).to(torch.int64)


def _extend_track_seqlen(req: "Req", prefix_len: int, chunk: int,
                         pool: "HybridReqToTokenPool") -> int:
    """The sequence length this prefill snapshots the request at, or -1; flips the request's
    ping-pong index and records the snapshot length when it does."""
    extend_len = req.extend_input_len
    if extend_len < chunk:
        return -1
    seqlen = prefix_len + extend_len // chunk * chunk
    branch = req.mamba_branching_seqlen
    if branch is not None and prefix_len < branch < prefix_len + extend_len \
            and (branch - prefix_len) % chunk == 0:
        seqlen = branch  # a cached path diverges here: snapshot where a later match stops
    req.mamba_next_track_idx = pool.get_mamba_ping_pong_other_idx(req.mamba_next_track_idx)
    req.mamba_last_track_seqlen = seqlen
    return seqlen
