"""The layout of a hybrid linear-attention model (Qwen3.5: Gated DeltaNet + gated attention):
which layers are which, and the shape of one request's recurrent state per linear layer.

Upstream keeps the same facts in `configs/qwen3_next.py` (`layers_block_type`,
`mamba2_cache_params`) and `configs/mamba_utils.py` (`Mamba2StateShape`).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

import torch

HYBRID_ARCHITECTURES = ("Qwen3_5ForCausalLM", "Qwen3_5ForConditionalGeneration")
LINEAR_ATTENTION = "linear_attention"
FULL_ATTENTION = "full_attention"
SUPPORTED_LAYER_TYPES = (LINEAR_ATTENTION, FULL_ATTENTION)
SSM_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def is_hybrid_architecture(architectures: list[str]) -> bool:
    return any(a in HYBRID_ARCHITECTURES for a in architectures)


def is_hybrid_model_path(model_path: str) -> bool:
    """Whether the model directory's config.json names a hybrid architecture (read without
    transformers, for argument resolution)."""
    try:
        with open(os.path.join(model_path, "config.json"), encoding="utf-8") as f:
            return is_hybrid_architecture(json.load(f).get("architectures") or [])
    except (OSError, ValueError):
        return False


@dataclass(frozen=True)
class HybridLayout:
    """Per layer its kind; per request and linear layer a conv state [conv_dim, kernel - 1] and
    a recurrent (temporal) state [num_v_heads, k_head_dim, v_head_dim]."""

    layer_types: tuple[str, ...]
    conv_dim: int
    conv_kernel: int
    num_k_heads: int
    num_v_heads: int
    head_k_dim: int
    head_v_dim: int

    @classmethod
    def from_text_config(cls, cfg) -> "HybridLayout":
        types = list(getattr(cfg, "layer_types", None) or [])
        if len(types) != cfg.num_hidden_layers:
            raise ValueError(f"--model-path: config.json layer_types has {len(types)} entries "
                             f"for {cfg.num_hidden_layers} layers")
        for i, kind in enumerate(types):
            if kind not in SUPPORTED_LAYER_TYPES:
                raise ValueError(
                    f"--model-path: config.json layer_types[{i}] is {kind!r}; this hybrid model "
                    f"supports {', '.join(SUPPORTED_LAYER_TYPES)}")
        key_dim = cfg.linear_key_head_dim * cfg.linear_num_key_heads
        value_dim = cfg.linear_value_head_dim * cfg.linear_num_value_heads
        if cfg.linear_num_value_heads % cfg.linear_num_key_heads:
            raise ValueError("--model-path: linear_num_value_heads must be a multiple of "
                             "linear_num_key_heads")
        return cls(tuple(types), 2 * key_dim + value_dim, cfg.linear_conv_kernel_dim,
                   cfg.linear_num_key_heads, cfg.linear_num_value_heads,
                   cfg.linear_key_head_dim, cfg.linear_value_head_dim)

    @property
    def full_attention_layer_ids(self) -> list[int]:
        return [i for i, t in enumerate(self.layer_types) if t == FULL_ATTENTION]

    @property
    def linear_layer_ids(self) -> list[int]:
        return [i for i, t in enumerate(self.layer_types) if t == LINEAR_ATTENTION]

    @property
    def conv_shape(self) -> tuple[int, int]:
        return self.conv_dim, self.conv_kernel - 1

    @property
    def temporal_shape(self) -> tuple[int, int, int]:
        return self.num_v_heads, self.head_k_dim, self.head_v_dim

    def state_bytes_per_slot(self, conv_dtype: torch.dtype, ssm_dtype: torch.dtype) -> int:
        """One state slot across every linear layer (what a request or a cached prefix holds)."""
        conv = self.conv_dim * (self.conv_kernel - 1) * conv_dtype.itemsize
        ssm = self.num_v_heads * self.head_k_dim * self.head_v_dim * ssm_dtype.itemsize
        return (conv + ssm) * len(self.linear_layer_ids)


def resolve_ssm_dtype(text_config, flag_value: str | None) -> torch.dtype:
    """--mamba-ssm-dtype, else the config's mamba_ssm_dtype, else float32 (upstream's order)."""
    name = flag_value or getattr(text_config, "mamba_ssm_dtype", None) or "float32"
    if name not in SSM_DTYPES:
        raise ValueError(f"--mamba-ssm-dtype: invalid choice {name!r} "
                         f"(choose from {', '.join(SSM_DTYPES)})")
    return SSM_DTYPES[name]
