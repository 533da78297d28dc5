"""What lets the scheduler run one step ahead of the device: the future map, the result copy,
and the streams and events a step uses.

Order a step relies on (all on `StepStreams.forward`, so stream order is the only barrier):
  1. the step's uploads (`srt/utils/h2d.py`), 2. the forward, which first gathers each decode
  row's input token from the future map, 3. the sampler, then `FutureMap.store` of the sampled
  tokens by request row, 4. the result's one device->host copy into a pinned ring slot, behind
  which the slot's event is recorded. The host reads a slot only after its event; a slot is
  reused only after the host has read it.

A decode step with grammars delays 3-4 (`GenerationBatchResult.launch_delayed_sample`): its
forward N+1 is launched first, then step N's result is processed (the grammars accept its
tokens), then the mask is built on the host and its H2D copy enqueued on `forward` behind
forward N+1, then the sampler, which reads it in stream order. No event is needed while the
copy and the sampler share the stream; the host never waits for forward N+1. The delayed sample
runs before forward N+2 is launched, so N+2's gather still finds N+1's tokens.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from sglab.srt.utils.h2d import is_pin_memory_available


class StepStreams:
    """The streams and events of a step: the forward stream (the current stream, where the
    scheduler's device work runs too) and, with HiSparse, its staging and backup streams.

    HiSparse's order (`managers/hisparse_coordinator.py`):
      * staging: the prefill's KV device->host. The staging stream waits for an event recorded
        on `forward` behind the prefill (RAW on the prefill's KV); the request joins decode
        only once the host has seen the staging's finish event, and only then are its prefill
        slots past its hot buffer freed (WAR: nothing reuses them while they are read).
      * backup (patch 0004 on): step N's newest token, device->host. Enqueued before forward
        N+1, `backup` waits for all `forward` has so far, forward N included (RAW on the token's
        slot). `backup_done` is recorded behind it, and forward N+1 waits for it before its
        first KV write and swap-in (WAR on the reserved slot the backup reads; RAW on the host
        copy and page table a swap-in reads). One event is enough: `backup` is FIFO, so its
        latest record covers every earlier backup. Before freeing a request's slots,
        `forward` waits for it too (a later prefill may reuse the slot the backup reads).
    """

    def __init__(self, device: torch.device, hisparse: bool = False):
        self.device = device
        self.on_cuda = device.type == "cuda"
        self.forward = torch.cuda.current_stream(device) if self.on_cuda else None
        with_side = self.on_cuda and hisparse
        self.staging = torch.cuda.Stream(device) if with_side else None
        self.backup = torch.cuda.Stream(device) if with_side else None
        self.backup_done = torch.cuda.Event() if with_side else None

    def event(self) -> "torch.cuda.Event | None":
        return torch.cuda.Event() if self.on_cuda else None


class FutureMap:
    """Each request row's last sampled token, on the device.

    A forward stores its sampled tokens at the rows of its requests; the next decode of a row
    gathers its input token from there, so the host never builds (or uploads) decode input ids
    and, under overlap, step N+1 reads what step N sampled before the host has seen it. A row's
    token is rewritten only by a later forward of the row's request (or of its next owner, whose
    prefill runs after every earlier reader of the row), so stream order keeps it safe.
    """

    def __init__(self, num_rows: int, device: torch.device):
        self.token_ids = torch.zeros(num_rows, dtype=torch.int64, device=device)

    def store(self, req_pool_indices: torch.Tensor, next_token_ids: torch.Tensor) -> None:
        self.token_ids.index_copy_(0, req_pool_indices, next_token_ids)

    def gather(self, req_pool_indices: torch.Tensor) -> torch.Tensor:
        return self.token_ids.index_select(0, req_pool_indices)


@dataclass
class _Slot:
    buf: torch.Tensor  # uint8, pinned where available
    event: "torch.cuda.Event | None"
    busy: bool = False  # holds a result the host has not read yet


_ALIGN = 16


class ResultRing:
    """The step results' device->host copy: one copy per step into a slot of a persistent ring
    of (pinned) host buffers, each with a reused event. Several outputs of a step are packed
    into one device buffer first, so the step still makes one copy."""

    def __init__(self, streams: StepStreams):
        self.streams = streams
        self.pin = is_pin_memory_available(streams.device)
        self.slots: list[_Slot] = []

    def copy(self, tensors: dict[str, torch.Tensor | None]) -> "PendingResult":
        present = {k: t for k, t in tensors.items() if t is not None}
        layout, total = {}, 0
        for name, t in present.items():
            nbytes = t.numel() * t.element_size()
            layout[name] = (total, nbytes, t.dtype, tuple(t.shape))
            total += -(-nbytes // _ALIGN) * _ALIGN
        slot = self._acquire(max(total, _ALIGN))
        if len(present) == 1:  # nothing to pack: the one output goes straight to the slot
            (name, t), = present.items()
            _view(slot.buf, layout[name]).copy_(t, non_blocking=True)
        elif present:
            staging = torch.empty(total, dtype=torch.uint8, device=self.streams.device)
            for name, t in present.items():
                _view(staging, layout[name]).copy_(t)
            slot.buf[:total].copy_(staging, non_blocking=True)
        if slot.event is not None:
            slot.event.record()
        return PendingResult(slot, layout, [k for k, t in tensors.items() if t is None])

    def _acquire(self, nbytes: int) -> _Slot:
        slot = next((s for s in self.slots if not s.busy), None)
        if slot is None:
            slot = _Slot(torch.empty(0, dtype=torch.uint8), self.streams.event())
            self.slots.append(slot)
        if slot.buf.numel() < nbytes:
            slot.buf = torch.empty(max(nbytes, 2 * slot.buf.numel()), dtype=torch.uint8,
                                   pin_memory=self.pin)
        slot.busy = True
        return slot


class PendingResult:
    """A step's outputs on their way to the host; `read` waits for the copy and frees the slot."""

    def __init__(self, slot: _Slot, layout: dict, absent: list[str]):
        self.slot, self.layout, self.absent = slot, layout, absent

    def read(self) -> dict[str, list | None]:
        if self.slot.event is not None:
            self.slot.event.synchronize()
        out: dict[str, list | None] = {name: None for name in self.absent}
        for name, entry in self.layout.items():
            out[name] = _view(self.slot.buf, entry).tolist()
        self.slot.busy = False
        return out


def _view(buf: torch.Tensor, entry: tuple) -> torch.Tensor:
    off, nbytes, dtype, shape = entry
    return buf[off:off + nbytes].view(dtype).view(shape)
