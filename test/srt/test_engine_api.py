"""The offline Engine's API and lifecycle: sync, async and streaming generation, errors that
leave the engine usable, aborts of abandoned streams, startup failures, a dying child, and no
orphan processes after shutdown or interpreter exit."""

from __future__ import annotations

import asyncio
import math
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import psutil
import pytest
from conftest import alive_pids, check_default_patch_status
from sglab import Engine
from sglab.srt.managers.tokenizer_manager import EngineDeadError
from sglab.srt.utils.dummy_model import get_default_model_path, make_dummy_model
from sglab.test.runners import SchedulerRunner

GREEDY = {"temperature": 0, "max_new_tokens": 8, "ignore_eos": True}
LONG = {"max_new_tokens": 3500, "ignore_eos": True}
REPO = Path(__file__).resolve().parents[2]


def _children() -> list[int]:
    """This process's sglab children (not multiprocessing's shared resource tracker)."""
    pids = []
    for p in psutil.Process().children(recursive=True):
        try:
            if p.name().startswith("sglab::"):
                pids.append(p.pid)
        except psutil.Error:
            pass
    return pids


def _wait_pool_full(engine: Engine, timeout: float = 30.0) -> dict:
    deadline = time.time() + timeout
    while time.time() < deadline:
        info = engine.get_server_info()
        if info["num_running_reqs"] == 0 and info["num_waiting_reqs"] == 0:
            assert info["available_kv_tokens"] + info["evictable_kv_tokens"] == \
                info["max_total_num_tokens"]
            return info
        time.sleep(0.1)
    raise AssertionError("engine not idle")


@pytest.fixture(scope="module")
def engine():
    before = set(_children())
    eng = Engine(model_path=get_default_model_path(), log_level="warning")
    pids = [p for p in _children() if p not in before]
    yield eng
    eng.shutdown()
    eng.shutdown()  # idempotent
    assert alive_pids(pids) == []


def test_sync_async_and_stream_agree(engine):
    single = engine.generate("Hello there", GREEDY)
    batch = engine.generate(["Hello there", "Bye"], GREEDY)
    assert batch[0]["output_ids"] == single["output_ids"]
    assert len(single["output_ids"]) == 8 and single["meta_info"]["finish_reason"]["type"] == \
        "length"

    async def run():
        one = await engine.async_generate("Hello there", GREEDY)
        stream = await engine.async_generate("Hello there", GREEDY, stream=True)
        outs = [o async for o in stream]
        return one, outs

    one, outs = asyncio.run(run())
    assert one["output_ids"] == single["output_ids"]
    assert outs[-1]["text"] == single["text"]
    assert all(o["meta_info"]["finish_reason"] is None for o in outs[:-1])
    streamed = list(engine.generate("Hello there", GREEDY, stream=True))
    assert streamed[-1]["output_ids"] == single["output_ids"]


def test_input_errors_raise_and_engine_keeps_working(engine):
    with pytest.raises(ValueError, match="top_p"):
        engine.generate("x", {"top_p": 5})
    with pytest.raises(ValueError, match="out of the vocabulary"):
        engine.generate(input_ids=[10**9])
    with pytest.raises(ValueError, match="Exactly one of"):
        engine.generate()
    assert engine.generate("x", {"max_new_tokens": 2})["meta_info"]["completion_tokens"] == 2


def _bad_requests(vocab: int, max_input: int) -> list[dict]:
    ids = [1, 2, 3]
    return [
        {"input_ids": [vocab]},
        {"input_ids": [1] * (max_input + 1)},
        {"input_ids": ids, "sampling_params": {"top_p": 5}},
        {"input_ids": ids, "sampling_params": {"stream_interval": 2}},
        {"input_ids": ids, "sampling_params": {"ignore_eos": 1}},
        {"input_ids": ids, "return_logprob": True, "logprob_start_len": 3},
        {"input_ids": ids, "return_logprob": True, "top_logprobs_num": vocab + 1},
        {"input_ids": ids, "lora_path": "a"},
    ]


def test_engine_and_scheduler_refuse_the_same_requests_alike(engine):
    """One validator: what the TokenizerManager refuses, the scheduler (reached by any other
    sender) refuses with the same message."""
    info = engine.scheduler_info
    runner = SchedulerRunner(model_path=get_default_model_path())
    for kwargs in _bad_requests(info["vocab_size"], info["max_req_input_len"]):
        with pytest.raises(ValueError) as refused:
            engine.generate(**kwargs)
        rid = runner.submit(kwargs.pop("input_ids"), kwargs.pop("sampling_params", None),
                            **kwargs)
        reason = runner.collect()[rid].finish_reason
        assert reason["status_code"] == 400 and reason["message"] == str(refused.value)
    assert engine.generate("x", {"max_new_tokens": 2})["meta_info"]["completion_tokens"] == 2


def test_abandoned_stream_is_aborted(engine):
    assert engine.flush_cache().success
    stream = engine.generate("an abandoned stream", LONG, stream=True)
    first = next(stream)
    assert first["meta_info"]["finish_reason"] is None
    stream.close()
    info = _wait_pool_full(engine)
    assert info["evictable_kv_tokens"] < 3500  # a finished request would have cached more


def test_logprobs_through_engine(engine):
    out = engine.generate("Hi", GREEDY, return_logprob=True, logprob_start_len=0,
                          top_logprobs_num=2)
    meta = out["meta_info"]
    assert [t for _, t, _ in meta["output_token_logprobs"]] == out["output_ids"]
    assert len(meta["input_token_logprobs"]) == meta["prompt_tokens"]
    assert all(len(top) == 2 for top in meta["output_top_logprobs"])


