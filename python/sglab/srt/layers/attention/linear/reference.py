"""Gated DeltaNet in plain torch: the CPU path and the oracle every GPU kernel is tested against.

Shapes (one linear layer): tokens packed as in a ForwardBatch; `conv_states` [slots, conv_dim,
kernel - 1] and `ssm_states` [slots, num_v_heads, k_dim, v_dim] are the layer's views of the
MambaPool, read and written in place at each request's slot. Sequence lengths come from host
lists. The math follows HF transformers' Qwen3.5 torch path (`torch_chunk_gated_delta_rule`,
`torch_recurrent_gated_delta_rule`, `causal_conv1d_*`): fp32, q/k L2-normalized, q scaled by
k_dim ** -0.5, grouped value heads.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

CHUNK_SIZE = 64


def gdn_gating(A_log: torch.Tensor, a: torch.Tensor, dt_bias: torch.Tensor,
               b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per token and value head: the log decay g = -exp(A_log) * softplus(a + dt_bias) and the
    write strength beta = sigmoid(b), both fp32."""
    g = -A_log.float().exp() * F.softplus(a.float() + dt_bias.float())
    return g, b.float().sigmoid()


def l2norm(x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    return x * torch.rsqrt((x * x).sum(dim=-1, keepdim=True) + eps)


# --- causal conv -----------------------------------------------------------------------------


def causal_conv1d_prefill(x: torch.Tensor, weight: torch.Tensor, conv_states: torch.Tensor,
                          slots: torch.Tensor, seq_lens: list[int]) -> torch.Tensor:
    """x [T, D] packed; weight [D, W]. Each sequence continues from the window its slot holds
    (zeros for a fresh one) and leaves its last W - 1 inputs there. Returns silu(conv(x))."""
    out = torch.empty_like(x)
    width = weight.shape[1]
    start = 0
    for i, n in enumerate(seq_lens):
        window = torch.cat([conv_states[slots[i]].to(x.dtype), x[start:start + n].T], dim=1)
        y = F.conv1d(window[None].to(weight.dtype), weight[:, None, :], groups=weight.shape[0])
        out[start:start + n] = F.silu(y[0].T).to(x.dtype)
        conv_states[slots[i]] = window[:, window.shape[1] - (width - 1):].to(conv_states.dtype)
        start += n
    return out


def causal_conv1d_decode(x: torch.Tensor, weight: torch.Tensor, conv_states: torch.Tensor,
                         slots: torch.Tensor) -> torch.Tensor:
    """One token per request: x [N, D]; shifts each slot's window by the new input, in place."""
    window = torch.cat([conv_states[slots].to(x.dtype), x[:, :, None]], dim=2)  # [N, D, W]
    conv_states[slots] = window[:, :, 1:].to(conv_states.dtype)
    y = (window.float() * weight.float()[None]).sum(-1)
    return F.silu(y).to(x.dtype)


# --- gated delta rule ------------------------------------------------------------------------


def _expand_heads(q: torch.Tensor, k: torch.Tensor, num_v_heads: int):
    group = num_v_heads // q.shape[-2]
    if group > 1:
        q, k = q.repeat_interleave(group, dim=-2), k.repeat_interleave(group, dim=-2)
    return q, k


def chunk_gated_delta_rule(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor,
                           beta: torch.Tensor, initial_state: torch.Tensor,
                           seq_lens: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """q/k [T, H, K], v [T, HV, V], g/beta [T, HV]; initial_state [N, HV, K, V] (one per
    sequence). Returns the output [T, HV, V] (v's dtype) and the final states [N, HV, K, V]
    (fp32)."""
    out = torch.empty(v.shape, dtype=v.dtype, device=v.device)
    finals = []
    start = 0
    for i, n in enumerate(seq_lens):
        sl = slice(start, start + n)
        o, h = _chunk_one(q[sl], k[sl], v[sl], g[sl], beta[sl], initial_state[i].float())
        out[sl] = o.to(v.dtype)
        finals.append(h)
        start += n
    final = torch.stack(finals) if finals else initial_state.float()
    return out, final


def _chunk_one(q, k, v, g, beta, state):
    """One sequence, chunked as HF's torch_chunk_gated_delta_rule (head-major fp32)."""
    num_v_heads = v.shape[1]
    q, k = _expand_heads(q, k, num_v_heads)
    q, k, v = (x.float().transpose(0, 1) for x in (q, k, v))  # [HV, T, .]
    g, beta = g.float().T, beta.float().T  # [HV, T]
    q, k = l2norm(q), l2norm(k)
    q = q * q.shape[-1] ** -0.5
    length = q.shape[1]
    pad = -length % CHUNK_SIZE
    q, k, v = (F.pad(x, (0, 0, 0, pad)) for x in (q, k, v))
    g, beta = F.pad(g, (0, pad)), F.pad(beta, (0, pad))
    chunks = lambda x: x.reshape(num_v_heads, -1, CHUNK_SIZE, *x.shape[2:])  # noqa: E731
    k_beta, v_beta = chunks(k * beta[..., None]), chunks(v * beta[..., None])
    q, k, g = chunks(q), chunks(k), chunks(g).cumsum(-1)
    upper = torch.ones(CHUNK_SIZE, CHUNK_SIZE, dtype=torch.bool, device=q.device).triu(1)
    decay = (g[..., :, None] - g[..., None, :]).masked_fill(upper, float("-inf")).exp()
    system = (k_beta @ k.transpose(-1, -2)) * decay
    intra = (q @ k.transpose(-1, -2)) * decay
    new_values = torch.linalg.solve_triangular(system, v_beta, upper=False, unitriangular=True)
    k_cumdecay = torch.linalg.solve_triangular(system, k_beta * g.exp()[..., None],
                                               upper=False, unitriangular=True)
    q = q * g.exp()[..., None]
    k = k * (g[..., -1:] - g).exp()[..., None]
    chunk_decay = g[..., -1].exp()[..., None, None]
    out = torch.zeros_like(new_values)
    for c in range(q.shape[1]):
        v_new = new_values[:, c] - k_cumdecay[:, c] @ state
        out[:, c] = q[:, c] @ state + intra[:, c] @ v_new
        state = state * chunk_decay[:, c] + k[:, c].transpose(-1, -2) @ v_new
    out = out.reshape(num_v_heads, -1, out.shape[-1])[:, :length]
    return out.transpose(0, 1), state


def gdn_decode(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, a: torch.Tensor,
               b: torch.Tensor, A_log: torch.Tensor, dt_bias: torch.Tensor,
               ssm_states: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
    """One token per request (q/k [N, H, K], v [N, HV, V], a/b [N, HV]): gates, the delta-rule
    update of each slot's state in place, and the output [N, HV, V]."""
    g, beta = gdn_gating(A_log, a, dt_bias, b)
    q, k = _expand_heads(q, k, v.shape[1])
    q, k = l2norm(q.float()), l2norm(k.float())
    q = q * q.shape[-1] ** -0.5
    state = ssm_states[slots].float() * g.exp()[..., None, None]  # [N, HV, K, V]
    delta = (v.float() - (state * k[..., None]).sum(-2)) * beta[..., None]
    state = state + k[..., None] * delta[..., None, :]
    ssm_states[slots] = state.to(ssm_states.dtype)
    return (state * q[..., None]).sum(-2).to(v.dtype)


# --- prefix-cache tracking -------------------------------------------------------------------


def track_states(conv_states: torch.Tensor, ssm_states: torch.Tensor, src: torch.Tensor,
                 dst: torch.Tensor, mask: torch.Tensor) -> None:
    """Copy each masked row's state (slot src[i]) to slot dst[i]; unmasked rows write to slot 0,
    the padding slot, so the copy needs no host read of the mask."""
    dst = torch.where(mask, dst.to(src.dtype), torch.zeros_like(src))
    conv_states[dst] = conv_states[src]
    ssm_states[dst] = ssm_states[src]
