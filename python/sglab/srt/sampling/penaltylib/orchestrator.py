"""Penalties over each request's tokens so far, kept on the device as per-row state.

An orchestrator belongs to a `ScheduleBatch` and follows its rows: it is built from the
requests' host tokens when they enter a batch (prefill, a retracted request's return, recovery
from a failed step), updated on the device with each step's sampled tokens (never waiting for
the host, so overlap scheduling sees the same state as the normal loop), and filtered and merged
with the batch. Every operation is row-wise and of fixed shape ([bs, vocab]), with no host read:
a request's adjustment depends on its own tokens only. A batch in which no request asks for a
penalty has no orchestrator and pays nothing.
"""

from __future__ import annotations

import copy
from typing import TYPE_CHECKING, ClassVar

import torch

from sglab.srt.utils.h2d import h2d

if TYPE_CHECKING:
    from sglab.srt.managers.schedule_batch import Req


class _BatchedPenalizer:
    """One kind of penalty. `Kind(reqs, vocab_size, device)` builds one state row per request
    from its host tokens (neutral for a request that does not ask for this penalty)."""

    is_multiplicative: ClassVar[bool] = False

    @staticmethod
    def is_required(req: "Req") -> bool:
        raise NotImplementedError

    def cumulate_output_tokens(self, next_token_ids: torch.Tensor) -> None:
        """Count one more output token per row (the tokens just sampled, on the device)."""
        raise NotImplementedError

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def state(self) -> dict[str, torch.Tensor]:
        """The per-row tensors (dim 0 = row), by attribute name."""
        return {k: v for k, v in vars(self).items() if isinstance(v, torch.Tensor)}

    def with_state(self, state: dict[str, torch.Tensor]) -> "_BatchedPenalizer":
        """A copy whose per-row tensors are `state` (rows filtered or merged)."""
        other = copy.copy(self)
        vars(other).update(state)
        return other


def token_counts(token_lists: list[list[int]], vocab_size: int,
                 device: torch.device | str) -> torch.Tensor:
    """[rows, vocab] int32: how often each token occurs in each row's list (one upload)."""
    counts = torch.zeros((len(token_lists), vocab_size), dtype=torch.int32, device=device)
    rows = [i for i, tokens in enumerate(token_lists) for _ in tokens]
    if rows:
        cols = [t for tokens in token_lists for t in tokens]
        index = h2d([rows, cols], torch.int64, device, pin=True)
        counts.index_put_((index[0], index[1]), torch.ones_like(index[0], dtype=torch.int32),
                          accumulate=True)
    return counts


def per_row(values: list, dtype: torch.dtype, device: torch.device | str) -> torch.Tensor:
    """[rows, 1] device column of one value per row."""
    return h2d(values, dtype, device, pin=True).view(-1, 1)


class BatchedPenalizerOrchestrator:
    def __init__(self, kinds: tuple[type[_BatchedPenalizer], ...],
                 penalizers: list[_BatchedPenalizer], vocab_size: int,
                 device: torch.device | str):
        self.kinds = kinds  # every penalty a request may ask for, in the order they apply
        self.penalizers = penalizers  # those some row of the batch needs
        self.vocab_size = vocab_size
        self.device = device

    @classmethod
    def from_reqs(cls, kinds: tuple[type[_BatchedPenalizer], ...], reqs: list["Req"],
                  vocab_size: int,
                  device: torch.device | str) -> "BatchedPenalizerOrchestrator | None":
        """The state of `reqs` from their host tokens; None when none of them needs any."""
        needed = [k for k in kinds if any(k.is_required(r) for r in reqs)]
        if not needed:
            return None
        return cls(kinds, [k(reqs, vocab_size, device) for k in needed], vocab_size, device)

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        for penalizer in self.penalizers:
            logits = penalizer.apply(logits)
        return logits

    def cumulate_output_tokens(self, next_token_ids: torch.Tensor) -> None:
        for penalizer in self.penalizers:
            penalizer.cumulate_output_tokens(next_token_ids)

    def filter(self, keep_indices: list[int],
               kept_reqs: list["Req"]) -> "BatchedPenalizerOrchestrator | None":
        """The rows `keep_indices` (of `kept_reqs`); None when none of them needs a penalty."""
        kept = [p for p in self.penalizers if any(p.is_required(r) for r in kept_reqs)]
        if not kept:
            return None
        index = h2d(keep_indices, torch.int64, self.device, pin=True)
        return self._with([p.with_state({k: v[index] for k, v in p.state().items()})
                           for p in kept])

    @staticmethod
    def merge(ours: "BatchedPenalizerOrchestrator | None", our_reqs: list["Req"],
              theirs: "BatchedPenalizerOrchestrator | None",
              their_reqs: list["Req"]) -> "BatchedPenalizerOrchestrator | None":
        """Rows of `our_reqs` then `their_reqs`; a side without a penalty gets neutral rows."""
        ref = ours if ours is not None else theirs
        if ref is None:
            return None
        mine = {type(p): p for p in ours.penalizers} if ours is not None else {}
        other = {type(p): p for p in theirs.penalizers} if theirs is not None else {}
        merged = []
        for kind in ref.kinds:
            if kind in mine or kind in other:
                a = mine.get(kind) or kind(our_reqs, ref.vocab_size, ref.device)
                b = other.get(kind) or kind(their_reqs, ref.vocab_size, ref.device)
                tail = b.state()
                merged.append(a.with_state({k: torch.cat([v, tail[k]])
                                               for k, v in a.state().items()}))
        return ref._with(merged)

    def _with(self, penalizers: list[_BatchedPenalizer]) -> "BatchedPenalizerOrchestrator":
        return BatchedPenalizerOrchestrator(self.kinds, penalizers, self.vocab_size, self.device)
