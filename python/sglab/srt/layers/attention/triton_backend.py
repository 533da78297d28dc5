"""Triton attention: paged split-KV decode, 2-stage extend, and the 1-stage unified extend.

Per-step metadata (kv_indptr / kv_indices / split counts) is built once per forward in
`init_forward_metadata` from device tensors and host-known sizes only, so no host sync happens
here. In a CUDA graph the same metadata is computed inside the graph, into static buffers, from
the static rows and lengths (`graph_prologue`).

Deterministic mode runs every attention, decode included, through the unified extend kernel:
a decode step is a one-token extend over the request's keys, so a token's KV and logits have
the same bits whether the token was decoded or (after a radix hit on generated tokens, or a
retraction) prefilled, and whatever else shares its batch.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from sglab.srt.debug.sync_audit import audit_region
from sglab.srt.utils.h2d import list_to_device
from sglab.srt.layers.attention.base_attn_backend import AttentionBackend
from sglab.srt.model_executor.forward_batch_info import ForwardMode
from sglab.srt.layers.attention.triton_ops.create_kv_indices import (
    create_kv_indices,
    decode_kv_indices,
)
from sglab.srt.layers.attention.triton_ops.decode_attention import (
    GROUP_BLOCK_H as DECODE_BLOCK_H,
    DecodeRope,
    decode_attention_fwd,
    set_one_split_tile,
)
from sglab.srt.layers.attention.triton_ops.extend_attention import (
    build_unified_kv_indices,
    extend_attention_fwd,
    extend_attention_fwd_unified,
)

if TYPE_CHECKING:
    from sglab.srt.layers.radix_attention import RadixAttention
    from sglab.srt.model_executor.forward_batch_info import ForwardBatch

MAX_KV_SPLITS = 16
MIN_KEYS_PER_SPLIT = 64
# Stage-1 programs per SM a decode batch aims for. On an H200 the fastest bounds were 16 splits
# at bs 1, 4 at bs 8 and 1 at bs 64, at 264 to 32k keys (kernel_bench sweep --parts attention).
DEFAULT_SPLIT_WAVES = 2


def split_programs(device: torch.device) -> int:
    """Stage-1 programs a decode batch aims for: `SGLAB_DECODE_SPLIT_WAVES` (default
    DEFAULT_SPLIT_WAVES on CUDA, 0 elsewhere) per SM, a CPU counting as one SM; 0: every batch
    size may take MAX_KV_SPLITS splits. A batch of many requests splits less, since its
    requests alone fill the GPU and every split adds a partial to write and merge."""
    env = os.environ.get("SGLAB_DECODE_SPLIT_WAVES")
    if env is not None and not env.isdigit():
        raise ValueError(f"SGLAB_DECODE_SPLIT_WAVES={env!r}: expected a non-negative integer")
    waves = int(env) if env is not None else DEFAULT_SPLIT_WAVES if device.type == "cuda" else 0
    if device.type != "cuda":
        return waves
    return waves * torch.cuda.get_device_properties(device).multi_processor_count


def decode_programs_per_split(num_q_heads: int, num_kv_heads: int) -> int:
    """Stage-1 programs per request and split: one per q head (MHA), or per DECODE_BLOCK_H q
    heads of each kv group (the grouped kernel)."""
    group = num_q_heads // num_kv_heads
    return num_q_heads if group == 1 else num_kv_heads * -(-group // DECODE_BLOCK_H)


def decode_max_splits(bs: int, split_programs: int, programs_per_split: int) -> int:
    """Splits for at most `split_programs` stage-1 programs in a `bs`-row batch, 1 to
    MAX_KV_SPLITS (split_programs 0: MAX_KV_SPLITS)."""
    if split_programs <= 0:
        return MAX_KV_SPLITS
    want = split_programs // (max(bs, 1) * programs_per_split)
    return max(1, min(MAX_KV_SPLITS, want))


def decode_fused_rope() -> bool:
    """SGLAB_DECODE_FUSED_ROPE: 1 (default) or 0."""
    env = os.environ.get("SGLAB_DECODE_FUSED_ROPE", "1")
    if env not in ("0", "1"):
        raise ValueError(f"SGLAB_DECODE_FUSED_ROPE={env!r}: expected 0 or 1")
    return env == "1"


@dataclass
class ForwardMetadata:
    kv_indptr: torch.Tensor
    kv_indices: torch.Tensor
    # Decode only.
    attn_logits: torch.Tensor | None = None
    attn_lse: torch.Tensor | None = None
    num_kv_splits: torch.Tensor | None = None
    max_kv_splits: int = MAX_KV_SPLITS
    # Extend (and deterministic decode: one query row per request).
    qo_indptr: torch.Tensor | None = None
    max_extend_len: int = 0
    # Unified (indptr, indices, prefix_lens): the "kernel" index build, once per forward on
    # first use; deterministic decode: the decode kv indices with prefix_lens = seq_lens - 1.
    unified: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None


def _indptr(lens: torch.Tensor) -> torch.Tensor:
    zero = torch.zeros(1, dtype=torch.int32, device=lens.device)
    return torch.cat([zero, torch.cumsum(lens, dim=0, dtype=torch.int32)])


def _decode_lens(fb: "ForwardBatch") -> tuple[torch.Tensor, int, int]:
    """Keys per decode row on the device, and their host sum and max (HiSparse: a sparse row
    attends to its selection)."""
    if fb.hisparse_coordinator is not None:
        return fb.hisparse_coordinator.decode_lens(fb)
    return fb.seq_lens, fb.seq_lens_sum, fb.seq_lens_max


class TritonAttnBackend(AttentionBackend):
    def __init__(self, model_runner):
        mc = model_runner.model_config
        self.device = model_runner.device
        self.num_q_heads = mc.get_num_attention_heads(model_runner.attn_tp_size)
        self.head_dim = mc.head_dim
        self.req_to_token = model_runner.req_to_token_pool.req_to_token
        args = model_runner.server_args
        self.enable_deterministic = args.enable_deterministic_inference
        # Decode as a one-token unified extend (deterministic mode; see the module docstring).
        self.unified_decode = self.enable_deterministic
        # Patch 0002: how _forward_extend_unified builds its indices.
        flags = model_runner.patch_flags
        index_build = flags.unified_index_build if flags.sync_free_unified_extend else "loop"
        self._build_unified = {"loop": self._build_unified_loop,
                               "batched": self._build_unified_batched,
                               "kernel": self._build_unified_kernel}[index_build]
        self.max_kv_splits = MAX_KV_SPLITS
        set_one_split_tile(os.environ.get("SGLAB_DECODE_ONE_SPLIT_TILE"))
        self.split_programs = split_programs(torch.device(self.device))
        self.programs_per_split = decode_programs_per_split(
            self.num_q_heads, mc.get_num_kv_heads(model_runner.attn_tp_size))
        # --kernel-fusion on: decode attention in one launch; its split counters, zero between
        # launches, shared by every layer and graph (all on the forward stream).
        self.merge_count = None
        if args.kernel_fusion == "on" and not self.unified_decode:
            rows = max(self.req_to_token.shape[0], args.cuda_graph_max_bs or 0)
            self.merge_count = torch.zeros(rows * self.num_q_heads, dtype=torch.int32,
                                           device=self.device)
        # --kernel-fusion on: a decode graph's indptr, indices and split counts in one launch.
        self.fused_graph_prologue = args.kernel_fusion == "on"
        # --kernel-fusion on: grouped-head decode attention takes in the q/k norm + RoPE and
        # the new K/V write (SGLAB_DECODE_FUSED_ROPE=0: the separate kernel).
        self.fused_decode_rope = self.merge_count is not None and decode_fused_rope()
        self.forward_metadata: ForwardMetadata | None = None
        self.graph_state: dict[str, torch.Tensor] | None = None

    # --- metadata -----------------------------------------------------------------------------

    def max_splits(self, bs: int) -> int:
        """The most splits a request of a `bs`-row decode batch takes (a graph's padded size)."""
        return decode_max_splits(bs, self.split_programs, self.programs_per_split)

    @staticmethod
    def _num_kv_splits(seq_lens: torch.Tensor, max_seq_len: int | torch.Tensor,
                       max_splits: int) -> torch.Tensor:
        """Splits per request, on the device; `max_seq_len` a host int (eager) or a 0-d
        device tensor (in a graph): the same values either way."""
        tile = -(-max_seq_len // max_splits)
        tile = max(MIN_KEYS_PER_SPLIT, tile) if isinstance(tile, int) else \
            tile.clamp(min=MIN_KEYS_PER_SPLIT)
        splits = (seq_lens + tile - 1) // tile
        return splits.clamp(1, max_splits).to(torch.int32)

    def _decode_scratch(self, bs: int) -> tuple[torch.Tensor, torch.Tensor]:
        shape = (bs, self.num_q_heads, self.max_kv_splits)
        logits = torch.empty((*shape, self.head_dim), dtype=torch.float32, device=self.device)
        lse = torch.empty(shape, dtype=torch.float32, device=self.device)
        return logits, lse

    def init_forward_metadata(self, forward_batch: "ForwardBatch") -> None:
        fb = forward_batch
        if fb.forward_mode.is_decode():
            lens, lens_sum, lens_max = _decode_lens(fb)
            kv_indptr = _indptr(lens)
            # One spare element: HiSparse's masked index writes land there.
            kv_indices = torch.empty(lens_sum + 1, dtype=torch.int64, device=self.device)
            create_kv_indices(self.req_to_token, fb.req_pool_indices, lens, kv_indptr,
                              None, kv_indices)
            if self.unified_decode:
                self.forward_metadata = ForwardMetadata(
                    kv_indptr, kv_indices,
                    qo_indptr=torch.arange(fb.batch_size + 1, dtype=torch.int32,
                                           device=self.device),
                    max_extend_len=1,
                    unified=(kv_indptr, kv_indices, (fb.seq_lens - 1).to(torch.int32)))
                return
            logits, lse = self._decode_scratch(fb.batch_size)
            max_splits = self.max_splits(fb.batch_size)
            splits = self._num_kv_splits(lens, lens_max, max_splits)
            self.forward_metadata = ForwardMetadata(kv_indptr, kv_indices, logits, lse, splits,
                                                    max_splits)
            return
        prefix_lens = fb.extend_prefix_lens
        kv_indptr = _indptr(prefix_lens)
        kv_indices = torch.empty(sum(fb.extend_prefix_lens_cpu), dtype=torch.int64,
                                 device=self.device)
        create_kv_indices(self.req_to_token, fb.req_pool_indices, prefix_lens, kv_indptr, None,
                          kv_indices)
        self.forward_metadata = ForwardMetadata(
            kv_indptr, kv_indices, qo_indptr=_indptr(fb.extend_seq_lens),
            max_extend_len=max(fb.extend_seq_lens_cpu))

    # --- CUDA graphs (a participant of CudaGraphRunner) ---------------------------------------

    def init_cuda_graph_state(self, max_bs: int,
                              forward_mode: ForwardMode = ForwardMode.DECODE) -> None:
        max_context_len = self.req_to_token.shape[1]
        if forward_mode.is_extend():  # prefill graphs: prefix keys and query rows per request
            self.prefill_graph_state = {
                "qo_indptr": torch.zeros(max_bs + 1, dtype=torch.int32, device=self.device),
                "kv_indptr": torch.zeros(max_bs + 1, dtype=torch.int32, device=self.device),
                "kv_indices": torch.zeros(max_bs * max_context_len + 1, dtype=torch.int64,
                                          device=self.device)}
            return
        g = {"kv_indptr": torch.zeros(max_bs + 1, dtype=torch.int32, device=self.device),
             "kv_indices": torch.zeros(max_bs * max_context_len + 1, dtype=torch.int64,
                                       device=self.device)}
        if self.unified_decode:
            g["qo_indptr"] = torch.arange(max_bs + 1, dtype=torch.int32, device=self.device)
            g["prefix_lens"] = torch.zeros(max_bs, dtype=torch.int32, device=self.device)
        else:
            g["attn_logits"], g["attn_lse"] = self._decode_scratch(max_bs)
            g["num_kv_splits"] = torch.ones(max_bs, dtype=torch.int32, device=self.device)
        self.graph_state = g
        self.graph_metadata: dict[int, ForwardMetadata] = {}

    def prepare_capture(self, bs: int, forward_mode: ForwardMode = ForwardMode.DECODE,
                        num_tokens: int = 0) -> None:
        if forward_mode.is_extend():  # every extend length is at most the graph's tokens
            g = self.prefill_graph_state
            self.forward_metadata = ForwardMetadata(
                g["kv_indptr"][: bs + 1], g["kv_indices"], qo_indptr=g["qo_indptr"][: bs + 1],
                max_extend_len=num_tokens)
            return
        if bs not in self.graph_metadata:  # built once per size: a replay only selects it
            self.graph_metadata[bs] = self._graph_metadata(bs)
        self.forward_metadata = self.graph_metadata[bs]

    def _graph_metadata(self, bs: int) -> ForwardMetadata:
        g = self.graph_state
        if self.unified_decode:
            return ForwardMetadata(
                g["kv_indptr"][: bs + 1], g["kv_indices"], qo_indptr=g["qo_indptr"][: bs + 1],
                max_extend_len=1,
                unified=(g["kv_indptr"][: bs + 1], g["kv_indices"], g["prefix_lens"][:bs]))
        return ForwardMetadata(
            g["kv_indptr"][: bs + 1], g["kv_indices"], g["attn_logits"][:bs],
            g["attn_lse"][:bs], g["num_kv_splits"][:bs], self.max_splits(bs))

    def graph_prologue(self, forward_batch: "ForwardBatch", bs: int) -> None:
        """Inside the graph: the static metadata from the static rows and lengths."""
        if forward_batch.forward_mode.is_extend():
            self._prefill_graph_prologue(forward_batch, bs)
            return
        g, seq_lens = self.graph_state, forward_batch.seq_lens
        if forward_batch.hisparse_coordinator is not None:  # computed by its prologue
            seq_lens = forward_batch.hisparse_coordinator.state.kv_lens
        if self.fused_graph_prologue:
            decode_kv_indices(self.req_to_token, forward_batch.req_pool_indices, seq_lens,
                              g["kv_indptr"], g["kv_indices"],
                              None if self.unified_decode else g["num_kv_splits"],
                              self.max_splits(bs), MIN_KEYS_PER_SPLIT)
        else:
            g["kv_indptr"][1: bs + 1].copy_(torch.cumsum(seq_lens, dim=0))
            create_kv_indices(self.req_to_token, forward_batch.req_pool_indices, seq_lens,
                              g["kv_indptr"], None, g["kv_indices"])
        if self.unified_decode:
            g["prefix_lens"][:bs].copy_(seq_lens - 1)
        elif not self.fused_graph_prologue:
            # the batch's longest length read on the device: no host value in the graph
            g["num_kv_splits"][:bs].copy_(
                self._num_kv_splits(seq_lens, seq_lens.max(), self.max_splits(bs)))

    def _prefill_graph_prologue(self, fb: "ForwardBatch", bs: int) -> None:
        g = self.prefill_graph_state
        g["qo_indptr"][1: bs + 1].copy_(torch.cumsum(fb.extend_seq_lens, dim=0))
        g["kv_indptr"][1: bs + 1].copy_(torch.cumsum(fb.extend_prefix_lens, dim=0))
        create_kv_indices(self.req_to_token, fb.req_pool_indices, fb.extend_prefix_lens,
                          g["kv_indptr"], None, g["kv_indices"])

    def prepare_replay(self, forward_batch: "ForwardBatch", bs: int) -> None:
        """The static metadata views of `bs` (the replay computes their values in
        graph_prologue; an eager forward since capture may have replaced the views)."""
        self.prepare_capture(bs, forward_batch.forward_mode, forward_batch.extend_num_tokens or 0)

    # --- forward ------------------------------------------------------------------------------

    def forward_extend(self, q, k, v, layer: "RadixAttention", forward_batch: "ForwardBatch",
                       save_kv_cache: bool = True) -> torch.Tensor:
        fb, md = forward_batch, self.forward_metadata
        if save_kv_cache:  # before the unified kernel, which reads the new keys from the pool
            fb.token_to_kv_pool.set_kv_buffer(layer, fb.out_cache_loc, k, v)
        q = q.view(-1, layer.tp_q_head_num, layer.qk_head_dim)
        o = torch.empty_like(q)
        if self.enable_deterministic:
            self._forward_extend_unified(q, o, layer, fb)
        else:
            k_buf, v_buf = fb.token_to_kv_pool.get_kv_buffer(layer.layer_id)
            extend_attention_fwd(q, k.contiguous(), v.contiguous(), o, k_buf, v_buf,
                                 md.qo_indptr, md.kv_indptr, md.kv_indices, None, True, None,
                                 md.max_extend_len, layer.scaling, layer.logit_cap)
        return o.view(-1, layer.tp_q_head_num * layer.v_head_dim)

    def _forward_extend_unified(self, q: torch.Tensor, o: torch.Tensor, layer: "RadixAttention",
                                fb: "ForwardBatch") -> None:
        """1-stage extend over prefix ++ extend keys read from the pool (deterministic mode)."""
        with audit_region("_forward_extend_unified"):
            unified_indptr, unified_indices, prefix_lens = self._build_unified(fb)
            md = self.forward_metadata
            k_buf, v_buf = fb.token_to_kv_pool.get_kv_buffer(layer.layer_id)
            extend_attention_fwd_unified(q, o, k_buf, v_buf, md.qo_indptr, unified_indptr,
                                         unified_indices, prefix_lens, md.max_extend_len,
                                         layer.scaling, layer.logit_cap)

    def _build_unified_loop(self, fb: "ForwardBatch"):
        """Before sglang#11536: per layer, per request scalar reads (4 syncs each) + 2 H2D."""
        md = self.forward_metadata
        parts, indptr, plens = [], [0], []
        for i in range(fb.batch_size):
            ps, pe = md.kv_indptr[i].item(), md.kv_indptr[i + 1].item()
            s, n = fb.extend_start_loc[i].item(), fb.extend_seq_lens[i].item()
            parts += [md.kv_indices[ps:pe], fb.out_cache_loc[s:s + n]]
            plens.append(pe - ps)
            indptr.append(indptr[-1] + (pe - ps) + n)
        unified_indices = torch.cat(parts)
        unified_indptr = list_to_device(indptr, torch.int32, self.device)
        prefix_lens = list_to_device(plens, torch.int32, self.device)
        return unified_indptr, unified_indices, prefix_lens

    def _build_unified_batched(self, fb: "ForwardBatch"):
        """sglang#11536: lengths on the device, one D2H of the per-request offsets per call."""
        md, bs = self.forward_metadata, fb.batch_size
        plens = md.kv_indptr[1:bs + 1] - md.kv_indptr[:bs]
        unified_indptr = _indptr(plens + fb.extend_seq_lens[:bs])
        meta = torch.stack([md.kv_indptr[:bs], md.kv_indptr[1:bs + 1],
                            fb.extend_start_loc[:bs].to(md.kv_indptr.dtype),
                            fb.extend_seq_lens[:bs].to(md.kv_indptr.dtype)]).tolist()
        parts = []
        for ps, pe, s, n in zip(*meta):
            parts += [md.kv_indices[ps:pe], fb.out_cache_loc[s:s + n]]
        return unified_indptr, torch.cat(parts), plens.to(torch.int32)

    def _build_unified_kernel(self, fb: "ForwardBatch"):
        """Upstream main: a copy kernel sized from host-known numels, once per forward."""
        md = self.forward_metadata
        if md.unified is None:
            md.unified = build_unified_kv_indices(md.kv_indptr, md.kv_indices,
                                                  fb.extend_start_loc, fb.extend_seq_lens,
                                                  fb.out_cache_loc, fb.batch_size)
        return md.unified

    def forward_decode(self, q, k, v, layer: "RadixAttention", forward_batch: "ForwardBatch",
                       save_kv_cache: bool = True) -> torch.Tensor:
        fb, md = forward_batch, self.forward_metadata
        if save_kv_cache:
            fb.token_to_kv_pool.set_kv_buffer(layer, fb.out_cache_loc, k, v)
        hisparse = fb.hisparse_coordinator
        if hisparse is not None:  # the sparse rows' keys: this layer's selection, swapped in
            hisparse.write_sparse_indices(md.kv_indices, md.kv_indptr,
                                          hisparse.select(layer.layer_id, q, k))
        q = q.view(-1, layer.tp_q_head_num, layer.qk_head_dim)
        o = torch.empty_like(q)
        k_buf, v_buf = fb.token_to_kv_pool.get_kv_buffer(layer.layer_id)
        if self.unified_decode:  # the very kernel (and tiles) a prefill of it would use
            extend_attention_fwd_unified(q, o, k_buf, v_buf, md.qo_indptr, *md.unified, 1,
                                         layer.scaling, layer.logit_cap)
            return o.view(-1, layer.tp_q_head_num * layer.v_head_dim)
        decode_attention_fwd(q, k_buf, v_buf, o, md.kv_indptr, md.kv_indices, md.attn_logits,
                             md.attn_lse, md.num_kv_splits, md.max_kv_splits, layer.scaling,
                             layer.logit_cap, merge_count=self.merge_count)
        return o.view(-1, layer.tp_q_head_num * layer.v_head_dim)

    def fuses_qk_rope(self, layer: "RadixAttention", forward_batch: "ForwardBatch") -> bool:
        """--kernel-fusion on, a decode of grouped heads: the grouped kernel takes in the q/k
        norm + RoPE. Not under HiSparse, whose selection reads the rotated q and k."""
        return (self.fused_decode_rope and forward_batch.forward_mode.is_decode()
                and forward_batch.hisparse_coordinator is None
                and layer.tp_q_head_num > layer.tp_k_head_num
                and layer.qk_head_dim == layer.v_head_dim)

    def forward_decode_rope(self, q, k, v, layer: "RadixAttention",
                            forward_batch: "ForwardBatch", rope) -> torch.Tensor:
        """forward_decode from the raw q and k: one launch normalizes and rotates them, stores
        the new K/V and attends."""
        fb, md = forward_batch, self.forward_metadata
        q = q.view(-1, layer.tp_q_head_num, layer.qk_head_dim)
        o = q.new_empty((q.shape[0], layer.tp_q_head_num, layer.v_head_dim))
        k_buf, v_buf = fb.token_to_kv_pool.get_kv_buffer(layer.layer_id)
        decode_attention_fwd(q, k_buf, v_buf, o, md.kv_indptr, md.kv_indices, md.attn_logits,
                             md.attn_lse, md.num_kv_splits, md.max_kv_splits, layer.scaling,
                             layer.logit_cap, merge_count=self.merge_count,
                             rope=DecodeRope(rope, k.flatten(1), v.flatten(1),
                                             fb.out_cache_loc))
        return o.view(-1, layer.tp_q_head_num * layer.v_head_dim)
