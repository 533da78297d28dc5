"""Programmatic dependent launch (PDL) for sglab's decode-path Triton kernels
(`SGLAB_TRITON_PDL=1`, Hopper and newer; off by default: on an H200 it was within a few percent
either way per decode replay, and slower at bs 1 and 64 with the current attention tiles,
benchmark/results/2026-12-03-h200-kernel-decode-splits.md).

With PDL a kernel may be scheduled while the one before it on the stream is still running: its
programs start, then block in `griddepcontrol.wait` until the previous grid has completed and
its writes are visible. In a decode CUDA graph of a small model most of a step is kernel
boundaries (drain, launch, ramp-up); PDL overlaps the next kernel's launch with the previous
kernel's tail.

The contract, for every kernel launched with `pdl_launch(t)`:
- it takes `USE_PDL: tl.constexpr` and calls `pdl_wait(USE_PDL)` before its first global
  load or store, so nothing it reads or writes can race the kernels before it (the wait is for
  their completion, so it holds transitively through every kernel on the stream);
- `pdl_wait` also lets the next kernel be scheduled (`griddepcontrol.launch_dependents`): that
  kernel waits in turn, so the early signal is only about scheduling, never about data.
Kernels from torch or cuBLAS never signal: a PDL kernel after one of them starts when it ends,
as without PDL.
"""

from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl


@functools.cache
def pdl_enabled() -> bool:
    """SGLAB_TRITON_PDL=1 on a GPU of compute capability 9.0 or newer with a Triton that has
    the griddepcontrol ops; read once (tests call pdl_enabled.cache_clear())."""
    if os.environ.get("SGLAB_TRITON_PDL", "0") != "1" or not torch.cuda.is_available():
        return False
    if os.environ.get("TRITON_INTERPRET") == "1":
        return False
    has_ops = hasattr(getattr(tl.extra, "cuda", None), "gdc_wait")
    return has_ops and torch.cuda.get_device_capability()[0] >= 9


def pdl_launch(t: torch.Tensor) -> dict:
    """Launch keyword arguments for a PDL-aware kernel whose operands include `t`: the
    constexpr and the launch attribute together, or neither."""
    if t.is_cuda and pdl_enabled():
        return {"USE_PDL": True, "launch_pdl": True}
    return {"USE_PDL": False}


@triton.jit
def pdl_wait(USE_PDL: tl.constexpr):
    if USE_PDL:
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()
