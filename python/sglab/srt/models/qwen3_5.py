"""Qwen3.5 (dense): Gated DeltaNet layers and gated full-attention layers, per `layer_types`.

- Gated DeltaNet: fused input projections (qkv + z, b + a), a short causal conv over qkv, L2-
  normalized q/k, decay g = -exp(A_log) * softplus(a + dt_bias) and beta = sigmoid(b), the
  delta rule over a per-request recurrent state, a gated RMSNorm by z, then out_proj.
- Full attention: q_proj yields the query and an output gate per head (interleaved per head),
  zero-centred q/k RMSNorm, RoPE over a share of each head (partial_rotary_factor), output
  times sigmoid(gate).
- Zero-centred RMSNorms (`norm(x) * (1 + w)`) around every mixer and MLP.

`Qwen3_5ForConditionalGeneration` checkpoints serve their text model: the `model.language_model`
weights load, the vision tower's are skipped (and logged). Upstream: `models/qwen3_5.py`.
"""

from __future__ import annotations

import logging
from typing import Iterable

import torch
from torch import nn

from sglab.srt.configs.mamba_utils import LINEAR_ATTENTION, HybridLayout
from sglab.srt.configs.model_options import ModelOptions
from sglab.srt.layers.layernorm import GemmaRMSNorm, RMSNormGated
from sglab.srt.layers.linear import (
    MergedColumnParallelLinear,
    QKVParallelLinear,
    RowParallelLinear,
)
from sglab.srt.layers.radix_attention import RadixAttention
from sglab.srt.layers.radix_linear_attention import RadixLinearAttention
from sglab.srt.layers.rotary_embedding import get_rope
from sglab.srt.model_executor.forward_batch_info import ForwardBatch
from sglab.srt.models.llama import LlamaForCausalLM, LlamaMLP, LlamaModel, _default_load

logger = logging.getLogger(__name__)


class Qwen3_5GatedDeltaNet(nn.Module):
    def __init__(self, config, layer_id: int, dtype: torch.dtype, options: ModelOptions):
        super().__init__()
        layout = HybridLayout.from_text_config(config)
        self.num_k_heads, self.num_v_heads = layout.num_k_heads, layout.num_v_heads
        self.head_v_dim = layout.head_v_dim
        key_dim = layout.head_k_dim * layout.num_k_heads
        value_dim = layout.head_v_dim * layout.num_v_heads
        self.conv_dim, self.value_dim = layout.conv_dim, value_dim
        bi = options.batch_invariant
        # Shards: 0 = HF in_proj_qkv (q, k, v: the conv's input), 1 = in_proj_z (the gate).
        self.in_proj_qkvz = MergedColumnParallelLinear(
            config.hidden_size, [2 * key_dim + value_dim, value_dim], bias=False,
            params_dtype=dtype, batch_invariant=bi)
        # Shards: 0 = in_proj_b (beta), 1 = in_proj_a (decay).
        self.in_proj_ba = MergedColumnParallelLinear(
            config.hidden_size, [self.num_v_heads, self.num_v_heads], bias=False,
            params_dtype=dtype, batch_invariant=bi)
        self.conv1d_weight = nn.Parameter(
            torch.empty(layout.conv_dim, layout.conv_kernel, dtype=dtype), requires_grad=False)
        self.A_log = nn.Parameter(torch.empty(self.num_v_heads, dtype=torch.float32),
                                  requires_grad=False)
        self.dt_bias = nn.Parameter(torch.ones(self.num_v_heads, dtype=dtype), requires_grad=False)
        self.norm = RMSNormGated(layout.head_v_dim, config.rms_norm_eps, dtype)
        self.out_proj = RowParallelLinear(value_dim, config.hidden_size, bias=False,
                                          params_dtype=dtype, batch_invariant=bi)
        self.attn = RadixLinearAttention(layer_id, self.num_k_heads, self.num_v_heads,
                                         layout.head_k_dim, layout.head_v_dim,
                                         self.conv1d_weight, self.A_log, self.dt_bias)

    def forward(self, hidden_states: torch.Tensor, forward_batch: ForwardBatch) -> torch.Tensor:
        qkvz = self.in_proj_qkvz(hidden_states)
        mixed_qkv, z = qkvz.split([self.conv_dim, self.value_dim], dim=-1)
        b, a = self.in_proj_ba(hidden_states).split([self.num_v_heads, self.num_v_heads], dim=-1)
        core = self.attn(forward_batch, mixed_qkv.contiguous(), a.contiguous(), b.contiguous())
        core = self.norm(core.reshape(-1, self.head_v_dim), z.reshape(-1, self.head_v_dim))
        return self.out_proj(core.reshape(hidden_states.shape[0], self.value_dim))


