"""Custom logit processors: client-supplied code run on a request's logits each step.

Upstream SGLang's format: a `CustomLogitProcessor` subclass serialized by `to_str()` as JSON
`{"callable": "<dill pickle of the class, hex>"}`; the server builds an instance and calls it
with the logits rows of the requests using it and their `custom_params` (each dict also carries
the request itself under `"__req__"`, as upstream).

Security: deserializing runs arbitrary code in the scheduler process. The server accepts
processors only with `--enable-custom-logit-processor`, for servers whose every client is
trusted.
"""

from __future__ import annotations

import functools
import io
import json
import types
from abc import ABC, abstractmethod
from typing import Any

import torch

# Processors written against upstream's base class pickle it by reference to this module.
_UPSTREAM_MODULE = "sglang.srt.sampling.custom_logit_processor"


class CustomLogitProcessor(ABC):
    """Subclass and implement `__call__`; send `YourProcessor.to_str()` with the request."""

    @abstractmethod
    def __call__(self, logits: torch.Tensor,
                 custom_param_list: list[dict[str, Any]] | None = None) -> torch.Tensor:
        """The new logits of these rows (the rows of the requests using this processor)."""

    @classmethod
    def to_str(cls) -> str:
        """Upstream's format, with the class pickled by value wherever it is defined (dill
        would pickle a class of an importable module by name, which the server may lack)."""
        import dill

        return json.dumps({"callable": dill.dumps(_by_value(cls), recurse=True).hex()})

    @classmethod
    def from_str(cls, json_str: str) -> "CustomLogitProcessor":
        return _class_from_str(json_str)()


class DisallowedTokensLogitsProcessor(CustomLogitProcessor):
    """Forbids `custom_params["token_ids"]` (upstream's example processor)."""

    def __call__(self, logits: torch.Tensor,
                 custom_param_list: list[dict[str, Any]] | None = None) -> torch.Tensor:
        for row, params in enumerate(custom_param_list or []):
            logits[row, params["token_ids"]] = -float("inf")
        return logits


def _by_value(cls: type) -> type:
    """`cls` as if defined in `__main__` (dill pickles those by value), methods included."""
    if cls.__module__ == "__main__":
        return cls
    namespace = {k: _main_function(v) if isinstance(v, types.FunctionType) else v
                 for k, v in vars(cls).items() if k not in ("__dict__", "__weakref__")}
    return type(cls)(cls.__name__, cls.__bases__, {**namespace, "__module__": "__main__"})


def _main_function(f: types.FunctionType) -> types.FunctionType:
    g = types.FunctionType(f.__code__, f.__globals__, f.__name__, f.__defaults__, f.__closure__)
    g.__kwdefaults__, g.__qualname__, g.__module__ = f.__kwdefaults__, f.__qualname__, "__main__"
    return g


@functools.lru_cache(maxsize=256)
def _class_from_str(json_str: str) -> type:
    data = json.loads(json_str)
    if not isinstance(data, dict) or not isinstance(data.get("callable"), str):
        raise ValueError('expected a JSON object {"callable": "<hex>"} (CustomLogitProcessor'
                         '.to_str())')
    return _unpickler(bytes.fromhex(data["callable"])).load()


def load_processor(json_str: Any) -> CustomLogitProcessor:
    """The processor a request sent; ValueError naming what is wrong with it."""
    if not isinstance(json_str, str):
        raise ValueError("custom_logit_processor must be a string (CustomLogitProcessor"
                         ".to_str()).")
    try:
        processor = CustomLogitProcessor.from_str(json_str)
    except Exception as e:  # noqa: BLE001 - the client's payload is at fault
        raise ValueError(f"Invalid custom_logit_processor: {type(e).__name__}: {e}") from None
    if not callable(processor):
        raise ValueError("Invalid custom_logit_processor: the class is not callable.")
    return processor


def _unpickler(data: bytes) -> Any:
    """dill's unpickler, reading upstream's base class as sglab's."""
    import dill

    class Unpickler(dill.Unpickler):
        def find_class(self, module: str, name: str) -> Any:
            return super().find_class(__name__ if module == _UPSTREAM_MODULE else module, name)

    return Unpickler(io.BytesIO(data))


def apply_custom_logit_processors(
    logits: torch.Tensor, rows: list[tuple[str, CustomLogitProcessor, dict | None] | None],
) -> tuple[torch.Tensor, dict[int, str]]:
    """`logits` with each row's processor applied ((key, processor, params) or None), and the
    rows whose processor failed, with why. A processor is called once on all its rows, as
    upstream; when that raises, on each row alone, so only the rows it fails on fail."""
    logits = logits.clone()  # the processors may write in place
    groups: dict[str, list[int]] = {}
    for i, row in enumerate(rows):
        if row is not None:
            groups.setdefault(row[0], []).append(i)
    errors: dict[int, str] = {}
    for indices in groups.values():
        error = _apply(logits, rows, indices)
        if error is not None and len(indices) == 1:
            errors[indices[0]] = error
        elif error is not None:
            for i in indices:
                if (alone := _apply(logits, rows, [i])) is not None:
                    errors[i] = alone
    return logits, errors


def _apply(logits: torch.Tensor, rows: list, indices: list[int]) -> str | None:
    processor = rows[indices[0]][1]
    index = torch.tensor(indices, dtype=torch.int64).to(logits.device, non_blocking=True)
    try:
        out = processor(logits[index], [rows[i][2] for i in indices])
        if not isinstance(out, torch.Tensor) or out.shape != (len(indices), logits.shape[1]):
            raise ValueError(f"it must return a tensor of shape {(len(indices), logits.shape[1])}"
                             f", got {getattr(out, 'shape', type(out).__name__)}")
        logits[index] = out.to(logits.dtype)
    except Exception as e:  # noqa: BLE001 - the client's code fails its own requests only
        return f"The custom logit processor failed: {type(e).__name__}: {e}"
    return None
