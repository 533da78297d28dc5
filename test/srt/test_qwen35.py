"""Qwen3.5 hybrid models on CPU (Gated DeltaNet + gated attention): HF parity, batch invariance,
chunked prefill, retraction, the prefix cache of recurrent state (extra_buffer and no_buffer,
overlap on and off), CUDA-graph plumbing, memory layout and bad input, all through the
scheduler driven in-process; HF transformers' torch path is the reference."""

from __future__ import annotations

import json
import logging
import os
import random
import shutil

import pytest
import torch

from sglab.srt.configs.model_config import ModelConfig
from sglab.srt.model_executor.cuda_graph_runner import CudaGraphRunner, EagerGraph
from sglab.srt.server_args import ServerArgs, ServerArgsError
from sglab.test.runners import HFRunner, SchedulerRunner

GREEDY = {"temperature": 0, "max_new_tokens": 32, "ignore_eos": True}
PRESET = "tiny-qwen3.5"
INTERVAL = 16  # --mamba-track-interval of the prefix-cache tests (divides the 64-token chunk)


def _prompts(lens: list[int], seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(1000) for _ in range(n)] for n in lens]


@pytest.fixture(scope="module")
def path(tiny_model_dir):
    return tiny_model_dir(PRESET)


@pytest.fixture(scope="module")
def hf(path):
    return HFRunner(path)


def _idle_ok(runner: SchedulerRunner) -> None:
    assert runner.integrity_error() is None


def test_logits_logprobs_and_greedy_match_hf(path, hf):
    runner = SchedulerRunner(model_path=path)
    prompts = _prompts([5, 70, 130])  # 130: the chunked rule over 3 chunks of 64
    outs = runner.generate(prompts, GREEDY, return_logprob=True, logprob_start_len=0,
                           top_logprobs_num=3)
    for prompt, out in zip(prompts, outs):
        ref = torch.log_softmax(hf.logits(prompt), dim=-1)
        got = out.logprobs["input_token_logprobs_val"]
        expect = ref[torch.arange(len(prompt) - 1), torch.tensor(prompt[1:])]
        torch.testing.assert_close(torch.tensor(got[1:]), expect, atol=2e-5, rtol=1e-4)
        top = torch.tensor(out.logprobs["input_top_logprobs_val"][1:])
        torch.testing.assert_close(top, ref[:-1].topk(3, dim=-1).values, atol=2e-5, rtol=1e-4)
        assert out.output_ids == hf.greedy(prompt, 32)
    _idle_ok(runner)


def test_next_token_logits_of_a_batch_match_hf(path, hf):
    runner = SchedulerRunner(model_path=path)
    prompts = _prompts([3, 12, 40, 65], seed=1)
    sched = runner.scheduler
    for p in prompts:
        runner.submit(p, {"max_new_tokens": 1, "temperature": 0})
    batch = sched.get_new_batch_prefill()
    result = sched.tp_worker.forward_batch_generation(batch.get_model_worker_batch())
    logits = result.logits_output.next_token_logits
    for i, p in enumerate(prompts):
        torch.testing.assert_close(logits[i], hf.logits(p)[-1], atol=1e-4, rtol=1e-4)


def test_batch_invariance(path):
    runner = SchedulerRunner(model_path=path, disable_radix_cache=True)
    prompts = _prompts([3, 50, 7, 23, 64, 1, 15, 31], seed=3)
    batched = runner.generate(prompts, GREEDY)
    for prompt, out in zip(prompts, batched):
        (alone,) = runner.generate([prompt], GREEDY)
        assert alone.output_ids == out.output_ids
    _idle_ok(runner)


