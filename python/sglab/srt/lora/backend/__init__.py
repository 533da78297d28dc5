"""LoRA backends by name (`--lora-backend`)."""

from __future__ import annotations

import os

import torch

from sglab.srt.lora.backend.base_backend import BaseLoRABackend

LORA_BACKEND_CHOICES = ["triton", "torch_native"]


def get_backend_from_name(name: str, device: torch.device) -> BaseLoRABackend:
    if name == "torch_native":
        from sglab.srt.lora.backend.torch_backend import TorchNativeLoRABackend

        return TorchNativeLoRABackend()
    if name == "triton":
        if torch.device(device).type == "cpu":
            # Triton picks its CPU interpreter when kernels are defined (first import).
            os.environ.setdefault("TRITON_INTERPRET", "1")
        from sglab.srt.lora.backend.triton_backend import TritonLoRABackend

        return TritonLoRABackend()
    raise ValueError(f"--lora-backend: unsupported value {name!r} "
                     f"(choose from {', '.join(LORA_BACKEND_CHOICES)})")
