"""Triton attention kernels against the plain-torch reference.

Without CUDA the kernels run in Triton's interpreter (test/kernels/conftest.py) at small shapes;
with CUDA the same tests run on the GPU, plus the `gpu` tests at real sizes.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, replace

import pytest
import torch
from sglab.srt.layers.attention.triton_ops.create_kv_indices import (
    create_kv_indices,
    create_kv_indices_torch,
)
from sglab.srt.layers.attention.triton_ops.decode_attention import (
    DecodeRope,
    decode_attention_fwd,
)
from sglab.srt.layers.attention.triton_ops.extend_attention import (
    build_unified_kv_indices,
    extend_attention_fwd,
    extend_attention_fwd_unified,
)
from sglab.srt.layers.attention.triton_ops.reference import (
    ref_decode_attention,
    ref_extend_attention,
)
from sglab.srt.layers.elementwise import KVWrite, QKNormRope

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
needs_cuda = pytest.mark.skipif(DEVICE.type != "cuda", reason="needs a CUDA GPU")

BF16, FP16, FP32 = torch.bfloat16, torch.float16, torch.float32
TOL = {FP32: 1e-4, FP16: 4e-3, BF16: 3e-2}  # atol == rtol, vs the fp32 reference


def _indptr(lens: list[int]) -> torch.Tensor:
    return torch.tensor([0] + lens, dtype=torch.int64).cumsum(0).to(torch.int32).to(DEVICE)


@dataclass
class PagedBatch:
    """A KV pool filled with random K/V and a batch of requests laid out in it by pages."""

    k_buffer: torch.Tensor  # [num_slots, num_kv_heads, head_dim]
    v_buffer: torch.Tensor
    req_to_token: torch.Tensor  # [max_reqs, max_ctx] int32; 0 beyond each seq_len
    req_pool_indices: torch.Tensor  # [bs] int64
    q_all: list[torch.Tensor]  # per request, a query for every position [seq_len, hq, d]
    prefix_lens: list[int]
    extend_lens: list[int]

    @property
    def bs(self) -> int:
        return len(self.prefix_lens)

    @property
    def seq_lens(self) -> list[int]:
        return [p + e for p, e in zip(self.prefix_lens, self.extend_lens)]

    def _slots(self, i: int, start: int, end: int) -> torch.Tensor:
        return self.req_to_token[self.req_pool_indices[i], start:end].long()

    def _cat(self, parts: list[torch.Tensor]) -> torch.Tensor:
        return torch.cat(parts) if parts else torch.empty(0, dtype=torch.int64, device=DEVICE)

    def prefix_kv(self) -> tuple[torch.Tensor, torch.Tensor]:
        slots = [self._slots(i, 0, p) for i, p in enumerate(self.prefix_lens)]
        return _indptr(self.prefix_lens), self._cat(slots)

    def unified_kv(self) -> tuple[torch.Tensor, torch.Tensor]:
        slots = [self._slots(i, 0, s) for i, s in enumerate(self.seq_lens)]
        return _indptr(self.seq_lens), self._cat(slots)

    def out_cache_loc(self) -> torch.Tensor:
        return self._cat(
            [self._slots(i, p, s) for i, (p, s) in enumerate(zip(self.prefix_lens, self.seq_lens))]
        )

    def q(self) -> torch.Tensor:
        return torch.cat([qa[p:s] for qa, p, s in zip(self.q_all, self.prefix_lens, self.seq_lens)])

    def select(self, reqs: list[int]) -> PagedBatch:
        """The same requests over the same pool, as a smaller batch."""
        return replace(
            self,
            req_pool_indices=self.req_pool_indices[reqs],
            q_all=[self.q_all[i] for i in reqs],
            prefix_lens=[self.prefix_lens[i] for i in reqs],
            extend_lens=[self.extend_lens[i] for i in reqs],
        )

    def with_split(self, i: int, prefix_len: int) -> PagedBatch:
        """Request i with the same tokens but a different cached-prefix / new-token split."""
        prefix_lens, extend_lens = list(self.prefix_lens), list(self.extend_lens)
        extend_lens[i] = self.seq_lens[i] - prefix_len
        prefix_lens[i] = prefix_len
        return replace(self, prefix_lens=prefix_lens, extend_lens=extend_lens)


def make_batch(
    prefix_lens: list[int],
    extend_lens: list[int],
    num_q_heads: int,
    num_kv_heads: int,
    head_dim: int,
    dtype: torch.dtype,
    page_size: int = 1,
    seed: int = 0,
) -> PagedBatch:
    """Requests get whole pages at random places in the pool (page 0, with slot 0, unused)."""
    gen = torch.Generator().manual_seed(seed)
    seq_lens = [p + e for p, e in zip(prefix_lens, extend_lens)]
    bs = len(seq_lens)
    pages_per_req = [math.ceil(s / page_size) for s in seq_lens]
    num_pages = sum(pages_per_req) + 3  # a few pages stay free
    page_ids = torch.randperm(num_pages, generator=gen) + 1
    num_slots = (num_pages + 1) * page_size
    req_to_token = torch.zeros(bs + 3, max(seq_lens) + 5, dtype=torch.int32)
    rows = torch.randperm(bs + 3, generator=gen)[:bs]
    first_page = 0
    for row, seq_len, n in zip(rows.tolist(), seq_lens, pages_per_req):
        pages = page_ids[first_page : first_page + n]
        first_page += n
        slots = (pages[:, None] * page_size + torch.arange(page_size)).flatten()[:seq_len]
        req_to_token[row, :seq_len] = slots.to(torch.int32)

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen).to(dtype=dtype, device=DEVICE)

    return PagedBatch(
        k_buffer=randn(num_slots, num_kv_heads, head_dim),
        v_buffer=randn(num_slots, num_kv_heads, head_dim),
        req_to_token=req_to_token.to(DEVICE),
        req_pool_indices=rows.to(DEVICE),
        q_all=[randn(s, num_q_heads, head_dim) for s in seq_lens],
        prefix_lens=list(prefix_lens),
        extend_lens=list(extend_lens),
    )


def make_decode_batch(
    seq_lens: list[int],
    hq: int,
    hkv: int,
    d: int,
    dtype: torch.dtype,
    page_size: int = 1,
    seed: int = 0,
) -> PagedBatch:
    return make_batch(
        [s - 1 for s in seq_lens], [1] * len(seq_lens), hq, hkv, d, dtype, page_size, seed
    )


def assert_close(out: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype) -> None:
    assert not out.isnan().any(), "unwritten (poisoned) outputs remain"
    torch.testing.assert_close(out.float(), ref.float(), atol=TOL[dtype], rtol=TOL[dtype])


# ---------------------------------------------------------------------------------------------
# runners: poison every output, call the kernel, return the output


def run_decode(
    b: PagedBatch,
    num_kv_splits: list[int],
    max_kv_splits: int,
    logit_cap: float = 0.0,
    scratch_splits: int | None = None,
    merge: bool = False,
    q: torch.Tensor | None = None,
    rope: DecodeRope | None = None,
    **blocks: int,
) -> torch.Tensor:
    """merge: the one-launch form (`merge_count`), whose counters must come back zeroed; q:
    instead of the batch's queries."""
    q = b.q() if q is None else q
    kv_indptr, kv_indices = b.unified_kv()
    bs, hq, _ = q.shape
    dv = b.v_buffer.shape[-1]
    scratch_splits = scratch_splits or max_kv_splits
    o = torch.full_like(q, float("nan"))
    attn_logits = torch.full((bs, hq, scratch_splits, dv), float("nan"), device=DEVICE)
    attn_lse = torch.full((bs, hq, scratch_splits), float("nan"), device=DEVICE)
    splits = torch.tensor(num_kv_splits, dtype=torch.int32, device=DEVICE)
    counts = torch.zeros(bs * hq, dtype=torch.int32, device=DEVICE) if merge else None
    decode_attention_fwd(
        q,
        b.k_buffer,
        b.v_buffer,
        o,
        kv_indptr,
        kv_indices,
        attn_logits,
        attn_lse,
        splits,
        max_kv_splits,
        q.shape[-1] ** -0.5,
        logit_cap,
        merge_count=counts,
        rope=rope,
        **blocks,
    )
    if merge:
        assert not counts.any(), "merge counters left set"
    if scratch_splits > max_kv_splits:
        assert attn_lse[:, :, max_kv_splits:].isnan().all(), "wrote past max_kv_splits"
    return o


