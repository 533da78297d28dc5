"""A real `python -m sglab.launch_server` process per test module, on a free port."""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import psutil
import pytest
import requests
from sglab.srt.utils import process
from sglab.srt.utils.dummy_model import get_default_model_path
from sglab.srt.utils.process import kill_server

LAUNCH_TIMEOUT_S = 300.0


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
                        timeout: float = LAUNCH_TIMEOUT_S) -> ServerProcess:
    """Start a server on the tiny default model; returns once /health_generate answers 200."""
    model_path = get_default_model_path()
    extra = ["--api-key", api_key] if api_key else []
    env = {"OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    base = process.popen_launch_server(["--model-path", model_path, *args, *extra], timeout,
                                       env)
    server = ServerProcess(base.process, base.base_url, base.log_path, model_path, api_key)
    server.child_pids = [c.pid for c in psutil.Process(base.process.pid).children(True)]
    return server


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
    """The module's server; its CLI arguments come from the module's SERVER_ARGS."""
    args = getattr(request.module, "SERVER_ARGS", ["--skip-server-warmup"])
    srv = popen_launch_server(args)
    yield srv
    kill_server(srv)


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
def shared_server():
    """One default server (--skip-server-warmup) for the modules that need nothing else."""
    srv = popen_launch_server(["--skip-server-warmup"])
    yield srv
    kill_server(srv)
