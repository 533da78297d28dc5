"""The HTTP layer without a server: OpenAPI operation ids, profiler paths, parallel samples,
invalid Unicode, and the cleanup of IPC directories left by killed servers."""

from __future__ import annotations

import os
import tempfile
import warnings

import psutil
import pytest
from sglab.srt.entrypoints import engine
from sglab.srt.entrypoints.http_server import app
from sglab.srt.managers.io_struct import TokenizedGenerateReqInput, invalid_unicode_path
from sglab.srt.managers.tokenizer_manager import (
    parallel_samples,
    prefill_only,
    resolve_profile_dir,
)
from sglab.srt.sampling.sampling_params import SamplingParams, choice_seed


def test_openapi_operation_ids_are_unique():
    app.openapi_schema = None
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        schema = app.openapi()
    assert not [w for w in caught if "Duplicate Operation ID" in str(w.message)]
    ids = [op["operationId"] for path in schema["paths"].values() for op in path.values()]
    assert len(ids) == len(set(ids))
    assert {"get", "post"} <= set(schema["paths"]["/flush_cache"])


def test_profile_dirs_resolve_inside_the_root(tmp_path, monkeypatch):
    root = tmp_path / "traces"
    root.mkdir()
    monkeypatch.setenv("SGLANG_TORCH_PROFILER_DIR", str(root))
    assert resolve_profile_dir(None) == str(root)
    assert resolve_profile_dir("a/b") == str(root / "a" / "b") and (root / "a" / "b").is_dir()
    assert resolve_profile_dir(str(root / "c")) == str(root / "c")
    os.symlink(tmp_path, root / "link")
    for bad in ("..", "../x", str(tmp_path), "/etc", "link/escaped", "a/../../x", "x\0y"):
        with pytest.raises(ValueError):
            resolve_profile_dir(bad)
    assert not (tmp_path / "x").exists() and not (tmp_path / "escaped").exists()


def test_choice_seeds_are_distinct_stable_and_in_int64():
    seeds = [choice_seed(7, i) for i in range(64)]
    assert seeds[0] == 7 and len(set(seeds)) == 64
    assert seeds == [choice_seed(7, i) for i in range(64)]
    assert all(0 <= s < 2**63 for s in seeds[1:])
    # Neighbouring request seeds do not share choices (as seed + index would).
    assert not set(seeds) & {choice_seed(8, i) for i in range(64)}


def _req(rid: str, seed: int | None) -> TokenizedGenerateReqInput:
    params = SamplingParams(temperature=1.0, sampling_seed=seed, max_new_tokens=5,
                            min_new_tokens=2)
    return TokenizedGenerateReqInput(rid=rid, input_text=None, input_ids=[1, 2],
                                     sampling_params=params, return_logprob=True)


def test_parallel_samples_are_prompt_major_with_choice_seeds():
    samples = parallel_samples([_req("a", 7), _req("b", None)], 3)
    assert [s.rid for s in samples] == ["a-0", "a-1", "a-2", "b-0", "b-1", "b-2"]
    assert [s.sampling_params.sampling_seed for s in samples[:3]] == \
        [choice_seed(7, j) for j in range(3)]
    assert all(s.sampling_params.sampling_seed is None for s in samples[3:])
    assert len({id(s.sampling_params) for s in samples}) == 6  # no shared mutable params


def test_prefill_only_asks_for_no_token_and_leaves_the_request_alone():
    req = _req("a", 7)
    prefill = prefill_only(req)
    assert prefill.rid != "a" and prefill.input_ids == req.input_ids
    assert prefill.sampling_params.max_new_tokens == 0 and not prefill.return_logprob
    assert req.sampling_params.max_new_tokens == 5 and req.sampling_params.min_new_tokens == 2


def test_invalid_unicode_is_found_with_its_path():
    assert invalid_unicode_path({"input_ids": list(range(1000)), "t": "\U0001F600",
                                 "n": float("nan"), "big": 2**80}) is None
    assert invalid_unicode_path("\ud800") == "body"
    assert invalid_unicode_path({"m": [{"c": "ok"}, {"c": ["x", "a\udfffb"]}]}) == "m.1.c.1"
    assert invalid_unicode_path({"kw": {"\ud800": 1}}) == "kw.\\ud800"


def _ipc_dir(tmp_path, name: str, owner: str | None) -> str:
    path = tmp_path / name
    path.mkdir()
    (path / "tokenizer").write_text("")
    if owner is not None:
        (path / "owner").write_text(owner)
    return str(path)


def test_stale_ipc_dirs_of_dead_owners_are_removed(tmp_path, monkeypatch):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    me = psutil.Process()
    dead = psutil.Popen(["true"])
    dead.wait()
    live = _ipc_dir(tmp_path, "sglab-ipc-live", f"{me.pid} {me.create_time()}")
    gone = _ipc_dir(tmp_path, "sglab-ipc-gone", f"{dead.pid} 1.0")
    reused = _ipc_dir(tmp_path, "sglab-ipc-reused", f"{me.pid} {me.create_time() - 100}")
    unowned = _ipc_dir(tmp_path, "sglab-ipc-unowned", None)
    other = _ipc_dir(tmp_path, "not-sglab", f"{dead.pid} 1.0")
    assert sorted(engine.remove_stale_ipc_dirs()) == sorted([gone, reused])
    assert [os.path.exists(p) for p in (live, gone, reused, unowned, other)] == \
        [True, False, False, True, True]
