"""ModelRunner: owns the model, the KV pools and the attention backend on one device."""

from __future__ import annotations

import logging
import os

import torch

from sglab.srt.configs.model_config import ModelConfig
from sglab.srt.configs.model_options import ModelOptions
from sglab.srt.constrained.grammar_backend import VocabMask
from sglab.srt.debug.sync_audit import audit_region
from sglab.srt.distributed.parallel_state import (
    get_dp_attention_info,
    initialize_model_parallel,
)
from sglab.srt.layers.attention.torch_native_backend import TorchNativeAttnBackend
from sglab.srt.layers.logits_processor import LogitsProcessorOutput
from sglab.srt.layers.linear import prefer_cublaslt
from sglab.srt.layers.sampler import SampleOutput, Sampler
from sglab.srt.sampling.custom_logit_processor import apply_custom_logit_processors
from sglab.srt.mem_cache.memory_pool import (
    MHATokenToKVPool,
    PagedTokenToKVPoolAllocator,
    ReqToTokenPool,
    TokenToKVPoolAllocator,
)
from sglab.srt.managers.overlap_utils import FutureMap, StepStreams
from sglab.srt.model_executor.forward_batch_info import DecodeInputCache, ForwardBatch
from sglab.srt.model_executor.model_runner_mamba_mixin import ModelRunnerMambaMixin
from sglab.srt.model_loader.loader import get_model
from sglab.srt.patches import PatchFlags
from sglab.srt.server_args import ServerArgs
from sglab.srt.utils.h2d import StepUploader, is_pin_memory_available

logger = logging.getLogger(__name__)


def h2d_mode(flags: PatchFlags) -> str:
    """Patch 0001: off = pageable uploads; on = the PR (pinned) or sglab's packed mode."""
    if not flags.pinned_h2d:
        return "pageable"
    return {"pr": "pinned", "packed": "packed"}[flags.pinned_h2d_mode]


GiB = 1 << 30
# KV pool size on CPU when --max-total-tokens is not given: at most this many tokens/bytes.
CPU_DEFAULT_MAX_TOKENS = 65536
CPU_DEFAULT_KV_BYTES = 4 * GiB
GPU_MAX_TOKENS = 1 << 23


