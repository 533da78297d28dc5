"""The fused decode-graph prologue kernels (`--kernel-fusion on`) against the torch ops they
replace: the graph runner's inputs (positions, input ids, the new slot in req_to_token) and the
Triton backend's metadata (kv_indptr, kv_indices, split counts). CPU: Triton's interpreter."""

from __future__ import annotations


import pytest
import torch
from sglab.srt.layers.attention.triton_ops.create_kv_indices import (
    create_kv_indices_torch,
    decode_kv_indices,
)
from sglab.srt.layers.attention.triton_backend import MIN_KEYS_PER_SPLIT, TritonAttnBackend
from sglab.srt.managers.overlap_utils import FutureMap
from sglab.srt.model_executor.decode_inputs import decode_inputs, decode_inputs_torch

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _batch(bs: int, seed: int, max_len: int = 700, pad: int = 0):
    """bs live rows (distinct) then `pad` padding rows (row 0, length 1)."""
    g = torch.Generator().manual_seed(seed)
    rows = torch.randperm(bs + 7, generator=g)[:bs] + 1
    lens = torch.randint(1, max_len, (bs,), generator=g)
    rows = torch.cat([rows, torch.zeros(pad, dtype=torch.int64)])
    lens = torch.cat([lens, torch.ones(pad, dtype=torch.int64)])
    req_to_token = torch.randint(1, 10**6, (bs + 8, max_len + 1), generator=g,
                                 dtype=torch.int32)
    return rows.to(DEVICE), lens.to(DEVICE), req_to_token.to(DEVICE)


@pytest.mark.parametrize("bs,pad", [(1, 0), (5, 3), (1100, 4)])  # 1100: two programs
def test_decode_inputs_match_the_torch_ops(bs, pad):
    rows, lens, r2t = _batch(bs, bs, max_len=40, pad=pad)
    loc = torch.randint(1, 10**6, (bs + pad,), device=DEVICE)
    loc[bs:] = 0  # padding rows share the padding slot
    future = FutureMap(bs + 8, torch.device(DEVICE))
    future.token_ids.copy_(torch.randint(0, 1000, (bs + 8,), device=DEVICE))
    ref_table, table = r2t.clone(), r2t.clone()
    want = decode_inputs_torch(lens, rows, loc, future, ref_table)
    got = decode_inputs(lens, rows, loc, future, table)
    assert torch.equal(got[0], want[0]) and got[0].dtype == want[0].dtype
    assert torch.equal(got[1], want[1]) and got[1].dtype == want[1].dtype
    assert torch.equal(table, ref_table)


def _splits(lens: torch.Tensor, max_splits: int) -> torch.Tensor:
    """TritonAttnBackend._num_kv_splits in a graph (the longest length on the device)."""
    return TritonAttnBackend._num_kv_splits(lens, lens.max(), max_splits)


@pytest.mark.parametrize("with_splits", [True, False])
@pytest.mark.parametrize("bs,pad,max_len", [(1, 0, 700), (6, 2, 700), (33, 0, 90)])
def test_decode_kv_indices_match_cumsum_create_and_split_counts(bs, pad, max_len, with_splits):
    rows, lens, r2t = _batch(bs, 100 + bs, max_len, pad)
    n = rows.numel()
    total = int(lens.sum())
    ref_indptr = torch.zeros(n + 1, dtype=torch.int32, device=DEVICE)
    ref_indptr[1:].copy_(torch.cumsum(lens, 0))
    ref_indices = torch.full((total + 5,), -7, dtype=torch.int32, device=DEVICE)
    create_kv_indices_torch(r2t, rows, lens, ref_indptr, None, ref_indices)
    indptr = torch.zeros_like(ref_indptr)
    indices = torch.full_like(ref_indices, -7)
    splits = torch.zeros(n, dtype=torch.int32, device=DEVICE) if with_splits else None
    decode_kv_indices(r2t, rows, lens, indptr, indices, splits, 16, MIN_KEYS_PER_SPLIT)
    assert torch.equal(indptr, ref_indptr)
    assert torch.equal(indices, ref_indices)  # the tail past the last row untouched
    if with_splits:
        assert torch.equal(splits, _splits(lens, 16))
