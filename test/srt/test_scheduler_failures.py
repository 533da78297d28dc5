"""One request whose work fails inside the scheduler loop is aborted with the error; the loop
keeps serving the others, with unchanged outputs and every KV slot and pool row freed."""

from __future__ import annotations

import random

import pytest
import torch

from sglab.srt.managers import scheduler as scheduler_mod
from sglab.srt.managers.schedule_batch import Req, ScheduleBatch
from sglab.srt.managers.tp_worker import TpModelWorker
from sglab.test.runners import SchedulerRunner

GREEDY = {"temperature": 0, "ignore_eos": True, "max_new_tokens": 12}
MIXES = [{}, {"repetition_penalty": 1.4}, {"frequency_penalty": 0.7}, {}, {"min_new_tokens": 4}]
SHARED = 20  # prompt tokens every request shares
POISON = [997, 998, 999]  # the failing request's prompt has these after the shared part


class Injected(RuntimeError):
    pass


def _poisoned(req: Req) -> bool:
    return req.origin_input_ids[SHARED:SHARED + 3] == POISON


def _in_decode(req: Req) -> bool:
    return _poisoned(req) and len(req.output_ids) >= 2


def _wrap(monkeypatch, owner, name, fail_if):
    """Run the real method, then fail when `fail_if(self, *args)` holds (work half done)."""
    real = getattr(owner, name)

    def wrapped(self, *args, **kwargs):
        out = real(self, *args, **kwargs)
        if fail_if(self, *args):
            raise Injected(f"injected failure in {name}")
        return out

    monkeypatch.setattr(owner, name, wrapped)


def _batch_has(test):
    return lambda batch, *args: any(test(r) for r in batch.reqs)


def _forward_fails_for(monkeypatch, test) -> None:
    """The forward (KV written, tokens sampled, penalty state updated) fails afterwards."""
    real_mwb = ScheduleBatch.get_model_worker_batch

    def tagged(self):
        mwb = real_mwb(self)
        mwb.poisoned = any(test(r) for r in self.reqs)
        return mwb

    monkeypatch.setattr(ScheduleBatch, "get_model_worker_batch", tagged)
    _wrap(monkeypatch, TpModelWorker, "forward_batch_generation",
          lambda worker, batch: getattr(batch, "poisoned", False))


STAGES = {
    "admission": lambda mp: mp.setattr(
        scheduler_mod.Scheduler, "_make_req", _failing_make_req(scheduler_mod.Scheduler._make_req)),
    "prefix_match": lambda mp: _wrap(mp, Req, "init_next_round_input",
                                     lambda req, tree: _poisoned(req)),
    "prepare_for_extend": lambda mp: _wrap(mp, ScheduleBatch, "prepare_for_extend",
                                           _batch_has(_poisoned)),
    "prepare_for_decode": lambda mp: _wrap(mp, ScheduleBatch, "prepare_for_decode",
                                           _batch_has(_in_decode)),
    "prefill_worker_batch": lambda mp: _wrap(mp, ScheduleBatch, "get_model_worker_batch",
                                             _batch_has(_poisoned)),
    "decode_worker_batch": lambda mp: _wrap(mp, ScheduleBatch, "get_model_worker_batch",
                                            _batch_has(_in_decode)),
    "prefill_forward": lambda mp: _forward_fails_for(mp, _poisoned),
    "decode_forward": lambda mp: _forward_fails_for(mp, _in_decode),
    "result": lambda mp: _wrap(mp, scheduler_mod.Scheduler, "_append_token",
                               lambda s, req, result, i: _in_decode(req)),
    "output": lambda mp: _wrap(mp, scheduler_mod.Scheduler, "_token_output",
                               lambda s, reqs: any(_in_decode(r) for r in reqs)),
}


def _failing_make_req(real):
    def make_req(self, recv_req):
        if list(recv_req.input_ids[SHARED:SHARED + 3]) == POISON:
            raise Injected("injected failure in _make_req")
        return real(self, recv_req)
    return make_req


def _prompts() -> list[list[int]]:
    rng = random.Random(0)
    shared = [rng.randrange(900) for _ in range(SHARED)]
    return [shared + [rng.randrange(900) for _ in range(rng.randrange(1, 40))] for _ in MIXES]


@pytest.fixture(scope="module")
def path(tiny_model_dir):
    return tiny_model_dir("tiny-qwen3")


@pytest.fixture(scope="module")
def baseline(path):
    runner = SchedulerRunner(model_path=path)
    return [o.output_ids for o in _submit_all(runner, poison=False)]


