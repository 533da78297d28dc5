"""Llama (and the shared decoder structure Qwen2/Qwen3 build on)."""

from __future__ import annotations

from typing import Iterable

import torch
from torch import nn

from sglab.srt.configs.model_options import ModelOptions
from sglab.srt.distributed.parallel_state import get_attention_tp_group, is_dp_attention_enabled
from sglab.srt.layers.activation import SiluAndMul
from sglab.srt.layers.communicator import forward_mlp
from sglab.srt.layers.elementwise import KVWrite, QKNormRope, use_fused_kernels
from sglab.srt.layers.layernorm import RMSNorm
from sglab.srt.layers.linear import (
    LinearBase,
    MergedColumnParallelLinear,
    QKVParallelLinear,
    RowParallelLinear,
    enable_decode_gemms,
)
from sglab.srt.layers.logits_processor import LogitsProcessor, LogitsProcessorOutput
from sglab.srt.layers.radix_attention import RadixAttention
from sglab.srt.layers.rotary_embedding import get_rope
from sglab.srt.layers.skinny_gemm import SILU_MUL, RMSNormPrologue
from sglab.srt.layers.vocab_parallel_embedding import ParallelLMHead, VocabParallelEmbedding
from sglab.srt.model_executor.forward_batch_info import ForwardBatch


class LlamaMLP(nn.Module):
    def __init__(self, hidden_size: int, intermediate_size: int, dtype: torch.dtype,
                 options: ModelOptions):
        super().__init__()
        self.gate_up_proj = MergedColumnParallelLinear(
            hidden_size, [intermediate_size] * 2, bias=False, params_dtype=dtype,
            batch_invariant=options.batch_invariant)
        # Under DP attention the communicator sums the partial products (forward_mlp).
        self.down_proj = RowParallelLinear(intermediate_size, hidden_size, bias=False,
                                           params_dtype=dtype,
                                           batch_invariant=options.batch_invariant,
                                           reduce_results=not is_dp_attention_enabled())
        self.act_fn = SiluAndMul()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if isinstance(self.gate_up_proj, MergedColumnParallelLinear) \
                and self.gate_up_proj.fuses_silu(x):
            return self.down_proj(self.gate_up_proj.forward_silu(x))
        return self.down_proj(self.act_fn(self.gate_up_proj(x)))


