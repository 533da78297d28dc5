"""LoRA server arguments: CLI flags (upstream names) and their resolution in ServerArgs."""

from __future__ import annotations

import argparse
import logging

from sglab.srt.lora.backend import LORA_BACKEND_CHOICES
from sglab.srt.lora.lora_registry import parse_lora_path
from sglab.srt.lora.utils import HF_TO_FUSED, get_normalized_target_modules

logger = logging.getLogger(__name__)


def add_lora_cli_args(parser: argparse.ArgumentParser) -> None:
    a = parser.add_argument
    a("--enable-lora", action="store_const", const=True, default=None,
      help="Serve LoRA adapters (implied by --lora-paths).")
    a("--lora-paths", type=str, nargs="*", default=None,
      help="Adapters to load at start: PATH, NAME=PATH or JSON "
           '{"lora_name": ..., "lora_path": ..., "pinned": bool}.')
    a("--max-loras-per-batch", type=int, default=8,
      help="Adapters (the base model counts as one) per running batch: the GPU slot count.")
    a("--max-loaded-loras", type=int, default=None,
      help="Adapters kept in host memory; loading more evicts the least recently used "
           "unpinned one.")
    a("--max-lora-rank", type=int, default=None,
      help="Largest rank the GPU slots hold (default: the largest initial adapter's).")
    a("--lora-target-modules", type=str, nargs="*", default=None,
      help=f"Modules the GPU slots cover: {', '.join(HF_TO_FUSED)}, qkv_proj, gate_up_proj "
           "or all (default: the union of the initial adapters').")
    a("--lora-backend", type=str, default=None, choices=LORA_BACKEND_CHOICES,
      help="Segment-GEMM backend (default: triton on CUDA, torch_native on CPU).")


def resolve_lora_args(args) -> None:
    """Normalize --lora-paths to LoRARefs and check the LoRA flags; raises ServerArgsError."""
    from sglab.srt.server_args import ServerArgsError

    try:
        _resolve(args)
    except ValueError as e:
        if isinstance(e, ServerArgsError):
            raise
        raise ServerArgsError(str(e)) from e


def _resolve(args) -> None:
    from sglab.srt.server_args import ServerArgsError

    refs = [parse_lora_path(p) for p in (args.lora_paths or [])]
    names = [r.lora_name for r in refs]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise ServerArgsError(f"--lora-paths: adapter name(s) {', '.join(dup)} given twice")
    args.lora_paths = refs or None
    if refs and args.enable_lora is False:
        raise ServerArgsError("--lora-paths needs LoRA enabled (do not pass enable_lora=False)")
    args.enable_lora = bool(args.enable_lora or refs)
    if not args.enable_lora:
        return
    if args.lora_backend is None:
        args.lora_backend = "triton" if args.device == "cuda" else "torch_native"
    if args.lora_backend not in LORA_BACKEND_CHOICES:
        raise ServerArgsError(f"--lora-backend: invalid choice {args.lora_backend!r} "
                              f"(choose from {', '.join(LORA_BACKEND_CHOICES)})")
    if args.max_loras_per_batch <= 0:
        raise ServerArgsError(
            f"--max-loras-per-batch must be positive, got {args.max_loras_per_batch}")
    if args.max_loaded_loras is not None:
        if args.max_loaded_loras < args.max_loras_per_batch:
            raise ServerArgsError(
                f"--max-loaded-loras ({args.max_loaded_loras}) must be >= "
                f"--max-loras-per-batch ({args.max_loras_per_batch})")
        if len(refs) > args.max_loaded_loras:
            raise ServerArgsError(f"--lora-paths gives {len(refs)} adapters, more than "
                                  f"--max-loaded-loras ({args.max_loaded_loras})")
    if args.max_lora_rank is not None and args.max_lora_rank <= 0:
        raise ServerArgsError(f"--max-lora-rank must be positive, got {args.max_lora_rank}")
    if args.lora_target_modules:
        targets = list(args.lora_target_modules)
        if "all" in targets:
            targets = list(HF_TO_FUSED)
        get_normalized_target_modules(targets)  # raises on an unsupported name
        args.lora_target_modules = targets
    if not refs and (args.max_lora_rank is None or not args.lora_target_modules):
        raise ServerArgsError("--max-lora-rank and --lora-target-modules are required when "
                              "no --lora-paths are given")
    if not args.disable_radix_cache:
        # The radix cache keys on tokens only; KV computed under one adapter is not valid
        # under another.
        logger.info("LoRA is enabled: disabling the radix cache")
        args.disable_radix_cache = True
