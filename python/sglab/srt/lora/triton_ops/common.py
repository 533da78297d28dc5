"""Helpers shared by the LoRA segment-GEMM kernels."""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _dot(a, b, PORTABLE_DOT: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """a [M, K] @ b [K, N] with fp32 accumulation; PORTABLE_DOT for Triton's interpreter, whose
    tl.dot cannot take bf16."""
    if PORTABLE_DOT:
        return tl.sum(a.to(tl.float32)[:, :, None] * b.to(tl.float32)[None, :, :], axis=1)
    else:
        return tl.dot(a, b, input_precision=DOT_PRECISION)


def dot_args(x: torch.Tensor, kernel) -> dict:
    """PORTABLE_DOT off the GPU or under the interpreter; IEEE fp32 products for fp32 inputs."""
    portable = not x.is_cuda or not isinstance(kernel, triton.runtime.JITFunction)
    return {"PORTABLE_DOT": portable,
            "DOT_PRECISION": "ieee" if x.dtype == torch.float32 else "tf32"}


def check_batch_info(batch_info) -> None:
    for name in ("seg_lens", "seg_indptr", "weight_indices", "lora_ranks"):
        t = getattr(batch_info, name)
        assert t.dtype == torch.int32 and t.is_contiguous(), (name, t.dtype)
    assert batch_info.scalings.dtype == torch.float32
