"""The input embedding and the LM head, split over TP ranks by vocabulary rows.

The vocabulary is padded to a multiple of the TP size (zero rows past the end); rank r holds
rows [r * V / tp, (r + 1) * V / tp). The embedding looks up the ids in its range and all-reduces;
the head's partial logits are all-gathered by the logits processor and cut back to the vocab.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from sglab.srt.distributed.parallel_state import (
    GroupCoordinator,
    get_attention_tp_group,
    get_tp_group,
    is_dp_attention_enabled,
)


def vocab_group() -> GroupCoordinator:
    """The group the vocabulary is split over: the TP group, or under DP attention (where each
    attention group embeds and projects its own tokens) the attention-TP group, as upstream's
    `--enable-dp-lm-head`."""
    return get_attention_tp_group() if is_dp_attention_enabled() else get_tp_group()


class VocabParallelEmbedding(nn.Module):
    def __init__(self, num_embeddings: int, embedding_dim: int,
                 params_dtype: torch.dtype = torch.float32, tp_rank: int | None = None,
                 tp_size: int | None = None, group: GroupCoordinator | None = None):
        super().__init__()
        self.group = group = group or vocab_group()
        self.tp_rank = group.rank if tp_rank is None else tp_rank
        self.tp_size = group.world_size if tp_size is None else tp_size
        self.num_embeddings = num_embeddings
        self.num_embeddings_per_partition = -(-num_embeddings // self.tp_size)
        self.vocab_start_index = self.tp_rank * self.num_embeddings_per_partition
        self.vocab_end_index = self.vocab_start_index + self.num_embeddings_per_partition
        self.weight = nn.Parameter(
            torch.empty(self.num_embeddings_per_partition, embedding_dim, dtype=params_dtype),
            requires_grad=False)
        self.weight.weight_loader = self.weight_loader
        self.weight.full_shape = (num_embeddings, embedding_dim)
        self.weight.load_full = self.weight_loader

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor,
                      shard_id: object = None) -> None:
        if tuple(loaded.shape) != tuple(param.full_shape):
            raise ValueError(f"weight shape mismatch: expected {tuple(param.full_shape)}, "
                             f"got {tuple(loaded.shape)}")
        part = loaded[self.vocab_start_index:self.vocab_end_index]
        param.data.zero_()
        param.data[: part.shape[0]].copy_(part.to(param.dtype))

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        if self.tp_size == 1:
            return F.embedding(input_ids, self.weight)
        in_range = (input_ids >= self.vocab_start_index) & (input_ids < self.vocab_end_index)
        local_ids = (input_ids - self.vocab_start_index) * in_range
        out = F.embedding(local_ids, self.weight) * in_range.unsqueeze(-1).to(self.weight.dtype)
        return self.group.all_reduce(out)


class ParallelLMHead(VocabParallelEmbedding):
    """The output projection; its weight may be tied to the input embedding. Its output is this
    rank's slice of the (padded) vocabulary."""

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return F.linear(hidden_states, self.weight)
