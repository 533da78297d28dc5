"""Extend (prefill) attention over a paged KV pool, with a cached prefix per request.

Two kernels, both one program per (request, q head, BLOCK_M query rows):

* `extend_attention_fwd` (2-stage): prefix keys from the pool via kv_indptr/kv_indices, then
  the new keys from the contiguous k_extend/v_extend. Key tiles restart at the prefix/extend
  boundary, so the float accumulation order moves with the prefix length.
* `extend_attention_fwd_unified` (1-stage): every key (prefix ++ extend) is read from the pool
  in tiles at absolute positions 0, BLOCK_N, 2*BLOCK_N, ...; a query row's result is
  bit-identical whatever the prefix/extend split and whatever else is in the batch. K/V of the
  extend tokens must be in the pool before the call.

`build_unified_kv_indices` makes the unified index layout from the prefix indices and the
extend slots with no host sync.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl


@triton.jit
def _tanh(x):
    return 2 * tl.sigmoid(2 * x) - 1


@triton.jit
def _dot(a, b, PORTABLE_DOT: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """a [M, K] @ b [K, N] with fp32 accumulation.

    PORTABLE_DOT (Triton's interpreter) multiplies and sums in fp32: the interpreter's tl.dot
    cannot take bf16, and its BLAS result for a row depends on the row's place in the tile.
    """
    if PORTABLE_DOT:
        return tl.sum(a.to(tl.float32)[:, :, None] * b.to(tl.float32)[None, :, :], axis=1)
    else:
        return tl.dot(a, b, input_precision=DOT_PRECISION)


@triton.jit
def _scores(
    q, k, sm_scale, LOGIT_CAP: tl.constexpr, PORTABLE_DOT: tl.constexpr, DOT_PRECISION: tl.constexpr
):
    """q: [M, D], k: [D, N] -> fp32 [M, N] scaled (and soft-capped) scores."""
    qk = _dot(q, k, PORTABLE_DOT, DOT_PRECISION) * sm_scale
    if LOGIT_CAP > 0:
        qk = LOGIT_CAP * _tanh(qk / LOGIT_CAP)
    return qk


@triton.jit
def _online_softmax_step(
    acc, l_i, m_i, qk, v, PORTABLE_DOT: tl.constexpr, DOT_PRECISION: tl.constexpr
):
    """Fold one key tile (masked scores qk [M, N], values v [N, DV]) into (acc, l_i, m_i).

    A tile that is fully masked for a row whose running max is finite leaves that row exactly
    unchanged (alpha == 1, p == 0), which is what makes the unified kernel split-invariant.
    """
    m_new = tl.maximum(m_i, tl.max(qk, 1))
    m_safe = tl.where(m_new == -float("inf"), 0.0, m_new)  # rows with nothing visible yet
    alpha = tl.exp(m_i - m_safe)
    p = tl.exp(qk - m_safe[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + _dot(p.to(v.dtype), v, PORTABLE_DOT, DOT_PRECISION)
    return acc, l_i, m_new


@triton.jit
def _fwd_kernel(
    Q_Extend,
    K_Extend,
    V_Extend,
    O_Extend,
    K_Buffer,
    V_Buffer,
    qo_indptr,
    kv_indptr,
    kv_indices,
    mask_ptr,
    mask_indptr,
    sm_scale,
    stride_qbs,
    stride_qh,
    stride_kbs,
    stride_kh,
    stride_vbs,
    stride_vh,
    stride_obs,
    stride_oh,
    stride_buf_kbs,
    stride_buf_kh,
    stride_buf_vbs,
    stride_buf_vh,
    kv_group_num: tl.constexpr,
    Lq: tl.constexpr,
    Lv: tl.constexpr,
    BLOCK_DMODEL: tl.constexpr,
    BLOCK_DV: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    LOGIT_CAP: tl.constexpr,
    IS_CAUSAL: tl.constexpr,
    USE_CUSTOM_MASK: tl.constexpr,
    SKIP_PREFIX_CUSTOM_MASK: tl.constexpr,
    PORTABLE_DOT: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    cur_seq = tl.program_id(0)
    cur_head = tl.program_id(1)
    cur_block_m = tl.program_id(2)
    cur_kv_head = cur_head // kv_group_num

    q_start = tl.load(qo_indptr + cur_seq)
    extend_len = tl.load(qo_indptr + cur_seq + 1) - q_start
    if cur_block_m * BLOCK_M >= extend_len:
        return
    kv_start = tl.load(kv_indptr + cur_seq)
    prefix_len = tl.load(kv_indptr + cur_seq + 1) - kv_start

    offs_d = tl.arange(0, BLOCK_DMODEL)
    offs_dv = tl.arange(0, BLOCK_DV)
    offs_m = cur_block_m * BLOCK_M + tl.arange(0, BLOCK_M)
    mask_d = offs_d < Lq
    mask_dv = offs_dv < Lv
    mask_m = offs_m < extend_len

    q = tl.load(
        Q_Extend
        + (q_start + offs_m)[:, None] * stride_qbs
        + cur_head * stride_qh
        + offs_d[None, :],
        mask=mask_m[:, None] & mask_d[None, :],
        other=0.0,
    )
    if USE_CUSTOM_MASK:
        mask_start = tl.load(mask_indptr + cur_seq)
        mask_row_len = prefix_len + extend_len

    acc = tl.zeros([BLOCK_M, BLOCK_DV], dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    m_i = tl.full([BLOCK_M], -float("inf"), dtype=tl.float32)

    # Stage 1: cached prefix, gathered from the pool.
    for start_n in range(0, prefix_len, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        mask_n = offs_n < prefix_len
        kv_loc = tl.load(kv_indices + kv_start + offs_n, mask=mask_n, other=0).to(tl.int64)
        k = tl.load(
            K_Buffer
            + kv_loc[None, :] * stride_buf_kbs
            + cur_kv_head * stride_buf_kh
            + offs_d[:, None],
            mask=mask_n[None, :] & mask_d[:, None],
            other=0.0,
        )
        qk = _scores(q, k, sm_scale, LOGIT_CAP, PORTABLE_DOT, DOT_PRECISION)
        visible = mask_m[:, None] & mask_n[None, :]
        if USE_CUSTOM_MASK and not SKIP_PREFIX_CUSTOM_MASK:
            cm = tl.load(
                mask_ptr + mask_start + offs_m[:, None] * mask_row_len + offs_n[None, :],
                mask=visible,
                other=0,
            )
            visible &= cm != 0
        qk = tl.where(visible, qk, -float("inf"))
        v = tl.load(
            V_Buffer
            + kv_loc[:, None] * stride_buf_vbs
            + cur_kv_head * stride_buf_vh
            + offs_dv[None, :],
            mask=mask_n[:, None] & mask_dv[None, :],
            other=0.0,
        )
        acc, l_i, m_i = _online_softmax_step(acc, l_i, m_i, qk, v, PORTABLE_DOT, DOT_PRECISION)

    # Stage 2: the new tokens, contiguous in k_extend / v_extend.
    if IS_CAUSAL and not USE_CUSTOM_MASK:
        end_n = tl.minimum((cur_block_m + 1) * BLOCK_M, extend_len)
    else:
        end_n = extend_len
    for start_n in range(0, end_n, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        mask_n = offs_n < extend_len
        k = tl.load(
            K_Extend
            + (q_start + offs_n)[None, :] * stride_kbs
            + cur_kv_head * stride_kh
            + offs_d[:, None],
            mask=mask_n[None, :] & mask_d[:, None],
            other=0.0,
        )
        qk = _scores(q, k, sm_scale, LOGIT_CAP, PORTABLE_DOT, DOT_PRECISION)
        visible = mask_m[:, None] & mask_n[None, :]
        if USE_CUSTOM_MASK:
            cm = tl.load(
                mask_ptr
                + mask_start
                + offs_m[:, None] * mask_row_len
                + prefix_len
                + offs_n[None, :],
                mask=visible,
                other=0,
            )
            visible &= cm != 0
        elif IS_CAUSAL:
            visible &= offs_m[:, None] >= offs_n[None, :]
        qk = tl.where(visible, qk, -float("inf"))
        v = tl.load(
            V_Extend
            + (q_start + offs_n)[:, None] * stride_vbs
            + cur_kv_head * stride_vh
            + offs_dv[None, :],
            mask=mask_n[:, None] & mask_dv[None, :],
            other=0.0,
        )
        acc, l_i, m_i = _online_softmax_step(acc, l_i, m_i, qk, v, PORTABLE_DOT, DOT_PRECISION)

    l_i = tl.where(l_i == 0.0, 1.0, l_i)  # rows that saw no key (padding, full custom mask)
    tl.store(
        O_Extend
        + (q_start + offs_m)[:, None] * stride_obs
        + cur_head * stride_oh
        + offs_dv[None, :],
        acc / l_i[:, None],
        mask=mask_m[:, None] & mask_dv[None, :],
    )


@triton.jit
def _fwd_kernel_unified(
    Q,
    O,
    K_Buffer,
    V_Buffer,
    qo_indptr,
    kv_indptr,
    kv_indices,
    prefix_lens,
    mask_ptr,
    mask_indptr,
    sm_scale,
    stride_qbs,
    stride_qh,
    stride_obs,
    stride_oh,
    stride_buf_kbs,
    stride_buf_kh,
    stride_buf_vbs,
    stride_buf_vh,
    kv_group_num: tl.constexpr,
    Lq: tl.constexpr,
    Lv: tl.constexpr,
    BLOCK_DMODEL: tl.constexpr,
    BLOCK_DV: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    LOGIT_CAP: tl.constexpr,
    IS_CAUSAL: tl.constexpr,
    USE_CUSTOM_MASK: tl.constexpr,
    PORTABLE_DOT: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    cur_seq = tl.program_id(0)
    cur_head = tl.program_id(1)
    cur_block_m = tl.program_id(2)
    cur_kv_head = cur_head // kv_group_num

    q_start = tl.load(qo_indptr + cur_seq)
    extend_len = tl.load(qo_indptr + cur_seq + 1) - q_start
    if cur_block_m * BLOCK_M >= extend_len:
        return
    kv_start = tl.load(kv_indptr + cur_seq)
    kv_len = tl.load(kv_indptr + cur_seq + 1) - kv_start
    prefix_len = tl.load(prefix_lens + cur_seq)

    offs_d = tl.arange(0, BLOCK_DMODEL)
    offs_dv = tl.arange(0, BLOCK_DV)
    offs_m = cur_block_m * BLOCK_M + tl.arange(0, BLOCK_M)
    mask_d = offs_d < Lq
    mask_dv = offs_dv < Lv
    mask_m = offs_m < extend_len
    q_pos = prefix_len + offs_m  # absolute position of each query row

    q = tl.load(
        Q + (q_start + offs_m)[:, None] * stride_qbs + cur_head * stride_qh + offs_d[None, :],
        mask=mask_m[:, None] & mask_d[None, :],
        other=0.0,
    )
    if USE_CUSTOM_MASK:
        mask_start = tl.load(mask_indptr + cur_seq)

    acc = tl.zeros([BLOCK_M, BLOCK_DV], dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    m_i = tl.full([BLOCK_M], -float("inf"), dtype=tl.float32)

    if IS_CAUSAL and not USE_CUSTOM_MASK:
        end_n = tl.minimum(kv_len, prefix_len + (cur_block_m + 1) * BLOCK_M)
    else:
        end_n = kv_len
    for start_n in range(0, end_n, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        mask_n = offs_n < kv_len
        kv_loc = tl.load(kv_indices + kv_start + offs_n, mask=mask_n, other=0).to(tl.int64)
        k = tl.load(
            K_Buffer
            + kv_loc[None, :] * stride_buf_kbs
            + cur_kv_head * stride_buf_kh
            + offs_d[:, None],
            mask=mask_n[None, :] & mask_d[:, None],
            other=0.0,
        )
        qk = _scores(q, k, sm_scale, LOGIT_CAP, PORTABLE_DOT, DOT_PRECISION)
        visible = mask_m[:, None] & mask_n[None, :]
        if USE_CUSTOM_MASK:
            cm = tl.load(
                mask_ptr + mask_start + offs_m[:, None] * kv_len + offs_n[None, :],
                mask=visible,
                other=0,
            )
            visible &= cm != 0
        elif IS_CAUSAL:
            visible &= q_pos[:, None] >= offs_n[None, :]
        qk = tl.where(visible, qk, -float("inf"))
        v = tl.load(
            V_Buffer
            + kv_loc[:, None] * stride_buf_vbs
            + cur_kv_head * stride_buf_vh
            + offs_dv[None, :],
            mask=mask_n[:, None] & mask_dv[None, :],
            other=0.0,
        )
        acc, l_i, m_i = _online_softmax_step(acc, l_i, m_i, qk, v, PORTABLE_DOT, DOT_PRECISION)

    l_i = tl.where(l_i == 0.0, 1.0, l_i)
    tl.store(
        O + (q_start + offs_m)[:, None] * stride_obs + cur_head * stride_oh + offs_dv[None, :],
        acc / l_i[:, None],
        mask=mask_m[:, None] & mask_dv[None, :],
    )


def _portable_dot(t: torch.Tensor) -> bool:
    """Triton's interpreter (TRITON_INTERPRET=1 when the kernels were defined): see _dot."""
    return not t.is_cuda or not isinstance(_fwd_kernel, triton.runtime.JITFunction)


def _nonempty(t: torch.Tensor, stand_in: torch.Tensor) -> torch.Tensor:
    """An empty tensor has no valid pointer to hand a kernel that never reads it."""
    return t if t.numel() > 0 else stand_in


def _extend_block_config(head_dim: int, device: torch.device) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps, num_stages) for the extend kernels."""
    if device.type != "cuda":
        return 16, 16, 4, 1
    major, _ = torch.cuda.get_device_capability(device)
    num_warps = 4 if head_dim <= 64 else 8
    if major >= 9:
        return (128, 64, num_warps, 1) if head_dim <= 128 else (64, 64, num_warps, 1)
    if major >= 8:
        return (128, 64, num_warps, 1) if head_dim <= 64 else (64, 64, num_warps, 1)
    return 64, 32, num_warps, 1


def _prefill_block_config(head_dim: int, device: torch.device) -> tuple[int, int, int, int]:
    """The 2-stage extend kernel's launch: on Hopper at head dim <= 128, 64 x 32 tiles in 3
    stages, 4 warps (8k causal prefill attention, llama-3.1-8b heads, H200: 2.40 vs 3.07 ms for
    the 128 x 64 single-stage launch, kernel_bench sweep --parts extend); else the extend
    kernels' common launch. The unified kernel keeps the common launch."""
    hopper = device.type == "cuda" and torch.cuda.get_device_capability(device)[0] == 9
    if hopper and head_dim <= 128:
        return 64, 32, 4, 3
    return _extend_block_config(head_dim, device)


