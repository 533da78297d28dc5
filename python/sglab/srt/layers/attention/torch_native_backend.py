"""Reference attention: per request, gather its KV from the pool and run softmax attention.

Slow and simple on purpose: every other backend is tested against it. Under
--enable-deterministic-inference it switches to `attend_batch_invariant`, whose result for a
query row does not depend on how many other rows of its request share the pass (a radix hit or
a prefill chunk changes that), nor on whether the row is a prefill or a decode token.
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


# Deterministic mode: query rows per tile, and keys per tile at absolute positions 0, N, 2N...
ATTN_BLOCK_M = 16
ATTN_BLOCK_N = 64


def attend_batch_invariant(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scaling: float,
                           prefix_len: int, logit_cap: float = 0.0) -> torch.Tensor:
    """Same contract as `attend`, computed so that a query row's bits depend only on its
    position and the keys up to it.

    Every matmul is one [ATTN_BLOCK_M, D] x [D, ATTN_BLOCK_N] (or [M, N] x [N, D]) tile per
    head, key tiles start at absolute positions, and the softmax is folded online in key order.
    A tile that is wholly in a row's future adds exact zeros to it, so the number of key tiles a
    query tile visits (which follows its last row) does not change the others.
    """
    n, num_q_heads, head_dim = q.shape
    num_keys = k.shape[0]
    group = num_q_heads // k.shape[1]
    q_tiles = _tiles(q.float().transpose(0, 1), ATTN_BLOCK_M)  # [nq, Hq, BM, D]
    k_tiles = _tiles(k.float().repeat_interleave(group, dim=1).transpose(0, 1), ATTN_BLOCK_N)
    v_tiles = _tiles(v.float().repeat_interleave(group, dim=1).transpose(0, 1), ATTN_BLOCK_N)
    out = torch.empty(q_tiles.shape, dtype=torch.float32, device=q.device)
    rows = torch.arange(ATTN_BLOCK_M, device=q.device)
    key_offsets = torch.arange(ATTN_BLOCK_N, device=q.device)
    for t in range(q_tiles.shape[0]):
        first = prefix_len + t * ATTN_BLOCK_M
        # Pad rows repeat the last real row's position, so no row is fully masked.
        query_pos = (first + rows).clamp(max=prefix_len + n - 1)
        m_i = torch.full((num_q_heads, ATTN_BLOCK_M, 1), float("-inf"), device=q.device)
        l_i = torch.zeros((num_q_heads, ATTN_BLOCK_M, 1), device=q.device)
        acc = torch.zeros((num_q_heads, ATTN_BLOCK_M, head_dim), device=q.device)
        for j in range(-(-min(first + ATTN_BLOCK_M, num_keys) // ATTN_BLOCK_N)):
            scores = torch.bmm(q_tiles[t], k_tiles[j].transpose(1, 2)) * scaling
            if logit_cap > 0:
                scores = logit_cap * torch.tanh(scores / logit_cap)
            future = (j * ATTN_BLOCK_N + key_offsets)[None, :] > query_pos[:, None]
            scores = scores.masked_fill(future, float("-inf"))
            m_new = torch.maximum(m_i, scores.amax(dim=-1, keepdim=True))
            alpha = torch.exp(m_i - m_new)
            p = torch.exp(scores - m_new)
            l_i = l_i * alpha + p.sum(dim=-1, keepdim=True)
            acc = acc * alpha + torch.bmm(p, v_tiles[j])
            m_i = m_new
        out[t] = acc / l_i
    out = out.permute(1, 0, 2, 3).reshape(num_q_heads, -1, head_dim)[:, :n]
    return out.transpose(0, 1).to(q.dtype)


def _tiles(x: torch.Tensor, size: int) -> torch.Tensor:
    """[H, L, D] -> contiguous [ceil(L / size), H, size, D], zero-padded: every tile has the
    same shape and strides."""
    num_heads, length, dim = x.shape
    pad = -length % size
    if pad:
        x = torch.nn.functional.pad(x, (0, 0, 0, pad))
    return x.reshape(num_heads, -1, size, dim).transpose(0, 1).contiguous()


class TorchNativeAttnBackend(AttentionBackend):
    def __init__(self, model_runner=None):
        args = getattr(model_runner, "server_args", None)
        deterministic = args is not None and args.enable_deterministic_inference
        self.attend = attend_batch_invariant if deterministic else attend

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
            out[start:start + ext_len] = self.attend(q[start:start + ext_len], k_i, v_i,
                                                     layer.scaling, prefix_len, layer.logit_cap)
            start += ext_len
        return out.view(-1, layer.tp_q_head_num * layer.head_dim)

    def forward_decode(self, q, k, v, layer, forward_batch, save_kv_cache=True):
        fb = forward_batch
        if save_kv_cache:
            fb.token_to_kv_pool.set_kv_buffer(layer, fb.out_cache_loc, k, v)
        selected = None
        if fb.hisparse_coordinator is not None:  # HiSparse: this layer's selection, swapped in
            selected = fb.hisparse_coordinator.select(layer.layer_id, q, k)
        q = q.view(-1, layer.tp_q_head_num, layer.head_dim)
        out = torch.empty_like(q)
        for i, seq_len in enumerate(fb.seq_lens_cpu.tolist()):
            if selected is not None and fb.hisparse_plan.sparse[i]:
                kv_len = fb.hisparse_plan.kv_lens[i]
                k_buf, v_buf = fb.token_to_kv_pool.get_kv_buffer(layer.layer_id)
                slots = selected[i, :kv_len]
                k_i, v_i = k_buf[slots], v_buf[slots]
            else:
                kv_len = seq_len
                k_i, v_i = self._kv_of(layer, fb, i, seq_len)
            out[i:i + 1] = self.attend(q[i:i + 1], k_i, v_i, layer.scaling, kv_len - 1,
                                       layer.logit_cap)
        return out.view(-1, layer.tp_q_head_num * layer.head_dim)
