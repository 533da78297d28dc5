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
def _copy_row(src, dst, ROW: tl.constexpr, BLOCK: tl.constexpr):
    for start in range(0, ROW, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        mask = cols < ROW
        tl.store(dst + cols, tl.load(src + cols, mask=mask), mask=mask)


@triton.jit
def _transfer_kv_rows_kernel(src, dst, src2, dst2, src_indices, dst_indices, n,
                             src_layer_stride, dst_layer_stride, ROW: tl.constexpr,
                             BLOCK: tl.constexpr, ENTRIES: tl.constexpr, PAIR: tl.constexpr):
    layer = tl.program_id(1).to(tl.int64)
    for i in range(ENTRIES):
        entry = tl.program_id(0) * ENTRIES + i
        d = tl.load(dst_indices + entry, mask=entry < n, other=-1).to(tl.int64)
        if d >= 0:
            at_src = layer * src_layer_stride + tl.load(src_indices + entry).to(tl.int64) * ROW
            at_dst = layer * dst_layer_stride + d * ROW
            _copy_row(src + at_src, dst + at_dst, ROW, BLOCK)
            if PAIR:
                _copy_row(src2 + at_src, dst2 + at_dst, ROW, BLOCK)


def transfer_kv_rows(src: torch.Tensor, dst: torch.Tensor, src_indices: torch.Tensor,
                     dst_indices: torch.Tensor, use_kernel: bool | None = None,
                     also: tuple[torch.Tensor, torch.Tensor] | None = None) -> None:
    """`src` [L, N, ...] and `dst` [L, M, ...] (one layer: `t.unsqueeze(0)`), rows contiguous,
    the same row shape and dtype; indices [n] on the copy's device. Where `dst_indices[i] < 0`
    nothing is copied. `also`: a second (src, dst) pair of the same layouts (V with K), copied
    with the same indices in the same kernel. `use_kernel`: default, the kernel on CUDA."""
    for a, b in [(src, dst)] + ([also] if also else []):
        assert a.shape[0] == b.shape[0] and a.shape[2:] == b.shape[2:], (a.shape, b.shape)
        assert a.dtype == b.dtype and a[0, 0].is_contiguous() and b[0, 0].is_contiguous()
        assert a.stride(1) == b.stride(1) == a[0, 0].numel()
        assert a.stride(0) == src.stride(0) and b.stride(0) == dst.stride(0)
    if use_kernel is None:
        use_kernel = dst_indices.is_cuda
    if use_kernel:
        _launch(src, dst, src_indices, dst_indices, also)
    else:
        for a, b in [(src, dst)] + ([also] if also else []):
            _transfer_torch(a, b, src_indices, dst_indices)


_ENTRIES = 8  # entries per program: most are skipped (-1) in a swap-in's fixed shape


def _launch(src: torch.Tensor, dst: torch.Tensor, src_indices: torch.Tensor,
            dst_indices: torch.Tensor, also) -> None:
    n, layers = dst_indices.numel(), src.shape[0]
    if n == 0:
        return
    row = src[0, 0].numel()
    block = min(triton.next_power_of_2(row), _MAX_BLOCK)
    src2, dst2 = also if also else (src, dst)
    _transfer_kv_rows_kernel[(triton.cdiv(n, _ENTRIES), layers)](
        src, dst, src2, dst2, src_indices, dst_indices, n, src.stride(0), dst.stride(0),
        ROW=row, BLOCK=block, ENTRIES=_ENTRIES, PAIR=also is not None)


def _transfer_torch(src: torch.Tensor, dst: torch.Tensor, src_indices: torch.Tensor,
                    dst_indices: torch.Tensor) -> None:
    """The CPU form, fixed shapes too: a skipped entry copies into row 0 (both pools' sink,
    never handed out)."""
    keep = dst_indices >= 0
    d = torch.where(keep, dst_indices, 0).to(torch.int64)
    s = torch.where(keep, src_indices, 0).to(torch.int64)
    dst[:, d] = src[:, s].to(dst.device)
