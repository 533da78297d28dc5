"""Reference attention: per request, gather its KV from the pool and run softmax attention.

Slow and simple on purpose: every other backend is tested against it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from sglab.srt.layers.attention.base_attn_backend import AttentionBackend

if TYPE_CHECKING:
    from sglab.srt.layers.radix_attention import RadixAttention
    from sglab.srt.model_executor.forward_batch_info import ForwardBatch


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scaling: float,
           prefix_len: int, logit_cap: float = 0.0) -> torch.Tensor:
    """q [n, Hq, D], k/v [prefix_len + n, Hkv, D]; causal within the last n keys. fp32 math."""
    n, num_q_heads, _ = q.shape
    group = num_q_heads // k.shape[1]
    qf = q.float().transpose(0, 1)  # [Hq, n, D]
    kf = k.float().repeat_interleave(group, dim=1).transpose(0, 1)
    vf = v.float().repeat_interleave(group, dim=1).transpose(0, 1)
    scores = torch.matmul(qf, kf.transpose(1, 2)) * scaling  # [Hq, n, L]
    if logit_cap > 0:
        scores = logit_cap * torch.tanh(scores / logit_cap)
    key_pos = torch.arange(k.shape[0], device=q.device)
    query_pos = torch.arange(n, device=q.device) + prefix_len
    scores = scores.masked_fill(key_pos[None, :] > query_pos[:, None], float("-inf"))
    out = torch.matmul(torch.softmax(scores, dim=-1), vf)  # [Hq, n, D]
    return out.transpose(0, 1).to(q.dtype)


class TorchNativeAttnBackend(AttentionBackend):
    def __init__(self, model_runner=None):
        pass

    def init_forward_metadata(self, forward_batch: "ForwardBatch") -> None:
        pass

    def _kv_of(self, layer: "RadixAttention", fb: "ForwardBatch", i: int, seq_len: int):
        slots = fb.req_to_token_pool.req_to_token[fb.req_pool_indices[i], :seq_len]
        k_buf, v_buf = fb.token_to_kv_pool.get_kv_buffer(layer.layer_id)
        return k_buf[slots], v_buf[slots]

    def forward_extend(self, q, k, v, layer, forward_batch, save_kv_cache=True):
        fb = forward_batch
        if save_kv_cache:
            fb.token_to_kv_pool.set_kv_buffer(layer, fb.out_cache_loc, k, v)
        q = q.view(-1, layer.tp_q_head_num, layer.head_dim)
        out = torch.empty_like(q)
        start = 0
        for i, (prefix_len, ext_len) in enumerate(
            zip(fb.extend_prefix_lens_cpu, fb.extend_seq_lens_cpu)
        ):
            k_i, v_i = self._kv_of(layer, fb, i, prefix_len + ext_len)
            out[start:start + ext_len] = attend(q[start:start + ext_len], k_i, v_i,
                                                layer.scaling, prefix_len, layer.logit_cap)
            start += ext_len
        return out.view(-1, layer.tp_q_head_num * layer.head_dim)

    def forward_decode(self, q, k, v, layer, forward_batch, save_kv_cache=True):
        fb = forward_batch
        if save_kv_cache:
            fb.token_to_kv_pool.set_kv_buffer(layer, fb.out_cache_loc, k, v)
        q = q.view(-1, layer.tp_q_head_num, layer.head_dim)
        out = torch.empty_like(q)
        for i, seq_len in enumerate(fb.seq_lens_cpu.tolist()):
            k_i, v_i = self._kv_of(layer, fb, i, seq_len)
            out[i:i + 1] = attend(q[i:i + 1], k_i, v_i, layer.scaling, seq_len - 1,
                                  layer.logit_cap)
        return out.view(-1, layer.tp_q_head_num * layer.head_dim)
