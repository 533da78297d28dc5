"""Which Gated DeltaNet kernels a device runs: the torch reference on CPU; on CUDA the Triton
kernels of `gdn_triton.py` and fla-core's chunked varlen prefill (an optional dependency,
imported when a hybrid model is served on CUDA)."""

from __future__ import annotations

import torch

from sglab.srt.layers.attention.linear import gdn_triton
from sglab.srt.layers.attention.linear import reference as ref

FLA_REQUIRED = ("serving a Gated DeltaNet model on CUDA needs fla-core for the chunked prefill "
                "(pip install fla-core)")


def _import_fla_chunk():
    try:
        from fla.ops.gated_delta_rule import chunk_gated_delta_rule
    except ImportError as e:
        raise RuntimeError(FLA_REQUIRED) from e
    return chunk_gated_delta_rule


def fla_chunk_gated_delta_rule(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                               g: torch.Tensor, beta: torch.Tensor, initial_state: torch.Tensor,
                               cu_seqlens: torch.Tensor, cu_seqlens_cpu: torch.Tensor):
    """`reference.chunk_gated_delta_rule` through fla-core: packed varlen sequences with their
    initial states (the host copy of the offsets spares fla a device read)."""
    chunk = _import_fla_chunk()
    o, final = chunk(q[None], k[None], v[None], g[None], beta[None],
                     initial_state=initial_state.float(), output_final_state=True,
                     use_qk_l2norm_in_kernel=True, cu_seqlens=cu_seqlens,
                     cu_seqlens_cpu=cu_seqlens_cpu)
    return o[0], final


class GDNKernels:
    """The per-layer ops of `GDNAttnBackend`, for one device."""

    def __init__(self, device: torch.device):
        self.on_cuda = device.type == "cuda"
        if self.on_cuda:
            _import_fla_chunk()  # fail at startup, not on the first prefill

    def conv_prefill(self, x, weight, conv_states, slots, seq_lens, seq_lens_cpu: list[int]):
        if self.on_cuda:
            return gdn_triton.causal_conv1d_prefill(x, weight, conv_states, slots, seq_lens,
                                                    x.shape[0])
        return ref.causal_conv1d_prefill(x, weight, conv_states, slots, seq_lens_cpu)

    def conv_decode(self, x, weight, conv_states, slots):
        fn = gdn_triton.causal_conv1d_decode if self.on_cuda else ref.causal_conv1d_decode
        return fn(x, weight, conv_states, slots)

    def chunk(self, q, k, v, g, beta, initial_state, seq_lens_cpu: list[int]):
        """(output, final states in fp32) of packed sequences with host-known lengths."""
        if not self.on_cuda:
            return ref.chunk_gated_delta_rule(q, k, v, g, beta, initial_state, seq_lens_cpu)
        cu_cpu = torch.zeros(len(seq_lens_cpu) + 1, dtype=torch.int64)
        cu_cpu[1:] = torch.tensor(seq_lens_cpu, dtype=torch.int64).cumsum(0)
        cu = cu_cpu.pin_memory().to(q.device, non_blocking=True)
        return fla_chunk_gated_delta_rule(q, k, v, g, beta, initial_state, cu, cu_cpu)

    def decode(self, q, k, v, a, b, A_log, dt_bias, ssm_states, slots):
        fn = gdn_triton.gdn_decode if self.on_cuda else ref.gdn_decode
        return fn(q, k, v, a, b, A_log, dt_bias, ssm_states, slots)

    def track(self, conv_states, ssm_states, src, dst, mask) -> None:
        fn = gdn_triton.track_states if self.on_cuda else ref.track_states
        fn(conv_states, ssm_states, src, dst, mask)
