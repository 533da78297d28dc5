"""sglab: a small, fast, SGLang-compatible LLM inference server."""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    # Lazy, so that `import sglab` stays cheap (no torch, no transformers).
    if name == "Engine":
        from sglab.srt.entrypoints.engine import Engine

        return Engine
    if name == "ServerArgs":
        from sglab.srt.server_args import ServerArgs

        return ServerArgs
    raise AttributeError(f"module 'sglab' has no attribute {name!r}")


__all__ = ["Engine", "ServerArgs", "__version__"]
