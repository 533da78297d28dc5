"""Adapter names: `--lora-paths` parsing, LoRARef, and the registry the scheduler keeps.

Requests name an adapter (`lora_path` is the *name*); the scheduler resolves it to the
`lora_id` of the adapter registered under that name when the request arrives, so an adapter
unloaded and re-registered under the same name never mixes with requests of the old one.
"""

from __future__ import annotations

import json
import uuid
from collections import OrderedDict
from dataclasses import dataclass, field


@dataclass
class LoRARef:
    lora_name: str
    lora_path: str
    pinned: bool = False
    lora_id: str = field(default_factory=lambda: uuid.uuid4().hex)


def parse_lora_path(item) -> LoRARef:
    """`PATH`, `NAME=PATH`, JSON `{"lora_name", "lora_path", "pinned"}`, a dict or a LoRARef."""
    if isinstance(item, LoRARef):
        return item
    if isinstance(item, str) and item.strip().startswith("{"):
        try:
            item = json.loads(item)
        except ValueError as e:
            raise ValueError(f"--lora-paths: bad JSON {item!r}: {e}") from e
    if isinstance(item, dict):
        unknown = set(item) - {"lora_name", "lora_path", "pinned"}
        if unknown or "lora_name" not in item or "lora_path" not in item:
            raise ValueError(f"--lora-paths: JSON items need lora_name and lora_path (and "
                             f"optionally pinned), got {item!r}")
        return LoRARef(str(item["lora_name"]), str(item["lora_path"]), bool(item.get("pinned")))
    if not isinstance(item, str) or not item:
        raise ValueError(f"--lora-paths: bad item {item!r}")
    name, sep, path = item.partition("=")
    if sep and name and path:
        return LoRARef(name, path)
    return LoRARef(item, item)


class LoRARegistry:
    """Registered adapters by name, least recently used first (for --max-loaded-loras)."""

    def __init__(self) -> None:
        self._by_name: OrderedDict[str, LoRARef] = OrderedDict()

    def __len__(self) -> int:
        return len(self._by_name)

    def __contains__(self, name: str) -> bool:
        return name in self._by_name

    def get(self, name: str) -> LoRARef | None:
        return self._by_name.get(name)

    def register(self, ref: LoRARef) -> None:
        if ref.lora_name in self._by_name:
            raise ValueError(f"LoRA adapter {ref.lora_name!r} is already loaded")
        self._by_name[ref.lora_name] = ref

    def unregister(self, name: str) -> LoRARef:
        return self._by_name.pop(name)

    def touch(self, name: str) -> None:
        self._by_name.move_to_end(name)

    def lru_unpinned(self, in_use_ids: set[str]) -> LoRARef | None:
        for ref in self._by_name.values():
            if not ref.pinned and ref.lora_id not in in_use_ids:
                return ref
        return None

    def loaded_adapters(self) -> dict[str, str]:
        return {name: ref.lora_path for name, ref in self._by_name.items()}
