"""Per-request sampling parameters, with upstream SGLang's names and defaults."""

from __future__ import annotations

import hashlib
import math
import re
from dataclasses import asdict, dataclass, field
from typing import Any

try:
    from re import _parser as _regex_parser
except ImportError:  # Python < 3.11
    import sre_parse as _regex_parser

_SAMPLING_EPS = 1e-6
TOP_K_ALL = 1 << 30
INT64_MIN, INT64_MAX = -(1 << 63), (1 << 63) - 1
_DERIVED = ("stop_strs", "stop_str_max_len", "stop_regex_strs", "stop_regex_max_len")
MAX_LEN = 2**30  # get_max_seq_length of a pattern with no bound (`*`, `+`, `{n,}`)
_FLOAT_PARAMS = ("temperature", "top_p", "min_p", "frequency_penalty", "presence_penalty",
                 "repetition_penalty")


@dataclass
class SamplingParams:
    max_new_tokens: int | None = 128
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    stop_regex: Any = None
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    min_p: float = 0.0
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    repetition_penalty: float = 1.0
    min_new_tokens: int = 0
    n: int = 1
    json_schema: Any = None
    regex: Any = None
    ebnf: Any = None
    structural_tag: Any = None
    ignore_eos: bool = False
    skip_special_tokens: bool = True
    spaces_between_special_tokens: bool = True
    no_stop_trim: bool = False
    custom_params: Any = None
    stream_interval: int | None = None
    logit_bias: Any = None
    sampling_seed: int | None = None
    # Derived in normalize(): the stop strings as a list, and the longest one in tokens.
    stop_strs: list[str] = field(default_factory=list, repr=False)
    stop_str_max_len: int = 0
    stop_regex_strs: list[str] = field(default_factory=list, repr=False)
    stop_regex_max_len: int = 0

    @classmethod
    def from_dict(cls, d: dict | None) -> "SamplingParams":
        d = dict(d or {})
        known = {k for k in cls.__dataclass_fields__ if k not in _DERIVED}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"Unknown sampling parameter(s): {', '.join(unknown)}")
        return cls(**d)

    def to_dict(self) -> dict:
        d = asdict(self)
        for name in _DERIVED:
            d.pop(name)
        return d

    def verify(self, vocab_size: int | None = None) -> None:
        """Raise ValueError with a message naming the parameter when a value is out of range.

        Whatever passes is representable where the scheduler puts it: floats are finite,
        `sampling_seed` is a signed 64-bit integer (the device hashes it as int64; OpenAI's
        `seed` and vLLM use the same range).
        """
        _check_type("max_new_tokens", self.max_new_tokens, int, allow_none=True)
        if self.max_new_tokens is not None and self.max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be at least 0, got {self.max_new_tokens}.")
        for name in _FLOAT_PARAMS:
            _check_finite(name, getattr(self, name))
        if self.temperature < 0.0:
            raise ValueError(f"temperature must be non-negative, got {self.temperature}.")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}.")
        _check_type("top_k", self.top_k, int)
        if self.top_k < 1 and self.top_k != -1:
            raise ValueError(f"top_k must be -1 (disable) or at least 1, got {self.top_k}.")
        if not 0.0 <= self.min_p <= 1.0:
            raise ValueError(f"min_p must be in [0, 1], got {self.min_p}.")
        _check_type("min_new_tokens", self.min_new_tokens, int)
        if self.min_new_tokens < 0:
            raise ValueError(f"min_new_tokens must be at least 0, got {self.min_new_tokens}.")
        if self.max_new_tokens is not None and self.min_new_tokens > self.max_new_tokens:
            raise ValueError(
                f"min_new_tokens must be <= max_new_tokens, got {self.min_new_tokens} > "
                f"{self.max_new_tokens}."
            )
        if not -2.0 <= self.frequency_penalty <= 2.0:
            raise ValueError(f"frequency_penalty must be in [-2, 2], got {self.frequency_penalty}.")
        if not -2.0 <= self.presence_penalty <= 2.0:
            raise ValueError(f"presence_penalty must be in [-2, 2], got {self.presence_penalty}.")
        if not 0.0 < self.repetition_penalty <= 2.0:
            raise ValueError(
                f"repetition_penalty must be in (0, 2], got {self.repetition_penalty}."
            )
        if self.n != 1:
            raise ValueError(f"n must be 1, got {self.n}.")
        self._verify_grammar()
        self._verify_stop_regex()
        _check_type("sampling_seed", self.sampling_seed, int, allow_none=True)
        if self.sampling_seed is not None and not INT64_MIN <= self.sampling_seed <= INT64_MAX:
            raise ValueError(f"sampling_seed must be a 64-bit signed integer, in [{INT64_MIN}, "
                             f"{INT64_MAX}], got {self.sampling_seed}.")
        self._verify_stop()
        self._verify_logit_bias(vocab_size)

    def _verify_stop(self) -> None:
        stop = self.stop
        if stop is not None and not isinstance(stop, str):
            if not isinstance(stop, list) or not all(isinstance(s, str) for s in stop):
                raise ValueError("stop must be a string or a list of strings.")
        if self.stop_token_ids is not None:
            ids = self.stop_token_ids
            if not isinstance(ids, list) or not all(_is_int(t) for t in ids):
                raise ValueError("stop_token_ids must be a list of integers.")
            # An id outside the vocabulary is never sampled, so never stops: upstream accepts it.
            if any(not INT64_MIN <= t <= INT64_MAX for t in ids):
                raise ValueError("stop_token_ids must be 64-bit signed integers.")

    def _verify_stop_regex(self) -> None:
        for pattern in _as_list(self.stop_regex):
            if not isinstance(pattern, str):
                raise ValueError("stop_regex must be a string or a list of strings.")
            try:
                re.compile(pattern)
            except re.error as e:
                raise ValueError(f"stop_regex {pattern!r} is not a valid regular expression: "
                                 f"{e}.") from None

    def _verify_grammar(self) -> None:
        grammars = [name for name in ("json_schema", "regex", "ebnf", "structural_tag")
                    if getattr(self, name) is not None]
        if len(grammars) > 1:  # upstream's wording
            raise ValueError("Only one of regex, json_schema, or ebnf can be set.")
        for name in grammars:
            if not isinstance(getattr(self, name), str):
                raise ValueError(f"{name} must be a string.")

    def _verify_logit_bias(self, vocab_size: int | None) -> None:
        """{token id (a decimal string, as JSON keys are, or an int): finite bias}."""
        bias = self.logit_bias
        if bias is None:
            return
        if not isinstance(bias, dict):
            raise ValueError("logit_bias must be an object mapping token ids to biases.")
        for token_id, value in bias.items():
            token = _token_id(token_id)
            if token is None:
                raise ValueError(f"logit_bias keys must be token ids, got {token_id!r}.")
            if vocab_size is not None and not 0 <= token < vocab_size:
                raise ValueError(
                    f"logit_bias must has keys in [0, {vocab_size - 1}], got {token_id}.")
            _check_finite(f"logit_bias[{token_id!r}]", value)

    def normalize(self, tokenizer: Any | None) -> None:
        """Greedy rewrite and stop-string bookkeeping, as upstream does at request arrival."""
        if 0.0 <= self.temperature < _SAMPLING_EPS:
            self.temperature = 1.0
            self.top_k = 1
        if self.top_k == -1:
            self.top_k = TOP_K_ALL
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        self.stop_strs = [s for s in stops if s]
        self.stop_regex_strs = [p for p in _as_list(self.stop_regex) if p]
        if self.stop_regex_strs:
            self.stop_regex_max_len = max(get_max_seq_length(p) for p in self.stop_regex_strs)
        if self.stop_strs:
            if tokenizer is None:
                self.stop_str_max_len = max(len(s) for s in self.stop_strs)
            else:
                self.stop_str_max_len = max(
                    len(tokenizer.encode(s, add_special_tokens=False)) for s in self.stop_strs
                )


