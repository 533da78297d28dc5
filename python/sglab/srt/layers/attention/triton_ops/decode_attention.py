"""Split-KV flash-decoding: one query token per request against its paged KV.

Stage 1 splits each request's keys into `num_kv_splits[i]` ranges (each a multiple of
`_MIN_BLOCK_KV` long) and writes a partial output and its log-sum-exp per range into the
preallocated `attn_logits` / `attn_lse`. Stage 2 merges the ranges in order. Grids depend only on
host ints (`bs`, heads, `max_kv_splits`), so the launch is CUDA-graph safe and never syncs.
Split boundaries depend only on a request's own length and split count, so a request's output
does not depend on what else is in the batch.

With a merge counter (`--kernel-fusion on`) there is no stage 2: a request with one split writes
its output from stage 1, and otherwise the last split to finish merges, in the same order and
arithmetic as stage 2, so both forms give the same bits.

With `rope` (grouped kernel, `--kernel-fusion on`) q arrives as the projection's raw output: each
program applies the layer's q/k RMSNorm and RoPE to its heads' rows, and the split that holds
the new token also stores that token's k (normed, rotated) and v into the pool before reading
its keys, in place of the separate `qk_norm_rope` launch with its K/V write.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from sglab.srt.layers.elementwise import QKNormRope
from sglab.srt.layers.pdl import pdl_launch, pdl_wait

_MIN_BLOCK_KV = 32
GROUP_BLOCK_H = 16  # q heads per program in the grouped (GQA) kernel; >= 16 for tl.dot
# Grouped-kernel tiles (keys per tile, pipeline stages, warps) on CUDA, the first that fits
# shared memory. One split per request (a batch large enough to fill the GPU on its own): small
# tiles, several programs per SM; the fused decode step at bs 64 x 264 keys ran fastest with
# 64-key tiles in 3 stages on 2 warps (24.8 vs 27.1 µs for 32 / 3 / 4 at the 8B heads, 25.9 vs
# 26.3 at the 0.6B ones; kernel_bench sweep --parts attention-tune). Several splits (a small
# batch, each program streaming a long range): 128-key tiles in 3 stages. Measured on an H200:
# benchmark/kernel_bench.py sweep --parts attention.
_DEFAULT_ONE_SPLIT = ((64, 3, 2), (32, 3, 4), (32, 2, 4))
_GROUPED_TILES_ONE_SPLIT = _DEFAULT_ONE_SPLIT
_GROUPED_TILES_SPLIT = ((128, 3, 4), (64, 3, 4), (32, 3, 4), (32, 2, 4))


def set_one_split_tile(env: str | None) -> None:
    """SGLAB_DECODE_ONE_SPLIT_TILE="BLOCK_N,STAGES,WARPS" (read by the Triton backend when it
    is built): the grouped kernel's tile for batches of one split per request, before the
    defaults (tuning; kernel_bench sweep --parts attention-tune)."""
    global _GROUPED_TILES_ONE_SPLIT
    _GROUPED_TILES_ONE_SPLIT = _DEFAULT_ONE_SPLIT
    if env is None:
        return
    parts = env.split(",")
    if len(parts) != 3 or not all(p.isdigit() and int(p) > 0 for p in parts) \
            or int(parts[0]) & (int(parts[0]) - 1):
        raise ValueError(f"SGLAB_DECODE_ONE_SPLIT_TILE={env!r}: expected BLOCK_N,STAGES,WARPS "
                         "(positive integers, BLOCK_N a power of two)")
    tile = tuple(int(p) for p in parts)
    _GROUPED_TILES_ONE_SPLIT = (tile, *(t for t in _DEFAULT_ONE_SPLIT if t != tile))


@dataclass(frozen=True)
class DecodeRope:
    """`decode_attention_fwd(rope=)`: the layer's q/k norm + RoPE, and the new tokens' raw k and
    v ([bs, Hkv * D], row-strided views are fine) with their pool slots `loc` ([bs])."""

    norm_rope: QKNormRope
    k: torch.Tensor
    v: torch.Tensor
    loc: torch.Tensor

    def args(self, q: torch.Tensor, k_buffer: torch.Tensor) -> tuple:
        nr, d = self.norm_rope, q.shape[-1]
        half = d // 2
        assert half > 0 and half & (half - 1) == 0, "RoPE over whole power-of-two heads"
        assert k_buffer.dtype == q.dtype and k_buffer.shape[-1] == d
        for t in (self.k, self.v):
            assert t.shape == (q.shape[0], k_buffer.shape[1] * d) and t.stride(1) == 1
            assert t.dtype == q.dtype
        assert self.loc.shape == (q.shape[0],) and nr.positions.shape == (q.shape[0],)
        has_norm = nr.q_weight is not None
        return (self.k, self.v, self.loc, nr.positions, nr.cos_sin_cache,
                nr.q_weight if has_norm else q, nr.k_weight if has_norm else q, nr.eps,
                self.k.stride(0), self.v.stride(0)), has_norm


@triton.jit
def _tanh(x):
    return 2 * tl.sigmoid(2 * x) - 1


@triton.jit
def _dot(a, b, PORTABLE_DOT: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """a [M, K] @ b [K, N] with fp32 accumulation; PORTABLE_DOT for Triton's interpreter, whose
    tl.dot cannot take bf16."""
    if PORTABLE_DOT:
        return tl.sum(a.to(tl.float32)[:, :, None] * b.to(tl.float32)[None, :, :], axis=1)
    else:
        return tl.dot(a, b, input_precision=DOT_PRECISION)


@triton.jit
def _split_range(seq_len, num_splits, split_id, MIN_BLOCK_KV: tl.constexpr):
    per_split = tl.cdiv(tl.cdiv(seq_len, num_splits), MIN_BLOCK_KV) * MIN_BLOCK_KV
    split_start = per_split * split_id
    split_end = tl.minimum(split_start + per_split, seq_len)
    return split_start, split_end


@triton.jit
def _num_active_splits(seq_len, num_splits, MIN_BLOCK_KV: tl.constexpr):
    """Splits with keys: the first ones (`_split_range` leaves only trailing splits empty)."""
    per_split = tl.cdiv(tl.cdiv(seq_len, num_splits), MIN_BLOCK_KV) * MIN_BLOCK_KV
    return tl.cdiv(seq_len, per_split)


@triton.jit
def _merge_splits(part, lse, part_mask, lse_mask, num_active, stride_part_split,
                  MAX_SPLITS: tl.constexpr, VOLATILE: tl.constexpr):
    """Merges the partials at `part` (a pointer tile: one head's [DV] or a group's [H, DV])
    with their log-sum-exps at `lse` (a pointer per head, [1] or [H, 1]; splits contiguous),
    in split order (batch invariant: the same order whoever merges). The loop is unrolled to
    MAX_SPLITS with the splits past `num_active` masked to no-ops, so every load is issued
    up front rather than one round trip per split. VOLATILE: partials another program of this
    launch wrote."""
    e_max = tl.load(lse, mask=lse_mask, other=-float("inf"), volatile=VOLATILE)
    acc = tl.load(part, mask=part_mask, other=0.0, volatile=VOLATILE)
    e_sum = e_max * 0.0 + 1.0
    for split_id in tl.static_range(1, MAX_SPLITS):
        active = split_id < num_active
        # tl.where, not &: Triton's interpreter widens a tile mask & a scalar one to int32
        part_lse = tl.load(lse + split_id, mask=tl.where(active, lse_mask, False),
                           other=-float("inf"), volatile=VOLATILE)
        p = tl.load(part + split_id * stride_part_split,
                    mask=tl.where(active, part_mask, False), other=0.0, volatile=VOLATILE)
        n_max = tl.maximum(part_lse, e_max)
        old_scale = tl.exp(e_max - n_max)
        part_scale = tl.exp(part_lse - n_max)
        acc = acc * old_scale + part_scale * p
        e_sum = e_sum * old_scale + part_scale
        e_max = n_max
    return acc / e_sum


@triton.jit
def _is_last_split(Merge_Count, idx, num_active):
    """Counts one finished split of counter `idx` in; True for the last of `num_active`, which
    then merges (and zeroes the counter for the next launch)."""
    tl.debug_barrier()  # every thread's partial stores happen before the release below
    arrived = tl.atomic_add(Merge_Count + idx, 1, sem="acq_rel", scope="gpu")
    return arrived == num_active - 1


@triton.jit
def _load_rows(src, offs_d, row_mask, HALF: tl.constexpr):
    """The head rows at `src` (a [R, 1] pointer tile) and each element's RoPE partner (the
    other half), loaded in place so the rotated tile stays whole for tl.dot."""
    rot = (offs_d + HALF) % (2 * HALF)
    x = tl.load(src + offs_d[None, :], mask=row_mask[:, None], other=0.0)
    xr = tl.load(src + rot[None, :], mask=row_mask[:, None], other=0.0)
    return x, xr


@triton.jit
def _load_cos_sin(Cos_Sin, pos, offs_d, HALF: tl.constexpr):
    half = offs_d % HALF
    return (tl.load(Cos_Sin + pos * 2 * HALF + half),
            tl.load(Cos_Sin + pos * 2 * HALF + HALF + half))


@triton.jit
def _norm_rope(x, xr, offs_d, cos, sin, Weight, eps, HAS_NORM: tl.constexpr,
               HALF: tl.constexpr):
    """RMSNorm (HAS_NORM) and neox RoPE of rows `x` ([R, 2 * HALF], partners `xr`), rounding
    where `qk_norm_rope` does; in the rows' dtype."""
    dtype = x.dtype
    if HAS_NORM:
        rot = (offs_d + HALF) % (2 * HALF)
        f = x.to(tl.float32)
        rstd = 1.0 / tl.sqrt(tl.sum(f * f, 1) / (2 * HALF) + eps)
        w = tl.load(Weight + offs_d).to(tl.float32)
        wr = tl.load(Weight + rot).to(tl.float32)
        x = ((f * rstd[:, None]).to(dtype).to(tl.float32) * w[None, :]).to(dtype)
        xr = ((xr.to(tl.float32) * rstd[:, None]).to(dtype).to(tl.float32) * wr[None, :]).to(dtype)
    cos = cos.to(dtype).to(tl.float32)
    sin = sin.to(dtype).to(tl.float32)
    sign = tl.where(offs_d < HALF, -1.0, 1.0)
    out = ((x.to(tl.float32) * cos[None, :]).to(dtype).to(tl.float32)
           + (sign[None, :] * xr.to(tl.float32) * sin[None, :]).to(dtype).to(tl.float32))
    return out.to(dtype)


