"""Plain-torch attention over the paged KV pool: the oracle for the Triton kernels.

One request at a time, fp32 math, GQA by repeating kv heads. Reads index tensors on the host,
so it is for tests and references only, never for the serving path.
"""

from __future__ import annotations

import math

import torch


def ref_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    visible: torch.Tensor,
    sm_scale: float,
    logit_cap: float = 0.0,
) -> torch.Tensor:
    """q: [m, hq, d]; k: [n, hkv, d]; v: [n, hkv, dv]; visible: [m, n] bool. Returns fp32 [m, hq, dv].

    Rows that see no key come out as zeros.
    """
    group = q.shape[1] // k.shape[1]
    k = k.float().repeat_interleave(group, dim=1)
    v = v.float().repeat_interleave(group, dim=1)
    scores = torch.einsum("mhd,nhd->hmn", q.float(), k) * sm_scale
    if logit_cap > 0:
        scores = logit_cap * torch.tanh(scores / logit_cap)
    scores = scores.masked_fill(~visible, float("-inf"))
    probs = torch.softmax(scores, dim=-1).nan_to_num(0.0)  # all-masked rows -> zeros
    return torch.einsum("hmn,nhd->mhd", probs, v)


def ref_extend_attention(
    q: torch.Tensor,
    k_buffer: torch.Tensor,
    v_buffer: torch.Tensor,
    qo_indptr: torch.Tensor,
    kv_indptr: torch.Tensor,
    kv_indices: torch.Tensor,
    sm_scale: float | None = None,
    logit_cap: float = 0.0,
    is_causal: bool = True,
    custom_mask: torch.Tensor | None = None,
    mask_indptr: torch.Tensor | None = None,
) -> torch.Tensor:
    """Extend (prefill) attention; returns fp32 [num_tokens, num_q_heads, head_dim_v].

    Request i's queries are q[qo_indptr[i]:qo_indptr[i+1]] and its keys are ALL its tokens,
    prefix then extend: slots kv_indices[kv_indptr[i]:kv_indptr[i+1]] (the unified layout,
    i.e. req_to_token[row, :seq_len]). prefix_len = kv_len - extend_len. custom_mask, when
    given, is request i's row-major [extend_len, kv_len] visibility at mask_indptr[i] and
    replaces the causal mask.
    """
    sm_scale = sm_scale if sm_scale is not None else 1.0 / math.sqrt(q.shape[-1])
    qo = qo_indptr.tolist()
    kv = kv_indptr.tolist()
    out = torch.zeros(
        q.shape[0], q.shape[1], v_buffer.shape[-1], dtype=torch.float32, device=q.device
    )
    for i in range(len(qo) - 1):
        extend_len, kv_len = qo[i + 1] - qo[i], kv[i + 1] - kv[i]
        if extend_len == 0:
            continue
        slots = kv_indices[kv[i] : kv[i + 1]].long()
        visible = _visibility(extend_len, kv_len, is_causal, custom_mask, mask_indptr, i, q.device)
        out[qo[i] : qo[i + 1]] = ref_attention(
            q[qo[i] : qo[i + 1]], k_buffer[slots], v_buffer[slots], visible, sm_scale, logit_cap
        )
    return out


def ref_decode_attention(
    q: torch.Tensor,
    k_buffer: torch.Tensor,
    v_buffer: torch.Tensor,
    kv_indptr: torch.Tensor,
    kv_indices: torch.Tensor,
    sm_scale: float | None = None,
    logit_cap: float = 0.0,
) -> torch.Tensor:
    """Decode attention (one query per request, sees all its keys); fp32 [bs, hq, dv]."""
    qo_indptr = torch.arange(q.shape[0] + 1, dtype=torch.int32, device=q.device)
    return ref_extend_attention(
        q, k_buffer, v_buffer, qo_indptr, kv_indptr, kv_indices, sm_scale, logit_cap
    )


def _visibility(
    extend_len: int,
    kv_len: int,
    is_causal: bool,
    custom_mask: torch.Tensor | None,
    mask_indptr: torch.Tensor | None,
    i: int,
    device: torch.device,
) -> torch.Tensor:
    if custom_mask is not None:
        start = int(mask_indptr[i])
        flat = custom_mask[start : start + extend_len * kv_len]
        return flat.reshape(extend_len, kv_len).to(device=device, dtype=torch.bool)
    if not is_causal:
        return torch.ones(extend_len, kv_len, dtype=torch.bool, device=device)
    prefix_len = kv_len - extend_len
    rows = torch.arange(extend_len, device=device)[:, None] + prefix_len
    return rows >= torch.arange(kv_len, device=device)[None, :]