class LlamaAttention(nn.Module):
    qk_norm = False

    @staticmethod
    def biases(config) -> tuple[bool, bool]:
        """(qkv bias, o_proj bias) as the HF implementation of this family has them."""
        bias = bool(getattr(config, "attention_bias", False))
        return bias, bias

    def __init__(self, config, layer_id: int, dtype: torch.dtype, options: ModelOptions):
        super().__init__()
        qkv_bias, o_bias = self.biases(config)
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = getattr(config, "num_key_value_heads", None) or self.num_heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // self.num_heads
        group = get_attention_tp_group()
        self.qkv_proj = QKVParallelLinear(config.hidden_size, self.head_dim, self.num_heads,
                                          self.num_kv_heads, bias=qkv_bias, params_dtype=dtype,
                                          batch_invariant=options.batch_invariant, group=group)
        self.o_proj = RowParallelLinear(self.num_heads * self.head_dim, config.hidden_size,
                                        bias=o_bias, params_dtype=dtype,
                                        batch_invariant=options.batch_invariant, group=group)
        # This attention-TP rank's heads (all of them at tp=1).
        self.num_heads = self.qkv_proj.num_heads
        self.num_kv_heads = self.qkv_proj.num_kv_heads
        self.q_size = self.qkv_proj.q_size
        self.kv_size = self.qkv_proj.kv_size
        self.rotary_emb = get_rope(self.head_dim, config.max_position_embeddings, config)
        half = self.head_dim // 2
        # The fused q/k norm + RoPE kernel rotates whole heads, half a head with one
        # power-of-two range; partial RoPE (rotary_dim < head_dim) takes the unfused path.
        self.fused_qk_rope_ok = (half > 0 and half & (half - 1) == 0
                                 and self.rotary_emb.rotary_dim == self.head_dim)
        # --kernel-fusion on: that kernel also writes k and v into the KV pool.
        self.fuse_kv_write = options.kernel_fusion and self.fused_qk_rope_ok
        self.attn = RadixAttention(self.num_heads, self.head_dim, self.head_dim ** -0.5,
                                   self.num_kv_heads, layer_id)
        if self.qk_norm:
            self.q_norm = RMSNorm(self.head_dim, config.rms_norm_eps, dtype)
            self.k_norm = RMSNorm(self.head_dim, config.rms_norm_eps, dtype)

    def _apply_qk_norm(self, q: torch.Tensor, k: torch.Tensor):
        q = self.q_norm(q.reshape(-1, self.head_dim)).view(q.shape)
        k = self.k_norm(k.reshape(-1, self.head_dim)).view(k.shape)
        return q, k

    def _norm_rope(self, positions: torch.Tensor) -> QKNormRope:
        cache = self.rotary_emb.cos_sin_cache
        if not self.qk_norm:
            return QKNormRope(positions, cache, self.head_dim)
        return QKNormRope(positions, cache, self.head_dim, self.q_norm.weight,
                          self.k_norm.weight, self.q_norm.variance_epsilon)

    def _kv_write(self, forward_batch: ForwardBatch, v: torch.Tensor) -> KVWrite | None:
        """This layer's KV-pool buffers for the fused write, or None (not fused, or a pool
        that stores another dtype: fp8 caches cast on the way in)."""
        pool = forward_batch.token_to_kv_pool
        if not self.fuse_kv_write or pool.dtype != v.dtype or pool.store_dtype != pool.dtype:
            return None
        k_buf, v_buf = pool.get_kv_buffer(self.attn.layer_id)
        return KVWrite(v, forward_batch.out_cache_loc, k_buf, v_buf)

    def forward(self, positions: torch.Tensor, hidden_states: torch.Tensor,
                forward_batch: ForwardBatch) -> torch.Tensor:
        if forward_batch.forward_mode.is_idle():  # DP attention: no tokens on this rank
            return hidden_states
        return self.forward_qkv(positions, self.qkv_proj(hidden_states), forward_batch)

    def forward_qkv(self, positions: torch.Tensor, qkv: torch.Tensor,
                    forward_batch: ForwardBatch) -> torch.Tensor:
        """Attention and o_proj from the qkv projection's output."""
        q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        kv_write = self._kv_write(forward_batch, v)
        rope = None  # set: attention normalizes, rotates and stores k / v itself
        if kv_write is not None and forward_batch.attn_backend.fuses_qk_rope(self.attn,
                                                                             forward_batch):
            rope = self._norm_rope(positions)
        elif kv_write is not None or (self.fused_qk_rope_ok and use_fused_kernels(q)):
            q, k = self._norm_rope(positions)(q, k, kv_write)
        else:
            if self.qk_norm:
                q, k = self._apply_qk_norm(q, k)
            q, k = self.rotary_emb(positions, q, k)
        out = self.attn(q, k, v, forward_batch, save_kv_cache=kv_write is None, rope=rope)
        return self.o_proj(out)


class LlamaDecoderLayer(nn.Module):
    attention_cls = LlamaAttention

    def __init__(self, config, layer_id: int, dtype: torch.dtype, options: ModelOptions):
        super().__init__()
        self.self_attn = self.attention_cls(config, layer_id, dtype, options)
        self.mlp = LlamaMLP(config.hidden_size, config.intermediate_size, dtype, options)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, dtype)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, dtype)

    def forward(self, positions, hidden_states, forward_batch, residual):
        if self._folds_norms(hidden_states, forward_batch):
            return self._forward_folded(positions, hidden_states, forward_batch, residual)
        if residual is None:
            residual = hidden_states
            hidden_states = self.input_layernorm(hidden_states)
        else:
            hidden_states, residual = self.input_layernorm(hidden_states, residual)
        hidden_states = self.self_attn(positions, hidden_states, forward_batch)
        hidden_states, residual = self.post_attention_layernorm(hidden_states, residual)
        return forward_mlp(self.mlp, hidden_states, forward_batch), residual

    def _folds_norms(self, x: torch.Tensor, forward_batch: ForwardBatch) -> bool:
        """--kernel-fusion on at small M: both norms and the SiLU go into the loads of the
        matmuls after them (plain layers only: not under LoRA or DP attention)."""
        attn, mlp = self.self_attn, self.mlp
        if not (isinstance(attn.qkv_proj, LinearBase) and attn.qkv_proj.folds_norm(x)):
            return False  # fusion off (the common case) stops here
        return (forward_batch.dp_step is None and type(self.input_layernorm) is RMSNorm
                and isinstance(mlp.gate_up_proj, MergedColumnParallelLinear)
                and isinstance(mlp.down_proj, LinearBase) and mlp.gate_up_proj.folds_norm(x)
                and (mlp.gate_up_proj.skinny_fits(x) or mlp.gate_up_proj.fuses_silu(x)))

    def _forward_folded(self, positions, hidden_states, forward_batch, residual):
        """Three launches around attention instead of six (two norms, SiLU, three matmuls)."""
        attn, mlp, norm1, norm2 = (self.self_attn, self.mlp, self.input_layernorm,
                                   self.post_attention_layernorm)
        qkv, residual = attn.qkv_proj.forward_norm(
            hidden_states, RMSNormPrologue(norm1.weight, norm1.variance_epsilon, residual))
        hidden_states = attn.forward_qkv(positions, qkv, forward_batch)
        norm2 = RMSNormPrologue(norm2.weight, norm2.variance_epsilon, residual)
        if mlp.gate_up_proj.skinny_fits(hidden_states):
            gate_up, residual = mlp.gate_up_proj.forward_norm(hidden_states, norm2)
            return mlp.down_proj(gate_up, SILU_MUL), residual
        act, residual = mlp.gate_up_proj.forward_norm(hidden_states, norm2, silu_out=True)
        return mlp.down_proj(act), residual


