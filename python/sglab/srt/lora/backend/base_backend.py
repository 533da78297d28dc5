"""LoRA backends: how the batched segment GEMMs run. Each holds the current LoRABatchInfo."""

from __future__ import annotations

import torch

from sglab.srt.lora.utils import LoRABatchInfo


class BaseLoRABackend:
    name = "base"

    def __init__(self) -> None:
        self.batch_info: LoRABatchInfo | None = None

    def set_batch_info(self, batch_info: LoRABatchInfo) -> None:
        self.batch_info = batch_info

    def run_lora_a_sgemm(self, x: torch.Tensor, weights: torch.Tensor,
                         stack_num: int = 1) -> torch.Tensor:
        """x [S, K], weights [num_slots, stack_num * R, K] -> [S, stack_num * R]."""
        raise NotImplementedError

    def run_lora_b_sgemm(self, x: torch.Tensor, weights: torch.Tensor,
                         base_output: torch.Tensor) -> torch.Tensor:
        """base_output [S, N] += scaling * x [S, R] @ weights[slot] [N, R]^T, in place."""
        raise NotImplementedError

    def run_qkv_lora(self, x: torch.Tensor, qkv_lora_a: torch.Tensor, qkv_lora_b: torch.Tensor,
                     output_offset: torch.Tensor, output_offset_cpu: list[int],
                     max_qkv_out_dim: int, base_output: torch.Tensor) -> torch.Tensor:
        """LoRA A (3 stacked blocks) then B per q/k/v slice, added into base_output."""
        raise NotImplementedError

    def run_gate_up_lora(self, x: torch.Tensor, gate_up_lora_a: torch.Tensor,
                         gate_up_lora_b: torch.Tensor, output_offset: torch.Tensor,
                         output_offset_cpu: list[int], output_dim: int,
                         base_output: torch.Tensor) -> torch.Tensor:
        """LoRA A (2 stacked blocks) then B per gate/up slice, added into base_output."""
        raise NotImplementedError
