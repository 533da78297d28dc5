"""The small-M GEMM with its prologues against the eager layers it replaces: F.linear after
RMSNorm.forward_native (with and without the residual add), after SiluAndMul.forward_native,
or alone (with a bias).

On CPU the kernel runs in Triton's interpreter (test/conftest.py sets TRITON_INTERPRET=1) at
small shapes that still cover every path: the FMA rows (M <= 4) and tl.dot rows (M > 4), K in
several blocks with a ragged tail, N not a multiple of the column block. The `gpu` variant
repeats it at the qwen3-0.6b and llama-3.1-8b shapes.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from sglab.srt.layers import skinny_gemm as sg
from sglab.srt.layers.activation import SiluAndMul
from sglab.srt.layers.layernorm import RMSNorm

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _tol(dtype, k: int) -> float:
    if dtype == torch.float32:
        return 1e-4
    return 3e-2 if DEVICE == "cuda" else 8e-2  # the interpreter truncates to bf16


def _close(a, b, dtype, k) -> None:
    tol = _tol(dtype, k)
    torch.testing.assert_close(a.float(), b.float(), atol=tol, rtol=tol)


def _weights(n: int, k: int, dtype, bias: bool):
    w = (torch.randn(n, k, device=DEVICE) / k ** 0.5).to(dtype)
    b = torch.randn(n, device=DEVICE).to(dtype) if bias else None
    return w, b


def _check(m: int, n: int, k: int, dtype, config: dict | None = None) -> None:
    torch.manual_seed(m * 1000 + n + k)
    w, b = _weights(n, k, dtype, bias=True)
    x = torch.randn(m, k, device=DEVICE).to(dtype)
    _close(sg.skinny_gemm(x, w, b, config=config), F.linear(x, w, b), dtype, k)

    norm = RMSNorm(k, 1e-6, dtype).to(DEVICE)
    norm.weight.data = (torch.rand(k, device=DEVICE) + 0.5).to(dtype)
    res = torch.randn(m, k, device=DEVICE).to(dtype)
    out, new_res = sg.skinny_gemm(x, w, None, sg.RMSNormPrologue(norm.weight, 1e-6, res),
                                  config=config)
    ref_x, ref_res = norm.forward_native(x, res)
    assert torch.equal(new_res, ref_res) or dtype != torch.float32 or DEVICE == "cpu"
    _close(new_res, ref_res, dtype, k)
    _close(out, F.linear(ref_x, w), dtype, k)
    out, same = sg.skinny_gemm(x, w, None, sg.RMSNormPrologue(norm.weight, 1e-6),
                               config=config)
    assert same.data_ptr() == x.data_ptr()
    _close(out, F.linear(norm.forward_native(x), w), dtype, k)

    gu = torch.randn(m, 2 * k, device=DEVICE).to(dtype)
    _close(sg.skinny_gemm(gu, w, None, sg.SILU_MUL, config=config),
           F.linear(SiluAndMul().forward_native(gu), w), dtype, k)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("m,n,k", [(1, 20, 600), (3, 12, 96), (5, 40, 200), (16, 33, 130),
                                   (40, 36, 80)])
def test_skinny_gemm_matches_eager(m, n, k, dtype):
    _check(m, n, k, dtype)


# The FMA tile's other layouts, as kernel_bench sweeps them: the reduction over K deferred to
# the end, wider and narrower column blocks, more warps.
FMA_CONFIGS = [{"DEFER_REDUCE": True}, {"DEFER_REDUCE": True, "BLOCK_N": 4, "BLOCK_K": 256},
               {"DEFER_REDUCE": True, "BLOCK_N": 16, "BLOCK_K": 128, "num_warps": 8}]


@pytest.mark.parametrize("config", FMA_CONFIGS)
@pytest.mark.parametrize("m,n,k", [(1, 20, 600), (3, 12, 96)])
def test_skinny_gemm_fma_layouts_match_eager(m, n, k, config):
    _check(m, n, k, torch.float32, config)


def test_a_config_without_room_for_every_row_is_refused():
    w, _ = _weights(8, 32, torch.float32, bias=False)
    with pytest.raises(AssertionError, match="every row"):
        sg.skinny_gemm(torch.zeros(3, 32, device=DEVICE), w, config={"BLOCK_M": 2})


@pytest.mark.parametrize("m", [2, 4, 9, 16, 40])
def test_a_rows_result_does_not_depend_on_the_rows_beside_it(m):
    """The same first row with other values in the rows beside it: the same bits, with each
    prologue. (Across batch sizes the tiles differ, so only closeness holds; deterministic
    inference does not use this kernel.)"""
    torch.manual_seed(m)
    w, b = _weights(24, 160, torch.float32, bias=True)
    nw = torch.rand(160, device=DEVICE) + 0.5
    x, other = torch.randn(m, 320, device=DEVICE), torch.randn(m, 320, device=DEVICE)
    other[0] = x[0]
    for prologue, width in ((None, 160), (sg.RMSNormPrologue(nw, 1e-6), 160),
                            (sg.SILU_MUL, 320)):
        first = sg.skinny_gemm(x[:, :width], w, b, prologue)
        second = sg.skinny_gemm(other[:, :width], w, b, prologue)
        if isinstance(prologue, sg.RMSNormPrologue):
            first, second = first[0], second[0]
        assert torch.equal(first[0], second[0])
    torch.testing.assert_close(sg.skinny_gemm(x[:1, :160], w, b),
                               sg.skinny_gemm(x[:, :160], w, b)[:1])


def test_a_wrong_width_is_refused():
    w, _ = _weights(8, 32, torch.float32, bias=False)
    with pytest.raises(ValueError, match="K=32"):
        sg.skinny_gemm(torch.zeros(2, 32, device=DEVICE), w, None, sg.SILU_MUL)


def test_max_m_bounds_what_it_serves(monkeypatch):
    x = torch.zeros(16, 8)
    assert not sg.skinny_applies(x)  # not on the GPU
    monkeypatch.setattr(torch.Tensor, "is_cuda", property(lambda self: True))
    monkeypatch.delenv("SGLAB_SKINNY_GEMM_MAX_M", raising=False)
    assert not sg.skinny_applies(torch.zeros(1, 8))  # off without a model's hidden size
    assert sg.max_m(sg.SMALL_MODEL_HIDDEN) == 1 and sg.max_m(sg.SMALL_MODEL_HIDDEN * 2) == 0
    monkeypatch.setenv("SGLAB_SKINNY_GEMM_MAX_M", "16")
    assert sg.skinny_applies(x) and not sg.skinny_applies(torch.zeros(17, 8))
    monkeypatch.setenv("SGLAB_SKINNY_GEMM_MAX_M", "0")
    assert not sg.skinny_applies(torch.zeros(1, 8))
    monkeypatch.setenv("SGLAB_SKINNY_GEMM_MAX_M", "128")  # capped at the largest tile
    assert sg.skinny_applies(torch.zeros(64, 8)) and not sg.skinny_applies(torch.zeros(65, 8))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("m", [1, 4, 8, 16, 64])
@pytest.mark.parametrize("n,k", [(4096, 1024), (1024, 2048), (6144, 1024), (1024, 3072),
                                 (6144, 4096), (4096, 4096), (28672, 4096), (4096, 14336)])
def test_gpu_skinny_gemm_at_model_shapes(m, n, k):
    _check(m, n, k, torch.bfloat16)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("config", FMA_CONFIGS)
@pytest.mark.parametrize("n,k", [(6144, 1024), (1024, 3072), (28672, 4096), (4096, 14336)])
def test_gpu_skinny_gemm_fma_layouts(n, k, config):
    _check(1, n, k, torch.bfloat16, config)
