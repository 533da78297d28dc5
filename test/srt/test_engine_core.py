"""Engine core on CPU: HF parity, batch invariance, radix cache, chunked prefill, retraction,
logprobs and integrity, all through the scheduler driven in-process."""

from __future__ import annotations

import random

import pytest
import torch

from sglab.srt.managers.io_struct import AbortReq, TokenizedGenerateReqInput
from sglab.srt.sampling.sampling_params import SamplingParams
from sglab.test.runners import HFRunner, SchedulerRunner

GREEDY = {"temperature": 0, "max_new_tokens": 32, "ignore_eos": True}


def _prompts(vocab_size: int, lens: list[int], seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(vocab_size) for _ in range(n)] for n in lens]


@pytest.fixture(scope="module", params=["tiny-qwen3", "tiny-llama", "tiny-qwen2"])
def model_and_hf(request, tiny_model_dir):
    path = tiny_model_dir(request.param)
    return path, HFRunner(path)


def _check_idle(runner: SchedulerRunner) -> None:
    assert runner.integrity_error() is None


def test_logits_and_greedy_match_hf(model_and_hf):
    path, hf = model_and_hf
    runner = SchedulerRunner(model_path=path)
    prompts = _prompts(runner.scheduler.model_config.vocab_size, [5, 17, 33, 9])
    outs = runner.generate(prompts, GREEDY, return_logprob=True, logprob_start_len=0,
                           top_logprobs_num=5)
    for prompt, out in zip(prompts, outs):
        ref_logprobs = torch.log_softmax(hf.logits(prompt), dim=-1)
        got = out.logprobs["input_token_logprobs_val"]
        assert got[0] is None
        expect = ref_logprobs[torch.arange(len(prompt) - 1), torch.tensor(prompt[1:])]
        torch.testing.assert_close(torch.tensor(got[1:]), expect, atol=2e-5, rtol=1e-4)
        # Top logprobs are the whole distribution's head: compare values row by row.
        top = torch.tensor(out.logprobs["input_top_logprobs_val"][1:])
        torch.testing.assert_close(top, ref_logprobs[:-1].topk(5, dim=-1).values,
                                   atol=2e-5, rtol=1e-4)
        assert out.output_ids == hf.greedy(prompt, 32)
    _check_idle(runner)


def test_next_token_logits_match_hf(model_and_hf):
    path, hf = model_and_hf
    runner = SchedulerRunner(model_path=path)
    prompts = _prompts(runner.scheduler.model_config.vocab_size, [3, 12, 40], seed=1)
    sched = runner.scheduler
    for p in prompts:
        runner.submit(p, {"max_new_tokens": 1, "temperature": 0})
    batch = sched.get_new_batch_prefill()
    assert batch.batch_size() == len(prompts)
    result = sched.tp_worker.forward_batch_generation(batch.get_model_worker_batch())
    logits = result.logits_output.next_token_logits
    for i, p in enumerate(prompts):
        torch.testing.assert_close(logits[i], hf.logits(p)[-1], atol=1e-4, rtol=1e-4)


def test_output_logprobs_match_hf(model_and_hf):
    path, hf = model_and_hf
    runner = SchedulerRunner(model_path=path)
    prompt = _prompts(runner.scheduler.model_config.vocab_size, [11], seed=2)[0]
    (out,) = runner.generate([prompt], {**GREEDY, "max_new_tokens": 6}, return_logprob=True,
                             top_logprobs_num=3)
    full = prompt + out.output_ids
    ref = torch.log_softmax(hf.logits(full), dim=-1)
    n = len(prompt)
    expect = [ref[n - 1 + j, t].item() for j, t in enumerate(out.output_ids)]
    torch.testing.assert_close(torch.tensor(out.logprobs["output_token_logprobs_val"]),
                               torch.tensor(expect), atol=2e-5, rtol=1e-4)
    assert out.logprobs["output_token_logprobs_idx"] == out.output_ids
    # logprob_start_len = -1: no prompt logprobs.
    assert out.logprobs.get("input_token_logprobs_val", []) == []


