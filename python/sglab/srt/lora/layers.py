"""LoRA wrappers around the fused linear layers, swapped into a loaded model.

Each wrapper runs its base layer unchanged, then adds the batch's LoRA deltas through the
backend: `out = base(x) + s * x A^T B^T` per request. `set_lora_info` hands the wrapper its
layer's slot buffers; it runs for every module before every forward (outside CUDA-graph
replay), as upstream.

Under tensor parallelism the slots hold this rank's shard, cut from the tp=1 adapter by
`slice_lora_a_weights` / `slice_lora_b_weights` as the base weight is cut: a column-parallel
layer keeps A whole and the rows of B its outputs have (per q/k/v or gate/up block, KV heads
replicated as the base layer's); a row-parallel layer keeps its columns of A and all of B, and
all-reduces the rank-r product `x_shard A_shard^T` before B (upstream's order).
"""

from __future__ import annotations

import torch
from torch import nn

from sglab.srt.utils.h2d import list_to_device
from sglab.srt.layers.linear import (
    ColumnParallelLinear,
    LinearBase,
    MergedColumnParallelLinear,
    QKVParallelLinear,
    RowParallelLinear,
)
from sglab.srt.lora.backend.base_backend import BaseLoRABackend


class BaseLayerWithLoRA(nn.Module):
    def __init__(self, base_layer: LinearBase, lora_backend: BaseLoRABackend):
        super().__init__()
        self.base_layer = base_layer
        self.lora_backend = lora_backend
        self.set_lora = False

    @property
    def weight(self) -> torch.Tensor:
        return self.base_layer.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return self.base_layer.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        output = self.base_layer(x)
        if self.set_lora:
            shape = output.shape
            output = self.apply_lora(output.reshape(-1, shape[-1]),
                                     x.reshape(-1, x.shape[-1])).view(shape)
        return output

    def set_lora_info(self, A_buffer: torch.Tensor, B_buffer: torch.Tensor) -> None:
        self.set_lora = True
        self.A_buffer = A_buffer
        self.B_buffer = B_buffer

    def apply_lora(self, base_output: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        lora_a_output = self.lora_backend.run_lora_a_sgemm(x, self.A_buffer)
        return self.lora_backend.run_lora_b_sgemm(lora_a_output, self.B_buffer, base_output)

    def slice_lora_a_weights(self, A: torch.Tensor) -> torch.Tensor:
        """This rank's part of a tp=1 A `(stack_num, r, in)`."""
        return A

    def slice_lora_b_weights(self, B: torch.Tensor) -> torch.Tensor:
        """This rank's part of a tp=1 B `(sum of outs, r)`."""
        return B


class ColumnParallelLinearWithLoRA(BaseLayerWithLoRA):
    # The base layer's shard ids of the blocks stacked in B, in order.
    shard_ids: tuple = (None,)

    def __init__(self, base_layer: ColumnParallelLinear, lora_backend: BaseLoRABackend):
        super().__init__(base_layer, lora_backend)
        if base_layer.gather_output and base_layer.tp_size > 1:
            raise ValueError(f"LoRA on a gathering {type(base_layer).__name__} is not supported")

    def slice_lora_b_weights(self, B: torch.Tensor) -> torch.Tensor:
        base = self.base_layer
        if base.tp_size == 1:
            return B
        parts, offset = [], 0
        for shard_id in self.shard_ids:
            full, start, size = base.loaded_range(shard_id)
            parts.append(B[offset + start:offset + start + size])
            offset += full
        return torch.cat(parts) if len(parts) > 1 else parts[0]


class RowParallelLinearWithLoRA(BaseLayerWithLoRA):
    """o_proj / down_proj: x and A split by input columns, B whole."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        base = self.base_layer
        if not (self.set_lora and base.tp_size > 1 and base.reduce_results):
            # One rank, or partial sums reduced by the caller: the delta's partial adds in.
            return super().forward(x)
        out = base.group.all_reduce(base._matmul(x, None))
        shape = out.shape
        lora_a_output = self.lora_backend.run_lora_a_sgemm(x.reshape(-1, x.shape[-1]),
                                                           self.A_buffer)
        lora_a_output = base.group.all_reduce(lora_a_output)
        out = self.lora_backend.run_lora_b_sgemm(lora_a_output, self.B_buffer,
                                                 out.reshape(-1, shape[-1])).view(shape)
        return out if base.bias is None else out + base.bias

    def slice_lora_a_weights(self, A: torch.Tensor) -> torch.Tensor:
        base = self.base_layer
        if base.tp_size == 1:
            return A
        _, start, size = base.loaded_range(None)
        return A.narrow(-1, start, size)


class MergedColumnParallelLinearWithLoRA(ColumnParallelLinearWithLoRA):
    """gate_up_proj: A holds the gate and up rank blocks, B the gate then the up rows."""

    shard_ids = (0, 1)

    def __init__(self, base_layer: MergedColumnParallelLinear, lora_backend: BaseLoRABackend):
        super().__init__(base_layer, lora_backend)
        sizes = base_layer.output_sizes
        self.output_offset_cpu = [0, sizes[0], sizes[0] + sizes[1]]
        self.output_dim = max(sizes)
        self.output_offset = torch.tensor(self.output_offset_cpu, dtype=torch.int32,
                                          device=base_layer.weight.device)

    def set_lora_info(self, A_buffer_gate_up: torch.Tensor,
                      B_buffer_gate_up: torch.Tensor) -> None:
        self.set_lora = True
        self.A_buffer_gate_up = A_buffer_gate_up
        self.B_buffer_gate_up = B_buffer_gate_up

    def apply_lora(self, base_output: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return self.lora_backend.run_gate_up_lora(
            x, self.A_buffer_gate_up, self.B_buffer_gate_up, self.output_offset,
            self.output_offset_cpu, self.output_dim, base_output)


class QKVParallelLinearWithLoRA(ColumnParallelLinearWithLoRA):
    """qkv_proj: A holds the q, k, v rank blocks; B the q, k, v rows at `output_offset`."""

    shard_ids = ("q", "k", "v")

    def __init__(self, base_layer: QKVParallelLinear, lora_backend: BaseLoRABackend, *,
                 cache_qkv_offset: bool):
        super().__init__(base_layer, lora_backend)
        q, kv = base_layer.q_size, base_layer.kv_size
        self.output_offset_cpu = [0, q, q + kv, q + 2 * kv]
        self.max_qkv_out_dim = max(q, kv)
        self.cache_qkv_offset = cache_qkv_offset  # patch 0005 (sglang#6960)
        device = base_layer.weight.device
        # One tensor object for the layer's lifetime: CUDA graphs read it by address.
        if cache_qkv_offset:
            self.output_offset = torch.tensor(self.output_offset_cpu, dtype=torch.int32,
                                              device=device)
        else:
            self.output_offset = torch.empty(4, dtype=torch.int32, device=device)

    def set_lora_info(self, A_buffer_qkv: torch.Tensor, B_buffer_qkv: torch.Tensor) -> None:
        self.set_lora = True
        self.A_buffer_qkv = A_buffer_qkv
        self.B_buffer_qkv = B_buffer_qkv
        if not self.cache_qkv_offset:
            # Before sglang#6960: the offsets are rebuilt from a Python list on every call, a
            # blocking host->device copy per layer per forward.
            self.output_offset[:4] = list_to_device(self.output_offset_cpu, torch.int32,
                                                    self.output_offset.device)

    def apply_lora(self, base_output: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return self.lora_backend.run_qkv_lora(
            x, self.A_buffer_qkv, self.B_buffer_qkv, self.output_offset, self.output_offset_cpu,
            self.max_qkv_out_dim, base_output)


def get_lora_layer(layer: nn.Module, lora_backend: BaseLoRABackend, *,
                   cache_qkv_offset: bool) -> BaseLayerWithLoRA:
    """The wrapper for a base layer, most specific type first; `cache_qkv_offset` is patch
    0005's flag (QKV wrappers only)."""
    if isinstance(layer, QKVParallelLinear):
        return QKVParallelLinearWithLoRA(layer, lora_backend, cache_qkv_offset=cache_qkv_offset)
    if isinstance(layer, MergedColumnParallelLinear):
        return MergedColumnParallelLinearWithLoRA(layer, lora_backend)
    if isinstance(layer, RowParallelLinear):
        return RowParallelLinearWithLoRA(layer, lora_backend)
    if isinstance(layer, ColumnParallelLinear):
        return ColumnParallelLinearWithLoRA(layer, lora_backend)
    raise TypeError(f"no LoRA wrapper for {type(layer).__name__}")


def replace_submodule(model: nn.Module, module_name: str, new_module: nn.Module) -> nn.Module:
    parent_name, _, attr = module_name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, attr, new_module)
    return new_module
