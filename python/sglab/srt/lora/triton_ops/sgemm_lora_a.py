"""LoRA A: `out[s] = x[s] @ A[slot(s)]^T` for each request's segment of tokens.

One program per (token block x output block, request); the request is on the grid's last axis
and reads its segment, slot and rank from the batch info on the device. Output columns past the
slot's rank inside each stacked block are zero; a rank-0 slot (the base model) is skipped and
its rows stay as allocated (zeros).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from sglab.srt.lora.triton_ops.common import _dot, check_batch_info, dot_args
from sglab.srt.lora.utils import LoRABatchInfo


@triton.jit
def _sgemm_lora_a_kernel(
    x, weights, output,
    N, K, R,  # N = stack_num * R output columns, K input dim, R max rank (rows per block)
    x_stride_0, x_stride_1,
    w_stride_0, w_stride_1, w_stride_2,
    out_stride_0, out_stride_1,
    seg_lens, seg_indptr, weight_indices, lora_ranks,
    BLOCK_S: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    PORTABLE_DOT: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    batch_id = tl.program_id(axis=1)
    w_index = tl.load(weight_indices + batch_id).to(tl.int64)
    rank = tl.load(lora_ranks + w_index)
    if rank == 0:
        return
    seg_len = tl.load(seg_lens + batch_id)
    seg_start = tl.load(seg_indptr + batch_id).to(tl.int64)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    pid_s = tl.program_id(axis=0) // num_pid_n
    pid_n = tl.program_id(axis=0) % num_pid_n
    if pid_s * BLOCK_S >= seg_len:
        return
    s_offset = pid_s * BLOCK_S + tl.arange(0, BLOCK_S)
    n_offset = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    k_offset = tl.arange(0, BLOCK_K)
    s_mask = s_offset < seg_len
    n_valid = (n_offset < N) & ((n_offset % R) < rank)
    x_ptrs = x + (seg_start + s_offset)[:, None] * x_stride_0 + k_offset[None, :] * x_stride_1
    w_ptrs = (weights + w_index * w_stride_0 + n_offset[None, :] * w_stride_1
              + k_offset[:, None] * w_stride_2)
    acc = tl.zeros((BLOCK_S, BLOCK_N), dtype=tl.float32)
    for k in range(tl.cdiv(K, BLOCK_K)):
        k_mask = k_offset < K - k * BLOCK_K
        x_tile = tl.load(x_ptrs, mask=s_mask[:, None] & k_mask[None, :], other=0.0)
        w_tile = tl.load(w_ptrs, mask=k_mask[:, None] & n_valid[None, :], other=0.0)
        acc += _dot(x_tile, w_tile, PORTABLE_DOT, DOT_PRECISION)
        x_ptrs += BLOCK_K * x_stride_1
        w_ptrs += BLOCK_K * w_stride_2
    out_ptrs = (output + (seg_start + s_offset)[:, None] * out_stride_0
                + n_offset[None, :] * out_stride_1)
    tl.store(out_ptrs, acc.to(output.dtype.element_ty),
             mask=s_mask[:, None] & (n_offset < N)[None, :])


def sgemm_lora_a_fwd(x: torch.Tensor, weights: torch.Tensor, batch_info: LoRABatchInfo,
                     stack_num: int = 1) -> torch.Tensor:
    """x [S, K], weights [num_slots, stack_num * R, K] -> [S, stack_num * R]."""
    assert x.dim() == 2 and weights.dim() == 3 and x.shape[1] == weights.shape[2]
    assert weights.shape[1] % stack_num == 0 and weights.is_contiguous()
    check_batch_info(batch_info)
    S, K = x.shape
    N = weights.shape[1]
    BLOCK_S, BLOCK_N, BLOCK_K = 16, 16, 64
    output = torch.zeros((S, N), dtype=x.dtype, device=x.device)
    grid = (triton.cdiv(batch_info.max_len, BLOCK_S) * triton.cdiv(N, BLOCK_N), batch_info.bs)
    _sgemm_lora_a_kernel[grid](
        x, weights, output, N, K, N // stack_num,
        x.stride(0), x.stride(1),
        weights.stride(0), weights.stride(1), weights.stride(2),
        output.stride(0), output.stride(1),
        batch_info.seg_lens, batch_info.seg_indptr, batch_info.weight_indices,
        batch_info.lora_ranks,
        BLOCK_S=BLOCK_S, BLOCK_N=BLOCK_N, BLOCK_K=BLOCK_K,
        **dot_args(x, _sgemm_lora_a_kernel),
    )
    return output
