"""Frequency, presence and repetition penalties, min_new_tokens and logit_bias, end to end
through the scheduler, against reference decode loops on HF transformers."""

from __future__ import annotations

import random

import pytest
import torch
from transformers import MinNewTokensLengthLogitsProcessor, RepetitionPenaltyLogitsProcessor

from sglab.test.runners import HFRunner, SchedulerRunner

GREEDY = {"temperature": 0, "ignore_eos": True, "max_new_tokens": 16}


def _prompts(lens: list[int], seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(1000) for _ in range(n)] for n in lens]


@pytest.fixture(scope="module")
def runner(path):
    return SchedulerRunner(model_path=path)


def hf_decode(hf: HFRunner, prompt: list[int], n: int, process, stop: set[int] = frozenset()):
    """Greedy decoding, `process(ids, scores, prompt_len)` applied to each step's logits."""
    ids = list(prompt)
    for _ in range(n):
        scores = process(torch.tensor([ids]), hf.logits(ids)[-1:].clone(), len(prompt))
        ids.append(int(scores.argmax()))
        if ids[-1] in stop:
            break
    return ids[len(prompt):]


def openai_penalties(frequency: float, presence: float):
    """OpenAI's definition: logit - count * frequency - (count > 0) * presence, over the
    tokens generated so far."""
    def process(ids, scores, prompt_len):
        counts = torch.bincount(ids[0, prompt_len:], minlength=scores.shape[-1]).float()
        return scores - counts * frequency - (counts > 0).float() * presence
    return process


def hf_processor(processor):
    return lambda ids, scores, prompt_len: processor(ids, scores)


CASES = {
    "repetition": ({"repetition_penalty": 2.0},
                   hf_processor(RepetitionPenaltyLogitsProcessor(2.0))),
    "repetition_below_one": ({"repetition_penalty": 0.5},
                             hf_processor(RepetitionPenaltyLogitsProcessor(0.5))),
    "frequency": ({"frequency_penalty": 2.0}, openai_penalties(2.0, 0.0)),
    "presence": ({"presence_penalty": 2.0}, openai_penalties(0.0, 2.0)),
    "both": ({"frequency_penalty": -1.0, "presence_penalty": 1.5}, openai_penalties(-1.0, 1.5)),
}


@pytest.mark.parametrize("case", CASES)
def test_penalties_match_reference_decode(runner, hf, case):
    params, process = CASES[case]
    prompts = _prompts([6, 19, 33], seed=1)
    plain = runner.generate(prompts, GREEDY)
    outs = runner.generate(prompts, {**GREEDY, **params})
    for prompt, out, base in zip(prompts, outs, plain):
        assert out.output_ids == hf_decode(hf, prompt, 16, process)
    if case in ("repetition", "frequency", "presence"):  # 2.0 breaks the tiny model's loops
        assert all(o.output_ids != b.output_ids for o, b in zip(outs, plain))
    assert runner.integrity_error() is None


def _bias_tensor(bias: dict[str, float], vocab: int) -> torch.Tensor:
    t = torch.zeros(vocab)
    for token, value in bias.items():
        t[int(token)] = value
    return t


def test_logit_bias_matches_reference_decode_and_logprobs(runner, hf):
    prompts = _prompts([6, 19, 33], seed=6)
    plain = runner.generate(prompts, GREEDY)
    vocab = runner.scheduler.model_config.vocab_size
    for prompt, base in zip(prompts, plain):
        # Forbid what greedy picked first, and lift a token it never picked.
        lifted = next(t for t in range(vocab) if t not in base.output_ids)
        bias = {str(t): -100.0 for t in set(base.output_ids[:3])} | {str(lifted): 4.0}
        (out,) = runner.generate([prompt], {**GREEDY, "logit_bias": bias},
                                 return_logprob=True)
        added = _bias_tensor(bias, vocab)
        want = hf_decode(hf, prompt, 16, lambda ids, scores, _: scores + added)
        assert out.output_ids == want and out.output_ids != base.output_ids
        assert not set(out.output_ids) & set(base.output_ids[:3])
        ids = list(prompt)
        for token, logprob in zip(out.output_ids, out.logprobs["output_token_logprobs_val"]):
            ref = torch.log_softmax(hf.logits(ids)[-1].float() + added, -1)[token]
            assert abs(logprob - float(ref)) < 1e-3
            ids.append(token)
    assert runner.integrity_error() is None


def test_logit_bias_of_one_request_leaves_its_batch_alone(runner):
    prompts = _prompts([9, 14, 21], seed=7)
    plain = runner.generate(prompts, GREEDY)
    forced = 123
    rids = [runner.submit(p, {**GREEDY, "logit_bias": {str(forced): 100.0}} if i == 1
                          else GREEDY) for i, p in enumerate(prompts)]
    outs = runner.run()
    assert outs[rids[1]].output_ids == [forced] * 16
    assert outs[rids[0]].output_ids == plain[0].output_ids
    assert outs[rids[2]].output_ids == plain[2].output_ids
    assert runner.integrity_error() is None


def _early_token(runner: SchedulerRunner) -> tuple[list[int], int, int]:
    """A prompt whose greedy output repeats a token early: (prompt, token, first index)."""
    for prompt in _prompts([5] * 20, seed=2):
        (free,) = runner.generate([prompt], GREEDY)
        for i, t in enumerate(free.output_ids[:3]):
            if free.output_ids.count(t) >= 2:
                return prompt, t, i
    raise AssertionError("no prompt repeats a token early")


