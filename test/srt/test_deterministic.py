"""--enable-deterministic-inference: a prompt's greedy and seeded-sampled outputs and their
logprobs are bit-identical whatever batch it runs in, with or without a radix hit, however its
prefill is chunked. CPU (torch_native) through the in-process scheduler; GPU (triton, bf16)
under the gpu mark; the sglab.test.test_deterministic client against a real server."""

from __future__ import annotations

import random

import pytest
import torch
import torch.nn.functional as F
from sglab.srt.batch_invariant_ops import (
    ROW_CHUNK,
    linear_batch_invariant,
    matmul_fixed_tiles,
)
from sglab.srt.layers.attention.torch_native_backend import attend, attend_batch_invariant
from sglab.srt.layers.linear import LinearBase
from sglab.srt.server_args import ServerArgs, ServerArgsError
from sglab.test import schedule_invariance as sched
from sglab.test import test_deterministic as client
from sglab.test.runners import SchedulerRunner, free_gpu_memory

GREEDY = {"temperature": 0, "max_new_tokens": 16, "ignore_eos": True}
SAMPLED = {"temperature": 0.5, "sampling_seed": 42, "max_new_tokens": 16, "ignore_eos": True}
PREFIX_LENS = [1, 31, 64, 97]
MAX_BS = 16

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


# --- drivers -----------------------------------------------------------------------------------


def _sample(out) -> tuple:
    """Token ids and the bits of their logprobs."""
    return tuple(out.output_ids), tuple(out.logprobs["output_token_logprobs_val"])


def _long_prompt(runner: SchedulerRunner, n: int = max(PREFIX_LENS), seed: int = 0) -> list[int]:
    vocab = runner.scheduler.model_config.vocab_size
    rng = random.Random(seed)
    return [rng.randrange(vocab - 64) for _ in range(n)]  # clear of the special tokens


def _generate(runner: SchedulerRunner, prompts: list[list[int]], params: dict) -> list:
    return runner.generate(prompts, params, return_logprob=True)


def single_samples(runner: SchedulerRunner, prompt: list[int], params: dict,
                   max_bs: int = MAX_BS) -> list[tuple]:
    """The prompt `bs` times in one batch, bs = 1..max_bs, from an empty cache each time."""
    samples = []
    for bs in range(1, max_bs + 1):
        assert runner.scheduler.flush_cache()
        samples += [_sample(o) for o in _generate(runner, [prompt] * bs, params)]
    return samples


def prefix_samples(runner: SchedulerRunner, prompts: list[list[int]], params: dict,
                   n_trials: int, max_bs: int = MAX_BS, seed: int = 0) -> list[list[tuple]]:
    """Per trial: flush, then one batch of random picks among `prompts`; samples per prompt."""
    rng = random.Random(seed)
    samples: list[list[tuple]] = [[] for _ in prompts]
    for _ in range(n_trials):
        assert runner.scheduler.flush_cache()
        picks = [rng.randrange(len(prompts)) for _ in range(rng.randint(1, max_bs))]
        for i, out in zip(picks, _generate(runner, [prompts[i] for i in picks], params)):
            samples[i].append(_sample(out))
    return samples


def radix_hit_samples(runner: SchedulerRunner, prompts: list[list[int]],
                      params: dict) -> list[list[tuple]]:
    """Prompts (prefixes of each other, shortest first) one at a time, so each one after the
    first hits the radix entry of the one before; then all of them in one batch, where every
    prompt longer than one token hits (a prompt's last token is always computed)."""
    assert runner.scheduler.flush_cache()
    samples: list[list[tuple]] = [[] for _ in prompts]
    for i, prompt in enumerate(prompts):
        (out,) = _generate(runner, [prompt], params)
        assert (out.cached_tokens > 0) == (i > 0), (i, out.cached_tokens)
        samples[i].append(_sample(out))
    for i, out in enumerate(_generate(runner, prompts, params)):
        assert (out.cached_tokens > 0) == (len(prompts[i]) > 1), (i, out.cached_tokens)
        samples[i].append(_sample(out))
    return samples


def _prefix_prompts(runner: SchedulerRunner) -> list[list[int]]:
    long_prompt = _long_prompt(runner)
    return [long_prompt[:n] for n in PREFIX_LENS]


def prefix_and_radix_samples(runner: SchedulerRunner, params: dict, n_trials: int,
                             max_bs: int = MAX_BS) -> list[list[tuple]]:
    """Random batch compositions, then radix hits; samples per prefix prompt."""
    prompts = _prefix_prompts(runner)
    samples = prefix_samples(runner, prompts, params, n_trials, max_bs)
    return _merge(samples, radix_hit_samples(runner, prompts, params))


