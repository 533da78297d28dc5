"""LoRA B for stacked modules (qkv_proj, gate_up_proj), fused with scaling and residual add.

Grid axis 1 picks the slice: slice i reads rank block i of LoRA A's output
(`x[:, i * R : i * R + rank]`) and writes output columns `[offsets[i], offsets[i + 1])`, where
`offsets` is a device tensor. For qkv_proj that tensor is the layer's `output_offset`, the one
patch 0005 stops rebuilding on every forward.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from sglab.srt.lora.triton_ops.common import _dot, check_batch_info, dot_args
from sglab.srt.lora.utils import LoRABatchInfo


@triton.jit
def _stacked_lora_b_kernel(
    x, weights, output,
    R,
    x_stride_0, x_stride_1,
    w_stride_0, w_stride_1, w_stride_2,
    out_stride_0, out_stride_1,
    output_offset, max_out_dim,
    seg_lens, seg_indptr, weight_indices, lora_ranks, scalings,
    BLOCK_S: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    PORTABLE_DOT: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    batch_id = tl.program_id(axis=2)
    slice_id = tl.program_id(axis=1)
    w_index = tl.load(weight_indices + batch_id).to(tl.int64)
    rank = tl.load(lora_ranks + w_index)
    if rank == 0:
        return
    seg_len = tl.load(seg_lens + batch_id)
    seg_start = tl.load(seg_indptr + batch_id).to(tl.int64)
    n_start = tl.load(output_offset + slice_id)
    n_size = tl.load(output_offset + slice_id + 1) - n_start
    scaling = tl.load(scalings + w_index)
    num_pid_n = tl.cdiv(max_out_dim, BLOCK_N)
    pid_s = tl.program_id(axis=0) // num_pid_n
    pid_n = tl.program_id(axis=0) % num_pid_n
    if pid_s * BLOCK_S >= seg_len:
        return
    if pid_n * BLOCK_N >= n_size:
        return
    s_offset = pid_s * BLOCK_S + tl.arange(0, BLOCK_S)
    n_offset = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    k_offset = tl.arange(0, BLOCK_K)
    s_mask = s_offset < seg_len
    n_mask = n_offset < n_size
    x_ptrs = (x + (seg_start + s_offset)[:, None] * x_stride_0
              + (slice_id * R + k_offset)[None, :] * x_stride_1)
    w_ptrs = (weights + w_index * w_stride_0 + (n_start + n_offset)[None, :] * w_stride_1
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
                + (n_start + n_offset)[None, :] * out_stride_1)
    out_mask = s_mask[:, None] & n_mask[None, :]
    acc += tl.load(out_ptrs, mask=out_mask, other=0.0).to(tl.float32)
    tl.store(out_ptrs, acc.to(output.dtype.element_ty), mask=out_mask)


def _stacked_lora_b_fwd(x: torch.Tensor, weights: torch.Tensor, batch_info: LoRABatchInfo,
                        output_offset: torch.Tensor, max_out_dim: int, stack_num: int,
                        base_output: torch.Tensor) -> torch.Tensor:
    assert x.dim() == 2 and weights.dim() == 3 and weights.is_contiguous()
    assert x.shape[1] == stack_num * weights.shape[2]
    assert base_output.shape == (x.shape[0], weights.shape[1])
    assert output_offset.dtype == torch.int32 and output_offset.numel() >= stack_num + 1
    check_batch_info(batch_info)
    BLOCK_S, BLOCK_N, BLOCK_K = 16, 64, 16
    grid = (triton.cdiv(batch_info.max_len, BLOCK_S) * triton.cdiv(max_out_dim, BLOCK_N),
            stack_num, batch_info.bs)
    _stacked_lora_b_kernel[grid](
        x, weights, base_output, weights.shape[2],
        x.stride(0), x.stride(1),
        weights.stride(0), weights.stride(1), weights.stride(2),
        base_output.stride(0), base_output.stride(1),
        output_offset, max_out_dim,
        batch_info.seg_lens, batch_info.seg_indptr, batch_info.weight_indices,
        batch_info.lora_ranks, batch_info.scalings,
        BLOCK_S=BLOCK_S, BLOCK_N=BLOCK_N, BLOCK_K=BLOCK_K,
        **dot_args(x, _stacked_lora_b_kernel),
    )
    return base_output


def qkv_lora_b_fwd(x: torch.Tensor, qkv_lora_b: torch.Tensor, batch_info: LoRABatchInfo,
                   output_offset: torch.Tensor, max_qkv_out_dim: int,
                   base_output: torch.Tensor) -> torch.Tensor:
    """x [S, 3R], qkv_lora_b [num_slots, q + 2 kv, R]; adds into base_output [S, q + 2 kv]."""
    return _stacked_lora_b_fwd(x, qkv_lora_b, batch_info, output_offset, max_qkv_out_dim, 3,
                               base_output)


def gate_up_lora_b_fwd(x: torch.Tensor, gate_up_lora_b: torch.Tensor, batch_info: LoRABatchInfo,
                       output_offset: torch.Tensor, output_dim: int,
                       base_output: torch.Tensor) -> torch.Tensor:
    """x [S, 2R], gate_up_lora_b [num_slots, 2 inter, R]; adds into base_output [S, 2 inter]."""
    return _stacked_lora_b_fwd(x, gate_up_lora_b, batch_info, output_offset, output_dim, 2,
                               base_output)
