"""Property-based fuzzing of every HTTP route of a real server (hypothesis).

First every field of every request is swept, one at a time, over a list of hostile values.
Then hypothesis builds bodies: a valid request with fields (known, upstream-only, unknown) set
to random JSON (every type, empty and large sizes, non-finite floats, huge integers, unicode
with lone surrogates), raw bytes, and well-typed combinations of every option. Every answer
must be 2xx or 4xx with the route's error body (OpenAI-style, or upstream's plain text /
LoRAUpdateOutput where upstream answers so), never 5xx; a stream ends with `data: [DONE]` and
carries no 5xx error event; the server still gives its greedy baseline at the end.

Bounded for CI (examples per route, derandomized): SGLAB_FUZZ_EXAMPLES scales it,
SGLAB_FUZZ_RANDOM=1 draws new cases. The totals are printed and, with SGLAB_FUZZ_REPORT=path,
written as JSON.
"""

from __future__ import annotations

import json
import os
import time
from collections import Counter
from datetime import timedelta
from urllib.parse import quote

import pytest
import requests
from conftest import DEFAULT_SERVER_ARGS, kill_server, launch_with_profile_dir, session
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sglab.srt.entrypoints.openai.protocol import ChatCompletionRequest, CompletionRequest
from sglab.srt.managers.io_struct import GenerateReqInput
from sglab.srt.sampling.sampling_params import SamplingParams

EXAMPLES = int(os.environ.get("SGLAB_FUZZ_EXAMPLES", "100"))
FUZZ = settings(max_examples=EXAMPLES, deadline=timedelta(seconds=60),
                derandomize=not os.environ.get("SGLAB_FUZZ_RANDOM"), database=None,
                suppress_health_check=list(HealthCheck))
GREEDY = {"text": "The capital of France is",
          "sampling_params": {"temperature": 0, "max_new_tokens": 8, "ignore_eos": True}}
STATS: Counter = Counter()

# --- values -----------------------------------------------------------------------------------

INTS = st.one_of(st.integers(-3, 20), st.sampled_from(
    [2**31, 2**32 + 1, 2**53 + 1, 2**63 - 1, 2**63, 2**64, -2**63 - 1, 10**30, -10**30]))
FLOATS = st.one_of(st.floats(allow_nan=True, allow_infinity=True),
                   st.sampled_from([float("nan"), float("inf"), -float("inf"), 1e308, -0.0,
                                    5e-324, 0.5, 2.0]))
TEXT = st.one_of(
    st.text(max_size=12),
    st.text(st.characters(min_codepoint=0xD7F0, max_codepoint=0xE010), max_size=6),
    st.sampled_from(["", "\ud800", "a\udfffb", "\U0001F600", "\x00", "default", "text",
                     "json_object", "auto", "none", "required", "CPU", "../../x", "/etc",
                     "x" * 5000]),
)
JSON = st.recursive(
    st.one_of(st.none(), st.booleans(), INTS, FLOATS, TEXT),
    lambda inner: st.one_of(st.lists(inner, max_size=5),
                            st.dictionaries(TEXT, inner, max_size=4)),
    max_leaves=10,
)


def _fields(model) -> list[str]:
    return sorted(model.model_fields)


GENERATE_FIELDS = sorted(f for f in GenerateReqInput.__dataclass_fields__
                         if f not in ("is_single", "batch_size"))
SAMPLING_FIELDS = sorted(f for f in SamplingParams.__dataclass_fields__
                         if f not in ("stop_strs", "stop_str_max_len", "stop_regex_strs",
                                      "stop_regex_max_len"))
UPSTREAM_ONLY = ["priority", "extra_key", "bootstrap_host", "return_entropy", "stop_regex",
                 "custom_logit_processor", "best_of", "suffix", "tools", "functions",
                 "response_format", "logit_bias", "routed_dp_rank", "start_step"]
UNKNOWN = ["zzz_unknown", "", "\ud800"]


def _mutated(base: dict, names: list[str]) -> st.SearchStrategy:
    keys = st.sampled_from(names + UPSTREAM_ONLY + UNKNOWN)
    return st.dictionaries(keys, JSON, min_size=1, max_size=3).map(lambda d: {**base, **d})


def _bodies(base: dict, names: list[str]) -> st.SearchStrategy:
    """Mostly a valid body with a few fields fuzzed; sometimes any JSON or raw bytes."""
    return st.one_of(_mutated(base, names), _mutated(base, names), _mutated(base, names),
                     JSON, st.binary(max_size=40))


