"""DP attention's gather and scatter (upstream's `layers/dp_attention.py`).

Each attention group runs attention on its own tokens; the MLP runs tensor-parallel over every
group's tokens. Before the MLP the groups' hidden states are gathered into one global buffer,
after it each group takes its rows back. Two layouts of the global buffer:

- SUM_LEN: the groups' tokens back to back (group r at the sum of the counts before it); the
  gather copies the local rows at their offset into zeros and all-reduces. Extend steps.
- MAX_LEN: every group padded to the largest count (group r at r * max_len); the gather is one
  all-gather, the scatter after the MLP can be a reduce-scatter of its partial sums. CUDA graphs
  (static shapes) and decode steps whose counts are even.

With more than one rank per attention group only the group's rank 0 contributes its rows to
the SUM_LEN all-reduce (the others hold the same rows); MAX_LEN all-gathers from the TP group,
so every rank contributes and the global buffer holds tp (not dp) slices of max_len rows, of
which each group reads its first rank's.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import IntEnum, auto

import torch

from sglab.srt.distributed.parallel_state import (
    get_attention_tp_group,
    get_dp_attention_info,
    get_tp_group,
)


class DpPaddingMode(IntEnum):
    MAX_LEN = auto()
    SUM_LEN = auto()

    def is_max_len(self) -> bool:
        return self == DpPaddingMode.MAX_LEN

    def is_sum_len(self) -> bool:
        return self == DpPaddingMode.SUM_LEN

    @classmethod
    def get_dp_padding_mode(cls, is_extend_in_batch: bool,
                            global_num_tokens: list[int]) -> "DpPaddingMode":
        """Upstream's choice: extend steps SUM_LEN (no padding of uneven prompts), otherwise
        whichever moves fewer rows, MAX_LEN on a tie."""
        dp_size = len(global_num_tokens)
        if is_extend_in_batch and dp_size > 1:
            return cls.SUM_LEN
        if sum(global_num_tokens) * 2 >= max(global_num_tokens) * dp_size:
            return cls.MAX_LEN
        return cls.SUM_LEN


@dataclass
class DpStepInfo:
    """One step's layout of the global buffer, the same on every rank (host values)."""

    global_num_tokens: list[int]  # tokens of each attention group this step
    padding_mode: DpPaddingMode

    @property
    def max_len(self) -> int:
        return max(self.global_num_tokens)

    def global_len(self) -> int:
        if self.padding_mode.is_max_len():
            return self.max_len * get_tp_group().world_size
        return sum(self.global_num_tokens)

    def local_start(self) -> int:
        info = get_dp_attention_info()
        if self.padding_mode.is_max_len():
            return get_tp_group().rank * self.max_len
        return sum(self.global_num_tokens[:info.dp_rank])


def dp_gather(local: torch.Tensor, step: DpStepInfo) -> torch.Tensor:
    """Every group's rows in one global buffer (see the module docstring for its layout)."""
    n = local.shape[0]
    if step.padding_mode.is_max_len():
        padded = local
        if n < step.max_len:
            padded = local.new_zeros((step.max_len, *local.shape[1:]))
            padded[:n] = local
        out = local.new_empty((step.global_len(), *local.shape[1:]))
        get_tp_group().all_gather_into_tensor(out, padded.contiguous())
        return out
    out = local.new_zeros((step.global_len(), *local.shape[1:]))
    if n and get_attention_tp_group().rank == 0:
        start = step.local_start()
        out[start:start + n] = local
    return get_tp_group().all_reduce(out)


def dp_scatter(global_out: torch.Tensor, step: DpStepInfo, num_local: int) -> torch.Tensor:
    """This group's `num_local` rows of a global buffer that every rank holds in full."""
    start = step.local_start()
    return global_out[start:start + num_local].clone()


def dp_reduce_scatter(partial: torch.Tensor, step: DpStepInfo, num_local: int) -> torch.Tensor:
    """This group's rows of the sum over ranks of `partial` (a row-parallel layer's unreduced
    output over the global buffer): one reduce-scatter under MAX_LEN, else all-reduce + slice."""
    if step.padding_mode.is_max_len():
        out = partial.new_empty((step.max_len, *partial.shape[1:]))
        get_tp_group().reduce_scatter_tensor(out, partial)
        return out[:num_local]
    return dp_scatter(get_tp_group().all_reduce(partial), step, num_local)