def get_max_seq_length(regex_str: str) -> int:
    """The longest string (in characters) regex_str can match; MAX_LEN when unbounded."""
    return min(_regex_parser.parse(regex_str).getwidth()[1], MAX_LEN)


def choice_seed(seed: int, index: int) -> int:
    """The seed of sample `index` of a request seeded with `seed`.

    Sample 0 keeps the request's seed, so n=1 and the first of n samples agree; the others get
    a seed hashed from (seed, index) in [0, 2**63), so they differ from each other and from
    the samples of a request seeded seed+1 (vLLM's seed+index would collide there).
    """
    if index == 0:
        return seed
    digest = hashlib.blake2b(f"{seed}:{index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def _as_list(value: Any) -> list:
    if value is None:
        return []
    return value if isinstance(value, list) else [value]


def _token_id(key: Any) -> int | None:
    if _is_int(key):
        return key
    if isinstance(key, str) and key.strip().lstrip("-").isdecimal():
        return int(key)
    return None


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _check_type(name: str, value: Any, types: Any, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, types):
        raise ValueError(f"{name} has the wrong type: {type(value).__name__}.")


def _check_finite(name: str, value: Any) -> None:
    _check_type(name, value, (int, float))
    try:
        finite = math.isfinite(value)
    except OverflowError:  # an int beyond the float range
        finite = False
    if not finite:
        raise ValueError(f"{name} must be a finite number, got {value}.")
