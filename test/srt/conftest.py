"""A real `python -m sglab.launch_server` process per test module, on a free port."""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import psutil
import pytest
import requests
from sglab.srt.sampling.custom_logit_processor import CustomLogitProcessor
from sglab.srt.utils import process
from sglab.srt.utils.dummy_model import get_default_model_path
from sglab.srt.utils.process import kill_server

LAUNCH_TIMEOUT_S = 300.0
DEFAULT_SERVER_ARGS = ["--skip-server-warmup"]


@dataclass
class ServerProcess(process.ServerProcess):
    model_path: str = ""
    api_key: str | None = None
    child_pids: list[int] = field(default_factory=list)

    def headers(self) -> dict:
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}


def session() -> requests.Session:
    s = requests.Session()
    s.trust_env = False  # localhost never goes through a proxy
    return s


def popen_launch_server(args: list[str], api_key: str | None = None,
                        timeout: float = LAUNCH_TIMEOUT_S,
                        env: dict | None = None) -> ServerProcess:
    """Start a server on the tiny default model; returns once /health_generate answers 200."""
    model_path = get_default_model_path()
    extra = ["--api-key", api_key] if api_key else []
    env = {"OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"), **(env or {})}
    base = process.popen_launch_server(["--model-path", model_path, *args, *extra], timeout,
                                       env)
    server = ServerProcess(base.process, base.base_url, base.log_path, model_path, api_key)
    server.child_pids = [c.pid for c in psutil.Process(base.process.pid).children(True)]
    return server


# Parity of a multi-rank server against tp=1: prompts, seeded sampling, and the tolerance of
# fp32 logprobs through another reduction order (partial matmuls plus a sum).
PARITY_PROMPTS = [[5, 17, 42, 99, 3, 250, 11], [7, 7, 8, 9], list(range(30, 70))]
SEEDED = {"temperature": 0.8, "top_p": 0.9, "sampling_seed": 3, "max_new_tokens": 16,
          "ignore_eos": True}
LOGPROB_TOL = 1e-4


def close_logprobs(a: list, b: list) -> bool:
    return len(a) == len(b) and all(
        (x is None and y is None) or (x is not None and y is not None
                                      and abs(x - y) <= LOGPROB_TOL) for x, y in zip(a, b))


def assert_matches_tp1(out: dict, ref) -> None:
    """A /generate result (with logprobs, top 2) against the tp=1 SchedulerRunner's."""
    meta = out["meta_info"]
    assert out["output_ids"] == ref.output_ids
    assert close_logprobs([v for v, _, _ in meta["output_token_logprobs"]],
                          ref.logprobs["output_token_logprobs_val"])
    assert close_logprobs([v for v, _, _ in meta["input_token_logprobs"]],
                          ref.logprobs["input_token_logprobs_val"])
    top = [[v for v, _, _ in row] for row in meta["output_top_logprobs"]]
    assert all(close_logprobs(a, b) for a, b in zip(top, ref.logprobs["output_top_logprobs_val"]))


def serve_until_sigterm(args: list[str]):
    """A server for a module's tests; at the end SIGTERM must stop it cleanly, leaving no
    child process (no rank, no controller) behind."""
    import signal

    srv = popen_launch_server(args)
    yield srv
    srv.process.send_signal(signal.SIGTERM)
    code = srv.process.wait(60)
    kill_server(srv)
    assert code == 0, srv.log()[-3000:]
    assert alive_pids(srv.child_pids) == []


def alive_pids(pids: list[int]) -> list[int]:
    """The pids that still run (zombies waiting for their reaper count as gone)."""
    alive = []
    for pid in pids:
        try:
            if psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
                alive.append(pid)
        except psutil.NoSuchProcess:
            pass
    return alive


@pytest.fixture(scope="module")
def server(request):
    """The module's server, from the module's SERVER_ARGS; modules with the default arguments
    share one server for the session."""
    args = getattr(request.module, "SERVER_ARGS", DEFAULT_SERVER_ARGS)
    if args == DEFAULT_SERVER_ARGS:
        yield request.getfixturevalue("shared_server")
        return
    srv = popen_launch_server(args)
    yield srv
    kill_server(srv)


@pytest.fixture(scope="module")
def path(tiny_model_dir):
    """The tiny Qwen3 model of the in-process tests (a module may define its own `path`)."""
    return tiny_model_dir("tiny-qwen3")


@pytest.fixture(scope="module")
def hf(path):
    """HF transformers on `path`: the reference for the model's math."""
    from sglab.test.runners import HFRunner

    return HFRunner(path)


@pytest.fixture(scope="module")
def http():
    s = session()
    yield s
    s.close()


@pytest.fixture(scope="module")
def client(server):
    """The official openai client on the module's server."""
    import openai

    c = openai.OpenAI(base_url=f"{server.base_url}/v1", api_key="unused", max_retries=0,
                      timeout=120)
    yield c
    c.close()


@pytest.fixture(scope="session")
def shared_server(tmp_path_factory):
    """The default server (DEFAULT_SERVER_ARGS) of the session; its profiler traces go to its
    own `profile_dir`."""
    srv = launch_with_profile_dir(DEFAULT_SERVER_ARGS, tmp_path_factory)
    yield srv
    kill_server(srv)


def launch_with_profile_dir(args: list[str], tmp_path_factory) -> ServerProcess:
    profile_dir = str(tmp_path_factory.mktemp("profiles"))
    srv = popen_launch_server(args, env={"SGLANG_TORCH_PROFILER_DIR": profile_dir})
    srv.profile_dir = profile_dir
    return srv


def check_default_patch_status(info: dict) -> None:
    """/get_server_info's `patch_status` for a server with default flags (every patch on, no
    LoRA, no deterministic inference): per registry id, on/off as `active_patches` says, and
    whether this configuration reaches the patch's code."""
    from sglab.srt.patches import PATCHES

    status = info["patch_status"]
    assert list(status) == [p.id for p in PATCHES] == info["active_patches"]
    assert all(set(s) == {"on", "applies", "mode", "reason"} and s["on"] is True
               for s in status.values())
    assert status["0001"] == {"on": True, "applies": True, "mode": "pr", "reason": None}
    assert status["0002"]["applies"] is False and status["0002"]["mode"] == "batched"
    assert "deterministic" in status["0002"]["reason"]
    assert status["0003a"]["applies"] is True and "logprobs" in status["0003a"]["reason"]
    assert status["0004"]["applies"] is False and "--enable-hisparse" in status["0004"]["reason"]
    assert [status[i]["applies"] for i in ("0005", "0005b")] == [False, False]
    assert all("LoRA" in status[i]["reason"] for i in ("0005", "0005b"))


# A custom logit processor for the API tests (serialized by value, as clients send them).
class ForceToken(CustomLogitProcessor):
    """Every row may emit only its custom_params["token_id"]."""

    def __call__(self, logits, custom_param_list=None):
        for row, params in enumerate(custom_param_list):
            logits[row, :] = -float("inf")
            logits[row, params["token_id"]] = 0.0
        return logits