def test_chunked_prefill_matches_unchunked(path):
    """Chunks of 16 carry the recurrent and conv state from one chunk to the next."""
    prompts = _prompts([70, 5, 33, 130], seed=7)
    ref = SchedulerRunner(model_path=path, chunked_prefill_size=-1).generate(prompts, GREEDY)
    runner = SchedulerRunner(model_path=path, chunked_prefill_size=16)
    outs = runner.generate(prompts, GREEDY, return_logprob=True, logprob_start_len=0)
    assert [o.output_ids for o in outs] == [o.output_ids for o in ref]
    for prompt, out in zip(prompts, outs):
        assert out.logprobs["input_token_logprobs_idx"] == prompt
    assert runner.scheduler.forward_ct > len(ref[0].output_ids) + 130 // 16
    _idle_ok(runner)


@pytest.mark.parametrize("cache", [
    {"disable_radix_cache": True},
    {"mamba_scheduler_strategy": "extra_buffer", "mamba_track_interval": INTERVAL},
], ids=["no-cache", "extra_buffer"])
def test_retraction_keeps_outputs(path, cache):
    """A retracted request's state slots go back (or, cached, into the tree) and its re-prefill
    resumes to the same tokens."""
    prompts = _prompts([40, 45, 50, 55, 60, 35], seed=8)
    params = {**GREEDY, "max_new_tokens": 48}
    ref = SchedulerRunner(model_path=path, disable_radix_cache=True).generate(prompts, params)
    runner = SchedulerRunner(model_path=path, max_total_tokens=360, **cache)
    outs = runner.generate(prompts, params)
    assert sum(o.total_retractions for o in outs) > 0
    assert [o.output_ids for o in outs] == [o.output_ids for o in ref]
    _idle_ok(runner)


# --- prefix cache of recurrent state ----------------------------------------------------------

EXTRA = {"mamba_scheduler_strategy": "extra_buffer", "mamba_track_interval": INTERVAL}


@pytest.fixture(scope="module")
def cold_outputs(path):
    """Greedy outputs of the prefix-cache prompts, cache off (the oracle)."""
    def run(prompts):
        runner = SchedulerRunner(model_path=path, disable_radix_cache=True)
        return [o.output_ids for o in runner.generate(prompts, GREEDY)]
    return run


@pytest.mark.parametrize("overlap", [False, True], ids=["normal", "overlap"])
@pytest.mark.parametrize("mode", ["pr", "host"])
def test_extra_buffer_prefix_hit(path, cold_outputs, overlap, mode):
    """A request sharing a long prefix with a finished one resumes from a cached snapshot: at
    the prefill's chunk boundary (128 of 150 shared tokens), or, sharing the first request's
    generated tokens too, at its last decode snapshot (a multiple of the track interval)."""
    shared, tails = _prompts([150], seed=4)[0], _prompts([10, 7, 5], seed=5)
    first = shared + tails[0]
    runner = SchedulerRunner(model_path=path, disable_overlap_schedule=not overlap,
                             mamba_track_setup=mode, **EXTRA)
    (done,) = runner.generate([first], GREEDY)
    second = shared + tails[1]
    continued = first + done.output_ids[:20] + tails[2]
    hits = runner.generate([second, continued], GREEDY)
    assert hits[0].cached_tokens == 128
    last_snapshot = (len(first) + 31) // INTERVAL * INTERVAL  # 32 tokens fed: 160 + 31
    assert hits[1].cached_tokens == min(last_snapshot, len(first) + 20) // INTERVAL * INTERVAL
    assert hits[1].cached_tokens > 128 and hits[1].cached_tokens % INTERVAL == 0
    assert [h.output_ids for h in hits] == cold_outputs([second, continued])
    _idle_ok(runner)


def test_no_buffer_caches_whole_sequences(path, cold_outputs):
    """no_buffer (the default strategy): a finished request leaves its whole sequence with its
    live state; a request that extends it resumes there. Overlap scheduling is off."""
    first = _prompts([40], seed=9)[0]
    runner = SchedulerRunner(model_path=path)
    assert runner.server_args.mamba_scheduler_strategy == "no_buffer"
    assert not runner.scheduler.enable_overlap
    (done,) = runner.generate([first], GREEDY)
    longer = first + done.output_ids[:-1] + [7, 8, 9]
    (hit,) = runner.generate([longer], GREEDY)
    assert hit.cached_tokens == len(first) + len(done.output_ids) - 1
    assert hit.output_ids == cold_outputs([longer])[0]
    _idle_ok(runner)


