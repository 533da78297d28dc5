"""The one-launch greedy argmax against torch.argmax: the same index for ties (the first),
NaN (the first NaN), signed zeros and infinities, in every logits dtype.

Without CUDA the kernel runs in Triton's interpreter at small shapes (BLOCK 16)."""

from __future__ import annotations

import pytest
import torch

from sglab.srt.layers.argmax import argmax_rows, greedy_argmax

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
needs_cuda = pytest.mark.skipif(DEVICE.type != "cuda", reason="needs a CUDA GPU")


def _hard_rows(n_cols: int, dtype: torch.dtype) -> torch.Tensor:
    """Random rows, then rows built to break a careless reduction."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(12, n_cols, generator=gen).to(dtype)
    x[1] = 0.5  # all tied: column 0
    x[2, 7], x[2, n_cols - 3] = 9.0, 9.0  # a tie across blocks: the first
    x[3] = -torch.rand(n_cols, generator=gen).to(dtype) - 1  # all negative
    x[4] = 0.0
    x[4, : n_cols // 2] = -0.0  # -0.0 ties +0.0: column 0
    x[5, n_cols - 1] = float("inf")
    x[6, 5], x[6, 3] = float("nan"), -float("nan")  # the first NaN, whatever its sign
    x[6, 0] = float("inf")
    x[7] = float("-inf")
    x[7, n_cols - 2] = -1e30 if dtype == torch.float32 else -100.0
    x[8] = float("-inf")  # all -inf: column 0
    x[9, n_cols - 1] = 50.0  # the max in the last, partial block
    return x.to(DEVICE)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("n_cols", [16, 37, 100])
def test_argmax_rows_matches_torch(dtype: torch.dtype, n_cols: int) -> None:
    x = _hard_rows(n_cols, dtype)
    want = x.argmax(dim=-1)
    for _ in range(2):  # the arrival counters come back zeroed
        assert torch.equal(argmax_rows(x, block=16), want)
    strided = torch.cat([x, x], dim=1)[:, :n_cols]  # row stride != n_cols
    assert torch.equal(argmax_rows(strided, block=16), want)


def test_greedy_argmax_falls_back_off_cuda() -> None:
    x = torch.randn(3, 50)
    assert torch.equal(greedy_argmax(x), x.argmax(dim=-1))
    assert greedy_argmax(torch.empty(0, 50)).shape == (0,)


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("vocab", [128256, 151936])
@pytest.mark.parametrize("rows", [1, 8, 64, 300])
def test_greedy_argmax_real_sizes_gpu(vocab: int, rows: int) -> None:
    gen = torch.Generator(device="cuda").manual_seed(rows)
    x = torch.randn(rows, vocab, device="cuda", generator=gen)
    x[0, vocab - 1] = x.max() + 1  # the last column
    if rows > 1:
        x[1, 100], x[1, vocab - 100] = 1e4, 1e4
    for dtype in (torch.float32, torch.bfloat16):
        y = x.to(dtype)
        for _ in range(3):
            assert torch.equal(greedy_argmax(y), y.argmax(dim=-1))
    assert torch.equal(_hard_rows(vocab, torch.float32).argmax(-1),
                       greedy_argmax(_hard_rows(vocab, torch.float32)))
