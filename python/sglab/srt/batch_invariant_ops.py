"""Batch-invariant kernels for --enable-deterministic-inference.

A GEMM library picks its blocking, kernel and split-K from the problem shape, so the bits of
one row of `x @ W.T` change with how many other rows share the call (the batch size, a radix
hit, the chunking of a prefill). The ops here give each row a result that depends only on the
row itself:

* `linear_batch_invariant`: on CUDA a Triton matmul whose tiles (and so each output's K-loop)
  are fixed whatever M is; elsewhere the GEMM runs over fixed-size row chunks (the last one
  zero-padded), so every library call has the same shape.

Layers choose them at construction: the linear layers and the logits processor take
`batch_invariant` from the model's `ModelOptions` (sglab.srt.configs.model_options).
"""

from __future__ import annotations

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - triton ships with sglab's dependencies
    triton = None

# Rows per GEMM call on the chunked path: every call is [ROW_CHUNK, K] @ [K, N].
ROW_CHUNK = 64


def linear_batch_invariant(x: torch.Tensor, weight: torch.Tensor,
                           bias: torch.Tensor | None = None) -> torch.Tensor:
    """`F.linear(x, weight, bias)` with each row's bits independent of the other rows."""
    x2d = x.reshape(-1, x.shape[-1])
    if x2d.is_cuda and triton is not None:
        out = matmul_fixed_tiles(x2d, weight)
    else:
        out = _matmul_row_chunks(x2d, weight)
    if bias is not None:
        out = out + bias
    return out.view(*x.shape[:-1], weight.shape[0])


def _matmul_row_chunks(x2d: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    num_rows = x2d.shape[0]
    pad = -num_rows % ROW_CHUNK
    xp = torch.nn.functional.pad(x2d, (0, 0, 0, pad)) if pad else x2d.contiguous()
    out = xp.new_empty(xp.shape[0], weight.shape[0])
    weight_t = weight.t()
    for start in range(0, xp.shape[0], ROW_CHUNK):
        torch.mm(xp[start:start + ROW_CHUNK], weight_t, out=out[start:start + ROW_CHUNK])
    return out[:num_rows]


# --- Triton (CUDA) ----------------------------------------------------------------------------

# (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages) per input dtype. Never chosen from M: the
# tile shape fixes the MMA instruction and the K order of every output.
_MATMUL_CONFIGS = {
    torch.float16: (128, 128, 64, 8, 3),
    torch.bfloat16: (128, 128, 64, 8, 3),
    torch.float32: (64, 64, 32, 4, 3),
}
_GROUP_M = 8


def matmul_fixed_tiles(x2d: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x2d [M, K] @ weight[N, K].T with tiles fixed per dtype; fp32 accumulation, no split-K."""
    assert x2d.dim() == 2 and weight.dim() == 2 and x2d.shape[1] == weight.shape[1], \
        (x2d.shape, weight.shape)
    assert x2d.dtype == weight.dtype, (x2d.dtype, weight.dtype)
    m, k = x2d.shape
    n = weight.shape[0]
    out = torch.empty((m, n), dtype=x2d.dtype, device=x2d.device)
    if m == 0:
        return out
    block_m, block_n, block_k, num_warps, num_stages = _MATMUL_CONFIGS[x2d.dtype]
    grid = (triton.cdiv(m, block_m) * triton.cdiv(n, block_n),)
    _matmul_kernel[grid](
        x2d, weight, out, m, n, k,
        x2d.stride(0), x2d.stride(1), weight.stride(0), weight.stride(1), out.stride(0),
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, GROUP_M=_GROUP_M,
        IEEE_FP32=x2d.dtype == torch.float32, PORTABLE_DOT=not x2d.is_cuda,
        num_warps=num_warps, num_stages=num_stages)
    return out


if triton is not None:

    @triton.jit(do_not_specialize=["M"])
    def _matmul_kernel(a_ptr, b_ptr, c_ptr, M, N, K, stride_am, stride_ak, stride_bn, stride_bk,
                       stride_cm, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                       BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr, IEEE_FP32: tl.constexpr,
                       PORTABLE_DOT: tl.constexpr):
        """C = A @ B.T for A [M, K], B [N, K]; one program per (BLOCK_M, BLOCK_N) tile."""
        pid = tl.program_id(0)
        num_pid_m = tl.cdiv(M, BLOCK_M)
        num_pid_n = tl.cdiv(N, BLOCK_N)
        # Grouped order: neighbouring programs share B tiles in L2. Numerics do not depend on it.
        group = pid // (GROUP_M * num_pid_n)
        first_m = group * GROUP_M
        group_m = min(num_pid_m - first_m, GROUP_M)
        pid_m = first_m + (pid % (GROUP_M * num_pid_n)) % group_m
        pid_n = (pid % (GROUP_M * num_pid_n)) // group_m
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        offs_k = tl.arange(0, BLOCK_K)
        a_ptrs = a_ptr + offs_m[:, None] * stride_am + offs_k[None, :] * stride_ak
        b_ptrs = b_ptr + offs_k[:, None] * stride_bk + offs_n[None, :] * stride_bn
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for kk in range(tl.cdiv(K, BLOCK_K)):
            k_left = K - kk * BLOCK_K
            a = tl.load(a_ptrs, mask=(offs_m[:, None] < M) & (offs_k[None, :] < k_left),
                        other=0.0)
            b = tl.load(b_ptrs, mask=(offs_k[:, None] < k_left) & (offs_n[None, :] < N),
                        other=0.0)
            if PORTABLE_DOT:  # Triton's CPU interpreter: its tl.dot takes no bf16
                acc += tl.sum(a.to(tl.float32)[:, :, None] * b.to(tl.float32)[None, :, :],
                              axis=1)
            elif IEEE_FP32:
                acc = tl.dot(a, b, acc, input_precision="ieee")
            else:
                acc = tl.dot(a, b, acc)
            a_ptrs += BLOCK_K * stride_ak
            b_ptrs += BLOCK_K * stride_bk
        c_ptrs = c_ptr + offs_m[:, None] * stride_cm + offs_n[None, :]
        tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty),
                 mask=(offs_m[:, None] < M) & (offs_n[None, :] < N))
