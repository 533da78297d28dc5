"""Programmatic dependent launch (SGLAB_TRITON_PDL=1, layers/pdl.py).

On CPU (and off by default) the kernels launch as before: `pdl_launch` adds no launch attribute.
On a Hopper GPU: a consumer launched with PDL that skips `pdl_wait` reads a slow producer's
output before it is written (so PDL is really in effect and the race is observable), the same
consumer with `pdl_wait` always reads it written, and a decode model in CUDA graphs gives the
same bits with PDL on and off.
"""

from __future__ import annotations

import random

import pytest
import torch
import triton
import triton.language as tl
from sglab.srt.layers import pdl
from sglab.test.runners import SchedulerRunner, free_gpu_memory


@pytest.fixture
def pdl_env(monkeypatch):
    def set_pdl(on: bool) -> None:
        monkeypatch.setenv("SGLAB_TRITON_PDL", "1" if on else "0")
        pdl.pdl_enabled.cache_clear()
    yield set_pdl
    pdl.pdl_enabled.cache_clear()


def test_pdl_is_off_by_default_and_on_cpu(pdl_env, monkeypatch):
    monkeypatch.delenv("SGLAB_TRITON_PDL", raising=False)
    pdl.pdl_enabled.cache_clear()
    assert pdl.pdl_launch(torch.zeros(1)) == {"USE_PDL": False}
    pdl_env(True)
    assert pdl.pdl_launch(torch.zeros(1)) == {"USE_PDL": False}  # a CPU tensor never


def _hopper() -> bool:
    return torch.cuda.is_available() and torch.cuda.get_device_capability()[0] >= 9


hopper = pytest.mark.skipif(not _hopper(), reason="needs a CUDA GPU of compute capability 9+")


@triton.jit
def _slow_producer(out_ptr, spins, N: tl.constexpr):
    tl.extra.cuda.gdc_launch_dependents()  # the consumer may be scheduled at once
    acc = tl.zeros([N], tl.float32) + 1.0
    for _ in range(spins):
        acc = acc * 1.0000001 + 1e-7
    tl.store(out_ptr + tl.arange(0, N), tl.where(acc > 0, 1.0, 2.0))


@triton.jit
def _consumer(src_ptr, dst_ptr, N: tl.constexpr, USE_PDL: tl.constexpr):
    pdl.pdl_wait(USE_PDL)
    offs = tl.arange(0, N)
    tl.store(dst_ptr + offs, tl.load(src_ptr + offs))


def _stale_reads(use_wait: bool, trials: int = 20) -> int:
    n = 128
    stale = 0
    for _ in range(trials):
        src = torch.zeros(n, device="cuda")
        dst = torch.full((n,), -1.0, device="cuda")
        _slow_producer[(1,)](src, 200_000, N=n, launch_pdl=True)
        _consumer[(1,)](src, dst, N=n, USE_PDL=use_wait, launch_pdl=True)
        torch.cuda.synchronize()
        assert torch.equal(src, torch.ones(n, device="cuda"))
        stale += int((dst != 1).any())
    return stale


@pytest.mark.gpu
@hopper
def test_gpu_a_consumer_without_the_wait_races_and_with_it_does_not():
    assert _stale_reads(use_wait=False) > 0, "PDL not in effect: the unsafe consumer never raced"
    assert _stale_reads(use_wait=True) == 0


@pytest.mark.gpu
@hopper
@pytest.mark.parametrize("max_m", ["0", "16"])
def test_gpu_decode_with_pdl_gives_the_same_bits(tiny_model_dir, pdl_env, monkeypatch, max_m):
    """fp32, --kernel-fusion on, CUDA graphs and overlap, 16 requests of up to 600 keys: the
    same tokens and logprob bits with PDL on and off (with cuBLAS or the small-M GEMM)."""
    monkeypatch.setenv("SGLAB_SKINNY_GEMM_MAX_M", max_m)
    rng = random.Random(3)
    prompts = [[rng.randrange(1000) for _ in range(rng.randrange(1, 600))] for _ in range(16)]
    params = {"temperature": 0, "max_new_tokens": 24, "ignore_eos": True}
    outs = {}
    for on in (False, True):
        pdl_env(on)
        free_gpu_memory()
        runner = SchedulerRunner(model_path=tiny_model_dir("tiny-qwen3"), device="cuda",
                                 dtype="float32", attention_backend="triton",
                                 cuda_graph_max_bs=16, kernel_fusion="on")
        assert pdl.pdl_enabled() == on
        outs[on] = runner.generate(prompts, params, return_logprob=True)
        assert runner.integrity_error() is None
        del runner
    assert [o.output_ids for o in outs[True]] == [o.output_ids for o in outs[False]]
    assert [o.logprobs["output_token_logprobs_val"] for o in outs[True]] == \
        [o.logprobs["output_token_logprobs_val"] for o in outs[False]]