def _submit_all(runner: SchedulerRunner, poison: bool):
    prompts = _prompts()
    runner.generate([prompts[0][:24]], GREEDY)  # caches the shared prefix: rows start with it
    bad = runner.submit(prompts[0][:SHARED] + POISON + prompts[1][SHARED:],
                        {**GREEDY, "repetition_penalty": 1.2}) if poison else None
    rids = [runner.submit(p, {**GREEDY, **m}) for p, m in zip(prompts, MIXES)]
    outs = runner.run()
    return [outs[r] for r in rids] + ([outs[bad]] if bad else [])


def _check_rows_after_recovery(monkeypatch, runner: SchedulerRunner) -> list[int]:
    """After each recovery: the device req_to_token, once the queued writes land, equals the
    host mirror on every running request's KV positions. Returns the number of checks made."""
    sched = runner.scheduler
    real = sched._isolate_failed_batch
    checked = []

    def isolate(batch, error):
        real(batch, error)
        pool = sched.req_to_token_pool
        device = pool.req_to_token.cpu().clone()
        writes = pool.flatten_writes(list(pool._pending_writes))
        if writes is not None:
            device.view(-1)[writes[0]] = writes[1]
        for req in sched.running_batch.reqs:
            n = len(req.origin_input_ids) + len(req.output_ids) - 1
            row = req.req_pool_idx
            assert device[row, :n].equal(pool.req_to_token_cpu[row, :n]), req.rid
        checked.append(len(sched.running_batch.reqs))

    monkeypatch.setattr(sched, "_isolate_failed_batch", isolate)
    return checked


@pytest.mark.parametrize("overlap", [False, True], ids=["normal", "overlap"])
@pytest.mark.parametrize("stage", STAGES)
def test_failing_request_is_aborted_and_others_unchanged(path, baseline, monkeypatch, stage,
                                                         overlap):
    runner = SchedulerRunner(model_path=path, disable_overlap_schedule=not overlap,
                             chunked_prefill_size=32, page_size=4 if overlap else 1)
    STAGES[stage](monkeypatch)
    checked = _check_rows_after_recovery(monkeypatch, runner)
    *others, bad = _submit_all(runner, poison=True)
    assert bool(checked) == (stage not in ("admission", "prefix_match", "result", "output"))
    assert [o.output_ids for o in others] == baseline
    reason = bad.finish_reason
    assert reason["type"] == "abort", reason
    assert reason["status_code"] == (400 if stage == "admission" else 500)
    assert "injected failure" in reason["message"]
    assert runner.integrity_error() is None
    monkeypatch.undo()
    (again,) = runner.generate([_prompts()[1]], {**GREEDY, **MIXES[1]})
    assert again.output_ids == baseline[1]
    assert runner.integrity_error() is None


def test_a_batch_that_always_fails_aborts_everyone_and_the_loop_survives(path, monkeypatch):
    runner = SchedulerRunner(model_path=path)
    _wrap(monkeypatch, TpModelWorker, "forward_batch_generation", lambda *a: True)
    outs = runner.generate(_prompts()[:3], GREEDY)
    assert all(o.finish_reason["status_code"] == 500 for o in outs)
    assert runner.integrity_error() is None
    monkeypatch.undo()
    (ok,) = runner.generate([[1, 2, 3]], {**GREEDY, "max_new_tokens": 3})
    assert len(ok.output_ids) == 3


@pytest.mark.skipif(not hasattr(torch, "AcceleratorError"), reason="torch has no AcceleratorError")
def test_a_device_fault_is_not_swallowed(path, monkeypatch):
    """A CUDA error leaves the whole context unusable: the loop stops instead of limping on."""
    runner = SchedulerRunner(model_path=path)

    def fault(self, batch):
        raise torch.AcceleratorError("CUDA error: an illegal memory access was encountered")

    monkeypatch.setattr(TpModelWorker, "forward_batch_generation", fault)
    runner.submit([1, 2, 3], GREEDY)
    with pytest.raises(torch.AcceleratorError):
        runner.run()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("stage", ["prefill_worker_batch", "prepare_for_decode",
                                   "decode_forward"])
def test_gpu_failing_request_with_cuda_graphs_and_overlap(path, monkeypatch, stage):
    kwargs = {"device": "cuda", "dtype": "float32", "attention_backend": "triton",
              "chunked_prefill_size": 32}
    baseline = [o.output_ids for o in _submit_all(SchedulerRunner(model_path=path, **kwargs),
                                                  poison=False)]
    runner = SchedulerRunner(model_path=path, **kwargs)
    assert runner.scheduler.tp_worker.model_runner.graph_runner is not None
    STAGES[stage](monkeypatch)
    checked = _check_rows_after_recovery(monkeypatch, runner)
    *others, bad = _submit_all(runner, poison=True)
    assert checked and [o.output_ids for o in others] == baseline
    assert bad.finish_reason["status_code"] == 500
    assert runner.integrity_error() is None
