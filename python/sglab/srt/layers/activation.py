from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from sglab.srt.layers.elementwise import silu_and_mul, use_fused_kernels


class SiluAndMul(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if use_fused_kernels(x):
            return silu_and_mul(x)
        return self.forward_native(x)

    def forward_native(self, x: torch.Tensor) -> torch.Tensor:
        d = x.shape[-1] // 2
        return F.silu(x[..., :d]) * x[..., d:]
