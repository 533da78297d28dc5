"""Schedule invariance of --enable-deterministic-inference: one fixed workload driven through the
in-process scheduler under several forced schedules; every request must get the same tokens and
logprob bits as when it runs alone on an empty cache.

Schedules: all at once; staggered (random gaps between arrivals, so prefills interleave with
decodes of every batch size); a warm radix cache (the workload again without a flush, then
follow-up prompts that extend a finished request's prompt and output, i.e. radix hits on
generated tokens); and forced retraction (a retracted request's prompt and output so far are
prefilled again). The workload mixes shared
prefixes and prompt lengths and has more requests than the largest captured CUDA graph.

Used by test/srt/test_deterministic.py (CPU: Triton's interpreter; GPU: real shapes).
"""

from __future__ import annotations

import contextlib
import random
from dataclasses import dataclass, field
from typing import Callable, Iterator

from sglab.srt.managers.schedule_batch import ScheduleBatch
from sglab.srt.managers.scheduler import Scheduler
from sglab.test.runners import RunOutput, SchedulerRunner

Sample = tuple[tuple[int, ...], tuple[float, ...]]


@dataclass
class Workload:
    prompts: list[list[int]]
    params: dict
    # Indices of prompts whose follow-up (prompt + its output + `follow_up_tokens`) is sent
    # once the prompt has finished, hitting the radix entry of its generated tokens.
    follow_ups: list[int] = field(default_factory=list)
    follow_up_tokens: list[int] = field(default_factory=list)


def make_workload(vocab_size: int, num_groups: int, per_group: int, prefix_len: int,
                  question_lens: tuple[int, int], max_new_tokens: int, seed: int = 0,
                  sampling: dict | None = None) -> Workload:
    """Groups of prompts sharing a prefix, question lengths drawn from `question_lens`."""
    rng = random.Random(seed)
    tok = lambda n: [rng.randrange(vocab_size - 64) for _ in range(n)]  # noqa: E731
    prompts = []
    for _ in range(num_groups):
        prefix = tok(prefix_len)
        prompts += [prefix + tok(rng.randint(*question_lens)) for _ in range(per_group)]
    rng.shuffle(prompts)
    params = {"max_new_tokens": max_new_tokens, "ignore_eos": True,
              **(sampling or {"temperature": 0})}
    follow_ups = sorted(rng.sample(range(len(prompts)), k=min(3, len(prompts))))
    return Workload(prompts, params, follow_ups, tok(5))


def _sample(out: RunOutput) -> Sample:
    return tuple(out.output_ids), tuple(out.logprobs.get("output_token_logprobs_val", []))


def _submit(runner: SchedulerRunner, prompt: list[int], params: dict) -> str:
    return runner.submit(prompt, params, return_logprob=True)


def _drain(runner: SchedulerRunner, rids: list[str]) -> list[Sample]:
    return [_sample(o) for o in _drain_outputs(runner, rids)]


def _drain_outputs(runner: SchedulerRunner, rids: list[str]) -> list[RunOutput]:
    outs = runner.run()
    return [outs[r] for r in rids]


# --- schedules ----------------------------------------------------------------------------


def alone(runner: SchedulerRunner, prompts: list[list[int]], params: dict) -> list[Sample]:
    """The reference: each prompt by itself, from an empty cache."""
    samples = []
    for p in prompts:
        assert runner.scheduler.flush_cache()
        samples += _drain(runner, [_submit(runner, p, params)])
    return samples


def all_at_once(runner: SchedulerRunner, prompts: list[list[int]],
                params: dict) -> list[Sample]:
    assert runner.scheduler.flush_cache()
    return _drain(runner, [_submit(runner, p, params) for p in prompts])


def staggered(runner: SchedulerRunner, prompts: list[list[int]], params: dict,
              seed: int = 1) -> list[Sample]:
    """Arrivals in random bursts of 0-3 with random step gaps, while earlier ones decode."""
    assert runner.scheduler.flush_cache()
    rng = random.Random(seed)
    rids, pending = [], list(prompts)
    while pending:
        for _ in range(min(rng.randint(0, 3), len(pending))):
            rids.append(_submit(runner, pending.pop(0), params))
        for _ in range(rng.randint(0, 4)):
            runner.scheduler.run_step()
    return _drain(runner, rids)


