"""The future map (by request row), the result copy ring and the decode input cache."""

from __future__ import annotations

import random

import pytest
import torch

from sglab.srt.managers.overlap_utils import FutureMap, ResultRing, StepStreams
from sglab.srt.model_executor.forward_batch_info import ForwardBatch
from sglab.test.runners import SchedulerRunner
from sglab.test.schedule_invariance import forced_retraction


def test_future_map_is_indexed_by_row():
    fm = FutureMap(8, torch.device("cpu"))
    fm.store(torch.tensor([5, 2]), torch.tensor([50, 20]))
    fm.store(torch.tensor([2]), torch.tensor([21]))  # a later forward of the same row wins
    assert fm.gather(torch.tensor([2, 5, 2])).tolist() == [21, 50, 21]


def test_result_ring_packs_a_step_and_reuses_read_slots():
    ring = ResultRing(StepStreams(torch.device("cpu")))
    ids = torch.tensor([3, 1, 4])
    one = ring.copy({"ids": ids, "logprobs": None})
    assert one.read() == {"ids": [3, 1, 4], "logprobs": None}
    lp, top = torch.tensor([-0.5, -1.5, -2.0]), torch.arange(6, dtype=torch.int64).view(3, 2)
    first = ring.copy({"ids": ids, "logprobs": lp, "top": top})
    second = ring.copy({"ids": ids + 1})  # the first is unread: it gets a slot of its own
    assert len(ring.slots) == 2
    assert second.read() == {"ids": [4, 2, 5]}
    assert first.read() == {"ids": [3, 1, 4], "logprobs": [-0.5, -1.5, -2.0],
                            "top": [[0, 1], [2, 3], [4, 5]]}
    ring.copy({"ids": ids}).read()
    assert len(ring.slots) == 2  # read slots are reused


def _prompts(seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    shared = [rng.randrange(900) for _ in range(30)]
    return [(shared if i % 2 else []) + [rng.randrange(900) for _ in range(rng.randrange(2, 40))]
            for i in range(10)]


def _generate(path: str, overlap: bool, retract: bool) -> list:
    # Deterministic mode: a retracted request's prefill of its output so far gives the bits
    # its decode gave, so the outputs must not move.
    runner = SchedulerRunner(model_path=path, disable_overlap_schedule=not overlap,
                             chunked_prefill_size=16, enable_deterministic_inference=True)
    params = {"temperature": 0, "ignore_eos": True, "max_new_tokens": 20}
    if retract:
        with forced_retraction(every=2):
            outs = runner.generate(_prompts(), params, return_logprob=True)
        assert sum(o.total_retractions for o in outs) > 0
    else:
        outs = runner.generate(_prompts(), params, return_logprob=True)
    assert runner.integrity_error() is None
    return [(o.output_ids, o.logprobs["output_token_logprobs_val"]) for o in outs]


def test_row_indexed_future_map_under_overlap_retraction_and_chunking(tiny_model_dir):
    """A retracted request re-enters with a new row; a chunked one samples junk at its row
    until its last chunk: the next decode of every row still reads the right token."""
    path = tiny_model_dir("tiny-qwen3")
    reference = _generate(path, overlap=False, retract=False)
    assert _generate(path, overlap=True, retract=True) == reference
    assert _generate(path, overlap=False, retract=True) == reference


def test_decode_inputs_cached_while_the_batch_keeps_its_requests(tiny_model_dir, monkeypatch):
    """Every decode step's device rows and lengths equal the host mirrors, and most steps
    reuse them (only the new KV slots are uploaded)."""
    original = ForwardBatch.__dict__["init_new"].__func__
    seen = {"decode": 0, "reused": 0}

    def init_new(cls, batch, model_runner):
        reused = model_runner.decode_inputs.reusable(batch)
        fb = original(cls, batch, model_runner)
        if batch.forward_mode.is_decode():
            assert fb.seq_lens.tolist() == batch.seq_lens_cpu.tolist()
            assert fb.req_pool_indices.tolist() == batch.req_pool_indices.tolist()
            assert fb.positions.tolist() == (batch.seq_lens_cpu - 1).tolist()
            seen["decode"] += 1
            seen["reused"] += reused
        return fb

    monkeypatch.setattr(ForwardBatch, "init_new", classmethod(init_new))
    _generate(tiny_model_dir("tiny-qwen3"), overlap=True, retract=False)
    assert seen["decode"] > 15 and seen["reused"] > seen["decode"] // 2, seen


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_result_ring_copy_waits_for_the_forward():
    """~50 ms of GPU work queued before the result is written: reading waits on the slot's
    event (not on a host sync of its own) and sees the final values."""
    ring = ResultRing(StepStreams(torch.device("cuda")))
    out = torch.zeros(1024, dtype=torch.int64, device="cuda")
    torch.cuda._sleep(100_000_000)
    out.fill_(7)
    pending = ring.copy({"ids": out})
    assert pending.read()["ids"] == [7] * 1024
