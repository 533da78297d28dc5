"""Small-M GEMM (`--kernel-fusion on`): `y = x @ W^T (+ b)` for at most `max_m()` rows, in one
launch, with the op that produces `x` folded into the load of its tiles:

- `RMSNormPrologue`: `x = rmsnorm(h + residual) * w_norm` (the decoder's input and
  post-attention norms before qkv and gate_up); the first column block also stores
  `h + residual`, the next residual.
- `SILU_MUL`: `x = silu(g) * u` from the `[g, u]` halves of gate_up (before down_proj).

At decode batch sizes a linear layer is bound by reading its weight once; a separate norm or
activation kernel, and cuBLAS's split-K reduction, are extra launches on every layer. Each
program here owns `BLOCK_N` output columns for every row and runs over all of K, so the result
needs no reduction across programs and no row's result depends on the values of the others
(across batch sizes the tiles, and so the K order, differ: deterministic inference keeps its
own batch-invariant GEMM). It rounds at the same points as the eager layers (layernorm.py,
activation.py); the GEMM accumulates in fp32 and rounds once, as F.linear does, in its own K
order.

`max_m(hidden_size)` (`SGLAB_SKINNY_GEMM_MAX_M`, at most 64) is the largest M served; larger M
goes to F.linear (cuBLAS). The default is 1 for a model of hidden size at most
SMALL_MODEL_HIDDEN and 0 (off) above it: in H200 decode-graph replays these tiles beat cuBLAS
only at one row of qwen3-0.6b (hidden 1024); at llama-3.1-8b (4096) the folded RMSNorm re-reads
the row in each of the many programs (benchmark/README.md). Rows of up to 4 reduce by FMA, up
to 16 and up to 64 by one `tl.dot` tile of 16 or 64 rows.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from sglab.srt.layers.pdl import pdl_launch, pdl_wait

SILU_MUL = "silu_mul"
_NONE, _RMSNORM, _SILU = 0, 1, 2


@dataclass
class RMSNormPrologue:
    """rmsnorm(x + residual) * weight, or rmsnorm(x) * weight with no residual."""
    weight: torch.Tensor
    eps: float
    residual: torch.Tensor | None = None


SMALL_MODEL_HIDDEN = 1024


def max_m(hidden_size: int | None = None) -> int:
    """SGLAB_SKINNY_GEMM_MAX_M, else the default for a model of `hidden_size` (None: 0)."""
    env = os.environ.get("SGLAB_SKINNY_GEMM_MAX_M")
    if env is None:
        return int(hidden_size is not None and hidden_size <= SMALL_MODEL_HIDDEN)
    if not env.isdigit():
        raise ValueError(f"SGLAB_SKINNY_GEMM_MAX_M={env!r}: expected a non-negative integer")
    return min(64, int(env))


def skinny_applies(x: torch.Tensor, bound: int | None = None) -> bool:
    """Whether the small-M kernel serves `x`: on the GPU, at most `bound` rows (max_m())."""
    m = x.numel() // x.shape[-1] if x.shape[-1] else 0
    return x.is_cuda and 0 < m <= (max_m() if bound is None else bound)


@triton.jit
def _sum_squares(x_ptr, res_ptr, res_out_ptr, rows, rmask, K, stride_xm, stride_rm, stride_rom,
                 pid, HAS_RES: tl.constexpr, BLOCK_M: tl.constexpr,
                 BLOCK_K: tl.constexpr):
    ss = tl.zeros([BLOCK_M], tl.float32)
    for k0 in range(0, K, BLOCK_K):
        kk = k0 + tl.arange(0, BLOCK_K)
        m2 = rmask[:, None] & (kk < K)[None, :]
        x = tl.load(x_ptr + rows[:, None] * stride_xm + kk[None, :], mask=m2, other=0.0)
        if HAS_RES:
            r = tl.load(res_ptr + rows[:, None] * stride_rm + kk[None, :], mask=m2, other=0.0)
            x = (x.to(tl.float32) + r.to(tl.float32)).to(res_out_ptr.dtype.element_ty)
            if pid == 0:  # one program stores the next residual
                tl.store(res_out_ptr + rows[:, None] * stride_rom + kk[None, :], x, mask=m2)
        xf = x.to(tl.float32)
        ss += tl.sum(xf * xf, axis=1)
    return ss


@triton.jit
def load_x_tile(x_ptr, res_ptr, nw_ptr, rows, kk, m2, kmask, K, stride_xm, stride_rm, inv,
                dtype, PROLOGUE: tl.constexpr, HAS_RES: tl.constexpr):
    """The [rows, kk] tile of the matmul's input after the prologue, rounded where the eager
    layers round: 1, rmsnorm(x [+ residual]) * w_norm with `inv` the rows' 1 / rms; 2,
    silu(g) * u from x = [g, u] (K columns each); 0, x itself."""
    xp = x_ptr + rows[:, None] * stride_xm + kk[None, :]
    a = tl.load(xp, mask=m2, other=0.0)
    if PROLOGUE == 1:
        if HAS_RES:
            r = tl.load(res_ptr + rows[:, None] * stride_rm + kk[None, :], mask=m2, other=0.0)
            a = (a.to(tl.float32) + r.to(tl.float32)).to(dtype)
        a = (a.to(tl.float32) * inv[:, None]).to(dtype)
        nw = tl.load(nw_ptr + kk, mask=kmask, other=0.0)
        a = (a.to(tl.float32) * nw[None, :].to(tl.float32)).to(dtype)
    elif PROLOGUE == 2:
        g = a.to(tl.float32)
        u = tl.load(xp + K, mask=m2, other=0.0).to(tl.float32)
        a = ((g / (1.0 + tl.exp(-g))).to(dtype).to(tl.float32) * u).to(dtype)
    return a


@triton.jit
def _skinny_gemm_kernel(x_ptr, w_ptr, b_ptr, out_ptr, res_ptr, res_out_ptr, nw_ptr, M, N, K,
                        stride_xm, stride_wn, stride_om, stride_rm, stride_rom, eps,
                        PROLOGUE: tl.constexpr, HAS_RES: tl.constexpr, HAS_BIAS: tl.constexpr,
                        USE_DOT: tl.constexpr, DOT_PRECISION: tl.constexpr,
                        DEFER_REDUCE: tl.constexpr, BLOCK_M: tl.constexpr,
                        BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, USE_PDL: tl.constexpr):
    pdl_wait(USE_PDL)
    pid = tl.program_id(0)
    rows = tl.arange(0, BLOCK_M)
    cols = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    rmask, cmask = rows < M, cols < N
    dtype = out_ptr.dtype.element_ty
    inv = 0.0
    if PROLOGUE == 1:
        ss = _sum_squares(x_ptr, res_ptr, res_out_ptr, rows, rmask, K, stride_xm, stride_rm,
                          stride_rom, pid, HAS_RES, BLOCK_M, BLOCK_K)
        inv = 1.0 / tl.sqrt(ss / K + eps)
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    # FMA tiles: products summed elementwise across K tiles, one reduction over BLOCK_K at the
    # end instead of one per tile.
    acc3 = tl.zeros([BLOCK_M, BLOCK_N, BLOCK_K if DEFER_REDUCE else 1], tl.float32)
    for k0 in range(0, K, BLOCK_K):
        kk = k0 + tl.arange(0, BLOCK_K)
        kmask = kk < K
        m2 = rmask[:, None] & kmask[None, :]
        a = load_x_tile(x_ptr, res_ptr, nw_ptr, rows, kk, m2, kmask, K, stride_xm, stride_rm,
                        inv, dtype, PROLOGUE, HAS_RES)
        w = tl.load(w_ptr + cols[:, None] * stride_wn + kk[None, :],
                    mask=cmask[:, None] & kmask[None, :], other=0.0)
        if USE_DOT:
            acc += tl.dot(a, tl.trans(w), input_precision=DOT_PRECISION)
        elif DEFER_REDUCE:
            acc3 += a.to(tl.float32)[:, None, :] * w.to(tl.float32)[None, :, :]
        else:
            acc += tl.sum(a.to(tl.float32)[:, None, :] * w.to(tl.float32)[None, :, :], axis=2)
    if DEFER_REDUCE:
        acc = tl.sum(acc3, axis=2)
    if HAS_BIAS:
        acc += tl.load(b_ptr + cols, mask=cmask, other=0.0).to(tl.float32)[None, :]
    tl.store(out_ptr + rows[:, None] * stride_om + cols[None, :], acc.to(dtype),
             mask=rmask[:, None] & cmask[None, :])


def _config(m: int, k: int, on_cuda: bool) -> dict:
    """Launch parameters by shape (one layout per M for every weight: per-shape one-row layouts,
    the isolated GEMM's fastest, were slower in the decode graph, whose qkv and gate_up fold
    the RMSNorm into every program). Triton's interpreter cannot tl.dot bf16: there the larger
    tiles reduce by FMA too."""
    if m <= 4:  # FMA, the K reduction deferred: the best layouts of the H200 sweep
        bm = triton.next_power_of_2(m)  # (benchmark/results/2026-12-03-h200-kernel-sweep-gemm.md)
        return {"USE_DOT": False, "DEFER_REDUCE": True, "BLOCK_M": bm,
                "BLOCK_N": 8 if bm == 1 else 4,
                "BLOCK_K": min(1024 // bm, triton.next_power_of_2(k)), "num_warps": 4}
    if m <= 16:
        return {"USE_DOT": on_cuda, "DEFER_REDUCE": False, "BLOCK_M": 16, "BLOCK_N": 16,
                "BLOCK_K": min(128, max(16, triton.next_power_of_2(k))), "num_warps": 4}
    assert m <= 64, "skinny_gemm serves at most 64 rows"
    return {"USE_DOT": on_cuda, "DEFER_REDUCE": False, "BLOCK_M": 64, "BLOCK_N": 32,
            "BLOCK_K": min(64, max(16, triton.next_power_of_2(k))), "num_warps": 4}


def skinny_gemm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
                prologue: RMSNormPrologue | str | None = None, config: dict | None = None):
    """x @ weight^T (+ bias) after the prologue. With an RMSNormPrologue: (y, x + residual),
    the second being x itself when it has no residual. With SILU_MUL, x is [g, u] and K is
    half its width. `config` replaces some of the shape's launch parameters (benchmarks)."""
    n, k = weight.shape
    x2 = x.reshape(-1, x.shape[-1])
    m = x2.shape[0]
    kind = _RMSNORM if isinstance(prologue, RMSNormPrologue) else \
        _SILU if prologue == SILU_MUL else _NONE
    if x2.shape[1] != (2 * k if kind == _SILU else k):
        raise ValueError(f"skinny_gemm: x has {x2.shape[1]} columns for a weight of K={k}")
    if x2.stride(1) != 1:
        x2 = x2.contiguous()
    assert weight.stride(1) == 1
    res = prologue.residual if kind == _RMSNORM else None
    res2 = res.reshape(-1, k) if res is not None else x2
    res_out = torch.empty_like(x2) if res is not None else x2
    out = torch.empty((m, n), dtype=x.dtype, device=x.device)
    cfg = {**_config(m, k, x.is_cuda), **(config or {})}
    assert cfg["BLOCK_M"] >= m, "the tile must hold every row"
    grid = (triton.cdiv(n, cfg["BLOCK_N"]),)
    _skinny_gemm_kernel[grid](
        x2, weight, bias if bias is not None else weight, out, res2, res_out,
        prologue.weight if kind == _RMSNORM else weight, m, n, k, x2.stride(0),
        weight.stride(0), out.stride(0), res2.stride(0), res_out.stride(0),
        prologue.eps if kind == _RMSNORM else 0.0, PROLOGUE=kind, HAS_RES=res is not None,
        HAS_BIAS=bias is not None,
        DOT_PRECISION="ieee" if x.dtype == torch.float32 else "tf32", **cfg, **pdl_launch(x))
    out = out.view(*x.shape[:-1], n)
    if kind != _RMSNORM:
        return out
    return out, res_out.view(*x.shape[:-1], k)
