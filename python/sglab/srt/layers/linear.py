"""Linear layers with fused parameters, loadable from HF's per-projection weights.

sglab runs one rank, so the "Parallel" names only mark which fused layout a layer has; they keep
upstream's names so model files and LoRA wrappers read the same as SGLang's.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from sglab.srt.batch_invariant_ops import linear_batch_invariant


class LinearBase(nn.Module):
    def __init__(self, input_size: int, output_size: int, bias: bool, params_dtype: torch.dtype,
                 batch_invariant: bool):
        super().__init__()
        self.input_size = input_size
        self.output_size = output_size
        self.weight = nn.Parameter(torch.empty(output_size, input_size, dtype=params_dtype),
                                   requires_grad=False)
        self.weight.weight_loader = self.weight_loader
        if bias:
            self.bias = nn.Parameter(torch.empty(output_size, dtype=params_dtype),
                                     requires_grad=False)
            self.bias.weight_loader = self.weight_loader
        else:
            self.register_parameter("bias", None)
        # --enable-deterministic-inference (ModelOptions.batch_invariant).
        self.batch_invariant = batch_invariant

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.batch_invariant:
            return linear_batch_invariant(x, self.weight, self.bias)
        return F.linear(x, self.weight, self.bias)

    def shard_range(self, shard_id: object) -> tuple[int, int]:
        raise NotImplementedError

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor,
                      shard_id: object = None) -> None:
        if shard_id is None:
            _copy_checked(param.data, loaded)
            return
        start, size = self.shard_range(shard_id)
        _copy_checked(param.data.narrow(0, start, size), loaded)


class ReplicatedLinear(LinearBase):
    def __init__(self, input_size: int, output_size: int, bias: bool = False,
                 params_dtype: torch.dtype = torch.float32, batch_invariant: bool = False):
        super().__init__(input_size, output_size, bias, params_dtype, batch_invariant)


class ColumnParallelLinear(ReplicatedLinear):
    pass


class RowParallelLinear(ReplicatedLinear):
    pass


class MergedColumnParallelLinear(LinearBase):
    """Several column blocks stacked along the output dim (e.g. gate_up_proj); shard ids 0, 1."""

    def __init__(self, input_size: int, output_sizes: list[int], bias: bool = False,
                 params_dtype: torch.dtype = torch.float32, batch_invariant: bool = False):
        self.output_sizes = list(output_sizes)
        super().__init__(input_size, sum(output_sizes), bias, params_dtype, batch_invariant)

    def shard_range(self, shard_id: object) -> tuple[int, int]:
        idx = int(shard_id)
        return sum(self.output_sizes[:idx]), self.output_sizes[idx]


class QKVParallelLinear(LinearBase):
    """q, k and v projections in one matrix; shard ids "q", "k", "v"."""

    def __init__(self, hidden_size: int, head_size: int, total_num_heads: int,
                 total_num_kv_heads: int, bias: bool = False,
                 params_dtype: torch.dtype = torch.float32, batch_invariant: bool = False):
        self.head_size = head_size
        self.num_heads = total_num_heads
        self.num_kv_heads = total_num_kv_heads
        self.q_size = total_num_heads * head_size
        self.kv_size = total_num_kv_heads * head_size
        self.output_sizes = [self.q_size, self.kv_size, self.kv_size]
        super().__init__(hidden_size, self.q_size + 2 * self.kv_size, bias, params_dtype,
                         batch_invariant)

    def shard_range(self, shard_id: object) -> tuple[int, int]:
        offsets = {"q": (0, self.q_size), "k": (self.q_size, self.kv_size),
                   "v": (self.q_size + self.kv_size, self.kv_size)}
        return offsets[shard_id]


def _copy_checked(dst: torch.Tensor, src: torch.Tensor) -> None:
    if tuple(dst.shape) != tuple(src.shape):
        raise ValueError(f"weight shape mismatch: expected {tuple(dst.shape)}, "
                         f"got {tuple(src.shape)}")
    dst.copy_(src.to(dst.dtype))
