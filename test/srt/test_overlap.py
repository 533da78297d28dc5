"""Overlap scheduling gives the same outputs as the normal loop, and never mutates what an
in-flight forward reads."""

from __future__ import annotations

import copy
import dataclasses
import random

import pytest
import torch

from sglab.test.runners import SchedulerRunner


def _workload(seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    shared = [rng.randrange(1000) for _ in range(40)]
    prompts = []
    for i in range(12):
        own = [rng.randrange(1000) for _ in range(rng.randrange(1, 60))]
        prompts.append(shared + own if i % 3 == 0 else own)
    return prompts


MAXTOK = 400
# Penalty state lives on the device and is updated from the sampled tokens, never from the host.
PENALTIES = [{}, {"repetition_penalty": 1.5}, {"frequency_penalty": 1.0, "presence_penalty": 0.5},
             {"min_new_tokens": 8, "stop_token_ids": [7, 11]}]


def _run(path: str, overlap: bool, page_size: int, watch_inflight: bool = False):
    runner = SchedulerRunner(model_path=path, disable_overlap_schedule=not overlap,
                             chunked_prefill_size=16, max_total_tokens=MAXTOK,
                             page_size=page_size)
    if watch_inflight:
        _watch_inflight_batches(runner.scheduler)
    prompts = _workload()
    rng = random.Random(1)
    rids = [runner.submit(p, {"temperature": 0, "ignore_eos": True,
                              "max_new_tokens": rng.randrange(1, 60), **PENALTIES[i % 4]})
            for i, p in enumerate(prompts)]
    doomed = [runner.submit(p, {"temperature": 0, "max_new_tokens": 30, "ignore_eos": True})
              for p in prompts[:3]]
    for step in range(6):
        runner.scheduler.run_step()
    for rid in doomed:
        runner.abort(rid)
    outs = runner.run()
    assert runner.integrity_error() is None
    retractions = sum(outs[r].total_retractions for r in rids)
    return [outs[r].output_ids for r in rids], [outs[r].finish_reason for r in doomed], retractions


@pytest.fixture(scope="module")
def path(tiny_model_dir):
    return tiny_model_dir("tiny-qwen3")


@pytest.mark.parametrize("page_size", [1, 16])
def test_overlap_matches_normal(path, page_size):
    ref, ref_doomed, ref_retractions = _run(path, overlap=False, page_size=page_size)
    got, doomed, retractions = _run(path, overlap=True, page_size=page_size,
                                    watch_inflight=True)
    assert ref_retractions > 0 and retractions > 0
    assert got == ref
    assert all(r["type"] == "abort" for r in doomed + ref_doomed)


def _watch_inflight_batches(scheduler) -> None:
    """Fail if the host mutates any tensor of a batch between its launch and its result."""
    worker = scheduler.tp_worker
    launch = worker.forward_batch_generation
    inflight = []

    def forward(batch):
        inflight.append((batch, copy.deepcopy(batch)))
        return launch(batch)

    process = scheduler.process_pending_result

    def process_and_check():
        batch, snapshot = inflight.pop(0)
        for f in dataclasses.fields(batch):
            now, then = getattr(batch, f.name), getattr(snapshot, f.name)
            if isinstance(now, torch.Tensor):
                assert torch.equal(now, then), f"{f.name} changed while in flight"
        process()

    worker.forward_batch_generation = forward
    scheduler.process_pending_result = process_and_check


def test_inflight_watch_catches_mutation(path):
    """The watch above fails when a launched batch's host tensor is changed in place."""
    runner = SchedulerRunner(model_path=path)
    _watch_inflight_batches(runner.scheduler)
    real = runner.scheduler.running_batch.__class__.prepare_for_decode

    def mutating_prepare(self):
        old = self.seq_lens_cpu
        real(self)
        if old.numel() == self.seq_lens_cpu.numel():
            old.copy_(self.seq_lens_cpu)  # the bug: reuse last step's host tensor in place

    runner.scheduler.running_batch.__class__.prepare_for_decode = mutating_prepare
    try:
        with pytest.raises(AssertionError, match="changed while in flight"):
            runner.generate([[1, 2, 3], [4, 5]], {"temperature": 0, "max_new_tokens": 8})
    finally:
        runner.scheduler.running_batch.__class__.prepare_for_decode = real
