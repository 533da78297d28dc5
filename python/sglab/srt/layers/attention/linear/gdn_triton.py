"""Triton kernels of the Gated DeltaNet layers that read and write the MambaPool in place, by
slot: the fused decode step (gates, L2 norm, delta-rule update, output), the causal conv for
decode and for a packed prefill, and the masked state copy of prefix-cache tracking.

Every launch takes its sizes from tensor shapes only (no host read of device values), so each
is CUDA-graph capturable. `reference.py` holds the torch oracle of each kernel.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _gdn_decode_kernel(q_ptr, k_ptr, v_ptr, a_ptr, b_ptr, alog_ptr, dtb_ptr, h_ptr, slot_ptr,
                       o_ptr, stride_qn, stride_qh, stride_kn, stride_kh, stride_vn, stride_vh,
                       stride_an, stride_bn, stride_hs, stride_on, stride_oh, scale,
                       H: tl.constexpr, HV: tl.constexpr, K: tl.constexpr, V: tl.constexpr,
                       BK: tl.constexpr, BV: tl.constexpr):
    i_nh = tl.program_id(0).to(tl.int64)
    i_v = tl.program_id(1)
    i_n, i_hv = i_nh // HV, i_nh % HV
    i_h = i_hv // (HV // H)
    slot = tl.load(slot_ptr + i_n).to(tl.int64)
    o_k = tl.arange(0, BK)
    o_v = i_v * BV + tl.arange(0, BV)
    m_k, m_v = o_k < K, o_v < V
    b_q = tl.load(q_ptr + i_n * stride_qn + i_h * stride_qh + o_k, mask=m_k, other=0.0)
    b_k = tl.load(k_ptr + i_n * stride_kn + i_h * stride_kh + o_k, mask=m_k, other=0.0)
    b_q, b_k = b_q.to(tl.float32), b_k.to(tl.float32)
    b_q = b_q / tl.sqrt(tl.sum(b_q * b_q) + 1e-6) * scale
    b_k = b_k / tl.sqrt(tl.sum(b_k * b_k) + 1e-6)
    b_v = tl.load(v_ptr + i_n * stride_vn + i_hv * stride_vh + o_v, mask=m_v,
                  other=0.0).to(tl.float32)
    x = tl.load(a_ptr + i_n * stride_an + i_hv).to(tl.float32) + \
        tl.load(dtb_ptr + i_hv).to(tl.float32)
    softplus = tl.where(x > 20.0, x, tl.log(1.0 + tl.exp(x)))
    b_g = -tl.exp(tl.load(alog_ptr + i_hv).to(tl.float32)) * softplus
    b_beta = tl.sigmoid(tl.load(b_ptr + i_n * stride_bn + i_hv).to(tl.float32))
    p_h = h_ptr + slot * stride_hs + i_hv * K * V + o_k[:, None] * V + o_v[None, :]
    m_h = m_k[:, None] & m_v[None, :]
    b_h = tl.load(p_h, mask=m_h, other=0.0).to(tl.float32) * tl.exp(b_g)
    b_v = b_beta * (b_v - tl.sum(b_h * b_k[:, None], 0))
    b_h += b_k[:, None] * b_v[None, :]
    b_o = tl.sum(b_h * b_q[:, None], 0)
    tl.store(o_ptr + i_n * stride_on + i_hv * stride_oh + o_v, b_o.to(o_ptr.dtype.element_ty),
             mask=m_v)
    tl.store(p_h, b_h.to(h_ptr.dtype.element_ty), mask=m_h)


def gdn_decode(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, a: torch.Tensor,
               b: torch.Tensor, A_log: torch.Tensor, dt_bias: torch.Tensor,
               ssm_states: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
    """Same contract as `reference.gdn_decode`: q/k [N, H, K], v [N, HV, V], a/b [N, HV];
    ssm_states [S, HV, K, V] (contiguous) updated in place at `slots`."""
    n, num_heads, k_dim = q.shape
    num_v_heads, v_dim = v.shape[1:]
    assert ssm_states.is_contiguous() and ssm_states.shape[1:] == (num_v_heads, k_dim, v_dim)
    assert q.stride(2) == k.stride(2) == v.stride(2) == 1 and a.stride(1) == b.stride(1) == 1
    out = torch.empty((n, num_v_heads, v_dim), dtype=v.dtype, device=v.device)
    bk, bv = triton.next_power_of_2(k_dim), min(triton.next_power_of_2(v_dim), 32)
    grid = (n * num_v_heads, triton.cdiv(v_dim, bv))
    if n:
        _gdn_decode_kernel[grid](
            q, k, v, a, b, A_log, dt_bias, ssm_states, slots, out, q.stride(0), q.stride(1),
            k.stride(0), k.stride(1), v.stride(0), v.stride(1), a.stride(0), b.stride(0),
            ssm_states.stride(0), out.stride(0), out.stride(1), k_dim ** -0.5, H=num_heads,
            HV=num_v_heads, K=k_dim, V=v_dim, BK=bk, BV=bv, num_warps=4)
    return out


@triton.jit
def _conv_decode_kernel(x_ptr, w_ptr, s_ptr, slot_ptr, o_ptr, stride_xn, stride_ss, stride_on,
                        D, W: tl.constexpr, BD: tl.constexpr):
    i_n = tl.program_id(0).to(tl.int64)
    o_d = tl.program_id(1) * BD + tl.arange(0, BD)
    m_d = o_d < D
    slot = tl.load(slot_ptr + i_n).to(tl.int64)
    p_s = s_ptr + slot * stride_ss + o_d * (W - 1)
    b_x = tl.load(x_ptr + i_n * stride_xn + o_d, mask=m_d, other=0.0).to(tl.float32)
    acc = b_x * tl.load(w_ptr + o_d * W + (W - 1), mask=m_d, other=0.0).to(tl.float32)
    for i in tl.static_range(W - 1):
        b_s = tl.load(p_s + i, mask=m_d, other=0.0).to(tl.float32)
        acc += b_s * tl.load(w_ptr + o_d * W + i, mask=m_d, other=0.0).to(tl.float32)
    for i in tl.static_range(W - 2):  # shift the window left by one (reads stay ahead of writes)
        tl.store(p_s + i, tl.load(p_s + i + 1, mask=m_d, other=0.0), mask=m_d)
    tl.store(p_s + (W - 2), b_x.to(s_ptr.dtype.element_ty), mask=m_d)
    tl.store(o_ptr + i_n * stride_on + o_d, (acc * tl.sigmoid(acc)).to(o_ptr.dtype.element_ty),
             mask=m_d)


def causal_conv1d_decode(x: torch.Tensor, weight: torch.Tensor, conv_states: torch.Tensor,
                         slots: torch.Tensor) -> torch.Tensor:
    """Same contract as `reference.causal_conv1d_decode` (x [N, D], weight [D, W])."""
    n, dim = x.shape
    width = weight.shape[1]
    assert conv_states.is_contiguous() and conv_states.shape[1:] == (dim, width - 1)
    assert weight.is_contiguous() and x.stride(1) == 1 and width >= 2
    out = torch.empty_like(x)
    bd = min(triton.next_power_of_2(dim), 256)
    if n:
        _conv_decode_kernel[(n, triton.cdiv(dim, bd))](
            x, weight, conv_states, slots, out, x.stride(0), conv_states.stride(0), out.stride(0),
            dim, W=width, BD=bd, num_warps=4)
    return out


@triton.jit
def _conv_prefill_kernel(x_ptr, w_ptr, s_ptr, slot_ptr, seq_ptr, cu_ptr, o_ptr, stride_xt,
                         stride_ss, stride_ot, D, W: tl.constexpr, BD: tl.constexpr):
    t = tl.program_id(0).to(tl.int64)
    o_d = tl.program_id(1) * BD + tl.arange(0, BD)
    m_d = o_d < D
    seq = tl.load(seq_ptr + t).to(tl.int64)
    start = tl.load(cu_ptr + seq).to(tl.int64)
    slot = tl.load(slot_ptr + seq).to(tl.int64)
    pos = t - start
    acc = tl.zeros([BD], dtype=tl.float32)
    for i in tl.static_range(W):
        # This tap's position in the sequence, per lane; < 0: in the slot's window.
        j = tl.zeros([BD], dtype=tl.int64) + (pos - (W - 1) + i)
        b_x = tl.load(x_ptr + (start + j) * stride_xt + o_d, mask=m_d & (j >= 0), other=0.0)
        b_s = tl.load(s_ptr + slot * stride_ss + o_d * (W - 1) + (W - 1 + j),
                      mask=m_d & (j < 0), other=0.0)
        b_w = tl.load(w_ptr + o_d * W + i, mask=m_d, other=0.0).to(tl.float32)
        acc += (b_x.to(tl.float32) + b_s.to(tl.float32)) * b_w
    tl.store(o_ptr + t * stride_ot + o_d, (acc * tl.sigmoid(acc)).to(o_ptr.dtype.element_ty),
             mask=m_d)


@triton.jit
def _conv_prefill_state_kernel(x_ptr, s_ptr, slot_ptr, cu_ptr, stride_xt, stride_ss, D,
                               W: tl.constexpr, BD: tl.constexpr, BW: tl.constexpr):
    seq = tl.program_id(0).to(tl.int64)
    o_d = tl.program_id(1) * BD + tl.arange(0, BD)
    o_w = tl.arange(0, BW)
    start = tl.load(cu_ptr + seq).to(tl.int64)
    length = tl.load(cu_ptr + seq + 1).to(tl.int64) - start
    slot = tl.load(slot_ptr + seq).to(tl.int64)
    j = length - (W - 1) + o_w  # [BW]: the new window's positions in the sequence
    m = (o_d < D)[:, None] & (o_w < W - 1)[None, :]
    p_s = s_ptr + slot * stride_ss + o_d[:, None] * (W - 1)
    b_x = tl.load(x_ptr + (start + j)[None, :] * stride_xt + o_d[:, None],
                  mask=m & (j >= 0)[None, :], other=0.0)
    b_s = tl.load(p_s + (W - 1 + j)[None, :], mask=m & (j < 0)[None, :], other=0.0)
    tl.store(p_s + o_w[None, :], (b_x.to(tl.float32) + b_s.to(tl.float32))
             .to(s_ptr.dtype.element_ty), mask=m)


def causal_conv1d_prefill(x: torch.Tensor, weight: torch.Tensor, conv_states: torch.Tensor,
                          slots: torch.Tensor, seq_lens: torch.Tensor,
                          num_tokens: int) -> torch.Tensor:
    """Same contract as `reference.causal_conv1d_prefill`, with the lengths on the device
    (`seq_lens` [N]) and their sum from the host."""
    dim, width = weight.shape
    assert conv_states.is_contiguous() and conv_states.shape[1:] == (dim, width - 1)
    assert weight.is_contiguous() and x.stride(1) == 1 and x.shape[0] == num_tokens
    cu = torch.zeros(seq_lens.numel() + 1, dtype=torch.int64, device=x.device)
    torch.cumsum(seq_lens, 0, out=cu[1:])
    seq_of_token = torch.repeat_interleave(torch.arange(seq_lens.numel(), device=x.device),
                                           seq_lens, output_size=num_tokens)
    out = torch.empty_like(x)
    bd = min(triton.next_power_of_2(dim), 256)
    if num_tokens:
        _conv_prefill_kernel[(num_tokens, triton.cdiv(dim, bd))](
            x, weight, conv_states, slots, seq_of_token, cu, out, x.stride(0),
            conv_states.stride(0), out.stride(0), dim, W=width, BD=bd, num_warps=4)
    if seq_lens.numel():  # after every read of the old windows (stream order)
        _conv_prefill_state_kernel[(seq_lens.numel(), triton.cdiv(dim, bd))](
            x, conv_states, slots, cu, x.stride(0), conv_states.stride(0), dim, W=width, BD=bd,
            BW=triton.next_power_of_2(width - 1), num_warps=4)
    return out


@triton.jit
def _track_kernel(conv_ptr, ssm_ptr, src_ptr, dst_ptr, mask_ptr, stride_cs, stride_ss,
                  CONV_NUMEL: tl.constexpr, SSM_NUMEL: tl.constexpr, BLOCK: tl.constexpr):
    i = tl.program_id(0)
    if tl.load(mask_ptr + i):
        src = tl.load(src_ptr + i).to(tl.int64)
        dst = tl.load(dst_ptr + i).to(tl.int64)
        for off in range(0, CONV_NUMEL, BLOCK):
            o = off + tl.arange(0, BLOCK)
            m = o < CONV_NUMEL
            tl.store(conv_ptr + dst * stride_cs + o,
                     tl.load(conv_ptr + src * stride_cs + o, mask=m), mask=m)
        for off in range(0, SSM_NUMEL, BLOCK):
            o = off + tl.arange(0, BLOCK)
            m = o < SSM_NUMEL
            tl.store(ssm_ptr + dst * stride_ss + o,
                     tl.load(ssm_ptr + src * stride_ss + o, mask=m), mask=m)


def track_states(conv_states: torch.Tensor, ssm_states: torch.Tensor, src: torch.Tensor,
                 dst: torch.Tensor, mask: torch.Tensor) -> None:
    """Same contract as `reference.track_states`; unmasked rows copy nothing (the program
    returns on the mask it reads on the device)."""
    assert conv_states.is_contiguous() and ssm_states.is_contiguous()
    if src.numel():
        _track_kernel[(src.numel(),)](
            conv_states, ssm_states, src, dst, mask, conv_states.stride(0), ssm_states.stride(0),
            CONV_NUMEL=conv_states[0].numel(), SSM_NUMEL=ssm_states[0].numel(), BLOCK=1024)
