"""Server arguments: one dataclass, upstream SGLang's flag names and defaults where they apply."""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import random
import tempfile
from dataclasses import dataclass, field

logger = logging.getLogger(__name__)

DEVICE_CHOICES = ["auto", "cuda", "cpu"]
DTYPE_CHOICES = ["auto", "half", "float16", "bfloat16", "float", "float32"]
LOAD_FORMAT_CHOICES = ["auto", "safetensors", "dummy"]
ATTENTION_BACKEND_CHOICES = ["torch_native", "triton"]
SCHEDULE_POLICY_CHOICES = ["fcfs", "lpm", "random", "lof"]
GRAMMAR_BACKEND_CHOICES = ["xgrammar", "outlines", "llguidance", "none"]
MAMBA_SCHEDULER_STRATEGY_CHOICES = ["auto", "no_buffer", "extra_buffer"]
MAMBA_SSM_DTYPE_CHOICES = ["float32", "bfloat16", "float16"]
KERNEL_FUSION_CHOICES = ["off", "on"]
LOG_LEVEL_CHOICES = ["debug", "info", "warning", "error", "critical"]
# fla's chunk length: a prefill's Mamba-state snapshots fall on multiples of it (with page 1).
MAMBA_CACHE_CHUNK_SIZE = 64


class ServerArgsError(ValueError):
    """An unknown or inconsistent server argument; the message names the flag."""


def human_readable_int(value: str) -> int:
    """Parse `1k`, `2M`, `3G` (powers of 1000) and plain integers."""
    s = str(value).strip()
    scale = {"k": 10**3, "m": 10**6, "g": 10**9}.get(s[-1:].lower())
    try:
        return int(float(s[:-1]) * scale) if scale else int(s)
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"not an integer: {value!r}") from e