def test_state_slots_budget_admission(path, cold_outputs):
    """With few state slots, admission waits for slots (never over-allocates) and every
    request still gets its tokens."""
    prompts = _prompts([20, 25, 30, 35, 40, 45], seed=10)
    runner = SchedulerRunner(model_path=path, max_mamba_cache_size=6,
                             disable_overlap_schedule=True, **EXTRA)
    sched = runner.scheduler
    assert sched.max_running_requests == 6 // 4  # ratio 3 + one track slot (no overlap)
    for p in prompts:
        runner.submit(p, GREEDY)
    peak = 0
    while sched.run_step() or not sched.is_idle():  # a step may wait for slots to come back
        peak = max(peak, len(sched.running_batch.reqs))
    outs = runner.collect()
    assert peak <= sched.max_running_requests
    assert [o.output_ids for o in outs.values()] == cold_outputs(prompts)
    _idle_ok(runner)


# --- CUDA-graph plumbing ----------------------------------------------------------------------


def _graph_runner(path: str, graph: bool, **kw) -> SchedulerRunner:
    runner = SchedulerRunner(model_path=path, attention_backend="triton",
                             enable_deterministic_inference=True, cuda_graph_max_bs=4,
                             mamba_scheduler_strategy="extra_buffer", **kw)
    if graph:
        mr = runner.scheduler.tp_worker.model_runner
        mr.graph_runner = CudaGraphRunner(mr, graph_factory=EagerGraph)
    return runner


@pytest.mark.parametrize("overlap", [True, False], ids=["overlap", "normal"])
def test_graph_decode_with_state_slots_equals_eager(path, overlap):
    """Decode steps through the graph runner (EagerGraph on CPU): the state slots come from the
    request rows inside the graph, the track mask and slots through the participant's static
    buffers, padding rows hit slot 0 only; tokens and the cached snapshots equal eager steps."""
    shared = _prompts([30], seed=11)[0]
    prompts = [shared + t for t in _prompts([3, 5, 9], seed=12)]
    tail = _prompts([12], seed=13)[0]
    kw = {"disable_overlap_schedule": not overlap, "mamba_track_interval": 4}
    params = {**GREEDY, "max_new_tokens": 6}  # decode snapshots at lengths 36 and 40
    outs = {}
    for graph in (False, True):
        runner = _graph_runner(path, graph, **kw)
        first = runner.generate(prompts, params)
        hit = runner.generate([prompts[0] + first[0].output_ids[:4] + tail], params)
        outs[graph] = ([o.output_ids for o in first + hit], hit[0].cached_tokens)
        if graph:
            pool = runner.scheduler.req_to_token_pool.mamba_pool
            assert runner.scheduler.tp_worker.model_runner.graph_runner.graphs
            assert 0 not in pool.free_slots.tolist()
        _idle_ok(runner)
    assert outs[True] == outs[False] and outs[True][1] == 36  # the first request's snapshot


# --- memory -----------------------------------------------------------------------------------


def test_pools_hold_full_attention_kv_and_state_slots(path):
    runner = SchedulerRunner(model_path=path, max_total_tokens=512, **EXTRA)
    mr = runner.scheduler.tp_worker.model_runner
    kv = mr.token_to_kv_pool
    assert kv.full_attention_layer_id_mapping == {1: 0, 3: 1} and len(kv.k_buffer) == 2
    pool = mr.req_to_token_pool.mamba_pool
    conv, temporal = pool.mamba_cache.conv[0], pool.mamba_cache.temporal
    assert conv.shape == (2, pool.size + 1, 2 * 32 + 64, 3)  # 2 linear layers, conv_dim, K - 1
    assert temporal.shape == (2, pool.size + 1, 4, 16, 16) and temporal.dtype == torch.float32
    assert mr.max_running_requests <= pool.size // mr.mamba_ratio() and mr.mamba_ratio() == 5
    # The memory split: the state pool takes ratio / (1 + ratio) of what is left.
    slot = mr.mamba_slot_bytes()
    rest = 40 * slot
    left = mr.handle_max_mamba_cache(rest)
    assert mr.max_mamba_cache_size == int(rest * 0.9 / 1.9) // slot and left == rest - 18 * slot


