"""LoRA adapters in PEFT format: config checks, loading to host memory, fused layouts.

An adapter directory holds `adapter_config.json` and `adapter_model.safetensors` (or `.bin`),
with keys such as `base_model.model.model.layers.3.self_attn.q_proj.lora_A.weight` of shape
`(r, in)` and `...lora_B.weight` of shape `(out, r)`. The delta is `s * x A^T B^T`,
`s = lora_alpha / r`. Weights are normalized per layer to the fused modules sglab's models have:
`qkv_proj` A `(3, r, hidden)` and B `(q + 2 kv, r)` (slice i of the output reads rank block i),
`gate_up_proj` A `(2, r, hidden)` and B `(2 inter, r)`, `o_proj` and `down_proj` A `(1, r, in)`.
A slice the adapter does not train (say `k_proj`) is zero.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass

import torch

from sglab.srt.lora.utils import FUSED_STACK_NUM, HF_TO_FUSED, LoRAModuleShape


class LoRAAdapterError(ValueError):
    """A bad or unsupported adapter; the message says which field or file."""


# Fields that change the forward math in ways sglab does not implement, with what they mean.
_UNSUPPORTED_FLAGS = {
    "use_dora": "DoRA (weight-decomposed LoRA)",
    "use_rslora": "rank-stabilized LoRA (scaling lora_alpha / sqrt(r); sglab uses lora_alpha / r)",
    "use_qalora": "QA-LoRA",
    "use_bdlora": "block-diagonal LoRA",
    "lora_bias": "a trainable bias on lora_B",
    "fan_in_fan_out": "Conv1D-style transposed weights",
}
_UNSUPPORTED_NONEMPTY = {
    "modules_to_save": "fully trained extra modules",
    "rank_pattern": "per-module ranks",
    "alpha_pattern": "per-module alphas",
    "layer_replication": "layer replication",
    "trainable_token_indices": "trainable token embeddings",
    "target_parameters": "LoRA on raw parameters",
    "alora_invocation_tokens": "activated LoRA",
    "megatron_config": "Megatron-parallel LoRA layers",
}
# *_config fields that only affect how weights were initialized for training.
_INIT_ONLY_CONFIGS = {"loftq_config", "eva_config", "corda_config", "lora_ga_config"}
_KEY_RE = re.compile(
    r"layers\.(\d+)\.(?:[\w.]+\.)?(" + "|".join(HF_TO_FUSED) + r")\.lora_([AB])(?:\.[\w-]+)?\.weight$")


@dataclass
class LoRAConfig:
    path: str
    r: int
    lora_alpha: float
    target_modules: list[str]  # HF projection names
    hf_config: dict

    @property
    def scaling(self) -> float:
        return self.lora_alpha / self.r

    @classmethod
    def from_dir(cls, path: str) -> LoRAConfig:
        if not isinstance(path, str) or not os.path.isdir(path):
            raise LoRAAdapterError(f"LoRA adapter directory {path!r} does not exist")
        cfg_path = os.path.join(path, "adapter_config.json")
        if not os.path.isfile(cfg_path):
            raise LoRAAdapterError(f"no adapter_config.json in LoRA adapter directory {path!r}")
        try:
            with open(cfg_path) as f:
                cfg = json.load(f)
        except (OSError, ValueError) as e:
            raise LoRAAdapterError(f"cannot read {cfg_path!r}: {e}") from e
        if not isinstance(cfg, dict):
            raise LoRAAdapterError(f"{cfg_path!r} is not a JSON object")
        _check_supported(cfg, cfg_path)
        r, alpha = cfg.get("r"), cfg.get("lora_alpha", cfg.get("r"))
        if isinstance(r, bool) or not isinstance(r, int) or r <= 0:
            raise LoRAAdapterError(f"{cfg_path!r}: r must be a positive integer, got {r!r}")
        if isinstance(alpha, bool) or not isinstance(alpha, (int, float)):
            raise LoRAAdapterError(f"{cfg_path!r}: lora_alpha must be a number, got {alpha!r}")
        return cls(path=path, r=r, lora_alpha=float(alpha),
                   target_modules=_target_modules(cfg.get("target_modules"), cfg_path),
                   hf_config=cfg)


def _check_supported(cfg: dict, cfg_path: str) -> None:
    peft_type = str(cfg.get("peft_type", "LORA")).upper()
    if peft_type != "LORA":
        raise LoRAAdapterError(f"{cfg_path!r}: peft_type {peft_type!r} is not supported "
                               "(only LORA)")
    for key, what in _UNSUPPORTED_FLAGS.items():
        if cfg.get(key):
            raise LoRAAdapterError(f"{cfg_path!r}: {key}=true ({what}) is not supported")
    for key, what in _UNSUPPORTED_NONEMPTY.items():
        if cfg.get(key):
            raise LoRAAdapterError(f"{cfg_path!r}: {key} ({what}) is not supported")
    bias = cfg.get("bias", "none")
    if bias not in (None, "none"):
        raise LoRAAdapterError(f"{cfg_path!r}: bias={bias!r} is not supported (only 'none')")
    for key, value in cfg.items():
        if key.endswith("_config") and key not in _INIT_ONLY_CONFIGS and value:
            raise LoRAAdapterError(f"{cfg_path!r}: {key} (a LoRA variant) is not supported")


def _target_modules(value, cfg_path: str) -> list[str]:
    """PEFT's list of names, or the string forms `all-linear` and a regex over module names."""
    if isinstance(value, list):
        names = [v.rsplit(".", 1)[-1] for v in value]
        bad = [n for n in names if n not in HF_TO_FUSED]
        if bad:
            raise LoRAAdapterError(
                f"{cfg_path!r}: target module(s) {', '.join(bad)} are not supported "
                f"(supported: {', '.join(HF_TO_FUSED)})")
        return sorted(set(names), key=list(HF_TO_FUSED).index)
    if value == "all-linear":
        return list(HF_TO_FUSED)
    if isinstance(value, str):
        try:
            pattern = re.compile(value)
        except re.error as e:
            raise LoRAAdapterError(f"{cfg_path!r}: bad target_modules regex: {e}") from e
        return [n for n in HF_TO_FUSED if pattern.search(n)]
    raise LoRAAdapterError(f"{cfg_path!r}: target_modules must be a list or a string")


