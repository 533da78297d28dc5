"""Upstream's request timeouts from the environment: seconds, or the deprecated milliseconds
names; a bad value is an error naming the variable that held it, in its own unit."""

from __future__ import annotations

import pytest
from sglab.srt.managers.scheduler import REQ_RUNNING_TIMEOUT_ENV, REQ_WAITING_TIMEOUT_ENV, \
    env_timeout_s


@pytest.fixture(autouse=True)
def _clean(monkeypatch):
    for name in (REQ_WAITING_TIMEOUT_ENV, REQ_RUNNING_TIMEOUT_ENV, "SGLANG_QUEUED_TIMEOUT_MS",
                 "SGLANG_FORWARD_TIMEOUT_MS"):
        monkeypatch.delenv(name, raising=False)


def test_seconds_milliseconds_and_off(monkeypatch):
    assert env_timeout_s(REQ_WAITING_TIMEOUT_ENV) == -1.0
    monkeypatch.setenv("SGLANG_QUEUED_TIMEOUT_MS", "250")
    assert env_timeout_s(REQ_WAITING_TIMEOUT_ENV) == 0.25
    monkeypatch.setenv(REQ_WAITING_TIMEOUT_ENV, "2")  # the seconds name wins
    assert env_timeout_s(REQ_WAITING_TIMEOUT_ENV) == 2.0
    monkeypatch.setenv(REQ_RUNNING_TIMEOUT_ENV, " ")
    assert env_timeout_s(REQ_RUNNING_TIMEOUT_ENV) == -1.0


@pytest.mark.parametrize("name,expected", [
    (REQ_RUNNING_TIMEOUT_ENV, "SGLANG_REQ_RUNNING_TIMEOUT must be a number of seconds, got 'x'"),
    ("SGLANG_FORWARD_TIMEOUT_MS",
     "SGLANG_FORWARD_TIMEOUT_MS must be a number of milliseconds, got 'x'"),
])
def test_a_bad_value_names_the_variable_and_its_unit(monkeypatch, name, expected):
    monkeypatch.setenv(name, "x")
    with pytest.raises(ValueError, match=expected):
        env_timeout_s(REQ_RUNNING_TIMEOUT_ENV)