def chunked_samples(chunked: SchedulerRunner, params: dict) -> list[list[tuple]]:
    """The prefix prompts in one batch on a runner that chunks prefills into 16 tokens."""
    assert chunked.server_args.chunked_prefill_size == 16
    assert chunked.scheduler.flush_cache()
    return [[_sample(o)] for o in _generate(chunked, _prefix_prompts(chunked), params)]


def _merge(*groups: list[list[tuple]]) -> list[list[tuple]]:
    return [[sample for part in parts for sample in part] for parts in zip(*groups)]


def _unique_counts(samples: list[list[tuple]]) -> list[int]:
    return [len(set(s)) for s in samples]


# --- CPU: engine ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def model_path(tiny_model_dir):
    return tiny_model_dir("tiny-qwen3")


def _cpu_runner(path: str, deterministic: bool, **kw) -> SchedulerRunner:
    return SchedulerRunner(model_path=path, attention_backend="torch_native",
                           enable_deterministic_inference=deterministic, **kw)


@pytest.fixture(scope="module")
def det_runner(model_path):
    return _cpu_runner(model_path, True)


@pytest.fixture(scope="module")
def det_chunked_runner(model_path):
    return _cpu_runner(model_path, True, chunked_prefill_size=16)


def test_single(det_runner):
    samples = single_samples(det_runner, _long_prompt(det_runner, 40, seed=1), GREEDY)
    assert len(samples) == MAX_BS * (MAX_BS + 1) // 2
    assert len(set(samples)) == 1
    assert det_runner.integrity_error() is None


@pytest.mark.parametrize("params", [GREEDY, SAMPLED], ids=["greedy", "temp0.5-seed42"])
def test_prefix_and_radix_cache(det_runner, det_chunked_runner, params):
    samples = _merge(prefix_and_radix_samples(det_runner, params, n_trials=5),
                     chunked_samples(det_chunked_runner, params))
    assert all(len(s) >= 3 for s in samples), [len(s) for s in samples]
    assert _unique_counts(samples) == [1] * len(PREFIX_LENS)
    assert len({s[0] for s in samples}) == len(PREFIX_LENS)  # the prompts do differ
    assert det_runner.integrity_error() is None


def test_same_checks_differ_without_deterministic_mode(model_path):
    """The checks above can fail: on this CPU the default kernels give different bits."""
    runner = _cpu_runner(model_path, False)
    chunked = _cpu_runner(model_path, False, chunked_prefill_size=16)
    single = single_samples(runner, _long_prompt(runner, 40, seed=1), GREEDY)
    prefix = _merge(prefix_and_radix_samples(runner, GREEDY, n_trials=3),
                    chunked_samples(chunked, GREEDY))
    counts = [len(set(single))] + _unique_counts(prefix)
    if max(counts) == 1:
        pytest.skip("the default kernels happened to be batch invariant for these shapes on "
                    "this CPU, so the deterministic-mode checks are not shown to discriminate")
    assert max(counts) > 1


def test_layers_switched_once_at_startup(det_runner, model_path):
    det_model = det_runner.scheduler.tp_worker.model_runner.model
    linears = [m for m in det_model.modules() if isinstance(m, LinearBase)]
    assert linears and all(m.batch_invariant for m in linears)
    assert det_model.logits_processor.batch_invariant
    attn = det_runner.scheduler.tp_worker.model_runner.attn_backend
    assert attn.attend is attend_batch_invariant
    default = _cpu_runner(model_path, False).scheduler.tp_worker.model_runner
    assert not any(getattr(m, "batch_invariant", False) for m in default.model.modules())
    assert default.attn_backend.attend is attend


def test_deterministic_inference_rejects_lora(model_path):
    with pytest.raises(ServerArgsError, match="--enable-deterministic-inference"):
        ServerArgs(model_path=model_path, enable_deterministic_inference=True,
                   lora_paths=[f"a={model_path}"])


# --- schedule invariance --------------------------------------------------------------------

# patch 0002 off, the PR, upstream main: how _forward_extend_unified builds its indices
INDEX_BUILDS = {"loop": {"enable_sync_free_unified_extend": False},
                "batched": {"unified_index_build": "batched"},
                "kernel": {"unified_index_build": "kernel"}}


CPU_WORKLOAD = {"num_groups": 2, "per_group": 2, "prefix_len": 20, "question_lens": (2, 12),
                "max_new_tokens": 4}