@contextlib.contextmanager
def forced_retraction(every: int = 3) -> Iterator[list[int]]:
    """On every `every`-th decode scheduling step the KV cache reports full (to both of the
    scheduler's checks, so under overlap it lands the step in flight first, as it does when the
    cache really is full) until a request was retracted: its KV is freed and its prompt and
    output so far are prefilled again when it is readmitted. Yields [steps reported full]."""
    update, check = Scheduler.update_running_batch, ScheduleBatch.check_decode_mem
    state = {"steps": 0, "full": False}
    forced = [0]

    def update_running_batch(scheduler: Scheduler):
        state["steps"] += 1
        state["full"] = state["steps"] % every == 0 and len(scheduler.running_batch.reqs) > 1
        forced[0] += state["full"]
        try:
            return update(scheduler)
        finally:
            state["full"] = False

    def check_decode_mem(batch: ScheduleBatch) -> bool:
        return not state["full"] and check(batch)

    Scheduler.update_running_batch = update_running_batch
    ScheduleBatch.check_decode_mem = check_decode_mem
    try:
        yield forced
    finally:
        Scheduler.update_running_batch, ScheduleBatch.check_decode_mem = update, check


def retracted(runner: SchedulerRunner, prompts: list[list[int]], params: dict) -> list[Sample]:
    """All at once with forced retractions."""
    assert runner.scheduler.flush_cache()
    with forced_retraction() as forced:
        rids = [_submit(runner, p, params) for p in prompts]
        outs = _drain_outputs(runner, rids)
    assert forced[0] > 0 and sum(o.total_retractions for o in outs) > 0
    return [_sample(o) for o in outs]


def warm_radix(runner: SchedulerRunner, workload: Workload,
               first_outputs: list[Sample]) -> tuple[list[Sample], list[Sample]]:
    """The workload again on the cache the first run left, then the follow-ups (radix hits on
    generated tokens); returns (workload samples, follow-up samples)."""
    again = _drain(runner, [_submit(runner, p, workload.params) for p in workload.prompts])
    prompts = follow_up_prompts(workload, first_outputs)
    outs = _drain_outputs(runner, [_submit(runner, p, workload.params) for p in prompts])
    for i, p, o in zip(workload.follow_ups, prompts, outs):
        # The hit must reach into the generated tokens, past the original prompt.
        assert o.cached_tokens > len(workload.prompts[i]), (i, o.cached_tokens, len(p))
    return again, [_sample(o) for o in outs]


def follow_up_prompts(workload: Workload, outputs: list[Sample]) -> list[list[int]]:
    return [workload.prompts[i] + list(outputs[i][0]) + workload.follow_up_tokens
            for i in workload.follow_ups]


# --- the check ----------------------------------------------------------------------------


@dataclass
class Mismatch:
    schedule: str
    index: int
    first_token: int  # first differing output position (-1: tokens equal, logprob bits differ)

    def __str__(self) -> str:
        where = f"token {self.first_token}" if self.first_token >= 0 else "logprob bits"
        return f"{self.schedule}: request {self.index} differs at {where}"


def compare(name: str, got: list[Sample], ref: list[Sample]) -> list[Mismatch]:
    out = []
    for i, (g, r) in enumerate(zip(got, ref, strict=True)):
        if g != r:
            diff = [j for j, (a, b) in enumerate(zip(g[0], r[0])) if a != b]
            out.append(Mismatch(name, i, diff[0] if diff else -1))
    return out


def alone_reference(runner: SchedulerRunner, workload: Workload) -> tuple[list[Sample], list[Sample]]:
    """(the workload alone, its follow-ups alone)."""
    ref = alone(runner, workload.prompts, workload.params)
    return ref, alone(runner, follow_up_prompts(workload, ref), workload.params)


SCHEDULES = ("all at once", "staggered", "warm radix", "retraction")


def check_schedules(runner: SchedulerRunner, workload: Workload,
                    reference: tuple[list[Sample], list[Sample]] | None = None,
                    schedules: tuple[str, ...] = SCHEDULES) -> tuple[tuple, list[Mismatch]]:
    """Runs `schedules` (warm radix includes the follow-ups that hit generated tokens) against
    `reference`, (workload alone, follow-ups alone), computed here when not given. Returns the
    reference and every mismatch."""
    reference = reference or alone_reference(runner, workload)
    ref, follow_ref = reference
    prompts, params = workload.prompts, workload.params
    runs: dict[str, Callable[[], list[Sample]]] = {
        "all at once": lambda: all_at_once(runner, prompts, params),
        "staggered": lambda: staggered(runner, prompts, params),
        "retraction": lambda: retracted(runner, prompts, params),
    }
    mismatches = []
    for name in schedules:
        if name == "warm radix":
            again, follow = warm_radix(runner, workload, all_at_once(runner, prompts, params))
            mismatches += compare(name, again, ref)
            mismatches += compare("radix hit on generated tokens", follow, follow_ref)
        else:
            mismatches += compare(name, runs[name](), ref)
    return reference, mismatches
