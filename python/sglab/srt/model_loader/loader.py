"""Build a model from its config and fill its weights (safetensors or dummy)."""

from __future__ import annotations

import glob
import logging
import os
from typing import Iterator

import torch
from torch import nn

from sglab.srt.configs.model_config import ModelConfig
from sglab.srt.models.registry import resolve_model_cls

logger = logging.getLogger(__name__)


def get_model(model_config: ModelConfig, load_format: str, device: str) -> nn.Module:
    model_cls = resolve_model_cls(model_config.architectures)
    with torch.device(device):
        model = model_cls(model_config.hf_config, dtype=model_config.dtype)
    files = _safetensors_files(model_config.model_path)
    if load_format == "dummy":
        load_dummy_weights(model)
    elif load_format in ("auto", "safetensors"):
        if not files:
            raise ValueError(
                f"No *.safetensors weights in {model_config.model_path!r}; "
                "pass --load-format dummy to run with random weights"
            )
        loaded = model.load_weights(_iterate_safetensors(files))
        _check_all_loaded(model, loaded)
    else:
        raise ValueError(f"--load-format: unsupported value {load_format!r}")
    return model.eval()


def _safetensors_files(model_path: str) -> list[str]:
    return sorted(glob.glob(os.path.join(model_path, "*.safetensors")))


def _iterate_safetensors(files: list[str]) -> Iterator[tuple[str, torch.Tensor]]:
    from safetensors import safe_open

    for path in files:
        with safe_open(path, framework="pt", device="cpu") as f:
            for name in f.keys():
                yield name, f.get_tensor(name)


def _check_all_loaded(model: nn.Module, loaded: set[str]) -> None:
    missing = [n for n, _ in model.named_parameters() if n not in loaded]
    if missing:
        raise ValueError(f"Checkpoint is missing weights: {', '.join(missing[:8])}"
                         + (" ..." if len(missing) > 8 else ""))


@torch.no_grad()
def load_dummy_weights(model: nn.Module, low: float = -1e-3, high: float = 1e-3,
                       seed: int = 1234) -> None:
    """Fill every floating-point parameter with uniform noise, as upstream's dummy format does."""
    for param in model.parameters():
        if not torch.is_floating_point(param):
            continue
        gen = torch.Generator(device=param.device).manual_seed(seed)
        tmp = torch.empty(param.shape, dtype=torch.float32, device=param.device)
        tmp.uniform_(low, high, generator=gen)
        param.data.copy_(tmp.to(param.dtype))