@triton.jit
def _decode_stage1_kernel(
    Q,
    K_Buffer,
    V_Buffer,
    sm_scale,
    kv_indptr,
    kv_indices,
    Att_Out,
    Att_Lse,
    num_kv_splits,
    stride_qbs,
    stride_qh,
    stride_buf_kbs,
    stride_buf_kh,
    stride_buf_vbs,
    stride_buf_vh,
    stride_mid_ob,
    stride_mid_oh,
    stride_mid_os,
    stride_lse_b,
    stride_lse_h,
    O,
    stride_obs,
    stride_oh,
    Merge_Count,
    kv_group_num: tl.constexpr,
    Lk: tl.constexpr,
    Lv: tl.constexpr,
    BLOCK_DMODEL: tl.constexpr,
    BLOCK_DV: tl.constexpr,
    BLOCK_N: tl.constexpr,
    MIN_BLOCK_KV: tl.constexpr,
    LOGIT_CAP: tl.constexpr,
    MERGE: tl.constexpr,
    MAX_SPLITS: tl.constexpr,
    USE_PDL: tl.constexpr,
):
    """One q head per program; vector math (no tl.dot), for MHA. MERGE: see
    `decode_attention_fwd`'s `merge_count`."""
    pdl_wait(USE_PDL)
    cur_batch = tl.program_id(0)
    cur_head = tl.program_id(1)
    split_id = tl.program_id(2)
    cur_kv_head = cur_head // kv_group_num

    offs_d = tl.arange(0, BLOCK_DMODEL)
    offs_dv = tl.arange(0, BLOCK_DV)
    mask_d = offs_d < Lk
    mask_dv = offs_dv < Lv

    kv_start = tl.load(kv_indptr + cur_batch)
    seq_len = tl.load(kv_indptr + cur_batch + 1) - kv_start
    num_splits = tl.load(num_kv_splits + cur_batch)
    split_start, split_end = _split_range(seq_len, num_splits, split_id, MIN_BLOCK_KV)
    if split_end > split_start:
        q = tl.load(
            Q + cur_batch * stride_qbs + cur_head * stride_qh + offs_d, mask=mask_d, other=0.0
        )
        q = q.to(tl.float32)
        e_max = -float("inf")
        e_sum = 0.0
        acc = tl.zeros([BLOCK_DV], dtype=tl.float32)
        for start_n in range(split_start, split_end, BLOCK_N):
            offs_n = start_n + tl.arange(0, BLOCK_N)
            mask_n = offs_n < split_end
            kv_loc = tl.load(kv_indices + kv_start + offs_n, mask=mask_n, other=0).to(tl.int64)
            k = tl.load(
                K_Buffer
                + kv_loc[:, None] * stride_buf_kbs
                + cur_kv_head * stride_buf_kh
                + offs_d[None, :],
                mask=mask_n[:, None] & mask_d[None, :],
                other=0.0,
            )
            qk = tl.sum(q[None, :] * k.to(tl.float32), 1) * sm_scale
            if LOGIT_CAP > 0:
                qk = LOGIT_CAP * _tanh(qk / LOGIT_CAP)
            qk = tl.where(mask_n, qk, float("-inf"))
            v = tl.load(
                V_Buffer
                + kv_loc[:, None] * stride_buf_vbs
                + cur_kv_head * stride_buf_vh
                + offs_dv[None, :],
                mask=mask_n[:, None] & mask_dv[None, :],
                other=0.0,
            )
            n_max = tl.maximum(tl.max(qk, 0), e_max)
            re_scale = tl.exp(e_max - n_max)
            p = tl.exp(qk - n_max)
            acc = acc * re_scale + tl.sum(p[:, None] * v.to(tl.float32), 0)
            e_sum = e_sum * re_scale + tl.sum(p, 0)
            e_max = n_max
        num_active = _num_active_splits(seq_len, num_splits, MIN_BLOCK_KV)
        out = O + cur_batch * stride_obs + cur_head * stride_oh + offs_dv
        if MERGE and num_active == 1:
            tl.store(out, acc / e_sum, mask=mask_dv)
        else:
            mid = cur_batch * stride_mid_ob + cur_head * stride_mid_oh
            tl.store(Att_Out + mid + split_id * stride_mid_os + offs_dv, acc / e_sum,
                     mask=mask_dv)
            lse = cur_batch * stride_lse_b + cur_head * stride_lse_h
            tl.store(Att_Lse + lse + split_id, e_max + tl.log(e_sum))
            if MERGE:
                counter = cur_batch * tl.num_programs(1) + cur_head
                if _is_last_split(Merge_Count, counter, num_active):
                    merged = _merge_splits(Att_Out + mid + offs_dv, Att_Lse + lse, mask_dv,
                                           num_active > 0, num_active, stride_mid_os,
                                           MAX_SPLITS, True)
                    tl.store(out, merged, mask=mask_dv)
                    tl.store(Merge_Count + counter, 0)


