"""LoRA adapters for tests, made with the `peft` library on a local base model."""

from __future__ import annotations

import json
import os

import torch


def make_peft_adapter(base_path: str, out_dir: str, r: int, lora_alpha: float,
                      target_modules: list[str], seed: int, std: float = 0.1) -> str:
    """A PEFT LoRA adapter with random, non-zero A and B (PEFT starts B at zero)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base_path, dtype=torch.float32)
    peft_model = get_peft_model(model, LoraConfig(r=r, lora_alpha=lora_alpha,
                                                  target_modules=target_modules,
                                                  lora_dropout=0.0))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_" in name:
                param.copy_(torch.randn(param.shape, generator=gen) * std)
    peft_model.save_pretrained(out_dir)
    return out_dir


def edit_adapter_config(src_dir: str, out_dir: str, **changes) -> str:
    """A copy of an adapter directory with some adapter_config.json fields changed."""
    import shutil

    shutil.copytree(src_dir, out_dir)
    path = os.path.join(out_dir, "adapter_config.json")
    with open(path) as f:
        cfg = json.load(f)
    cfg.update(changes)
    with open(path, "w") as f:
        json.dump(cfg, f)
    return out_dir


def make_random_adapter(base_path: str, out_dir: str, r: int = 16, lora_alpha: float = 32,
                        target_modules: list[str] | None = None, seed: int = 0,
                        std: float = 0.02, dtype: str = "bfloat16") -> str:
    """A PEFT-format LoRA adapter with random weights, from the base's config.json alone.

    For GPU benchmarks on real-shaped dummy models, where loading the base model into PEFT
    would not fit in host memory.
    """
    from safetensors.torch import save_file

    with open(os.path.join(base_path, "config.json")) as f:
        cfg = json.load(f)
    targets = target_modules or ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                 "up_proj", "down_proj"]
    hidden, inter = cfg["hidden_size"], cfg["intermediate_size"]
    heads = cfg["num_attention_heads"]
    head_dim = cfg.get("head_dim") or hidden // heads
    kv = (cfg.get("num_key_value_heads") or heads) * head_dim
    dims = {"q_proj": (hidden, heads * head_dim), "k_proj": (hidden, kv), "v_proj": (hidden, kv),
            "o_proj": (heads * head_dim, hidden), "gate_proj": (hidden, inter),
            "up_proj": (hidden, inter), "down_proj": (inter, hidden)}
    gen = torch.Generator().manual_seed(seed)
    weights = {}
    for layer in range(cfg["num_hidden_layers"]):
        for name in targets:
            block = "mlp" if name in ("gate_proj", "up_proj", "down_proj") else "self_attn"
            prefix = f"base_model.model.model.layers.{layer}.{block}.{name}"
            d_in, d_out = dims[name]
            for ab, shape in (("A", (r, d_in)), ("B", (d_out, r))):
                t = torch.randn(shape, generator=gen) * std
                weights[f"{prefix}.lora_{ab}.weight"] = t.to(getattr(torch, dtype))
    os.makedirs(out_dir, exist_ok=True)
    save_file(weights, os.path.join(out_dir, "adapter_model.safetensors"))
    config = {"peft_type": "LORA", "r": r, "lora_alpha": lora_alpha,
              "target_modules": targets, "bias": "none", "lora_dropout": 0.0,
              "base_model_name_or_path": base_path, "task_type": "CAUSAL_LM"}
    with open(os.path.join(out_dir, "adapter_config.json"), "w") as f:
        json.dump(config, f, indent=2)
    return out_dir


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description="Write a random PEFT LoRA adapter for a base "
                                                 "model directory (for benchmarks).")
    parser.add_argument("--model-path", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--alpha", type=float, default=32)
    parser.add_argument("--target-modules", nargs="*", default=None)
    parser.add_argument("--seed", type=int, default=0)
    a = parser.parse_args()
    print(make_random_adapter(a.model_path, a.out, a.rank, a.alpha, a.target_modules, a.seed))
