"""A custom logit processor that raises mid-request, on a real server, with overlap scheduling
and the radix cache each on and off: the failing requests end with a 400 and give back every
KV slot and pool row (the scheduler's idle integrity check), and the requests beside them in
the batch produce the tokens they produce alone."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from conftest import kill_server, popen_launch_server, session

from sglab.srt.sampling.custom_logit_processor import CustomLogitProcessor

BASE_ARGS = ["--skip-server-warmup", "--enable-custom-logit-processor",
             "--chunked-prefill-size", "32"]
# Paged with overlap (the extra step's slot found by its position) and the plain loop without
# the radix cache; the failing variants of the fix fail both.
CONFIGS = {"overlap-paged": ["--page-size", "4"],
           "normal-noradix": ["--disable-overlap-schedule", "--disable-radix-cache"]}
GREEDY = {"temperature": 0, "max_new_tokens": 12, "ignore_eos": True}
# The output token each failing request's processor raises on (0: the prefill's, on a prompt
# long enough to be prefilled in chunks for the last ones).
RAISE_AT = [0, 1, 2, 5, 11, 0, 1]
PROMPTS = [list(range(5, 5 + n)) for n in (6, 9, 17, 23, 31, 70, 45)]
PLAIN_PROMPTS = [list(range(100, 108)), list(range(5, 20)), list(range(200, 260))]


class RaiseAt(CustomLogitProcessor):
    """Leaves the logits alone, but raises when a row samples its output token number
    custom_params["raise_at"] (counting the tokens the device sampled but the host has not
    read yet under overlap scheduling)."""

    def __call__(self, logits, custom_param_list=None):
        for params in custom_param_list:
            req = params["__req__"]
            if len(req.output_ids) + req.num_pending_tokens == params["raise_at"]:
                raise RuntimeError(f"raised at token {params['raise_at']}")
        return logits


@pytest.fixture(scope="module", params=list(CONFIGS), ids=list(CONFIGS))
def server(request):
    srv = popen_launch_server(BASE_ARGS + CONFIGS[request.param])
    yield srv
    kill_server(srv)


def _body(prompt: list[int], raise_at: int | None) -> dict:
    body = {"input_ids": prompt, "sampling_params": dict(GREEDY)}
    if raise_at is not None:
        body["custom_logit_processor"] = RaiseAt.to_str()
        body["sampling_params"]["custom_params"] = {"raise_at": raise_at}
    return body


def _post(server, body: dict):
    with session() as http:
        return http.post(f"{server.base_url}/generate", json=body, timeout=120)


def _post_all(server, bodies: list[dict]) -> list:
    with ThreadPoolExecutor(len(bodies)) as pool:
        return list(pool.map(lambda b: _post(server, b), bodies))


def _idle_state(server) -> dict:
    """The scheduler's state once every KV slot is free or cached and no request is left in its
    batches (or after 10 s). A request the last step finished leaves the running batch at the
    next step, so the two can lag each other by one loop iteration."""
    http = session()
    deadline = time.monotonic() + 10
    while True:
        state = http.get(f"{server.base_url}/get_server_info",
                         timeout=30).json()["internal_states"][0]
        back = state["available_kv_tokens"] + state["evictable_kv_tokens"]
        idle = state["num_running_reqs"] == 0 and state["num_waiting_reqs"] == 0
        if (back == state["max_total_num_tokens"] and idle) or time.monotonic() > deadline:
            return state
        time.sleep(0.1)


def test_failing_processors_free_their_kv_and_spare_the_batch(server):
    # Requests that never raise, with the processor and without, between the failing ones.
    bodies, failing = [], []
    for i, (prompt, raise_at) in enumerate(zip(PROMPTS, RAISE_AT)):
        bodies.append(_body(prompt, raise_at))
        failing.append(True)
        if i % 2 == 0:
            bodies.append(_body(PLAIN_PROMPTS[i // 2 % len(PLAIN_PROMPTS)],
                                None if i % 4 == 0 else -1))
            failing.append(False)
    results = _post_all(server, bodies) + _post_all(server, bodies[::-1])
    failing = failing + failing[::-1]
    bodies = bodies + bodies[::-1]
    for res, fails in zip(results, failing):
        if fails:
            assert res.status_code == 400, res.text
            assert "The custom logit processor failed: RuntimeError: raised at token" in \
                res.json()["error"]["message"]
        else:
            assert res.status_code == 200, res.text
            assert len(res.json()["output_ids"]) == GREEDY["max_new_tokens"]
    alone = {}
    for body, res, fails in zip(bodies, results, failing):
        if not fails:
            key = tuple(body["input_ids"])
            if key not in alone:
                alone[key] = _post(server, _body(body["input_ids"], None))
            assert res.json()["output_ids"] == alone[key].json()["output_ids"]
    state = _idle_state(server)
    assert state["integrity_error"] is None
    assert state["num_running_reqs"] == 0 and state["num_waiting_reqs"] == 0
    assert state["available_kv_tokens"] + state["evictable_kv_tokens"] == \
        state["max_total_num_tokens"], state