class LlamaModel(nn.Module):
    layer_cls = LlamaDecoderLayer
    norm_cls = RMSNorm

    def __init__(self, config, dtype: torch.dtype, options: ModelOptions):
        super().__init__()
        self.embed_tokens = VocabParallelEmbedding(config.vocab_size, config.hidden_size, dtype)
        self.layers = nn.ModuleList([self.layer_cls(config, i, dtype, options)
                                     for i in range(config.num_hidden_layers)])
        self.norm = self.norm_cls(config.hidden_size, config.rms_norm_eps, dtype)

    def forward(self, input_ids, positions, forward_batch) -> torch.Tensor:
        hidden_states = self.embed_tokens(input_ids)
        residual = None
        for layer in self.layers:
            hidden_states, residual = layer(positions, hidden_states, forward_batch, residual)
        hidden_states, _ = self.norm(hidden_states, residual)
        return hidden_states


class LlamaForCausalLM(nn.Module):
    model_cls = LlamaModel
    # (fused param name, HF name, shard id)
    stacked_params_mapping = [
        ("qkv_proj", "q_proj", "q"),
        ("qkv_proj", "k_proj", "k"),
        ("qkv_proj", "v_proj", "v"),
        ("gate_up_proj", "gate_proj", 0),
        ("gate_up_proj", "up_proj", 1),
    ]

    def __init__(self, config, dtype: torch.dtype, options: ModelOptions):
        super().__init__()
        self.config = config
        self.model = self.model_cls(config, dtype, options)
        self.tie_word_embeddings = bool(getattr(config, "tie_word_embeddings", False))
        if self.tie_word_embeddings:
            self.lm_head = self.model.embed_tokens
        else:
            self.lm_head = ParallelLMHead(config.vocab_size, config.hidden_size, dtype)
        self.logits_processor = LogitsProcessor(
            config.vocab_size, sync_free_metadata=options.sync_free_logits_metadata,
            batch_invariant=options.batch_invariant, fp32_gemm_out=options.kernel_fusion)
        if options.kernel_fusion:
            enable_decode_gemms(self.model, config.hidden_size)

    @torch.no_grad()
    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor,
                forward_batch: ForwardBatch) -> LogitsProcessorOutput:
        hidden_states = self.model(input_ids, positions, forward_batch)
        return self.logits_processor(input_ids, hidden_states, self.lm_head, forward_batch)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        """Load HF-named tensors into fused params; returns the names of params that were set."""
        params = dict(self.named_parameters(remove_duplicate=False))
        loaded: set[str] = set()
        for name, tensor in weights:
            if "rotary_emb.inv_freq" in name:
                continue
            if self.tie_word_embeddings and name.startswith("lm_head."):
                continue
            target, shard_id = _map_name(name, self.stacked_params_mapping)
            if target not in params:
                raise ValueError(f"Unexpected weight {name!r} for {type(self).__name__}")
            param = params[target]
            loader = getattr(param, "weight_loader", None)
            if loader is None:
                _default_load(param, tensor)
            else:
                loader(param, tensor, shard_id)
            loaded.add(target)
        return loaded


def _map_name(name: str, mapping) -> tuple[str, object]:
    for fused, hf, shard_id in mapping:
        part = f".{hf}."
        if part in name:
            return name.replace(part, f".{fused}."), shard_id
    return name, None


def _default_load(param: nn.Parameter, tensor: torch.Tensor) -> None:
    if tuple(param.shape) != tuple(tensor.shape):
        raise ValueError(f"weight shape mismatch: expected {tuple(param.shape)}, "
                         f"got {tuple(tensor.shape)}")
    param.data.copy_(tensor.to(param.dtype))


EntryClass = LlamaForCausalLM