@pytest.fixture(scope="module")
def qwen3_path(tiny_model_dir):
    return tiny_model_dir("tiny-qwen3")


def test_batch_invariance(qwen3_path):
    runner = SchedulerRunner(model_path=qwen3_path)
    prompts = _prompts(runner.scheduler.model_config.vocab_size,
                       [3, 50, 7, 23, 64, 1, 15, 31], seed=3)
    batched = runner.generate(prompts, GREEDY)
    for prompt, out in zip(prompts, batched):
        (alone,) = runner.generate([prompt], GREEDY)
        assert alone.output_ids == out.output_ids
    _check_idle(runner)


@pytest.mark.parametrize("page_size", [1, 16])
def test_radix_cache_hit(qwen3_path, page_size):
    vocab = 1000
    shared = _prompts(vocab, [64], seed=4)[0]
    first = shared + _prompts(vocab, [10], seed=5)[0]
    second = shared + _prompts(vocab, [7], seed=6)[0]
    runner = SchedulerRunner(model_path=qwen3_path, page_size=page_size)
    runner.generate([first], GREEDY)
    (hit,) = runner.generate([second], GREEDY)
    assert hit.cached_tokens >= 64
    _check_idle(runner)
    nocache = SchedulerRunner(model_path=qwen3_path, disable_radix_cache=True,
                              page_size=page_size)
    (cold,) = nocache.generate([second], GREEDY)
    assert cold.cached_tokens == 0
    assert cold.output_ids == hit.output_ids
    _check_idle(nocache)


@pytest.mark.parametrize("page_size", [1, 16])
def test_chunked_prefill_matches_unchunked(qwen3_path, page_size):
    prompts = _prompts(1000, [70, 5, 33, 130], seed=7)
    ref = SchedulerRunner(model_path=qwen3_path, chunked_prefill_size=-1).generate(
        prompts, GREEDY)
    runner = SchedulerRunner(model_path=qwen3_path, chunked_prefill_size=16,
                             page_size=page_size)
    outs = runner.generate(prompts, GREEDY, return_logprob=True, logprob_start_len=0)
    assert [o.output_ids for o in outs] == [o.output_ids for o in ref]
    for prompt, out in zip(prompts, outs):
        assert len(out.logprobs["input_token_logprobs_val"]) == len(prompt)
        assert out.logprobs["input_token_logprobs_idx"] == prompt
    assert runner.scheduler.forward_ct > len(ref[0].output_ids)
    _check_idle(runner)


@pytest.mark.parametrize("chunk,page_size", [(-1, 1), (16, 1), (16, 16)])
def test_prompt_logprobs_same_with_cache_hit(qwen3_path, chunk, page_size):
    """A cached prefix never drops or changes prompt logprobs, whatever logprob_start_len."""
    prompt = list(range(100))
    params = {"temperature": 0, "max_new_tokens": 4}
    cold = SchedulerRunner(model_path=qwen3_path, disable_radix_cache=True,
                           chunked_prefill_size=chunk, page_size=page_size)
    warm = SchedulerRunner(model_path=qwen3_path, chunked_prefill_size=chunk,
                           page_size=page_size)
    warm.generate([prompt], params)  # caches the whole prompt
    for start in (0, 1, 17, 50, 64, 99):
        kwargs = {"return_logprob": True, "logprob_start_len": start, "top_logprobs_num": 2}
        (ref,) = cold.generate([prompt], params, **kwargs)
        (hit,) = warm.generate([prompt], params, **kwargs)
        assert hit.cached_tokens > 0 or start <= 1
        assert hit.logprobs["input_token_logprobs_idx"] == prompt[start:]
        assert hit.logprobs["input_token_logprobs_idx"] == ref.logprobs["input_token_logprobs_idx"]
        for name in ("input_token_logprobs_val", "input_top_logprobs_val"):
            got, want = hit.logprobs[name], ref.logprobs[name]
            assert len(got) == len(want) == len(prompt) - start
            assert (got[0] is None) == (want[0] is None) == (start == 0)
            torch.testing.assert_close(torch.tensor(got[start == 0:]),
                                       torch.tensor(want[start == 0:]), atol=1e-5, rtol=1e-5)
        assert hit.logprobs["input_top_logprobs_idx"] == ref.logprobs["input_top_logprobs_idx"]
        assert hit.output_ids == ref.output_ids
    _check_idle(warm)
    _check_idle(cold)


