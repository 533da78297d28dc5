"""Host -> device copies of per-step metadata, in the three forms patch 0001 compares.

* `pageable` (patch off, upstream before sglang#21360): each upload from pageable memory,
  `non_blocking=True`; the driver stages it through its own pinned buffer.
* `pinned` (the PR, in upstream's final form): each upload built directly in pinned memory
  (`torch.tensor(data, dtype=..., pin_memory=True)`), then copied `non_blocking`.
* `packed` (sglab's own mode beyond the PR): every upload of a step written into one slot of
  a pinned staging ring and sent with a single H2D copy; the step's device tensors are views
  of that one device buffer. A slot is rewritten only after the event recorded behind its
  copy has fired, so the host never overwrites bytes a queued copy has yet to read.

`sglab.srt.debug.sync_audit` observes these helpers (pageable and blocking copies) through
`COPY_OBSERVERS`; nothing here depends on the audit.
"""

from __future__ import annotations

import functools
from typing import Callable, Sequence, Union

import torch

H2D_MODES = ("pageable", "pinned", "packed")
# Called with the kind of each copy that can stall the host or the stream ("pageable_h2d",
# "blocking_h2d"); the sync audit registers itself here.
COPY_OBSERVERS: list[Callable[[str], None]] = []

HostData = Union[torch.Tensor, Sequence[int], Sequence[float]]


def _observe(kind: str) -> None:
    for observer in COPY_OBSERVERS:
        observer(kind)


@functools.lru_cache(maxsize=None)
def is_pin_memory_available(device: torch.device | str) -> bool:
    """Pinned host memory only helps (and only works) with an accelerator as the target."""
    return torch.device(device).type == "cuda" and torch.cuda.is_available()


def h2d(data: HostData, dtype: torch.dtype, device: torch.device | str,
        pin: bool) -> torch.Tensor:
    """Upload host data (a list or a CPU tensor) for this step, non_blocking.

    `pin=True` builds the source in pinned memory (async DMA, when the target is an
    accelerator); `pin=False` copies from pageable memory, which the driver may serialize with
    the stream: counted as `pageable_h2d` by the audit.
    """
    if not pin:
        _observe("pageable_h2d")
    pin = pin and is_pin_memory_available(device)
    if isinstance(data, torch.Tensor):
        if pin:  # born a tensor: one pinned buffer and one host copy into it
            src = torch.empty(data.shape, dtype=dtype, pin_memory=True)
            src.copy_(data)
        else:
            src = data.to(dtype)
        return src.to(device, non_blocking=True)
    return torch.tensor(data, dtype=dtype, pin_memory=pin).to(device, non_blocking=True)


def h2d_into(dst: torch.Tensor, data: torch.Tensor, pin: bool) -> None:
    """Copy host `data` into the device tensor `dst` (a static buffer), non_blocking; from
    pinned memory with `pin`, else pageable (counted as `pageable_h2d`)."""
    if not pin:
        _observe("pageable_h2d")
    if pin and is_pin_memory_available(dst.device):
        src = torch.empty(data.shape, dtype=dst.dtype, pin_memory=True)
        src.copy_(data)
        data = src
    dst.copy_(data, non_blocking=True)


def list_to_device(data, dtype: torch.dtype, device: torch.device | str) -> torch.Tensor:
    """`torch.tensor(list, device=...)`: a blocking host->device copy on an accelerator, after
    reading back one by one the elements that are device scalars (0-d tensors: the sync
    audit's host-read hooks count those reads)."""
    if torch.device(device).type == "cpu":
        _observe("blocking_h2d")  # on CUDA, sync-debug mode reports it
    return torch.tensor(data, dtype=dtype, device=device)


def setitem_scalar(t: torch.Tensor, index, value) -> None:
    """`t[index] = python_scalar`: on an accelerator a blocking host->device copy of the
    scalar, plus a device->host read when the index is a device scalar (a 0-d tensor)."""
    if t.device.type == "cpu":  # on CUDA, sync-debug mode reports these
        if isinstance(index, torch.Tensor) and index.dim() == 0:
            _observe("d2h")
        _observe("blocking_h2d")
    t[index] = value


def index_with_list(t: torch.Tensor, index: list[int]) -> torch.Tensor:
    """`t[python_list]`: the list goes to the device first, a blocking copy."""
    if t.device.type == "cpu":
        _observe("blocking_h2d")
    return t[index]


