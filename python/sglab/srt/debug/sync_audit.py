"""Sync audit: counts host-blocking operations per scheduler step and per call site.

Inside an audited region (`with audit_region("ForwardBatch.init_new"):`) it counts
- on CUDA: every synchronization `torch.cuda.set_sync_debug_mode` reports (`cuda_sync`);
- on CPU, a proxy for what would block on a GPU: host reads of tensor values (`.item()`,
  `.tolist()`, `int()`/`float()`/`bool()`, `.cpu()`, `.numpy()`), and through a torch dispatch
  mode `nonzero`, boolean-mask indexing, `masked_select` / `unique` and `repeat_interleave`
  without `output_size`; tensors built from Python lists for the device (`blocking_h2d`);
- on both: host→device copies from pageable memory (`pageable_h2d`), which sync-debug mode does
  not report;
- and the host time spent in each region (`host_ms`, apart from the counts): on a GPU, where a
  region blocks, its time is how long the host waited.

Host mirrors must be read outside the regions (as Python ints), so that on CPU every tensor
read inside a region stands for a device tensor.

The audit is process-wide debug instrumentation, switched on once (`--enable-sync-audit`);
when off, the copy helpers it observes (`srt/utils/h2d.py`) cost one call and one attribute
check.
"""

from __future__ import annotations

import contextlib
import threading
import time
import warnings
from collections import defaultdict
from typing import Iterator, Sequence

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from sglab.srt.utils.h2d import COPY_OBSERVERS

_aten = torch.ops.aten


class _SyncDispatchMode(TorchDispatchMode):
    def __init__(self, audit: "SyncAudit"):
        super().__init__()
        self.audit = audit

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        kind = _blocking_kind(func, args, kwargs)
        if kind is not None:
            self.audit.record(kind)
        return func(*args, **kwargs)


def _blocking_kind(func, args: Sequence, kwargs: dict) -> str | None:
    packet = func.overloadpacket
    if packet in (_aten.nonzero, _aten.nonzero_static):
        return "nonzero" if packet is _aten.nonzero else None
    if packet in (_aten.masked_select, _aten._unique2, _aten.unique_dim,
                  _aten.unique_consecutive):
        return "data_dependent_shape"
    if packet is _aten.index and len(args) > 1:
        if any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in args[1]):
            return "bool_mask_index"
    if packet is _aten.repeat_interleave and func is _aten.repeat_interleave.Tensor:
        if kwargs.get("output_size") is None and (len(args) < 2 or args[1] is None):
            return "repeat_interleave_no_output_size"
    if packet is _aten.repeat_interleave and func is _aten.repeat_interleave.self_Tensor:
        if kwargs.get("output_size") is None and (len(args) < 4 or args[3] is None):
            return "repeat_interleave_no_output_size"
    return None


_HOST_READS = ("item", "tolist", "__int__", "__float__", "__bool__", "__index__", "cpu", "numpy")


@contextlib.contextmanager
def _host_read_hooks(audit: "SyncAudit") -> Iterator[None]:
    """CPU proxy: count the Tensor methods that read values back to the host."""
    originals = {name: getattr(torch.Tensor, name) for name in _HOST_READS}

    def wrap(name, fn):
        def hooked(self, *args, **kwargs):
            audit.record("d2h")
            return fn(self, *args, **kwargs)
        return hooked

    for name, fn in originals.items():
        setattr(torch.Tensor, name, wrap(name, fn))
    try:
        yield
    finally:
        for name, fn in originals.items():
            setattr(torch.Tensor, name, fn)


class SyncAudit:
    def __init__(self) -> None:
        self.enabled = False
        self._local = threading.local()
        self._step: dict[tuple[str, str], int] = defaultdict(int)
        self.steps: list[dict[tuple[str, str], int]] = []
        self._step_ms: dict[str, float] = defaultdict(float)
        self.step_ms: list[dict[str, float]] = []  # host ms per region, per step

    @property
    def region_name(self) -> str | None:
        stack = getattr(self._local, "stack", None)
        return stack[-1] if stack else None

    def record(self, kind: str, n: int = 1) -> None:
        region = self.region_name
        if self.enabled and region is not None:
            self._step[(region, kind)] += n

    @contextlib.contextmanager
    def region(self, name: str) -> Iterator[None]:
        if not self.enabled:
            yield
            return
        stack = self._local.__dict__.setdefault("stack", [])
        outermost = not stack
        stack.append(name)
        start = time.perf_counter()
        try:
            if not outermost:
                yield
            elif torch.cuda.is_available():
                with self._cuda_sync_debug():
                    yield
            else:
                with _SyncDispatchMode(self), _host_read_hooks(self):
                    yield
        finally:
            self._step_ms[name] += (time.perf_counter() - start) * 1e3
            stack.pop()

    @contextlib.contextmanager
    def _cuda_sync_debug(self) -> Iterator[None]:
        if not torch.cuda.is_available():
            yield
            return
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            prev = torch.cuda.get_sync_debug_mode()
            torch.cuda.set_sync_debug_mode("warn")
            try:
                yield
            finally:
                torch.cuda.set_sync_debug_mode(prev)
        n = sum("synchroniz" in str(w.message) for w in caught)
        if n:
            self._step[(self.region_name or "?", "cuda_sync")] += n

    def step_end(self) -> None:
        if self.enabled:
            self.steps.append(dict(self._step))
            self.step_ms.append(dict(self._step_ms))
            self._step.clear()
            self._step_ms.clear()

    def reset(self) -> None:
        self._step.clear()
        self.steps.clear()
        self._step_ms.clear()
        self.step_ms.clear()

    def report(self) -> dict:
        """Totals and per-step means per (region, kind)."""
        totals: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))
        for step in self.steps:
            for (region, kind), n in step.items():
                totals[region][kind] += n
        num_steps = len(self.steps)
        per_step = {r: {k: n / num_steps for k, n in kinds.items()}
                    for r, kinds in totals.items()} if num_steps else {}
        total = sum(sum(k.values()) for k in totals.values())
        host_ms: dict[str, float] = defaultdict(float)
        for step in self.step_ms:
            for region, ms in step.items():
                host_ms[region] += ms
        return {"enabled": self.enabled, "steps": num_steps,
                "syncs_per_step": total / num_steps if num_steps else 0.0,
                "totals": {r: dict(k) for r, k in totals.items()}, "per_step": per_step,
                "host_ms_per_step": {r: ms / num_steps for r, ms in host_ms.items()}
                if num_steps else {}}


AUDIT = SyncAudit()
COPY_OBSERVERS.append(AUDIT.record)  # pageable / blocking uploads made by srt/utils/h2d.py


def audit_region(name: str):
    return AUDIT.region(name)
