"""A real `python -m sglab.launch_server` process per test module, on a free port."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field

import psutil
import pytest
import requests
from sglab.srt.utils.dummy_model import get_default_model_path
from sglab.srt.utils.process import free_port, kill_server

LAUNCH_TIMEOUT_S = 300.0


@dataclass
class ServerProcess:
    process: subprocess.Popen
    base_url: str
    model_path: str
    log_path: str
    api_key: str | None = None
    child_pids: list[int] = field(default_factory=list)

    def log(self) -> str:
        with open(self.log_path, errors="replace") as f:
            return f.read()

    def headers(self) -> dict:
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}


def session() -> requests.Session:
    s = requests.Session()
    s.trust_env = False  # localhost never goes through a proxy
    return s


def popen_launch_server(args: list[str], api_key: str | None = None,
                        timeout: float = LAUNCH_TIMEOUT_S) -> ServerProcess:
    """Start a server and wait until GET /health_generate answers 200."""
    model_path = get_default_model_path()
    port = free_port()
    log = tempfile.NamedTemporaryFile("w", prefix="sglab-server-", suffix=".log", delete=False)
    cmd = [sys.executable, "-m", "sglab.launch_server", "--model-path", model_path,
           "--port", str(port), *args]
    if api_key:
        cmd += ["--api-key", api_key]
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env,
                            start_new_session=True)
    server = ServerProcess(proc, f"http://127.0.0.1:{port}", model_path, log.name, api_key)
    http = session()
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}:\n{server.log()[-4000:]}")
        try:
            if http.get(f"{server.base_url}/health_generate", timeout=5).status_code == 200:
                server.child_pids = [c.pid for c in psutil.Process(proc.pid).children(True)]
                return server
        except requests.RequestException:
            pass
        time.sleep(0.5)
    kill_server(server)
    raise RuntimeError(f"server not healthy after {timeout} s:\n{server.log()[-4000:]}")


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