GENERATE_BASE = {"text": "Hello", "sampling_params": {"max_new_tokens": 4}}
SAMPLING_BODIES = st.dictionaries(st.sampled_from(SAMPLING_FIELDS + UNKNOWN), JSON,
                                  min_size=1, max_size=3).map(
    lambda d: {**GENERATE_BASE, "sampling_params": {"max_new_tokens": 4, **d}})
ROUTES = {
    "/generate": st.one_of(_bodies(GENERATE_BASE, GENERATE_FIELDS), SAMPLING_BODIES),
    "/v1/completions": _bodies({"model": "default", "prompt": "Hello", "max_tokens": 4},
                               _fields(CompletionRequest)),
    "/v1/chat/completions": _bodies(
        {"model": "default", "max_tokens": 4,
         "messages": [{"role": "user", "content": "Hello"}]}, _fields(ChatCompletionRequest)),
    "/start_profile": _bodies({"output_dir": "fuzz", "num_steps": 1}, [
        "output_dir", "num_steps", "activities", "with_stack", "record_shapes",
        "profile_prefix", "profile_by_stage", "merge_profiles", "profile_stages"]),
    "/load_lora_adapter": _bodies({"lora_name": "a", "lora_path": "/nowhere"},
                                  ["lora_name", "lora_path", "pinned"]),
    "/unload_lora_adapter": _bodies({"lora_name": "a"}, ["lora_name"]),
    "/set_internal_state": st.one_of(
        _bodies({"server_args": {"enable_sync_audit": False}}, ["server_args"]),
        _mutated({}, ["server_args"]).map(lambda d: {"server_args": d})),
}
# Well-typed bodies whose options combine in every way (batches, n, best_of, echo, logprobs,
# streams, usage options, zero-token generations): the paths a valid request can take.
SMALL = st.integers(0, 4)
PROMPTS = st.one_of(st.text(min_size=1, max_size=8), st.lists(st.text(min_size=1, max_size=6),
                                                             min_size=1, max_size=3),
                    st.lists(st.integers(0, 500), min_size=1, max_size=6),
                    st.lists(st.lists(st.integers(0, 500), min_size=1, max_size=4), min_size=1,
                             max_size=3))
STREAM_OPTIONS = st.one_of(st.none(), st.fixed_dictionaries(
    {"include_usage": st.booleans(), "continuous_usage_stats": st.booleans()}))
COMMON = {"n": st.integers(1, 3), "seed": st.one_of(st.none(), st.integers(0, 2**62)),
          "temperature": st.sampled_from([0.0, 0.7, 1.0]), "stream": st.booleans(),
          "stream_options": STREAM_OPTIONS, "stop": st.one_of(st.none(), st.text(max_size=2)),
          "ignore_eos": st.booleans(), "min_tokens": st.integers(0, 2),
          "no_stop_trim": st.booleans()}
COMPLETION_COMBOS = st.fixed_dictionaries(
    {"model": st.just("default"), "prompt": PROMPTS, "max_tokens": SMALL, **COMMON},
    optional={"best_of": st.integers(1, 4), "logprobs": st.integers(0, 3),
              "echo": st.booleans()})
MESSAGES = st.lists(st.fixed_dictionaries({
    "role": st.sampled_from(["system", "user", "assistant"]),
    "content": st.one_of(st.text(max_size=8), st.lists(st.fixed_dictionaries(
        {"type": st.just("text"), "text": st.text(max_size=5)}), max_size=2))}),
    min_size=1, max_size=3)
CHAT_COMBOS = st.fixed_dictionaries(
    {"model": st.just("default"), "messages": MESSAGES, "max_completion_tokens": SMALL,
     **COMMON},
    optional={"logprobs": st.booleans(), "top_logprobs": st.integers(0, 3),
              "continue_final_message": st.booleans()})