def _cpu_triton(model_path: str, deterministic: bool = True, **kw) -> SchedulerRunner:
    return SchedulerRunner(model_path=model_path, attention_backend="triton",
                           enable_deterministic_inference=deterministic, chunked_prefill_size=16,
                           **kw)


@pytest.fixture(scope="module")
def cpu_workload_reference(model_path):
    """The CPU workload and each request's bits alone (patch 0002's batched build)."""
    runner = _cpu_triton(model_path)
    workload = sched.make_workload(runner.scheduler.model_config.vocab_size, **CPU_WORKLOAD)
    return workload, sched.alone_reference(runner, workload)


@pytest.mark.parametrize("build", list(INDEX_BUILDS))
def test_schedule_invariance_triton(model_path, cpu_workload_reference, build):
    """Triton's kernels (CPU: the interpreter), chunked at 16 tokens: each request gets its
    alone-bits all at once, staggered, on a warm radix cache (and with hits on generated
    tokens) and with forced retraction; every index build gives the same bits. The builds
    differ only in prefill, so the other two run the prefill-heavy schedules."""
    workload, reference = cpu_workload_reference
    runner = _cpu_triton(model_path, **INDEX_BUILDS[build])
    schedules = sched.SCHEDULES if build == "batched" else ("all at once", "warm radix")
    _, mismatches = sched.check_schedules(runner, workload, reference, schedules)
    assert [str(m) for m in mismatches] == []
    assert runner.integrity_error() is None


def test_schedule_invariance_check_can_fail(model_path, cpu_workload_reference):
    """Without deterministic mode (2-stage extend, split-KV decode, plain GEMMs) the same
    comparison sees different bits, so the test above is not vacuous."""
    workload, reference = cpu_workload_reference
    runner = _cpu_triton(model_path, deterministic=False)
    _, mismatches = sched.check_schedules(runner, workload, reference, ("all at once",))
    assert mismatches


# --- CPU: ops ------------------------------------------------------------------------------


@pytest.mark.parametrize("k,n", [(64, 128), (64, 1024), (128, 64), (512, 1536)])
def test_linear_batch_invariant_rows(k, n):
    """A row's bits do not depend on the number of rows nor on its place among them."""
    gen = torch.Generator().manual_seed(k + n)
    weight = torch.randn(n, k, generator=gen)
    bias = torch.randn(n, generator=gen)
    rows = torch.randn(3 * ROW_CHUNK + 5, k, generator=gen)
    ref = linear_batch_invariant(rows[:1], weight, bias)[0]
    torch.testing.assert_close(ref, F.linear(rows[:1], weight, bias)[0], atol=1e-4, rtol=1e-5)
    for m in [2, 3, ROW_CHUNK - 1, ROW_CHUNK, ROW_CHUNK + 1, rows.shape[0]]:
        assert torch.equal(linear_batch_invariant(rows[:m], weight, bias)[0], ref), m
    for pos in [1, 17, ROW_CHUNK - 1, ROW_CHUNK, 2 * ROW_CHUNK + 3]:
        shuffled = rows.clone()
        shuffled[pos] = rows[0]
        assert torch.equal(linear_batch_invariant(shuffled, weight, bias)[pos], ref), pos
    batched = linear_batch_invariant(rows.view(-1, 1, k), weight, bias)
    assert batched.shape == (rows.shape[0], 1, n)


