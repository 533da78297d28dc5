"""LoRA on the scheduler: binding requests to adapters, and loading and unloading adapters
while requests run."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from sglab.srt.managers.io_struct import (
    LoadLoRAAdapterReqInput,
    LoRAUpdateOutput,
    UnloadLoRAAdapterReqInput,
)
from sglab.srt.managers.schedule_batch import Req

if TYPE_CHECKING:
    from sglab.srt.managers.scheduler import Scheduler

logger = logging.getLogger(__name__)


class SchedulerLoRAMixin:
    def _resolve_lora(self: Scheduler, req: Req, lora_name: str | None) -> str | None:
        """Bind the request to the adapter registered under `lora_name`; an error message if
        there is none."""
        if lora_name is None:
            return None
        if self.lora_manager is None:
            return "LoRA is not enabled. Please set `--enable-lora` to enable LoRA."
        req.lora_id = self.lora_manager.get_lora_id(lora_name)
        if req.lora_id is None:
            loaded = ", ".join(sorted(self.lora_manager.loaded_adapters())) or "none"
            return (f"The requested LoRA adapter {lora_name!r} is not loaded. "
                    f"Loaded adapters: {loaded}.")
        return None

    def _lora_ids_in_batches(self: Scheduler) -> set[str | None]:
        """Adapters of the running batch, the chunked request and the batches in flight."""
        reqs = list(self.running_batch.reqs)
        if self.chunked_req is not None:
            reqs.append(self.chunked_req)
        for batch, _ in self.result_queue:
            reqs.extend(batch.reqs)
        return {r.lora_id for r in reqs}

    def _lora_ids_in_use(self: Scheduler) -> set[str | None]:
        """Adapters any request still needs: waiting, running, or not yet processed."""
        ids = self._lora_ids_in_batches() | {r.lora_id for r in self.waiting_queue}
        if self.last_batch is not None:
            ids |= {r.lora_id for r in self.last_batch.reqs}
        return ids

    def load_lora_adapter(self: Scheduler, recv_req: LoadLoRAAdapterReqInput) -> LoRAUpdateOutput:
        from sglab.srt.lora.lora_registry import LoRARef

        if self.lora_manager is None:
            return LoRAUpdateOutput(success=False, error_message=(
                "LoRA is not enabled. Please set `--enable-lora` to enable LoRA."))
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
            return LoRAUpdateOutput(success=False, error_message=(
                "LoRA is not enabled. Please set `--enable-lora` to enable LoRA."))
        try:
            self.lora_manager.unload_lora_adapter(recv_req.lora_name, self._lora_ids_in_use())
        except ValueError as e:
            return LoRAUpdateOutput(success=False, error_message=str(e))
        logger.info("Unloaded LoRA adapter %r", recv_req.lora_name)
        return LoRAUpdateOutput(loaded_adapters=self.lora_manager.loaded_adapters())
