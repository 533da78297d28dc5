"""KV row copies between the device pool and the pinned host pool, with no host sync.

`transfer_kv_rows(src, dst, src_indices, dst_indices)` copies row `src_indices[i]` of every
layer of `src` to row `dst_indices[i]` of `dst`; a negative destination skips the entry, so a
caller passes fixed shapes (CUDA-graph safe) and masks what it does not copy. On the GPU it is
one Triton kernel that reads or writes pinned host memory through its device pointer (UVA:
a pinned tensor's address is valid on the device), so a host->device swap-in or a
device->host backup is a kernel on the stream, not a copy the host waits for. On CPU it is an
indexed copy.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

_MAX_BLOCK = 1024


@triton.jit
def _transfer_kv_rows_kernel(src, dst, src_indices, dst_indices, src_layer_stride,
                             dst_layer_stride, ROW: tl.constexpr, BLOCK: tl.constexpr):
    entry = tl.program_id(0)
    layer = tl.program_id(1).to(tl.int64)
    d = tl.load(dst_indices + entry).to(tl.int64)
    if d >= 0:
        s = tl.load(src_indices + entry).to(tl.int64)
        src_row = src + layer * src_layer_stride + s * ROW
        dst_row = dst + layer * dst_layer_stride + d * ROW
        for start in range(0, ROW, BLOCK):
            cols = start + tl.arange(0, BLOCK)
            mask = cols < ROW
            tl.store(dst_row + cols, tl.load(src_row + cols, mask=mask), mask=mask)


def transfer_kv_rows(src: torch.Tensor, dst: torch.Tensor, src_indices: torch.Tensor,
                     dst_indices: torch.Tensor, use_kernel: bool | None = None) -> None:
    """`src` [L, N, ...] and `dst` [L, M, ...] (one layer: `t.unsqueeze(0)`), rows contiguous,
    the same row shape and dtype; indices [n] on the copy's device. Where `dst_indices[i] < 0`
    nothing is copied. `use_kernel`: default, the kernel on CUDA."""
    assert src.shape[0] == dst.shape[0] and src.shape[2:] == dst.shape[2:], \
        (src.shape, dst.shape)
    assert src.dtype == dst.dtype and src[0, 0].is_contiguous() and dst[0, 0].is_contiguous()
    assert src.stride(1) == dst.stride(1) == src[0, 0].numel()
    if use_kernel is None:
        use_kernel = dst_indices.is_cuda
    if use_kernel:
        _launch(src, dst, src_indices, dst_indices)
    else:
        _transfer_torch(src, dst, src_indices, dst_indices)


def _launch(src: torch.Tensor, dst: torch.Tensor, src_indices: torch.Tensor,
            dst_indices: torch.Tensor) -> None:
    n, layers = dst_indices.numel(), src.shape[0]
    if n == 0:
        return
    row = src[0, 0].numel()
    block = min(triton.next_power_of_2(row), _MAX_BLOCK)
    _transfer_kv_rows_kernel[(n, layers)](src, dst, src_indices, dst_indices, src.stride(0),
                                          dst.stride(0), ROW=row, BLOCK=block)


def _transfer_torch(src: torch.Tensor, dst: torch.Tensor, src_indices: torch.Tensor,
                    dst_indices: torch.Tensor) -> None:
    """The CPU form, fixed shapes too: a skipped entry copies into row 0 (both pools' sink,
    never handed out)."""
    keep = dst_indices >= 0
    d = torch.where(keep, dst_indices, 0).to(torch.int64)
    s = torch.where(keep, src_indices, 0).to(torch.int64)
    dst[:, d] = src[:, s].to(dst.device)
