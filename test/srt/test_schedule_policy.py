"""The waiting queue: fcfs matches the prefix of only the requests admission considers, with the
same admissions as matching the whole queue; lpm sorts by prefix up to LPM_MAX_QUEUE requests
and is fcfs above (upstream's threshold)."""

from __future__ import annotations

import json
import random
import time

import pytest

from sglab.srt.debug.schedule_trace import ScheduleTrace
from sglab.srt.managers.schedule_policy import LPM_MAX_QUEUE
from sglab.test.runners import SchedulerRunner

GREEDY = {"temperature": 0, "max_new_tokens": 3, "ignore_eos": True}


@pytest.fixture(scope="module")
def path(tiny_model_dir):
    return tiny_model_dir("tiny-qwen3")


def _tokens(rng: random.Random, n: int) -> list[int]:
    return [rng.randrange(1000) for _ in range(n)]


def _count_matches(runner: SchedulerRunner) -> list[int]:
    tree = runner.scheduler.tree_cache
    real, count = tree.match_prefix, [0]

    def match_prefix(key):
        count[0] += 1
        return real(key)

    tree.match_prefix = match_prefix
    return count


def _match_whole_queue(runner: SchedulerRunner) -> None:
    """The scheduler as it was: every waiting request matched every step, queue order kept."""
    def calc_priority(waiting_queue, match_prefix):
        for req in list(waiting_queue):
            match_prefix(req)
        return True

    runner.scheduler.policy.calc_priority = calc_priority


def _queue(runner: SchedulerRunner, prompts: list[list[int]]) -> list[str]:
    return [runner.submit(p, GREEDY, rid=f"q{i}") for i, p in enumerate(prompts)]


def _warm(runner: SchedulerRunner, prefixes: list[list[int]]) -> None:
    runner.generate([p + [7] for p in prefixes], GREEDY)


def test_fcfs_matches_only_the_requests_it_admits(path):
    rng = random.Random(0)
    prefix = _tokens(rng, 64)
    runner = SchedulerRunner(model_path=path, max_running_requests=8)
    _warm(runner, [prefix])
    _queue(runner, [prefix + _tokens(rng, 16) for _ in range(256)])
    matches = _count_matches(runner)
    batch = runner.scheduler.get_new_batch_prefill()
    assert len(batch.reqs) == 8 and matches[0] == 8
    assert [r.rid for r in batch.reqs] == [f"q{i}" for i in range(8)]
    assert batch.prefix_lens == [64] * 8


def test_fcfs_admits_as_matching_the_whole_queue_did(path, tmp_path):
    """Same batches, same prefixes reused, same outputs, under a tight budget that keeps a
    queue waiting (running-request cap, chunked prefill, shared prefixes)."""
    rng = random.Random(1)
    prefixes = [_tokens(rng, 40), _tokens(rng, 24)]
    prompts = [prefixes[i % 2][: rng.randint(8, 40)] + _tokens(rng, rng.randint(1, 50))
               for i in range(40)]
    traces, outputs = [], []
    for whole_queue in (False, True):
        runner = SchedulerRunner(model_path=path, max_running_requests=6,
                                 chunked_prefill_size=64)
        _warm(runner, prefixes)
        if whole_queue:
            _match_whole_queue(runner)
        trace = tmp_path / f"trace-{whole_queue}"
        runner.scheduler.schedule_trace = ScheduleTrace(str(trace))
        rids = _queue(runner, prompts)
        outs = runner.run()
        outputs.append([(outs[r].output_ids, outs[r].cached_tokens) for r in rids])
        traces.append([{k: v for k, v in json.loads(line).items() if k != "step"}
                       for line in next(tmp_path.glob(f"{trace.name}.*")).read_text().split("\n")
                       if line])
        assert runner.integrity_error() is None
    assert traces[0] == traces[1]
    assert outputs[0] == outputs[1]
    assert sum(cached for _, cached in outputs[0]) > 0


@pytest.mark.parametrize("queue_len, sorted_by_prefix", [
    (LPM_MAX_QUEUE, True), (LPM_MAX_QUEUE + 1, False)])