GENERATE_COMBOS = st.fixed_dictionaries(
    {"sampling_params": st.fixed_dictionaries(
        {"max_new_tokens": SMALL, "temperature": st.sampled_from([0.0, 1.0])},
        optional={"stop": st.text(max_size=2), "ignore_eos": st.booleans(),
                  "sampling_seed": st.integers(0, 99)}),
     "stream": st.booleans()},
    optional={"return_logprob": st.booleans(), "logprob_start_len": st.integers(-1, 3),
              "top_logprobs_num": st.integers(0, 3), "return_text_in_logprobs": st.booleans()},
).flatmap(lambda body: st.one_of(
    st.text(min_size=1, max_size=8).map(lambda t: {**body, "text": t}),
    st.lists(st.text(min_size=1, max_size=6), min_size=1, max_size=3).map(
        lambda t: {**body, "text": t}),
    st.lists(st.integers(0, 500), min_size=1, max_size=6).map(
        lambda ids: {**body, "input_ids": ids})))
COMBOS = {"/v1/completions": COMPLETION_COMBOS, "/v1/chat/completions": CHAT_COMBOS,
          "/generate": GENERATE_COMBOS}
# Upstream answers these routes' refusals in its own shapes, not OpenAI's.
PLAIN_TEXT_ERRORS = {"/start_profile", "/stop_profile", "/flush_cache"}
LORA_ROUTES = {"/load_lora_adapter", "/unload_lora_adapter"}

# --- checking one exchange --------------------------------------------------------------------


def _encode(body) -> bytes:
    if isinstance(body, bytes):
        return body
    return json.dumps(body, ensure_ascii=True, allow_nan=True).encode()


def _check(path: str, res: requests.Response) -> None:
    STATS["requests"] += 1
    STATS[f"{res.status_code // 100}xx"] += 1
    sent = (res.request.body or b"")[:300]
    assert res.status_code < 500, (path, sent, res.status_code, res.text[:2000])
    if res.status_code >= 400:
        _check_error_body(path, res)
    elif res.headers.get("content-type", "").startswith("text/event-stream"):
        _check_stream(path, res.text)


def _check_error_body(path: str, res: requests.Response) -> None:
    if path in PLAIN_TEXT_ERRORS and res.headers["content-type"].startswith("text/plain"):
        assert res.text
        return
    body = res.json()
    if path in LORA_ROUTES:
        assert body["success"] is False and body["error_message"]
        return
    error = body["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"], body


def _check_stream(path: str, text: str) -> None:
    events = [e for e in text.split("\n\n") if e]
    assert events and events[-1] == "data: [DONE]", (path, text[-500:])
    for event in events[:-1]:
        data = json.loads(event.removeprefix("data: "))
        if "error" in data:
            STATS["stream_errors"] += 1
            assert int(data["error"]["code"]) < 500, (path, data)


def _send(http: requests.Session, method: str, url: str, path: str, **kw) -> requests.Response:
    try:
        res = http.request(method, url, timeout=120, **kw)
    except requests.ConnectionError:
        STATS["crashes"] += 1
        raise
    _check(path, res)
    return res


# --- the tests --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """A server of its own: what the fuzzer leaves behind cannot reach other modules."""
    srv = launch_with_profile_dir(DEFAULT_SERVER_ARGS, tmp_path_factory)
    yield srv
    kill_server(srv)


@pytest.fixture(scope="module")
def baseline(server):
    res = session().post(f"{server.base_url}/generate", json=GREEDY, timeout=120)
    assert res.status_code == 200
    return res.json()["output_ids"]


@pytest.fixture(scope="module")
def fuzz_http(server, baseline):
    s = session()
    yield s
    try:  # a fuzzed /start_profile may have left the profiler running
        s.post(f"{server.base_url}/stop_profile", timeout=120)
    except requests.ConnectionError:
        pass  # the server is gone; a test above has said why
    s.close()


@pytest.mark.parametrize("path", sorted(ROUTES))
def test_fuzz_post_routes(fuzz_http, server, path):
    @FUZZ
    @given(body=ROUTES[path])
    def run(body):
        _send(fuzz_http, "POST", server.base_url + path, path, data=_encode(body),
              headers={"Content-Type": "application/json"})

    run()


@pytest.mark.parametrize("path", sorted(COMBOS))
def test_fuzz_well_typed_combinations(fuzz_http, server, path):
    @FUZZ
    @given(body=COMBOS[path])
    def run(body):
        res = _send(fuzz_http, "POST", server.base_url + path, path, data=_encode(body),
                    headers={"Content-Type": "application/json"})
        if res.status_code == 200 and not body["stream"]:
            assert _num_outputs(res.json(), path) == _num_expected(body, path), (body, res.text)

    run()


