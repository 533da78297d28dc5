"""LoRAManager: adapters in host memory, their GPU slots, and the per-forward batch info.

Built by the ModelRunner after the base model is loaded: it swaps the target linear layers for
LoRA wrappers, allocates the slot pool, and loads `--lora-paths`. Before every forward
(`ForwardBatch.init_new` for an eager one, `prepare_replay` as a CUDA-graph participant),
`prepare_lora_batch` puts the batch's adapters in slots,
builds the `LoRABatchInfo` the kernels read, and hands every wrapper its buffers
(`update_lora_info`). Two upstream sync removals live here, each behind its patch flag:
0005 (sglang#6960) in `QKVParallelLinearWithLoRA.set_lora_info`, 0005b (sglang#6994) in
`_build_batch_info`.
"""

from __future__ import annotations

import logging
import re
from typing import TYPE_CHECKING

import torch
from torch import nn

from sglab.srt.debug.sync_audit import audit_region
from sglab.srt.utils.h2d import h2d, is_pin_memory_available, setitem_scalar
from sglab.srt.lora.backend import get_backend_from_name
from sglab.srt.lora.layers import BaseLayerWithLoRA, get_lora_layer, replace_submodule
from sglab.srt.lora.lora import LoRAAdapter, LoRAAdapterError, LoRAConfig
from sglab.srt.lora.lora_registry import LoRARef, LoRARegistry
from sglab.srt.lora.mem_pool import LoRAMemoryPool
from sglab.srt.lora.utils import (
    FUSED_STACK_NUM,
    LoRABatchInfo,
    LoRAModuleShape,
    get_normalized_target_modules,
)

if TYPE_CHECKING:
    from sglab.srt.model_executor.forward_batch_info import ForwardBatch
    from sglab.srt.patches import PatchFlags
    from sglab.srt.server_args import ServerArgs

logger = logging.getLogger(__name__)

_MODULE_RE = re.compile(r"layers\.(\d+)\.(?:.*\.)?(" + "|".join(FUSED_STACK_NUM) + r")$")


