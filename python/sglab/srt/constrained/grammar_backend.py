"""Grammar-constrained decoding: a request's `json_schema`, `regex` or `ebnf` compiles (in a
worker thread, off the scheduler loop; cached by spec) to a grammar. Each request gets its own
matcher, which follows the request's tokens on the host and fills the request's row of the
batch's token bitmask before each step; the mask is applied on the device (`VocabMask`).

Backends as upstream's `--grammar-backend`: `xgrammar` (the default; optional dependency,
`pip install sglab[structured]`), `outlines` and `llguidance` (names accepted, not bundled:
a request needing them is refused with a message saying so) and `none`.
"""

from __future__ import annotations

import json
import logging
import re
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import torch

from sglab.srt.utils.h2d import h2d

logger = logging.getLogger(__name__)

GRAMMAR_BACKEND_CHOICES = ("xgrammar", "outlines", "llguidance", "none")
GRAMMAR_FIELDS = ("json_schema", "regex", "ebnf", "structural_tag")
_BITS = 32


class GrammarUnavailableError(ValueError):
    """The server cannot compile grammars (no backend, or its package is missing)."""


def grammar_key(params: Any) -> tuple[str, str] | None:
    """(kind, spec) of the one constraint a SamplingParams sets, or None."""
    for name in GRAMMAR_FIELDS:
        value = getattr(params, name)
        if value is not None:
            return name, value
    return None


class Grammar:
    """One request's matcher over a compiled grammar."""

    def __init__(self, matcher: Any):
        self.matcher = matcher

    def accept_token(self, token: int) -> bool:
        return bool(self.matcher.accept_token(token))

    def is_terminated(self) -> bool:
        return bool(self.matcher.is_terminated())

    def fill_bitmask(self, bitmask: torch.Tensor, row: int) -> None:
        self.matcher.fill_next_token_bitmask(bitmask, row)


class GrammarBackend:
    """Compiles grammars for one tokenizer and vocabulary (xgrammar)."""

    def __init__(self, tokenizer: Any, vocab_size: int, stop_token_ids: set[int],
                 any_whitespace: bool = True):
        import xgrammar as xgr

        self.xgr = xgr
        info = xgr.TokenizerInfo.from_huggingface(tokenizer, vocab_size=vocab_size,
                                                  stop_token_ids=sorted(stop_token_ids))
        self.compiler = xgr.GrammarCompiler(info, max_threads=1)
        self.any_whitespace = any_whitespace
        self.vocab_size = vocab_size
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="grammar")
        self.compiled: dict[tuple[str, str], Future] = {}

    def submit(self, key: tuple[str, str]) -> Future:
        """The compilation of `key` (kind, spec), started now unless one is cached."""
        future = self.compiled.get(key)
        if future is None:
            future = self.executor.submit(self._compile, key)
            self.compiled[key] = future
        return future

    def _compile(self, key: tuple[str, str]) -> Any:
        kind, spec = key
        try:
            if kind == "json_schema":
                return self.compiler.compile_json_schema(spec,
                                                         any_whitespace=self.any_whitespace)
            if kind == "regex":
                return self.compiler.compile_regex(spec)
            if kind == "structural_tag":
                return self.compiler.compile_structural_tag(*_structural_tag_args(spec))
            return self.compiler.compile_grammar(spec)
        except Exception as e:  # noqa: BLE001 - the client's grammar is at fault
            raise ValueError(f"Invalid {kind}: {_clean(e)}") from None

    def new_grammar(self, compiled: Any) -> Grammar:
        return Grammar(self.xgr.GrammarMatcher(compiled))


def _structural_tag_args(spec: str) -> tuple:
    """xgrammar's arguments for a structural tag: its JSON (`{"format": ...}`), or upstream's
    legacy form `{"structures": [{"begin", "schema", "end"}], "triggers": [...]}`."""
    import xgrammar as xgr

    tag = json.loads(spec)
    if not isinstance(tag, dict) or "structures" not in tag:
        return (spec,)
    items = [xgr.StructuralTagItem(begin=s["begin"], schema=json.dumps(s.get("schema") or {}),
                                   end=s["end"]) for s in tag["structures"]]
    new_tag = xgr.StructuralTag.from_legacy_structural_tag(items, tag["triggers"])
    new_tag.format.at_least_one = bool(tag.get("at_least_one", False))
    return (new_tag,)


def _clean(error: Exception) -> str:
    """The message of a compiler error, without its C++ source location."""
    return re.sub(r"^\[[\d:]+\] \S+:\d+: ", "", str(error)).strip()


def create_grammar_backend(name: str, tokenizer: Any, vocab_size: int, stop_token_ids: set[int],
                           any_whitespace: bool) -> tuple[GrammarBackend | None, str | None]:
    """(backend, None), or (None, why a grammar request is refused)."""
    if name == "none":
        return None, "Grammar-constrained decoding is off (--grammar-backend none)."
    if name != "xgrammar":
        return None, (f"The grammar backend {name!r} is not installed in sglab; use "
                      "--grammar-backend xgrammar.")
    if tokenizer is None:
        return None, "Grammar-constrained decoding needs a tokenizer (--skip-tokenizer-init)."
    try:
        return GrammarBackend(tokenizer, vocab_size, stop_token_ids, any_whitespace), None
    except ImportError:
        return None, ("The grammar backend 'xgrammar' is not installed: pip install "
                      "sglab[structured] (xgrammar) to use json_schema, regex or ebnf.")


@dataclass
class VocabMask:
    """The batch's allowed tokens this step: a bitmask [bs, ceil(vocab / 32)] int32 on the
    device (bit t % 32 of word t // 32; rows without a grammar allow everything).

    Built just before sampling, from the grammars as they stand then: under overlap a decode
    step's forward is launched first and its mask built once the previous step's tokens were
    accepted. A row whose grammar already terminated (its request finished on the previous
    step; the extra token is dropped) allows everything; a row whose grammar fails to fill its
    mask allows everything too, and `errors` names it (its request is aborted)."""

    bitmask: torch.Tensor
    errors: dict[int, Exception] = field(default_factory=dict)

    @classmethod
    def from_grammars(cls, grammars: list[Grammar | None], vocab_size: int,
                      device: torch.device | str) -> "VocabMask":
        num_words = (vocab_size + _BITS - 1) // _BITS
        host = torch.full((len(grammars), num_words), -1, dtype=torch.int32)
        errors: dict[int, Exception] = {}
        for row, grammar in enumerate(grammars):
            if grammar is None or grammar.is_terminated():
                continue
            try:
                grammar.fill_bitmask(host, row)
            except Exception as e:  # noqa: BLE001 - fails this row's request only
                host[row] = -1
                errors[row] = e
        return cls(upload_bitmask(host, device), errors)

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        shifts = torch.arange(_BITS, device=logits.device, dtype=torch.int32)
        bits = (self.bitmask.unsqueeze(-1) >> shifts) & 1
        allowed = bits.view(self.bitmask.shape[0], -1)[:, :logits.shape[-1]].bool()
        return logits.masked_fill(~allowed, float("-inf"))


def upload_bitmask(host: torch.Tensor, device: torch.device | str) -> torch.Tensor:
    """The mask's one H2D copy (pinned, non_blocking), on the current stream: the sampler that
    reads it runs on the same stream, behind the copy (see `managers/overlap_utils.py`)."""
    return h2d(host, torch.int32, device, pin=True)