def index_put_with_list(t: torch.Tensor, index: list[int], value: torch.Tensor) -> None:
    """`t[python_list] = value`: the list goes to the device first, a blocking copy."""
    if t.device.type == "cpu":
        _observe("blocking_h2d")
    t[index] = value


class StepUploader:
    """Uploads one step's named host arrays in the form of `mode` (see the module docstring)."""

    def __init__(self, device: torch.device | str, mode: str, num_slots: int = 4):
        assert mode in H2D_MODES, mode
        self.device = torch.device(device)
        self.mode = mode
        self.ring = PinnedStagingRing(self.device, num_slots) if mode == "packed" else None

    def upload(self, items: dict[str, tuple[HostData, torch.dtype]]) -> dict[str, torch.Tensor]:
        if self.ring is not None:
            return self.ring.upload(items)
        pin = self.mode == "pinned"
        return {name: h2d(data, dtype, self.device, pin) for name, (data, dtype) in items.items()}


_ALIGN = 16  # bytes: every dtype group of the device buffer starts aligned for its dtype


class PinnedStagingRing:
    """Packs a step's uploads into one pinned slot and sends them with one H2D copy.

    Items are grouped by dtype: one `torch.cat` per group writes the slot, and the device side
    is one view per group plus a slice per item, so the host cost grows by a few tensor ops per
    item instead of a pinned allocation and a copy each.
    """

    def __init__(self, device: torch.device, num_slots: int):
        self.device = device
        self.pin = is_pin_memory_available(device)
        self.slots: list[torch.Tensor | None] = [None] * num_slots
        self.events: list[torch.cuda.Event | None] = [None] * num_slots
        self.next_slot = 0

    def upload(self, items: dict[str, tuple[HostData, torch.dtype]]) -> dict[str, torch.Tensor]:
        groups: dict[torch.dtype, list] = {}
        for name, (data, dtype) in items.items():
            groups.setdefault(dtype, []).append((name, _flat(data, dtype)))
        layout, total = [], 0
        for dtype, parts in groups.items():
            numel = sum(t.numel() for _, t in parts)
            layout.append((dtype, parts, total, numel))
            total += -(-numel * dtype.itemsize // _ALIGN) * _ALIGN
        i, slot = self._take_slot(max(total, _ALIGN))
        for dtype, parts, off, numel in layout:
            torch.cat([t for _, t in parts], out=slot[off:off + numel * dtype.itemsize].view(dtype))
        buf = self._send(i, slot, total)
        out = {}
        for dtype, parts, off, numel in layout:
            group, start = buf[off:off + numel * dtype.itemsize].view(dtype), 0
            for name, t in parts:
                out[name] = group[start:start + t.numel()]
                start += t.numel()
        for name, (data, _) in items.items():
            if isinstance(data, torch.Tensor) and data.dim() != 1:
                out[name] = out[name].view(data.shape)
        return out

    def _take_slot(self, nbytes: int) -> tuple[int, torch.Tensor]:
        i = self.next_slot
        self.next_slot = (i + 1) % len(self.slots)
        if self.events[i] is not None:
            self.events[i].synchronize()  # the copy from this slot, several steps ago, is done
        slot = self.slots[i]
        if slot is None or slot.numel() < nbytes:
            slot = torch.empty(max(nbytes, 2 * (slot.numel() if slot is not None else 0)),
                               dtype=torch.uint8, pin_memory=self.pin)
            self.slots[i] = slot
        return i, slot

    def _send(self, i: int, slot: torch.Tensor, total: int) -> torch.Tensor:
        if self.device.type == "cpu":
            return slot[:total].clone()
        buf = torch.empty(total, dtype=torch.uint8, device=self.device)
        buf.copy_(slot[:total], non_blocking=True)
        event = self.events[i] or torch.cuda.Event()
        event.record()
        self.events[i] = event
        return buf


def _flat(data: HostData, dtype: torch.dtype) -> torch.Tensor:
    """A 1-D CPU tensor of `dtype` holding `data`."""
    if not isinstance(data, torch.Tensor):
        return torch.tensor(data, dtype=dtype)
    if data.dtype != dtype:
        data = data.to(dtype)
    return data if data.dim() == 1 else data.reshape(-1)