@triton.jit
def _decode_grouped_stage1_kernel(
    Q,
    K_Buffer,
    V_Buffer,
    sm_scale,
    kv_indptr,
    kv_indices,
    Att_Out,
    Att_Lse,
    num_kv_splits,
    stride_qbs,
    stride_qh,
    stride_buf_kbs,
    stride_buf_kh,
    stride_buf_vbs,
    stride_buf_vh,
    stride_mid_ob,
    stride_mid_oh,
    stride_mid_os,
    stride_lse_b,
    stride_lse_h,
    O,
    stride_obs,
    stride_oh,
    Merge_Count,
    q_head_num,
    Rope_K,
    Rope_V,
    Rope_Loc,
    Rope_Pos,
    Rope_Cos_Sin,
    Rope_QW,
    Rope_KW,
    rope_eps,
    stride_rope_k,
    stride_rope_v,
    kv_group_num: tl.constexpr,
    Lk: tl.constexpr,
    Lv: tl.constexpr,
    BLOCK_DMODEL: tl.constexpr,
    BLOCK_DV: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_H: tl.constexpr,
    MERGE_BLOCK_H: tl.constexpr,
    MIN_BLOCK_KV: tl.constexpr,
    LOGIT_CAP: tl.constexpr,
    PORTABLE_DOT: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    MERGE: tl.constexpr,
    MAX_SPLITS: tl.constexpr,
    USE_PDL: tl.constexpr,
    ROPE: tl.constexpr,
    ROPE_NORM: tl.constexpr,
):
    """Up to BLOCK_H q heads sharing one kv head per program; q @ k^T and p @ v via tl.dot.
    MERGE: see `decode_attention_fwd`'s `merge_count`; ROPE: its `rope`."""
    pdl_wait(USE_PDL)
    cur_batch = tl.program_id(0)
    cur_head_id = tl.program_id(1)
    split_id = tl.program_id(2)
    if kv_group_num > BLOCK_H:
        VALID_BLOCK_H: tl.constexpr = BLOCK_H
    else:
        VALID_BLOCK_H: tl.constexpr = kv_group_num
    # A group wider than BLOCK_H takes several programs; none reaches into the next group.
    PROGRAMS_PER_KV_HEAD: tl.constexpr = (kv_group_num + BLOCK_H - 1) // BLOCK_H
    cur_kv_head = cur_head_id // PROGRAMS_PER_KV_HEAD
    first_head = (cur_kv_head * kv_group_num
                  + (cur_head_id % PROGRAMS_PER_KV_HEAD) * VALID_BLOCK_H)
    end_head = tl.minimum((cur_kv_head + 1) * kv_group_num, q_head_num)
    cur_head = first_head + tl.arange(0, BLOCK_H)
    mask_h = (cur_head < first_head + VALID_BLOCK_H) & (cur_head < end_head)

    offs_d = tl.arange(0, BLOCK_DMODEL)
    offs_dv = tl.arange(0, BLOCK_DV)
    mask_d = offs_d < Lk
    mask_dv = offs_dv < Lv

    if ROPE:  # loads that need no length first, so their latency overlaps kv_indptr's
        HALF: tl.constexpr = BLOCK_DMODEL // 2
        qx, qr = _load_rows(Q + cur_batch * stride_qbs + cur_head[:, None] * stride_qh, offs_d,
                            mask_h, HALF)
        k_row = Rope_K + cur_batch * stride_rope_k + cur_kv_head * 2 * HALF
        kx, kr = _load_rows(k_row + tl.zeros([1, 1], dtype=tl.int32), offs_d,
                            tl.full([1], True, tl.int1), HALF)
        v_new = tl.load(Rope_V + cur_batch * stride_rope_v + cur_kv_head * 2 * HALF + offs_dv)
        loc = tl.load(Rope_Loc + cur_batch).to(tl.int64)
        cos, sin = _load_cos_sin(Rope_Cos_Sin, tl.load(Rope_Pos + cur_batch), offs_d, HALF)
    kv_start = tl.load(kv_indptr + cur_batch)
    seq_len = tl.load(kv_indptr + cur_batch + 1) - kv_start
    num_splits = tl.load(num_kv_splits + cur_batch)
    split_start, split_end = _split_range(seq_len, num_splits, split_id, MIN_BLOCK_KV)
    if split_end > split_start:
        if ROPE:
            q = _norm_rope(qx, qr, offs_d, cos, sin, Rope_QW, rope_eps, ROPE_NORM, HALF)
            if split_end == seq_len:  # the new token's split: its k and v into the pool first
                k_new = _norm_rope(kx, kr, offs_d, cos, sin, Rope_KW, rope_eps, ROPE_NORM, HALF)
                _store_new_kv(k_new, v_new, loc, K_Buffer, V_Buffer, cur_kv_head,
                              stride_buf_kbs, stride_buf_kh, stride_buf_vbs, stride_buf_vh,
                              offs_d, offs_dv)
        else:
            q = tl.load(
                Q + cur_batch * stride_qbs + cur_head[:, None] * stride_qh + offs_d[None, :],
                mask=mask_h[:, None] & mask_d[None, :],
                other=0.0,
            )
        e_max = tl.full([BLOCK_H], -float("inf"), dtype=tl.float32)
        e_sum = tl.zeros([BLOCK_H], dtype=tl.float32)
        acc = tl.zeros([BLOCK_H, BLOCK_DV], dtype=tl.float32)
        for start_n in range(split_start, split_end, BLOCK_N):
            offs_n = start_n + tl.arange(0, BLOCK_N)
            mask_n = offs_n < split_end
            kv_loc = tl.load(kv_indices + kv_start + offs_n, mask=mask_n, other=0).to(tl.int64)
            k = tl.load(
                K_Buffer
                + kv_loc[None, :] * stride_buf_kbs
                + cur_kv_head * stride_buf_kh
                + offs_d[:, None],
                mask=mask_n[None, :] & mask_d[:, None],
                other=0.0,
            )
            qk = _dot(q, k, PORTABLE_DOT, DOT_PRECISION) * sm_scale
            if LOGIT_CAP > 0:
                qk = LOGIT_CAP * _tanh(qk / LOGIT_CAP)
            qk = tl.where(mask_h[:, None] & mask_n[None, :], qk, float("-inf"))
            v = tl.load(
                V_Buffer
                + kv_loc[:, None] * stride_buf_vbs
                + cur_kv_head * stride_buf_vh
                + offs_dv[None, :],
                mask=mask_n[:, None] & mask_dv[None, :],
                other=0.0,
            )
            n_max = tl.maximum(tl.max(qk, 1), e_max)
            n_max_safe = tl.where(n_max == -float("inf"), 0.0, n_max)  # padded heads
            re_scale = tl.exp(e_max - n_max_safe)
            p = tl.exp(qk - n_max_safe[:, None])
            acc = acc * re_scale[:, None] + _dot(p.to(v.dtype), v, PORTABLE_DOT, DOT_PRECISION)
            e_sum = e_sum * re_scale + tl.sum(p, 1)
            e_max = n_max
        e_sum = tl.where(mask_h, e_sum, 1.0)
        num_active = _num_active_splits(seq_len, num_splits, MIN_BLOCK_KV)
        mask_o = mask_h[:, None] & mask_dv[None, :]
        if MERGE and num_active == 1:
            out = O + cur_batch * stride_obs + cur_head[:, None] * stride_oh + offs_dv[None, :]
            tl.store(out, acc / e_sum[:, None], mask=mask_o)
        else:
            mid = (
                cur_batch * stride_mid_ob
                + cur_head[:, None] * stride_mid_oh
                + split_id * stride_mid_os
            )
            tl.store(Att_Out + mid + offs_dv[None, :], acc / e_sum[:, None], mask=mask_o)
            lse = cur_batch * stride_lse_b + cur_head * stride_lse_h + split_id
            tl.store(Att_Lse + lse, e_max + tl.log(e_sum), mask=mask_h)
            if MERGE:
                counter = cur_batch * tl.num_programs(1) + cur_head_id
                if _is_last_split(Merge_Count, counter, num_active):
                    _merge_group(Att_Out, Att_Lse, O, cur_batch, first_head,
                                 end_head, num_active, stride_mid_ob, stride_mid_oh,
                                 stride_mid_os, stride_lse_b, stride_lse_h, stride_obs,
                                 stride_oh, offs_dv, mask_dv, VALID_BLOCK_H, MERGE_BLOCK_H,
                                 MAX_SPLITS)
                    tl.store(Merge_Count + counter, 0)


