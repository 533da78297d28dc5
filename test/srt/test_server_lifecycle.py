"""Servers of their own: --api-key (exact open paths, case-insensitive bearer scheme,
--api-key-protect-metrics), SIGTERM during streams, SIGKILL of the main process."""

from __future__ import annotations

import json
import os
import signal
import time
from concurrent.futures import ThreadPoolExecutor

import psutil
import pytest
from conftest import alive_pids, kill_server, popen_launch_server, session

KEY = "sk-test"
LONG = {"max_new_tokens": 3500, "ignore_eos": True}


@pytest.fixture(scope="module")
def keyed_server():
    srv = popen_launch_server(["--skip-server-warmup", "--enable-metrics"], api_key=KEY)
    yield srv
    kill_server(srv)


@pytest.fixture(scope="module")
def protected_server():
    srv = popen_launch_server(["--skip-server-warmup", "--enable-metrics",
                               "--api-key-protect-metrics"], api_key=KEY)
    yield srv
    kill_server(srv)


def _status(server, path, authorization=None):
    headers = {} if authorization is None else {"Authorization": authorization}
    return session().get(server.base_url + path, headers=headers, timeout=60).status_code


def test_api_key_leaves_exactly_health_and_metrics_open(keyed_server):
    assert _status(keyed_server, "/health") == 200
    assert _status(keyed_server, "/metrics") == 200
    for path in ("/health_generate", "/healthz", "/health/", "/metrics/", "/metricsx",
                 "/get_server_info", "/v1/models"):
        assert _status(keyed_server, path) == 401, path
    assert _status(keyed_server, "/health_generate", f"Bearer {KEY}") == 200


def test_bearer_scheme_is_case_insensitive(keyed_server):
    for header in (f"Bearer {KEY}", f"bearer {KEY}", f"BEARER {KEY}", f"Bearer  {KEY}"):
        assert _status(keyed_server, "/v1/models", header) == 200, header
    for header in ("Bearer wrong", f"Basic {KEY}", KEY, "Bearer", "", "Bearer \xe9"):
        assert _status(keyed_server, "/v1/models", header) == 401, header
    res = session().get(f"{keyed_server.base_url}/v1/models", timeout=60)
    assert res.json()["error"]["type"] == "authentication_error"


def _read_events(res) -> list[bytes]:
    return [line for line in res.iter_lines() if line]


def test_sigterm_ends_streams_with_an_error_then_done(keyed_server):
    auth = {"Authorization": f"Bearer {KEY}"}
    url = keyed_server.base_url
    streams = [
        session().post(f"{url}/generate", headers=auth, stream=True, timeout=60, json={
            "text": "native", "stream": True, "sampling_params": LONG}),
        session().post(f"{url}/v1/completions", headers=auth, stream=True, timeout=60, json={
            "model": "default", "prompt": "openai", "stream": True, "max_tokens": 3500,
            "ignore_eos": True}),
    ]
    lines = [res.iter_lines() for res in streams]
    for it in lines:
        assert next(ln for ln in it if ln).startswith(b"data: {")
    with ThreadPoolExecutor(1) as pool:
        waiting = pool.submit(session().post, f"{url}/generate", headers=auth, timeout=60,
                              json={"text": "non-stream", "sampling_params": LONG})
        time.sleep(0.5)
        tic = time.time()
        keyed_server.process.send_signal(signal.SIGTERM)
        tails = [[ln for ln in it if ln][-2:] for it in lines]
        elapsed = time.time() - tic
        res = waiting.result()
    assert elapsed < 3, elapsed
    for tail in tails:
        error = json.loads(tail[0][len(b"data: "):])["error"]
        assert error["message"] == "The server is shutting down." and error["code"] == 503
        assert tail[1] == b"data: [DONE]"
    assert res.status_code == 503 and res.json()["error"]["type"] == "service_unavailable"
    assert keyed_server.process.wait(30) == 0
    log = keyed_server.log()
    assert "Traceback" not in log and "CancelledError" not in log, log[-3000:]
    assert alive_pids(keyed_server.child_pids) == []


def test_api_key_protect_metrics_closes_health_and_metrics(protected_server):
    for path in ("/health", "/metrics"):
        assert _status(protected_server, path) == 401, path
        assert _status(protected_server, path, f"Bearer {KEY}") == 200, path


def _ipc_dirs_of(pid: int) -> set[str]:
    """The directories of the unix sockets `pid` has bound (its ZMQ ipc:// endpoints)."""
    paths = {c.laddr for c in psutil.Process(pid).net_connections(kind="unix") if c.laddr}
    return {os.path.dirname(p) for p in paths if "sglab-ipc-" in p}


def test_sigkill_of_the_main_process_leaves_no_ipc_dir():
    server = popen_launch_server(["--skip-server-warmup"])
    try:
        _kill_and_check_ipc_cleanup(server)
    finally:
        kill_server(server)


def _kill_and_check_ipc_cleanup(server) -> None:
    pid = server.process.pid
    dirs = sorted(_ipc_dirs_of(pid))
    assert len(dirs) == 1 and os.listdir(dirs[0])
    children = [psutil.Process(p) for p in server.child_pids]
    server.process.kill()
    server.process.wait(10)
    deadline = time.time() + 20
    while time.time() < deadline and (os.path.exists(dirs[0]) or alive_pids(
            [c.pid for c in children])):
        time.sleep(0.2)
    assert not os.path.exists(dirs[0])
    assert alive_pids([c.pid for c in children]) == []
