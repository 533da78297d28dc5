"""Incremental detokenization: streamed deltas add up to a full decode, never leak a partial
UTF-8 character, honour skip_special_tokens, and trim a matched stop string or token."""

from __future__ import annotations

import random

import pytest
from sglab.srt.managers.detokenizer_manager import (
    IncrementalDetokenizer,
    find_printable_text,
    stop_prefix_len,
)
from sglab.srt.managers.io_struct import BatchTokenIDOutput
from sglab.srt.utils.dummy_model import make_dummy_model

TEXTS = [
    "Hello world, this is a plain ASCII sentence.",
    "Crème brûlée à la française: naïve café ☕ and déjà vu.",
    "中文测试：你好，世界！日本語のテキストも。",
    "Emoji 🎉🚀👩‍👩‍👧 mixed with text 😀 and more 🧪.",
    "Line one\nLine two\n\n  indented   spaces\ttab",
]


@pytest.fixture(scope="module", params=["tiny-qwen3", "tiny-llama"])
def tokenizer(request, tmp_path_factory):
    from transformers import AutoTokenizer

    path = make_dummy_model(request.param, str(tmp_path_factory.mktemp(request.param)))
    return AutoTokenizer.from_pretrained(path)


def _msg(rids, deltas, finished=None, *, skip=True, stop_strs=None, no_stop_trim=False,
         totals=None):
    n = len(rids)
    return BatchTokenIDOutput(
        rids=list(rids), finished_reasons=finished or [None] * n, output_ids=deltas,
        prompt_tokens=[1] * n, completion_tokens=totals or [len(d) for d in deltas],
        cached_tokens=[0] * n, skip_special_tokens=[skip] * n,
        spaces_between_special_tokens=[True] * n, no_stop_trim=[no_stop_trim] * n,
        stop_strs=[list(stop_strs or [])] * n)


def _stream(detok, rid, ids, chunk_sizes, final_reason=None, **kw):
    """Feed `ids` in chunks; return the list of text deltas (the last message finishes)."""
    deltas, pos, k = [], 0, 0
    while pos < len(ids):
        size = chunk_sizes[k % len(chunk_sizes)]
        k += 1
        chunk = ids[pos:pos + size]
        pos += size
        reason = (final_reason or {"type": "length", "length": len(ids)}) \
            if pos >= len(ids) else None
        deltas.append(detok.decode(_msg([rid], [chunk], [reason], **kw))[0])
    return deltas


@pytest.mark.parametrize("text", TEXTS)
@pytest.mark.parametrize("chunks", [[1], [2], [3, 1, 5]])
def test_deltas_add_up_and_never_show_partial_characters(tokenizer, text, chunks):
    ids = tokenizer.encode(text, add_special_tokens=False)
    assert len(ids) > len(text) // 4  # the tiny vocab splits characters into byte tokens
    detok = IncrementalDetokenizer(tokenizer)
    deltas = _stream(detok, "r", ids, chunks)
    assert "".join(deltas) == tokenizer.decode(ids) == text
    for delta in deltas:
        assert "\ufffd" not in delta
    cumulative = ""
    for delta in deltas:
        cumulative += delta
        assert text.startswith(cumulative)
    assert detok.decode_status == {}


def test_multibyte_character_is_held_until_complete(tokenizer):
    ids = tokenizer.encode("🎉", add_special_tokens=False)
    assert len(ids) > 1, "the emoji must span several byte tokens for this test"
    detok = IncrementalDetokenizer(tokenizer)
    deltas = _stream(detok, "r", ids, [1])
    assert deltas[:-1] == [""] * (len(ids) - 1)
    assert deltas[-1] == "🎉"


def test_random_ids_add_up_to_full_decode(tokenizer):
    rng = random.Random(0)
    vocab = len(tokenizer)
    for trial in range(20):
        ids = [rng.randrange(vocab) for _ in range(rng.randrange(1, 40))]
        detok = IncrementalDetokenizer(tokenizer)
        deltas = _stream(detok, f"r{trial}", ids, [rng.randrange(1, 4)])
        assert "".join(deltas) == tokenizer.decode(ids, skip_special_tokens=True)


@pytest.mark.parametrize("skip", [True, False])
def test_special_tokens_follow_skip_special_tokens(tokenizer, skip):
    special = tokenizer.convert_tokens_to_ids(tokenizer.eos_token)
    ids = tokenizer.encode("Hi there", add_special_tokens=False)
    ids = ids[:2] + [special] + ids[2:] + [special]
    detok = IncrementalDetokenizer(tokenizer)
    text = "".join(_stream(detok, "r", ids, [1], skip=skip))
    assert text == tokenizer.decode(ids, skip_special_tokens=skip)
    assert (tokenizer.eos_token in text) is not skip