@triton.jit
def _store_new_kv(k, v, loc, K_Buffer, V_Buffer, kv_head, stride_buf_kbs, stride_buf_kh,
                  stride_buf_vbs, stride_buf_vh, offs_d, offs_dv):
    """The new token's k ([1, D], normed and rotated) and v of `kv_head` at its pool slot,
    visible to every thread of the program before its key loop reads that slot."""
    tl.store(K_Buffer + loc * stride_buf_kbs + kv_head * stride_buf_kh + offs_d[None, :], k)
    tl.store(V_Buffer + loc * stride_buf_vbs + kv_head * stride_buf_vh + offs_dv, v)
    tl.debug_barrier()  # the memory model's order: these stores before other threads' loads


@triton.jit
def _merge_group(Att_Out, Att_Lse, O, cur_batch, first_head, end_head, num_active,
                 stride_mid_ob, stride_mid_oh, stride_mid_os, stride_lse_b, stride_lse_h,
                 stride_obs, stride_oh, offs_dv, mask_dv, NUM_HEADS: tl.constexpr,
                 BLOCK_HEADS: tl.constexpr, MAX_SPLITS: tl.constexpr):
    """The merge of a grouped program's heads, all at once, each with stage 2's arithmetic."""
    offs_h = tl.arange(0, BLOCK_HEADS)
    head = first_head + offs_h
    mask_h = (offs_h < NUM_HEADS) & (head < end_head)
    mask = mask_h[:, None] & mask_dv[None, :]
    mid = cur_batch * stride_mid_ob + head[:, None] * stride_mid_oh + offs_dv[None, :]
    lse = cur_batch * stride_lse_b + head * stride_lse_h
    merged = _merge_splits(Att_Out + mid, Att_Lse + lse[:, None], mask, mask_h[:, None],
                           num_active, stride_mid_os, MAX_SPLITS, True)
    tl.store(O + cur_batch * stride_obs + head[:, None] * stride_oh + offs_dv[None, :], merged,
             mask=mask)


