"""Fused elementwise Triton kernels against the eager torch layers they replace.

On CPU the kernels run in Triton's interpreter (test/conftest.py sets TRITON_INTERPRET=1); the
`gpu` variants repeat the checks at real model sizes.
"""

from __future__ import annotations

import pytest
import torch
from sglab.srt.layers.activation import SiluAndMul
from sglab.srt.layers.elementwise import KVWrite, qk_norm_rope, rmsnorm, silu_and_mul
from sglab.srt.layers.layernorm import RMSNorm
from sglab.srt.layers.logits_processor import linear_fp32_out
from sglab.srt.mem_cache.memory_pool import MHATokenToKVPool
from sglab.srt.layers.rotary_embedding import RotaryEmbedding

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.float32, torch.bfloat16]
# Rounding points match the eager code; what is left is the reduction order of the variance
# (and, in the CPU interpreter, bf16 truncation at each rounding point: a few ulps).
ATOL = {torch.float32: 1e-5, torch.bfloat16: 2e-2 if DEVICE == "cuda" else 6e-2}


def _exact(dtype) -> bool:
    """Triton's CPU interpreter truncates fp32 -> bf16 where the GPU rounds to nearest even."""
    return dtype == torch.float32 or DEVICE == "cuda"


def _close(a: torch.Tensor, b: torch.Tensor, dtype) -> None:
    torch.testing.assert_close(a.float(), b.float(), atol=ATOL[dtype], rtol=ATOL[dtype])


def _norm(hidden: int, dtype) -> RMSNorm:
    norm = RMSNorm(hidden, 1e-6, dtype).to(DEVICE)
    norm.weight.data = (torch.rand(hidden, device=DEVICE) + 0.5).to(dtype)
    return norm


def _check_rmsnorm(tokens: int, hidden: int, dtype) -> None:
    torch.manual_seed(0)
    norm = _norm(hidden, dtype)
    x = torch.randn(tokens, hidden, device=DEVICE).to(dtype)
    res = torch.randn(tokens, hidden, device=DEVICE).to(dtype)
    _close(rmsnorm(x, norm.weight, 1e-6), norm.forward_native(x), dtype)
    out, new_res = rmsnorm(x, norm.weight, 1e-6, res)
    ref_out, ref_res = norm.forward_native(x, res)
    _close(new_res, ref_res, dtype)
    if _exact(dtype):  # the residual add rounds exactly like torch's
        assert torch.equal(new_res, ref_res)
    _close(out, ref_out, dtype)
    assert new_res.data_ptr() != res.data_ptr()  # inputs are never written


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("tokens,hidden", [(1, 64), (7, 96), (33, 128)])
def test_rmsnorm(tokens, hidden, dtype):
    _check_rmsnorm(tokens, hidden, dtype)


def _check_qk_norm_rope(tokens: int, hq: int, hkv: int, head_dim: int, dtype,
                        with_norm: bool, scaling: dict | None = None) -> None:
    torch.manual_seed(1)
    rope = RotaryEmbedding(head_dim, 4096, 10000.0, scaling).to(DEVICE)
    qkv = torch.randn(tokens, (hq + 2 * hkv) * head_dim, device=DEVICE).to(dtype)
    q, k, _ = qkv.split([hq * head_dim, hkv * head_dim, hkv * head_dim], dim=-1)
    positions = torch.randint(0, 4096, (tokens,), device=DEVICE)
    q_ref, k_ref = q, k
    weights = {}
    if with_norm:
        q_norm, k_norm = _norm(head_dim, dtype), _norm(head_dim, dtype)
        q_ref = q_norm.forward_native(q.reshape(-1, head_dim)).view(q.shape)
        k_ref = k_norm.forward_native(k.reshape(-1, head_dim)).view(k.shape)
        weights = {"q_weight": q_norm.weight, "k_weight": k_norm.weight, "eps": 1e-6}
    q_ref, k_ref = rope(positions, q_ref, k_ref)
    q_out, k_out = qk_norm_rope(q, k, positions, rope.cos_sin_cache, head_dim, **weights)
    assert q_out.shape == q_ref.shape and k_out.shape == k_ref.shape
    _close(q_out, q_ref, dtype)
    _close(k_out, k_ref, dtype)
    if not with_norm and DEVICE == "cpu" and dtype == torch.float32:
        # No reduction: the interpreter gives the eager bits. On a GPU the compiler may contract
        # the multiply-adds, which moves the last bit, so the GPU check is the tolerance above.
        assert torch.equal(q_out, q_ref) and torch.equal(k_out, k_ref)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("with_norm", [False, True])
@pytest.mark.parametrize("tokens,hq,hkv,head_dim", [(1, 4, 2, 32), (5, 8, 8, 16), (9, 6, 2, 64)])
def test_qk_norm_rope(tokens, hq, hkv, head_dim, dtype, with_norm):
    _check_qk_norm_rope(tokens, hq, hkv, head_dim, dtype, with_norm)


def test_qk_rope_llama3_scaling():
    scaling = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 512}
    _check_qk_norm_rope(6, 4, 2, 32, torch.float32, False, scaling)


