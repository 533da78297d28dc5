"""Gated DeltaNet kernels against the torch reference (`layers/attention/linear/reference.py`).

The reference's chunked prefill is checked against its own token-by-token recurrence (two
formulations of one rule). The Triton kernels (decode step, causal conv for decode and prefill,
state tracking) run in Triton's CPU interpreter here; the `gpu` tests repeat them at the
qwen3.5-9b shape in bf16 and add fla-core's chunked varlen prefill.
"""

from __future__ import annotations

import pytest
import torch

from sglab.srt.layers.attention.linear import gdn_triton
from sglab.srt.layers.attention.linear import reference as ref

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
gpu = pytest.mark.gpu
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def _inputs(seq_lens, heads=2, v_heads=4, k_dim=16, v_dim=8, dtype=torch.float32, seed=0,
            device=DEVICE):
    gen = torch.Generator().manual_seed(seed)
    t = sum(seq_lens)

    def rnd(*shape, scale=1.0):
        return (torch.randn(*shape, generator=gen) * scale).to(device=device, dtype=dtype)

    return dict(q=rnd(t, heads, k_dim), k=rnd(t, heads, k_dim), v=rnd(t, v_heads, v_dim),
                a=rnd(t, v_heads), b=rnd(t, v_heads), A_log=rnd(v_heads, scale=0.5) - 1.0,
                dt_bias=rnd(v_heads, scale=0.1) + 1.0)


def _states(num_slots, v_heads=4, k_dim=16, v_dim=8, dim=24, width=4, seed=1, device=DEVICE,
            ssm_dtype=torch.float32, conv_dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    ssm = torch.randn(num_slots, v_heads, k_dim, v_dim, generator=gen).to(device, ssm_dtype)
    conv = torch.randn(num_slots, dim, width - 1, generator=gen).to(device, conv_dtype)
    return conv, ssm


def test_chunked_prefill_equals_the_recurrence():
    """Per sequence, the chunked rule (from each slot's state) == one decode step per token."""
    seq_lens = [1, 70, 5, 130]
    x = _inputs(seq_lens)
    _, ssm = _states(6)
    slots = torch.tensor([3, 1, 5, 2])
    g, beta = ref.gdn_gating(x["A_log"], x["a"], x["dt_bias"], x["b"])
    out, final = ref.chunk_gated_delta_rule(x["q"], x["k"], x["v"], g, beta, ssm[slots].clone(),
                                            seq_lens)
    step_states = ssm.clone()
    start = 0
    for i, n in enumerate(seq_lens):
        for t in range(start, start + n):
            o = ref.gdn_decode(x["q"][t:t + 1], x["k"][t:t + 1], x["v"][t:t + 1],
                               x["a"][t:t + 1], x["b"][t:t + 1], x["A_log"], x["dt_bias"],
                               step_states, slots[i:i + 1])
            torch.testing.assert_close(out[t], o[0], atol=2e-5, rtol=1e-4)
        torch.testing.assert_close(final[i], step_states[slots[i]], atol=2e-5, rtol=1e-4)
        start += n
    assert not torch.equal(final[1], ssm[1])  # the states moved


def test_conv_prefill_continues_the_decode_window():
    """A packed prefill == feeding its tokens one at a time through the decode conv."""
    seq_lens = [1, 9, 2, 3]
    dim, width = 24, 4
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(sum(seq_lens), dim, generator=gen)
    weight = torch.randn(dim, width, generator=gen)
    conv, _ = _states(5, dim=dim, width=width, device="cpu")
    slots = torch.tensor([4, 0, 2, 1])
    pre = conv.clone()
    out = ref.causal_conv1d_prefill(x, weight, pre, slots, seq_lens)
    step = conv.clone()
    start = 0
    for i, n in enumerate(seq_lens):
        for t in range(start, start + n):
            y = ref.causal_conv1d_decode(x[t:t + 1], weight, step, slots[i:i + 1])
            torch.testing.assert_close(out[t], y[0], atol=1e-5, rtol=1e-5)
        start += n
    torch.testing.assert_close(pre, step, atol=0, rtol=0)
    unused = [s for s in range(5) if s not in slots.tolist()]
    assert torch.equal(pre[unused], conv[unused])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_triton_decode_step_matches_reference(dtype):
    n = 5
    x = _inputs([n], dtype=dtype, seed=3)
    conv, ssm = _states(8, seed=4)
    slots = torch.tensor([7, 2, 0, 5, 3], device=DEVICE)
    want_states, got_states = ssm.clone(), ssm.clone()
    args = (x["q"], x["k"], x["v"], x["a"], x["b"], x["A_log"], x["dt_bias"])
    want = ref.gdn_decode(*args, want_states, slots)
    got = gdn_triton.gdn_decode(*args, got_states, slots)
    tol = 1e-5 if dtype == torch.float32 else 3e-2
    torch.testing.assert_close(got.float(), want.float(), atol=tol, rtol=tol)
    torch.testing.assert_close(got_states, want_states, atol=1e-5, rtol=1e-5)
    untouched = [1, 4, 6]
    assert torch.equal(got_states[untouched], ssm[untouched])


def test_triton_conv_kernels_match_reference():
    dim, width = 40, 4
    gen = torch.Generator().manual_seed(5)
    weight = torch.randn(dim, width, generator=gen).to(DEVICE)
    conv, _ = _states(6, dim=dim, width=width, seed=6)
    slots = torch.tensor([5, 1, 3], device=DEVICE)
    x = torch.randn(3, dim, generator=gen).to(DEVICE)
    want_s, got_s = conv.clone(), conv.clone()
    want = ref.causal_conv1d_decode(x, weight, want_s, slots)
    got = gdn_triton.causal_conv1d_decode(x, weight, got_s, slots)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got_s, want_s, atol=0, rtol=0)
    seq_lens = [2, 7, 1]  # shorter than the window, longer, and one token
    xp = torch.randn(sum(seq_lens), dim, generator=gen).to(DEVICE)
    want_s, got_s = conv.clone(), conv.clone()
    want = ref.causal_conv1d_prefill(xp, weight, want_s, slots, seq_lens)
    got = gdn_triton.causal_conv1d_prefill(xp, weight, got_s, slots,
                                           torch.tensor(seq_lens, device=DEVICE), sum(seq_lens))
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got_s, want_s, atol=0, rtol=0)


