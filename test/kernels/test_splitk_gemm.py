"""The split-K GEMM against F.linear (fp32 products of the same bf16 inputs), at every split
count the table may pick: one split (no workspace), splits that divide K, a ragged last split
and empty trailing splits, N not a multiple of the column tile, with and without a bias. The
split order of the final sum is fixed, so two launches give the same bits, and a launch after
a different shape still finds its arrival counters zero.

On CPU the kernel runs in Triton's interpreter (test/conftest.py sets TRITON_INTERPRET=1) at
small shapes; the `gpu` variant runs the decoder shapes of the table at 16-64 rows."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from sglab.srt.layers import splitk_gemm as sk
from sglab.srt.layers.arrival import arrival_counters

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
needs_cuda = pytest.mark.skipif(DEVICE.type != "cuda", reason="needs a CUDA GPU")


def _case(m: int, n: int, k: int, dtype: torch.dtype, bias: bool, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=gen).to(dtype).to(DEVICE)
    w = (torch.randn(n, k, generator=gen) / k ** 0.5).to(dtype).to(DEVICE)
    b = torch.randn(n, generator=gen).to(dtype).to(DEVICE) if bias else None
    return x, w, b


def _check(m, n, k, dtype, cfg, bias=True) -> None:
    x, w, b = _case(m, n, k, dtype, bias, seed=m + n + k)
    got = sk.splitk_gemm(x, w, b, config=cfg)
    want = F.linear(x.float(), w.float(), None if b is None else b.float())
    assert got.shape == (m, n) and got.dtype == dtype
    # One rounding of the fp32 sum to the output dtype (bf16: 2^-8 relative).
    tol = 1e-4 if dtype == torch.float32 else 2 ** -7
    torch.testing.assert_close(got.float(), want, atol=tol, rtol=tol)
    assert torch.equal(sk.splitk_gemm(x, w, b, config=cfg), got)  # a fixed sum order


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("m,n,k,split_k", [
    (5, 48, 64, 1),    # one split: stored directly
    (16, 40, 96, 3),   # splits that divide K, N past the last full tile
    (17, 33, 100, 4),  # a ragged last split, 32 rows of tile
    (3, 16, 40, 8),    # more splits than K blocks: empty trailing splits still arrive
])
def test_splitk_matches_linear(dtype, m, n, k, split_k) -> None:
    _check(m, n, k, dtype, {"BLOCK_N": 16, "BLOCK_K": 16, "SPLIT_K": split_k},
           bias=split_k != 3)


def test_counters_left_zero_between_shapes() -> None:
    for m, n, split_k in ((4, 64, 4), (9, 32, 2), (4, 64, 3)):
        _check(m, n, 48, torch.float32, {"BLOCK_N": 16, "BLOCK_K": 16, "SPLIT_K": split_k})
        assert not arrival_counters(DEVICE, 8)[:8].any()


def test_row_results_do_not_depend_on_other_rows() -> None:
    x, w, _ = _case(6, 32, 64, torch.float32, bias=False)
    cfg = {"BLOCK_N": 16, "BLOCK_K": 16, "SPLIT_K": 2}
    full = sk.splitk_gemm(x, w, config=cfg)
    other = x.clone()
    other[1:] = -other[1:] * 3
    assert torch.equal(sk.splitk_gemm(other, w, config=cfg)[0], full[0])


def test_rejects_what_it_cannot_serve() -> None:
    x, w, _ = _case(4, 16, 32, torch.float32, bias=False)
    with pytest.raises(ValueError, match="columns"):
        sk.splitk_gemm(x[:, :16], w, config={"BLOCK_N": 16, "BLOCK_K": 16, "SPLIT_K": 1})
    big = torch.zeros(sk.MAX_M + 1, 32, device=DEVICE)
    with pytest.raises(ValueError, match="rows"):
        sk.splitk_gemm(big, w, config={"BLOCK_N": 16, "BLOCK_K": 16, "SPLIT_K": 1})


def test_table_lookup_by_rows(monkeypatch) -> None:
    small, large = {"SPLIT_K": 4}, {"SPLIT_K": 2}
    monkeypatch.setattr(sk, "SPLITK_TABLE", {(8, 16): ((8, 16, small), (17, 64, large))})
    assert sk.config_for(8, 16, 8) is small and sk.config_for(8, 16, 16) is small
    assert sk.config_for(8, 16, 17) is large and sk.config_for(8, 16, 64) is large
    assert sk.config_for(8, 16, 4) is None  # below the rows measured
    assert sk.config_for(8, 16, 65) is None and sk.config_for(16, 8, 8) is None


def test_table_from_the_environment(monkeypatch, tmp_path) -> None:
    monkeypatch.setattr(sk, "SPLITK_TABLE", {})
    path = tmp_path / "table.json"
    path.write_text('{"4096x14336": [[33, 64, {"BLOCK_N": 64, "BLOCK_K": 128, "SPLIT_K": 4}]]}')
    monkeypatch.setenv("SGLAB_SPLITK_TABLE", str(path))
    sk.load_table()
    assert sk.config_for(4096, 14336, 64) == {"BLOCK_N": 64, "BLOCK_K": 128, "SPLIT_K": 4}
    monkeypatch.setenv("SGLAB_SPLITK_TABLE", "none")
    sk.load_table()
    assert sk.config_for(4096, 14336, 64) is None
    for bad in ('{"4096x14336": [[0, 64, {"BLOCK_N": 64, "BLOCK_K": 128, "SPLIT_K": 4}]]}',
                '{"4096x14336": [[1, 64, {"BLOCK_N": 64}]]}', '{"4096": []}', "not json"):
        path.write_text(bad)
        monkeypatch.setenv("SGLAB_SPLITK_TABLE", str(path))
        with pytest.raises(ValueError, match="SGLAB_SPLITK_TABLE"):
            sk.load_table()
    monkeypatch.setenv("SGLAB_SPLITK_TABLE", str(tmp_path / "missing.json"))
    with pytest.raises(ValueError, match="SGLAB_SPLITK_TABLE"):
        sk.load_table()


@needs_cuda
@pytest.mark.gpu
@pytest.mark.parametrize("m", [16, 32, 64])
@pytest.mark.parametrize("n,k", [(6144, 4096), (4096, 4096), (4096, 14336), (4096, 1024)])
def test_splitk_real_sizes_gpu(m, n, k) -> None:
    cfg = sk.config_for(n, k, m) or {"BLOCK_N": 64, "BLOCK_K": 128, "SPLIT_K": 4}
    _check(m, n, k, torch.bfloat16, cfg, bias=False)
