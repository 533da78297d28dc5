"""Launching and stopping `python -m sglab.launch_server` processes (benchmarks and tests)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass

import psutil
import requests


@dataclass
class ServerProcess:
    process: subprocess.Popen
    base_url: str
    log_path: str

    def log(self) -> str:
        with open(self.log_path, errors="replace") as f:
            return f.read()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def popen_launch_server(args: list[str], timeout: float = 600.0,
                        env: dict | None = None) -> ServerProcess:
    """Start a server on a free port and wait until GET /health_generate answers 200 (sent
    with the server's --api-key, as upstream's CI does)."""
    return popen_launch_servers([args], timeout, env)[0]


def popen_launch_servers(arg_lists: list[list[str]], timeout: float = 600.0,
                         env: dict | None = None) -> list[ServerProcess]:
    """Start every server at once (they load and warm up side by side), then wait for each
    to be healthy; `timeout` applies to each wait. If any fails, all are stopped."""
    servers: list[ServerProcess] = []
    try:
        for args in arg_lists:
            servers.append(_spawn(args, env))
        for i, args in enumerate(arg_lists):
            for attempt in range(PORT_ATTEMPTS):
                try:
                    _wait_healthy(servers[i], timeout, _api_key(args))
                    break
                except PortTaken:
                    if attempt == PORT_ATTEMPTS - 1:
                        raise
                    # Its free port was taken before it bound it: another one.
                    kill_server(servers[i])
                    servers[i] = _spawn(args, env)
    except BaseException:
        # Also when interrupted (SIGTERM, Ctrl-C): the servers run in their own sessions, so
        # nothing else would stop them.
        for server in servers:
            kill_server(server)
        raise
    return servers


def _spawn(args: list[str], env: dict | None) -> ServerProcess:
    port = free_port()
    log = tempfile.NamedTemporaryFile("w", prefix="sglab-server-", suffix=".log", delete=False)
    cmd = [sys.executable, "-m", "sglab.launch_server", "--port", str(port), *args]
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT,
                            env={**os.environ, **(env or {})}, start_new_session=True)
    return ServerProcess(proc, f"http://127.0.0.1:{port}", log.name)


def _api_key(args: list[str]) -> str | None:
    return args[args.index("--api-key") + 1] if "--api-key" in args else None


PORT_ATTEMPTS = 3


class PortTaken(RuntimeError):
    """The server exited because its HTTP port was in use by the time it bound it."""


def _exit_error(server: ServerProcess) -> RuntimeError:
    log = server.log()
    port = server.base_url.rsplit(":", 1)[1]
    taken = f"', {port}): address already in use" in log
    return (PortTaken if taken else RuntimeError)(
        f"server exited with {server.process.returncode}:\n{log[-4000:]}")


def _wait_healthy(server: ServerProcess, timeout: float, api_key: str | None) -> None:
    http = requests.Session()
    http.trust_env = False
    if api_key is not None:
        http.headers["Authorization"] = f"Bearer {api_key}"
    deadline = time.time() + timeout
    while time.time() < deadline:
        if server.process.poll() is not None:
            raise _exit_error(server)
        try:
            if http.get(f"{server.base_url}/health_generate", timeout=5).status_code == 200:
                return
        except requests.RequestException:
            pass
        time.sleep(0.5)
    raise RuntimeError(f"server not healthy after {timeout} s:\n{server.log()[-4000:]}")


def kill_server(server: ServerProcess, grace_s: float = 30.0) -> None:
    """SIGTERM (a clean shutdown), then SIGKILL whatever is left of the process tree."""
    proc = server.process
    try:
        tree = psutil.Process(proc.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        tree = []
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(grace_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)
    for child in tree:
        try:
            child.kill()
        except psutil.Error:
            pass
