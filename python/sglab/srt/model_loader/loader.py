"""Build a model from its config and fill its weights (safetensors or dummy)."""

from __future__ import annotations

import glob
import logging
import os
from typing import Iterator

import torch
from torch import nn

from sglab.srt.configs.model_config import ModelConfig
from sglab.srt.configs.model_options import ModelOptions
from sglab.srt.utils.dummy_model import init_std_mean
from sglab.srt.models.registry import resolve_model_cls

logger = logging.getLogger(__name__)


def get_model(model_config: ModelConfig, load_format: str, device: str,
              options: ModelOptions) -> nn.Module:
    model_cls = resolve_model_cls(model_config.architectures)
    with torch.device(device):
        model = model_cls(model_config.hf_config, model_config.dtype, options)
    files = _safetensors_files(model_config.model_path)
    if load_format == "dummy":
        load_dummy_weights(model, model_config.hidden_size)
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
def load_dummy_weights(model: nn.Module, hidden_size: int, seed: int = 1234) -> None:
    """Random weights drawn on the weights' device with sglab's scale-preserving init (see
    `init_std_mean`). Upstream's dummy format draws uniform noise in [-1e-3, 1e-3] for every
    parameter, norms included, which leaves a near-dead network: its greedy outputs cycle and
    barely react to numerics, so neither its outputs nor its kernel inputs look like a real
    model's. Each parameter has its own seed (seed + its index), so layers differ.

    A tensor-parallel parameter is drawn at its tp=1 shape (`full_shape`) and loaded through
    its `load_full`: every rank holds exactly its shard of the tp=1 model."""
    zero_centered = bool(getattr(model, "zero_centered_norms", False))
    for i, (name, param) in enumerate(model.named_parameters()):
        if not torch.is_floating_point(param):
            continue
        shape = tuple(getattr(param, "full_shape", param.shape))
        gen = torch.Generator(device=param.device).manual_seed(seed + i)
        std, mean = init_std_mean(name, shape, hidden_size, zero_centered)
        tmp = torch.empty(shape, dtype=torch.float32, device=param.device)
        tmp.normal_(mean, std, generator=gen)
        load_full = getattr(param, "load_full", None)
        if load_full is None:
            param.data.copy_(tmp.to(param.dtype))
        else:
            load_full(param, tmp)
