"""Patch 0001's upload forms: the same device tensors from pageable, pinned and one packed copy."""

from __future__ import annotations

import pytest
import torch

from sglab.srt.utils.h2d import H2D_MODES, PinnedStagingRing, StepUploader


def _items(bs: int) -> dict:
    return {
        "input_ids": (torch.arange(bs, dtype=torch.int64) * 7, torch.int64),
        "seq_lens": (list(range(3, 3 + bs)), torch.int64),
        "extend_seq_lens": (list(range(1, bs + 1)), torch.int32),
        "empty": ([], torch.int32),
        "temperatures": (torch.linspace(0.5, 1.5, bs).view(-1, 1), torch.float32),
        "req_to_token_value": (torch.arange(5, dtype=torch.int64), torch.int32),  # cast
        "top_ps": ([0.25] * bs, torch.float32),
    }


@pytest.mark.parametrize("bs", [1, 3, 64])
def test_modes_upload_the_same_tensors(bs):
    got = {mode: StepUploader("cpu", mode).upload(_items(bs)) for mode in H2D_MODES}
    for name, (data, dtype) in _items(bs).items():
        ref = data.to(dtype) if isinstance(data, torch.Tensor) else torch.tensor(data,
                                                                                  dtype=dtype)
        for mode in H2D_MODES:
            t = got[mode][name]
            assert t.dtype == dtype and t.shape == ref.shape, (mode, name)
            assert torch.equal(t, ref), (mode, name)


def test_packed_is_one_buffer_and_the_ring_reuses_slots():
    ring = PinnedStagingRing(torch.device("cpu"), num_slots=2)
    first = ring.upload(_items(4))
    storages = {t.untyped_storage().data_ptr() for t in first.values()}
    assert len(storages) == 1  # every tensor of the step is a view of one copied buffer
    slot0 = ring.slots[0]
    ring.upload(_items(4))
    ring.upload(_items(4))  # back to slot 0, same size: reused, not reallocated
    assert ring.slots[0] is slot0
    big = ring.upload(_items(500))  # grows the slot it lands on
    assert ring.slots[1].numel() >= sum(t.numel() * t.element_size() for t in big.values())
    assert torch.equal(first["input_ids"], torch.arange(4) * 7)  # earlier views stay valid


class _NoWaitRing(PinnedStagingRing):
    """The unsafe variant: rewrites a slot without waiting for the copy that reads it."""

    def _take_slot(self, nbytes: int):
        self.events = [None] * len(self.events)
        return super()._take_slot(nbytes)


def _delayed_uploads(ring: PinnedStagingRing) -> list[torch.Tensor]:
    """Queue ~50 ms of GPU work, then three uploads through a one-slot ring."""
    torch.cuda.synchronize()
    torch.cuda._sleep(100_000_000)
    outs = [ring.upload({"x": (torch.full((256,), v, dtype=torch.int64), torch.int64)})["x"]
            for v in (1, 2, 3)]
    torch.cuda.synchronize()
    return outs


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_ring_waits_for_the_copy_before_reusing_a_slot():
    safe = _delayed_uploads(PinnedStagingRing(torch.device("cuda"), num_slots=1))
    assert [int(t[0]) for t in safe] == [1, 2, 3]
    unsafe = _delayed_uploads(_NoWaitRing(torch.device("cuda"), num_slots=1))
    assert [int(t[0]) for t in unsafe] != [1, 2, 3]  # the check catches the missing wait
