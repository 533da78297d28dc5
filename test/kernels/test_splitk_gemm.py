"""The split-K GEMM against F.linear (fp32 products of the same bf16 inputs), at every split
count the table may pick: one split (no workspace), splits that divide K, a ragged last split
and empty trailing splits, N not a multiple of the column tile, with and without a bias. The
split order of the final sum is fixed, so two launches give the same bits, and a launch after
a different shape still finds its arrival counters zero.

On CPU the kernel runs in Triton's interpreter (test/conftest.py sets TRITON_INTERPRET=1) at
small shapes; the `gpu` variants run the decoder shapes of the table."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from sglab.srt.layers import splitk_gemm as sk
from sglab.srt.layers.activation import SiluAndMul
from sglab.srt.layers.arrival import arrival_counters
from sglab.srt.layers.layernorm import RMSNorm
from sglab.srt.layers.skinny_gemm import SILU_MUL, RMSNormPrologue

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


class _Refused:
    def __getitem__(self, grid):
        raise AssertionError("the pointer kernel ran where the TMA kernel should")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("m,n,k,split_k", [
    (5, 48, 64, 1),    # one split; rows past M come as zeros from the descriptor
    (16, 40, 96, 3),   # N past the last full tile
    (17, 33, 104, 4),  # K past the last full block (zeros), 32 rows of tile
    (3, 16, 40, 8),    # empty trailing splits still arrive
])
def test_tma_layouts_match_linear(monkeypatch, dtype, m, n, k, split_k) -> None:
    monkeypatch.setattr(sk, "_splitk_gemm_kernel", _Refused())
    _check(m, n, k, dtype, {"BLOCK_N": 16, "BLOCK_K": 16, "SPLIT_K": split_k, "TMA": 1},
           bias=split_k != 3)
    x, w, b = _case(m, 2 * n, k, dtype, bias=True, seed=m)
    act = sk.splitk_gemm(x, w, b, {"BLOCK_N": 16, "BLOCK_K": 16, "SPLIT_K": split_k, "TMA": 1},
                         silu_out=True)
    _close(act, SiluAndMul().forward_native(F.linear(x, w, b)), dtype)


def test_tma_layout_falls_back_off_its_alignment() -> None:
    """A prologue, or rows TMA cannot address (a base off 16 bytes), take the pointer kernel
    with the same tile."""
    x, w, _ = _case(4, 32, 49, torch.float32, bias=False)
    cfg = {"BLOCK_N": 16, "BLOCK_K": 16, "SPLIT_K": 2, "TMA": 1}
    view = x[:, 1:]
    assert not sk._tma_aligned(view)
    torch.testing.assert_close(sk.splitk_gemm(view, w[:, 1:].contiguous(), config=cfg),
                               F.linear(view, w[:, 1:]), atol=1e-4, rtol=1e-4)
    norm = _norm_case(4, 48, torch.float32)
    out, _ = sk.splitk_gemm(view.contiguous(), w[:, 1:].contiguous(), None, cfg,
                            RMSNormPrologue(norm.weight, 1e-6))
    _close(out, F.linear(norm.forward_native(view.contiguous()), w[:, 1:]), torch.float32)


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
    monkeypatch.setattr(sk, "SPLITK_TABLE",
                        {(8, 16): ((8, 16, small, True), (17, 64, large, False))})
    assert sk.config_for(8, 16, 8) is small and sk.config_for(8, 16, 16) is small
    assert sk.config_for(8, 16, 17) is None  # measured slower than F.linear
    assert sk.config_for(8, 16, 17, fused=True) is large
    assert sk.config_for(8, 16, 64, fused=True) is large
    assert sk.config_for(8, 16, 4, fused=True) is None  # below the rows measured
    assert sk.config_for(8, 16, 65, fused=True) is None and sk.config_for(16, 8, 8) is None


def test_table_from_the_environment(monkeypatch, tmp_path) -> None:
    monkeypatch.setattr(sk, "SPLITK_TABLE", {})
    monkeypatch.setattr(sk, "_override", None)
    path = tmp_path / "table.json"
    path.write_text('{"4096x14336": [[33, 64, {"BLOCK_N": 64, "BLOCK_K": 128, "SPLIT_K": 4}, '
                    'true]]}')
    monkeypatch.setenv("SGLAB_SPLITK_TABLE", str(path))
    sk.load_table()
    assert sk.config_for(4096, 14336, 64) == {"BLOCK_N": 64, "BLOCK_K": 128, "SPLIT_K": 4}
    monkeypatch.setenv("SGLAB_SPLITK_TABLE", "none")
    sk.load_table()
    assert sk.config_for(4096, 14336, 64) is None
    monkeypatch.delenv("SGLAB_SPLITK_TABLE")
    monkeypatch.setattr(sk, "SPLITK_TABLE", {(8, 16): ((1, 64, {"SPLIT_K": 1}, True),)})
    sk.load_table()  # unset again: the built-in table, not the last one loaded
    assert sk.config_for(8, 16, 4) == {"SPLIT_K": 1}
    layout = '{"BLOCK_N": 64, "BLOCK_K": 128, "SPLIT_K": 4}'
    for bad in (f'{{"4096x14336": [[0, 64, {layout}, true]]}}',
                f'{{"4096x14336": [[1, 64, {layout}]]}}',
                f'{{"4096x14336": [[1, 64, {layout}, 1]]}}',
                '{"4096x14336": [[1, 64, {"BLOCK_N": 64}, true]]}', '{"4096": []}', "not json"):
        path.write_text(bad)
        monkeypatch.setenv("SGLAB_SPLITK_TABLE", str(path))
        with pytest.raises(ValueError, match="SGLAB_SPLITK_TABLE"):
            sk.load_table()
    monkeypatch.setenv("SGLAB_SPLITK_TABLE", str(tmp_path / "missing.json"))
    with pytest.raises(ValueError, match="SGLAB_SPLITK_TABLE"):
        sk.load_table()


def _norm_case(m: int, k: int, dtype: torch.dtype):
    norm = RMSNorm(k, 1e-6, dtype).to(DEVICE)
    norm.weight.data = (torch.rand(k, generator=torch.Generator().manual_seed(k)) + 0.5) \
        .to(dtype).to(DEVICE)
    return norm


def _close(got, want, dtype) -> None:
    tol = 1e-4 if dtype == torch.float32 else 3e-2 if DEVICE.type == "cuda" else 8e-2
    torch.testing.assert_close(got.float(), want.float(), atol=tol, rtol=tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("m,split_k", [(1, 3), (6, 1)])
def test_prologues_and_silu_out_match_the_eager_layers(dtype, m, split_k) -> None:
    """The norm (with and without the residual add) and SiLU-and-mul folded into the loads, and
    SiLU-and-mul applied before the store (gate_up), against RMSNorm / SiluAndMul's torch
    paths and F.linear; split or not."""
    n, k = 40, 48
    cfg = {"BLOCK_N": 16, "BLOCK_K": 16, "SPLIT_K": split_k}
    x, w, b = _case(m, n, k, dtype, bias=True, seed=m)
    res = _case(m, n, k, dtype, bias=False, seed=m + 1)[0]
    norm = _norm_case(m, k, dtype)
    out, new_res = sk.splitk_gemm(x, w, None, cfg, RMSNormPrologue(norm.weight, 1e-6, res))
    ref_x, ref_res = norm.forward_native(x, res)
    _close(new_res, ref_res, dtype)
    _close(out, F.linear(ref_x, w), dtype)
    out, same = sk.splitk_gemm(x, w, b, cfg, RMSNormPrologue(norm.weight, 1e-6))
    assert same.data_ptr() == x.data_ptr()
    _close(out, F.linear(norm.forward_native(x), w, b), dtype)
    gu = _case(m, n, 2 * k, dtype, bias=False, seed=m + 2)[0]
    _close(sk.splitk_gemm(gu, w, b, cfg, SILU_MUL),
           F.linear(SiluAndMul().forward_native(gu), w, b), dtype)
    act = sk.splitk_gemm(x, w, b, cfg, silu_out=True)
    assert act.shape == (m, n // 2)
    _close(act, SiluAndMul().forward_native(F.linear(x, w, b)), dtype)
    act, new_res = sk.splitk_gemm(x, w, None, cfg, RMSNormPrologue(norm.weight, 1e-6, res),
                                  silu_out=True)
    _close(act, SiluAndMul().forward_native(F.linear(ref_x, w)), dtype)


def test_silu_out_table(monkeypatch, tmp_path) -> None:
    """SiLU out takes its own table where it lists the shape (only winning entries), else the
    plain product's fused entries; SGLAB_SPLITK_TABLE's "NxK+silu" entries replace it."""
    plain, silu = {"SPLIT_K": 2}, {"SPLIT_K": 1, "TMA": 1}
    monkeypatch.setattr(sk, "_override", None)
    monkeypatch.setattr(sk, "SPLITK_TABLE", {(64, 32): ((1, 64, plain, False),),
                                             (32, 64): ((1, 64, plain, False),)})
    monkeypatch.setattr(sk, "SILU_OUT_TABLE", {(64, 32): ((1, 8, silu, True),
                                                          (9, 64, silu, False))})
    assert sk.silu_out_config(64, 32, 8) is silu and sk.silu_out_config(64, 32, 9) is None
    assert sk.silu_out_config(32, 64, sk.MAX_M) is plain  # a shape not listed
    path = tmp_path / "table.json"
    path.write_text('{"64x32": [[1, 64, {"BLOCK_N": 32, "BLOCK_K": 64, "SPLIT_K": 2}, false]], '
                    '"64x32+silu": [[1, 64, {"BLOCK_N": 64, "BLOCK_K": 64, "SPLIT_K": 1, '
                    '"TMA": 1}, true]]}')
    monkeypatch.setenv("SGLAB_SPLITK_TABLE", str(path))
    sk.load_table()
    assert sk.config_for(64, 32, 9) is None
    assert sk.silu_out_config(64, 32, 9) == {"BLOCK_N": 64, "BLOCK_K": 64, "SPLIT_K": 1,
                                             "TMA": 1}
    monkeypatch.setenv("SGLAB_SPLITK_TABLE", "none")
    sk.load_table()
    assert sk.silu_out_config(64, 32, 8) is None and sk.config_for(64, 32, 8, fused=True) is None
    monkeypatch.delenv("SGLAB_SPLITK_TABLE")
    sk.load_table()
    assert sk.silu_out_config(64, 32, 8) is silu


def test_fold_switches_are_validated(monkeypatch) -> None:
    monkeypatch.delenv("SGLAB_SPLITK_FOLD_MAX_M", raising=False)
    assert sk.splitk_fold_max_m() == sk.DEFAULT_FOLD_MAX_M
    monkeypatch.setenv("SGLAB_SPLITK_FOLD_MAX_M", "4")
    monkeypatch.setenv("SGLAB_SPLITK_SILU", "0")
    assert sk.splitk_fold_max_m() == 4 and sk.splitk_silu() is False
    for name, bad in (("SGLAB_SPLITK_FOLD_MAX_M", "-1"), ("SGLAB_SPLITK_SILU", "yes")):
        monkeypatch.setenv(name, bad)
        with pytest.raises(ValueError, match=name):
            sk.splitk_fold_max_m() if name.endswith("MAX_M") else sk.splitk_silu()


@needs_cuda
@pytest.mark.gpu
@pytest.mark.parametrize("m", [16, 32, 64])
@pytest.mark.parametrize("n,k", [(6144, 4096), (4096, 4096), (4096, 14336), (4096, 1024)])
def test_splitk_real_sizes_gpu(m, n, k) -> None:
    _check(m, n, k, torch.bfloat16, sk.config_for(n, k, m, fused=True), bias=False)


@needs_cuda
@pytest.mark.gpu
@pytest.mark.parametrize("m", [1, 33, 64])
@pytest.mark.parametrize("n,k", [(6144, 4096), (4096, 4096), (4096, 14336), (28672, 4096)])
@pytest.mark.parametrize("block_n,split_k,warps", [(64, 2, 4), (128, 4, 8), (256, 1, 8)])
def test_tma_real_sizes_gpu(m, n, k, block_n, split_k, warps) -> None:
    cfg = {"BLOCK_N": block_n, "BLOCK_K": 64 if block_n == 256 else 128, "SPLIT_K": split_k,
           "TMA": 1, "num_warps": warps, "num_stages": 3}
    _check(m, n, k, torch.bfloat16, cfg, bias=False)
    x, w, _ = _case(m, n, k, torch.bfloat16, bias=False, seed=4)
    _close(sk.splitk_gemm(x, w, None, cfg, silu_out=True),
           SiluAndMul().forward_native(F.linear(x, w)), torch.bfloat16)


@needs_cuda
@pytest.mark.gpu
@pytest.mark.parametrize("m", [1, 64])
def test_tma_silu_table_in_a_cuda_graph_gpu(m) -> None:
    """The 8B gate_up's SiLU-out table layouts (TMA: descriptors built at capture) replayed
    on new inputs in the same buffer."""
    n, k = 28672, 4096
    cfg = sk.silu_out_config(n, k, m)
    assert cfg is not None and cfg.get("TMA")
    x, w, _ = _case(m, n, k, torch.bfloat16, bias=False, seed=5)
    sk.splitk_gemm(x, w, None, cfg, silu_out=True)  # compile outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = sk.splitk_gemm(x, w, None, cfg, silu_out=True)
    for seed in (6, 7):
        x.copy_(_case(m, n, k, torch.bfloat16, bias=False, seed=seed)[0])
        graph.replay()
        _close(out, SiluAndMul().forward_native(F.linear(x, w)), torch.bfloat16)


@needs_cuda
@pytest.mark.gpu
@pytest.mark.parametrize("m", [1, 8, 64])
def test_fused_real_sizes_gpu(m) -> None:
    """llama-3.1-8b's folded norm before qkv and gate_up with SiLU out, the table's layouts."""
    dtype, k = torch.bfloat16, 4096
    x, w, _ = _case(m, 6144, k, dtype, bias=False, seed=1)
    res = _case(m, 6144, k, dtype, bias=False, seed=2)[0]
    norm = _norm_case(m, k, dtype)
    out, new_res = sk.splitk_gemm(x, w, None, sk.config_for(6144, k, m, fused=True),
                                  RMSNormPrologue(norm.weight, 1e-5, res))
    ref_x, ref_res = norm.forward_native(x, res)
    assert torch.equal(new_res, ref_res)
    _close(out, F.linear(ref_x, w), dtype)
    gate_up = _case(m, 28672, k, dtype, bias=False, seed=3)[1]
    act = sk.splitk_gemm(ref_x, gate_up, None, sk.config_for(28672, k, m, fused=True),
                         silu_out=True)
    _close(act, SiluAndMul().forward_native(F.linear(ref_x, gate_up)), dtype)
    if sk.silu_out_config(28672, k, m) is None:
        return
    act = sk.splitk_gemm(ref_x, gate_up, None, sk.silu_out_config(28672, k, m), silu_out=True)
    _close(act, SiluAndMul().forward_native(F.linear(ref_x, gate_up)), dtype)
