from __future__ import annotations

import torch
from torch import nn

from sglab.srt.layers.elementwise import rmsnorm, use_fused_kernels


class RMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float = 1e-6, params_dtype: torch.dtype = torch.float32):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size, dtype=params_dtype), requires_grad=False)
        self.variance_epsilon = eps

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None):
        """Without residual: norm(x). With residual: (norm(x + residual), x + residual)."""
        if use_fused_kernels(x):
            return rmsnorm(x, self.weight, self.variance_epsilon, residual)
        return self.forward_native(x, residual)

    def forward_native(self, x: torch.Tensor, residual: torch.Tensor | None = None):
        if residual is not None:
            x = x + residual
            residual = x
        orig_dtype = x.dtype
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)
        out = (xf.to(orig_dtype) * self.weight).to(orig_dtype)
        return out if residual is None else (out, residual)


class GemmaRMSNorm(RMSNorm):
    """Zero-centred RMSNorm: norm(x) * (1 + weight), in fp32, rounded once at the end (Qwen3.5's
    `Qwen3_5RMSNorm`, upstream's `GemmaRMSNorm`)."""

    def __init__(self, hidden_size: int, eps: float = 1e-6,
                 params_dtype: torch.dtype = torch.float32):
        super().__init__(hidden_size, eps, params_dtype)
        self.weight.data.zero_()

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None):
        return self.forward_native(x, residual)

    def forward_native(self, x: torch.Tensor, residual: torch.Tensor | None = None):
        if residual is not None:
            x = x + residual
            residual = x
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)
        out = (xf * (1.0 + self.weight.float())).to(x.dtype)
        return out if residual is None else (out, residual)


class RMSNormGated(nn.Module):
    """RMSNorm of x (per head), then times silu(gate): the Gated DeltaNet output norm."""

    def __init__(self, hidden_size: int, eps: float = 1e-6,
                 params_dtype: torch.dtype = torch.float32):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size, dtype=params_dtype), requires_grad=False)
        self.variance_epsilon = eps

    def forward(self, x: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)
        out = self.weight * xf.to(x.dtype)
        return (out * torch.nn.functional.silu(gate.float())).to(x.dtype)
