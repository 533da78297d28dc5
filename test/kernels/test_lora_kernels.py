"""LoRA segment-GEMM Triton kernels against the torch_native backend (their reference).

On CPU the kernels run in Triton's interpreter (test/conftest.py sets TRITON_INTERPRET=1).
"""

from __future__ import annotations

import pytest
import torch
from sglab.srt.layers.linear import ColumnParallelLinear, RowParallelLinear
from sglab.srt.lora.backend.torch_backend import TorchNativeLoRABackend
from sglab.srt.lora.backend.triton_backend import TritonLoRABackend
from sglab.srt.lora.layers import get_lora_layer
from sglab.srt.lora.triton_ops import (
    gate_up_lora_b_fwd,
    qkv_lora_b_fwd,
    sgemm_lora_a_fwd,
    sgemm_lora_b_fwd,
)
from sglab.srt.lora.utils import LoRABatchInfo

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
MAX_RANK = 16
# slot -> rank; slot 1 is the base model (rank 0).
SLOT_RANKS = [8, 0, 4, 16]
SLOT_SCALINGS = [2.0, 0.0, 0.5, 1.25]


def _batch_info(seg_lens: list[int], slots: list[int]) -> LoRABatchInfo:
    indptr = [0]
    for n in seg_lens:
        indptr.append(indptr[-1] + n)

    def t(values, dtype=torch.int32):
        return torch.tensor(values, dtype=dtype, device=DEVICE)

    return LoRABatchInfo(
        bs=len(seg_lens), max_len=max(seg_lens), seg_lens=t(seg_lens), seg_indptr=t(indptr),
        weight_indices=t(slots), lora_ranks=t(SLOT_RANKS),
        scalings=t(SLOT_SCALINGS, torch.float32), seg_lens_cpu=list(seg_lens),
        weight_indices_cpu=list(slots))