def test_retraction_keeps_outputs(qwen3_path):
    prompts = _prompts(1000, [40, 45, 50, 55, 60, 35], seed=8)
    params = {**GREEDY, "max_new_tokens": 48}
    ref = SchedulerRunner(model_path=qwen3_path).generate(prompts, params)
    runner = SchedulerRunner(model_path=qwen3_path, max_total_tokens=360,
                             disable_radix_cache=True)
    outs = runner.generate(prompts, params)
    assert sum(o.total_retractions for o in outs) > 0
    assert [o.output_ids for o in outs] == [o.output_ids for o in ref]
    _check_idle(runner)


def test_abort_all_with_test_retraction(qwen3_path, monkeypatch):
    """Upstream's SGLANG_TEST_RETRACT hooks: a forced retraction every 3rd step and no prefill
    past 2 running requests leave retracted requests queued with partial outputs; abort_all
    ends them "in waiting queue" with those outputs and their logprobs."""
    monkeypatch.setenv("SGLANG_TEST_RETRACT", "True")
    monkeypatch.setenv("SGLANG_TEST_RETRACT_NO_PREFILL_BS", "2")
    runner = SchedulerRunner(model_path=qwen3_path)
    prompts = _prompts(1000, [8, 9, 10, 11, 12], seed=11)
    rids = [runner.submit(p, {**GREEDY, "max_new_tokens": 200}, return_logprob=True)
            for p in prompts]
    for _ in range(8):
        runner.scheduler.run_step()
    queued = [r for r in runner.scheduler.waiting_queue if r.output_ids]
    assert queued and all(r.total_retractions > 0 for r in queued)
    runner.scheduler.abort_request(AbortReq(abort_all=True))
    outs = runner.run()
    assert all(outs[r].finish_reason["type"] == "abort" for r in rids)
    for req in queued:
        out = outs[req.rid]
        assert out.finish_reason["message"] == "Abort in waiting queue"
        assert out.output_ids == req.output_ids
        assert len(out.logprobs["output_token_logprobs_val"]) == len(out.output_ids)
    _check_idle(runner)


def test_stop_conditions(qwen3_path):
    runner = SchedulerRunner(model_path=qwen3_path)
    prompt = _prompts(1000, [12], seed=9)[0]
    (free,) = runner.generate([prompt], {**GREEDY, "max_new_tokens": 10})
    stop_id = free.output_ids[4]
    first = free.output_ids.index(stop_id)
    (stopped,) = runner.generate([prompt], {"temperature": 0, "max_new_tokens": 10,
                                            "stop_token_ids": [stop_id]})
    assert stopped.output_ids == free.output_ids[:first + 1]
    assert stopped.finish_reason == {"type": "stop", "matched": stop_id}
    (unsampled,) = runner.generate([prompt], {**GREEDY, "max_new_tokens": 10,
                                              "stop_token_ids": [10**6, -1]})
    assert unsampled.output_ids == free.output_ids  # ids outside the vocabulary never stop
    text = runner.tokenizer.decode(free.output_ids[first + 1:first + 3])
    if text.strip():
        (by_str,) = runner.generate([prompt], {"temperature": 0, "max_new_tokens": 10,
                                               "stop": text.strip()})
        assert by_str.finish_reason == {"type": "stop", "matched": text.strip()}
        assert len(by_str.output_ids) <= first + 3
    (length,) = runner.generate([prompt], {**GREEDY, "max_new_tokens": 3})
    assert length.finish_reason == {"type": "length", "length": 3}
    (zero,) = runner.generate([prompt], {"max_new_tokens": 0})
    assert zero.output_ids == [] and zero.finish_reason == {"type": "length", "length": 0}
    _check_idle(runner)


