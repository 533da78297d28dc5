"""Loading HF tokenizers from local model directories."""

from __future__ import annotations

import logging
from typing import Any

logger = logging.getLogger(__name__)


def get_tokenizer(tokenizer_path: str, trust_remote_code: bool = False) -> Any:
    """A fast tokenizer for `tokenizer_path`, as upstream's `get_tokenizer` loads it."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(
        tokenizer_path, trust_remote_code=trust_remote_code, use_fast=True
    )
    if not getattr(tokenizer, "is_fast", False):
        logger.warning("Using a slow tokenizer for %s; detokenization may be slow.",
                       tokenizer_path)
    return tokenizer
