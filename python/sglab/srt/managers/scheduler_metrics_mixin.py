"""The scheduler's decode statistics: upstream's "Decode batch" log line every
--decode-log-interval decode steps, and the generation throughput it reports."""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from sglab.srt.managers.schedule_batch import ScheduleBatch
    from sglab.srt.managers.scheduler import Scheduler

logger = logging.getLogger(__name__)


class SchedulerMetricsMixin:
    def init_metrics(self: Scheduler) -> None:
        self.forward_ct_decode = 0
        self.num_generated_tokens = 0
        self.last_gen_throughput = 0.0
        self.last_decode_stats_tic = time.perf_counter()
        self.graph_backend_label = "cuda graph" if self.server_args.device == "cuda" \
            else f"{self.server_args.device} graph"

    def update_gen_throughput(self: Scheduler, now: float) -> None:
        """The tokens generated since the last update, per second."""
        self.last_gen_throughput = self.num_generated_tokens / (now - self.last_decode_stats_tic)
        self.num_generated_tokens, self.last_decode_stats_tic = 0, now

    def report_decode_stats(self: Scheduler, batch: ScheduleBatch) -> None:
        """Called after every decode step's result: host-side counts only; the line itself
        only every decode_log_interval steps, on an attention group's rank 0."""
        self.forward_ct_decode += 1
        if self.forward_ct_decode % self.server_args.decode_log_interval != 0:
            return
        self.update_gen_throughput(time.perf_counter())
        if self.attn_tp_group.rank != 0:
            return
        num_used = self.max_total_num_tokens - (self.token_to_kv_pool_allocator.available_size()
                                                + self.tree_cache.evictable_size())
        logger.info(
            f"Decode batch, #running-req: {len(batch.reqs)}, #token: {num_used}, "
            f"token usage: {num_used / self.max_total_num_tokens:.2f}, "
            f"{self.graph_backend_label}: {self._can_run_graph_locally(batch)}, "
            f"gen throughput (token/s): {self.last_gen_throughput:.2f}, "
            f"#queue-req: {len(self.waiting_queue)}")