def _num_outputs(out, path: str) -> int:
    if path == "/generate":
        return len(out) if isinstance(out, list) else 1
    assert [c["index"] for c in out["choices"]] == list(range(len(out["choices"])))
    return len(out["choices"])


def _num_expected(body: dict, path: str) -> int:
    if path == "/generate":
        prompt = body.get("text", body.get("input_ids"))
        return len(prompt) if isinstance(prompt, list) and isinstance(prompt[0], str) else 1
    prompt = body.get("prompt")
    batch = isinstance(prompt, list) and isinstance(prompt[0], (str, list))
    return body["n"] * (len(prompt) if batch else 1)


@FUZZ
@given(path=st.sampled_from(["/health", "/health_generate", "/get_model_info", "/model_info",
                             "/get_server_info", "/server_info", "/v1/models", "/metrics",
                             "/flush_cache", "/stop_profile", "/nope"]),
       method=st.sampled_from(["GET", "POST"]), body=st.one_of(st.none(), st.binary(max_size=20)))
def _fuzz_other_routes(fuzz_http, server, path, method, body):
    _send(fuzz_http, method, server.base_url + path, path, data=body)


def test_fuzz_other_routes(fuzz_http, server):
    _fuzz_other_routes(fuzz_http, server)


@FUZZ
@given(name=TEXT)
def _fuzz_model_cards(fuzz_http, server, name):
    raw = quote(name.encode("utf-8", "surrogatepass"), safe="")
    _send(fuzz_http, "GET", f"{server.base_url}/v1/models/{raw}", "/v1/models/{id}")


def test_fuzz_model_cards(fuzz_http, server):
    _fuzz_model_cards(fuzz_http, server)


# Every field of every request, one at a time, set to each of these.
HOSTILE = [True, -1, 2**31, 2**63, 2**64, -2**63 - 1, 10**30, 1.5, float("nan"), float("inf"),
           -float("inf"), "", "\ud800", "x" * 3000, [], [None], {}, {"a": 1}]
SWEEP_BASES = {
    "/generate": (GENERATE_BASE, GENERATE_FIELDS + UPSTREAM_ONLY),
    "/v1/completions": ({"model": "default", "prompt": "Hello", "max_tokens": 4},
                        _fields(CompletionRequest)),
    "/v1/chat/completions": ({"model": "default", "max_tokens": 4,
                              "messages": [{"role": "user", "content": "Hello"}]},
                             _fields(ChatCompletionRequest)),
}


def _sweep(path: str) -> list[dict]:
    if path == "sampling_params":
        return [{**GENERATE_BASE, "sampling_params": {"max_new_tokens": 4, name: value}}
                for name in SAMPLING_FIELDS for value in HOSTILE]
    base, names = SWEEP_BASES[path]
    return [{**base, name: value} for name in names for value in HOSTILE]


@pytest.mark.parametrize("target", [*SWEEP_BASES, "sampling_params"])
def test_sweep_each_field_with_hostile_values(fuzz_http, server, target):
    path = "/generate" if target == "sampling_params" else target
    for body in _sweep(target):
        _send(fuzz_http, "POST", server.base_url + path, path, data=_encode(body),
              headers={"Content-Type": "application/json"})


def test_fuzz_left_the_server_serving_its_greedy_baseline(fuzz_http, server, baseline):
    """Runs last in this module: the totals, and the baseline after everything above."""
    deadline = time.time() + 60
    while time.time() < deadline and session().get(f"{server.base_url}/get_server_info",
                                                   timeout=30).json()["num_running_reqs"]:
        time.sleep(0.2)
    res = session().post(f"{server.base_url}/generate", json=GREEDY, timeout=120)
    assert res.status_code == 200 and res.json()["output_ids"] == baseline
    assert server.process.poll() is None
    report = {"fuzzed_requests": STATS["requests"], "2xx": STATS["2xx"], "4xx": STATS["4xx"],
              "5xx": STATS["5xx"], "crashes": STATS["crashes"],
              "stream_error_events": STATS["stream_errors"]}
    print(f"\nfuzz: {json.dumps(report)}")
    if os.environ.get("SGLAB_FUZZ_REPORT"):
        with open(os.environ["SGLAB_FUZZ_REPORT"], "w") as f:
            json.dump(report, f, indent=1)
    assert STATS["requests"] > 0 and STATS["5xx"] == 0 and STATS["crashes"] == 0