class Qwen3_5Attention(nn.Module):
    def __init__(self, config, layer_id: int, dtype: torch.dtype, options: ModelOptions):
        super().__init__()
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // self.num_heads
        self.q_size = self.num_heads * self.head_dim
        self.kv_size = self.num_kv_heads * self.head_dim
        bias = bool(getattr(config, "attention_bias", False))
        bi = options.batch_invariant
        # The "q" shard is HF's q_proj: per head, the query and then its output gate.
        self.qkv_proj = QKVParallelLinear(config.hidden_size, self.head_dim, 2 * self.num_heads,
                                          self.num_kv_heads, bias=bias, params_dtype=dtype,
                                          batch_invariant=bi)
        self.o_proj = RowParallelLinear(self.q_size, config.hidden_size, bias=bias,
                                        params_dtype=dtype, batch_invariant=bi)
        self.q_norm = GemmaRMSNorm(self.head_dim, config.rms_norm_eps, dtype)
        self.k_norm = GemmaRMSNorm(self.head_dim, config.rms_norm_eps, dtype)
        self.rotary_emb = get_rope(self.head_dim, config.max_position_embeddings, config)
        self.attn = RadixAttention(self.num_heads, self.head_dim, self.head_dim ** -0.5,
                                   self.num_kv_heads, layer_id)

    def forward(self, positions: torch.Tensor, hidden_states: torch.Tensor,
                forward_batch: ForwardBatch) -> torch.Tensor:
        qkv = self.qkv_proj(hidden_states)
        q_gate, k, v = qkv.split([2 * self.q_size, self.kv_size, self.kv_size], dim=-1)
        q, gate = q_gate.view(-1, self.num_heads, 2 * self.head_dim).chunk(2, dim=-1)
        q = self.q_norm(q.reshape(-1, self.head_dim)).view(-1, self.q_size)
        k = self.k_norm(k.reshape(-1, self.head_dim)).view(-1, self.kv_size)
        q, k = self.rotary_emb(positions, q, k)
        out = self.attn(q, k, v, forward_batch)
        return self.o_proj(out * torch.sigmoid(gate.reshape(-1, self.q_size)))


class Qwen3_5DecoderLayer(nn.Module):
    def __init__(self, config, layer_id: int, dtype: torch.dtype, options: ModelOptions):
        super().__init__()
        self.is_linear = config.layer_types[layer_id] == LINEAR_ATTENTION
        if self.is_linear:
            self.linear_attn = Qwen3_5GatedDeltaNet(config, layer_id, dtype, options)
        else:
            self.self_attn = Qwen3_5Attention(config, layer_id, dtype, options)
        self.mlp = LlamaMLP(config.hidden_size, config.intermediate_size, dtype, options)
        self.input_layernorm = GemmaRMSNorm(config.hidden_size, config.rms_norm_eps, dtype)
        self.post_attention_layernorm = GemmaRMSNorm(config.hidden_size, config.rms_norm_eps,
                                                     dtype)

    def forward(self, positions, hidden_states, forward_batch, residual):
        if residual is None:
            residual = hidden_states
            hidden_states = self.input_layernorm(hidden_states)
        else:
            hidden_states, residual = self.input_layernorm(hidden_states, residual)
        if self.is_linear:
            hidden_states = self.linear_attn(hidden_states, forward_batch)
        else:
            hidden_states = self.self_attn(positions, hidden_states, forward_batch)
        hidden_states, residual = self.post_attention_layernorm(hidden_states, residual)
        return self.mlp(hidden_states), residual


class Qwen3_5Model(LlamaModel):
    layer_cls = Qwen3_5DecoderLayer
    norm_cls = GemmaRMSNorm


class Qwen3_5ForCausalLM(LlamaForCausalLM):
    model_cls = Qwen3_5Model
    # (fused param name, HF name, shard id)
    stacked_params_mapping = [
        (".qkv_proj.", ".q_proj.", "q"),
        (".qkv_proj.", ".k_proj.", "k"),
        (".qkv_proj.", ".v_proj.", "v"),
        (".gate_up_proj.", ".gate_proj.", 0),
        (".gate_up_proj.", ".up_proj.", 1),
        (".in_proj_qkvz.", ".in_proj_qkv.", 0),
        (".in_proj_qkvz.", ".in_proj_z.", 1),
        (".in_proj_ba.", ".in_proj_b.", 0),
        (".in_proj_ba.", ".in_proj_a.", 1),
    ]
    # Vision tower and multi-token-prediction weights: not part of the text model.
    skipped_prefixes = ("model.visual.", "visual.", "mtp.")
    zero_centered_norms = True

    def __init__(self, config, dtype: torch.dtype, options: ModelOptions):
        super().__init__(getattr(config, "text_config", None) or config, dtype, options)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        params = dict(self.named_parameters(remove_duplicate=False))
        loaded: set[str] = set()
        skipped = 0
        for name, tensor in weights:
            name = name.replace("model.language_model.", "model.")
            if name.startswith(self.skipped_prefixes):
                skipped += 1
                continue
            if "rotary_emb.inv_freq" in name or (self.tie_word_embeddings
                                                 and name.startswith("lm_head.")):
                continue
            target, shard_id = _map_name(name, self.stacked_params_mapping)
            if target not in params:
                raise ValueError(f"Unexpected weight {name!r} for {type(self).__name__}")
            _load_one(params[target], target, tensor, shard_id)
            loaded.add(target)
        if skipped:
            logger.info("Skipped %d weights of the vision tower / MTP head (sglab serves the "
                        "text model)", skipped)
        return loaded


def _map_name(name: str, mapping) -> tuple[str, object]:
    for fused, hf, shard_id in mapping:
        if hf in name:
            return name.replace(hf, fused), shard_id
    return name.replace(".conv1d.weight", ".conv1d_weight"), None


def _load_one(param: nn.Parameter, name: str, tensor: torch.Tensor, shard_id) -> None:
    if name.endswith(".conv1d_weight"):
        tensor = tensor.reshape(tensor.shape[0], -1)  # HF's Conv1d weight is [dim, 1, kernel]
    loader = getattr(param, "weight_loader", None)
    if loader is None:
        _default_load(param, tensor)
    else:
        loader(param, tensor, shard_id)


class Qwen3_5ForConditionalGeneration(Qwen3_5ForCausalLM):
    """The text model of a Qwen3.5 vision-language checkpoint."""


EntryClass = [Qwen3_5ForCausalLM, Qwen3_5ForConditionalGeneration]
