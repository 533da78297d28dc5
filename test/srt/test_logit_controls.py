"""token_ids_logprob, custom logit processors and upstream's request timeouts, through the
scheduler driven in-process: token logprobs against HF's full logits, processors by the tokens
they force, failures and timeouts by what they free."""

from __future__ import annotations

import time

import pytest
import torch

from conftest import ForceToken

from sglab.srt.sampling.custom_logit_processor import CustomLogitProcessor
from sglab.test.runners import SchedulerRunner

GREEDY = {"temperature": 0, "max_new_tokens": 5, "ignore_eos": True}
SAMPLED = {"temperature": 1.0, "max_new_tokens": 6, "ignore_eos": True, "sampling_seed": 11}


class RaiseOnFlag(CustomLogitProcessor):
    """Leaves the logits alone, unless a row's params say "boom"."""

    def __call__(self, logits, custom_param_list=None):
        if any(params.get("boom") for params in custom_param_list):
            raise RuntimeError("boom")
        return logits


def _check_kv_back(runner: SchedulerRunner) -> None:
    sched = runner.scheduler
    assert runner.integrity_error() is None
    free = sched.token_to_kv_pool_allocator.available_size() + sched.tree_cache.evictable_size()
    assert free == sched.max_total_num_tokens


# --- token_ids_logprob ----------------------------------------------------------------------


def test_token_ids_logprobs_are_the_log_softmax_of_the_full_logits(path, hf):
    """Output positions for every request asking, prompt positions for the one with a
    logprob_start_len, in one batch and across prefill chunks."""
    runner = SchedulerRunner(model_path=path, chunked_prefill_size=8)
    prompts = [list(range(3, 23)), list(range(40, 47)), list(range(60, 71))]
    ids = [[0, 5, 900], [7], None]
    rids = [runner.submit(prompts[0], GREEDY, return_logprob=True, logprob_start_len=2,
                          token_ids_logprob=ids[0]),
            runner.submit(prompts[1], GREEDY, return_logprob=True, token_ids_logprob=ids[1]),
            runner.submit(prompts[2], GREEDY, return_logprob=True)]
    outs = runner.run()
    for prompt, wanted, rid in zip(prompts, ids, rids):
        out = outs[rid]
        ref = torch.log_softmax(hf.logits(prompt + out.output_ids), dim=-1)
        if wanted is None:
            assert out.logprobs.get("output_token_ids_logprobs_val", []) == []
            continue
        n = len(prompt)
        expect = ref[n - 1:n - 1 + len(out.output_ids)][:, wanted]
        torch.testing.assert_close(torch.tensor(out.logprobs["output_token_ids_logprobs_val"]),
                                   expect, atol=2e-5, rtol=1e-4)
        assert out.logprobs["output_token_ids_logprobs_idx"] == [wanted] * len(out.output_ids)
    first = outs[rids[0]].logprobs
    # Prompt token i (from logprob_start_len on) is scored by the position before it.
    torch.testing.assert_close(
        torch.tensor(first["input_token_ids_logprobs_val"]),
        torch.log_softmax(hf.logits(prompts[0]), dim=-1)[1:len(prompts[0]) - 1][:, ids[0]],
        atol=2e-5, rtol=1e-4)
    assert len(first["input_token_ids_logprobs_val"]) == len(first["input_token_logprobs_val"])
    assert outs[rids[1]].logprobs.get("input_token_ids_logprobs_val", []) == []
    _check_kv_back(runner)


def test_token_ids_logprobs_from_the_first_prompt_token(path, hf):
    runner = SchedulerRunner(model_path=path)
    prompt = [9, 8, 7, 6]
    (out,) = runner.generate([prompt], {**GREEDY, "max_new_tokens": 1}, return_logprob=True,
                             logprob_start_len=0, token_ids_logprob=[1, 2])
    got = out.logprobs["input_token_ids_logprobs_val"]
    assert got[0] is None and out.logprobs["input_token_ids_logprobs_idx"][0] is None
    ref = torch.log_softmax(hf.logits(prompt), dim=-1)[:len(prompt) - 1][:, [1, 2]]
    torch.testing.assert_close(torch.tensor(got[1:]), ref, atol=2e-5, rtol=1e-4)


# --- custom logit processors ----------------------------------------------------------------


