"""What the engine needs to know about a model, read from its HF config."""

from __future__ import annotations

import logging

import torch
from transformers import AutoConfig, PretrainedConfig

logger = logging.getLogger(__name__)

_STR_TO_DTYPE = {
    "half": torch.float16,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float": torch.float32,
    "float32": torch.float32,
}


class ModelConfig:
    def __init__(
        self,
        model_path: str,
        dtype: str = "auto",
        context_length: int | None = None,
        device: str = "cpu",
        trust_remote_code: bool = False,
    ) -> None:
        self.model_path = model_path
        self.hf_config: PretrainedConfig = AutoConfig.from_pretrained(
            model_path, trust_remote_code=trust_remote_code
        )
        cfg = self.hf_config
        self.architectures: list[str] = list(getattr(cfg, "architectures", None) or [])
        self.model_type: str = getattr(cfg, "model_type", "")
        self.dtype = _resolve_dtype(cfg, dtype, device)
        derived = getattr(cfg, "max_position_embeddings", None) or 2048
        if context_length is not None and context_length > derived:
            logger.warning("context_length %d exceeds the model's %d", context_length, derived)
        self.context_len: int = context_length or derived
        self.hidden_size: int = cfg.hidden_size
        self.num_hidden_layers: int = cfg.num_hidden_layers
        self.num_attention_heads: int = cfg.num_attention_heads
        self.num_key_value_heads: int = getattr(cfg, "num_key_value_heads", None) or (
            cfg.num_attention_heads
        )
        self.head_dim: int = getattr(cfg, "head_dim", None) or (
            cfg.hidden_size // cfg.num_attention_heads
        )
        self.vocab_size: int = cfg.vocab_size

    def weight_bytes(self) -> int:
        """Bytes of the weights at the serving dtype (for sizing the KV pool and the roofline)."""
        h, inter = self.hidden_size, self.hf_config.intermediate_size
        q = self.num_attention_heads * self.head_dim
        kv = self.num_key_value_heads * self.head_dim
        per_layer = h * (q + 2 * kv) + q * h + 3 * h * inter + 2 * h
        tied = getattr(self.hf_config, "tie_word_embeddings", False)
        emb = self.vocab_size * h * (1 if tied else 2)
        elem = torch.tensor([], dtype=self.dtype).element_size()
        return (per_layer * self.num_hidden_layers + emb + h) * elem


def _resolve_dtype(cfg: PretrainedConfig, dtype: str, device: str) -> torch.dtype:
    if dtype != "auto":
        return _STR_TO_DTYPE[dtype]
    cfg_dtype = getattr(cfg, "dtype", None)
    if isinstance(cfg_dtype, str):
        cfg_dtype = _STR_TO_DTYPE.get(cfg_dtype, torch.float32)
    if cfg_dtype is None:
        cfg_dtype = torch.float32
    if device == "cpu":
        # CPU kernels for half types are slow and imprecise; serve in float32 there.
        return torch.float32
    # As upstream: FP32 checkpoints are served in FP16 on accelerators, BF16 stays BF16.
    return torch.float16 if cfg_dtype == torch.float32 else cfg_dtype
