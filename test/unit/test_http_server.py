"""The HTTP layer without a server: OpenAPI operation ids, profiler paths, per-choice seeds,
invalid Unicode, and the cleanup of IPC directories left by killed servers."""

from __future__ import annotations

import os
import tempfile
import warnings

import psutil
import pytest
from sglab.srt.entrypoints import engine
from sglab.srt.entrypoints.http_server import app
from sglab.srt.entrypoints.openai.serving_base import choice_seed, per_choice_params
from sglab.srt.managers.io_struct import invalid_unicode_path
from sglab.srt.managers.tokenizer_manager import resolve_profile_dir


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
    params = {"temperature": 1.0, "sampling_seed": 7}
    assert [p["sampling_seed"] for p in per_choice_params(params, 3)] == seeds[:3]
    assert per_choice_params({"temperature": 1.0}, 2) == [{"temperature": 1.0}] * 2


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