def test_triton_track_copies_masked_rows_only():
    conv, ssm = _states(8, seed=7)
    src = torch.tensor([1, 2, 3], device=DEVICE)
    dst = torch.tensor([5, 6, 7], device=DEVICE)
    mask = torch.tensor([True, False, True], device=DEVICE)
    want_c, want_s, got_c, got_s = conv.clone(), ssm.clone(), conv.clone(), ssm.clone()
    ref.track_states(want_c, want_s, src, dst, mask)
    gdn_triton.track_states(got_c, got_s, src, dst, mask)
    keep = [1, 2, 3, 4, 5, 6, 7]  # the reference's unmasked rows write the padding slot 0
    assert torch.equal(got_c[keep], want_c[keep]) and torch.equal(got_s[keep], want_s[keep])
    assert torch.equal(got_s[5], ssm[1]) and torch.equal(got_s[7], ssm[3])
    assert torch.equal(got_s[6], ssm[6]) and torch.equal(got_c[0], conv[0])


# --- GPU: real shapes, bf16, fla-core's chunked prefill ------------------------------------------

_9B = dict(heads=16, v_heads=32, k_dim=128, v_dim=128)


@gpu
@needs_cuda
def test_gpu_fla_prefill_matches_reference():
    from sglab.srt.layers.attention.linear.kernels import fla_chunk_gated_delta_rule

    seq_lens = [1, 63, 64, 65, 300]
    x = _inputs(seq_lens, dtype=torch.bfloat16, seed=8, **_9B)
    _, ssm = _states(6, v_heads=32, k_dim=128, v_dim=128, dim=8, seed=9)
    init = ssm[:5] * 0.1
    g, beta = ref.gdn_gating(x["A_log"], x["a"], x["dt_bias"], x["b"])
    want_o, want_h = ref.chunk_gated_delta_rule(x["q"], x["k"], x["v"], g, beta, init, seq_lens)
    cu_cpu = torch.tensor([0] + seq_lens).cumsum(0)
    got_o, got_h = fla_chunk_gated_delta_rule(x["q"], x["k"], x["v"], g, beta, init,
                                              cu_cpu.cuda(), cu_cpu)
    torch.testing.assert_close(got_o.float(), want_o.float(), atol=3e-2, rtol=3e-2)
    torch.testing.assert_close(got_h.float(), want_h.float(), atol=3e-2, rtol=3e-2)


@gpu
@needs_cuda
def test_gpu_decode_kernels_at_9b_shape():
    n, dim = 64, 2 * 16 * 128 + 32 * 128
    x = _inputs([n], dtype=torch.bfloat16, seed=10, **_9B)
    conv, ssm = _states(n + 1, v_heads=32, k_dim=128, v_dim=128, dim=dim, seed=11,
                        conv_dtype=torch.bfloat16)
    slots = torch.randperm(n, device="cuda") + 1
    args = (x["q"], x["k"], x["v"], x["a"], x["b"], x["A_log"], x["dt_bias"])
    want_s, got_s = ssm.clone(), ssm.clone()
    want = ref.gdn_decode(*args, want_s, slots)
    got = gdn_triton.gdn_decode(*args, got_s, slots)
    torch.testing.assert_close(got.float(), want.float(), atol=3e-2, rtol=3e-2)
    torch.testing.assert_close(got_s, want_s, atol=1e-3, rtol=1e-3)
    weight = torch.randn(dim, 4, device="cuda", dtype=torch.bfloat16)
    xc = torch.randn(n, dim, device="cuda", dtype=torch.bfloat16)
    want_c, got_c = conv.clone(), conv.clone()
    want = ref.causal_conv1d_decode(xc, weight, want_c, slots)
    got = gdn_triton.causal_conv1d_decode(xc, weight, got_c, slots)
    torch.testing.assert_close(got.float(), want.float(), atol=3e-2, rtol=3e-2)
    assert torch.equal(got_c, want_c)
