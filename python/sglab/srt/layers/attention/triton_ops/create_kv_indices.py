"""Flatten per-request KV slots out of req_to_token: the kv_indices every attention kernel reads.

For request i: kv_indices[kv_indptr[i] : kv_indptr[i] + page_kernel_lens[i]] =
req_to_token[req_pool_indices[i], start_i : start_i + page_kernel_lens[i]], start_i =
kv_start_idx[i] (or 0). Both versions size nothing from device values, so neither syncs.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def create_flashinfer_kv_indices_triton(
    req_to_token,
    req_pool_indices,
    page_kernel_lens,
    kv_indptr,
    kv_start_idx,
    kv_indices,
    req_to_token_stride,
    HAS_START: tl.constexpr,
    BLOCK: tl.constexpr,
):
    pid = tl.program_id(0)
    row = tl.load(req_pool_indices + pid).to(tl.int64)
    out_start = tl.load(kv_indptr + pid)
    num = tl.load(page_kernel_lens + pid)
    start = 0
    if HAS_START:
        start = tl.load(kv_start_idx + pid)
    src = req_to_token + row * req_to_token_stride + start
    for off in range(0, num, BLOCK):
        offs = off + tl.arange(0, BLOCK)
        mask = offs < num
        slots = tl.load(src + offs, mask=mask)
        tl.store(kv_indices + out_start + offs, slots, mask=mask)


def create_kv_indices(
    req_to_token: torch.Tensor,
    req_pool_indices: torch.Tensor,
    page_kernel_lens: torch.Tensor,
    kv_indptr: torch.Tensor,
    kv_start_idx: torch.Tensor | None,
    kv_indices: torch.Tensor,
) -> None:
    """Fill kv_indices (grid = bs = len(req_pool_indices)); entries past kv_indptr[bs] untouched."""
    bs = req_pool_indices.shape[0]
    assert req_to_token.stride(1) == 1
    if bs == 0 or kv_indices.numel() == 0:
        return
    create_flashinfer_kv_indices_triton[(bs,)](
        req_to_token,
        req_pool_indices,
        page_kernel_lens,
        kv_indptr,
        kv_start_idx if kv_start_idx is not None else page_kernel_lens,
        kv_indices,
        req_to_token.stride(0),
        HAS_START=kv_start_idx is not None,
        BLOCK=512,
    )


def create_kv_indices_torch(
    req_to_token: torch.Tensor,
    req_pool_indices: torch.Tensor,
    page_kernel_lens: torch.Tensor,
    kv_indptr: torch.Tensor,
    kv_start_idx: torch.Tensor | None,
    kv_indices: torch.Tensor,
) -> None:
    """Same contract as create_kv_indices, in plain torch ops (one gather, no host sync)."""
    bs = req_pool_indices.shape[0]
    total = kv_indices.numel()
    if bs == 0 or total == 0:
        return
    device = kv_indices.device
    indptr = kv_indptr[: bs + 1].to(torch.int64)
    pos = torch.arange(total, device=device, dtype=torch.int64)
    req = torch.searchsorted(indptr[1:], pos, right=True).clamp_(max=bs - 1)
    col = pos - indptr[req]
    if kv_start_idx is not None:
        col = col + kv_start_idx.to(torch.int64)[req]
    valid = (pos < indptr[bs]) & (pos - indptr[req] < page_kernel_lens.to(torch.int64)[req])
    col = col.clamp_(0, req_to_token.shape[1] - 1)
    slots = req_to_token[req_pool_indices.to(torch.int64)[req], col]
    kv_indices.copy_(torch.where(valid, slots.to(kv_indices.dtype), kv_indices))