def _launch_params(q: torch.Tensor, Lv: int, block_m: int | None, block_n: int | None,
                   num_warps: int | None = None, num_stages: int | None = None,
                   config=_extend_block_config) -> dict:
    Lq = q.shape[-1]
    default_m, default_n, default_warps, default_stages = config(max(Lq, Lv), q.device)
    return {
        "Lq": Lq,
        "Lv": Lv,
        "BLOCK_DMODEL": triton.next_power_of_2(Lq),
        "BLOCK_DV": triton.next_power_of_2(Lv),
        "BLOCK_M": block_m or default_m,
        "BLOCK_N": block_n or default_n,
        "PORTABLE_DOT": _portable_dot(q),
        "DOT_PRECISION": "ieee" if q.dtype == torch.float32 else "tf32",
        "num_warps": num_warps or default_warps,
        "num_stages": num_stages or default_stages,
    }


def extend_attention_fwd(
    q_extend: torch.Tensor,
    k_extend: torch.Tensor,
    v_extend: torch.Tensor,
    o_extend: torch.Tensor,
    k_buffer: torch.Tensor,
    v_buffer: torch.Tensor,
    qo_indptr: torch.Tensor,
    kv_indptr: torch.Tensor,
    kv_indices: torch.Tensor,
    custom_mask: torch.Tensor | None,
    is_causal: bool,
    mask_indptr: torch.Tensor | None,
    max_len_extend: int,
    sm_scale: float | None = None,
    logit_cap: float = 0.0,
    skip_prefix_custom_mask: bool = True,
    *,
    block_m: int | None = None,
    block_n: int | None = None,
    num_warps: int | None = None,
    num_stages: int | None = None,
) -> None:
    """2-stage extend attention.

    q_extend, o_extend: [num_tokens, num_q_heads, D]; k_extend, v_extend: [num_tokens,
    num_kv_heads, D] (this pass's tokens); qo_indptr: [bs+1]; kv_indptr/kv_indices: the
    *prefix* slots per request. custom_mask (bool/uint8), when given, is request i's row-major
    [extend_len, prefix_len + extend_len] visibility at mask_indptr[i] and replaces causality;
    with skip_prefix_custom_mask the prefix is always visible. max_len_extend: host int >=
    every extend length.
    """
    bs = qo_indptr.shape[0] - 1
    head_num = q_extend.shape[1]
    kv_group_num = head_num // k_buffer.shape[1]
    assert head_num == kv_group_num * k_buffer.shape[1], "q heads must be a multiple of kv heads"
    for t in (q_extend, k_extend, v_extend, o_extend, k_buffer, v_buffer):
        assert t.dim() == 3 and t.stride(-1) == 1, "expected [tokens, heads, dim], dim contiguous"
    if bs == 0 or max_len_extend == 0:
        return
    sm_scale = sm_scale if sm_scale is not None else 1.0 / math.sqrt(q_extend.shape[-1])
    params = _launch_params(q_extend, v_extend.shape[-1], block_m, block_n, num_warps,
                            num_stages, _prefill_block_config)
    use_custom_mask = custom_mask is not None
    grid = (bs, head_num, triton.cdiv(max_len_extend, params["BLOCK_M"]))
    _fwd_kernel[grid](
        q_extend,
        k_extend,
        v_extend,
        o_extend,
        k_buffer,
        v_buffer,
        qo_indptr,
        kv_indptr,
        _nonempty(kv_indices, qo_indptr),
        custom_mask if use_custom_mask else qo_indptr,
        mask_indptr if use_custom_mask else qo_indptr,
        sm_scale,
        q_extend.stride(0),
        q_extend.stride(1),
        k_extend.stride(0),
        k_extend.stride(1),
        v_extend.stride(0),
        v_extend.stride(1),
        o_extend.stride(0),
        o_extend.stride(1),
        k_buffer.stride(0),
        k_buffer.stride(1),
        v_buffer.stride(0),
        v_buffer.stride(1),
        kv_group_num=kv_group_num,
        LOGIT_CAP=logit_cap,
        IS_CAUSAL=is_causal,
        USE_CUSTOM_MASK=use_custom_mask,
        SKIP_PREFIX_CUSTOM_MASK=skip_prefix_custom_mask,
        **params,
    )