def run_ref(
    b: PagedBatch,
    logit_cap: float = 0.0,
    is_causal: bool = True,
    custom_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    kv_indptr, kv_indices = b.unified_kv()
    mask_indptr = _mask_indptr(b) if custom_mask is not None else None
    return ref_extend_attention(
        b.q(),
        b.k_buffer,
        b.v_buffer,
        _indptr(b.extend_lens),
        kv_indptr,
        kv_indices,
        None,
        logit_cap,
        is_causal,
        custom_mask,
        mask_indptr,
    )


def run_two_stage(
    b: PagedBatch,
    logit_cap: float = 0.0,
    is_causal: bool = True,
    custom_mask: torch.Tensor | None = None,
    skip_prefix_custom_mask: bool = True,
    **blocks: int,
) -> torch.Tensor:
    q = b.q()
    loc = b.out_cache_loc()
    kv_indptr, kv_indices = b.prefix_kv()
    mask_indptr = _mask_indptr(b) if custom_mask is not None else None
    o = torch.full_like(q, float("nan"))
    extend_attention_fwd(
        q,
        b.k_buffer[loc].contiguous(),
        b.v_buffer[loc].contiguous(),
        o,
        b.k_buffer,
        b.v_buffer,
        _indptr(b.extend_lens),
        kv_indptr,
        kv_indices,
        custom_mask,
        is_causal,
        mask_indptr,
        max(b.extend_lens),
        None,
        logit_cap,
        skip_prefix_custom_mask,
        **blocks,
    )
    return o


def run_unified(
    b: PagedBatch,
    logit_cap: float = 0.0,
    is_causal: bool = True,
    custom_mask: torch.Tensor | None = None,
    **blocks: int,
) -> torch.Tensor:
    q = b.q()
    kv_indptr, kv_indices = b.unified_kv()
    prefix_lens = torch.tensor(b.prefix_lens, dtype=torch.int32, device=DEVICE)
    mask_indptr = _mask_indptr(b) if custom_mask is not None else None
    o = torch.full_like(q, float("nan"))
    extend_attention_fwd_unified(
        q,
        o,
        b.k_buffer,
        b.v_buffer,
        _indptr(b.extend_lens),
        kv_indptr,
        kv_indices,
        prefix_lens,
        max(b.extend_lens),
        None,
        logit_cap,
        is_causal,
        custom_mask,
        mask_indptr,
        **blocks,
    )
    return o


def _mask_indptr(b: PagedBatch) -> torch.Tensor:
    return _indptr([e * s for e, s in zip(b.extend_lens, b.seq_lens)])


def random_custom_mask(b: PagedBatch, seed: int) -> torch.Tensor:
    """Random visibility, each query always seeing itself (as in speculative verify)."""
    gen = torch.Generator().manual_seed(seed)
    parts = []
    for p, e, s in zip(b.prefix_lens, b.extend_lens, b.seq_lens):
        m = torch.rand(e, s, generator=gen) < 0.5
        m[torch.arange(e), p + torch.arange(e)] = True
        parts.append(m.flatten())
    return torch.cat(parts).to(DEVICE)


# ---------------------------------------------------------------------------------------------
# index builders


@pytest.mark.parametrize("page_size", [1, 16])
@pytest.mark.parametrize("with_start", [False, True])
def test_create_kv_indices(page_size: int, with_start: bool) -> None:
    b = make_batch([0, 0, 0], [40, 3, 77], 2, 2, 16, FP32, page_size, seed=1)
    starts = [5, 0, 30] if with_start else [0, 0, 0]
    lens = [s - st for s, st in zip(b.seq_lens, starts)]
    kv_indptr = _indptr(lens)
    kv_start_idx = torch.tensor(starts, dtype=torch.int32, device=DEVICE) if with_start else None
    lens_gpu = torch.tensor(lens, dtype=torch.int32, device=DEVICE)
    expected = torch.cat([b._slots(i, st, s) for i, (st, s) in enumerate(zip(starts, b.seq_lens))])
    for fn in (create_kv_indices, create_kv_indices_torch):
        kv_indices = torch.full((sum(lens) + 9,), -7, dtype=torch.int64, device=DEVICE)
        fn(b.req_to_token, b.req_pool_indices, lens_gpu, kv_indptr, kv_start_idx, kv_indices)
        torch.testing.assert_close(kv_indices[: sum(lens)], expected, atol=0, rtol=0)
        assert (kv_indices[sum(lens) :] == -7).all(), fn.__name__ + " wrote past the end"


@pytest.mark.parametrize(
    "prefix_lens, extend_lens",
    [
        ([0, 17, 200], [5, 1, 130]),
        ([0, 0], [9, 33]),
        ([300], [2]),
        ([129, 0, 5, 64], [1, 7, 256, 3]),
    ],
)
@pytest.mark.parametrize("pad_indptr", [False, True])
def test_build_unified_kv_indices(
    prefix_lens: list[int], extend_lens: list[int], pad_indptr: bool
) -> None:
    b = make_batch(prefix_lens, extend_lens, 2, 2, 16, FP32, page_size=16, seed=2)
    prefix_kv_indptr, prefix_kv_indices = b.prefix_kv()
    if pad_indptr:  # CUDA-graph style buffers longer than bs + 1
        prefix_kv_indptr = torch.cat([prefix_kv_indptr, prefix_kv_indptr[-1:].repeat(3)])
    extend_seq_lens = torch.tensor(extend_lens, dtype=torch.int32, device=DEVICE)
    extend_start_loc = _indptr(extend_lens)[:-1]
    indptr, indices, plens = build_unified_kv_indices(
        prefix_kv_indptr,
        prefix_kv_indices,
        extend_start_loc,
        extend_seq_lens,
        b.out_cache_loc(),
        b.bs,
    )
    expected_indptr, expected_indices = b.unified_kv()
    assert indptr.dtype == torch.int32 and plens.dtype == torch.int32
    assert indices.dtype == torch.int64
    torch.testing.assert_close(indptr, expected_indptr, atol=0, rtol=0)
    torch.testing.assert_close(plens.tolist(), prefix_lens)
    torch.testing.assert_close(indices[: sum(b.seq_lens)], expected_indices, atol=0, rtol=0)


# ---------------------------------------------------------------------------------------------
# decode

DECODE_CASES = [
    # hq, hkv, d, dtype, page_size, seq_lens, num_kv_splits, max_kv_splits, logit_cap
    (4, 2, 32, BF16, 1, [1, 37, 130, 65], [1, 2, 4, 3], 4, 0.0),
    (4, 2, 32, FP32, 16, [130], [4], 4, 0.0),
    (4, 4, 16, FP16, 16, [1, 37, 130, 65], [2, 1, 3, 4], 4, 0.0),
    (8, 1, 64, BF16, 1, [33, 200], [8, 2], 8, 1.0),
    (4, 4, 32, FP32, 1, [70, 5], [3, 4], 4, 1.0),
    (4, 2, 48, FP16, 16, [50, 17], [2, 1], 2, 0.0),
    (40, 2, 16, FP32, 1, [9, 40], [1, 2], 2, 0.0),  # a group of 20: wider than one program
]


@pytest.mark.parametrize(
    "hq, hkv, d, dtype, page_size, seq_lens, splits, max_splits, cap", DECODE_CASES
)
def test_decode_matches_reference(
    hq: int,
    hkv: int,
    d: int,
    dtype: torch.dtype,
    page_size: int,
    seq_lens: list[int],
    splits: list[int],
    max_splits: int,
    cap: float,
) -> None:
    b = make_decode_batch(seq_lens, hq, hkv, d, dtype, page_size, seed=3)
    o = run_decode(b, splits, max_splits, cap, scratch_splits=max_splits + 1)
    kv_indptr, kv_indices = b.unified_kv()
    ref = ref_decode_attention(b.q(), b.k_buffer, b.v_buffer, kv_indptr, kv_indices, d**-0.5, cap)
    assert_close(o, ref, dtype)
    # One launch (--kernel-fusion on): the last split merges with stage 2's arithmetic and order.
    assert torch.equal(run_decode(b, splits, max_splits, cap, merge=True), o)


@pytest.mark.parametrize("hq, hkv", [(4, 2), (2, 2), (20, 1)])
def test_decode_one_launch_short_and_long_rows(hq: int, hkv: int) -> None:
    """Rows of one split (written by stage 1 itself) next to rows merged from several, a
    group wider than one program's heads (20 > 16), against the reference."""
    b = make_decode_batch([1, 64, 150, 33], hq, hkv, 32, FP32, page_size=1, seed=6)
    splits = [1, 1, 3, 4]
    one = run_decode(b, splits, 4, merge=True)
    kv_indptr, kv_indices = b.unified_kv()
    ref = ref_decode_attention(b.q(), b.k_buffer, b.v_buffer, kv_indptr, kv_indices, 32**-0.5)
    assert_close(one, ref, FP32)
    assert torch.equal(one, run_decode(b, splits, 4))


@pytest.mark.parametrize("hq, hkv", [(4, 2), (2, 2)])
def test_decode_split_count_only_changes_rounding(hq: int, hkv: int) -> None:
    b = make_decode_batch([1, 64, 150], hq, hkv, 32, FP32, page_size=16, seed=4)
    one = run_decode(b, [1, 1, 1], 4)
    many = run_decode(b, [4, 3, 4], 4)
    torch.testing.assert_close(one, many, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("hq, hkv", [(4, 2), (2, 2)])
def test_decode_batch_invariant(hq: int, hkv: int) -> None:
    """Split counts from each request's own length: its output ignores the rest of the batch."""
    b = make_decode_batch([100, 150, 9], hq, hkv, 32, BF16, page_size=1, seed=5)
    splits = [math.ceil(s / 64) for s in b.seq_lens]
    full = run_decode(b, splits, 4)
    alone = run_decode(b.select([1]), splits[1:2], 4)
    assert torch.equal(full[1:2], alone)


# ---------------------------------------------------------------------------------------------
# decode that takes in the q/k norm + RoPE and the new K/V write (DecodeRope)


def _projected(b: PagedBatch, has_norm: bool, seed: int):
    """Raw q, k, v of each request's new token (row-strided views of one qkv, as the model
    passes them) and a layer's norm + RoPE at the token's position."""
    gen = torch.Generator().manual_seed(seed)
    hq, (hkv, d), dtype = b.q_all[0].shape[1], b.k_buffer.shape[1:], b.k_buffer.dtype

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen).to(dtype=dtype, device=DEVICE)

    q, k, v = randn(b.bs, (hq + 2 * hkv) * d).split([hq * d, hkv * d, hkv * d], dim=-1)
    positions = torch.tensor([s - 1 for s in b.seq_lens], device=DEVICE)
    weights = (randn(d), randn(d)) if has_norm else (None, None)
    norm_rope = QKNormRope(positions, randn(max(b.seq_lens), d), d, *weights, eps=1e-6)
    return q, k, v, norm_rope


def run_decode_rope(b: PagedBatch, splits: list[int], max_splits: int, has_norm: bool,
                    merge: bool, seed: int = 0, **blocks: int):
    """The fused launch over a pool whose new-token slots hold NaN, and the separate path
    (qk_norm_rope with its K/V write, then decode attention): (o, k, v) of each."""
    q, k, v, norm_rope = _projected(b, has_norm, seed)
    loc = b.out_cache_loc()
    ref_k, ref_v = b.k_buffer.clone(), b.v_buffer.clone()
    q_rot, _ = norm_rope(q, k, KVWrite(v, loc, ref_k, ref_v))
    shape = (b.bs, -1, b.k_buffer.shape[-1])
    ref = replace(b, k_buffer=ref_k, v_buffer=ref_v)
    o_ref = run_decode(ref, splits, max_splits, merge=merge, q=q_rot.view(shape), **blocks)
    fused = replace(b, k_buffer=b.k_buffer.clone(), v_buffer=b.v_buffer.clone())
    fused.k_buffer[loc] = float("nan")
    fused.v_buffer[loc] = float("nan")
    o = run_decode(fused, splits, max_splits, merge=merge, q=q.view(shape),
                   rope=DecodeRope(norm_rope, k, v, loc), **blocks)
    return (o, fused.k_buffer, fused.v_buffer), (o_ref, ref_k, ref_v)


def assert_rope_matches_separate(got, want, dtype: torch.dtype) -> None:
    (o, k, v), (o_ref, k_ref, v_ref) = got, want
    assert torch.equal(v, v_ref), "v stored as projected"
    assert not k.isnan().any(), "a new token's k left unwritten"
    torch.testing.assert_close(k, k_ref, atol=TOL[dtype] / 4, rtol=TOL[dtype] / 4)
    assert_close(o, o_ref, dtype)


@pytest.mark.parametrize("hq, hkv, d, dtype, page_size", [
    (4, 2, 32, FP32, 1), (4, 2, 32, BF16, 16), (40, 2, 16, FP32, 1)])
@pytest.mark.parametrize("has_norm", [True, False])
@pytest.mark.parametrize("merge", [True, False])
def test_decode_rope_matches_separate_kernels(hq: int, hkv: int, d: int, dtype: torch.dtype,
                                              page_size: int, has_norm: bool,
                                              merge: bool) -> None:
    """Rows of one split and of several (the new token in the last), a group wider than one
    program (40 / 2 > 16 heads: two programs store the same k): the pool and the output of the
    separate kernels, and no read of a slot before its k and v are stored (NaN poison)."""
    b = make_decode_batch([1, 64, 150, 33], hq, hkv, d, dtype, page_size, seed=41)
    got, want = run_decode_rope(b, [1, 1, 3, 4], 4, has_norm, merge, seed=42)
    assert_rope_matches_separate(got, want, dtype)


# ---------------------------------------------------------------------------------------------
# extend: 2-stage and unified vs the reference and each other

EXTEND_CASES = [
    # hq, hkv, d, dtype, page_size, prefix_lens, extend_lens, logit_cap, is_causal
    (4, 2, 32, BF16, 1, [0, 20, 33], [7, 40, 16], 0.0, True),
    (4, 4, 32, FP32, 16, [0], [37], 0.0, True),
    (4, 2, 16, FP16, 16, [45], [19], 0.0, True),
    (4, 2, 32, FP32, 1, [17, 0, 64], [33, 5, 3], 1.0, True),
    (4, 2, 32, BF16, 16, [16, 3], [20, 9], 0.0, False),
    (4, 4, 48, FP16, 1, [10, 30], [21, 2], 0.0, True),
]


@pytest.mark.parametrize(
    "hq, hkv, d, dtype, page_size, prefix_lens, extend_lens, cap, causal", EXTEND_CASES
)
def test_extend_matches_reference(
    hq: int,
    hkv: int,
    d: int,
    dtype: torch.dtype,
    page_size: int,
    prefix_lens: list[int],
    extend_lens: list[int],
    cap: float,
    causal: bool,
) -> None:
    b = make_batch(prefix_lens, extend_lens, hq, hkv, d, dtype, page_size, seed=6)
    ref = run_ref(b, cap, causal)
    two_stage = run_two_stage(b, cap, causal)
    unified = run_unified(b, cap, causal)
    assert_close(two_stage, ref, dtype)
    assert_close(unified, ref, dtype)
    assert_close(unified, two_stage.float(), dtype)


def test_extend_other_block_sizes() -> None:
    b = make_batch([0, 40], [50, 23], 4, 2, 32, FP32, page_size=16, seed=7)
    ref = run_ref(b)
    assert_close(run_two_stage(b, block_m=32, block_n=64), ref, FP32)
    assert_close(run_unified(b, block_m=64, block_n=32), ref, FP32)


@pytest.mark.parametrize("mask_dtype", [torch.bool, torch.uint8])
def test_extend_custom_mask(mask_dtype: torch.dtype) -> None:
    b = make_batch([12, 0, 20], [5, 9, 16], 4, 2, 32, FP16, page_size=1, seed=8)
    mask = random_custom_mask(b, seed=9)
    ref = run_ref(b, custom_mask=mask)
    m = mask.to(mask_dtype)
    assert_close(run_unified(b, custom_mask=m), ref, FP16)
    assert_close(run_two_stage(b, custom_mask=m, skip_prefix_custom_mask=False), ref, FP16)

    prefix_visible = mask.clone()  # skip_prefix_custom_mask: prefix columns count as visible
    start = 0
    for p, e, s in zip(b.prefix_lens, b.extend_lens, b.seq_lens):
        prefix_visible[start : start + e * s].view(e, s)[:, :p] = True
        start += e * s
    ref_skip = run_ref(b, custom_mask=prefix_visible)
    assert_close(run_two_stage(b, custom_mask=m, skip_prefix_custom_mask=True), ref_skip, FP16)


# ---------------------------------------------------------------------------------------------
# unified kernel: determinism / batch invariance


@pytest.mark.parametrize("hq, hkv, dtype, page_size", [(4, 2, FP32, 16), (4, 4, BF16, 1)])
def test_unified_independent_of_prefix_split(
    hq: int, hkv: int, dtype: torch.dtype, page_size: int
) -> None:
    """Bit-identical rows when only the split moves (the 2-stage kernel's fp32 rows differ)."""
    base = make_batch([48], [16], hq, hkv, 32, dtype, page_size, seed=10)
    outs = [run_unified(base.with_split(0, p))[-16:] for p in (48, 32, 0, 25, 41)]
    for o in outs[1:]:
        assert torch.equal(o, outs[0])
    assert_close(outs[0], run_ref(base)[-16:], dtype)


def test_unified_independent_of_batch() -> None:
    b = make_batch([7, 40, 0], [30, 24, 50], 4, 2, 32, FP32, page_size=16, seed=11)
    full = run_unified(b)
    start = b.extend_lens[0]
    target = full[start : start + b.extend_lens[1]]
    assert torch.equal(run_unified(b.select([1])), target)
    assert torch.equal(run_unified(b.select([2, 1])), torch.cat([full[-50:], target]))
    assert_close(target, run_ref(b.select([1])), FP32)


# ---------------------------------------------------------------------------------------------
# GPU, real sizes (Qwen3-8B-like heads)


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("page_size", [1, 16])
@pytest.mark.parametrize("deterministic", [False, True])
def test_decode_real_sizes_gpu(page_size: int, deterministic: bool) -> None:
    seq_lens = [4096, 1, 257, 3000, 1024, 4000, 31, 2048]
    b = make_decode_batch(seq_lens, 32, 8, 128, BF16, page_size, seed=20)
    splits = [math.ceil(s / 256) for s in seq_lens] if deterministic else [8] * len(seq_lens)
    o = run_decode(b, splits, 16)
    kv_indptr, kv_indices = b.unified_kv()
    ref = ref_decode_attention(b.q(), b.k_buffer, b.v_buffer, kv_indptr, kv_indices, 128**-0.5)
    assert_close(o, ref, BF16)
    assert torch.equal(run_decode(b, splits, 16, merge=True), o)  # --kernel-fusion on
    if deterministic:
        assert torch.equal(run_decode(b.select([3]), splits[3:4], 16), o[3:4])


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("hq", [16, 32])
@pytest.mark.parametrize("max_splits", [1, 2, 5, 9])
def test_decode_split_bounds_real_sizes_gpu(hq: int, max_splits: int) -> None:
    """The bounds a batch size gives (TritonAttnBackend.max_splits): the unrolled merge of up
    to a power of two above the bound, one launch with the two-stage bits."""
    seq_lens = [264, 1, 4096, 65, 700, 2000]
    b = make_decode_batch(seq_lens, hq, 8, 128, BF16, page_size=1, seed=31)
    splits = [max(1, min(max_splits, math.ceil(s / 64))) for s in seq_lens]
    o = run_decode(b, splits, max_splits)
    kv_indptr, kv_indices = b.unified_kv()
    ref = ref_decode_attention(b.q(), b.k_buffer, b.v_buffer, kv_indptr, kv_indices, 128**-0.5)
    assert_close(o, ref, BF16)
    assert torch.equal(run_decode(b, splits, max_splits, merge=True), o)


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("hq", [16, 32])
@pytest.mark.parametrize("max_splits", [1, 4, 16])
def test_decode_rope_real_sizes_gpu(hq: int, max_splits: int) -> None:
    """qwen3-0.6b / llama-3.1-8b heads at the split bounds of bs 64 / 8 / 1, launch after
    launch: the separate kernels' pool and output, never a NaN-poisoned new slot read."""
    seq_lens = [264, 1, 4096, 65, 700, 2000]
    b = make_decode_batch(seq_lens, hq, 8, 128, BF16, page_size=1, seed=43)
    splits = [max(1, min(max_splits, math.ceil(s / 64))) for s in seq_lens]
    for seed in range(10):
        got, want = run_decode_rope(b, splits, max_splits, True, True, seed=seed)
        assert_rope_matches_separate(got, want, BF16)


# the defaults, and a tile being tuned (SGLAB_DECODE_ONE_SPLIT_TILE=BLOCK_N,STAGES,WARPS)
_ONE_SPLIT_TILES = sorted({(64, 3, 2), (32, 3, 4), (32, 2, 4), *(
    [tuple(int(v) for v in os.environ["SGLAB_DECODE_ONE_SPLIT_TILE"].split(","))]
    if os.environ.get("SGLAB_DECODE_ONE_SPLIT_TILE") else [])})


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("tile", _ONE_SPLIT_TILES)
@pytest.mark.parametrize("hq", [16, 32])
def test_decode_one_split_tiles_gpu(tile: tuple[int, int, int], hq: int) -> None:
    """The one-split tiles (the defaults and one being tuned through
    SGLAB_DECODE_ONE_SPLIT_TILE) at bs 64 x ~264 keys: the torch reference, and with the q/k
    norm + RoPE the separate kernels' pool and output."""
    seq_lens = [264 + (i * 37) % 29 for i in range(63)] + [1]
    b = make_decode_batch(seq_lens, hq, 8, 128, BF16, page_size=1, seed=47)
    blocks = dict(zip(("block_n", "num_stages", "num_warps"), tile))
    o = run_decode(b, [1] * len(seq_lens), 1, merge=True, **blocks)
    kv_indptr, kv_indices = b.unified_kv()
    ref = ref_decode_attention(b.q(), b.k_buffer, b.v_buffer, kv_indptr, kv_indices, 128**-0.5)
    assert_close(o, ref, BF16)
    for seed in range(3):
        got, want = run_decode_rope(b, [1] * len(seq_lens), 1, hq == 16, True, seed=seed,
                                    **blocks)
        assert_rope_matches_separate(got, want, BF16)


@pytest.mark.gpu
@needs_cuda
def test_decode_one_launch_racing_splits_gpu() -> None:
    """64 requests of up to 4096 keys in 16 splits: 1024 programs per kv head race for the merge
    counters, launch after launch; every launch gives the two-stage bits."""
    seq_lens = [1 + (i * 997) % 4096 for i in range(64)]
    b = make_decode_batch(seq_lens, 32, 8, 128, BF16, page_size=1, seed=27)
    splits = [16] * len(seq_lens)
    two = run_decode(b, splits, 16)
    for _ in range(10):
        assert torch.equal(run_decode(b, splits, 16, merge=True), two)


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("page_size", [1, 16])
def test_extend_real_sizes_gpu(page_size: int) -> None:
    b = make_batch(
        [0, 3072, 1000, 4000], [4096, 1024, 517, 96], 32, 8, 128, BF16, page_size, seed=21
    )
    ref = run_ref(b)
    two_stage = run_two_stage(b)
    unified = run_unified(b)
    assert_close(two_stage, ref, BF16)
    assert_close(unified, ref, BF16)


@pytest.mark.gpu
@needs_cuda
def test_unified_determinism_real_sizes_gpu() -> None:
    b = make_batch([3968, 100], [128, 900], 32, 8, 128, BF16, page_size=16, seed=22)
    outs = [
        run_unified(b.with_split(0, p))[: b.seq_lens[0] - p][-128:] for p in (3968, 2048, 0, 3001)
    ]
    for o in outs[1:]:
        assert torch.equal(o, outs[0])
    assert torch.equal(run_unified(b.select([0]))[-128:], outs[0])


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("d", [16, 32, 64, 256])
@pytest.mark.parametrize("dtype", [FP16, BF16])
def test_head_dims_gpu(d: int, dtype: torch.dtype) -> None:
    b = make_batch([0, 300, 77], [600, 129, 1], 16, 4, d, dtype, page_size=16, seed=23)
    ref = run_ref(b)
    assert_close(run_two_stage(b), ref, dtype)
    assert_close(run_unified(b), ref, dtype)
    dec = make_decode_batch([700, 1, 90], 16, 4, d, dtype, page_size=1, seed=24)
    kv_indptr, kv_indices = dec.unified_kv()
    ref = ref_decode_attention(dec.q(), dec.k_buffer, dec.v_buffer, kv_indptr, kv_indices)
    assert_close(run_decode(dec, [4, 1, 2], 4), ref, dtype)


@pytest.mark.gpu
@needs_cuda
def test_mha_real_sizes_gpu() -> None:
    b = make_batch([2000, 0], [48, 2048], 16, 16, 128, BF16, page_size=1, seed=25)
    ref = run_ref(b)
    assert_close(run_two_stage(b), ref, BF16)
    assert_close(run_unified(b), ref, BF16)
    dec = make_decode_batch([4096, 513], 16, 16, 128, BF16, seed=26)
    kv_indptr, kv_indices = dec.unified_kv()
    ref = ref_decode_attention(dec.q(), dec.k_buffer, dec.v_buffer, kv_indptr, kv_indices)
    assert_close(run_decode(dec, [8, 3], 8), ref, BF16)
    assert torch.equal(run_decode(dec, [8, 3], 8, merge=True), run_decode(dec, [8, 3], 8))
