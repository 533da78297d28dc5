"""Triton segment-GEMM kernels for batched multi-LoRA (the torch_native backend is their reference)."""

from sglab.srt.lora.triton_ops.sgemm_lora_a import sgemm_lora_a_fwd
from sglab.srt.lora.triton_ops.sgemm_lora_b import sgemm_lora_b_fwd
from sglab.srt.lora.triton_ops.stacked_lora_b import gate_up_lora_b_fwd, qkv_lora_b_fwd

__all__ = ["gate_up_lora_b_fwd", "qkv_lora_b_fwd", "sgemm_lora_a_fwd", "sgemm_lora_b_fwd"]