def test_score_through_engine(engine):
    """Engine.score is /v1/score's computation: the label probabilities of the first output
    position, which /generate's token_ids_logprob reports too."""
    labels = [4, 9, 30]
    scores = engine.score(query="The test was", items=[" fine", " hard"],
                          label_token_ids=labels)
    for item, row in zip([" fine", " hard"], scores):
        out = engine.generate("The test was" + item, {"max_new_tokens": 1, "temperature": 0},
                              return_logprob=True, token_ids_logprob=labels)
        want = [math.exp(lp) for lp, _, _ in out["meta_info"]["output_token_ids_logprobs"][0]]
        assert row == pytest.approx(want, rel=1e-6)
    soft = engine.score(query="The test was", items=[" fine"], label_token_ids=labels,
                        apply_softmax=True)
    assert soft[0] == pytest.approx([s / sum(scores[0]) for s in scores[0]], rel=1e-5)


def test_scheduler_start_failure_is_a_clear_error(tmp_path):
    path = make_dummy_model("tiny-qwen3", str(tmp_path / "no-weights"), weights=False)
    before = set(_children())
    with pytest.raises(RuntimeError, match="scheduler failed to start"):
        Engine(model_path=path, load_format="safetensors", log_level="error")
    time.sleep(0.5)
    assert alive_pids([p for p in _children() if p not in before]) == []


def test_dying_scheduler_fails_pending_and_later_requests():
    before = set(_children())
    eng = Engine(model_path=get_default_model_path(), log_level="error")
    try:
        pids = [p for p in _children() if p not in before]
        scheduler = next(psutil.Process(p) for p in pids
                         if psutil.Process(p).name().startswith("sglab::sched"))
        stream = eng.generate("doomed", LONG, stream=True)
        next(stream)
        scheduler.kill()
        with pytest.raises(EngineDeadError, match="exited unexpectedly"):
            for _ in stream:
                pass
        with pytest.raises(EngineDeadError):
            eng.generate("after", GREEDY)
    finally:
        eng.shutdown()
    assert alive_pids(pids) == []


def test_interpreter_exit_without_shutdown_leaves_no_orphans(tmp_path):
    script = tmp_path / "run.py"
    script.write_text(textwrap.dedent(f"""
        import psutil
        from sglab import Engine
        if __name__ == "__main__":
            engine = Engine(model_path={get_default_model_path()!r}, log_level="error")
            print(engine.generate("hi", {{"max_new_tokens": 2}})["meta_info"]["completion_tokens"])
            kids = psutil.Process().children(recursive=True)
            print(" ".join(str(p.pid) for p in kids if p.name().startswith("sglab::")))
    """))
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.split("\n")
    assert lines[0] == "2"
    pids = [int(p) for p in lines[1].split()]
    assert len(pids) == 2  # scheduler and detokenizer
    time.sleep(0.5)
    assert alive_pids(pids) == []


def _run_script(path, text: str) -> subprocess.CompletedProcess:
    path.write_text(text)
    return subprocess.run([sys.executable, str(path)], capture_output=True, text=True,
                          timeout=180, cwd=path.parent)


def test_engine_at_a_scripts_top_level_is_one_clear_error(tmp_path):
    proc = _run_script(tmp_path / "unguarded.py", textwrap.dedent(f"""
        import sglab
        with sglab.Engine(model_path={get_default_model_path()!r}, log_level="error") as e:
            print(e.generate("hi", {{"max_new_tokens": 2}})["text"])
    """))
    out = proc.stdout + proc.stderr
    assert proc.returncode == 1, out
    assert "RuntimeError: sglab.Engine was created at the top level of" in out
    assert out.count('if __name__ == "__main__":') == 1
    assert "bootstrapping phase" not in out and "died" not in out
    assert len(out.splitlines()) < 30, out


def test_readme_offline_snippet_runs_as_a_script(tmp_path):
    readme = (REPO / "README.md").read_text()
    offline = readme[readme.index("Offline, as a complete script"):]
    snippet = offline[offline.index("```python\n") + 10:offline.index("```\n", 10)]
    proc = _run_script(tmp_path / "offline.py", snippet)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "'completion_tokens': 16" in proc.stdout


@pytest.mark.parametrize("prompt,params,message", [
    ("", {}, "empty"),
    ("word " * 5000, {}, "context length"),
    ("x", {"max_new_tokens": -1}, "max_new_tokens"),
    ("x", {"temperature": -0.1}, "temperature"),
    ("x", {"top_p": 0.0}, "top_p"),
    ("x", {"top_p": 1.01}, "top_p"),
])
def test_bad_inputs_are_clear_errors(engine, prompt, params, message):
    with pytest.raises(ValueError, match=message):
        engine.generate(prompt, params)
    out = engine.generate("x", {"max_new_tokens": 2})
    assert set(out["meta_info"]) >= {"id", "prompt_tokens", "completion_tokens",
                                      "cached_tokens", "finish_reason", "e2e_latency"}
    _wait_pool_full(engine)
    assert engine.get_server_info()["internal_states"][0]["integrity_error"] is None


def test_server_info_reports_patch_status(engine):
    check_default_patch_status(engine.get_server_info())


def test_unknown_model_directory(tmp_path):
    from sglab.srt.server_args import ServerArgsError

    with pytest.raises(ServerArgsError, match="--model-path"):
        Engine(model_path=str(tmp_path / "nowhere"))