@dataclass
class ServerArgs:
    # Model and tokenizer.
    model_path: str | None = None
    tokenizer_path: str | None = None
    load_format: str = "auto"
    dtype: str = "auto"
    context_length: int | None = None
    trust_remote_code: bool = False
    served_model_name: str | None = None
    skip_tokenizer_init: bool = False
    is_embedding: bool = False  # upstream's flag; refused (generation models only)
    device: str = "auto"
    # Parallelism: one scheduler process per tensor-parallel rank; under DP attention the ranks
    # form dp_size attention groups of tp_size / dp_size ranks, each with its own requests.
    tp_size: int = 1
    dp_size: int = 1
    enable_dp_attention: bool = False
    # HTTP server.
    host: str = "127.0.0.1"
    port: int = 30000
    api_key: str | None = None
    api_key_protect_metrics: bool = False
    skip_server_warmup: bool = False
    stream_interval: int = 1
    enable_metrics: bool = False
    log_level: str = "info"
    decode_log_interval: int = 40
    # Memory and scheduling.
    mem_fraction_static: float | None = None
    max_total_tokens: int | None = None
    max_running_requests: int | None = None
    max_prefill_tokens: int = 16384
    chunked_prefill_size: int | None = None
    page_size: int | None = None
    schedule_policy: str = "fcfs"
    schedule_conservativeness: float = 1.0
    disable_radix_cache: bool = False
    # Structured outputs (sglab.srt.constrained): the backend, and JSON without free whitespace.
    grammar_backend: str = "xgrammar"
    constrained_json_disable_any_whitespace: bool = False
    # Requests may carry a serialized CustomLogitProcessor: code the server runs (off: a 400).
    enable_custom_logit_processor: bool = False
    # HiSparse (sglab.srt.mem_cache.sparsity.config): the KV tier on the host, sparse decode.
    enable_hisparse: bool = False
    hisparse_config: str | None = None
    # Hybrid linear-attention models (Qwen3.5): the Mamba state pool and its prefix caching.
    max_mamba_cache_size: int | None = None
    mamba_ssm_dtype: str | None = None
    mamba_full_memory_ratio: float = 0.9
    mamba_scheduler_strategy: str = "auto"
    mamba_track_interval: int = 256
    # Kernels and runtime.
    attention_backend: str | None = None
    random_seed: int | None = None
    enable_deterministic_inference: bool = False
    # sglab's own: the fused decoder kernels (sglab.srt.layers.fused_kernels); off = main's path.
    kernel_fusion: str = "off"
    disable_overlap_schedule: bool = False
    cuda_graph_max_bs: int | None = None
    cuda_graph_bs: list[int] | None = None
    disable_cuda_graph: bool = False
    # sglab's prefill CUDA graphs (small extend batches, by token-count bucket).
    enable_prefill_cuda_graph: bool = False
    prefill_cuda_graph_max_tokens: int = 256
    watchdog_timeout: float = 300.0
    # LoRA (sglab.srt.lora.lora_args): lora_paths become LoRARefs.
    enable_lora: bool | None = None
    lora_paths: list | None = None
    max_loras_per_batch: int = 8
    max_loaded_loras: int | None = None
    max_lora_rank: int | None = None
    lora_target_modules: list[str] | None = None
    lora_backend: str | None = None
    # Patches (see sglab.srt.patches): None = decided by --patches.
    patches: str = "all"
    enable_pinned_h2d: bool | None = None
    enable_sync_free_unified_extend: bool | None = None
    enable_sync_free_logits_metadata: bool | None = None
    enable_sync_free_mamba_pool: bool | None = None
    enable_dp_prefill_cuda_graph: bool | None = None
    enable_lora_cache_qkv_offset: bool | None = None
    enable_lora_async_batch_info: bool | None = None
    enable_hisparse_async_backup: bool | None = None
    unified_index_build: str = "batched"
    pinned_h2d_mode: str = "pr"
    hisparse_backup_mode: str = "pr"
    mamba_track_setup: str = "pr"
    enable_sync_audit: bool = False
    # Internal.
    enable_integrity_check: bool = False
    extra: dict = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        self._handle_model_path()
        self._handle_device()
        self._handle_hisparse()
        self._handle_defaults()
        self._handle_patches()
        self._handle_lora()
        self._check()
        self._handle_hybrid_model()
        self._handle_data_parallelism()
        self._check_tensor_parallel()
        self._check_prefill_cuda_graph()

    # --- resolution -------------------------------------------------------------------------

    def _handle_model_path(self) -> None:
        if self.model_path is None:
            from sglab.srt.utils.dummy_model import get_default_model_path

            self.model_path = get_default_model_path()
        if self.tokenizer_path is None:
            self.tokenizer_path = self.model_path
        if self.served_model_name is None:
            self.served_model_name = self.model_path

    def _handle_device(self) -> None:
        if self.device == "auto":
            import torch

            self.device = "cuda" if torch.cuda.is_available() else "cpu"

    def _handle_hisparse(self) -> None:
        """Validate --hisparse-config; HiSparse's page (the config's page_size) becomes
        --page-size when the flag is not given."""
        if not self.enable_hisparse:
            if self.hisparse_config is not None:
                raise ServerArgsError("--hisparse-config requires --enable-hisparse")
            return
        from sglab.srt.mem_cache.sparsity.config import (
            HiSparseConfigError,
            parse_hisparse_config,
        )

        try:
            config = parse_hisparse_config(self.hisparse_config, self.page_size)
        except HiSparseConfigError as e:
            raise ServerArgsError(str(e)) from None
        self.page_size = config.page_size
        if not self.disable_radix_cache:
            raise ServerArgsError("--enable-hisparse requires --disable-radix-cache")
        if self.enable_deterministic_inference:
            raise ServerArgsError("--enable-hisparse does not support "
                                  "--enable-deterministic-inference (its decode attention is "
                                  "the unified extend kernel over every key)")

    def _handle_defaults(self) -> None:
        if self.random_seed is None:
            self.random_seed = random.randint(0, 1 << 30)
        if self.page_size is None:
            self.page_size = 1
        if self.attention_backend is None:
            self.attention_backend = "triton" if self.device == "cuda" else "torch_native"
        if self.chunked_prefill_size is None:
            self.chunked_prefill_size = 8192 if self.device == "cuda" else 4096
        if self.mem_fraction_static is None:
            self.mem_fraction_static = 0.85
        if self.device != "cuda":
            self.disable_cuda_graph = True
        if self.cuda_graph_bs:
            self.cuda_graph_max_bs = max(self.cuda_graph_bs)
        elif self.cuda_graph_max_bs is None:
            self.cuda_graph_max_bs = 256

    def _handle_patches(self) -> None:
        from sglab.srt.patches import PATCHES, parse_patch_list

        try:
            selected = parse_patch_list(self.patches)
        except ValueError as e:
            raise ServerArgsError(str(e)) from e
        for patch in PATCHES:
            if getattr(self, patch.field) is None:
                setattr(self, patch.field, patch.id in selected)
            value = getattr(self, patch.mode_field) if patch.mode_field else None
            if patch.mode_field and value not in patch.modes:
                raise ServerArgsError(
                    f"{patch.mode_cli}: invalid choice {value!r} "
                    f"(choose from {', '.join(patch.modes)})")

    def _handle_lora(self) -> None:
        from sglab.srt.lora.lora_args import resolve_lora_args

        resolve_lora_args(self)

    def _check(self) -> None:
        choices = {
            "device": (self.device, ["cuda", "cpu"]),
            "dtype": (self.dtype, DTYPE_CHOICES),
            "load_format": (self.load_format, LOAD_FORMAT_CHOICES),
            "attention_backend": (self.attention_backend, ATTENTION_BACKEND_CHOICES),
            "schedule_policy": (self.schedule_policy, SCHEDULE_POLICY_CHOICES),
            "grammar_backend": (self.grammar_backend, GRAMMAR_BACKEND_CHOICES),
            "log_level": (self.log_level, LOG_LEVEL_CHOICES),
            "kernel_fusion": (self.kernel_fusion, KERNEL_FUSION_CHOICES),
        }
        for name, (value, allowed) in choices.items():
            if value not in allowed:
                raise ServerArgsError(
                    f"--{_flag(name)}: invalid choice {value!r} (choose from {', '.join(allowed)})"
                )
        if self.is_embedding:
            raise ServerArgsError("--is-embedding: embedding and rerank models are not "
                                  "supported by sglab (it serves generation models only).")
        self._check_positive("page_size", self.page_size)
        self._check_positive("max_total_tokens", self.max_total_tokens)
        self._check_positive("max_running_requests", self.max_running_requests)
        self._check_positive("max_prefill_tokens", self.max_prefill_tokens)
        self._check_positive("context_length", self.context_length)
        self._check_positive("stream_interval", self.stream_interval)
        self._check_positive("decode_log_interval", self.decode_log_interval)
        self._check_positive("cuda_graph_max_bs", self.cuda_graph_max_bs)
        self._check_positive("prefill_cuda_graph_max_tokens", self.prefill_cuda_graph_max_tokens)
        if self.cuda_graph_bs and min(self.cuda_graph_bs) <= 0:
            raise ServerArgsError(f"--cuda-graph-bs must be positive, got {self.cuda_graph_bs}")
        if self.chunked_prefill_size is not None and self.chunked_prefill_size != -1:
            self._check_positive("chunked_prefill_size", self.chunked_prefill_size)
            if self.chunked_prefill_size % self.page_size:
                raise ServerArgsError(
                    f"--chunked-prefill-size ({self.chunked_prefill_size}) must be a multiple "
                    f"of --page-size ({self.page_size})"
                )
        self._check_deterministic_inference()
        self._check_kernel_fusion()
        if not 0.0 < self.mem_fraction_static < 1.0:
            raise ServerArgsError(
                f"--mem-fraction-static must be in (0, 1), got {self.mem_fraction_static}"
            )
        if self.device == "cuda":
            import torch

            if not torch.cuda.is_available():
                raise ServerArgsError("--device cuda: no CUDA device is available")
        if not os.path.isdir(self.model_path):
            raise ServerArgsError(
                f"--model-path: {self.model_path!r} is not a local model directory "
                "(sglab does not download models; make one with scripts/make_dummy_model.py)"
            )
        if not os.path.isfile(os.path.join(self.model_path, "config.json")):
            raise ServerArgsError(f"--model-path: no config.json in {self.model_path!r}")

    def _handle_hybrid_model(self) -> None:
        """Mamba-state options of a hybrid (Gated DeltaNet) model, resolved as upstream's
        `_handle_mamba_radix_cache`: auto means no_buffer; no_buffer with the radix cache caches
        a request's live state, so it needs page size 1 and no overlap scheduling."""
        from sglab.srt.configs.mamba_utils import is_hybrid_model_path

        self._check_mamba_args()
        if not is_hybrid_model_path(self.model_path):
            return
        if self.enable_hisparse:
            raise ServerArgsError("--enable-hisparse serves GQA attention models; this hybrid "
                                  "(Gated DeltaNet) model keeps recurrent state it cannot tier")
        self._check_extra_buffer()
        if self.mamba_scheduler_strategy == "auto":
            self.mamba_scheduler_strategy = "no_buffer"
        if self.mamba_scheduler_strategy != "no_buffer" or self.disable_radix_cache:
            return
        if self.page_size != 1:
            logger.warning("--mamba-scheduler-strategy no_buffer with the radix cache needs "
                           "--page-size 1 (got %d); using 1", self.page_size)
            self.page_size = 1
        if not self.disable_overlap_schedule:
            logger.warning("Disabling the overlap schedule: --mamba-scheduler-strategy no_buffer "
                           "with the radix cache does not support it (use extra_buffer, or "
                           "--disable-radix-cache)")
            self.disable_overlap_schedule = True

    def _check_tensor_parallel(self) -> None:
        """--tp-size against the model's shapes and the features that run on one rank only."""
        from sglab.srt.configs.mamba_utils import is_hybrid_model_path

        self._check_positive("tp_size", self.tp_size)
        if self.tp_size == 1:
            return
        single_rank = {"--enable-hisparse": self.enable_hisparse,
                       "a hybrid (Gated DeltaNet) model": is_hybrid_model_path(self.model_path)}
        for what, on in single_rank.items():
            if on:
                raise ServerArgsError(f"--tp-size {self.tp_size}: {what} runs on one rank only")
        if self.enable_lora and self.enable_dp_attention:
            # The MLP runs on every attention group's tokens; the batch info is the group's own.
            raise ServerArgsError("--enable-dp-attention does not support --enable-lora (LoRA "
                                  "runs under plain tensor parallelism: drop --enable-dp-attention)")
        if self.device == "cuda":
            import torch

            if self.tp_size > torch.cuda.device_count():
                raise ServerArgsError(f"--tp-size {self.tp_size}: only "
                                      f"{torch.cuda.device_count()} CUDA device(s) visible")
        split, kv_heads = _tp_split_sizes(self.model_path)
        attn = self.attn_tp_size
        what = "--tp-size" if attn == self.tp_size else "--tp-size / --dp-size"
        for name, value in split.items():
            size = attn if name == "num_attention_heads" else self.tp_size
            if value % size:
                flag = what if name == "num_attention_heads" else "--tp-size"
                raise ServerArgsError(f"{flag} {size} must divide the model's {name} ({value})")
        # KV heads split over ranks, or each is replicated on tp / kv_heads ranks.
        if kv_heads % attn and attn % kv_heads:
            raise ServerArgsError(f"{what} {attn} must divide, or be a multiple of, "
                                  f"the model's num_key_value_heads ({kv_heads})")

    @property
    def attn_tp_size(self) -> int:
        """Ranks each attention layer is split over (tp / dp under DP attention)."""
        return self.tp_size // self.dp_size if self.enable_dp_attention else self.tp_size

    def _handle_data_parallelism(self) -> None:
        """--dp-size with --enable-dp-attention (upstream's checks); the chunk budget and an
        explicit --max-running-requests are per attention group, divided by dp (upstream)."""
        self._check_positive("dp_size", self.dp_size)
        if not self.enable_dp_attention:
            if self.dp_size > 1:
                raise ServerArgsError(
                    f"--dp-size {self.dp_size} without --enable-dp-attention: sglab serves data "
                    "parallelism as DP attention only (add --enable-dp-attention)")
            return
        if self.dp_size == 1:
            raise ServerArgsError("--enable-dp-attention needs --dp-size > 1 (with --dp-size 1 "
                                  "it is plain tensor parallelism)")
        if self.tp_size % self.dp_size:
            raise ServerArgsError(f"--dp-size {self.dp_size} must divide --tp-size "
                                  f"{self.tp_size} under --enable-dp-attention")
        if self.chunked_prefill_size is not None and self.chunked_prefill_size > 0:
            per_dp = self.chunked_prefill_size // self.dp_size
            self.chunked_prefill_size = max(per_dp // self.page_size, 1) * self.page_size
        if self.max_running_requests is not None:
            self.max_running_requests = max(self.max_running_requests // self.dp_size, 1)

    def _check_prefill_cuda_graph(self) -> None:
        """Prefill graphs hold the whole forward: the triton backend's extend kernel, no
        per-request adapter or tier state."""
        from sglab.srt.configs.mamba_utils import is_hybrid_model_path

        if not self.enable_prefill_cuda_graph:
            return
        refused = {"--enable-lora": self.enable_lora, "--enable-hisparse": self.enable_hisparse,
                   "--enable-deterministic-inference": self.enable_deterministic_inference,
                   "a hybrid (Gated DeltaNet) model": is_hybrid_model_path(self.model_path),
                   f"--attention-backend {self.attention_backend}":
                       self.attention_backend != "triton"}
        for what, on in refused.items():
            if on:
                raise ServerArgsError(f"--enable-prefill-cuda-graph does not support {what}")

    def _check_mamba_args(self) -> None:
        if self.mamba_scheduler_strategy not in MAMBA_SCHEDULER_STRATEGY_CHOICES:
            raise ServerArgsError(
                f"--mamba-scheduler-strategy: invalid choice {self.mamba_scheduler_strategy!r} "
                f"(choose from {', '.join(MAMBA_SCHEDULER_STRATEGY_CHOICES)})")
        if self.mamba_ssm_dtype not in [None, *MAMBA_SSM_DTYPE_CHOICES]:
            raise ServerArgsError(f"--mamba-ssm-dtype: invalid choice {self.mamba_ssm_dtype!r} "
                                  f"(choose from {', '.join(MAMBA_SSM_DTYPE_CHOICES)})")
        self._check_positive("max_mamba_cache_size", self.max_mamba_cache_size)
        self._check_positive("mamba_track_interval", self.mamba_track_interval)
        if not self.mamba_full_memory_ratio > 0:
            raise ServerArgsError("--mamba-full-memory-ratio must be positive, got "
                                  f"{self.mamba_full_memory_ratio}")

    def _check_extra_buffer(self) -> None:
        if self.mamba_scheduler_strategy != "extra_buffer":
            return
        if self.disable_radix_cache:
            raise ServerArgsError(
                "--mamba-scheduler-strategy extra_buffer caches states in the radix cache, which "
                "--disable-radix-cache turns off (use --mamba-scheduler-strategy no_buffer)")
        if self.mamba_track_interval % self.page_size:
            raise ServerArgsError(
                f"--mamba-track-interval ({self.mamba_track_interval}) must be a multiple of "
                f"--page-size ({self.page_size})")
        if self.mamba_track_interval < 2 and not self.disable_overlap_schedule:
            raise ServerArgsError(
                "--mamba-track-interval must be at least 2 with the overlap schedule (the step "
                "in flight would overwrite the snapshot the previous step took)")
        chunk = MAMBA_CACHE_CHUNK_SIZE
        if max(chunk, self.page_size) % min(chunk, self.page_size):
            raise ServerArgsError(f"--page-size ({self.page_size}) and the {chunk}-token "
                                  "prefill chunk must divide one another with extra_buffer")

    @property
    def mamba_cache_chunk_size(self) -> int:
        """Where a prefill snapshots state for the prefix cache: every this many tokens of its
        extend (upstream: max(FLA_CHUNK_SIZE, page_size))."""
        return max(MAMBA_CACHE_CHUNK_SIZE, self.page_size)

    def enable_mamba_extra_buffer(self) -> bool:
        return self.mamba_scheduler_strategy == "extra_buffer"

    def _check_deterministic_inference(self) -> None:
        """Every attention backend (torch_native, triton) has a batch-invariant path and sampling
        is sglab's seeded row-wise torch sampler; the LoRA deltas are not covered."""
        if self.enable_deterministic_inference and self.enable_lora:
            raise ServerArgsError(
                "--enable-deterministic-inference does not cover LoRA adapters: the LoRA "
                "segment GEMMs are not batch invariant (drop --enable-lora / --lora-paths)")

    def _check_kernel_fusion(self) -> None:
        """The fused kernels are Triton: on CPU they run only in Triton's interpreter."""
        if self.kernel_fusion == "on" and self.device != "cuda" and \
                os.environ.get("TRITON_INTERPRET") != "1":
            raise ServerArgsError("--kernel-fusion on: the fused kernels are Triton kernels; "
                                  "on CPU they need Triton's interpreter (TRITON_INTERPRET=1)")

    @staticmethod
    def _check_positive(name: str, value: int | None) -> None:
        if value is not None and value <= 0:
            raise ServerArgsError(f"--{_flag(name)} must be positive, got {value}")

    # --- CLI --------------------------------------------------------------------------------

    @staticmethod
    def add_cli_args(parser: argparse.ArgumentParser) -> None:
        d = ServerArgs
        a = parser.add_argument
        a("--model-path", "--model", dest="model_path", type=str, default=d.model_path,
          help="The path of the model weights: a local HF-format directory (sglab downloads "
               "nothing). Default: sglab's tiny built-in model, built on first use.")
        a("--tokenizer-path", type=str, default=d.tokenizer_path,
          help="The path of the tokenizer (default: the model path).")
        a("--load-format", type=str, default=d.load_format, choices=LOAD_FORMAT_CHOICES,
          help="The format of the model weights to load: auto and safetensors read the "
               "safetensors files; dummy initializes the weights randomly, mainly for profiling.")
        a("--dtype", type=str, default=d.dtype, choices=DTYPE_CHOICES,
          help="Data type for model weights and activations (auto: FP16 for FP32 and FP16 "
               "models, BF16 for BF16 models; float32 on CPU).")
        a("--context-length", type=int, default=d.context_length,
          help="The model's maximum context length (default: the value from the model's "
               "config.json).")
        a("--trust-remote-code", action="store_true",
          help="Whether or not to allow for custom models defined in their own modeling files.")
        a("--served-model-name", type=str, default=d.served_model_name,
          help="Override the model name returned by the v1/models endpoint in OpenAI API "
               "server (default: the model path).")
        a("--is-embedding", action="store_true",
          help="Upstream's flag for embedding models: refused, sglab serves generation models.")
        a("--skip-tokenizer-init", action="store_true",
          help="If set, skip init tokenizer and pass input_ids in generate request.")
        a("--tensor-parallel-size", "--tp-size", "--tp", dest="tp_size", type=int,
          default=d.tp_size, help="The tensor parallelism size: one process (and GPU) per rank.")
        a("--data-parallel-size", "--dp-size", "--dp", dest="dp_size", type=int,
          default=d.dp_size, help="The data parallelism size (with --enable-dp-attention: the "
                                  "number of attention groups the TP ranks form).")
        a("--enable-dp-attention", action="store_true",
          help="Enabling data parallelism for attention and tensor parallelism for FFN. The dp "
               "size should be equal to the tp size. Currently DeepSeek-V2 and Qwen 2/3 MoE "
               "models are supported upstream; sglab runs its dense models (attention groups "
               "of tp / dp ranks, requests dealt round robin).")
        a("--device", type=str, default=d.device, choices=DEVICE_CHOICES,
          help="The device to use (default: auto, cuda if available, else cpu).")
        a("--host", type=str, default=d.host, help="The host of the HTTP server.")
        a("--port", type=int, default=d.port, help="The port of the HTTP server.")
        a("--api-key", type=str, default=d.api_key,
          help="Set API key of the server: requests must send 'Authorization: Bearer <key>'. "
               "/health and /metrics stay open unless --api-key-protect-metrics.")
        a("--api-key-protect-metrics", action="store_true",
          help="With --api-key, also require the key on /health and /metrics.")
        a("--skip-server-warmup", action="store_true", help="If set, skip warmup.")
        a("--stream-interval", type=int, default=d.stream_interval,
          help="The interval (or buffer size) for streaming in terms of the token length. A "
               "smaller value makes streaming smoother, while a larger value makes the "
               "throughput higher.")
        a("--enable-metrics", action="store_true",
          help="Enable log prometheus metrics (served at /metrics).")
        a("--log-level", type=str, default=d.log_level, choices=LOG_LEVEL_CHOICES,
          help="The logging level of all loggers.")
        a("--decode-log-interval", type=int, default=d.decode_log_interval,
          help="The log interval of decode batch.")
        a("--mem-fraction-static", type=float, default=d.mem_fraction_static,
          help="The fraction of the memory used for static allocation (model weights and KV "
               "cache memory pool). Use a smaller value if you see out-of-memory errors.")
        a("--max-total-tokens", type=human_readable_int, default=d.max_total_tokens,
          help="The maximum number of tokens in the memory pool (1k, 2M also work; default: "
               "from --mem-fraction-static). Mainly for development and debugging.")
        a("--max-running-requests", type=int, default=d.max_running_requests,
          help="The maximum number of running requests.")
        a("--max-prefill-tokens", type=int, default=d.max_prefill_tokens,
          help="The maximum number of tokens in a prefill batch. The real bound will be the "
               "maximum of this value and the model's maximum context length.")
        a("--chunked-prefill-size", type=int, default=d.chunked_prefill_size,
          help="The maximum number of tokens in a chunk for the chunked prefill. Setting this "
               "to -1 means disabling chunked prefill.")
        a("--page-size", type=int, default=d.page_size,
          help="The number of tokens in a page.")
        a("--schedule-policy", type=str, default=d.schedule_policy,
          choices=SCHEDULE_POLICY_CHOICES, help="The scheduling policy of the requests.")
        a("--grammar-backend", type=str, default=d.grammar_backend,
          choices=GRAMMAR_BACKEND_CHOICES,
          help="Choose the backend for grammar-guided decoding (json_schema, regex, ebnf). "
               "sglab implements xgrammar (an optional package); the others are refused per "
               "request with a message.")
        a("--constrained-json-disable-any-whitespace", action="store_true",
          help="Constrained JSON output without free whitespace (compact separators).")
        a("--enable-custom-logit-processor", action="store_true",
          help="Enable users to pass custom logit processors to the server (disabled by "
               "default for security): a processor is serialized Python code, which the "
               "scheduler deserializes and runs. Only for servers whose every client is "
               "trusted.")
        a("--schedule-conservativeness", type=float, default=d.schedule_conservativeness,
          help="How conservative the schedule policy is (upstream's flag; accepted for "
               "compatibility, sglab's scheduler does not use it).")
        a("--disable-radix-cache", action="store_true",
          help="Disable RadixAttention for prefix caching.")
        a("--enable-hisparse", action="store_true",
          help="Hierarchical sparse attention: every request's full KV cache in pinned host "
               "memory, a hot buffer per request on the device, and each decode step attending "
               "to the top-k pages Quest selects (GQA models). Requires --disable-radix-cache.")
        a("--hisparse-config", type=str, default=d.hisparse_config,
          help="HiSparse JSON config: top_k (2048), device_buffer_size (2 * top_k, >= top_k), "
               "host_to_device_ratio (2, >= 1), page_size (--page-size, else 64), "
               "min_sparse_prompt_len (0: shorter prompts stay dense), num_recent_pages (4).")
        _add_mamba_args(parser)
        a("--attention-backend", type=str, default=d.attention_backend,
          choices=ATTENTION_BACKEND_CHOICES,
          help="Choose the kernels for attention layers (default: triton on CUDA, "
               "torch_native on CPU).")
        a("--random-seed", type=int, default=d.random_seed, help="The random seed.")
        a("--enable-deterministic-inference", action="store_true",
          help="Enable deterministic inference mode with batch invariant ops.")
        a("--kernel-fusion", type=str, default=d.kernel_fusion, choices=KERNEL_FUSION_CHOICES,
          help="sglab's fused decoder kernels: q/k norm + RoPE + the KV-cache write in one "
               "kernel (inside decode attention at decode), decode attention in one kernel "
               "(no separate merge), fp32 logits straight from the GEMM, the small-M GEMM with "
               "the norms folded in for small models, and torch's matmuls through cuBLASLt. "
               "off (default) keeps the unfused path.")
        a("--cuda-graph-max-bs", "--cuda-graph-max-bs-decode", type=int,
          default=d.cuda_graph_max_bs,
          help="Set the maximum batch size for cuda graph. It will extend the cuda graph "
               "capture batch size to this value. (-decode: upstream's newer name; sglab's "
               "prefill graphs are sized by --prefill-cuda-graph-max-tokens.)")
        a("--cuda-graph-bs", "--cuda-graph-bs-decode", type=int, nargs="+",
          default=d.cuda_graph_bs, help="Set the list of batch sizes for cuda graph.")
        a("--disable-cuda-graph", action="store_true", help="Disable cuda graph.")
        a("--enable-prefill-cuda-graph", action="store_true",
          help="sglab: replay CUDA graphs for small extend batches (captured per token-count "
               "bucket up to --prefill-cuda-graph-max-tokens; larger batches run eagerly). "
               "Upstream's nearest is --enable-piecewise-cuda-graph, which graphs the layers "
               "between attention calls; sglab's graph holds the whole forward, attention too.")
        a("--prefill-cuda-graph-max-tokens", type=int, default=d.prefill_cuda_graph_max_tokens,
          help="The largest extend batch (in tokens) a prefill CUDA graph is captured for.")
        a("--disable-overlap-schedule", action="store_true",
          help="Disable the overlap scheduler, which overlaps the CPU scheduler with GPU model "
               "worker.")
        a("--watchdog-timeout", type=float, default=d.watchdog_timeout,
          help="Set watchdog timeout in seconds. /health reports unhealthy (503) when requests "
               "are in flight and nothing came back from the scheduler for this long.")
        _add_patch_args(parser)
        from sglab.srt.lora.lora_args import add_lora_cli_args

        add_lora_cli_args(parser)
        a("--enable-integrity-check", action="store_true",
          help="Check that every KV slot and pool row is accounted for whenever idle.")

    @classmethod
    def from_cli_args(cls, args: argparse.Namespace) -> "ServerArgs":
        names = [f.name for f in dataclasses.fields(cls) if f.name != "extra"]
        return cls(**{n: getattr(args, n) for n in names if hasattr(args, n)})

    def url(self) -> str:
        host = "127.0.0.1" if self.host == "0.0.0.0" else self.host
        return f"http://{host}:{self.port}"

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d.pop("extra")
        return d


def _add_patch_args(parser: argparse.ArgumentParser) -> None:
    from sglab.srt.patches import PATCHES

    parser.add_argument("--patches", type=str, default=ServerArgs.patches,
                        help="Patches to turn on: all, none, or ids such as 0001,0003a. "
                             "--enable-X / --disable-X override it per patch.")
    for patch in PATCHES:
        parser.add_argument(f"--enable-{patch.cli}", dest=patch.field, action="store_const",
                            const=True, default=None,
                            help=f"Patch {patch.id} ({patch.upstream}): {patch.title}.")
        parser.add_argument(f"--disable-{patch.cli}", dest=patch.field, action="store_const",
                            const=False, help=f"Turn patch {patch.id} off.")
    for patch in PATCHES:
        if patch.mode_field:
            parser.add_argument(patch.mode_cli, type=str,
                                default=getattr(ServerArgs, patch.mode_field),
                                choices=list(patch.modes), help=patch.mode_help)
    parser.add_argument("--enable-sync-audit", action="store_true",
                        help="Count host syncs and pageable H2D copies per step and call site.")


def _add_mamba_args(parser: argparse.ArgumentParser) -> None:
    d, a = ServerArgs, parser.add_argument
    a("--max-mamba-cache-size", type=int, default=d.max_mamba_cache_size,
      help="The maximum size of the mamba cache (state slots; default: from "
           "--mamba-full-memory-ratio).")
    a("--mamba-ssm-dtype", type=str, default=d.mamba_ssm_dtype, choices=MAMBA_SSM_DTYPE_CHOICES,
      help="The data type of the SSM states in mamba cache. If not set, will be read from model "
           "config (mamba_ssm_dtype), else float32.")
    a("--mamba-full-memory-ratio", type=float, default=d.mamba_full_memory_ratio,
      help="The ratio of mamba state memory to full kv cache memory.")
    a("--mamba-scheduler-strategy", type=str, default=d.mamba_scheduler_strategy,
      choices=MAMBA_SCHEDULER_STRATEGY_CHOICES,
      help="The strategy to use for mamba radix cache: no_buffer caches a finished request's "
           "live state (page size 1, no overlap schedule); extra_buffer snapshots states into "
           "ping-pong track slots every --mamba-track-interval tokens; auto means no_buffer.")
    a("--mamba-track-interval", type=int, default=d.mamba_track_interval,
      help="The interval to track the mamba state during decode (extra_buffer).")


def _tp_split_sizes(model_path: str) -> tuple[dict[str, int], int]:
    """The config.json sizes tensor parallelism splits over ranks, and the KV head count."""
    import json

    with open(os.path.join(model_path, "config.json")) as f:
        cfg = json.load(f)
    cfg = cfg.get("text_config", cfg)
    heads = cfg["num_attention_heads"]
    return ({"num_attention_heads": heads, "intermediate_size": cfg["intermediate_size"]},
            cfg.get("num_key_value_heads") or heads)


def _flag(name: str) -> str:
    return name.replace("_", "-")


def prepare_server_args(argv: list[str]) -> ServerArgs:
    parser = argparse.ArgumentParser(prog="python -m sglab.launch_server")
    ServerArgs.add_cli_args(parser)
    return ServerArgs.from_cli_args(parser.parse_args(argv))


@dataclass
class PortArgs:
    """ZMQ endpoints, unique per server so two servers on one machine never collide."""

    tokenizer_ipc_name: str
    scheduler_input_ipc_name: str
    detokenizer_ipc_name: str
    # The TCP port the TP ranks' torch.distributed group rendezvous on.
    nccl_port: int | None = None
    # DP attention: where the data-parallel controller sends each attention group its requests.
    dp_scheduler_ipc_names: list[str] = field(default_factory=list)

    @staticmethod
    def init_new(server_args: ServerArgs | None = None) -> "PortArgs":
        base = tempfile.mkdtemp(prefix="sglab-ipc-")
        dp = server_args.dp_size if server_args is not None and \
            server_args.enable_dp_attention else 0
        return PortArgs(
            tokenizer_ipc_name=f"ipc://{base}/tokenizer",
            scheduler_input_ipc_name=f"ipc://{base}/scheduler",
            detokenizer_ipc_name=f"ipc://{base}/detokenizer",
            nccl_port=_free_port(avoid=server_args.port) if server_args is not None
            and server_args.tp_size > 1 else None,
            dp_scheduler_ipc_names=[f"ipc://{base}/scheduler_dp{r}" for r in range(dp)],
        )


def _free_port(avoid: int | None = None) -> int:
    """A free TCP port, never `avoid` (the HTTP port, not yet bound when this runs)."""
    import socket

    while True:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        if port != avoid:
            return port


def configure_logging(level: str, prefix: str = "") -> None:
    fmt = f"[%(asctime)s{prefix}] %(message)s"
    logging.basicConfig(level=getattr(logging, level.upper()), format=fmt,
                        datefmt="%Y-%m-%d %H:%M:%S", force=True)
