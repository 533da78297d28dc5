"""ModelOptions: the choices a model's layers make once, at construction.

The ModelRunner builds one from `ServerArgs` and `PatchFlags` and passes it to the model class,
which hands each layer the value it needs through the layer's constructor; nothing switches a
layer after it is built.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ModelOptions:
    # --enable-deterministic-inference: linear layers and the logits GEMM through the
    # batch-invariant ops (sglab.srt.batch_invariant_ops).
    batch_invariant: bool
    # Patch 0003a (PatchFlags.sync_free_logits_metadata): the logits processor's prompt-logprob
    # index tensors.
    sync_free_logits_metadata: bool
    # --kernel-fusion on: q/k norm + RoPE + KV write in one kernel, fp32 logits from the GEMM.
    kernel_fusion: bool
