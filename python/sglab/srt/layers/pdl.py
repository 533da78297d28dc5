"""Programmatic dependent launch (PDL) for sglab's decode-path Triton kernels (Hopper and
newer). `SGLAB_TRITON_PDL`: `auto` (the default) launches with PDL the kernels of at most
PDL_AUTO_MAX_ROWS token rows, `1` every PDL-aware kernel, `0` none. On an H200 PDL took 4-6%
off qwen3-0.6b decode replays at bs 1 and 8 and added 2-4% at bs 64
(benchmark/results/2026-12-03-h200-kernel-decode-pdl.md).

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


PDL_AUTO_MAX_ROWS = 8


@functools.cache
def pdl_mode() -> str:
    """"on", "auto" or "off": SGLAB_TRITON_PDL (1, auto or unset, 0) on a GPU of compute
    capability 9.0 or newer with a Triton that has the griddepcontrol ops, else "off"; read
    once (tests call pdl_mode.cache_clear())."""
    env = os.environ.get("SGLAB_TRITON_PDL", "auto")
    if env not in ("0", "1", "auto"):
        raise ValueError(f"SGLAB_TRITON_PDL={env!r}: expected 0, 1 or auto")
    if env == "0" or not torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1":
        return "off"
    has_ops = hasattr(getattr(tl.extra, "cuda", None), "gdc_wait")
    if not has_ops or torch.cuda.get_device_capability()[0] < 9:
        return "off"
    return "on" if env == "1" else "auto"


def pdl_launch(t: torch.Tensor) -> dict:
    """Launch keyword arguments for a PDL-aware kernel whose token-major operands include `t`
    (rows first): the constexpr and the launch attribute together, or neither."""
    mode = pdl_mode()
    if t.is_cuda and (mode == "on" or mode == "auto" and t.shape[0] <= PDL_AUTO_MAX_ROWS):
        return {"USE_PDL": True, "launch_pdl": True}
    return {"USE_PDL": False}


@triton.jit
def pdl_wait(USE_PDL: tl.constexpr):
    if USE_PDL:
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()
