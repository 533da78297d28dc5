"""Fused row-wise Triton kernels for the decoder's small ops: RMSNorm (with the residual add),
per-head q/k RMSNorm + neox RoPE (optionally with the K/V write into the paged cache:
`--kernel-fusion on`), and SiLU-and-mul.

Each replaces a chain of 5-20 eager kernels with one launch, which is what bounds a small-batch
decode step (and its CUDA-graph launch). They round to the storage dtype at the same points as
the eager torch code in layernorm.py / rotary_embedding.py / activation.py, which stays the
reference (and the CPU path). Every program reads one row (or one head): batch invariant.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from sglab.srt.layers.pdl import pdl_launch, pdl_wait


def use_fused_kernels(x: torch.Tensor) -> bool:
    return x.is_cuda


@triton.jit
def _rmsnorm_kernel(x_ptr, res_ptr, res_out_ptr, w_ptr, out_ptr, stride_x, stride_r,
                    stride_ro, stride_o, n_cols, eps, HAS_RES: tl.constexpr,
                    BLOCK: tl.constexpr, USE_PDL: tl.constexpr):
    pdl_wait(USE_PDL)
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < n_cols
    # every load before the residual's store, which they could not be moved across
    w = tl.load(w_ptr + cols, mask=mask, other=0.0)
    x = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0)
    if HAS_RES:
        r = tl.load(res_ptr + row * stride_r + cols, mask=mask, other=0.0)
        x = (x.to(tl.float32) + r.to(tl.float32)).to(res_out_ptr.dtype.element_ty)
        tl.store(res_out_ptr + row * stride_ro + cols, x, mask=mask)
    xf = x.to(tl.float32)
    var = tl.sum(xf * xf, axis=0) / n_cols
    y = (xf * (1.0 / tl.sqrt(var + eps))).to(out_ptr.dtype.element_ty)
    y = (y.to(tl.float32) * w.to(tl.float32)).to(out_ptr.dtype.element_ty)
    tl.store(out_ptr + row * stride_o + cols, y, mask=mask)


def rmsnorm(x: torch.Tensor, weight: torch.Tensor, eps: float,
            residual: torch.Tensor | None = None):
    """norm(x) * weight, or with residual (norm(x + residual) * weight, x + residual)."""
    x2 = x.reshape(-1, x.shape[-1])
    n_rows, n_cols = x2.shape
    out = torch.empty_like(x2)
    res2 = residual.reshape(-1, n_cols) if residual is not None else x2
    res_out = torch.empty_like(x2) if residual is not None else out
    if n_rows:
        _rmsnorm_kernel[(n_rows,)](
            x2, res2, res_out, weight, out, x2.stride(0), res2.stride(0), res_out.stride(0),
            out.stride(0), n_cols, eps, HAS_RES=residual is not None,
            BLOCK=triton.next_power_of_2(n_cols), num_warps=4 if n_cols <= 4096 else 8,
            **pdl_launch(x2))
    out = out.view(x.shape)
    return out if residual is None else (out, res_out.view(x.shape))


@triton.jit
def _qk_norm_rope_kernel(q_ptr, k_ptr, q_out_ptr, k_out_ptr, qw_ptr, kw_ptr, pos_ptr, cs_ptr,
                         stride_q, stride_k, num_q_heads, eps, v_ptr, loc_ptr, k_buf_ptr,
                         v_buf_ptr, stride_v, stride_kb, stride_kbh, stride_vb, stride_vbh,
                         HAS_NORM: tl.constexpr, HALF: tl.constexpr, WRITE_KV: tl.constexpr,
                         USE_PDL: tl.constexpr):
    pdl_wait(USE_PDL)
    tok = tl.program_id(0).to(tl.int64)
    head = tl.program_id(1)
    num_kv_heads = tl.num_programs(1) - num_q_heads
    offs = tl.arange(0, HALF)
    if head < num_q_heads:
        src = q_ptr + tok * stride_q + head * 2 * HALF
        dst = q_out_ptr + (tok * num_q_heads + head) * 2 * HALF
        w_ptr = qw_ptr
    else:
        src = k_ptr + tok * stride_k + (head - num_q_heads) * 2 * HALF
        dst = k_out_ptr + (tok * num_kv_heads + head - num_q_heads) * 2 * HALF
        w_ptr = kw_ptr
    dtype = q_out_ptr.dtype.element_ty
    x1 = tl.load(src + offs)
    x2 = tl.load(src + HALF + offs)
    if HAS_NORM:
        f1, f2 = x1.to(tl.float32), x2.to(tl.float32)
        var = (tl.sum(f1 * f1, axis=0) + tl.sum(f2 * f2, axis=0)) / (2 * HALF)
        rstd = 1.0 / tl.sqrt(var + eps)
        w1 = tl.load(w_ptr + offs).to(tl.float32)
        w2 = tl.load(w_ptr + HALF + offs).to(tl.float32)
        x1 = ((f1 * rstd).to(dtype).to(tl.float32) * w1).to(dtype)
        x2 = ((f2 * rstd).to(dtype).to(tl.float32) * w2).to(dtype)
    pos = tl.load(pos_ptr + tok)
    cos = tl.load(cs_ptr + pos * 2 * HALF + offs).to(dtype).to(tl.float32)
    sin = tl.load(cs_ptr + pos * 2 * HALF + HALF + offs).to(dtype).to(tl.float32)
    f1, f2 = x1.to(tl.float32), x2.to(tl.float32)
    o1 = (f1 * cos).to(dtype).to(tl.float32) + (-f2 * sin).to(dtype).to(tl.float32)
    o2 = (f2 * cos).to(dtype).to(tl.float32) + (f1 * sin).to(dtype).to(tl.float32)
    tl.store(dst + offs, o1.to(dtype))
    tl.store(dst + HALF + offs, o2.to(dtype))
    if WRITE_KV:  # a k head's program also writes the head's k and v into the KV pool
        if head >= num_q_heads:
            kv_head = head - num_q_heads
            loc = tl.load(loc_ptr + tok).to(tl.int64)
            k_dst = k_buf_ptr + loc * stride_kb + kv_head * stride_kbh
            tl.store(k_dst + offs, o1.to(dtype))
            tl.store(k_dst + HALF + offs, o2.to(dtype))
            v_src = v_ptr + tok * stride_v + kv_head * 2 * HALF
            v_dst = v_buf_ptr + loc * stride_vb + kv_head * stride_vbh
            tl.store(v_dst + offs, tl.load(v_src + offs))
            tl.store(v_dst + HALF + offs, tl.load(v_src + HALF + offs))


def qk_norm_rope(q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor,
                 cos_sin_cache: torch.Tensor, head_dim: int,
                 q_weight: torch.Tensor | None = None, k_weight: torch.Tensor | None = None,
                 eps: float = 1e-6, kv_write: KVWrite | None = None
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """Optional per-head RMSNorm of q and k, then neox RoPE; one launch for both.

    q: [T, Hq*D], k: [T, Hkv*D], row-strided views are fine (e.g. splits of a fused qkv).
    With `kv_write`, the same launch stores the rotated k and the untouched v at the tokens'
    KV-pool slots (what `set_kv_buffer` would store, bit for bit).
    """
    num_tokens = q.shape[0]
    hq, hkv = q.shape[1] // head_dim, k.shape[1] // head_dim
    q_out = torch.empty((num_tokens, hq * head_dim), dtype=q.dtype, device=q.device)
    k_out = torch.empty((num_tokens, hkv * head_dim), dtype=k.dtype, device=k.device)
    if num_tokens:
        has_norm = q_weight is not None
        kv = kv_write.args(k, hkv, head_dim) if kv_write is not None else (k, positions, k, k,
                                                                            0, 0, 0, 0, 0)
        _qk_norm_rope_kernel[(num_tokens, hq + hkv)](
            q, k, q_out, k_out, q_weight if has_norm else q, k_weight if has_norm else k,
            positions, cos_sin_cache, q.stride(0), k.stride(0), hq, eps, *kv,
            HAS_NORM=has_norm, HALF=head_dim // 2, WRITE_KV=kv_write is not None, num_warps=1,
            **pdl_launch(q))
    return q_out, k_out


@dataclass(frozen=True)
class QKNormRope:
    """A layer's optional per-head q/k RMSNorm (`q_weight` None: none) and neox RoPE at
    `positions`: what `qk_norm_rope` applies, or a decode attention in its own launch
    (`AttentionBackend.fuses_qk_rope`)."""

    positions: torch.Tensor
    cos_sin_cache: torch.Tensor
    head_dim: int
    q_weight: torch.Tensor | None = None
    k_weight: torch.Tensor | None = None
    eps: float = 1e-6

    def __call__(self, q: torch.Tensor, k: torch.Tensor, kv_write: KVWrite | None = None
                 ) -> tuple[torch.Tensor, torch.Tensor]:
        return qk_norm_rope(q, k, self.positions, self.cos_sin_cache, self.head_dim,
                            self.q_weight, self.k_weight, self.eps, kv_write)


@dataclass(frozen=True)
class KVWrite:
    """Where `qk_norm_rope` writes k and v: one layer's K/V pool buffers
    ([slots, Hkv, D]) at `loc[t]` for token t; `v` is [T, Hkv*D] (a row-strided view is fine)."""

    v: torch.Tensor
    loc: torch.Tensor
    k_buffer: torch.Tensor
    v_buffer: torch.Tensor

    def args(self, k: torch.Tensor, num_kv_heads: int, head_dim: int) -> tuple:
        for buf in (self.k_buffer, self.v_buffer):
            assert buf.dtype == k.dtype and buf.shape[1:] == (num_kv_heads, head_dim)
            assert buf.stride(2) == 1
        assert self.v.shape == k.shape and self.v.stride(1) == 1 and self.v.dtype == k.dtype
        assert self.loc.shape == (k.shape[0],)
        return (self.v, self.loc, self.k_buffer, self.v_buffer, self.v.stride(0),
                self.k_buffer.stride(0), self.k_buffer.stride(1), self.v_buffer.stride(0),
                self.v_buffer.stride(1))


@triton.jit
def _silu_and_mul_kernel(x_ptr, out_ptr, stride_x, stride_o, d, BLOCK: tl.constexpr,
                         USE_PDL: tl.constexpr):
    pdl_wait(USE_PDL)
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < d
    dtype = out_ptr.dtype.element_ty
    g = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(x_ptr + row * stride_x + d + cols, mask=mask, other=0.0).to(tl.float32)
    s = (g / (1.0 + tl.exp(-g))).to(dtype).to(tl.float32)
    tl.store(out_ptr + row * stride_o + cols, (s * u).to(dtype), mask=mask)


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """silu(x[..., :d]) * x[..., d:]."""
    x2 = x.reshape(-1, x.shape[-1])
    d = x2.shape[1] // 2
    out = torch.empty((x2.shape[0], d), dtype=x.dtype, device=x.device)
    if x2.shape[0]:
        block = min(triton.next_power_of_2(d), 1024)
        _silu_and_mul_kernel[(x2.shape[0], triton.cdiv(d, block))](
            x2, out, x2.stride(0), out.stride(0), d, BLOCK=block, num_warps=4, **pdl_launch(x2))
    return out.view(*x.shape[:-1], d)