def extend_attention_fwd_unified(
    q: torch.Tensor,
    o: torch.Tensor,
    k_buffer: torch.Tensor,
    v_buffer: torch.Tensor,
    qo_indptr: torch.Tensor,
    kv_indptr: torch.Tensor,
    kv_indices: torch.Tensor,
    prefix_lens: torch.Tensor,
    max_len_extend: int,
    sm_scale: float | None = None,
    logit_cap: float = 0.0,
    is_causal: bool = True,
    custom_mask: torch.Tensor | None = None,
    mask_indptr: torch.Tensor | None = None,
    *,
    block_m: int | None = None,
    block_n: int | None = None,
) -> None:
    """1-stage extend attention over prefix ++ extend keys, all read from the pool.

    kv_indptr/kv_indices: the unified slots per request (req_to_token[row, :seq_len]);
    prefix_lens: [bs] int32, so query row r of request i sits at absolute position
    prefix_lens[i] + r. custom_mask, when given, is request i's row-major
    [extend_len, seq_len] visibility at mask_indptr[i] and replaces causality.
    """
    bs = qo_indptr.shape[0] - 1
    head_num = q.shape[1]
    kv_group_num = head_num // k_buffer.shape[1]
    assert head_num == kv_group_num * k_buffer.shape[1], "q heads must be a multiple of kv heads"
    for t in (q, o, k_buffer, v_buffer):
        assert t.dim() == 3 and t.stride(-1) == 1, "expected [tokens, heads, dim], dim contiguous"
    if bs == 0 or max_len_extend == 0:
        return
    sm_scale = sm_scale if sm_scale is not None else 1.0 / math.sqrt(q.shape[-1])
    params = _launch_params(q, v_buffer.shape[-1], block_m, block_n)
    use_custom_mask = custom_mask is not None
    grid = (bs, head_num, triton.cdiv(max_len_extend, params["BLOCK_M"]))
    _fwd_kernel_unified[grid](
        q,
        o,
        k_buffer,
        v_buffer,
        qo_indptr,
        kv_indptr,
        kv_indices,
        prefix_lens,
        custom_mask if use_custom_mask else qo_indptr,
        mask_indptr if use_custom_mask else qo_indptr,
        sm_scale,
        q.stride(0),
        q.stride(1),
        o.stride(0),
        o.stride(1),
        k_buffer.stride(0),
        k_buffer.stride(1),
        v_buffer.stride(0),
        v_buffer.stride(1),
        kv_group_num=kv_group_num,
        LOGIT_CAP=logit_cap,
        IS_CAUSAL=is_causal,
        USE_CUSTOM_MASK=use_custom_mask,
        **params,
    )


