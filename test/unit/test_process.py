"""Launching servers for tests and benchmarks: a server whose free port was taken before it
bound it is relaunched on another port; any other exit is an error at once. The TP rendezvous
port is never the HTTP port."""

from __future__ import annotations

import socket
import subprocess
import sys

import pytest
from sglab.srt import server_args
from sglab.srt.utils import process
from sglab.srt.utils.process import PortTaken, ServerProcess

UVICORN_BIND_ERROR = ("ERROR:    [Errno 98] error while attempting to bind on address "
                      "('127.0.0.1', {port}): address already in use")


def _exited(tmp_path, port: int, message: str) -> ServerProcess:
    log = tmp_path / f"server-{port}.log"
    with open(log, "w") as f:
        proc = subprocess.Popen([sys.executable, "-c", f"print({message!r}); raise SystemExit(1)"],
                                stdout=f, stderr=subprocess.STDOUT)
        proc.wait(30)
    return ServerProcess(proc, f"http://127.0.0.1:{port}", str(log))


def test_a_bind_failure_on_its_own_port_is_port_taken(tmp_path):
    with pytest.raises(PortTaken, match="address already in use"):
        process._wait_healthy(_exited(tmp_path, 4242, UVICORN_BIND_ERROR.format(port=4242)),
                              10, None)
    for message in (UVICORN_BIND_ERROR.format(port=4343), "ValueError: bad --tp-size"):
        with pytest.raises(RuntimeError) as e:  # another port's socket, or another error
            process._wait_healthy(_exited(tmp_path, 4242, message), 10, None)
        assert type(e.value) is RuntimeError


def test_a_taken_port_relaunches_on_another_then_gives_up(monkeypatch):
    spawned, killed = [], []
    outcomes = iter(["taken", "ok", "taken", "taken", "taken"])

    def spawn(args, env):
        spawned.append(args)
        return ServerProcess(None, f"fake://{len(spawned)}", "")

    def wait(server, timeout, api_key):
        if next(outcomes) == "taken":
            raise PortTaken("taken")

    monkeypatch.setattr(process, "_spawn", spawn)
    monkeypatch.setattr(process, "_wait_healthy", wait)
    monkeypatch.setattr(process, "kill_server", lambda s: killed.append(s.base_url))
    assert process.popen_launch_server(["a"]).base_url == "fake://2"
    assert killed == ["fake://1"]
    with pytest.raises(PortTaken):  # three taken ports in a row: the error
        process.popen_launch_server(["b"])
    assert killed == ["fake://1", "fake://3", "fake://4", "fake://5"]


def test_the_rendezvous_port_is_never_the_http_port(monkeypatch):
    ports = iter([30123, 30123, 30124])

    class FakeSocket:
        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

        def bind(self, addr):
            self.port = next(ports)

        def getsockname(self):
            return ("127.0.0.1", self.port)

    monkeypatch.setattr(socket, "socket", FakeSocket)
    assert server_args._free_port(avoid=30123) == 30124