def _check_kv_write(tokens: int, hq: int, hkv: int, head_dim: int, dtype, with_norm: bool,
                    page_size: int = 1) -> None:
    """The fused K/V write stores what set_kv_buffer stores, at the same slots, bit for bit,
    touches no other slot, and leaves q and k as without it."""
    torch.manual_seed(3)
    rope = RotaryEmbedding(head_dim, 4096, 10000.0).to(DEVICE)
    qkv = torch.randn(tokens, (hq + 2 * hkv) * head_dim, device=DEVICE).to(dtype)
    q, k, v = qkv.split([hq * head_dim, hkv * head_dim, hkv * head_dim], dim=-1)
    positions = torch.randint(0, 4096, (tokens,), device=DEVICE)
    weights = {}
    if with_norm:
        weights = {"q_weight": _norm(head_dim, dtype).weight,
                   "k_weight": _norm(head_dim, dtype).weight, "eps": 1e-6}
    pools = [MHATokenToKVPool(4 * tokens + 8, page_size, dtype, hkv, head_dim, 2, DEVICE)
             for _ in range(2)]
    loc = torch.randperm(4 * tokens, device=DEVICE)[:tokens] + page_size
    q_ref, k_ref = qk_norm_rope(q, k, positions, rope.cos_sin_cache, head_dim, **weights)
    layer = type("Layer", (), {"layer_id": 1})()
    pools[0].set_kv_buffer(layer, loc, k_ref, v)
    k_buf, v_buf = pools[1].get_kv_buffer(1)
    q_out, k_out = qk_norm_rope(q, k, positions, rope.cos_sin_cache, head_dim, **weights,
                                kv_write=KVWrite(v, loc, k_buf, v_buf))
    assert torch.equal(q_out, q_ref) and torch.equal(k_out, k_ref)
    assert torch.equal(pools[1].k_all, pools[0].k_all)
    assert torch.equal(pools[1].v_all, pools[0].v_all)
    assert pools[1].k_all[1, loc].abs().sum() > 0 and not pools[1].k_all[0].any()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("with_norm", [False, True])
@pytest.mark.parametrize("tokens,hq,hkv,head_dim,page_size",
                         [(1, 4, 2, 32, 1), (6, 8, 8, 16, 4), (9, 6, 2, 64, 1)])
def test_qk_norm_rope_kv_write(tokens, hq, hkv, head_dim, page_size, dtype, with_norm):
    _check_kv_write(tokens, hq, hkv, head_dim, dtype, with_norm, page_size)


def test_kv_write_refuses_other_layouts():
    k_buf = torch.zeros(8, 2, 32, device=DEVICE, dtype=torch.bfloat16)
    q, k, v = torch.randn(2, 128, device=DEVICE), torch.randn(2, 64, device=DEVICE), \
        torch.randn(2, 64, device=DEVICE)
    positions = torch.zeros(2, dtype=torch.int64, device=DEVICE)
    cache = RotaryEmbedding(32, 16, 10000.0).to(DEVICE).cos_sin_cache
    with pytest.raises(AssertionError):  # a bf16 pool for fp32 keys: set_kv_buffer's cast
        qk_norm_rope(q, k, positions, cache, 32,
                     kv_write=KVWrite(v, positions, k_buf, k_buf.clone()))


def test_linear_fp32_out_cpu_is_linear_then_float():
    x, w = torch.randn(3, 16).to(torch.bfloat16), torch.randn(40, 16).to(torch.bfloat16)
    out = linear_fp32_out(x, w)
    assert out.dtype == torch.float32
    assert torch.equal(out, torch.nn.functional.linear(x, w).float())


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("tokens,d", [(1, 64), (5, 100), (3, 1500)])
def test_silu_and_mul(tokens, d, dtype):
    torch.manual_seed(2)
    x = (torch.randn(tokens, 2 * d, device=DEVICE) * 3).to(dtype)
    ref = SiluAndMul().forward_native(x)
    out = silu_and_mul(x)
    assert out.shape == ref.shape
    _close(out, ref, dtype)


def test_empty_batch():
    x = torch.empty(0, 64, device=DEVICE)
    w = torch.ones(64, device=DEVICE)
    assert rmsnorm(x, w, 1e-6).shape == (0, 64)
    assert silu_and_mul(x).shape == (0, 32)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("hidden", [1024, 4096])
def test_gpu_real_sizes(hidden):
    _check_rmsnorm(257, hidden, torch.bfloat16)
    _check_qk_norm_rope(257, 32, 8, 128, torch.bfloat16, True)
    _check_qk_norm_rope(257, 32, 8, 128, torch.bfloat16, False)
    x = torch.randn(257, 2 * 14336, device="cuda", dtype=torch.bfloat16)
    _close(silu_and_mul(x), SiluAndMul().forward_native(x), torch.bfloat16)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_kv_write_real_sizes():
    _check_kv_write(257, 16, 8, 128, torch.bfloat16, True)  # qwen3-0.6b
    _check_kv_write(257, 32, 8, 128, torch.bfloat16, False)  # llama-3.1-8b
    _check_kv_write(64, 32, 8, 128, torch.bfloat16, False, page_size=16)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("m", [1, 64, 2048])
def test_gpu_linear_fp32_out(m):
    """The logits GEMM writing fp32: no bf16 rounding of the logits, so it is closer to the fp32
    product than the bf16 GEMM followed by a cast."""
    gen = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(m, 1024, generator=gen, device="cuda").to(torch.bfloat16)
    w = (torch.randn(151936, 1024, generator=gen, device="cuda") * 0.05).to(torch.bfloat16)
    out = linear_fp32_out(x, w)
    exact = x.float() @ w.float().t()
    cast = torch.nn.functional.linear(x, w).float()
    assert out.dtype == torch.float32 and out.shape == exact.shape
    torch.testing.assert_close(out, exact, atol=1e-3, rtol=1e-3)
    assert (out - exact).abs().mean() < (cast - exact).abs().mean()