@triton.jit
def _copy_unified_indices_kernel(
    prefix_kv_indptr,
    prefix_kv_indices,
    extend_start_loc,
    extend_seq_lens,
    extend_kv_indices,
    unified_kv_indptr,
    unified_kv_indices,
    BLOCK: tl.constexpr,
):
    pid = tl.program_id(0)
    prefix_start = tl.load(prefix_kv_indptr + pid)
    prefix_len = tl.load(prefix_kv_indptr + pid + 1) - prefix_start
    extend_start = tl.load(extend_start_loc + pid)
    extend_len = tl.load(extend_seq_lens + pid)
    out_start = tl.load(unified_kv_indptr + pid)
    for off in range(0, prefix_len, BLOCK):
        offs = off + tl.arange(0, BLOCK)
        mask = offs < prefix_len
        slots = tl.load(prefix_kv_indices + prefix_start + offs, mask=mask)
        tl.store(unified_kv_indices + out_start + offs, slots, mask=mask)
    out_start += prefix_len
    for off in range(0, extend_len, BLOCK):
        offs = off + tl.arange(0, BLOCK)
        mask = offs < extend_len
        slots = tl.load(extend_kv_indices + extend_start + offs, mask=mask)
        tl.store(unified_kv_indices + out_start + offs, slots, mask=mask)