def test_matmul_fixed_tiles_matches_linear():
    """The CUDA kernel's indexing (masks, strides, tile order), run by Triton's interpreter."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(70, 100, generator=gen)
    weight = torch.randn(130, 100, generator=gen)
    torch.testing.assert_close(matmul_fixed_tiles(x, weight), F.linear(x, weight),
                               atol=1e-4, rtol=1e-5)
    x_strided = torch.randn(100, 70, generator=gen).t()
    torch.testing.assert_close(matmul_fixed_tiles(x_strided, weight),
                               F.linear(x_strided, weight), atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize("num_keys", [1, 5, 64, 97, 150])
def test_attend_batch_invariant(num_keys):
    """Matches `attend`; a query row's bits do not depend on the prefix/extend split nor on
    being computed as a decode row."""
    gen = torch.Generator().manual_seed(num_keys)
    q = torch.randn(num_keys, 4, 32, generator=gen)
    k = torch.randn(num_keys, 2, 32, generator=gen)
    v = torch.randn(num_keys, 2, 32, generator=gen)
    full = attend_batch_invariant(q, k, v, 0.2, 0, logit_cap=30.0)
    torch.testing.assert_close(full, attend(q, k, v, 0.2, 0, logit_cap=30.0),
                               atol=1e-5, rtol=1e-5)
    for prefix in sorted({1, num_keys // 3, num_keys // 2, num_keys - 1} - {0}):
        if prefix < num_keys:
            split = attend_batch_invariant(q[prefix:], k, v, 0.2, prefix, logit_cap=30.0)
            assert torch.equal(split, full[prefix:]), prefix
    for i in range(num_keys):
        row = attend_batch_invariant(q[i:i + 1], k[:i + 1], v[:i + 1], 0.2, i, logit_cap=30.0)
        assert torch.equal(row[0], full[i]), i


# --- CLI client ----------------------------------------------------------------------------


def test_client_counts_samples():
    ret = {"text": "a b", "output_ids": [5, 6],
           "meta_info": {"output_token_logprobs": [[-0.5, 5, None], [-1.25, 6, None]]}}
    other_bits = {**ret, "meta_info": {"output_token_logprobs": [[-0.5, 5, None],
                                                                 [-1.2500001, 6, None]]}}
    no_logprob = {"text": "a b", "output_ids": [5, 6], "meta_info": {}}
    keys = [client.sample_key(r) for r in (ret, dict(ret), other_bits, no_logprob)]
    assert client.count_unique(keys) == 3
    assert client.summary(keys) == "total samples: 4, Unique samples: 3"
    args = client.DeterministicArgs.from_cli_args(_parse(
        ["--test-mode", "radix_cache", "--n-trials", "3", "--port", "31000"]))
    assert (args.test_mode, args.n_trials, args.port, args.sampling_seed) == (
        "radix_cache", 3, 31000, 42)


def _parse(argv: list[str]):
    import argparse

    parser = argparse.ArgumentParser()
    client.DeterministicArgs.add_cli_args(parser)
    return parser.parse_args(argv)


SERVER_ARGS = ["--skip-server-warmup", "--enable-deterministic-inference"]


def test_client_against_server(server, capsys):
    port = int(server.base_url.rsplit(":", 1)[1])
    base = ["--port", str(port), "--max-new-tokens", "8", "--return-logprob"]
    assert client.main([*base, "--test-mode", "single", "--n-trials", "6"]) == [1]
    assert "Total samples: 21, Unique samples: 1" in capsys.readouterr().out
    assert client.main([*base, "--test-mode", "mixed", "--n-trials", "12"]) == [1, 1, 1]
    out = capsys.readouterr().out
    assert "Long prompt: total samples: " in out and out.count("Unique samples: 1") == 3
    prefix = ["--prefix-lengths", "1", "150", "400", "--n-start", "3"]
    assert client.main([*base, "--test-mode", "prefix", "--n-trials", "3", *prefix,
                        "--temperature", "0.5"]) == [1, 1, 1]
    assert "Prompt 2 with prefix length 400: total samples: " in capsys.readouterr().out
    assert client.main([*base, "--test-mode", "radix_cache", "--n-trials", "2", *prefix]) == [1]
    assert "Total samples: 4, Unique samples: 1" in capsys.readouterr().out
    assert client.main([*base, "--test-mode", "p_vs_d", "--n-trials", "3"]) == [1] * 6
    assert "Matching sequences: 6/6" in capsys.readouterr().out


# --- GPU: triton backend, bf16 -------------------------------------------------------------


def gpu_samples(path: str, deterministic: bool, n_trials: int = 4) -> tuple[list, list]:
    """(single samples, per-prefix-prompt samples for greedy and for seeded sampling), from a
    triton bf16 runner with CUDA graphs and then a chunking one (one runner on the GPU at a
    time: each sizes its KV pool from the free memory)."""
    runner = _gpu_runner(path, deterministic)
    single = single_samples(runner, _long_prompt(runner, 40, seed=1), GREEDY)
    prefix = [prefix_and_radix_samples(runner, p, n_trials) for p in (GREEDY, SAMPLED)]
    assert runner.integrity_error() is None
    del runner
    free_gpu_memory()
    chunked = _gpu_runner(path, deterministic, chunked_prefill_size=16)
    prefix = [_merge(samples, chunked_samples(chunked, p))
              for samples, p in zip(prefix, (GREEDY, SAMPLED))]
    del chunked
    free_gpu_memory()
    return single, prefix


def _gpu_runner(path: str, deterministic: bool, **kw) -> SchedulerRunner:
    # A small KV pool: the idle integrity check walks every slot.
    kw = {"cuda_graph_max_bs": MAX_BS, **kw}
    return SchedulerRunner(model_path=path, device="cuda", dtype="bfloat16",
                           attention_backend="triton", max_total_tokens=32768,
                           enable_deterministic_inference=deterministic, **kw)


@pytest.mark.gpu
@cuda
@pytest.mark.parametrize("preset", ["tiny-qwen3", "tiny-llama"])
def test_gpu_single_and_prefix(tiny_model_dir, preset):
    free_gpu_memory()
    single, prefix = gpu_samples(tiny_model_dir(preset), True)
    assert len(single) == MAX_BS * (MAX_BS + 1) // 2
    assert len(set(single)) == 1
    for params, samples in zip((GREEDY, SAMPLED), prefix):
        assert _unique_counts(samples) == [1] * len(PREFIX_LENS), params


@pytest.mark.gpu
@cuda
def test_gpu_matmul_fixed_tiles_rows():
    gen = torch.Generator(device="cuda").manual_seed(0)
    for dtype in (torch.bfloat16, torch.float32):
        weight = torch.randn(1000, 512, generator=gen, device="cuda").to(dtype)
        rows = torch.randn(300, 512, generator=gen, device="cuda").to(dtype)
        ref = matmul_fixed_tiles(rows[:1], weight)[0]
        torch.testing.assert_close(ref, F.linear(rows[:1], weight)[0], atol=2e-2, rtol=2e-2)
        for m in [2, 7, 64, 129, 300]:
            assert torch.equal(matmul_fixed_tiles(rows[:m], weight)[0], ref), (dtype, m)
        for pos in [1, 63, 64, 200, 299]:
            shuffled = rows.clone()
            shuffled[pos] = rows[0]
            assert torch.equal(matmul_fixed_tiles(shuffled, weight)[pos], ref), (dtype, pos)


@pytest.mark.gpu
@cuda
def test_gpu_checks_differ_without_deterministic_mode(tiny_model_dir):
    free_gpu_memory()
    single, prefix = gpu_samples(tiny_model_dir("tiny-qwen3"), False)
    counts = [len(set(single))] + [c for samples in prefix for c in _unique_counts(samples)]
    if max(counts) == 1:
        pytest.skip("the default GPU kernels gave identical bits for these tiny shapes, so the "
                    "GPU checks are not shown to discriminate here")
    assert max(counts) > 1


GPU_WORKLOAD = {"num_groups": 3, "per_group": 12, "prefix_len": 600, "question_lens": (8, 200),
                "max_new_tokens": 24}


def _gpu_real_shape_runner(path: str, build: str, **kw) -> SchedulerRunner:
    """The qwen3-0.6b shape (dummy weights, bf16), chunked at 512 tokens, decode batches above
    the largest CUDA graph (16), overlap on."""
    return _gpu_runner(path, True, load_format="dummy", chunked_prefill_size=512,
                       cuda_graph_max_bs=16, **INDEX_BUILDS[build], **kw)


@pytest.mark.gpu
@cuda
def test_gpu_schedule_invariance_for_every_index_build(tmp_path):
    """Real hidden sizes: every request gets the bits it gets alone, all at once, staggered,
    on a warm radix cache (with hits on generated tokens) and with forced retraction, for every
    `_forward_extend_unified` index build (patch 0002 off, batched, kernel); the builds agree
    (one reference for all three)."""
    from sglab.srt.utils.dummy_model import make_dummy_model

    path = make_dummy_model("qwen3-0.6b", str(tmp_path / "m"), weights=False)
    reference, failures = None, {}
    for build in INDEX_BUILDS:
        free_gpu_memory()
        runner = _gpu_real_shape_runner(path, build)
        workload = sched.make_workload(runner.scheduler.model_config.vocab_size,
                                       **GPU_WORKLOAD)
        reference, mismatches = sched.check_schedules(runner, workload, reference)
        failures[build] = [str(m) for m in mismatches]
        assert runner.integrity_error() is None
        del runner
    assert failures == {build: [] for build in INDEX_BUILDS}


@pytest.mark.gpu
@cuda
def test_gpu_schedule_invariance_check_can_fail(tmp_path):
    """The same comparison without deterministic mode (cuBLAS GEMMs, 2-stage extend, split-KV
    decode whose split count follows the batch) sees other bits, so the test above can fail."""
    from sglab.srt.utils.dummy_model import make_dummy_model

    path = make_dummy_model("qwen3-0.6b", str(tmp_path / "m"), weights=False)
    free_gpu_memory()
    runner = _gpu_runner(path, False, load_format="dummy", chunked_prefill_size=512,
                         cuda_graph_max_bs=16)
    workload = sched.make_workload(runner.scheduler.model_config.vocab_size, **GPU_WORKLOAD)
    _, mismatches = sched.check_schedules(runner, workload, schedules=("all at once",))
    assert mismatches
    del runner
