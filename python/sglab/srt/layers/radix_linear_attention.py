from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

if TYPE_CHECKING:
    from sglab.srt.model_executor.forward_batch_info import ForwardBatch


class RadixLinearAttention(nn.Module):
    """One Gated DeltaNet layer's identity and parameters; the math and the state live in
    `forward_batch.attn_backend` (the hybrid backend's linear half)."""

    def __init__(self, layer_id: int, num_k_heads: int, num_v_heads: int, head_k_dim: int,
                 head_v_dim: int, conv_weights: torch.Tensor, A_log: torch.Tensor,
                 dt_bias: torch.Tensor):
        super().__init__()
        self.layer_id = layer_id
        self.num_k_heads, self.num_v_heads = num_k_heads, num_v_heads
        self.head_k_dim, self.head_v_dim = head_k_dim, head_v_dim
        self.k_dim = num_k_heads * head_k_dim
        self.v_dim = num_v_heads * head_v_dim
        # Shared with the owning layer (not registered here: the layer loads them).
        self.__dict__.update(conv_weights=conv_weights, A_log=A_log, dt_bias=dt_bias)

    def forward(self, forward_batch: "ForwardBatch", mixed_qkv: torch.Tensor, a: torch.Tensor,
                b: torch.Tensor) -> torch.Tensor:
        return forward_batch.attn_backend.forward_linear(self, forward_batch, mixed_qkv, a, b)