@triton.jit
def _decode_stage2_kernel(
    Att_Out,
    Att_Lse,
    O,
    kv_indptr,
    num_kv_splits,
    stride_mid_ob,
    stride_mid_oh,
    stride_mid_os,
    stride_lse_b,
    stride_lse_h,
    stride_obs,
    stride_oh,
    Lv: tl.constexpr,
    BLOCK_DV: tl.constexpr,
    MIN_BLOCK_KV: tl.constexpr,
    MAX_SPLITS: tl.constexpr,
    USE_PDL: tl.constexpr,
):
    pdl_wait(USE_PDL)
    cur_batch = tl.program_id(0)
    cur_head = tl.program_id(1)
    offs_dv = tl.arange(0, BLOCK_DV)
    mask_dv = offs_dv < Lv

    seq_len = tl.load(kv_indptr + cur_batch + 1) - tl.load(kv_indptr + cur_batch)
    num_active = _num_active_splits(seq_len, tl.load(num_kv_splits + cur_batch), MIN_BLOCK_KV)
    mid = cur_batch * stride_mid_ob + cur_head * stride_mid_oh
    lse = cur_batch * stride_lse_b + cur_head * stride_lse_h
    out = _merge_splits(Att_Out + mid + offs_dv, Att_Lse + lse, mask_dv, num_active > 0,
                        num_active, stride_mid_os, MAX_SPLITS, False)
    tl.store(O + cur_batch * stride_obs + cur_head * stride_oh + offs_dv, out, mask=mask_dv)


