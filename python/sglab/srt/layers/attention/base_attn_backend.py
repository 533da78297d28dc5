from __future__ import annotations

from abc import ABC, abstractmethod
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from sglab.srt.layers.elementwise import QKNormRope
    from sglab.srt.layers.radix_attention import RadixAttention
    from sglab.srt.model_executor.forward_batch_info import ForwardBatch


class AttentionBackend(ABC):
    """Per-step metadata in `init_forward_metadata`; per-layer math in forward_extend/decode."""

    @abstractmethod
    def init_forward_metadata(self, forward_batch: "ForwardBatch") -> None: ...

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                layer: "RadixAttention", forward_batch: "ForwardBatch",
                save_kv_cache: bool = True, rope: "QKNormRope | None" = None) -> torch.Tensor:
        """rope: q and k as projected, for the backend to normalize, rotate and store itself
        (only where `fuses_qk_rope` said so)."""
        if forward_batch.forward_mode.is_decode():
            if rope is not None:
                return self.forward_decode_rope(q, k, v, layer, forward_batch, rope)
            return self.forward_decode(q, k, v, layer, forward_batch, save_kv_cache)
        return self.forward_extend(q, k, v, layer, forward_batch, save_kv_cache)

    def fuses_qk_rope(self, layer: "RadixAttention", forward_batch: "ForwardBatch") -> bool:
        """Whether this forward's attention applies the layer's q/k norm + RoPE and stores the
        new K/V in its own launch (`forward(rope=)`)."""
        return False

    def forward_decode_rope(self, q, k, v, layer, forward_batch, rope) -> torch.Tensor:
        raise NotImplementedError(f"{type(self).__name__} does not fuse q/k norm + RoPE")

    @abstractmethod
    def forward_extend(self, q, k, v, layer, forward_batch, save_kv_cache=True) -> torch.Tensor: ...

    @abstractmethod
    def forward_decode(self, q, k, v, layer, forward_batch, save_kv_cache=True) -> torch.Tensor: ...
