"""LoRA B, fused with the scaling and the residual add: `base[s] += scale * x[s] @ B[slot]^T`.

`x` is LoRA A's output `[S, R]`; only its first `rank` columns are read. A rank-0 slot returns
at once, so base-model requests cost nothing.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from sglab.srt.lora.triton_ops.common import _dot, check_batch_info, dot_args
from sglab.srt.lora.utils import LoRABatchInfo


@triton.jit
def _sgemm_lora_b_kernel(
    x, weights, output,
    N,
    x_stride_0, x_stride_1,
    w_stride_0, w_stride_1, w_stride_2,
    out_stride_0, out_stride_1,
    seg_lens, seg_indptr, weight_indices, lora_ranks, scalings,
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
    scaling = tl.load(scalings + w_index)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    pid_s = tl.program_id(axis=0) // num_pid_n
    pid_n = tl.program_id(axis=0) % num_pid_n
    if pid_s * BLOCK_S >= seg_len:
        return
    s_offset = pid_s * BLOCK_S + tl.arange(0, BLOCK_S)
    n_offset = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    k_offset = tl.arange(0, BLOCK_K)
    s_mask = s_offset < seg_len
    n_mask = n_offset < N
    x_ptrs = x + (seg_start + s_offset)[:, None] * x_stride_0 + k_offset[None, :] * x_stride_1
    w_ptrs = (weights + w_index * w_stride_0 + n_offset[None, :] * w_stride_1
              + k_offset[:, None] * w_stride_2)
    acc = tl.zeros((BLOCK_S, BLOCK_N), dtype=tl.float32)
    for k in range(tl.cdiv(rank, BLOCK_K)):
        k_mask = k_offset < rank - k * BLOCK_K
        x_tile = tl.load(x_ptrs, mask=s_mask[:, None] & k_mask[None, :], other=0.0)
        w_tile = tl.load(w_ptrs, mask=k_mask[:, None] & n_mask[None, :], other=0.0)
        acc += _dot(x_tile, w_tile, PORTABLE_DOT, DOT_PRECISION)
        x_ptrs += BLOCK_K * x_stride_1
        w_ptrs += BLOCK_K * w_stride_2
    acc *= scaling
    out_ptrs = (output + (seg_start + s_offset)[:, None] * out_stride_0
                + n_offset[None, :] * out_stride_1)
    out_mask = s_mask[:, None] & n_mask[None, :]
    acc += tl.load(out_ptrs, mask=out_mask, other=0.0).to(tl.float32)
    tl.store(out_ptrs, acc.to(output.dtype.element_ty), mask=out_mask)


def sgemm_lora_b_fwd(x: torch.Tensor, weights: torch.Tensor, batch_info: LoRABatchInfo,
                     base_output: torch.Tensor) -> torch.Tensor:
    """x [S, R], weights [num_slots, N, R]; adds into base_output [S, N] in place."""
    assert x.dim() == 2 and weights.dim() == 3 and x.shape[1] == weights.shape[2]
    assert base_output.shape == (x.shape[0], weights.shape[1]) and weights.is_contiguous()
    check_batch_info(batch_info)
    N = weights.shape[1]
    BLOCK_S, BLOCK_N, BLOCK_K = 16, 64, 16
    grid = (triton.cdiv(batch_info.max_len, BLOCK_S) * triton.cdiv(N, BLOCK_N), batch_info.bs)
    _sgemm_lora_b_kernel[grid](
        x, weights, base_output, N,
        x.stride(0), x.stride(1),
        weights.stride(0), weights.stride(1), weights.stride(2),
        base_output.stride(0), base_output.stride(1),
        batch_info.seg_lens, batch_info.seg_indptr, batch_info.weight_indices,
        batch_info.lora_ranks, batch_info.scalings,
        BLOCK_S=BLOCK_S, BLOCK_N=BLOCK_N, BLOCK_K=BLOCK_K,
        **dot_args(x, _sgemm_lora_b_kernel),
    )
    return base_output
