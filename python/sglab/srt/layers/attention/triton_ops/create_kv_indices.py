"""Flatten per-request KV slots out of req_to_token: the kv_indices every attention kernel reads.

For request i: kv_indices[kv_indptr[i] : kv_indptr[i] + page_kernel_lens[i]] =
req_to_token[req_pool_indices[i], start_i : start_i + page_kernel_lens[i]], start_i =
kv_start_idx[i] (or 0). Both versions size nothing from device values, so neither syncs.
`decode_kv_indices` also computes kv_indptr (and the decode split counts) in the same launch.
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


@triton.jit
def _decode_kv_indices_kernel(req_to_token, rows_ptr, lens_ptr, kv_indptr, kv_indices,
                              splits_ptr, bs, req_to_token_stride, max_splits, min_keys,
                              WRITE_SPLITS: tl.constexpr, BLOCK_BS: tl.constexpr,
                              BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    i = tl.arange(0, BLOCK_BS)
    lens = tl.load(lens_ptr + i, mask=i < bs, other=0).to(tl.int64)
    end = tl.sum(tl.where(i <= pid, lens, 0), 0)  # this row's inclusive prefix sum
    num = tl.load(lens_ptr + pid).to(tl.int64)
    tl.store(kv_indptr + pid + 1, end.to(kv_indptr.dtype.element_ty))
    if WRITE_SPLITS:
        tile = tl.maximum((tl.max(lens, 0) + max_splits - 1) // max_splits, min_keys)
        splits = tl.minimum(tl.maximum((num + tile - 1) // tile, 1), max_splits)
        tl.store(splits_ptr + pid, splits.to(tl.int32))
    row = tl.load(rows_ptr + pid).to(tl.int64)
    src = req_to_token + row * req_to_token_stride
    dst = kv_indices + end - num
    for off in range(0, num, BLOCK):
        offs = off + tl.arange(0, BLOCK)
        mask = offs < num
        tl.store(dst + offs, tl.load(src + offs, mask=mask), mask=mask)


def decode_kv_indices(req_to_token: torch.Tensor, req_pool_indices: torch.Tensor,
                      seq_lens: torch.Tensor, kv_indptr: torch.Tensor, kv_indices: torch.Tensor,
                      num_kv_splits: torch.Tensor | None, max_kv_splits: int,
                      min_keys_per_split: int) -> None:
    """A decode graph's attention metadata in one launch (`--kernel-fusion on`):
    kv_indptr[1:bs+1] = cumsum(seq_lens), kv_indices as create_kv_indices, and, given
    num_kv_splits, each row's split count from the batch's longest length as
    TritonAttnBackend._num_kv_splits computes it (ceil(max / max_kv_splits) keys a split, at
    least min_keys_per_split, 1 to max_kv_splits splits). kv_indptr[0] stays as it is (0)."""
    bs = req_pool_indices.shape[0]
    assert req_to_token.stride(1) == 1
    if bs == 0:
        return
    _decode_kv_indices_kernel[(bs,)](
        req_to_token, req_pool_indices, seq_lens, kv_indptr, kv_indices,
        num_kv_splits if num_kv_splits is not None else seq_lens, bs, req_to_token.stride(0),
        max_kv_splits, min_keys_per_split, WRITE_SPLITS=num_kv_splits is not None,
        BLOCK_BS=triton.next_power_of_2(bs), BLOCK=512)
