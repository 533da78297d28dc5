"""DP attention on the scheduler: each attention group schedules its own requests, and every
step all groups agree on what runs (upstream's `prepare_mlp_sync_batch`), because the MLP's
collectives span every rank.

Per step every rank all-gathers, on the CPU group: whether it has a batch, its token and
request counts, whether it extends, whether it can replay a CUDA graph and its forward mode.
From that each batch learns every group's token count, `is_extend_in_batch` (MAX), whether
all ranks can replay a graph (MIN) and, patch 0003c, `all_extend_in_batch` (MIN of "this rank
runs a pure EXTEND"). A rank with nothing to run runs an IDLE batch (no tokens) so that the
collectives still match; when no rank has a batch, nobody runs.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from sglab.srt.model_executor.forward_batch_info import ForwardMode

if TYPE_CHECKING:
    from sglab.srt.managers.schedule_batch import ScheduleBatch
    from sglab.srt.managers.scheduler import Scheduler

# Fields of the per-step all-gather, in order.
_HAS_BATCH, _NUM_TOKENS, _NUM_REQS, _IS_EXTEND, _CAN_GRAPH, _MODE = range(6)


class SchedulerDPAttentionMixin:
    def prepare_mlp_sync_batch(self: Scheduler,
                               batch: ScheduleBatch | None) -> ScheduleBatch | None:
        """This step's batch with the ranks' agreement on it; IDLE where another rank runs and
        this one has nothing; None when no rank has anything."""
        local = [batch is not None, batch.num_tokens() if batch else 0,
                 batch.batch_size() if batch else 0,
                 bool(batch is not None and batch.forward_mode.is_extend()),
                 self._can_run_graph_locally(batch),
                 int(batch.forward_mode) if batch else int(ForwardMode.IDLE)]
        # One row per attention group: its rank 0 speaks for it (its peers hold the same batch).
        rows = self.tp_group.all_gather_ints(local)[::self.dp_info.attn_tp_size]
        self.dp_peers_busy = any(r[_HAS_BATCH] for r in rows)
        if not self.dp_peers_busy:
            return None
        if batch is None:
            batch = self._new_batch([])
            batch.prepare_for_idle()
        batch.global_num_tokens = [r[_NUM_TOKENS] for r in rows]
        batch.is_extend_in_batch = any(r[_IS_EXTEND] for r in rows)
        batch.can_run_dp_cuda_graph = all(r[_CAN_GRAPH] for r in rows)
        # Patch 0003c: upstream 0.5.11 has no such field (the off path never sets it).
        batch.all_extend_in_batch = self.patch_flags.dp_prefill_cuda_graph and \
            all(r[_MODE] == int(ForwardMode.EXTEND) for r in rows)
        return batch

    def _can_run_graph_locally(self: Scheduler, batch: ScheduleBatch | None) -> bool:
        """Whether this rank's part of the step fits a captured graph (an IDLE rank pads)."""
        runner = self.tp_worker.model_runner
        if batch is None:
            return runner.graph_runner is not None
        return any(r.fits_locally(batch) for r in runner.graph_runners())

    def should_block_on_recv(self: Scheduler) -> bool:
        """Wait for requests only while no rank has work (the others would wait for us)."""
        return self.is_idle() and not (self.dp_info.enabled and self.dp_peers_busy)
