"""Arrival counters for one-launch reductions: the programs that share a result each add one
when their part is stored, and the last to arrive reduces the parts and sets its counter back to
zero (the greedy argmax's rows, the split-K GEMM's column tiles)."""

from __future__ import annotations

import torch

_counts: dict[torch.device, list[torch.Tensor]] = {}


def arrival_counters(device: torch.device, n: int) -> torch.Tensor:
    """At least `n` int32 counters, zero between launches (each launch re-zeroes the ones it
    used), per device, shared by every launch: launches must run one after another on one
    stream (the forward stream). A larger request gets a larger buffer; the smaller ones stay
    allocated, since CUDA graphs captured with them keep using them."""
    buffers = _counts.setdefault(device, [])
    if not buffers or buffers[-1].numel() < n:
        buffers.append(torch.zeros(max(n, 4096), dtype=torch.int32, device=device))
    return buffers[-1]
