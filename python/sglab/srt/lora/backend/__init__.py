"""LoRA backends by name (`--lora-backend`)."""

from __future__ import annotations

import torch

from sglab.srt.lora.backend.base_backend import BaseLoRABackend

LORA_BACKEND_CHOICES = ["triton", "torch_native"]


def get_backend_from_name(name: str, device: torch.device) -> BaseLoRABackend:
    if name == "torch_native":
        from sglab.srt.lora.backend.torch_backend import TorchNativeLoRABackend

        return TorchNativeLoRABackend()
    if name == "triton":
        from sglab.srt.lora.backend.triton_backend import TritonLoRABackend

        return TritonLoRABackend()
    raise ValueError(f"--lora-backend: unsupported value {name!r} "
                     f"(choose from {', '.join(LORA_BACKEND_CHOICES)})")