class ModelRunner(ModelRunnerMambaMixin):
    def __init__(self, model_config: ModelConfig, server_args: ServerArgs, tp_rank: int = 0,
                 dist_init_method: str | None = None):
        self.model_config = model_config
        self.server_args = server_args
        self.tp_rank, self.tp_size = tp_rank, server_args.tp_size
        # One GPU per rank.
        self.device = torch.device(f"cuda:{tp_rank}" if server_args.device == "cuda"
                                   and self.tp_size > 1 else server_args.device)
        self.page_size = server_args.page_size
        torch.manual_seed(server_args.random_seed)
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device.index or 0)
        elif self.tp_size > 1:  # CPU ranks share the cores instead of each spinning on all
            torch.set_num_threads(max(1, min(torch.get_num_threads(),
                                             (os.cpu_count() or 1) // self.tp_size)))
        self.tp_group = initialize_model_parallel(
            tp_rank, self.tp_size, dist_init_method, server_args.device,
            dp_size=server_args.dp_size, enable_dp_attention=server_args.enable_dp_attention)
        self.dp_info = get_dp_attention_info()
        self.attn_tp_size = self.dp_info.attn_tp_size  # ranks each attention layer spans
        # Built once; each consumer gets it (or the one value it needs) through its constructor.
        self.patch_flags = PatchFlags.from_server_args(server_args)
        options = ModelOptions(
            batch_invariant=server_args.enable_deterministic_inference,
            sync_free_logits_metadata=self.patch_flags.sync_free_logits_metadata,
            kernel_fusion=server_args.kernel_fusion == "on")
        if options.kernel_fusion and self.device.type == "cuda":
            prefer_cublaslt()
        self.model = get_model(model_config, server_args.load_format, str(self.device),
                               options)
        self.sampler = Sampler()
        self.h2d_mode = h2d_mode(self.patch_flags)
        self.h2d_uploader = StepUploader(self.device, self.h2d_mode)
        self.decode_inputs = DecodeInputCache()
        self.lora_manager = None
        if server_args.enable_lora:
            self.init_lora_manager()
        self.streams = StepStreams(self.device, hisparse=server_args.enable_hisparse)
        self.hisparse_coordinator = None
        self.init_memory_pool()
        self.attn_backend = self._make_attn_backend()
        self.future_map = FutureMap(self.req_to_token_pool.req_to_token.shape[0], self.device)
        self.graph_runner = None
        # The torch_native reference has no static-metadata hooks: it always runs eagerly.
        if not server_args.disable_cuda_graph and getattr(
                self.attn_backend, "supports_cuda_graph",
                hasattr(self.attn_backend, "init_cuda_graph_state")):
            from sglab.srt.model_executor.cuda_graph_runner import CudaGraphRunner

            self.graph_runner = CudaGraphRunner(self)
        self.prefill_graph_runner = None
        if self.graph_runner is not None and self.uses_prefill_graphs():
            from sglab.srt.model_executor.prefill_cuda_graph_runner import (
                PrefillCudaGraphRunner,
            )

            self.prefill_graph_runner = PrefillCudaGraphRunner(self)

    def uses_prefill_graphs(self) -> bool:
        """--enable-prefill-cuda-graph; under DP attention only with patch 0003c (upstream
        0.5.11 runs no prefill graph there)."""
        return self.server_args.enable_prefill_cuda_graph and \
            (not self.dp_info.enabled or self.patch_flags.dp_prefill_cuda_graph)

    def graph_runners(self) -> list:
        return [r for r in (self.graph_runner, self.prefill_graph_runner) if r is not None]

    def graph_for(self, batch):
        """The graph runner that replays this batch, or None: eager."""
        return next((r for r in self.graph_runners() if r.can_run(batch)), None)

    def init_lora_manager(self) -> None:
        """Swap LoRA wrappers into the model and allocate the adapter slots (before the KV pool
        is sized, so the slots count as used memory)."""
        from sglab.srt.lora.lora_manager import LoRAManager

        self.lora_manager = LoRAManager(self.model, self.server_args, self.patch_flags,
                                        self.model_config.dtype, self.device)

    # --- memory -------------------------------------------------------------------------------

    @property
    def num_kv_heads(self) -> int:
        """KV heads held by this rank's pool."""
        return self.model_config.get_num_kv_heads(self.attn_tp_size)

    def _cell_size(self) -> int:
        mc = self.model_config
        cell = MHATokenToKVPool.cell_size_bytes(self.num_kv_heads, mc.head_dim,
                                                mc.num_attention_layers, mc.dtype)
        if self.server_args.enable_hisparse:  # the host tier's residency map and summaries
            from sglab.srt.managers.hisparse_coordinator import device_bytes_per_token

            cell += device_bytes_per_token(self._hisparse_config(), mc.num_hidden_layers,
                                           mc.num_key_value_heads, mc.head_dim)
        return cell

    def _hisparse_config(self):
        from sglab.srt.mem_cache.sparsity.config import parse_hisparse_config

        return parse_hisparse_config(self.server_args.hisparse_config, self.page_size)

    def profile_max_num_token(self) -> int:
        cell = self._cell_size()
        if self.device.type == "cuda":
            free, total = torch.cuda.mem_get_info(self.device)
            rest = int(free - total * (1 - self.server_args.mem_fraction_static))
            if self.model_config.hybrid is not None:
                rest = self.handle_max_mamba_cache(rest)
            # Real models stay far below the cap; tiny test models would otherwise get pools
            # of 10^8 slots whose host-side free lists cost more than they serve.
            return min(max(rest // cell, 0), GPU_MAX_TOKENS)
        rest = CPU_DEFAULT_KV_BYTES
        if self.model_config.hybrid is not None:
            rest = self.handle_max_mamba_cache(rest)
        return min(CPU_DEFAULT_MAX_TOKENS, rest // cell)

    def init_memory_pool(self) -> None:
        args, mc = self.server_args, self.model_config
        tokens = self.profile_max_num_token()
        if args.max_total_tokens is not None:
            tokens = min(tokens, args.max_total_tokens) if self.device.type == "cuda" \
                else args.max_total_tokens
        # Every rank holds the same requests: the pool is as large as the tightest rank's.
        tokens = self.tp_group.all_reduce_min(tokens) // self.page_size * self.page_size
        if tokens < max(self.page_size, 16):
            raise RuntimeError(
                f"Not enough memory for the KV cache ({tokens} tokens); raise "
                "--mem-fraction-static or --max-total-tokens")
        self.max_total_num_tokens = tokens
        max_reqs = args.max_running_requests or min(
            max(tokens // mc.context_len * 512, 2048), 4096, max(tokens // 2, 1))
        if args.enable_hisparse and not args.max_running_requests:
            # Per-row, per-layer buffer tables: as many rows as twice the full hot buffers fit.
            config = self._hisparse_config()
            max_reqs = min(max_reqs, max(2 * tokens // (config.device_buffer_size
                                                        + config.page_size), 1))
        if mc.hybrid is not None:  # every running request holds state slots
            max_reqs = min(max_reqs, self.max_mamba_cache_size // self.mamba_ratio())
        self.max_running_requests = max_reqs
        if mc.hybrid is not None:
            self.init_hybrid_pools(tokens, max_reqs)
        else:
            self.req_to_token_pool = ReqToTokenPool(max_reqs, mc.context_len + 4, self.device)
            self.token_to_kv_pool = MHATokenToKVPool(
                tokens, self.page_size, mc.dtype, self.num_kv_heads, mc.head_dim,
                mc.num_hidden_layers, self.device)
        alloc_cls = TokenToKVPoolAllocator if self.page_size == 1 else PagedTokenToKVPoolAllocator
        self.token_to_kv_pool_allocator = alloc_cls(tokens, self.token_to_kv_pool)
        if args.enable_hisparse:
            self.init_hisparse()
        logger.info("KV cache: %d tokens (%.2f GiB), max running requests %d", tokens,
                    self.token_to_kv_pool.get_kv_size_bytes() / GiB, max_reqs)

    def init_hisparse(self) -> None:
        """The host KV tier, the scheduler's HiSparse allocator over it and the coordinator
        (before the CUDA graphs, which it joins)."""
        from sglab.srt.managers.hisparse_coordinator import HiSparseCoordinator, backup_mode
        from sglab.srt.mem_cache.hisparse_memory_pool import HiSparseTokenToKVPoolAllocator
        from sglab.srt.mem_cache.memory_pool_host import MHATokenToKVPoolHost

        config, tokens = self._hisparse_config(), self.max_total_num_tokens
        if tokens < config.device_buffer_size + config.page_size:
            raise RuntimeError(
                f"HiSparse: the KV pool ({tokens} tokens) is smaller than one hot buffer "
                f"(--hisparse-config device_buffer_size + page, "
                f"{config.device_buffer_size + config.page_size}); raise --max-total-tokens")
        host_tokens = int(tokens * config.host_to_device_ratio) // self.page_size * self.page_size
        host_pool = MHATokenToKVPoolHost(self.token_to_kv_pool, host_tokens,
                                         is_pin_memory_available(self.device))
        allocator = HiSparseTokenToKVPoolAllocator(host_pool, self.token_to_kv_pool_allocator)
        flags = self.patch_flags
        self.hisparse_coordinator = HiSparseCoordinator(
            config, self.req_to_token_pool, allocator, self.streams,
            backup_mode(flags.hisparse_async_backup, flags.hisparse_backup_mode),
            self.model_config.num_attention_heads)
        self.token_to_kv_pool_allocator = allocator
        logger.info("HiSparse: host KV tier %d tokens (%.2f GiB pinned), hot buffer %d, top-k %d",
                    host_tokens, host_pool.get_kv_size_bytes() / GiB,
                    config.device_buffer_size, config.top_k)

    def _make_attn_backend(self):
        backend = self._make_full_attn_backend()
        if self.model_config.hybrid is not None:
            return self.make_hybrid_attn_backend(backend)
        return backend

    def _make_full_attn_backend(self):
        name = self.server_args.attention_backend
        if name == "torch_native":
            return TorchNativeAttnBackend(self)
        if name == "triton":
            from sglab.srt.layers.attention.triton_backend import TritonAttnBackend

            return TritonAttnBackend(self)
        raise ValueError(f"--attention-backend: unsupported value {name!r}")

    # --- forward ------------------------------------------------------------------------------

    @torch.inference_mode()
    def forward(self, forward_batch: ForwardBatch) -> LogitsProcessorOutput:
        """An eager forward (decode steps that fit a CUDA graph go through `graph_runner`)."""
        if forward_batch.forward_mode.is_idle():  # DP attention: only the collectives
            return self.model.forward(forward_batch.input_ids, forward_batch.positions,
                                      forward_batch)
        hisparse = forward_batch.hisparse_coordinator
        if hisparse is not None:  # a decode step: backups, then the step's sparse state
            hisparse.begin_decode_step(forward_batch)
            hisparse.init_decode_state(forward_batch, forward_batch.batch_size,
                                       forward_batch.hisparse_plan.num_page_cols)
        with audit_region("attn_backend.init_forward_metadata"):
            self.attn_backend.init_forward_metadata(forward_batch)
        return self.model.forward(forward_batch.input_ids, forward_batch.positions,
                                  forward_batch)

    @torch.inference_mode()
    def sample(self, logits_output: LogitsProcessorOutput,
               forward_batch: ForwardBatch) -> SampleOutput:
        if forward_batch.forward_mode.is_idle():
            return SampleOutput(next_token_ids=forward_batch.input_ids)
        top_k = max(forward_batch.top_logprobs_nums or [0])
        info = forward_batch.sampling_info
        logits = logits_output.next_token_logits
        penalizer = info.penalizer_orchestrator
        if penalizer is not None:
            logits = penalizer.apply(logits)
        mask = None
        if info.grammars is not None:
            mask = VocabMask.from_grammars(info.grammars, self.model_config.vocab_size,
                                           self.device)
            logits = mask.apply(logits)
        errors: dict[int, str] = {}
        if info.custom_logit_processors is not None:
            logits, errors = apply_custom_logit_processors(logits, info.custom_logit_processors)
        out = self.sampler(logits, info, forward_batch.seq_lens, forward_batch.return_logprob,
                           top_k, forward_batch.token_ids_logprobs)
        out.custom_logit_processor_errors = errors
        if mask is not None:
            out.grammar_errors = mask.errors
        if penalizer is not None:
            penalizer.cumulate_output_tokens(out.next_token_ids)
        return out