class LoRAAdapter:
    """One adapter's weights in host memory, normalized to the fused module layouts.

    `layers[layer_id][fused_name] = (A, B)`: A `(stack_num, r, in)`, B `(sum of outs, r)`.
    """

    def __init__(self, uid: str, config: LoRAConfig):
        self.uid = uid
        self.config = config
        self.scaling = config.scaling
        self.layers: list[dict[str, tuple[torch.Tensor, torch.Tensor]]] = []

    @property
    def rank(self) -> int:
        return self.config.r

    def modules(self) -> set[str]:
        """Fused modules this adapter has weights for, in any layer."""
        return {name for layer in self.layers for name in layer}

    def initialize_weights(self, module_shapes: dict[str, LoRAModuleShape], num_layers: int,
                           dtype: torch.dtype) -> None:
        raw = _read_weights(self.config.path)
        per_layer: list[dict[str, dict[str, torch.Tensor]]] = [{} for _ in range(num_layers)]
        for key, tensor in raw.items():
            m = _KEY_RE.search(key)
            if m is None:
                raise LoRAAdapterError(
                    f"{self.config.path!r}: weight {key!r} is not a LoRA A/B matrix of a "
                    f"supported projection ({', '.join(HF_TO_FUSED)})")
            layer_id, proj, ab = int(m.group(1)), m.group(2), m.group(3)
            if layer_id >= num_layers:
                raise LoRAAdapterError(f"{self.config.path!r}: weight {key!r} is for layer "
                                       f"{layer_id}, but the base model has {num_layers}")
            per_layer[layer_id][f"{proj}.{ab}"] = tensor
        self.layers = [self._normalize_layer(w, module_shapes, dtype, i)
                       for i, w in enumerate(per_layer)]

    def _normalize_layer(self, weights: dict[str, torch.Tensor],
                         module_shapes: dict[str, LoRAModuleShape], dtype: torch.dtype,
                         layer_id: int) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        r = self.rank
        out: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        for fused, stack_num in FUSED_STACK_NUM.items():
            projs = [p for p, (f, _) in HF_TO_FUSED.items() if f == fused]
            if not any(f"{p}.A" in weights or f"{p}.B" in weights for p in projs):
                continue
            shape = module_shapes.get(fused)
            if shape is None:
                raise LoRAAdapterError(f"{self.config.path!r}: the base model has no {fused}")
            a = torch.zeros(stack_num, r, shape.in_dim, dtype=dtype)
            b = torch.zeros(shape.out_dim, r, dtype=dtype)
            offsets = shape.output_offset()
            for proj in projs:
                i = HF_TO_FUSED[proj][1]
                wa, wb = weights.get(f"{proj}.A"), weights.get(f"{proj}.B")
                if (wa is None) != (wb is None):
                    raise LoRAAdapterError(f"{self.config.path!r}: layer {layer_id} {proj} has "
                                           "only one of lora_A / lora_B")
                if wa is None:
                    continue
                self._check_shape(proj, layer_id, "lora_A", wa, (r, shape.in_dim))
                self._check_shape(proj, layer_id, "lora_B", wb, (shape.out_dims[i], r))
                a[i] = wa.to(dtype)
                b[offsets[i]:offsets[i + 1]] = wb.to(dtype)
            out[fused] = (a, b)
        return out

    def _check_shape(self, proj: str, layer_id: int, what: str, t: torch.Tensor,
                     expect: tuple[int, int]) -> None:
        if tuple(t.shape) != expect:
            raise LoRAAdapterError(
                f"{self.config.path!r}: layer {layer_id} {proj}.{what} has shape "
                f"{tuple(t.shape)}, expected {expect} (r={self.rank}); is the adapter for "
                "this base model?")


def _read_weights(path: str) -> dict[str, torch.Tensor]:
    st = os.path.join(path, "adapter_model.safetensors")
    bin_path = os.path.join(path, "adapter_model.bin")
    try:
        if os.path.isfile(st):
            from safetensors.torch import load_file

            return load_file(st, device="cpu")
        if os.path.isfile(bin_path):
            return torch.load(bin_path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise LoRAAdapterError(f"cannot read the weights of LoRA adapter {path!r}: {e}") from e
    raise LoRAAdapterError(f"no adapter_model.safetensors (or adapter_model.bin) in LoRA "
                           f"adapter directory {path!r}")