def test_eos_stops_unless_ignored(qwen3_path):
    runner = SchedulerRunner(model_path=qwen3_path)
    prompt = _prompts(1000, [8], seed=10)[0]
    (free,) = runner.generate([prompt], {**GREEDY, "max_new_tokens": 6})
    runner.scheduler.eos_token_ids.add(free.output_ids[2])
    try:
        (eos,) = runner.generate([prompt], {"temperature": 0, "max_new_tokens": 6})
        (ignored,) = runner.generate([prompt], {**GREEDY, "max_new_tokens": 6})
    finally:
        runner.scheduler.eos_token_ids.discard(free.output_ids[2])
    assert eos.finish_reason["type"] == "stop"
    assert eos.output_ids == free.output_ids[:free.output_ids.index(free.output_ids[2]) + 1]
    assert ignored.output_ids == free.output_ids


def test_abort_frees_memory(qwen3_path):
    runner = SchedulerRunner(model_path=qwen3_path)
    prompts = _prompts(1000, [20, 30], seed=11)
    keep = runner.submit(prompts[0], {**GREEDY, "max_new_tokens": 20})
    drop = runner.submit(prompts[1], {**GREEDY, "max_new_tokens": 20})
    for _ in range(4):
        runner.scheduler.run_step()
    runner.abort(drop)
    outs = runner.run()
    assert outs[drop].finish_reason["type"] == "abort"
    assert len(outs[keep].output_ids) == 20
    waiting = runner.submit(prompts[0], GREEDY)
    runner.abort(waiting)
    assert runner.collect()[waiting].finish_reason["type"] == "abort"
    _check_idle(runner)


@pytest.mark.parametrize("params,ids,message", [
    ({"max_new_tokens": -1}, [1, 2], "max_new_tokens"),
    ({"temperature": -0.5}, [1, 2], "temperature"),
    ({"top_p": 0.0}, [1, 2], "top_p"),
    ({"top_p": 1.5}, [1, 2], "top_p"),
    ({}, [], "empty"),
    ({}, [1] * 5000, "context length"),
    ({}, [10**9], "out of the vocabulary"),
    ({"temperature": 0, "sampling_seed": 2**63}, [1, 2], "sampling_seed"),
    ({"sampling_seed": -(2**63) - 1}, [1, 2], "sampling_seed"),
    ({"temperature": float("nan")}, [1, 2], "temperature must be a finite"),
    ({"top_p": float("nan")}, [1, 2], "top_p"),
    ({"frequency_penalty": float("inf")}, [1, 2], "frequency_penalty"),
    ({"repetition_penalty": float("nan")}, [1, 2], "repetition_penalty"),
    ({"presence_penalty": "0.5"}, [1, 2], "presence_penalty has the wrong type"),
    ({"stop_token_ids": [2**70]}, [1, 2], "stop_token_ids"),
])
def test_bad_requests_are_refused(qwen3_path, params, ids, message):
    runner = SchedulerRunner(model_path=qwen3_path)
    sp = SamplingParams.from_dict(params)
    sp.normalize(None)
    runner.scheduler.handle_generate_request(TokenizedGenerateReqInput(
        rid="bad", input_text=None, input_ids=ids, sampling_params=sp))
    (bad,) = runner.collect().values()
    assert bad.finish_reason["type"] == "abort" and bad.finish_reason["status_code"] == 400
    assert message in bad.finish_reason["message"]
    (good,) = runner.generate([[1, 2, 3]], {**GREEDY, "max_new_tokens": 4})
    assert len(good.output_ids) == 4
    _check_idle(runner)


