"""LoRA on the scheduler: binding requests to adapters, and loading and unloading adapters
while requests run."""

from __future__ import annotations

import logging
from collections.abc import Collection
from typing import TYPE_CHECKING

from sglab.srt.managers.io_struct import (
    LoadLoRAAdapterReqInput,
    LoRAUpdateOutput,
    UnloadLoRAAdapterReqInput,
)
from sglab.srt.managers.request_validator import LORA_NOT_ENABLED
from sglab.srt.managers.schedule_batch import Req

if TYPE_CHECKING:
    from sglab.srt.managers.scheduler import Scheduler

logger = logging.getLogger(__name__)


class SchedulerLoRAMixin:
    def _loaded_lora_adapters(self: Scheduler, lora_name: str | None) -> Collection[str]:
        """The adapter names a request naming `lora_name` may use (looked up only then)."""
        if lora_name is None or self.lora_manager is None:
            return ()
        return self.lora_manager.loaded_adapters()

    def _lora_id(self: Scheduler, lora_name: str | None) -> str | None:
        """The id of the adapter registered under `lora_name` (validated as loaded) now; an
        adapter loaded again later under the same name is a new one."""
        return None if lora_name is None else self.lora_manager.get_lora_id(lora_name)

    def _lora_ids_in_batches(self: Scheduler) -> set[str | None]:
        """Adapters of the running batch, the chunked request, the batches in flight and the
        requests HiSparse is staging."""
        reqs = list(self.running_batch.reqs)
        if self.chunked_req is not None:
            reqs.append(self.chunked_req)
        for batch, _ in self.result_queue:
            reqs.extend(batch.reqs)
        if self.hisparse is not None:  # staged: they join the running batch next
            reqs.extend(self.hisparse.staging_reqs())
        return {r.lora_id for r in reqs}

    def _lora_admission(self: Scheduler) -> set[str | None] | None:
        """The adapters a new prefill starts from (those of the running, chunked and in-flight
        requests), for `_lora_admits`; None without LoRA."""
        return self._lora_ids_in_batches() if self.lora_manager is not None else None

    def _lora_admits(self: Scheduler, batch_ids: set[str | None] | None, req: Req) -> bool:
        """At most --max-loras-per-batch adapters (base included) among the running, in-flight
        and new requests: each needs a slot, and slots in use stay put. Adds req's adapter to
        `batch_ids` when it is admitted."""
        if batch_ids is None or req.lora_id in batch_ids:
            return True
        if len(batch_ids) >= self.lora_manager.max_loras_per_batch:
            return False
        batch_ids.add(req.lora_id)
        return True

    def _lora_ids_in_use(self: Scheduler) -> set[str | None]:
        """Adapters any request still needs: waiting, running, or not yet processed."""
        ids = self._lora_ids_in_batches() | {r.lora_id for r in self.waiting_queue}
        if self.last_batch is not None:
            ids |= {r.lora_id for r in self.last_batch.reqs}
        return ids

    def load_lora_adapter(self: Scheduler, recv_req: LoadLoRAAdapterReqInput) -> LoRAUpdateOutput:
        from sglab.srt.lora.lora_registry import LoRARef

        if self.lora_manager is None:
            return LoRAUpdateOutput(success=False, error_message=LORA_NOT_ENABLED)
        ref = LoRARef(recv_req.lora_name, recv_req.lora_path, bool(recv_req.pinned))
        try:
            self.lora_manager.load_lora_adapter(ref, self._lora_ids_in_use())
        except Exception as e:  # noqa: BLE001 - a bad adapter is the client's error, not ours
            if not isinstance(e, ValueError):
                logger.exception("Loading LoRA adapter %r failed", recv_req.lora_name)
            logger.warning("Loading LoRA adapter %r failed: %s", recv_req.lora_name, e)
            return LoRAUpdateOutput(success=False, error_message=str(e))
        logger.info("Loaded LoRA adapter %r from %s", ref.lora_name, ref.lora_path)
        return LoRAUpdateOutput(loaded_adapters=self.lora_manager.loaded_adapters())

    def unload_lora_adapter(self: Scheduler,
                            recv_req: UnloadLoRAAdapterReqInput) -> LoRAUpdateOutput:
        if self.lora_manager is None:
            return LoRAUpdateOutput(success=False, error_message=LORA_NOT_ENABLED)
        try:
            self.lora_manager.unload_lora_adapter(recv_req.lora_name, self._lora_ids_in_use())
        except ValueError as e:
            return LoRAUpdateOutput(success=False, error_message=str(e))
        logger.info("Unloaded LoRA adapter %r", recv_req.lora_name)
        return LoRAUpdateOutput(loaded_adapters=self.lora_manager.loaded_adapters())