def _slot_weights(shape_per_slot: tuple[int, int], rank_axis: int, stack_num: int,
                  gen: torch.Generator, garbage: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(weights as the kernels see them, the zero-padded weights the pool would hold).

    Entries past a slot's rank are garbage in the first (the kernels must not read them) and
    zero in the second.
    """
    n = len(SLOT_RANKS)
    w = torch.randn((n, *shape_per_slot), generator=gen) * 0.2
    clean = w.clone()
    for slot, rank in enumerate(SLOT_RANKS):
        if rank_axis == 0:  # A: rows [s * R + rank, (s + 1) * R) of each stacked block
            for s in range(stack_num):
                clean[slot, s * MAX_RANK + rank:(s + 1) * MAX_RANK] = 0
        else:  # B: columns [rank, R)
            clean[slot, :, rank:] = 0
    if not garbage:
        w = clean
    return w.to(DEVICE).contiguous(), clean.to(DEVICE).contiguous()


BATCHES = {
    "extend": ([5, 1, 17, 3, 33], [0, 1, 2, 3, 0]),
    "decode": ([1] * 6, [3, 1, 0, 2, 2, 0]),
}


@pytest.fixture(params=list(BATCHES))
def batch(request):
    seg_lens, slots = BATCHES[request.param]
    return _batch_info(seg_lens, slots)


def _torch_ref(batch_info: LoRABatchInfo) -> TorchNativeLoRABackend:
    backend = TorchNativeLoRABackend()
    backend.set_batch_info(batch_info)
    return backend


@pytest.mark.parametrize("stack_num", [1, 3])
def test_sgemm_lora_a(batch, stack_num):
    gen = torch.Generator().manual_seed(0)
    K = 72  # not a multiple of the K block
    S = sum(batch.seg_lens_cpu)
    x_full = torch.randn(S, K + 8, generator=gen).to(DEVICE)
    x = x_full[:, 4:K + 4]  # a strided view
    w, w_clean = _slot_weights((stack_num * MAX_RANK, K), 0, stack_num, gen, garbage=True)
    got = sgemm_lora_a_fwd(x, w, batch, stack_num)
    expect = _torch_ref(batch).run_lora_a_sgemm(x, w_clean, stack_num)
    torch.testing.assert_close(got, expect, atol=1e-4, rtol=1e-4)
    base_rows = [i for i, s in enumerate(batch.weight_indices_cpu) if SLOT_RANKS[s] == 0]
    assert base_rows and all(not got[batch.seg_indptr[i]:batch.seg_indptr[i + 1]].any()
                             for i in base_rows)


def test_sgemm_lora_b(batch):
    gen = torch.Generator().manual_seed(1)
    N = 80
    S = sum(batch.seg_lens_cpu)
    x = torch.randn(S, MAX_RANK, generator=gen).to(DEVICE)
    w, w_clean = _slot_weights((N, MAX_RANK), 1, 1, gen, garbage=True)
    base = torch.randn(S, N, generator=gen).to(DEVICE)
    # The torch reference reads all R columns of x: zero the ones past each request's rank.
    x_clean = x.clone()
    for i, slot in enumerate(batch.weight_indices_cpu):
        lo, hi = int(batch.seg_indptr[i]), int(batch.seg_indptr[i + 1])
        x_clean[lo:hi, SLOT_RANKS[slot]:] = 0
    got = sgemm_lora_b_fwd(x, w, batch, base.clone())
    expect = _torch_ref(batch).run_lora_b_sgemm(x_clean, w_clean, base.clone())
    torch.testing.assert_close(got, expect, atol=1e-4, rtol=1e-4)
    assert not torch.equal(got, base)


@pytest.mark.parametrize("module", ["qkv", "gate_up"])
def test_stacked_lora_b_and_full_path(batch, module):
    """qkv_lora_b / gate_up_lora_b through the backends' run_qkv_lora / run_gate_up_lora."""
    gen = torch.Generator().manual_seed(2)
    K = 64
    out_dims = [128, 32, 32] if module == "qkv" else [96, 96]
    stack_num = len(out_dims)
    offsets = [0]
    for d in out_dims:
        offsets.append(offsets[-1] + d)
    S = sum(batch.seg_lens_cpu)
    x = torch.randn(S, K, generator=gen).to(DEVICE)
    a, a_clean = _slot_weights((stack_num * MAX_RANK, K), 0, stack_num, gen, garbage=True)
    b, b_clean = _slot_weights((offsets[-1], MAX_RANK), 1, 1, gen, garbage=True)
    base = torch.randn(S, offsets[-1], generator=gen).to(DEVICE)
    offset_t = torch.tensor(offsets, dtype=torch.int32, device=DEVICE)
    run = "run_qkv_lora" if module == "qkv" else "run_gate_up_lora"
    triton_backend = TritonLoRABackend()
    triton_backend.set_batch_info(batch)
    got = getattr(triton_backend, run)(x, a, b, offset_t, offsets, max(out_dims), base.clone())
    expect = getattr(_torch_ref(batch), run)(x, a_clean, b_clean, offset_t, offsets,
                                             max(out_dims), base.clone())
    torch.testing.assert_close(got, expect, atol=1e-4, rtol=1e-4)
    # The B kernel alone, on LoRA A's (reference) output.
    a_out = _torch_ref(batch).run_lora_a_sgemm(x, a_clean, stack_num)
    fwd = qkv_lora_b_fwd if module == "qkv" else gate_up_lora_b_fwd
    got_b = fwd(a_out, b, batch, offset_t, max(out_dims), base.clone())
    torch.testing.assert_close(got_b, expect, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("layer_cls", [ColumnParallelLinear, RowParallelLinear])
def test_wrappers_add_the_lora_delta(batch, layer_cls):
    """out = x W^T + s * x A^T B^T per request, with either backend."""
    gen = torch.Generator().manual_seed(3)
    K, N = 48, 40
    with torch.device(DEVICE):
        base = layer_cls(K, N)
    base.weight.data.copy_(torch.randn(N, K, generator=gen))
    S = sum(batch.seg_lens_cpu)
    x = torch.randn(S, K, generator=gen).to(DEVICE)
    a, _ = _slot_weights((MAX_RANK, K), 0, 1, gen, garbage=False)
    b, _ = _slot_weights((N, MAX_RANK), 1, 1, gen, garbage=False)
    expect = x @ base.weight.T
    for i, slot in enumerate(batch.weight_indices_cpu):
        lo, hi = int(batch.seg_indptr[i]), int(batch.seg_indptr[i + 1])
        expect[lo:hi] += SLOT_SCALINGS[slot] * (x[lo:hi] @ a[slot].T @ b[slot].T)
    for backend in (TorchNativeLoRABackend(), TritonLoRABackend()):
        backend.set_batch_info(batch)
        layer = get_lora_layer(base, backend, cache_qkv_offset=True)
        assert type(layer).__name__ == f"{layer_cls.__name__}WithLoRA"
        torch.testing.assert_close(layer(x), x @ base.weight.T)  # no set_lora_info yet
        layer.set_lora_info(a, b)
        torch.testing.assert_close(layer(x), expect, atol=1e-4, rtol=1e-4)