def build_unified_kv_indices(
    prefix_kv_indptr: torch.Tensor,
    prefix_kv_indices: torch.Tensor,
    extend_start_loc: torch.Tensor,
    extend_seq_lens: torch.Tensor,
    extend_kv_indices: torch.Tensor,
    bs: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per request, [prefix slots ++ extend slots]; no host sync.

    Returns (unified_kv_indptr [bs+1] int32, unified_kv_indices int64, prefix_lens [bs] int32).
    unified_kv_indices is sized from the inputs' numel(); only its first unified_kv_indptr[bs]
    entries are written.
    """
    device = prefix_kv_indptr.device
    prefix_kv_indptr = prefix_kv_indptr[: bs + 1]
    prefix_lens = (prefix_kv_indptr[1:] - prefix_kv_indptr[:-1]).to(torch.int32)
    unified_lens = prefix_lens + extend_seq_lens[:bs].to(torch.int32)
    unified_kv_indptr = torch.cat(  # cat, not in-place writes: safe under CUDA graphs
        [
            torch.zeros(1, dtype=torch.int32, device=device),
            torch.cumsum(unified_lens, dim=0, dtype=torch.int32),
        ]
    )
    max_unified_len = prefix_kv_indices.numel() + extend_kv_indices.numel()
    unified_kv_indices = torch.empty(max_unified_len, dtype=torch.int64, device=device)
    if bs > 0 and max_unified_len > 0:
        _copy_unified_indices_kernel[(bs,)](
            prefix_kv_indptr,
            _nonempty(prefix_kv_indices, unified_kv_indices),
            extend_start_loc,
            extend_seq_lens,
            _nonempty(extend_kv_indices, unified_kv_indices),
            unified_kv_indptr,
            unified_kv_indices,
            BLOCK=128,
        )
    return unified_kv_indptr, unified_kv_indices, prefix_lens
