"""torch_native LoRA backend: plain torch ops, the reference for the Triton kernels.

One token per request (decode): gather each request's slot weights and `bmm`, sync-free and
capturable in a CUDA graph. Otherwise: loop over the segments with the host mirrors
(`seg_lens_cpu`, `weight_indices_cpu`), one matmul per request.
"""

from __future__ import annotations

import torch

from sglab.srt.lora.backend.base_backend import BaseLoRABackend


class TorchNativeLoRABackend(BaseLoRABackend):
    name = "torch_native"

    def _one_token_each(self, x: torch.Tensor) -> bool:
        bi = self.batch_info
        return bi.max_len == 1 and x.shape[0] == bi.bs

    def run_lora_a_sgemm(self, x: torch.Tensor, weights: torch.Tensor,
                         stack_num: int = 1) -> torch.Tensor:
        bi = self.batch_info
        if self._one_token_each(x):
            w = weights[bi.weight_indices]  # [bs, N, K]
            return torch.bmm(w, x.unsqueeze(-1)).squeeze(-1)
        out = x.new_zeros(x.shape[0], weights.shape[1])
        start = 0
        for n, slot in zip(bi.seg_lens_cpu, bi.weight_indices_cpu):
            out[start:start + n] = x[start:start + n] @ weights[slot].T
            start += n
        return out

    def run_lora_b_sgemm(self, x: torch.Tensor, weights: torch.Tensor,
                         base_output: torch.Tensor) -> torch.Tensor:
        bi = self.batch_info
        if self._one_token_each(x):
            w = weights[bi.weight_indices]  # [bs, N, R]
            delta = torch.bmm(w, x.unsqueeze(-1)).squeeze(-1)
            base_output += delta * bi.scalings[bi.weight_indices].unsqueeze(-1).to(delta.dtype)
            return base_output
        start = 0
        for n, slot in zip(bi.seg_lens_cpu, bi.weight_indices_cpu):
            delta = x[start:start + n] @ weights[slot].T
            base_output[start:start + n] += delta * bi.scalings[slot].to(delta.dtype)
            start += n
        return base_output

    def _run_stacked(self, x: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor,
                     offsets_cpu: list[int], base_output: torch.Tensor) -> torch.Tensor:
        stack_num = len(offsets_cpu) - 1
        a_out = self.run_lora_a_sgemm(x, lora_a, stack_num)
        rank = lora_b.shape[2]
        for i in range(stack_num):
            lo, hi = offsets_cpu[i], offsets_cpu[i + 1]
            self.run_lora_b_sgemm(a_out[:, i * rank:(i + 1) * rank], lora_b[:, lo:hi],
                                  base_output[:, lo:hi])
        return base_output

    def run_qkv_lora(self, x, qkv_lora_a, qkv_lora_b, output_offset, output_offset_cpu,
                     max_qkv_out_dim, base_output):
        return self._run_stacked(x, qkv_lora_a, qkv_lora_b, output_offset_cpu, base_output)

    def run_gate_up_lora(self, x, gate_up_lora_a, gate_up_lora_b, output_offset,
                         output_offset_cpu, output_dim, base_output):
        return self._run_stacked(x, gate_up_lora_a, gate_up_lora_b, output_offset_cpu,
                                 base_output)