def test_interleaved_requests_are_independent(tokenizer):
    a = tokenizer.encode(TEXTS[1], add_special_tokens=False)
    b = tokenizer.encode(TEXTS[3], add_special_tokens=False)
    detok = IncrementalDetokenizer(tokenizer)
    got = {"a": "", "b": ""}
    for step in range(max(len(a), len(b))):
        rids, deltas, reasons = [], [], []
        for rid, ids in (("a", a), ("b", b)):
            if step < len(ids):
                rids.append(rid)
                deltas.append([ids[step]])
                reasons.append({"type": "length"} if step == len(ids) - 1 else None)
        for rid, text in zip(rids, detok.decode(_msg(rids, deltas, reasons))):
            got[rid] += text
    assert got == {"a": TEXTS[1], "b": TEXTS[3]}
    assert detok.decode_status == {}


def _ids_until(tokenizer, text, stop):
    """Token ids of `text`, cut at the first token whose decode contains `stop`."""
    ids = tokenizer.encode(text, add_special_tokens=False)
    for n in range(1, len(ids) + 1):
        if stop in tokenizer.decode(ids[:n]):
            return ids[:n]
    raise AssertionError("stop string not in text")


@pytest.mark.parametrize("no_stop_trim", [False, True])
def test_matched_stop_string_is_trimmed_and_never_streamed(tokenizer, no_stop_trim):
    text, stop = "The answer is 42. Question: what is next?", "Question"
    ids = _ids_until(tokenizer, text, stop)
    detok = IncrementalDetokenizer(tokenizer)
    reason = {"type": "stop", "matched": stop}
    deltas = _stream(detok, "r", ids, [1], final_reason=reason, stop_strs=[stop],
                     no_stop_trim=no_stop_trim)
    full = tokenizer.decode(ids)
    expected = full if no_stop_trim else full[:full.index(stop)]
    assert "".join(deltas) == expected
    if not no_stop_trim:
        streamed = "".join(deltas[:-1])
        assert expected.startswith(streamed)
        assert "Q" not in streamed


def test_held_back_stop_prefix_is_released_when_it_does_not_match(tokenizer):
    text = "Ques and Quest but never the full word."
    ids = tokenizer.encode(text, add_special_tokens=False)
    detok = IncrementalDetokenizer(tokenizer)
    deltas = _stream(detok, "r", ids, [1], stop_strs=["Question"])
    assert "".join(deltas) == text


@pytest.mark.parametrize("no_stop_trim", [False, True])
def test_matched_stop_token_is_trimmed_from_text(tokenizer, no_stop_trim):
    ids = tokenizer.encode("Hello world.", add_special_tokens=False)
    stop_id = ids[-1]
    detok = IncrementalDetokenizer(tokenizer)
    reason = {"type": "stop", "matched": stop_id}
    text = "".join(_stream(detok, "r", ids, [2], final_reason=reason,
                           no_stop_trim=no_stop_trim))
    assert text == tokenizer.decode(ids if no_stop_trim else ids[:-1])


def test_finish_without_new_tokens_and_abort(tokenizer):
    detok = IncrementalDetokenizer(tokenizer)
    assert detok.decode(_msg(["r"], [[]], [{"type": "length", "length": 0}])) == [""]
    ids = tokenizer.encode("abc def", add_special_tokens=False)
    first = detok.decode(_msg(["s"], [ids]))[0]
    last = detok.decode(_msg(["s"], [[]], [{"type": "abort", "message": "Abort request."}]))[0]
    assert first + last == "abc def"
    assert detok.decode_status == {}


def test_find_printable_text():
    assert find_printable_text("hello wor") == "hello "
    assert find_printable_text("line\n") == "line\n"
    assert find_printable_text("你好") == "你好"
    assert find_printable_text("你a") == "你"
    assert find_printable_text("nospace") == ""


def test_stop_prefix_len():
    assert stop_prefix_len("abc Que", ["Question"]) == 3
    assert stop_prefix_len("abc", ["Question"]) == 0
    assert stop_prefix_len("xQ", ["Question", "xQz"]) == 2
    assert stop_prefix_len("end", ["d", "nd!"]) == 2