@functools.lru_cache(maxsize=None)
def _max_shared_memory(device_index: int) -> int:
    return triton.runtime.driver.active.utils.get_device_properties(device_index)["max_shared_mem"]


def _grouped_tile(q: torch.Tensor, k_buffer: torch.Tensor, max_kv_splits: int, d: int,
                  dv: int) -> tuple[int, int, int]:
    """The grouped kernel's default (BLOCK_N, num_stages, num_warps): see _GROUPED_TILES_*."""
    if not q.is_cuda:
        return 16, 1, 4
    limit = _max_shared_memory(q.device.index if q.device.index is not None
                               else torch.cuda.current_device())
    tiles = _GROUPED_TILES_ONE_SPLIT if max_kv_splits == 1 else _GROUPED_TILES_SPLIT
    q_tile = GROUP_BLOCK_H * d * q.element_size()
    for block_n, stages, warps in tiles:
        if stages * block_n * (d + dv) * k_buffer.element_size() + q_tile <= limit:
            return block_n, stages, warps
    return tiles[-1]


def _portable_dot(t: torch.Tensor) -> bool:
    """Triton's interpreter (TRITON_INTERPRET=1 when the kernels were defined): see _dot."""
    return not t.is_cuda or not isinstance(
        _decode_grouped_stage1_kernel, triton.runtime.JITFunction
    )