def test_custom_logit_processors_run_per_request_and_fail_alone(path):
    """Sampled at temperature 1: a forcing processor's request emits only its token; of two
    requests sharing a processor, the one it raises on ends with a 400 and the other samples
    exactly what it samples without a processor, as does the request with none."""
    runner = SchedulerRunner(model_path=path, enable_custom_logit_processor=True)
    prompt = [5, 6, 7, 8]
    forced = runner.submit(prompt, {**SAMPLED, "custom_params": {"token_id": 42}},
                           custom_logit_processor=ForceToken.to_str())
    other = runner.submit(prompt, {**SAMPLED, "custom_params": {"token_id": 77}},
                          custom_logit_processor=ForceToken.to_str())
    boom = runner.submit(prompt, {**SAMPLED, "custom_params": {"boom": True}},
                         custom_logit_processor=RaiseOnFlag.to_str())
    spared = runner.submit(prompt, {**SAMPLED, "custom_params": {"boom": False}},
                           custom_logit_processor=RaiseOnFlag.to_str())
    plain = runner.submit(prompt, SAMPLED)
    outs = runner.run()
    assert outs[forced].output_ids == [42] * 6 and outs[other].output_ids == [77] * 6
    assert outs[boom].finish_reason == {
        "type": "abort", "status_code": 400,
        "message": "The custom logit processor failed: RuntimeError: boom"}
    (alone,) = runner.generate([prompt], SAMPLED)
    assert outs[spared].output_ids == outs[plain].output_ids == alone.output_ids
    _check_kv_back(runner)


@pytest.mark.parametrize("enabled,processor,message", [
    (False, ForceToken.to_str(), "Please set `--enable-custom-logit-processor`"),
    (True, "not json", "Invalid custom_logit_processor: JSONDecodeError"),
    (True, '{"callable": "00ff"}', "Invalid custom_logit_processor"),
    (True, '{"code": 1}', 'expected a JSON object {"callable": "<hex>"}'),
])
def test_refused_custom_logit_processors(path, enabled, processor, message):
    runner = SchedulerRunner(model_path=path, enable_custom_logit_processor=enabled)
    rid = runner.submit([5, 6], GREEDY, custom_logit_processor=processor)
    ok = runner.submit([5, 6], GREEDY)
    outs = runner.run()
    reason = outs[rid].finish_reason
    assert reason["type"] == "abort" and reason["status_code"] == 400, reason
    assert message in reason["message"]
    assert len(outs[ok].output_ids) == 5


# --- timeouts ---------------------------------------------------------------------------------


def test_waiting_timeout_ends_queued_requests_with_a_503(path, monkeypatch):
    monkeypatch.setenv("SGLANG_REQ_WAITING_TIMEOUT", "0.2")
    runner = SchedulerRunner(model_path=path, max_running_requests=1)
    running = runner.submit([5, 6, 7], {**GREEDY, "max_new_tokens": 40})
    queued = runner.submit([8, 9, 10], GREEDY)
    runner.scheduler.run_step()  # the first request's prefill; the second waits
    time.sleep(0.3)
    outs = runner.run()
    assert outs[queued].finish_reason == {
        "type": "abort", "message": "Request waiting timeout reached.", "status_code": 503}
    assert outs[queued].output_ids == []
    assert len(outs[running].output_ids) == 40  # it stopped waiting once it ran
    _check_kv_back(runner)


def test_running_timeout_ends_running_requests_with_a_503_and_frees_their_kv(path,
                                                                            monkeypatch):
    monkeypatch.setenv("SGLANG_REQ_RUNNING_TIMEOUT", "0.2")
    runner = SchedulerRunner(model_path=path)
    rid = runner.submit([5, 6, 7], {**GREEDY, "max_new_tokens": 500})
    for _ in range(3):
        runner.scheduler.run_step()
    time.sleep(0.3)
    out = runner.run()[rid]
    assert out.finish_reason == {
        "type": "abort", "message": "Request running timeout reached.", "status_code": 503}
    assert 0 < len(out.output_ids) < 500
    _check_kv_back(runner)


def test_a_malformed_timeout_names_its_variable(path, monkeypatch):
    monkeypatch.setenv("SGLANG_REQ_RUNNING_TIMEOUT", "soon")
    with pytest.raises(ValueError, match="SGLANG_REQ_RUNNING_TIMEOUT must be a number"):
        SchedulerRunner(model_path=path)
