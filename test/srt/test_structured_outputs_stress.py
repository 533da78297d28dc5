"""Grammar batches under the overlap loop, stressed through the Engine: n=3 samples of each
prompt (one prefix-caching prefill, then three requests, each with its own matcher) at
temperature 1.0 over several seeds, regex and json_schema mixed in one batch, with schedules
that force merges, chunked prefills and retraction. Every output must be a token sequence its
grammar accepts from the start, and a finished one must match its regex or schema."""

from __future__ import annotations

import json
import re

import pytest

from sglab.srt.constrained.grammar_backend import create_grammar_backend
from sglab.srt.utils.dummy_model import get_default_model_path

pytest.importorskip("xgrammar")
jsonschema = pytest.importorskip("jsonschema")

PHONE = r"\(\d{3}\) \d{3}-\d{4}"
SCHEMA = {"type": "object", "additionalProperties": False, "required": ["ok", "n"],
          "properties": {"ok": {"type": "boolean"}, "n": {"type": "integer", "minimum": 0,
                                                          "maximum": 99}}}
CONSTRAINTS = [("regex", PHONE), ("json_schema", json.dumps(SCHEMA))]
# Prompts of several lengths, two longer than the smallest chunk below.
PROMPTS = ["Generate a phone number:", "JSON:", "a" * 40, "b" * 23 + "c" * 30]
SEEDS = [1, 2, 3]
CONFIGS = {
    "retraction": {"max_total_tokens": 160, "chunked_prefill_size": 16},
    "merges-no-radix": {"max_running_requests": 2, "chunked_prefill_size": 16,
                        "disable_radix_cache": True},
}


@pytest.fixture(scope="module")
def model_path():
    return get_default_model_path()


@pytest.fixture(scope="module")
def grammars(model_path):
    """Fresh matchers of the server's grammars (the same tokenizer, vocabulary, stop ids)."""
    from transformers import AutoConfig, AutoTokenizer, GenerationConfig

    tokenizer = AutoTokenizer.from_pretrained(model_path)
    config = AutoConfig.from_pretrained(model_path)
    stop = {config.eos_token_id, tokenizer.eos_token_id,
            *GenerationConfig.from_pretrained(model_path).eos_token_id} - {None}
    backend, _ = create_grammar_backend("xgrammar", tokenizer, config.vocab_size, stop, False)
    return lambda key: backend.new_grammar(backend.submit(key).result())


def _check(grammars, key: tuple[str, str], out: dict) -> None:
    grammar, ids = grammars(key), out["output_ids"]
    accepted = [grammar.accept_token(t) for t in ids]
    assert all(accepted), (key, ids, accepted.index(False), out["text"])
    reason = out["meta_info"]["finish_reason"]
    assert reason["type"] in ("stop", "length"), reason
    if reason["type"] == "length":
        return
    assert grammar.is_terminated(), (key, ids)
    if key[0] == "regex":
        assert re.fullmatch(PHONE, out["text"]), out["text"]
    else:
        jsonschema.validate(json.loads(out["text"]), SCHEMA)


@pytest.mark.parametrize("config", list(CONFIGS))
def test_n3_samples_follow_their_grammars_under_overlap(model_path, grammars, config):
    from sglab.srt.entrypoints.engine import Engine

    engine = Engine(model_path=model_path, log_level="error", random_seed=0,
                    constrained_json_disable_any_whitespace=True, **CONFIGS[config])
    try:
        retractions = 0
        for seed in SEEDS:
            params = [{"temperature": 1.0, "max_new_tokens": 24, "n": 3,
                       "sampling_seed": seed * 10 + i, CONSTRAINTS[i % 2][0]:
                       CONSTRAINTS[i % 2][1]} for i in range(len(PROMPTS))]
            outs = engine.generate(prompt=PROMPTS, sampling_params=params)
            assert len(outs) == 3 * len(PROMPTS)
            for j, out in enumerate(outs):  # prompt-major: prompt j // 3, sample j % 3
                _check(grammars, CONSTRAINTS[j // 3 % 2], out)
                retractions += out["meta_info"].get("total_retractions", 0)
        state = engine.get_server_info()["internal_states"][0]
        assert state["integrity_error"] is None
        if config == "retraction":
            assert retractions > 0
    finally:
        engine.shutdown()
