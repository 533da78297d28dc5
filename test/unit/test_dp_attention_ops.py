"""DP attention's gather and scatter on gloo, against a torch reference computed from every
rank's inputs: both padding modes, attention groups of one rank (tp 2 / dp 2) and of two
(tp 4 / dp 2, where a group's ranks hold the same rows), a group with no tokens."""

from __future__ import annotations

import socket

import pytest
import torch
import torch.multiprocessing as mp

from sglab.srt.distributed.parallel_state import destroy_model_parallel, initialize_model_parallel
from sglab.srt.layers.dp_attention import (
    DpPaddingMode,
    DpStepInfo,
    dp_gather,
    dp_reduce_scatter,
)

HIDDEN = 4


def _rows(dp_rank: int, n: int) -> torch.Tensor:
    return torch.arange(n * HIDDEN, dtype=torch.float32).view(n, HIDDEN) + 100 * (dp_rank + 1)


def _partial(tp_rank: int, global_rows: torch.Tensor) -> torch.Tensor:
    """A row-parallel layer's unreduced output: each rank's share of the global rows."""
    return global_rows * (tp_rank + 1)


CASES = [(counts, mode) for counts in ([3, 5], [4, 0])  # uneven; one group idle
         for mode in (DpPaddingMode.SUM_LEN, DpPaddingMode.MAX_LEN)]


def _worker(tp_rank: int, tp_size: int, dp_size: int, port: int, results) -> None:
    initialize_model_parallel(tp_rank, tp_size, f"tcp://127.0.0.1:{port}", "cpu",
                              dp_size=dp_size, enable_dp_attention=True)
    try:
        dp_rank = tp_rank // (tp_size // dp_size)
        out = []
        for counts, mode in CASES:
            step = DpStepInfo(counts, mode)
            gathered = dp_gather(_rows(dp_rank, counts[dp_rank]), step)
            mine = dp_reduce_scatter(_partial(tp_rank, gathered), step, counts[dp_rank])
            out.append((gathered, mine))
        results[tp_rank] = out
    finally:
        destroy_model_parallel()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("tp_size,dp_size", [(2, 2), (4, 2)])
def test_gather_and_reduce_scatter_match_the_reference(tp_size, dp_size):
    results = mp.Manager().dict()
    mp.spawn(_worker, args=(tp_size, dp_size, _free_port(), results), nprocs=tp_size,
             join=True)
    attn_tp = tp_size // dp_size
    scale = sum(r + 1 for r in range(tp_size))  # the sum over ranks of _partial's factor
    for case, (counts, mode) in enumerate(CASES):
        everyone = [_rows(d, n) for d, n in enumerate(counts)]
        for tp_rank in range(tp_size):
            gathered, mine = results[tp_rank][case]
            if mode.is_sum_len():
                assert torch.equal(gathered, torch.cat(everyone))
            else:  # every rank's rows at its slice of max_len (a group's ranks: the same)
                max_len = max(counts)
                for r in range(tp_size):
                    d = r // attn_tp
                    piece = gathered[r * max_len:(r + 1) * max_len]
                    assert torch.equal(piece[:counts[d]], everyone[d])
                    assert not piece[counts[d]:].any()
            assert torch.equal(mine, everyone[tp_rank // attn_tp] * scale)


def test_padding_mode_follows_upstream():
    assert DpPaddingMode.get_dp_padding_mode(True, [4, 4]) == DpPaddingMode.SUM_LEN
    assert DpPaddingMode.get_dp_padding_mode(False, [4, 4]) == DpPaddingMode.MAX_LEN
    assert DpPaddingMode.get_dp_padding_mode(False, [3, 1]) == DpPaddingMode.MAX_LEN
    # Padding four groups to 9 moves more rows than their sum: SUM_LEN.
    assert DpPaddingMode.get_dp_padding_mode(False, [9, 1, 1, 1]) == DpPaddingMode.SUM_LEN