def test_lpm_sorts_a_short_queue_and_is_fcfs_above_the_threshold(path, queue_len,
                                                                 sorted_by_prefix):
    rng = random.Random(2)
    prefix = _tokens(rng, 48)
    runner = SchedulerRunner(model_path=path, schedule_policy="lpm", max_running_requests=2)
    _warm(runner, [prefix])
    prompts = [_tokens(rng, 8) for _ in range(queue_len - 1)] + [prefix + [1, 2]]
    _queue(runner, prompts)
    matches = _count_matches(runner)
    batch = runner.scheduler.get_new_batch_prefill()
    rids = [r.rid for r in batch.reqs]
    if sorted_by_prefix:
        assert rids == [f"q{queue_len - 1}", "q0"] and matches[0] == queue_len
        assert batch.prefix_lens == [48, 0]
    else:
        assert rids == ["q0", "q1"] and matches[0] == 2


def test_lpm_without_a_radix_cache_is_fcfs(path):
    runner = SchedulerRunner(model_path=path, schedule_policy="lpm", disable_radix_cache=True)
    assert runner.scheduler.policy.policy == "fcfs"


def test_scheduling_step_time_with_256_long_requests_waiting(path):
    """Prints one prefill scheduling step's host time (CPU; a measurement, not a bound): 256
    waiting requests of 1024 tokens sharing a cached 960-token prefix."""
    rng = random.Random(3)
    prefix = _tokens(rng, 960)
    prompts = [prefix + _tokens(rng, 64) for _ in range(256)]
    times = {}
    for whole_queue in (True, False):
        runner = SchedulerRunner(model_path=path, max_running_requests=8)
        _warm(runner, [prefix])
        if whole_queue:
            _match_whole_queue(runner)
        _queue(runner, prompts)
        matches = _count_matches(runner)
        tic = time.perf_counter()
        batch = runner.scheduler.get_new_batch_prefill()
        times[whole_queue] = time.perf_counter() - tic
        assert len(batch.reqs) == 8 and batch.prefix_lens == [960] * 8
        assert matches[0] == (256 if whole_queue else 8)
    print(f"\nprefill scheduling step, 256 waiting x 1024 tokens: whole-queue matching "
          f"{times[True] * 1e3:.2f} ms, fcfs matching on admission {times[False] * 1e3:.2f} ms")


def _reqs(max_new: list[int]) -> list:
    from sglab.srt.managers.schedule_batch import Req
    from sglab.srt.sampling.sampling_params import SamplingParams

    return [Req(f"r{i}", None, [1, 2], SamplingParams(max_new_tokens=m), 0)
            for i, m in enumerate(max_new)]


def test_random_policy_shuffles_reproducibly_without_a_cache():
    from sglab.srt.managers.schedule_policy import SchedulePolicy

    reqs = _reqs([4] * 20)
    orders = []
    for seed in (1, 1, 2):
        queue = list(reqs)
        assert SchedulePolicy("random", None, seed).calc_priority(queue, None) is False
        orders.append([r.rid for r in queue])
    assert sorted(orders[0]) == sorted(r.rid for r in reqs)
    assert orders[0] == orders[1] and orders[0] != orders[2]
    assert orders[0] != [r.rid for r in reqs]
    # lpm needs a prefix cache: without one it is fcfs, as upstream.
    queue = list(reqs)
    SchedulePolicy("lpm", None).calc_priority(queue, None)
    assert queue == reqs


def test_lof_puts_the_longest_output_first(path):
    from sglab.srt.managers.schedule_policy import SchedulePolicy

    queue = _reqs([3, 9, 1, 9, 5])
    SchedulePolicy("lof", None).calc_priority(queue, None)
    assert [r.rid for r in queue] == ["r1", "r3", "r4", "r0", "r2"]
    rng = random.Random(5)
    prompts = [_tokens(rng, 8) for _ in range(6)]
    want = [o.output_ids for o in SchedulerRunner(model_path=path).generate(prompts, GREEDY)]
    for policy in ("random", "lof"):
        runner = SchedulerRunner(model_path=path, schedule_policy=policy,
                                 max_running_requests=2)
        assert [o.output_ids for o in runner.generate(prompts, GREEDY)] == want, policy