def test_min_new_tokens_masks_stop_tokens(runner, hf):
    prompt, stop, first = _early_token(runner)
    (stopped,) = runner.generate([prompt], {**GREEDY, "ignore_eos": False,
                                            "stop_token_ids": [stop]})
    assert stopped.output_ids.index(stop) == first == len(stopped.output_ids) - 1
    for min_new in (first + 1, 6, 16):
        params = {**GREEDY, "ignore_eos": False, "stop_token_ids": [stop],
                  "min_new_tokens": min_new}
        (out,) = runner.generate([prompt], params)
        assert stop not in out.output_ids[:min_new]
        mask = MinNewTokensLengthLogitsProcessor(len(prompt), min_new, [stop])
        assert out.output_ids == hf_decode(hf, prompt, 16, hf_processor(mask), {stop})
        if out.output_ids[-1] == stop:
            assert out.finish_reason == {"type": "stop", "matched": stop}
    assert runner.integrity_error() is None


def test_min_new_tokens_masks_eos_unless_ignored(runner):
    prompt, token, first = _early_token(runner)
    (free,) = runner.generate([prompt], GREEDY)
    eos = runner.scheduler.eos_token_ids
    eos.add(token)
    try:
        (masked,) = runner.generate([prompt], {**GREEDY, "ignore_eos": False,
                                               "min_new_tokens": 8})
        (ignored,) = runner.generate([prompt], {**GREEDY, "min_new_tokens": 8})
    finally:
        eos.discard(token)
    assert token not in masked.output_ids[:8]
    assert ignored.output_ids == free.output_ids  # an ignored EOS stops nothing: no mask


def _record_penalizers(runner: SchedulerRunner) -> list:
    seen = []
    model_runner = runner.scheduler.tp_worker.model_runner
    sample = model_runner.sample

    def recording(logits_output, forward_batch):
        seen.append(forward_batch.sampling_info.penalizer_orchestrator)
        return sample(logits_output, forward_batch)

    model_runner.sample = recording
    return seen


def test_batch_invariant_and_free_for_requests_without_penalties(path):
    runner = SchedulerRunner(model_path=path)
    seen = _record_penalizers(runner)
    prompts = _prompts([7, 12, 25, 4, 16], seed=3)
    plain = runner.generate(prompts, GREEDY)
    assert seen and all(p is None for p in seen)  # no request asks: no state, no work
    mixes = [{}, {"frequency_penalty": 1.0}, {"repetition_penalty": 1.5}, {},
             {"presence_penalty": 0.5, "min_new_tokens": 3}]
    rids = [runner.submit(p, {**GREEDY, **m}) for p, m in zip(prompts, mixes)]
    outs = runner.run()
    assert any(p is not None for p in seen)
    for prompt, mix, rid, base in zip(prompts, mixes, rids, plain):
        (alone,) = runner.generate([prompt], {**GREEDY, **mix})
        assert outs[rid].output_ids == alone.output_ids
        if not mix:
            assert outs[rid].output_ids == base.output_ids
    assert runner.integrity_error() is None


PENALIZED = [{"repetition_penalty": 1.6}, {"frequency_penalty": 0.8},
             {"presence_penalty": 1.2, "min_new_tokens": 20}, {},
             {"logit_bias": {"7": 3.0, "300": -100.0}, "frequency_penalty": 0.3}]


def test_penalties_survive_retraction_and_chunked_prefill(path):
    prompts = _prompts([40, 45, 50, 55, 60, 35, 70, 30], seed=4)
    params = [{**GREEDY, "max_new_tokens": 40, **PENALIZED[i % len(PENALIZED)]}
              for i in range(len(prompts))]

    def run(**kwargs):
        runner = SchedulerRunner(model_path=path, **kwargs)
        rids = [runner.submit(p, sp) for p, sp in zip(prompts, params)]
        outs = runner.run()
        assert runner.integrity_error() is None
        return [outs[r] for r in rids]

    ref = run()
    retracted = run(max_total_tokens=400, disable_radix_cache=True)
    chunked = run(chunked_prefill_size=16)
    assert sum(o.total_retractions for o in retracted) > 0
    assert [o.output_ids for o in retracted] == [o.output_ids for o in ref]
    assert [o.output_ids for o in chunked] == [o.output_ids for o in ref]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_penalties_with_cuda_graphs_and_overlap(path, hf):
    """On the GPU: penalties match the reference decode, and CUDA graphs with overlap match
    the eager normal loop token for token."""
    prompts = _prompts([6, 19, 33], seed=5)
    gpu = {"device": "cuda", "dtype": "float32"}
    reference = SchedulerRunner(model_path=path, attention_backend="torch_native", **gpu)
    eager = SchedulerRunner(model_path=path, attention_backend="triton", disable_cuda_graph=True,
                            disable_overlap_schedule=True, **gpu)
    graphs = SchedulerRunner(model_path=path, attention_backend="triton", **gpu)
    assert graphs.scheduler.tp_worker.model_runner.graph_runner is not None
    for name in ("repetition", "frequency", "both"):
        params, process = CASES[name]
        sp = {**GREEDY, **params}
        outs = [o.output_ids for o in reference.generate(prompts, sp)]
        assert outs == [hf_decode(hf, p, 16, process) for p in prompts]
        want = [o.output_ids for o in eager.generate(prompts, sp)]
        assert [o.output_ids for o in graphs.generate(prompts, sp)] == want
    for runner in (reference, eager, graphs):
        assert runner.integrity_error() is None