def decode_attention_fwd(
    q: torch.Tensor,
    k_buffer: torch.Tensor,
    v_buffer: torch.Tensor,
    o: torch.Tensor,
    kv_indptr: torch.Tensor,
    kv_indices: torch.Tensor,
    attn_logits: torch.Tensor,
    attn_lse: torch.Tensor,
    num_kv_splits: torch.Tensor,
    max_kv_splits: int,
    sm_scale: float,
    logit_cap: float = 0.0,
    *,
    block_n: int | None = None,
    num_stages: int | None = None,
    num_warps: int | None = None,
    merge_count: torch.Tensor | None = None,
    rope: DecodeRope | None = None,
) -> None:
    """o[i] = softmax(q[i] k^T * sm_scale) v over the slots kv_indices[kv_indptr[i]:kv_indptr[i+1]].

    q, o: [bs, num_q_heads, head_dim]; k_buffer, v_buffer: [num_slots, num_kv_heads, head_dim];
    num_kv_splits: [bs] int32, each in [1, max_kv_splits]; attn_logits:
    [bs, num_q_heads, >= max_kv_splits, head_dim_v] fp32; attn_lse: [bs, num_q_heads, >=
    max_kv_splits] fp32. Every request needs at least one key.

    merge_count (int32, >= bs * num_q_heads zeros, left zeroed): one launch instead of two. A
    request with one split writes o directly; otherwise the split that finishes last (counted
    atomically) merges the partials, in split order, as stage 2 would: the same bits.

    rope (grouped heads only): q is the projection's raw q; the launch applies `rope.norm_rope`
    to q and to the new token's k, and stores that k and v at `rope.loc` (what `qk_norm_rope`
    with its K/V write would do) before the keys are read.
    """
    bs, head_num, Lk = q.shape
    Lv = v_buffer.shape[-1]
    kv_group_num = head_num // k_buffer.shape[1]
    assert head_num == kv_group_num * k_buffer.shape[1], "q heads must be a multiple of kv heads"
    assert attn_logits.shape[2] >= max_kv_splits and attn_lse.shape[2] >= max_kv_splits
    assert attn_logits.dtype == torch.float32 and attn_lse.dtype == torch.float32
    for t in (q, k_buffer, v_buffer, o):
        assert t.dim() == 3 and t.stride(-1) == 1, "expected [tokens, heads, dim], dim contiguous"
    assert attn_logits.stride(-1) == 1 and attn_lse.stride(-1) == 1
    if merge_count is not None:
        assert merge_count.dtype == torch.int32 and merge_count.numel() >= bs * head_num
    assert rope is None or (kv_group_num > 1 and Lv == Lk), "rope: grouped heads, Lv == Lk"
    # without rope: placeholders for its 7 pointers, eps and 2 strides
    rope_args, rope_norm = rope.args(q, k_buffer) if rope is not None else ((q,) * 7 + (
        0.0, 0, 0), False)
    if bs == 0:
        return
    on_cuda = q.is_cuda
    BLOCK_DMODEL = triton.next_power_of_2(Lk)
    BLOCK_DV = triton.next_power_of_2(Lv)
    merge = merge_count is not None
    common = {
        "Lk": Lk,
        "Lv": Lv,
        "BLOCK_DMODEL": BLOCK_DMODEL,
        "BLOCK_DV": BLOCK_DV,
        "MIN_BLOCK_KV": _MIN_BLOCK_KV,
        "LOGIT_CAP": logit_cap,
        "MERGE": merge,
        "MAX_SPLITS": triton.next_power_of_2(max_kv_splits),
        **pdl_launch(q),
    }
    strides = (
        q.stride(0),
        q.stride(1),
        k_buffer.stride(0),
        k_buffer.stride(1),
        v_buffer.stride(0),
        v_buffer.stride(1),
        attn_logits.stride(0),
        attn_logits.stride(1),
        attn_logits.stride(2),
        attn_lse.stride(0),
        attn_lse.stride(1),
    )
    args = (
        q,
        k_buffer,
        v_buffer,
        sm_scale,
        kv_indptr,
        kv_indices,
        attn_logits,
        attn_lse,
        num_kv_splits,
        *strides,
        o,
        o.stride(0),
        o.stride(1),
        merge_count if merge else num_kv_splits,
    )
    if kv_group_num == 1:
        block = block_n or (64 if on_cuda else 32)
        grid = (bs, head_num, max_kv_splits)
        _decode_stage1_kernel[grid](*args, kv_group_num=1, BLOCK_N=block,
                                    num_warps=num_warps or 4, **common)
    else:
        tile_n, stages, warps = _grouped_tile(q, k_buffer, max_kv_splits, BLOCK_DMODEL,
                                              BLOCK_DV)
        block = block_n or tile_n
        programs = k_buffer.shape[1] * triton.cdiv(kv_group_num, GROUP_BLOCK_H)
        grid = (bs, programs, max_kv_splits)
        _decode_grouped_stage1_kernel[grid](
            *args,
            head_num,
            *rope_args,
            kv_group_num=kv_group_num,
            BLOCK_N=block,
            BLOCK_H=GROUP_BLOCK_H,
            MERGE_BLOCK_H=triton.next_power_of_2(min(kv_group_num, GROUP_BLOCK_H)),
            PORTABLE_DOT=_portable_dot(q),
            DOT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
            num_stages=num_stages or stages,
            num_warps=num_warps or warps,
            ROPE=rope is not None,
            ROPE_NORM=rope_norm,
            **common,
        )
    if merge:
        return
    _decode_stage2_kernel[(bs, head_num)](
        attn_logits,
        attn_lse,
        o,
        kv_indptr,
        num_kv_splits,
        attn_logits.stride(0),
        attn_logits.stride(1),
        attn_logits.stride(2),
        attn_lse.stride(0),
        attn_lse.stride(1),
        o.stride(0),
        o.stride(1),
        Lv=Lv,
        BLOCK_DV=BLOCK_DV,
        MIN_BLOCK_KV=_MIN_BLOCK_KV,
        MAX_SPLITS=triton.next_power_of_2(max_kv_splits),
        num_warps=4,
        **pdl_launch(q),
    )
