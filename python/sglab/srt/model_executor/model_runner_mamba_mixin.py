"""The ModelRunner's part for hybrid linear-attention models: the Mamba state pool's size (the
memory split by --mamba-full-memory-ratio, as upstream's `handle_max_mamba_cache`), the pools
(request rows with state slots, KV for the full-attention layers only) and the hybrid
attention backend."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from sglab.srt.configs.mamba_utils import resolve_ssm_dtype
from sglab.srt.layers.attention.hybrid_linear_attn_backend import (
    GDNAttnBackend,
    HybridLinearAttnBackend,
)
from sglab.srt.mem_cache.memory_pool import HybridLinearKVPool, HybridReqToTokenPool

if TYPE_CHECKING:
    from sglab.srt.model_executor.model_runner import ModelRunner

logger = logging.getLogger(__name__)

# State slots per running request: its live state plus cached prefixes (upstream's ratio 3),
# plus its ping-pong track slots with extra_buffer (2 with overlap scheduling, else 1).
MAMBA_CACHE_SIZE_MAX_RUNNING_REQUESTS_RATIO = 3
# Without --max-mamba-cache-size: at most this many slots (CPU: the pool is zeroed host memory
# that tiny test models would otherwise fill with millions of slots).
MAMBA_MAX_SLOTS = {"cpu": 1024, "cuda": 1 << 16}


class ModelRunnerMambaMixin:
    def _mamba_dtypes(self: ModelRunner):
        mc = self.model_config
        return mc.dtype, resolve_ssm_dtype(mc.hf_text_config, self.server_args.mamba_ssm_dtype)

    def mamba_slot_bytes(self: ModelRunner) -> int:
        return self.model_config.hybrid.state_bytes_per_slot(*self._mamba_dtypes())

    def mamba_ratio(self: ModelRunner) -> int:
        args = self.server_args
        if args.disable_radix_cache:
            return 1
        extra = 0
        if args.enable_mamba_extra_buffer():
            extra = 1 if args.disable_overlap_schedule else 2
        return MAMBA_CACHE_SIZE_MAX_RUNNING_REQUESTS_RATIO + extra

    def handle_max_mamba_cache(self: ModelRunner, rest_bytes: int) -> int:
        """Size the state pool (`self.max_mamba_cache_size`); returns the bytes left for KV."""
        args, slot = self.server_args, self.mamba_slot_bytes()
        if args.max_mamba_cache_size is not None:
            size = args.max_mamba_cache_size
        elif args.disable_radix_cache and args.max_running_requests is not None:
            size = args.max_running_requests
        else:
            share = rest_bytes * args.mamba_full_memory_ratio / (1 + args.mamba_full_memory_ratio)
            size = min(int(share // slot), MAMBA_MAX_SLOTS[self.device.type])
        if size < self.mamba_ratio():
            raise RuntimeError(f"Not enough memory for the Mamba state pool ({size} slots of "
                               f"{slot} bytes); raise --mem-fraction-static or "
                               "--max-mamba-cache-size")
        self.max_mamba_cache_size = size
        return rest_bytes - size * slot

    def init_hybrid_pools(self: ModelRunner, tokens: int, max_reqs: int) -> None:
        args, mc = self.server_args, self.model_config
        conv_dtype, ssm_dtype = self._mamba_dtypes()
        flags = self.patch_flags
        self.req_to_token_pool = HybridReqToTokenPool(
            max_reqs, mc.context_len + 4, args.device, self.max_mamba_cache_size, mc.hybrid,
            conv_dtype, ssm_dtype, args.enable_mamba_extra_buffer(),
            not args.disable_overlap_schedule, args.mamba_track_interval,
            sync_free=flags.sync_free_mamba_pool,
            host_track=flags.sync_free_mamba_pool and flags.mamba_track_setup == "host")
        self.token_to_kv_pool = HybridLinearKVPool(
            tokens, self.page_size, mc.dtype, mc.num_key_value_heads, mc.head_dim,
            mc.hybrid.full_attention_layer_ids, args.device)
        logger.info("Mamba state pool: %d slots (%.2f GiB), %s", self.max_mamba_cache_size,
                    self.req_to_token_pool.mamba_pool.mem_usage_bytes() / (1 << 30),
                    args.mamba_scheduler_strategy)

    def make_hybrid_attn_backend(self: ModelRunner, full_attn_backend) -> HybridLinearAttnBackend:
        return HybridLinearAttnBackend(full_attn_backend, GDNAttnBackend(self),
                                       self.model_config.hybrid.full_attention_layer_ids)
