"""How a decoder layer's MLP meets the ranks (upstream's `layers/communicator.py`, for the dense
layers sglab serves).

Without DP attention the MLP runs on the rank's tokens and its row-parallel output all-reduces
inside the layer. Under DP attention the normed hidden states of every attention group are
gathered first (`dp_gather`), the MLP runs tensor-parallel over all of them with its output
left unreduced, and one reduce-scatter (MAX_LEN) or all-reduce + slice (SUM_LEN) both sums the
partial products and hands each group its rows back.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable

import torch

from sglab.srt.layers.dp_attention import dp_gather, dp_reduce_scatter

if TYPE_CHECKING:
    from sglab.srt.model_executor.forward_batch_info import ForwardBatch


def forward_mlp(mlp: Callable[[torch.Tensor], torch.Tensor], hidden_states: torch.Tensor,
                forward_batch: "ForwardBatch") -> torch.Tensor:
    """`mlp(hidden_states)` for this rank's tokens; under DP attention (`forward_batch.dp_step`
    set) the MLP's row-parallel layer must be built with reduce_results=False."""
    step = forward_batch.dp_step
    if step is None:
        return mlp(hidden_states)
    num_local = hidden_states.shape[0]
    partial = mlp(dp_gather(hidden_states, step))
    return dp_reduce_scatter(partial, step, num_local)