def test_a_prompt_the_kv_pool_cannot_hold_is_refused_not_queued_forever(qwen3_path):
    runner = SchedulerRunner(model_path=qwen3_path, max_total_tokens=64)
    pool = runner.scheduler.max_total_num_tokens
    (refused,) = runner.generate([[1] * pool], GREEDY)
    assert refused.finish_reason["status_code"] == 400
    assert f"does not fit in the KV cache ({pool} tokens)" in refused.finish_reason["message"]
    (fits,) = runner.generate([[1] * (pool - 8)], {**GREEDY, "max_new_tokens": 4})
    assert len(fits.output_ids) == 4
    _check_idle(runner)


def test_huge_ints_and_extreme_seeds_are_served(qwen3_path):
    runner = SchedulerRunner(model_path=qwen3_path, context_length=48)
    prompt = _prompts(1000, [8], seed=14)[0]
    huge = {"max_new_tokens": 10**30, "top_k": 10**30, "min_new_tokens": 10**20,
            "stop_token_ids": [5], "temperature": 0.8}
    seeds = [2**63 - 1, -(2**63), 0]
    outs = runner.generate([prompt] * 3, {**huge, "sampling_seed": seeds[0]})
    again = [runner.generate([prompt], {**huge, "sampling_seed": s})[0] for s in seeds]
    for out in outs + again:
        assert out.finish_reason == {"type": "length", "length": 48 - len(prompt)}
        assert 5 not in out.output_ids
    assert outs[0].output_ids == outs[1].output_ids == again[0].output_ids
    assert again[0].output_ids != again[1].output_ids
    _check_idle(runner)


def test_sampling_is_seeded_and_batch_invariant(qwen3_path):
    runner = SchedulerRunner(model_path=qwen3_path)
    prompts = _prompts(1000, [9, 21, 4], seed=12)
    params = {"temperature": 1.0, "top_p": 0.9, "top_k": 50, "min_p": 0.01,
              "max_new_tokens": 12, "ignore_eos": True, "sampling_seed": 7}
    batched = runner.generate(prompts, params)
    alone = [runner.generate([p], params)[0] for p in prompts]
    assert [o.output_ids for o in batched] == [o.output_ids for o in alone]
    other = runner.generate([prompts[0]], {**params, "sampling_seed": 8})[0]
    greedy = runner.generate([prompts[0]], {**GREEDY, "max_new_tokens": 12})[0]
    assert other.output_ids != batched[0].output_ids or greedy.output_ids != other.output_ids


def test_top_k_one_is_greedy(qwen3_path):
    runner = SchedulerRunner(model_path=qwen3_path)
    prompt = _prompts(1000, [9], seed=13)[0]
    greedy = runner.generate([prompt], {**GREEDY, "max_new_tokens": 8})[0]
    topk1 = runner.generate([prompt], {"temperature": 1.3, "top_k": 1, "max_new_tokens": 8,
                                       "ignore_eos": True})[0]
    assert topk1.output_ids == greedy.output_ids


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("preset", ["tiny-qwen3", "tiny-llama", "tiny-qwen2"])
def test_gpu_parity(tiny_model_dir, preset):
    path = tiny_model_dir(preset)
    hf = HFRunner(path)
    prompts = _prompts(1000, [5, 17, 33], seed=14)
    fp32 = SchedulerRunner(model_path=path, device="cuda", dtype="float32",
                           attention_backend="torch_native")
    for prompt, out in zip(prompts, fp32.generate(prompts, GREEDY)):
        assert out.output_ids == hf.greedy(prompt, 32)
    bf16 = SchedulerRunner(model_path=path, device="cuda", dtype="bfloat16",
                           attention_backend="torch_native")
    outs = bf16.generate(prompts, {**GREEDY, "max_new_tokens": 1}, return_logprob=True,
                         logprob_start_len=0)
    for prompt, out in zip(prompts, outs):
        ref = torch.log_softmax(hf.logits(prompt), dim=-1)
        expect = ref[torch.arange(len(prompt) - 1), torch.tensor(prompt[1:])]
        torch.testing.assert_close(torch.tensor(out.logprobs["input_token_logprobs_val"][1:]),
                                   expect, atol=5e-2, rtol=5e-2)