def test_vision_language_checkpoint_serves_its_text_model(path, tmp_path, caplog):
    """The text weights of a Qwen3_5ForConditionalGeneration checkpoint (model.language_model.*)
    load; the vision tower's are skipped with a log line; logits equal the text checkpoint's."""
    from safetensors.torch import load_file, save_file

    vl = tmp_path / "vl"
    shutil.copytree(path, vl)
    tensors = load_file(os.path.join(path, "model.safetensors"))
    renamed = {k.replace("model.", "model.language_model.", 1) if k.startswith("model.") else k:
               v for k, v in tensors.items()}
    renamed["model.visual.blocks.0.attn.qkv.weight"] = torch.randn(96, 32)
    renamed["model.visual.merger.linear_fc1.weight"] = torch.randn(32, 32)
    save_file(renamed, str(vl / "model.safetensors"), metadata={"format": "pt"})
    text_config = json.loads((vl / "config.json").read_text())
    config = {"architectures": ["Qwen3_5ForConditionalGeneration"], "model_type": "qwen3_5",
              "text_config": text_config, "vision_config": {"depth": 1, "hidden_size": 32},
              "tie_word_embeddings": False}
    (vl / "config.json").write_text(json.dumps(config))
    prompts = _prompts([9, 30], seed=14)
    with caplog.at_level(logging.INFO):
        got = SchedulerRunner(model_path=str(vl)).generate(prompts, GREEDY, return_logprob=True)
    assert any("Skipped 2 weights of the vision tower" in r.message for r in caplog.records)
    want = SchedulerRunner(model_path=path).generate(prompts, GREEDY, return_logprob=True)
    assert [o.output_ids for o in got] == [o.output_ids for o in want]
    assert [o.logprobs for o in got] == [o.logprobs for o in want]


# --- bad input --------------------------------------------------------------------------------


def test_unsupported_layer_type_is_a_startup_error_naming_the_flag(path, tmp_path):
    bad = tmp_path / "bad"
    shutil.copytree(path, bad)
    config = json.loads((bad / "config.json").read_text())
    config["layer_types"][2] = "sliding_attention"
    (bad / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"--model-path.*layer_types\[2\].*sliding_attention"):
        ModelConfig(str(bad))
    config["layer_types"][2] = "bogus"
    (bad / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="--model-path: invalid config.json"):
        ModelConfig(str(bad))


@pytest.mark.parametrize("kwargs,flag", [
    ({"mamba_scheduler_strategy": "extra_buffer", "disable_radix_cache": True},
     "--mamba-scheduler-strategy extra_buffer"),
    ({"mamba_scheduler_strategy": "extra_buffer", "page_size": 16, "mamba_track_interval": 24},
     r"--mamba-track-interval \(24\) must be a multiple of --page-size \(16\)"),
    ({"mamba_scheduler_strategy": "extra_buffer", "mamba_track_interval": 1},
     "--mamba-track-interval must be at least 2"),
    ({"mamba_scheduler_strategy": "bogus"}, "--mamba-scheduler-strategy: invalid choice"),
    ({"mamba_ssm_dtype": "int8"}, "--mamba-ssm-dtype: invalid choice"),
    ({"mamba_full_memory_ratio": 0.0}, "--mamba-full-memory-ratio must be positive"),
    ({"enable_hisparse": True, "disable_radix_cache": True}, "--enable-hisparse serves GQA"),
])
def test_bad_mamba_arguments_name_the_flag(path, kwargs, flag):
    with pytest.raises(ServerArgsError, match=flag):
        ServerArgs(model_path=path, **kwargs)


