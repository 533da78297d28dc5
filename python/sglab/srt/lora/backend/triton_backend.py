"""Triton LoRA backend: segment GEMMs whose grids depend only on host ints (bs, max_len), so
launches never sync and are CUDA-graph safe."""

from __future__ import annotations

import torch

from sglab.srt.lora.backend.base_backend import BaseLoRABackend
from sglab.srt.lora.triton_ops import (
    gate_up_lora_b_fwd,
    qkv_lora_b_fwd,
    sgemm_lora_a_fwd,
    sgemm_lora_b_fwd,
)


class TritonLoRABackend(BaseLoRABackend):
    name = "triton"

    def run_lora_a_sgemm(self, x: torch.Tensor, weights: torch.Tensor,
                         stack_num: int = 1) -> torch.Tensor:
        return sgemm_lora_a_fwd(x, weights, self.batch_info, stack_num)

    def run_lora_b_sgemm(self, x: torch.Tensor, weights: torch.Tensor,
                         base_output: torch.Tensor) -> torch.Tensor:
        return sgemm_lora_b_fwd(x, weights, self.batch_info, base_output)

    def run_qkv_lora(self, x, qkv_lora_a, qkv_lora_b, output_offset, output_offset_cpu,
                     max_qkv_out_dim, base_output):
        a_out = sgemm_lora_a_fwd(x, qkv_lora_a, self.batch_info, stack_num=3)
        return qkv_lora_b_fwd(a_out, qkv_lora_b, self.batch_info, output_offset,
                              max_qkv_out_dim, base_output)

    def run_gate_up_lora(self, x, gate_up_lora_a, gate_up_lora_b, output_offset,
                         output_offset_cpu, output_dim, base_output):
        a_out = sgemm_lora_a_fwd(x, gate_up_lora_a, self.batch_info, stack_num=2)
        return gate_up_lora_b_fwd(a_out, gate_up_lora_b, self.batch_info, output_offset,
                                  output_dim, base_output)
