"""What the engine needs to know about a model, read from its HF config."""

from __future__ import annotations

import logging

import torch
from transformers import AutoConfig, PretrainedConfig

from sglab.srt.configs.mamba_utils import HybridLayout, is_hybrid_architecture

logger = logging.getLogger(__name__)

try:  # transformers' strict config dataclasses raise this (not a ValueError) on a bad field
    from huggingface_hub.errors import StrictDataclassError as _ConfigError
except ImportError:  # pragma: no cover - older huggingface_hub
    _ConfigError = ValueError

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
        try:
            self.hf_config: PretrainedConfig = AutoConfig.from_pretrained(
                model_path, trust_remote_code=trust_remote_code
            )
        except (ValueError, TypeError, _ConfigError) as e:  # a bad field: name the flag
            raise ValueError(f"--model-path: invalid config.json in {model_path!r}: {e}") from e
        self.architectures: list[str] = list(getattr(self.hf_config, "architectures", None) or [])
        self.model_type: str = getattr(self.hf_config, "model_type", "")
        # Vision-language checkpoints (Qwen3_5ForConditionalGeneration): the text model's part.
        self.hf_text_config = getattr(self.hf_config, "text_config", None) or self.hf_config
        cfg = self.hf_text_config
        # Hybrid linear-attention models: which layers keep KV and which a recurrent state.
        self.hybrid: HybridLayout | None = (
            HybridLayout.from_text_config(cfg) if is_hybrid_architecture(self.architectures)
            else None)
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

    def get_num_attention_heads(self, tp_size: int) -> int:
        """Query heads on one TP rank."""
        return self.num_attention_heads // tp_size

    def get_num_kv_heads(self, tp_size: int) -> int:
        """KV heads on one TP rank: a slice, or one replicated head when there are fewer KV
        heads than ranks (upstream's rule)."""
        return max(1, self.num_key_value_heads // tp_size)

    @property
    def num_attention_layers(self) -> int:
        """Layers that keep KV in the token pool (a hybrid model's full-attention layers)."""
        if self.hybrid is None:
            return self.num_hidden_layers
        return len(self.hybrid.full_attention_layer_ids)

    def weight_bytes(self) -> int:
        """Bytes of the weights at the serving dtype (for sizing the KV pool and the roofline)."""
        cfg = self.hf_text_config
        h, inter = self.hidden_size, cfg.intermediate_size
        q = self.num_attention_heads * self.head_dim
        kv = self.num_key_value_heads * self.head_dim
        mlp_and_norms = 3 * h * inter + 2 * h
        if self.hybrid is None:
            layers = (h * (q + 2 * kv) + q * h + mlp_and_norms) * self.num_hidden_layers
        else:  # gated attention: a q gate as wide as q, and q/k norms
            attn = h * (2 * q + 2 * kv) + q * h + 2 * self.head_dim + mlp_and_norms
            layers = attn * self.num_attention_layers + \
                _gdn_layer_params(self.hybrid, h, mlp_and_norms) * len(self.hybrid.linear_layer_ids)
        tied = getattr(cfg, "tie_word_embeddings", False)
        emb = self.vocab_size * h * (1 if tied else 2)
        elem = torch.tensor([], dtype=self.dtype).element_size()
        return (layers + emb + h) * elem


def _gdn_layer_params(layout: HybridLayout, hidden: int, mlp_and_norms: int) -> int:
    value_dim = layout.num_v_heads * layout.head_v_dim
    in_proj = hidden * (layout.conv_dim + value_dim + 2 * layout.num_v_heads)
    conv = layout.conv_dim * layout.conv_kernel
    return in_proj + conv + 2 * layout.num_v_heads + layout.head_v_dim + value_dim * hidden + \
        mlp_and_norms


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
