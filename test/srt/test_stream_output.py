"""The scheduler's per-step output messages, built for all of a step's requests in one pass:
a streamed request's deltas add up to what the same request gets unstreamed, row i of every
column belongs to rid i, and the one-pass message equals the messages built request by
request."""

from __future__ import annotations

import collections
import random

import pytest

from sglab.srt.managers.scheduler import Scheduler
from sglab.test.runners import SchedulerRunner

PARAMS = [{"temperature": 0}, {"temperature": 0.8, "top_p": 0.9, "sampling_seed": 7},
          {"temperature": 0, "stop_token_ids": [5, 17, 33]}, {"temperature": 0, "stop": ["a"]}]


def _workload(seed: int = 0) -> list[tuple[list[int], dict, dict]]:
    rng = random.Random(seed)
    reqs = []
    for i in range(10):
        prompt = [rng.randrange(900) for _ in range(rng.randint(3, 30))]
        params = {**PARAMS[i % len(PARAMS)], "max_new_tokens": rng.randint(1, 12)}
        logprobs = {"return_logprob": True, "logprob_start_len": len(prompt) // 2,
                    "top_logprobs_num": 2} if i % 3 == 0 else {}
        reqs.append((prompt, params, logprobs))
    return reqs


def _run(runner: SchedulerRunner, stream: bool) -> list:
    rids = [runner.submit(p, params, stream=stream and i % 4 != 1, **lp)
            for i, (p, params, lp) in enumerate(_workload())]
    outs = runner.run()
    return [outs[r] for r in rids]


def _fields(outs: list) -> list:
    return [(o.output_ids, o.finish_reason, o.prompt_tokens, o.completion_tokens, o.logprobs)
            for o in outs]


@pytest.fixture(scope="module")
def path(tiny_model_dir):
    return tiny_model_dir("tiny-qwen3")


@pytest.mark.parametrize("interval", [1, 3])
def test_streamed_deltas_add_up_and_match_per_request_messages(path, monkeypatch, interval):
    unstreamed = _fields(_run(SchedulerRunner(model_path=path), stream=False))
    runner = SchedulerRunner(model_path=path, stream_interval=interval)
    real = Scheduler._token_output
    messages, seen = [], {}

    def checked(self, reqs):
        out, sent = real(self, reqs)
        columns = {name: value for name, value in vars(out).items()}
        assert {len(v) for v in columns.values()} == {len(reqs)}
        assert out.rids == [r.rid for r in reqs]
        if len(reqs) > 1:
            rows = [real(self, [r]) for r in reqs]
            assert columns == {name: [v for o, _ in rows for v in getattr(o, name)]
                               for name in columns}
            assert sent == [s for _, row_sent in rows for s in row_sent]
        messages.append(out.rids)
        seen.update((r.rid, r) for r in reqs)
        return out, sent

    monkeypatch.setattr(Scheduler, "_token_output", checked)
    outs = _run(runner, stream=True)
    assert _fields(outs) == unstreamed
    for o in outs:  # the deltas add up to the request's own lists
        req = seen[o.rid]
        assert o.output_ids == req.output_ids and o.finish_reason == req.finished_reason
        if req.return_logprob:
            assert o.logprobs and all(o.logprobs[name] == getattr(req, name)
                                      for name in o.logprobs)
    per_rid = collections.Counter(rid for rids in messages for rid in rids)
    assert max(per_rid.values()) >= 3  # streamed: a request's tokens came in several messages
    assert max(map(len, messages)) > 1  # and a message carried several requests
    assert runner.integrity_error() is None
