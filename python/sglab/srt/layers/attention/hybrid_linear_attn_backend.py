"""Attention for hybrid models: full-attention layers go to the usual backend (KV in the
layer-mapped KV pool), Gated DeltaNet layers to `GDNAttnBackend` (state in the MambaPool).

`GDNAttnBackend` reads and writes each request's state slot in place (`req.mamba_pool_idx`,
mapped from the request row on the device). With the extra_buffer prefix-cache strategy it
also takes snapshots into the request's track slot: a decode step copies the state after it
when `seq_lens % mamba_track_interval == 0` (a masked copy: no host read), and a prefill takes
the state at `mamba_track_seqlens` by running the chunked rule in two passes, up to the
snapshot point and from it. Patch 0003b's sub-mode beyond the PR (`host_track`) builds that
prefill plan from host mirrors; otherwise it reads the device tensors back as upstream 0.5.11
does (`mask.any()`, six `.cpu()`, a `nonzero`).

Upstream: `hybrid_linear_attn_backend.py` (MambaAttnBackendBase, HybridLinearAttnBackend) and
`linear/gdn_backend.py`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from sglab.srt.debug.sync_audit import audit_region
from sglab.srt.layers.attention.linear import reference as ref
from sglab.srt.layers.attention.linear.kernels import GDNKernels
from sglab.srt.utils.h2d import h2d

if TYPE_CHECKING:
    from sglab.srt.layers.radix_linear_attention import RadixLinearAttention
    from sglab.srt.mem_cache.memory_pool import HybridReqToTokenPool
    from sglab.srt.model_executor.forward_batch_info import ForwardBatch


@dataclass
class ExtendTrack:
    """Where a prefill takes its snapshots. Per tracked request (batch row `rows[i]`): the
    snapshot is the state after `lens[i]` of its extend tokens, written to slot `dst[i]`."""

    rows: list[int]
    lens: list[int]
    dst: torch.Tensor  # [n] device
    conv_token_index: torch.Tensor  # [n, kernel - 1] device: the packed inputs of each window
    # Two passes (requests whose snapshot is inside their extend): tokens and lengths of each.
    head_index: torch.Tensor | None = None
    head_lens: list[int] | None = None
    tail_index: torch.Tensor | None = None
    tail_lens: list[int] | None = None
    split_rows: list[int] | None = None


@dataclass
class GDNMetadata:
    mamba_cache_indices: torch.Tensor  # [bs] the requests' live state slots
    track_mask: torch.Tensor | None = None  # decode: [bs] bool
    track_indices: torch.Tensor | None = None  # decode: [bs] track slots
    extend_track: ExtendTrack | None = None
    has_mamba_track_mask: bool = False


class GDNAttnBackend:
    def __init__(self, model_runner):
        self.device = model_runner.device
        self.pool: HybridReqToTokenPool = model_runner.req_to_token_pool
        self.host_track = self.pool.host_track
        self.conv_window = model_runner.model_config.hybrid.conv_kernel - 1
        self.kernels = GDNKernels(self.device)
        self.forward_metadata: GDNMetadata | None = None
        self.graph_state: dict[str, torch.Tensor] | None = None

    # --- metadata -----------------------------------------------------------------------------

    def init_forward_metadata(self, forward_batch: "ForwardBatch") -> None:
        fb = forward_batch
        read_back = None
        with audit_region("GDNAttnBackend.init_forward_metadata"):
            slots = self.pool.get_mamba_indices(fb.req_pool_indices)
            mask = fb.mamba_track_mask
            md = GDNMetadata(slots)
            if fb.forward_mode.is_decode():
                md.track_mask, md.track_indices = mask, fb.mamba_track_indices
            elif not self.host_track and mask is not None and mask.any():
                read_back = self._read_track_from_device(fb, slots)
            if not self.host_track:  # upstream 0.5.11 computes it for every batch
                md.has_mamba_track_mask = bool(mask is not None and mask.any())
        if fb.forward_mode.is_extend() and mask is not None:
            md.extend_track = self._extend_track_from_host(fb) if self.host_track \
                else self._extend_track_from(read_back)
            md.has_mamba_track_mask = md.extend_track is not None
        self.forward_metadata = md

    def _extend_track_from_host(self, fb: "ForwardBatch") -> ExtendTrack | None:
        """sglab beyond the PR: the plan from the host mirrors, the slots gathered on the
        device (no host read)."""
        rows = [i for i, m in enumerate(fb.mamba_track_mask_cpu) if m]
        if not rows:
            return None
        lens = [fb.mamba_track_seqlens_cpu[i] - fb.extend_prefix_lens_cpu[i] for i in rows]
        dst = fb.mamba_track_indices[h2d(rows, torch.int64, self.device, pin=True)]
        return self._plan(fb.extend_seq_lens_cpu, rows, lens, dst)

    def _read_track_from_device(self, fb: "ForwardBatch", slots: torch.Tensor) -> dict:
        """As upstream 0.5.11 (`_init_track_conv_indices`, `_init_track_ssm_indices` and GDN's
        `mamba_track_mask.nonzero()`): the track plan's inputs read back from the device."""
        lens_dev = fb.mamba_track_seqlens - fb.extend_prefix_lens
        _ = lens_dev[fb.mamba_track_mask]  # upstream's masked conv start positions
        read = {name: t.cpu() for name, t in (
            ("mask", fb.mamba_track_mask), ("extend_lens", fb.extend_seq_lens),
            ("track_indices", fb.mamba_track_indices), ("slots", slots),
            ("seqlens", fb.mamba_track_seqlens), ("prefix_lens", fb.extend_prefix_lens))}
        # Upstream's mask.nonzero(as_tuple=True)[0] (the audit's dispatch mode only sees this
        # form under inference mode).
        read["dst"] = fb.mamba_track_indices[fb.mamba_track_mask.nonzero().squeeze(1)]
        return read

    def _extend_track_from(self, read: dict | None) -> ExtendTrack | None:
        if read is None:
            return None
        rows = [i for i, m in enumerate(read["mask"].tolist()) if m]
        lens = (read["seqlens"] - read["prefix_lens"])[rows].tolist()
        return self._plan(read["extend_lens"].tolist(), rows, lens, read["dst"])

    def _plan(self, extend_lens: list[int], rows: list[int], lens: list[int],
              dst: torch.Tensor) -> ExtendTrack:
        starts = [0]
        for n in extend_lens[:-1]:
            starts.append(starts[-1] + n)
        width = self.conv_window
        assert all(width <= n <= extend_lens[r] for r, n in zip(rows, lens)), (rows, lens)
        conv = torch.tensor([[starts[r] + n - width + j for j in range(width)]
                             for r, n in zip(rows, lens)], dtype=torch.int64)
        track = ExtendTrack(rows, lens, dst, h2d(conv, torch.int64, self.device, pin=True))
        split = [(r, n) for r, n in zip(rows, lens) if n < extend_lens[r]]
        if split:
            self._plan_two_passes(track, extend_lens, starts, dict(split))
        return track

    def _plan_two_passes(self, track: ExtendTrack, extend_lens: list[int], starts: list[int],
                         split: dict[int, int]) -> None:
        head_lens = [split.get(i, n) for i, n in enumerate(extend_lens)]
        head = [torch.arange(s, s + h) for s, h in zip(starts, head_lens)]
        tail = [torch.arange(starts[r] + n, starts[r] + extend_lens[r]) for r, n in split.items()]
        track.head_lens, track.split_rows = head_lens, list(split)
        track.tail_lens = [extend_lens[r] - n for r, n in split.items()]
        track.head_index = h2d(torch.cat(head), torch.int64, self.device, pin=True)
        track.tail_index = h2d(torch.cat(tail), torch.int64, self.device, pin=True)

    # --- CUDA graphs (through HybridLinearAttnBackend, a participant of CudaGraphRunner) -------

    def init_cuda_graph_state(self, max_bs: int) -> None:
        self.graph_state = {
            "slots": torch.zeros(max_bs, dtype=torch.int32, device=self.device),
            "track_mask": torch.zeros(max_bs, dtype=torch.bool, device=self.device),
            "track_indices": torch.zeros(max_bs, dtype=torch.int64, device=self.device)}

    def prepare_capture(self, bs: int) -> None:
        g = self.graph_state
        g["track_mask"].zero_()
        track = self.pool.enable_mamba_extra_buffer
        self.forward_metadata = GDNMetadata(
            g["slots"][:bs], g["track_mask"][:bs] if track else None,
            g["track_indices"][:bs] if track else None)

    def graph_prologue(self, forward_batch: "ForwardBatch", bs: int) -> None:
        """Inside the graph: each row's state slot (padding rows: row 0 -> slot 0)."""
        self.graph_state["slots"][:bs].copy_(
            self.pool.get_mamba_indices(forward_batch.req_pool_indices))

    def prepare_replay(self, forward_batch: "ForwardBatch", bs: int) -> None:
        """The step's track mask and slots into the static buffers (device copies); padding
        rows never track."""
        self.prepare_capture(bs)
        fb, g = forward_batch, self.graph_state
        if fb.mamba_track_mask is not None:
            raw_bs = fb.mamba_track_mask.numel()
            g["track_mask"][:raw_bs].copy_(fb.mamba_track_mask)
            g["track_indices"][:raw_bs].copy_(fb.mamba_track_indices)

    # --- forward ------------------------------------------------------------------------------

    def forward(self, layer: "RadixLinearAttention", forward_batch: "ForwardBatch",
                mixed_qkv: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """mixed_qkv [T, 2 * k_dim + v_dim] (before the conv), a/b [T, num_v_heads]; returns
        the core output [T, num_v_heads, head_v_dim]."""
        cache = self.pool.mamba2_layer_cache(layer.layer_id)
        conv_states, ssm_states = cache.conv[0], cache.temporal
        if forward_batch.forward_mode.is_decode():
            return self._decode(layer, mixed_qkv, a, b, conv_states, ssm_states)
        return self._extend(layer, forward_batch, mixed_qkv, a, b, conv_states, ssm_states)

    def _split_qkv(self, layer: "RadixLinearAttention", x: torch.Tensor):
        q, k, v = torch.split(x, [layer.k_dim, layer.k_dim, layer.v_dim], dim=-1)
        n = x.shape[0]
        return (q.view(n, layer.num_k_heads, layer.head_k_dim),
                k.view(n, layer.num_k_heads, layer.head_k_dim),
                v.view(n, layer.num_v_heads, layer.head_v_dim))

    def _decode(self, layer, mixed_qkv, a, b, conv_states, ssm_states) -> torch.Tensor:
        md = self.forward_metadata
        slots = md.mamba_cache_indices
        x = self.kernels.conv_decode(mixed_qkv, layer.conv_weights, conv_states, slots)
        q, k, v = self._split_qkv(layer, x)
        out = self.kernels.decode(q, k, v, a, b, layer.A_log, layer.dt_bias, ssm_states, slots)
        if md.track_mask is not None:
            self.kernels.track(conv_states, ssm_states, slots, md.track_indices, md.track_mask)
        return out

    def _extend(self, layer, fb, mixed_qkv, a, b, conv_states, ssm_states) -> torch.Tensor:
        md = self.forward_metadata
        slots = md.mamba_cache_indices
        track = md.extend_track
        if track is not None:  # the window before each snapshot point, from this extend
            conv_states[track.dst] = \
                mixed_qkv[track.conv_token_index].transpose(1, 2).to(conv_states.dtype)
        x = self.kernels.conv_prefill(mixed_qkv, layer.conv_weights, conv_states, slots,
                                      fb.extend_seq_lens, fb.extend_seq_lens_cpu)
        q, k, v = self._split_qkv(layer, x)
        g, beta = ref.gdn_gating(layer.A_log, a, layer.dt_bias, b)
        initial = ssm_states[slots]
        if track is not None and track.split_rows:
            out, final = self._chunk_two_passes(q, k, v, g, beta, initial, track, ssm_states)
        else:
            out, final = self.kernels.chunk(q, k, v, g, beta, initial, fb.extend_seq_lens_cpu)
        if track is not None:
            self._snapshot_finals(track, final, fb.extend_seq_lens_cpu, ssm_states)
        ssm_states[slots] = final.to(ssm_states.dtype)
        return out

    def _chunk_two_passes(self, q, k, v, g, beta, initial, track: ExtendTrack, ssm_states):
        """Up to each split request's snapshot point (every request in the first pass), then
        the split requests' rest from their snapshots."""
        head, tail = track.head_index, track.tail_index
        out = torch.empty(v.shape, dtype=v.dtype, device=v.device)
        o_head, final = self.kernels.chunk(q[head], k[head], v[head], g[head], beta[head],
                                           initial, track.head_lens)
        out.index_copy_(0, head, o_head)
        split = h2d(track.split_rows, torch.int64, q.device, pin=True)
        snapshots = final[split]
        dst = track.dst[h2d([track.rows.index(r) for r in track.split_rows], torch.int64,
                            q.device, pin=True)]
        ssm_states[dst] = snapshots.to(ssm_states.dtype)
        o_tail, final_tail = self.kernels.chunk(q[tail], k[tail], v[tail], g[tail], beta[tail],
                                                snapshots, track.tail_lens)
        out.index_copy_(0, tail, o_tail)
        final = final.clone()
        final[split] = final_tail
        return out, final

    def _snapshot_finals(self, track: ExtendTrack, final: torch.Tensor, extend_lens: list[int],
                         ssm_states: torch.Tensor) -> None:
        """Requests whose snapshot point is the end of their extend: the final state."""
        at_end = [i for i, (r, n) in enumerate(zip(track.rows, track.lens))
                  if n == extend_lens[r]]
        if not at_end:
            return
        rows = h2d([track.rows[i] for i in at_end], torch.int64, final.device, pin=True)
        which = h2d(at_end, torch.int64, final.device, pin=True)
        ssm_states[track.dst[which]] = final[rows].to(ssm_states.dtype)


class HybridLinearAttnBackend:
    """Routes each layer to its backend: full attention by layer id, linear attention through
    `forward_linear`. A CUDA-graph participant when the full-attention backend is one."""

    def __init__(self, full_attn_backend, linear_attn_backend: GDNAttnBackend,
                 full_attn_layers: list[int]):
        self.full_attn_backend = full_attn_backend
        self.linear_attn_backend = linear_attn_backend
        self.full_attn_layers = set(full_attn_layers)
        self.attn_backend_list = [full_attn_backend, linear_attn_backend]

    @property
    def supports_cuda_graph(self) -> bool:
        return hasattr(self.full_attn_backend, "init_cuda_graph_state")

    def init_forward_metadata(self, forward_batch: "ForwardBatch") -> None:
        for backend in self.attn_backend_list:
            backend.init_forward_metadata(forward_batch)

    def forward(self, q, k, v, layer, forward_batch, save_kv_cache: bool = True, rope=None):
        assert layer.layer_id in self.full_attn_layers, layer.layer_id
        assert rope is None, "the hybrid backend does not fuse q/k norm + RoPE"
        return self.full_attn_backend.forward(q, k, v, layer, forward_batch, save_kv_cache)

    def forward_linear(self, layer, forward_batch, mixed_qkv, a, b) -> torch.Tensor:
        return self.linear_attn_backend.forward(layer, forward_batch, mixed_qkv, a, b)

    def init_cuda_graph_state(self, max_bs: int) -> None:
        for backend in self.attn_backend_list:
            backend.init_cuda_graph_state(max_bs)

    def prepare_capture(self, bs: int) -> None:
        for backend in self.attn_backend_list:
            backend.prepare_capture(bs)

    def graph_prologue(self, forward_batch: "ForwardBatch", bs: int) -> None:
        for backend in self.attn_backend_list:
            backend.graph_prologue(forward_batch, bs)

    def prepare_replay(self, forward_batch: "ForwardBatch", bs: int) -> None:
        for backend in self.attn_backend_list:
            backend.prepare_replay(forward_batch, bs)
