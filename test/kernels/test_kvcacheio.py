"""The KV row copy of the host tier: the Triton kernel (CPU interpreter here, pinned host memory
through its device pointer on a GPU) against the indexed torch copy; skipped entries."""

from __future__ import annotations

import pytest
import torch

from sglab.srt.mem_cache.kvcacheio import transfer_kv_rows


def _pools(layers: int = 3, rows: int = 12, heads: int = 2, dim: int = 40, dtype=torch.float32):
    torch.manual_seed(0)
    return (torch.randn(layers, rows, heads, dim).to(dtype),
            torch.randn(layers, rows + 5, heads, dim).to(dtype))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kernel_copies_the_rows_the_torch_form_copies(dtype):
    src, dst = _pools(dtype=dtype)
    src_idx = torch.tensor([3, 7, 1, 11, 5])
    dst_idx = torch.tensor([2, -1, 9, 16, -1])  # two skipped entries
    expected = dst.clone()
    transfer_kv_rows(src, expected, src_idx, dst_idx, use_kernel=False)
    kernel = dst.clone()
    transfer_kv_rows(src, kernel, src_idx, dst_idx, use_kernel=True)
    untouched = [r for r in range(dst.shape[1]) if r not in (0, 2, 9, 16)]
    assert torch.equal(kernel[:, 2], src[:, 3]) and torch.equal(kernel[:, 16], src[:, 11])
    assert torch.equal(kernel[:, untouched], dst[:, untouched])  # skips write nothing
    assert torch.equal(kernel[:, 1:], expected[:, 1:])  # row 0: the torch form's sink


def test_a_pair_of_pools_in_one_kernel_over_many_entries():
    """K and V together (`also`), more entries than one program takes, some skipped."""
    (k, k_dst), (v, v_dst) = _pools(rows=30), _pools(rows=30)
    v, v_dst = v + 1, v_dst + 1
    src_idx = torch.randperm(30)[:19]
    dst_idx = torch.where(torch.arange(19) % 3 == 0, -1, torch.randperm(34)[:19] + 1)
    expected = [k_dst.clone(), v_dst.clone()]
    transfer_kv_rows(k, expected[0], src_idx, dst_idx, use_kernel=False)
    transfer_kv_rows(v, expected[1], src_idx, dst_idx, use_kernel=False)
    got = [k_dst.clone(), v_dst.clone()]
    transfer_kv_rows(k, got[0], src_idx, dst_idx, use_kernel=True, also=(v, got[1]))
    for g, e, before in zip(got, expected, (k_dst, v_dst)):
        assert torch.equal(g[:, 1:], e[:, 1:]) and not torch.equal(g, before)


def test_one_layer_view_of_a_larger_pool():
    src, dst = _pools()
    transfer_kv_rows(src[1].unsqueeze(0), dst[2].unsqueeze(0), torch.tensor([4]),
                     torch.tensor([6]), use_kernel=True)
    assert torch.equal(dst[2, 6], src[1, 4]) and not torch.equal(dst[1, 6], src[1, 4])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_kernel_reads_and_writes_pinned_host_memory():
    src, dst = _pools(dtype=torch.bfloat16)
    host = dst.pin_memory()
    device = src.cuda()
    src_idx, dst_idx = torch.tensor([3, 7, 1], device="cuda"), torch.tensor([2, -1, 9],
                                                                           device="cuda")
    transfer_kv_rows(device, host, src_idx, dst_idx)  # device -> pinned host (a backup)
    torch.cuda.synchronize()
    assert torch.equal(host[:, 2], src[:, 3]) and torch.equal(host[:, 9], src[:, 1])
    back = torch.zeros_like(device)
    transfer_kv_rows(host, back, torch.tensor([2, 9], device="cuda"),
                     torch.tensor([0, 5], device="cuda"))  # pinned host -> device (a swap-in)
    torch.cuda.synchronize()
    assert torch.equal(back[:, 5].cpu(), src[:, 1]) and torch.equal(back[:, 0].cpu(), src[:, 3])
