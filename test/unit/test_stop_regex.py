"""stop_regex: the longest match of a pattern (upstream's get_max_seq_length) bounds the decoded
tail that Req.check_finished searches."""

from __future__ import annotations

import pytest

from sglab.srt.managers.schedule_batch import Req
from sglab.srt.sampling.sampling_params import MAX_LEN, SamplingParams, get_max_seq_length

# Lengths worked out by hand in upstream's test_matched_stop.py.
BOUNDED = {
    "^spec(foo|at)$": 7,
    "(a(bca|de(fg|hi){2,3})j){2}kl": 22,
    "(foo(bar|baz(qux){1,2}))|(x(yz){5,10})": 21,
    "(((a|bc){1,3}(d(e|f){2}|gh){2,4})|(ijk|lmp(no|p){3})){5}": 90,
    "and|or": 3,
}


@pytest.mark.parametrize("pattern,length", sorted(BOUNDED.items()))
def test_bounded_pattern_length(pattern: str, length: int) -> None:
    assert get_max_seq_length(pattern) == length


@pytest.mark.parametrize("pattern", ["((ab|cd(e|f){2}){3,5}g|hij)*k", "abc*?k", r"[.!?]\s*$",
                                     "a{3,}"])
def test_unbounded_pattern_is_max_len(pattern: str) -> None:
    assert get_max_seq_length(pattern) == MAX_LEN


class _CharTokenizer:
    """Token i is chr(ord('a') + i); records how many ids each decode saw."""

    def __init__(self) -> None:
        self.decoded_lens: list[int] = []

    def decode(self, ids: list[int]) -> str:
        self.decoded_lens.append(len(ids))
        return "".join(chr(ord("a") + i) for i in ids)


def _check(pattern: str, output: str) -> tuple[Req, _CharTokenizer]:
    params = SamplingParams(max_new_tokens=100, stop_regex=pattern, ignore_eos=True)
    params.normalize(None)
    req = Req("r", None, [0], params, 0, eos_token_ids=set())
    req.output_ids = [ord(c) - ord("a") for c in output]
    tok = _CharTokenizer()
    req.check_finished(tok, context_len=1000)
    return req, tok


def test_bounded_pattern_searches_only_the_tail() -> None:
    req, tok = _check("c(d|ef)", "ab" * 30 + "cef")
    assert req.finished_reason == {"type": "stop", "matched": "c(d|ef)"}
    assert tok.decoded_lens == [get_max_seq_length("c(d|ef)") + 1]


def test_unbounded_pattern_searches_all_the_output() -> None:
    req, tok = _check("a+c", "a" * 40 + "c")
    assert req.finished_reason is not None
    assert tok.decoded_lens == [41]


def test_no_match_keeps_running() -> None:
    req, _ = _check("c(d|ef)", "ab" * 30 + "ce")
    assert req.finished_reason is None
