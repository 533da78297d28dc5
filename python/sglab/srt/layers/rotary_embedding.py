"""Rotary position embedding (neox style), with llama3 frequency scaling."""

from __future__ import annotations

import math

import torch
from torch import nn


def get_rope_config(hf_config) -> tuple[float, dict | None]:
    """(rope_theta, scaling dict or None) from either transformers config layout."""
    params = getattr(hf_config, "rope_parameters", None)
    if isinstance(params, dict) and params:
        theta = params.get("rope_theta", getattr(hf_config, "rope_theta", 10000.0))
        rope_type = params.get("rope_type", params.get("type", "default"))
        return float(theta), (params if rope_type not in (None, "default") else None)
    scaling = getattr(hf_config, "rope_scaling", None)
    theta = float(getattr(hf_config, "rope_theta", 10000.0))
    if scaling and scaling.get("rope_type", scaling.get("type")) not in (None, "default"):
        return theta, scaling
    return theta, None


def _base_inv_freq(rotary_dim: int, base: float) -> torch.Tensor:
    exponents = torch.arange(0, rotary_dim, 2, dtype=torch.int64).float() / rotary_dim
    return 1.0 / (base ** exponents)


def _llama3_inv_freq(inv_freq: torch.Tensor, scaling: dict) -> torch.Tensor:
    factor = scaling["factor"]
    low, high = scaling["low_freq_factor"], scaling["high_freq_factor"]
    old_len = scaling["original_max_position_embeddings"]
    low_wavelen, high_wavelen = old_len / low, old_len / high
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    is_medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
    return torch.where(is_medium, smoothed, scaled)


class RotaryEmbedding(nn.Module):
    """Neox-style RoPE over the first `rotary_dim` dims of each head (all of it by default; a
    partial rotary factor leaves the rest unrotated)."""

    def __init__(self, head_size: int, max_position: int, base: float,
                 rope_scaling: dict | None = None, dtype: torch.dtype = torch.float32,
                 rotary_dim: int | None = None):
        super().__init__()
        self.head_size = head_size
        self.rotary_dim = rotary_dim or head_size
        inv_freq = _base_inv_freq(self.rotary_dim, base)
        if rope_scaling is not None:
            rope_type = rope_scaling.get("rope_type", rope_scaling.get("type"))
            if rope_type != "llama3":
                raise ValueError(f"Unsupported rope scaling type: {rope_type!r}")
            inv_freq = _llama3_inv_freq(inv_freq, rope_scaling)
        t = torch.arange(max_position, dtype=torch.int64).float()
        freqs = torch.outer(t, inv_freq)
        cache = torch.cat([freqs.cos(), freqs.sin()], dim=-1)
        self.register_buffer("cos_sin_cache", cache.to(dtype), persistent=False)

    def forward(self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor):
        """q: [T, Hq*D], k: [T, Hkv*D] (flattened heads); returns rotated q, k."""
        cos, sin = self.cos_sin_cache.index_select(0, positions).chunk(2, dim=-1)
        cos = torch.cat([cos, cos], dim=-1).unsqueeze(1)
        sin = torch.cat([sin, sin], dim=-1).unsqueeze(1)
        return self._rotate(q, cos, sin), self._rotate(k, cos, sin)

    def _rotate(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x = x.reshape(shape[0], -1, self.head_size)
        if self.rotary_dim != self.head_size:
            rot, rest = x[..., :self.rotary_dim], x[..., self.rotary_dim:]
            return torch.cat([self._rotate_heads(rot, cos, sin), rest], dim=-1).view(shape)
        return self._rotate_heads(x, cos, sin).view(shape)

    def _rotate_heads(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        half = self.rotary_dim // 2
        rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
        return x * cos.to(x.dtype) + rotated * sin.to(x.dtype)


def get_rope(head_size: int, max_position: int, hf_config,
             dtype: torch.dtype = torch.float32) -> RotaryEmbedding:
    base, scaling = get_rope_config(hf_config)
    return RotaryEmbedding(head_size, max_position, base, scaling, dtype=torch.float32,
                           rotary_dim=int(head_size * partial_rotary_factor(hf_config)))


def partial_rotary_factor(hf_config) -> float:
    """The share of each head that RoPE rotates (Qwen3.5: 0.25), from either config layout."""
    params = getattr(hf_config, "rope_parameters", None)
    if isinstance(params, dict) and "partial_rotary_factor" in params:
        return float(params["partial_rotary_factor"])
    return float(getattr(hf_config, "partial_rotary_factor", None) or 1.0)
