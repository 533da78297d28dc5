"""LoRA vocabulary shared by the loader, the pool, the layers and the backends."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

# HF projection name -> the fused module sglab's models have, and its slice in that module.
HF_TO_FUSED: dict[str, tuple[str, int]] = {
    "q_proj": ("qkv_proj", 0),
    "k_proj": ("qkv_proj", 1),
    "v_proj": ("qkv_proj", 2),
    "o_proj": ("o_proj", 0),
    "gate_proj": ("gate_up_proj", 0),
    "up_proj": ("gate_up_proj", 1),
    "down_proj": ("down_proj", 0),
}
# Fused module -> number of stacked slices (LoRA A blocks) it holds.
FUSED_STACK_NUM: dict[str, int] = {"qkv_proj": 3, "gate_up_proj": 2, "o_proj": 1, "down_proj": 1}
SUPPORTED_TARGET_MODULES = list(HF_TO_FUSED) + ["qkv_proj", "gate_up_proj"]


def get_normalized_target_modules(names: list[str] | set[str]) -> set[str]:
    """HF or fused projection names -> the fused module names they touch."""
    out = set()
    for name in names:
        if name in FUSED_STACK_NUM:
            out.add(name)
        elif name in HF_TO_FUSED:
            out.add(HF_TO_FUSED[name][0])
        else:
            raise ValueError(f"unsupported LoRA target module {name!r} "
                             f"(supported: {', '.join(SUPPORTED_TARGET_MODULES)})")
    return out


@dataclass
class LoRABatchInfo:
    """Per-forward LoRA metadata, shared by every LoRA module through the backend.

    Device tensors feed the kernels; `max_len` and the `_cpu` lists are host mirrors (grid sizes,
    the torch backend's segment loop), never read back from the device.
    """

    bs: int
    max_len: int  # longest segment (1 in decode)
    seg_lens: torch.Tensor  # [bs] int32: tokens of each request in this forward
    seg_indptr: torch.Tensor  # [bs + 1] int32: exclusive cumsum of seg_lens
    weight_indices: torch.Tensor  # [bs] int32: pool slot of each request's adapter
    lora_ranks: torch.Tensor  # [num_slots] int32: rank of the adapter in each slot (0 = none)
    scalings: torch.Tensor  # [num_slots] float32: lora_alpha / r of each slot
    seg_lens_cpu: list[int] = field(default_factory=list)
    weight_indices_cpu: list[int] = field(default_factory=list)


@dataclass(frozen=True)
class LoRAModuleShape:
    """A fused module's input dim and the output dim of each stacked slice."""

    in_dim: int
    out_dims: tuple[int, ...]

    @property
    def stack_num(self) -> int:
        return len(self.out_dims)

    @property
    def out_dim(self) -> int:
        return sum(self.out_dims)

    def output_offset(self) -> list[int]:
        """[0, end of slice 0, end of slice 1, ...]."""
        offsets = [0]
        for d in self.out_dims:
            offsets.append(offsets[-1] + d)
        return offsets