class LoRAManager:
    def __init__(self, base_model: nn.Module, server_args: ServerArgs, patch_flags: PatchFlags,
                 dtype: torch.dtype, device: torch.device):
        self.base_model = base_model
        self.device = torch.device(device)
        self.dtype = dtype
        self.max_loras_per_batch = server_args.max_loras_per_batch
        self.max_loaded_loras = server_args.max_loaded_loras
        # Patches: 0005 (sglang#6960) and 0005b (sglang#6994).
        self.cache_qkv_offset = patch_flags.lora_cache_qkv_offset
        self.async_batch_info = patch_flags.lora_async_batch_info
        self.lora_backend = get_backend_from_name(server_args.lora_backend, self.device)
        self.registry = LoRARegistry()
        self.loras: dict[str, LoRAAdapter] = {}  # by lora_id: registered or still draining
        self.unloading: set[str] = set()  # unregistered, but requests still use them
        base_modules = self._find_base_modules()
        self.num_layers = 1 + max(layer_id for layer_id, _, _ in base_modules)
        # tp=1 shapes (the adapters on the host) and this rank's (the slots).
        self.module_shapes = _module_shapes(base_modules, full=True)
        rank_shapes = _module_shapes(base_modules, full=False)
        initial = list(server_args.lora_paths or [])
        configs = [LoRAConfig.from_dir(ref.lora_path) for ref in initial]
        self.max_lora_rank = server_args.max_lora_rank or max(c.r for c in configs)
        self.target_modules = get_normalized_target_modules(
            server_args.lora_target_modules or {m for c in configs for m in c.target_modules})
        self.lora_modules = self._replace_modules(base_modules)
        self.memory_pool = LoRAMemoryPool(
            {n: s for n, s in rank_shapes.items() if n in self.target_modules},
            self.num_layers, self.max_loras_per_batch, self.max_lora_rank, dtype, self.device,
            slicers={name: module for _, name, module in self.lora_modules})
        for ref in initial:
            self.load_lora_adapter(ref)
        self.cuda_graph_batch_info: LoRABatchInfo | None = None
        self.max_bs_in_cuda_graph = 0
        logger.info("LoRA: %d adapter(s), %d slots, max rank %d, targets %s, backend %s",
                    len(initial), self.max_loras_per_batch, self.max_lora_rank,
                    sorted(self.target_modules), self.lora_backend.name)

    # --- model surgery --------------------------------------------------------------------------

    def _find_base_modules(self) -> list[tuple[int, str, nn.Module]]:
        found = []
        for name, module in self.base_model.named_modules():
            m = _MODULE_RE.search(name)
            if m is not None and not isinstance(module, BaseLayerWithLoRA):
                found.append((int(m.group(1)), name, module))
        if not found:
            raise ValueError(f"{type(self.base_model).__name__} has no LoRA-capable layers")
        return found

    def _replace_modules(self, base_modules) -> list[tuple[int, str, BaseLayerWithLoRA]]:
        wrapped = []
        for layer_id, name, module in base_modules:
            fused = name.rsplit(".", 1)[-1]
            if fused not in self.target_modules:
                continue
            lora_module = get_lora_layer(module, self.lora_backend,
                                         cache_qkv_offset=self.cache_qkv_offset)
            replace_submodule(self.base_model, name, lora_module)
            wrapped.append((layer_id, fused, lora_module))
        return wrapped

    # --- adapters -------------------------------------------------------------------------------

    def get_lora_id(self, lora_name: str) -> str | None:
        """The id of the adapter registered as `lora_name` (None if none is); marks it used."""
        ref = self.registry.get(lora_name)
        if ref is None:
            return None
        self.registry.touch(lora_name)
        return ref.lora_id

    def load_lora_adapter(self, ref: LoRARef, in_use_ids: set[str] = frozenset()) -> None:
        """Read, check and register an adapter; raises ValueError with the reason."""
        if ref.lora_name in self.registry:
            raise ValueError(f"LoRA adapter {ref.lora_name!r} is already loaded")
        config = LoRAConfig.from_dir(ref.lora_path)
        if config.r > self.max_lora_rank:
            raise LoRAAdapterError(
                f"LoRA adapter {ref.lora_name!r} has rank {config.r}, above --max-lora-rank "
                f"{self.max_lora_rank}")
        adapter = LoRAAdapter(ref.lora_id, config)
        adapter.initialize_weights(self.module_shapes, self.num_layers, self.dtype)
        targets = adapter.modules() | get_normalized_target_modules(config.target_modules)
        extra = sorted(targets - self.target_modules)
        if extra:
            raise LoRAAdapterError(
                f"LoRA adapter {ref.lora_name!r} targets {', '.join(extra)}, which the LoRA "
                f"slots do not cover (--lora-target-modules: {sorted(self.target_modules)})")
        if self.max_loaded_loras is not None and len(self.registry) >= self.max_loaded_loras:
            victim = self.registry.lru_unpinned(set(in_use_ids))
            if victim is None:
                raise ValueError(f"--max-loaded-loras ({self.max_loaded_loras}) reached and "
                                 "every loaded adapter is pinned or in use")
            logger.info("LoRA: evicting %r to load %r", victim.lora_name, ref.lora_name)
            self.unload_lora_adapter(victim.lora_name, in_use_ids)
        self.loras[ref.lora_id] = adapter
        self.registry.register(ref)

    def unload_lora_adapter(self, lora_name: str, in_use_ids: set[str] = frozenset()) -> None:
        """Unregister an adapter; its memory is freed once no request uses it."""
        ref = self.registry.get(lora_name)
        if ref is None:
            raise ValueError(f"LoRA adapter {lora_name!r} is not loaded")
        self.registry.unregister(lora_name)
        self.unloading.add(ref.lora_id)
        self.release_unloaded(in_use_ids)

    def release_unloaded(self, in_use_ids: set[str]) -> None:
        for uid in [u for u in self.unloading if u not in in_use_ids]:
            self.unloading.discard(uid)
            del self.loras[uid]
            self.memory_pool.free(uid)

    def loaded_adapters(self) -> dict[str, str]:
        return self.registry.loaded_adapters()

    # --- CUDA graphs (a participant of CudaGraphRunner) ---------------------------------------

    def init_cuda_graph_state(self, max_bs: int) -> None:
        """Static batch info the decode graphs are captured on, refilled before each replay."""
        n = self.max_loras_per_batch
        dev = self.device
        self.max_bs_in_cuda_graph = max_bs
        self.cuda_graph_batch_info = LoRABatchInfo(
            bs=max_bs, max_len=1,
            seg_lens=torch.ones(max_bs, dtype=torch.int32, device=dev),
            seg_indptr=torch.arange(max_bs + 1, dtype=torch.int32, device=dev),
            weight_indices=torch.zeros(max_bs, dtype=torch.int32, device=dev),
            lora_ranks=torch.zeros(n, dtype=torch.int32, device=dev),
            scalings=torch.zeros(n, dtype=torch.float32, device=dev))

    def prepare_capture(self, bs: int) -> None:
        from sglab.srt.model_executor.forward_batch_info import ForwardBatch, ForwardMode

        fb = ForwardBatch(forward_mode=ForwardMode.DECODE, batch_size=bs, input_ids=None,
                          req_pool_indices=None, seq_lens=None, out_cache_loc=None,
                          positions=None, seq_lens_sum=bs, seq_lens_cpu=None,
                          lora_ids=[None] * bs)
        self.prepare_lora_batch(fb, use_graph=True)

    def graph_prologue(self, forward_batch: ForwardBatch, bs: int) -> None:
        """Nothing on the device: the static batch info is filled before the replay."""

    def prepare_replay(self, forward_batch: ForwardBatch, bs: int) -> None:
        self.prepare_lora_batch(forward_batch, forward_batch.lora_inflight_ids, use_graph=True)

    # --- per forward ----------------------------------------------------------------------------

    def prepare_lora_batch(self, forward_batch: ForwardBatch,
                           inflight_ids: set[str | None] | None = None,
                           use_graph: bool = False) -> None:
        """The batch info of an eager forward, or (`use_graph`) the static one a graph reads."""
        lora_ids = forward_batch.lora_ids or [None] * forward_batch.batch_size
        with audit_region("LoRAMemoryPool.prepare_lora_batch"):
            self.memory_pool.prepare_lora_batch(dict.fromkeys(lora_ids), self.loras,
                                                inflight_ids or set())
        with audit_region("LoRAManager.prepare_lora_batch"):
            batch_info = self._build_batch_info(forward_batch, lora_ids, use_graph)
        self.lora_backend.set_batch_info(batch_info)
        with audit_region("LoRAManager.update_lora_info"):
            self.update_lora_info()

    def update_lora_info(self) -> None:
        for layer_id, name, module in self.lora_modules:
            module.set_lora_info(*self.memory_pool.get_tensor(name, layer_id))

    def _build_batch_info(self, fb: ForwardBatch, lora_ids: list,
                          use_graph: bool) -> LoRABatchInfo:
        bs = fb.batch_size
        weight_indices_cpu = [self.memory_pool.get_buffer_id(u) for u in lora_ids]
        if fb.forward_mode.is_extend():
            seg_lens_cpu = list(fb.extend_seq_lens_cpu)
        else:
            seg_lens_cpu = [1] * bs
        if use_graph:
            info = self._graph_batch_info(bs)
        else:
            info = self._eager_batch_info(fb, bs, seg_lens_cpu)
        info.seg_lens_cpu, info.weight_indices_cpu = seg_lens_cpu, weight_indices_cpu
        if self.async_batch_info:
            self._fill_slots_async(info, lora_ids, weight_indices_cpu, use_graph)
        else:
            self._fill_slots_sync(info, lora_ids)
        return info

    def _graph_batch_info(self, bs: int) -> LoRABatchInfo:
        static = self.cuda_graph_batch_info
        static.seg_lens[:bs].fill_(1)
        torch.cumsum(static.seg_lens[:bs], dim=0, out=static.seg_indptr[1:bs + 1])
        return LoRABatchInfo(
            bs=bs, max_len=1, seg_lens=static.seg_lens[:bs],
            seg_indptr=static.seg_indptr[:bs + 1], weight_indices=static.weight_indices[:bs],
            lora_ranks=static.lora_ranks, scalings=static.scalings)

    def _eager_batch_info(self, fb: ForwardBatch, bs: int,
                          seg_lens_cpu: list[int]) -> LoRABatchInfo:
        dev = self.device
        if fb.forward_mode.is_extend():
            seg_lens = fb.extend_seq_lens
        else:
            seg_lens = torch.ones(bs, dtype=torch.int32, device=dev)
        seg_indptr = torch.zeros(bs + 1, dtype=torch.int32, device=dev)
        seg_indptr[1:] = torch.cumsum(seg_lens, dim=0)
        if self.async_batch_info:
            max_len = max(seg_lens_cpu)  # sglang#6994: from the host mirror
        else:
            max_len = int(torch.max(seg_lens))  # before: a device->host read
        n = self.max_loras_per_batch
        return LoRABatchInfo(
            bs=bs, max_len=max_len, seg_lens=seg_lens, seg_indptr=seg_indptr,
            weight_indices=torch.empty(bs, dtype=torch.int32, device=dev),
            lora_ranks=torch.zeros(n, dtype=torch.int32, device=dev),
            scalings=torch.zeros(n, dtype=torch.float32, device=dev))

    def _fill_slots_sync(self, info: LoRABatchInfo, lora_ids: list) -> None:
        """Before sglang#6994: one device write per request (and per adapter's rank and
        scaling, indexed by a device scalar), each a blocking copy."""
        for i, uid in enumerate(lora_ids):
            setitem_scalar(info.weight_indices, i, self.memory_pool.get_buffer_id(uid))
            if uid is not None:
                lora = self.loras[uid]
                setitem_scalar(info.lora_ranks, info.weight_indices[i], lora.rank)
                setitem_scalar(info.scalings, info.weight_indices[i], lora.scaling)

    def _fill_slots_async(self, info: LoRABatchInfo, lora_ids: list,
                          weight_indices_cpu: list[int], use_graph: bool) -> None:
        """sglang#6994: build on the host, copy from pinned memory, non_blocking."""
        n = self.max_loras_per_batch
        lora_ranks_cpu, scalings_cpu = [0] * n, [0.0] * n
        for uid, slot in zip(lora_ids, weight_indices_cpu):
            if uid is not None:
                lora_ranks_cpu[slot] = self.loras[uid].rank
                scalings_cpu[slot] = self.loras[uid].scaling
        if use_graph:  # into the static tensors the graphs read
            _copy_from_pinned(info.weight_indices, weight_indices_cpu, torch.int32)
            _copy_from_pinned(info.lora_ranks, lora_ranks_cpu, torch.int32)
            _copy_from_pinned(info.scalings, scalings_cpu, torch.float32)
        else:
            info.weight_indices = h2d(weight_indices_cpu, torch.int32, self.device, pin=True)
            info.lora_ranks = h2d(lora_ranks_cpu, torch.int32, self.device, pin=True)
            info.scalings = h2d(scalings_cpu, torch.float32, self.device, pin=True)


def _module_shapes(base_modules, full: bool) -> dict[str, LoRAModuleShape]:
    """Per fused module, its input dim and output blocks: tp=1 sizes if `full`, else this
    rank's."""
    shapes: dict[str, LoRAModuleShape] = {}
    for _, name, module in base_modules:
        fused = name.rsplit(".", 1)[-1]
        out_dim, in_dim = module.weight.full_shape if full else module.weight.shape
        blocks = getattr(module, "total_output_sizes" if full else "output_sizes", [out_dim])
        shape = LoRAModuleShape(in_dim, tuple(blocks))
        if shapes.setdefault(fused, shape) != shape:
            raise ValueError(f"{fused} has different shapes across layers")
    return shapes


def _copy_from_pinned(dst: torch.Tensor, data: list, dtype: torch.dtype) -> None:
    src = torch.tensor(data, dtype=dtype, pin_memory=is_pin_memory_available(dst.device))
    dst[:len(data)].copy_(src, non_blocking=True)