def test_no_buffer_with_radix_cache_forces_page_1_and_no_overlap(path):
    args = ServerArgs(model_path=path, page_size=16)
    assert (args.mamba_scheduler_strategy, args.page_size) == ("no_buffer", 1)
    assert args.disable_overlap_schedule
    args = ServerArgs(model_path=path, disable_radix_cache=True, page_size=16)
    assert (args.page_size, args.disable_overlap_schedule) == (16, False)


# --- GPU --------------------------------------------------------------------------------------

gpu = pytest.mark.gpu
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@gpu
@needs_cuda
def test_gpu_parity_through_fla_and_triton_kernels(path, hf):
    """On CUDA the Gated DeltaNet layers run fla-core's chunked prefill and sglab's Triton
    decode step and conv: fp32 greedy tokens equal HF's, bf16 prompt logprobs are close."""
    prompts = _prompts([5, 70, 130], seed=15)
    fp32 = SchedulerRunner(model_path=path, device="cuda", dtype="float32",
                           disable_cuda_graph=True)
    for prompt, out in zip(prompts, fp32.generate(prompts, GREEDY)):
        assert out.output_ids == hf.greedy(prompt, 32)
    bf16 = SchedulerRunner(model_path=path, device="cuda", dtype="bfloat16", **EXTRA)
    outs = bf16.generate(prompts, {**GREEDY, "max_new_tokens": 1}, return_logprob=True,
                         logprob_start_len=0)
    for prompt, out in zip(prompts, outs):
        ref = torch.log_softmax(hf.logits(prompt), dim=-1)
        expect = ref[torch.arange(len(prompt) - 1), torch.tensor(prompt[1:])]
        torch.testing.assert_close(torch.tensor(out.logprobs["input_token_logprobs_val"][1:]),
                                   expect, atol=5e-2, rtol=5e-2)
    _idle_ok(bf16)


@gpu
@needs_cuda
def test_gpu_9b_shape_serves_with_graphs_and_overlap(tiny_model_dir, tmp_path):
    """The qwen3.5-9b shape (dummy weights, bf16, deterministic mode so a batch cannot change
    a row's bits): CUDA graphs + overlap + extra_buffer give the tokens of the eager, normal
    loop; a shared prefix is served from a cached snapshot."""
    from sglab.srt.utils.dummy_model import make_dummy_model

    path9 = make_dummy_model("qwen3.5-9b", str(tmp_path / "qwen3.5-9b"))
    prompts = _prompts([300, 40, 129, 7], seed=16)
    again = [prompts[0][:256] + [1, 2, 3]]
    common = {"model_path": path9, "device": "cuda", "load_format": "dummy",
              "dtype": "bfloat16", "enable_deterministic_inference": True,
              "mamba_scheduler_strategy": "extra_buffer", "mamba_track_interval": 64,
              "max_total_tokens": 32768, "max_mamba_cache_size": 64, "cuda_graph_max_bs": 8}
    outs = {}
    for name, kw in (("graph+overlap", {}),
                     ("eager", {"disable_cuda_graph": True, "disable_overlap_schedule": True})):
        runner = SchedulerRunner(**common, **kw)
        first = runner.generate(prompts, {**GREEDY, "max_new_tokens": 80})
        hit = runner.generate(again, {**GREEDY, "max_new_tokens": 16})
        outs[name] = [o.output_ids for o in first + hit]
        assert hit[0].cached_tokens == 256
        _idle_ok(runner)
        if name == "graph+overlap":
            assert runner.scheduler.tp_worker.model_runner.graph_runner.graphs
        del runner
        torch.cuda.empty_cache()
    assert outs["graph+overlap"] == outs["eager"]
