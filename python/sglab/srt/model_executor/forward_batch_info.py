"""ForwardBatch: the device-side view of one batch, built once per step in `init_new`.

Every host→device upload of per-step metadata happens in `ForwardBatch.init_new` (or, for a
decode step that runs in a CUDA graph, in `GraphInputs.upload`, straight into the graph's static
buffers), from host data that `ScheduleBatch` prepared; every length the host needs keeps a
`_cpu` twin here.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import IntEnum, auto
from typing import TYPE_CHECKING

import torch

from sglab.srt.debug.sync_audit import audit_region
from sglab.srt.layers.dp_attention import DpPaddingMode, DpStepInfo

if TYPE_CHECKING:
    from sglab.srt.layers.attention.base_attn_backend import AttentionBackend
    from sglab.srt.layers.sampler import SamplingBatchInfo
    from sglab.srt.managers.hisparse_coordinator import HiSparseCoordinator, HiSparseStepPlan
    from sglab.srt.managers.schedule_batch import ModelWorkerBatch
    from sglab.srt.mem_cache.memory_pool import MHATokenToKVPool, ReqToTokenPool
    from sglab.srt.model_executor.model_runner import ModelRunner


class ForwardMode(IntEnum):
    EXTEND = auto()
    DECODE = auto()
    MIXED = auto()
    IDLE = auto()

    def is_extend(self) -> bool:
        return self in (ForwardMode.EXTEND, ForwardMode.MIXED)

    def is_decode(self) -> bool:
        return self == ForwardMode.DECODE

    def is_mixed(self) -> bool:
        return self == ForwardMode.MIXED

    def is_idle(self) -> bool:
        return self == ForwardMode.IDLE


@dataclass
class ForwardBatch:
    forward_mode: ForwardMode
    batch_size: int
    input_ids: torch.Tensor  # [num_tokens] int64, device
    req_pool_indices: torch.Tensor  # [bs] int64, device
    seq_lens: torch.Tensor  # [bs] int64, device
    out_cache_loc: torch.Tensor  # [num_tokens] int64, device
    positions: torch.Tensor  # [num_tokens] int64, device
    seq_lens_sum: int
    seq_lens_cpu: torch.Tensor  # [bs] int64
    seq_lens_max: int = 0
    # Extend only (None for decode).
    extend_num_tokens: int | None = None
    extend_seq_lens: torch.Tensor | None = None
    extend_prefix_lens: torch.Tensor | None = None
    extend_start_loc: torch.Tensor | None = None
    extend_seq_lens_cpu: list[int] | None = None
    extend_prefix_lens_cpu: list[int] | None = None
    extend_logprob_start_lens_cpu: list[int] | None = None
    extend_logprob_pruned_lens_cpu: list[int] | None = None
    extend_input_logprob_token_ids_gpu: torch.Tensor | None = None
    # Logprobs.
    return_logprob: bool = False
    top_logprobs_nums: list[int] | None = None
    token_ids_logprobs: list[list[int] | None] | None = None
    # Sampling.
    sampling_info: "SamplingBatchInfo | None" = None
    # Pools and backend (explicit, never a hidden global).
    req_to_token_pool: "ReqToTokenPool | None" = None
    token_to_kv_pool: "MHATokenToKVPool | None" = None
    attn_backend: "AttentionBackend | None" = None
    # LoRA: each request's adapter id (None = base model); see LoRAManager.prepare_lora_batch.
    lora_ids: list[str | None] | None = None
    lora_inflight_ids: set[str | None] | None = None
    # HiSparse decode steps: the coordinator the attention backend selects through, and the
    # step's plan (None: dense attention over req_to_token, every other step).
    hisparse_coordinator: "HiSparseCoordinator | None" = None
    hisparse_plan: "HiSparseStepPlan | None" = None
    # Hybrid models, extra_buffer: this step's Mamba-state snapshots (ModelWorkerBatch's).
    mamba_track_indices: torch.Tensor | None = None
    mamba_track_mask: torch.Tensor | None = None
    mamba_track_seqlens: torch.Tensor | None = None
    mamba_track_mask_cpu: list[bool] | None = None
    mamba_track_seqlens_cpu: list[int] | None = None
    # DP attention: this step's layout of the MLP's global buffer (None: off).
    dp_step: DpStepInfo | None = None
    # Patch 0003c: every DP rank extends this step (MIN over ranks; False with the patch off).
    all_extend_in_batch: bool = False

    @classmethod
    def init_new(cls, batch: "ModelWorkerBatch", model_runner: "ModelRunner") -> "ForwardBatch":
        if batch.forward_mode.is_idle():
            return cls.init_idle(batch, model_runner)
        with audit_region("ForwardBatch.init_new"):
            fb = cls._init_new(batch, model_runner)
        fb.dp_step, fb.all_extend_in_batch = dp_step_info(batch), batch.all_extend_in_batch
        if batch.hisparse_plan is not None:
            fb.hisparse_coordinator = model_runner.hisparse_coordinator
            fb.hisparse_plan = batch.hisparse_plan
        lora_manager = model_runner.lora_manager
        if lora_manager is not None:  # its own audit regions, apart from patch 0001's
            fb.lora_ids = batch.lora_ids
            lora_manager.prepare_lora_batch(fb, batch.lora_inflight_ids)
        return fb

    @classmethod
    def init_idle(cls, batch: "ModelWorkerBatch", model_runner: "ModelRunner") -> "ForwardBatch":
        """DP attention: a rank with nothing to run joins the step's collectives with no
        tokens."""
        empty = torch.empty(0, dtype=torch.int64, device=model_runner.device)
        return cls(forward_mode=ForwardMode.IDLE, batch_size=0, input_ids=empty,
                   req_pool_indices=empty, seq_lens=empty, out_cache_loc=empty,
                   positions=empty, seq_lens_sum=0, seq_lens_cpu=batch.seq_lens_cpu,
                   req_to_token_pool=model_runner.req_to_token_pool,
                   token_to_kv_pool=model_runner.token_to_kv_pool,
                   attn_backend=model_runner.attn_backend, dp_step=dp_step_info(batch))

    @classmethod
    def _init_new(cls, batch: "ModelWorkerBatch", model_runner: "ModelRunner") -> "ForwardBatch":
        cache = model_runner.decode_inputs
        reuse = cache.reusable(batch)
        # Patch 0001: how the step's uploads travel (pageable / pinned / one packed copy).
        dev = model_runner.h2d_uploader.upload(_uploads(batch, per_request=not reuse))
        if batch.forward_mode.is_decode():
            dev = cache.update(batch, dev, reuse)
        mode = batch.forward_mode
        fb = cls(
            forward_mode=mode,
            batch_size=len(batch.seq_lens_cpu),
            input_ids=dev.get("input_ids"),  # decode: gathered by the worker
            req_pool_indices=dev["req_pool_indices"],
            seq_lens=dev["seq_lens"],
            out_cache_loc=dev["out_cache_loc"],
            positions=None,  # type: ignore[arg-type]
            seq_lens_sum=batch.seq_lens_sum,
            seq_lens_cpu=batch.seq_lens_cpu,
            seq_lens_max=batch.seq_lens_max,
            return_logprob=batch.return_logprob,
            top_logprobs_nums=batch.top_logprobs_nums,
            token_ids_logprobs=batch.token_ids_logprobs,
            req_to_token_pool=model_runner.req_to_token_pool,
            token_to_kv_pool=model_runner.token_to_kv_pool,
            attn_backend=model_runner.attn_backend,
            **mamba_track_fields(batch),
        )
        if batch.sampling_info is not None:
            fb.sampling_info = batch.sampling_info.with_tensors(dev)
        if mode.is_decode():
            fb.positions = (fb.seq_lens - 1).clamp(min=0)
        else:
            fb._init_extend(batch, dev)
        fb._write_req_to_token(dev)
        return fb

    def _init_extend(self, batch: "ModelWorkerBatch", dev: dict[str, torch.Tensor]) -> None:
        self.extend_num_tokens = int(batch.extend_num_tokens)
        self.extend_seq_lens_cpu = list(batch.extend_seq_lens)
        self.extend_prefix_lens_cpu = list(batch.extend_prefix_lens)
        self.extend_logprob_start_lens_cpu = list(batch.extend_logprob_start_lens)
        self.extend_logprob_pruned_lens_cpu = list(batch.extend_logprob_pruned_lens)
        self.extend_seq_lens = dev["extend_seq_lens"]
        self.extend_prefix_lens = dev["extend_prefix_lens"]
        self.extend_input_logprob_token_ids_gpu = dev.get("extend_input_logprob_token_ids")
        self.positions, self.extend_start_loc = compute_position(
            self.extend_prefix_lens, self.extend_seq_lens, self.extend_num_tokens
        )

    def _write_req_to_token(self, dev: dict[str, torch.Tensor]) -> None:
        """Apply the host's queued row writes, then record the new tokens' slots (stream order)."""
        pool = self.req_to_token_pool
        if "req_to_token_index" in dev:
            pool.req_to_token.view(-1).index_copy_(0, dev["req_to_token_index"],
                                                   dev["req_to_token_value"])
        num_tokens = self.out_cache_loc.numel()
        if num_tokens == 0:
            return
        if self.forward_mode.is_decode():
            rows = self.req_pool_indices
        else:
            rows = torch.repeat_interleave(
                self.req_pool_indices, self.extend_seq_lens, output_size=num_tokens
            )
        pool.req_to_token[rows, self.positions] = self.out_cache_loc.to(torch.int32)


def dp_step_info(batch: "ModelWorkerBatch") -> DpStepInfo | None:
    """The step's global-buffer layout from the ranks' agreement (None without DP attention)."""
    if batch.global_num_tokens is None:
        return None
    mode = DpPaddingMode.get_dp_padding_mode(batch.is_extend_in_batch, batch.global_num_tokens)
    return DpStepInfo(list(batch.global_num_tokens), mode)


def mamba_track_fields(batch: "ModelWorkerBatch") -> dict:
    names = ("mamba_track_indices", "mamba_track_mask", "mamba_track_seqlens",
             "mamba_track_mask_cpu", "mamba_track_seqlens_cpu")
    return {name: getattr(batch, name) for name in names}


def _uploads(batch: "ModelWorkerBatch", per_request: bool = True) -> dict:
    """Every host array this step's forward needs on the device, by name, with its dtype;
    without `per_request`, a decode step of an unchanged batch: only its new KV slots (and any
    queued row writes)."""
    items = {"out_cache_loc": (batch.out_cache_loc, torch.int64)}
    if per_request:
        items["req_pool_indices"] = (batch.req_pool_indices, torch.int64)
        items["seq_lens"] = (batch.seq_lens_cpu, torch.int64)
        if batch.sampling_info is not None:
            items.update(batch.sampling_info.host_tensors())
    if batch.forward_mode.is_extend():
        items["input_ids"] = (batch.input_ids, torch.int64)
        items["extend_seq_lens"] = (batch.extend_seq_lens, torch.int32)
        items["extend_prefix_lens"] = (batch.extend_prefix_lens, torch.int32)
        if batch.extend_input_logprob_token_ids is not None:
            items["extend_input_logprob_token_ids"] = (batch.extend_input_logprob_token_ids,
                                                       torch.int64)
    if batch.req_to_token_writes is not None:
        flat_index, values = batch.req_to_token_writes
        items["req_to_token_index"] = (flat_index, torch.int64)
        items["req_to_token_value"] = (values, torch.int32)
    return items


@dataclass
class DecodeInputCache:
    """The device copies of a decode batch's per-request inputs (rows, lengths, sampling
    tensors), kept while the batch keeps its requests: its next decode step uploads only the
    new KV slots, and the lengths grow by one on the device."""

    composition: int = -1
    seq_lens_cpu: torch.Tensor | None = None
    tensors: dict = field(default_factory=dict)

    def reusable(self, batch: "ModelWorkerBatch") -> bool:
        return (batch.forward_mode.is_decode() and batch.composition == self.composition
                and self.seq_lens_cpu is not None
                and torch.equal(self.seq_lens_cpu + 1, batch.seq_lens_cpu))

    def update(self, batch: "ModelWorkerBatch", dev: dict, reuse: bool) -> dict:
        """This step's device tensors: `dev`, completed from the cache when reused."""
        if reuse:
            dev = {**self.tensors, **dev, "seq_lens": self.tensors["seq_lens"] + 1}
        self.composition, self.seq_lens_cpu = batch.composition, batch.seq_lens_cpu
        self.tensors = {k: v for k, v in dev.items()
                        if k in ("req_pool_indices", "seq_lens") or k.startswith("sampling_")}
        return dev


def compute_position(
    extend_prefix_lens: torch.Tensor, extend_seq_lens: torch.Tensor, extend_num_tokens: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Positions of every extend token and each request's start offset, on the device, no sync."""
    extend_start_loc = torch.cumsum(extend_seq_lens, 0) - extend_seq_lens
    req_of_token = torch.repeat_interleave(
        torch.arange(extend_seq_lens.numel(), device=extend_seq_lens.device),
        extend_seq_lens,
        output_size=extend_num_tokens,
    )
    token_idx = torch.arange(extend_num_tokens, device=extend_seq_lens.device)
    positions = extend_prefix_lens[req_of_token] + token_idx - extend_start_loc[req_of_token]
    return positions.to(torch.int64), extend_start_loc
