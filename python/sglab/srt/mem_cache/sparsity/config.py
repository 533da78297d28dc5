"""`--hisparse-config`: upstream's keys and defaults, checked once at startup.

`page_size` is HiSparse's page: the unit of Quest's selection, of the host pool's free list and
of the device hot buffers. It is the server's `--page-size` (the key sets it when the flag is
not given, and must equal it when both are).
"""

from __future__ import annotations

import json
from dataclasses import dataclass

DEFAULT_TOP_K = 2048
DEFAULT_HOST_TO_DEVICE_RATIO = 2
DEFAULT_PAGE_SIZE = 64
DEFAULT_NUM_RECENT_PAGES = 4  # upstream Quest's default (sparse_extra_config)
KNOWN_KEYS = ("top_k", "device_buffer_size", "host_to_device_ratio", "page_size",
              "min_sparse_prompt_len", "num_recent_pages")


class HiSparseConfigError(ValueError):
    """A bad `--hisparse-config`; the message names the key."""


@dataclass(frozen=True)
class HiSparseConfig:
    top_k: int = DEFAULT_TOP_K  # tokens each decode step attends to, once past the buffer
    device_buffer_size: int = 2 * DEFAULT_TOP_K  # hot buffer slots per request on the device
    host_to_device_ratio: float = DEFAULT_HOST_TO_DEVICE_RATIO  # host pool / device pool
    page_size: int | None = None  # None: the server's --page-size
    min_sparse_prompt_len: int = 0  # shorter prompts stay dense, all their KV on the device
    num_recent_pages: int = DEFAULT_NUM_RECENT_PAGES  # always selected (the newest among them)

    @property
    def num_top_pages(self) -> int:
        return self.top_k // self.page_size


def parse_hisparse_config(text: str | None, server_page_size: int | None) -> HiSparseConfig:
    """The config of `--hisparse-config` (None: the defaults) for `--page-size`
    `server_page_size` (None: not given); raises HiSparseConfigError naming the key."""
    raw = _load(text)
    unknown = sorted(set(raw) - set(KNOWN_KEYS))
    if unknown:
        raise HiSparseConfigError(f"--hisparse-config: unknown key {unknown[0]!r} "
                                  f"(known: {', '.join(KNOWN_KEYS)})")
    top_k = _int(raw, "top_k", DEFAULT_TOP_K, low=1)
    buffer = _int(raw, "device_buffer_size", 2 * top_k, low=1)
    if buffer < top_k:
        raise HiSparseConfigError(f"--hisparse-config: device_buffer_size ({buffer}) must be "
                                  f"no smaller than top_k ({top_k})")
    ratio = raw.get("host_to_device_ratio", DEFAULT_HOST_TO_DEVICE_RATIO)
    if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not ratio >= 1:
        raise HiSparseConfigError(f"--hisparse-config: host_to_device_ratio must be a number "
                                  f">= 1, got {ratio!r}")
    page = _page_size(raw, server_page_size)
    config = HiSparseConfig(top_k, buffer, ratio, page,
                            _int(raw, "min_sparse_prompt_len", 0, low=0),
                            _int(raw, "num_recent_pages", DEFAULT_NUM_RECENT_PAGES, low=1))
    _check_pages(config)
    return config


def _load(text: str | None) -> dict:
    if text is None:
        return {}
    try:
        raw = json.loads(text)
    except json.JSONDecodeError as e:
        raise HiSparseConfigError(f"--hisparse-config: not valid JSON ({e})") from None
    if not isinstance(raw, dict):
        raise HiSparseConfigError(f"--hisparse-config: must be a JSON object, got {text!r}")
    return raw


def _int(raw: dict, key: str, default: int, low: int) -> int:
    value = raw.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise HiSparseConfigError(f"--hisparse-config: {key} must be an integer >= {low}, "
                                  f"got {value!r}")
    return value


def _page_size(raw: dict, server_page_size: int | None) -> int:
    if "page_size" not in raw:
        return server_page_size or DEFAULT_PAGE_SIZE
    page = _int(raw, "page_size", DEFAULT_PAGE_SIZE, low=1)
    if server_page_size is not None and page != server_page_size:
        raise HiSparseConfigError(f"--hisparse-config: page_size ({page}) must equal "
                                  f"--page-size ({server_page_size})")
    return page


def _check_pages(config: HiSparseConfig) -> None:
    page = config.page_size
    for key in ("top_k", "device_buffer_size"):
        if getattr(config, key) % page:
            raise HiSparseConfigError(f"--hisparse-config: {key} ({getattr(config, key)}) must "
                                      f"be a multiple of the page size ({page})")
    if config.num_top_pages < 1 + config.num_recent_pages:
        raise HiSparseConfigError(
            f"--hisparse-config: top_k ({config.top_k}) selects {config.num_top_pages} pages "
            f"of {page} tokens, fewer than the sink page and num_recent_pages "
            f"({config.num_recent_pages})")
