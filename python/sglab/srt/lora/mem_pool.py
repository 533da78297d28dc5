"""LoRAMemoryPool: device slots holding the adapters of the running batch.

Per fused module and layer, `A_buffer` is `(num_slots, stack_num * max_rank, in)` (slice i's rank
block at rows `[i * max_rank, i * max_rank + r)`) and `B_buffer` is `(num_slots, out, max_rank)`
(columns `[0, r)`). Unused rows/columns of a slot are zero, so kernels may read the full
`max_rank` or stop at `lora_ranks[slot]`. The base model (uid None) takes a slot of zeros.
Shapes are this rank's: under tensor parallelism each layer's wrapper cuts the tp=1 adapter
weights held on the host to its shard (`slice_lora_a_weights` / `slice_lora_b_weights`) as they
are copied into a slot.

The buffers are allocated once: CUDA graphs captured on them stay valid when a slot is
reloaded, and every reload is issued on the forward stream, so it runs after the forwards already
queued. A slot is only given to a new adapter when its adapter is neither in the batch being
prepared nor in the batch still in flight (overlap scheduling).
"""

from __future__ import annotations

from collections.abc import Collection

import torch

from sglab.srt.debug.sync_audit import AUDIT
from sglab.srt.lora.layers import BaseLayerWithLoRA
from sglab.srt.lora.lora import LoRAAdapter
from sglab.srt.lora.utils import LoRAModuleShape

_EMPTY = object()  # a free slot (distinct from None, the base model)


class LoRAMemoryPool:
    def __init__(self, module_shapes: dict[str, LoRAModuleShape], num_layers: int,
                 max_loras_per_batch: int, max_lora_rank: int, dtype: torch.dtype,
                 device: torch.device, slicers: dict[str, BaseLayerWithLoRA] | None = None):
        self.module_shapes = module_shapes
        # Per fused module, a wrapper that cuts tp=1 weights to this rank's (None: tp=1).
        self.slicers = slicers or {}
        self.num_layers = num_layers
        self.num_slots = max_loras_per_batch
        self.max_lora_rank = max_lora_rank
        self.device = device
        n, rank = max_loras_per_batch, max_lora_rank
        self.A_buffer: dict[str, list[torch.Tensor]] = {
            name: [torch.zeros(n, s.stack_num * rank, s.in_dim, dtype=dtype, device=device)
                   for _ in range(num_layers)] for name, s in module_shapes.items()}
        self.B_buffer: dict[str, list[torch.Tensor]] = {
            name: [torch.zeros(n, s.out_dim, rank, dtype=dtype, device=device)
                   for _ in range(num_layers)] for name, s in module_shapes.items()}
        self.buffer_id_to_uid: list[object] = [_EMPTY] * n
        self.uid_to_buffer_id: dict[str | None, int] = {}
        self.slot_last_used = [0] * n
        self.use_ct = 0
        self.num_loads = 0  # adapters (and base) written into a slot, for tests and stats

    def get_buffer_id(self, uid: str | None) -> int:
        return self.uid_to_buffer_id[uid]

    def get_tensor(self, name: str, layer_id: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.A_buffer[name][layer_id], self.B_buffer[name][layer_id]

    def loaded_uids(self) -> set[str | None]:
        return set(self.uid_to_buffer_id)

    def prepare_lora_batch(self, cur_uids: Collection[str | None],
                           loras: dict[str, LoRAAdapter],
                           protected_uids: set[str | None] = frozenset()) -> None:
        """Give every adapter of the batch a slot, loading the ones not resident, in the order
        of `cur_uids` (the batch's: every TP rank fills the same slots).

        Only slots whose adapter is in neither `cur_uids` nor `protected_uids` (the in-flight
        batch) are reused, least recently used first.
        """
        if len(cur_uids) > self.num_slots:
            raise RuntimeError(f"{len(cur_uids)} adapters in one batch, but only "
                               f"{self.num_slots} slots (--max-loras-per-batch)")
        self.use_ct += 1
        keep = set(cur_uids) | set(protected_uids)
        for uid in cur_uids:
            if uid not in self.uid_to_buffer_id:
                slot = self._find_slot(keep)
                self._assign(slot, uid, loras.get(uid) if uid is not None else None)
            self.slot_last_used[self.uid_to_buffer_id[uid]] = self.use_ct

    def _find_slot(self, keep: set) -> int:
        free = [i for i, u in enumerate(self.buffer_id_to_uid) if u is _EMPTY]
        if free:
            return free[0]
        evictable = [i for i, u in enumerate(self.buffer_id_to_uid) if u not in keep]
        if not evictable:
            raise RuntimeError("no LoRA slot can be evicted: every slot holds an adapter of the "
                               "batch being prepared or of the batch in flight")
        return min(evictable, key=lambda i: self.slot_last_used[i])

    def _assign(self, slot: int, uid: str | None, adapter: LoRAAdapter | None) -> None:
        if uid is not None and adapter is None:
            raise RuntimeError(f"LoRA adapter {uid} is not loaded in host memory")
        old = self.buffer_id_to_uid[slot]
        if old is not _EMPTY:
            del self.uid_to_buffer_id[old]
        self.buffer_id_to_uid[slot] = uid
        self.uid_to_buffer_id[uid] = slot
        self.load_lora_weight_to_buffer(slot, adapter)
        self.num_loads += 1

    def load_lora_weight_to_buffer(self, slot: int, adapter: LoRAAdapter | None) -> None:
        """Zero the slot, then copy the adapter's first r rows / columns (none for the base)."""
        rank = self.max_lora_rank
        for name in self.module_shapes:
            for layer_id in range(self.num_layers):
                a_buf, b_buf = self.get_tensor(name, layer_id)
                a_buf[slot].zero_()
                b_buf[slot].zero_()
                if adapter is None or name not in adapter.layers[layer_id]:
                    continue
                a, b = adapter.layers[layer_id][name]
                slicer = self.slicers.get(name)
                if slicer is not None:
                    a, b = slicer.slice_lora_a_weights(a), slicer.slice_lora_b_weights(b)
                r = a.shape[1]
                for i in range(a.shape[0]):
                    _copy_weight(a_buf[slot, i * rank:i * rank + r], a[i])
                _copy_weight(b_buf[slot, :, :r], b)

    def free(self, uid: str | None) -> None:
        """Forget a slot's adapter (its weights stay until the slot is reused)."""
        slot = self.uid_to_buffer_id.pop(uid, None)
        if slot is not None:
            self.buffer_id_to_uid[slot] = _EMPTY


def _copy_weight(dst: torch.Tensor, src: torch.Tensor) -> None:
    """Host (pageable) -> device slot copy, on a miss only: blocking on an accelerator."""
    if dst.device.type == "cpu":
        AUDIT.record("blocking_h2d")  # on CUDA, sync-debug mode reports it
    dst.copy_(src)
