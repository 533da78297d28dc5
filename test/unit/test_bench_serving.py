"""sglab.bench_serving: datasets, metrics, report layout, request functions and a full run
against an in-test HTTP server that streams in upstream SGLang's SSE formats."""

from __future__ import annotations

import asyncio
import hashlib
import json
import random
import socket
import threading
import time
from datetime import datetime
from types import SimpleNamespace

import numpy as np
import pytest
from aiohttp import web
from sglab import bench_serving as bs

# ----------------------------------------------------------------------------------------------
# Fixtures: a tiny local tokenizer and a fake server
# ----------------------------------------------------------------------------------------------

VOCAB_WORDS = 97  # + <s>, </s>, <unk> = vocab_size 100


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {"<s>": 0, "</s>": 1, "<unk>": 2}
    vocab.update({f"w{i}": i + 3 for i in range(VOCAB_WORDS)})
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    # The server prepends BOS, so num_special_tokens_to_add() == 1.
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 0)])
    path = tmp_path_factory.mktemp("tok")
    PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    ).save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def tokenizer(tokenizer_dir):
    return bs.get_tokenizer(tokenizer_dir)


SERVER_INFO = {"version": "fake", "internal_states": [{}], "active_patches": ["0001", "0003a"]}
# Scripted streams: (seconds before the chunk, cumulative completion_tokens).
TIMED_SCHEDULE = [(0.10, 1), (0.10, 3), (0.10, 3), (0.10, 4)]


class FakeServer:
    """aiohttp app on 127.0.0.1:<free port> in a background thread; records every call."""

    def __init__(self, model_id: str):
        self.model_id = model_id
        self.calls: list[tuple[str, dict | None, dict]] = []
        self.in_flight = 0
        self.max_in_flight = 0
        app = web.Application()
        app.router.add_get("/v1/models", self.models)
        app.router.add_get("/server_info", self.server_info)
        app.router.add_get("/get_model_info", self.model_info)
        for path in ("/flush_cache", "/start_profile", "/stop_profile"):
            app.router.add_post(path, self.plain_ok)
        app.router.add_post("/generate", self.generate)
        app.router.add_post("/v1/completions", self.completions)
        app.router.add_post("/v1/chat/completions", self.chat)
        self.app = app

    def start(self) -> None:
        started = threading.Event()

        def serve() -> None:
            self.loop = asyncio.new_event_loop()
            asyncio.set_event_loop(self.loop)
            self.runner = web.AppRunner(self.app)
            self.loop.run_until_complete(self.runner.setup())
            site = web.TCPSite(self.runner, "127.0.0.1", 0)
            self.loop.run_until_complete(site.start())
            self.port = self.runner.addresses[0][1]
            started.set()
            self.loop.run_forever()
            self.loop.run_until_complete(self.runner.cleanup())

        self.thread = threading.Thread(target=serve, daemon=True)
        self.thread.start()
        assert started.wait(10)
        self.base_url = f"http://127.0.0.1:{self.port}"

    def stop(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)

    def paths(self) -> list[str]:
        return [path for path, _, _ in self.calls]

    async def _record(self, request: web.Request) -> dict | None:
        body = await request.json() if request.can_read_body else None
        self.calls.append((request.path, body, dict(request.headers)))
        return body

    async def models(self, request):
        await self._record(request)
        card = {"id": self.model_id, "object": "model", "owned_by": "sglang", "root": self.model_id}
        return web.json_response({"object": "list", "data": [card]})

    async def server_info(self, request):
        await self._record(request)
        return web.json_response(SERVER_INFO)

    async def model_info(self, request):
        await self._record(request)
        return web.json_response({"model_path": self.model_id})

    async def plain_ok(self, request):
        await self._record(request)
        return web.Response(text="OK\n")

    @staticmethod
    async def _sse(request, events, delays):
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        for delay, event in zip(delays, events):
            await asyncio.sleep(delay)
            await resp.write(f"data: {json.dumps(event)}\n\n".encode())
        await resp.write(b"data: [DONE]\n\n")
        await resp.write_eof()
        return resp

    @staticmethod
    def _schedule(prompt, max_tokens):
        if prompt == "timed":
            return TIMED_SCHEDULE
        return [(0.002, k) for k in range(1, max_tokens + 1)]

    @staticmethod
    def _words(n):
        return " ".join(f"w{k}" for k in range(1, n + 1))

    async def generate(self, request):
        body = await self._record(request)
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            return await self._generate(request, body)
        finally:
            self.in_flight -= 1

    async def _generate(self, request, body):
        prompt = body.get("text", body.get("input_ids"))
        if prompt == "bad" or body.get("fail_me"):
            return web.json_response({"error": {"message": "bad request"}}, status=400)
        sched = self._schedule(prompt, body["sampling_params"]["max_new_tokens"])

        def event(n, last):
            finish = {"type": "length", "length": n} if last else None
            meta = {"id": "r", "finish_reason": finish, "prompt_tokens": 3, "completion_tokens": n}
            return {"text": self._words(n), "output_ids": list(range(n)), "meta_info": meta}

        events = [event(n, i == len(sched) - 1) for i, (_, n) in enumerate(sched)]
        if prompt == "midstream-error":
            events = [events[0], {"error": {"message": "aborted by server"}}]
        if not body.get("stream"):
            await asyncio.sleep(sum(d for d, _ in sched))
            return web.json_response(events[-1])
        return await self._sse(request, events, [d for d, _ in sched])

    async def completions(self, request):
        body = await self._record(request)
        sched = self._schedule(body["prompt"], body["max_tokens"])
        usage_every_chunk = body["prompt"] == "usage"
        if usage_every_chunk:
            sched = sched[:3]

        def event(i, n):
            prev = sched[i - 1][1] if i else 0
            last = i == len(sched) - 1
            text = "".join(f" w{k}" for k in range(prev + 1, n + 1))
            usage = {"prompt_tokens": 3, "completion_tokens": n} if usage_every_chunk else None
            choice = {"index": 0, "text": text, "logprobs": None, "matched_stop": None}
            choice["finish_reason"] = "length" if last else None
            return {
                "id": "c",
                "object": "text_completion",
                "created": 1,
                "model": "m",
                "choices": [choice],
                "usage": usage,
            }

        events = [event(i, n) for i, (_, n) in enumerate(sched)]
        if not body.get("stream"):
            return web.json_response(
                {**events[-1], "choices": [{"index": 0, "text": self._words(sched[-1][1])}]}
            )
        return await self._sse(request, events, [d for d, _ in sched])

    async def chat(self, request):
        body = await self._record(request)
        n = body["max_completion_tokens"]
        if not body.get("stream"):
            await asyncio.sleep(0.05)
            message = {"role": "assistant", "content": self._words(n)}
            usage = {"prompt_tokens": 3, "completion_tokens": n - 1, "total_tokens": n + 2}
            return web.json_response(
                {"choices": [{"index": 0, "message": message}], "usage": usage}
            )

        def chunk(delta, finish=None):
            choice = {
                "index": 0,
                "delta": delta,
                "logprobs": None,
                "finish_reason": finish,
                "matched_stop": None,
            }
            return {
                "id": "c",
                "object": "chat.completion.chunk",
                "created": 1,
                "model": "m",
                "choices": [choice],
                "usage": None,
            }

        null_delta = {"role": None, "content": None, "reasoning_content": None, "tool_calls": None}
        events = [chunk({**null_delta, "role": "assistant", "content": ""})]
        events += [chunk({**null_delta, "content": f" w{k}"}) for k in range(1, n + 1)]
        events.append(chunk(null_delta, finish="length"))
        return await self._sse(request, events, [0.03] * len(events))


@pytest.fixture(scope="module")
def server(tokenizer_dir):
    srv = FakeServer(model_id=tokenizer_dir)
    srv.start()
    yield srv
    srv.stop()


@pytest.fixture
def fresh_server(server):
    server.calls.clear()
    server.max_in_flight = 0
    return server


def _input(server, path, prompt, output_len, **kw):
    return bs.RequestFuncInput(
        prompt=prompt,
        api_url=server.base_url + path,
        prompt_len=3,
        output_len=output_len,
        model="m",
        **kw,
    )


# ----------------------------------------------------------------------------------------------
# Datasets
# ----------------------------------------------------------------------------------------------


def test_compute_random_lens_range():
    np.random.seed(0)
    assert set(bs.compute_random_lens(10, 1.0, 50)) == {10}
    half = bs.compute_random_lens(10, 0.5, 400)
    assert min(half) == 5 and max(half) == 10
    full = bs.compute_random_lens(10, 0.0, 400)  # ratio 0: uniform on [1, L]
    assert min(full) == 1 and max(full) == 10
    assert bs.compute_random_lens(0, 0.5, 3) == [0, 0, 0]


def test_random_ids_id_formula_and_lengths(tokenizer):
    n, in_len, out_len, seed = 6, 12, 9, 7
    np.random.seed(seed)
    rows = bs.sample_random_requests(in_len, out_len, n, 0.5, tokenizer, return_text=False)
    # Oracle: the same draws in the same order (input lens, output lens, offsets).
    np.random.seed(seed)
    exp_in = np.random.randint(6, in_len + 1, size=n)
    exp_out = np.random.randint(4, out_len + 1, size=n)
    offsets = np.random.randint(0, 100, size=n)
    for i, row in enumerate(rows):
        assert row.prompt == [(offsets[i] + i + j) % 100 for j in range(exp_in[i])]
        assert row.prompt_len == exp_in[i] == len(row.prompt)
        assert row.output_len == exp_out[i]
        assert all(isinstance(t, int) for t in row.prompt)


def test_random_ids_text_drops_special_tokens(tokenizer):
    np.random.seed(1)
    rows = bs.sample_random_requests(10, 4, 5, 1.0, tokenizer, return_text=True)
    for row in rows:
        assert isinstance(row.prompt, str)
        assert row.prompt_len == 9  # 10 - BOS added by the server
        # The server's tokenization (with BOS) comes back to the intended 10 tokens.
        assert len(tokenizer.encode(row.prompt)) == 10
        assert row.output_len == 4


def test_random_ids_seed_reproducible(tokenizer):
    def draw(seed):
        np.random.seed(seed)
        rows = bs.sample_random_requests(16, 8, 4, 0.0, tokenizer, return_text=True)
        return [(r.prompt, r.prompt_len, r.output_len) for r in rows]

    assert draw(3) == draw(3)
    assert draw(3) != draw(4)


def _write_sharegpt(tmp_path):
    data = [
        {"conversations": [{"value": "w1 w2 w3"}, {"value": "w4 w5 w6 w7"}]},
        {"conversations": [{"value": "w8"}, {"value": "w9 w10"}]},  # 2 tokens with BOS: kept
        {"conversations": [{"value": "w1 w2 w3 w4 w5 w6"}, {"value": "w1 w2 w3 w4 w5"}]},
        {"conversations": [{"value": "only one turn"}]},
    ]
    path = tmp_path / "sharegpt.json"
    path.write_text(json.dumps(data))
    return str(path)


def test_sharegpt_local_file_filters(tokenizer, tmp_path):
    path = _write_sharegpt(tmp_path)
    rows = bs.sample_sharegpt_requests(path, 10, tokenizer)
    got = sorted((r.prompt, r.prompt_len, r.output_len) for r in rows)
    assert got == sorted(
        [("w1 w2 w3", 4, 5), ("w8", 2, 3), ("w1 w2 w3 w4 w5 w6", 7, 6)]  # lens include BOS
    )
    rows = bs.sample_sharegpt_requests(path, 10, tokenizer, fixed_output_len=4, context_len=8)
    assert sorted((r.prompt_len, r.output_len) for r in rows) == [(2, 4), (4, 4)]


def test_random_from_sharegpt_tiles_prompt_ids(tokenizer, tmp_path):
    path = _write_sharegpt(tmp_path)
    human_turns = ["w1 w2 w3", "w8", "w1 w2 w3 w4 w5 w6"]
    np.random.seed(2)
    rows = bs.sample_random_requests(7, 3, 3, 1.0, tokenizer, path, True, return_text=False)
    tiled = sorted((tokenizer.encode(t) * 7)[:7] for t in human_turns)
    assert sorted(row.prompt for row in rows) == tiled
    assert all(row.prompt_len == 7 and row.output_len == 3 for row in rows)


@pytest.mark.parametrize("name", ["sharegpt", "random"])
def test_sharegpt_datasets_need_a_local_file(tokenizer, name):
    args = bs.get_default_args(dataset_name=name, dataset_path="", num_prompts=2)
    with pytest.raises(FileNotFoundError, match="--dataset-path.*random-ids"):
        bs.get_dataset(args, tokenizer)


def test_generated_shared_prefix_structure(tokenizer):
    import random

    random.seed(0)
    np.random.seed(0)
    rows = bs.sample_generated_shared_prefix_requests(
        num_groups=3,
        prompts_per_group=4,
        system_prompt_len=20,
        question_len=5,
        output_len=7,
        range_ratio=1.0,
        tokenizer=tokenizer,
    )
    assert len(rows) == 12
    prefixes = [r.prompt.split("\n\n")[0] for r in rows]
    assert len(set(prefixes)) == 3
    assert sorted(prefixes.count(p) for p in set(prefixes)) == [4, 4, 4]
    for r in rows:
        system, question = r.prompt.split("\n\n")
        assert len(tokenizer.encode(system, add_special_tokens=False)) == 20
        assert len(tokenizer.encode(question, add_special_tokens=False)) == 5
        assert r.prompt_len == len(tokenizer.encode(r.prompt))
        assert r.output_len == 7
    ordered = bs.sample_generated_shared_prefix_requests(
        3, 4, 20, 5, 7, 1.0, tokenizer, ordered=True
    )
    groups = [r.prompt.split("\n\n")[0] for r in ordered]
    assert groups == [groups[0]] * 4 + [groups[4]] * 4 + [groups[8]] * 4


_GSP_SCRIPT = """
import random, sys
import numpy as np
from transformers import AutoTokenizer
from sglab import bench_serving as bs
random.seed(1); np.random.seed(1)
tok = AutoTokenizer.from_pretrained(sys.argv[1])
rows = bs.sample_generated_shared_prefix_requests(2, 3, 30, 6, 4, 1.0, tok)
print(repr([r.prompt for r in rows]))
"""


def test_generated_shared_prefix_same_prompts_in_every_process(tokenizer_dir):
    """The same seed gives the same prompts in a fresh process (bench_ab compares outputs
    across server runs; the tokenizer's vocab order alone changes between processes)."""
    import subprocess
    import sys

    procs = [subprocess.Popen([sys.executable, "-c", _GSP_SCRIPT, tokenizer_dir],
                              stdout=subprocess.PIPE, text=True) for _ in range(3)]
    outs = [p.communicate()[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0, 0]
    runs = [out.splitlines()[-1] for out in outs]
    assert runs[0].startswith("['") and runs[0] == runs[1] == runs[2]


# ----------------------------------------------------------------------------------------------
# Metrics
# ----------------------------------------------------------------------------------------------


class WordTokenizer:
    def encode(self, text, add_special_tokens=False):
        return text.split()


def _out(start, ttft, itl, latency, output_len, text, success=True):
    return bs.RequestFuncOutput(
        generated_text=text,
        success=success,
        latency=latency,
        ttft=ttft,
        itl=list(itl),
        output_len=output_len,
        start_time=start,
    )


def test_calculate_metrics_hand_computed():
    outputs = [
        _out(0.0, 0.1, [0.02, 0.03, 0.05], 0.25, 4, "a b c d"),
        _out(0.5, 0.2, [0.1], 1.0, 2, "x y z"),
        _out(0.1, 0.0, [], 5.0, 0, "", success=False),  # ignored everywhere, peaks included
        _out(1.2, 0.3, [], 0.3, 1, "z"),
    ]
    rows = [bs.DatasetRow("p", n, 1) for n in (10, 20, 30, 40)]
    m, output_lens = bs.calculate_metrics(rows, outputs, 2.0, WordTokenizer(), "sglab")
    approx = pytest.approx
    assert output_lens == [4, 2, 0, 1]
    assert (m.completed, m.total_input, m.total_output, m.total_output_retokenized) == (3, 70, 7, 8)
    assert m.total_input_text == 70 and m.total_input_vision == 0
    assert m.request_throughput == approx(1.5)
    assert m.input_throughput == approx(35.0)
    assert m.output_throughput == approx(3.5)
    assert m.total_throughput == approx(38.5)
    # TTFT [0.1, 0.2, 0.3]
    assert m.mean_ttft_ms == approx(200.0) and m.median_ttft_ms == approx(200.0)
    assert m.std_ttft_ms == approx(81.6496581) and m.p99_ttft_ms == approx(298.0)
    # TPOT [(0.25-0.1)/3, (1.0-0.2)/1]; output_len 1 has none
    assert m.mean_tpot_ms == approx(425.0) and m.median_tpot_ms == approx(425.0)
    assert m.std_tpot_ms == approx(375.0) and m.p99_tpot_ms == approx(792.5)
    # ITL pooled [0.02, 0.03, 0.05, 0.1]
    assert m.mean_itl_ms == approx(50.0) and m.median_itl_ms == approx(40.0)
    assert m.p95_itl_ms == approx(92.5) and m.p99_itl_ms == approx(98.5)
    assert m.max_itl_ms == approx(100.0)
    # E2E [0.25, 1.0, 0.3]
    assert m.mean_e2e_latency_ms == approx(516.6666667)
    assert m.median_e2e_latency_ms == approx(300.0)
    assert m.p90_e2e_latency_ms == approx(860.0) and m.p99_e2e_latency_ms == approx(986.0)
    assert m.concurrency == approx(0.775)
    # Buckets from t=0: tokens at .1 .12 .15 .2 .7 .8 | 1.5 ; active: A[0], B[0,1], D[1]
    assert m.max_output_tokens_per_s == 6.0
    assert m.max_concurrent_requests == 2


def test_calculate_metrics_empty_lists_are_zero():
    outputs = [_out(0.0, 0.5, [], 0.5, 1, "a")]
    m, _ = bs.calculate_metrics(None, outputs, 1.0, WordTokenizer(), "sglab")
    assert m.mean_tpot_ms == 0.0 and m.p99_itl_ms == 0.0 and m.max_itl_ms == 0.0
    assert m.total_input == 0 and m.mean_ttft_ms == pytest.approx(500.0)
    with pytest.warns(UserWarning, match="All requests failed"):
        m, _ = bs.calculate_metrics(
            None, [_out(0, 0, [], 0, 0, "", False)], 1.0, WordTokenizer(), "sglab"
        )
    assert m.completed == 0 and m.max_concurrent_requests == 0 and m.p99_e2e_latency_ms == 0.0


def test_retokenized_itl_with_spec_accept_length():
    out = _out(0.0, 0.1, [0.2, 0.1], 0.4, 5, "a b c d e")
    out.text_chunks = ["b c", "d"]
    m, _ = bs.calculate_metrics(None, [out], 1.0, WordTokenizer(), "sglang-oai", accept_length=2.0)
    assert m.mean_itl_ms == pytest.approx(100.0) and m.max_itl_ms == pytest.approx(100.0)
    m, _ = bs.calculate_metrics(None, [out], 1.0, WordTokenizer(), "sglab", accept_length=2.0)
    assert m.max_itl_ms == pytest.approx(200.0)  # native ITLs are already per token


# ----------------------------------------------------------------------------------------------
# Result block and jsonl record
# ----------------------------------------------------------------------------------------------

# Upstream 0.5.10.post1's block for these numbers, trailing spaces included.
EXPECTED_BLOCK_LINES = [
    "============ Serving Benchmark Result ============",
    "Backend:                                 sglang    ",
    "Traffic request rate:                    inf       ",
    "Max request concurrency:                 not set   ",
    "Successful requests:                     1000      ",
    "Benchmark duration (s):                  45.12     ",
    "Total input tokens:                      512345    ",
    "Total input text tokens:                 512345    ",
    "Total generated tokens:                  256789    ",
    "Total generated tokens (retokenized):    256001    ",
    "Request throughput (req/s):              22.16     ",
    "Input token throughput (tok/s):          11354.20  ",
    "Output token throughput (tok/s):         5690.90   ",
    "Peak output token throughput (tok/s):    9012.00   ",
    "Peak concurrent requests:                1000      ",
    "Total token throughput (tok/s):          17045.10  ",
    "Concurrency:                             612.34    ",
    "----------------End-to-End Latency----------------",
    "Mean E2E Latency (ms):                   1234.57   ",
    "Median E2E Latency (ms):                 1234.57   ",
    "P90 E2E Latency (ms):                    1234.57   ",
    "P99 E2E Latency (ms):                    1234.57   ",
    "---------------Time to First Token----------------",
    "Mean TTFT (ms):                          12.35     ",
    "Median TTFT (ms):                        12.35     ",
    "P99 TTFT (ms):                           12.35     ",
    "-----Time per Output Token (excl. 1st token)------",
    "Mean TPOT (ms):                          7.89      ",
    "Median TPOT (ms):                        7.89      ",
    "P99 TPOT (ms):                           7.89      ",
    "---------------Inter-Token Latency----------------",
    "Mean ITL (ms):                           7.50      ",
    "Median ITL (ms):                         7.50      ",
    "P95 ITL (ms):                            7.50      ",
    "P99 ITL (ms):                            7.50      ",
    "Max ITL (ms):                            7.50      ",
    "==================================================",
]


def _sample_metrics() -> bs.BenchmarkMetrics:
    return bs.BenchmarkMetrics(
        completed=1000,
        total_input=512345,
        total_input_text=512345,
        total_input_vision=0,
        total_output=256789,
        total_output_retokenized=256001,
        request_throughput=22.163,
        input_throughput=11354.2,
        output_throughput=5690.9,
        output_throughput_retokenized=1.0,
        total_throughput=17045.1,
        total_throughput_retokenized=1.0,
        mean_ttft_ms=12.345,
        median_ttft_ms=12.349,
        std_ttft_ms=1.0,
        p99_ttft_ms=12.35,
        mean_tpot_ms=7.89,
        median_tpot_ms=7.891,
        std_tpot_ms=1.0,
        p99_tpot_ms=7.889,
        mean_itl_ms=7.5,
        median_itl_ms=7.5,
        std_itl_ms=1.0,
        p95_itl_ms=7.5,
        p99_itl_ms=7.5,
        max_itl_ms=7.5,
        mean_e2e_latency_ms=1234.567,
        median_e2e_latency_ms=1234.57,
        std_e2e_latency_ms=1.0,
        p90_e2e_latency_ms=1234.5701,
        p99_e2e_latency_ms=1234.5699,
        concurrency=612.34,
        max_output_tokens_per_s=9012.0,
        max_concurrent_requests=1000,
    )


def test_result_block_matches_upstream_layout():
    block = bs.format_result_block("sglang", float("inf"), None, 45.12, _sample_metrics())
    assert block.split("\n") == [""] + EXPECTED_BLOCK_LINES
    # Rows are 40 + 1 + 10 characters, rules 50.
    assert {len(line) for line in EXPECTED_BLOCK_LINES} == {50, 51}


def test_result_block_rate_concurrency_and_accept_length():
    block = bs.format_result_block("sglab", 4.0, 16, 1.0, _sample_metrics(), accept_length=2.5)
    lines = block.split("\n")
    assert "Traffic request rate:                    4.0       " in lines
    assert "Max request concurrency:                 16        " in lines
    i = lines.index("Concurrency:                             612.34    ")
    assert lines[i + 1] == "Accept length:                           2.50      "
    assert lines[i + 2] == "----------------End-to-End Latency----------------"


UPSTREAM_JSONL_KEYS = [
    "tag",
    "backend",
    "dataset_name",
    "request_rate",
    "max_concurrency",
    "sharegpt_output_len",
    "random_input_len",
    "random_output_len",
    "random_range_ratio",
    "server_info",
    "duration",
    "completed",
    "total_input_tokens",
    "total_input_text_tokens",
    "total_input_vision_tokens",
    "total_output_tokens",
    "total_output_tokens_retokenized",
    "request_throughput",
    "input_throughput",
    "output_throughput",
    "total_throughput",
    "mean_e2e_latency_ms",
    "median_e2e_latency_ms",
    "std_e2e_latency_ms",
    "p90_e2e_latency_ms",
    "p99_e2e_latency_ms",
    "mean_ttft_ms",
    "median_ttft_ms",
    "std_ttft_ms",
    "p99_ttft_ms",
    "mean_tpot_ms",
    "median_tpot_ms",
    "std_tpot_ms",
    "p99_tpot_ms",
    "mean_itl_ms",
    "median_itl_ms",
    "std_itl_ms",
    "p95_itl_ms",
    "p99_itl_ms",
    "concurrency",
    "accept_length",
    "max_output_tokens_per_s",
    "max_concurrent_requests",
]
SGLAB_KEYS = ["active_patches", "input_digest", "input_digests", "provenance"]
DETAIL_KEYS = ["input_lens", "output_lens", "ttfts", "itls", "generated_texts", "output_ids",
               "errors"]


def test_result_record_keys_and_active_patches():
    args = bs.get_default_args(tag="x", dataset_name="random-ids", request_rate=2.0)
    rec = bs.build_result_record(args, SERVER_INFO, 3.0, _sample_metrics(), None)
    assert list(rec) == UPSTREAM_JSONL_KEYS + SGLAB_KEYS
    assert rec["active_patches"] == ["0001", "0003a"] and rec["server_info"] == SERVER_INFO
    assert (rec["tag"], rec["request_rate"], rec["duration"]) == ("x", 2.0, 3.0)
    assert rec["max_concurrent_requests"] == 1000
    assert (
        bs.build_result_record(args, None, 1.0, _sample_metrics(), None)["active_patches"] is None
    )
    no_patches = bs.build_result_record(args, {"version": "x"}, 1.0, _sample_metrics(), None)
    assert no_patches["active_patches"] is None


def test_default_output_file_name():
    mmdd = datetime.now().strftime("%m%d")
    args = bs.get_default_args(
        dataset_name="random-ids", num_prompts=8, random_input_len=64, random_output_len=16
    )
    assert bs.default_output_file_name(args) == f"sglab_{mmdd}_8_64_16.jsonl"
    args = bs.get_default_args(backend="vllm", dataset_name="sharegpt", num_prompts=8)
    assert bs.default_output_file_name(args) == f"vllm_{mmdd}_8_sharegpt.jsonl"


# ----------------------------------------------------------------------------------------------
# Payloads, args, helpers
# ----------------------------------------------------------------------------------------------


def test_payloads_follow_upstream():
    inp = bs.RequestFuncInput(prompt=[5, 6], api_url="u", prompt_len=2, output_len=8, model="m")
    assert bs.build_sglang_payload(inp) == {
        "input_ids": [5, 6],
        "sampling_params": {"temperature": 0.0, "max_new_tokens": 8, "ignore_eos": True},
        "stream": True,
        "lora_path": None,
        "return_logprob": False,
        "return_routed_experts": False,
        "logprob_start_len": -1,
    }
    inp.extra_request_body = {"sampling_params": {"temperature": 0.5}}
    assert bs.build_sglang_payload(inp)["sampling_params"] == {"temperature": 0.5}

    opts = bs.RequestOptions(
        stream=False, ignore_eos=False, return_logprob=True, top_logprobs_num=3
    )
    inp = bs.RequestFuncInput(
        prompt="hi",
        api_url="u",
        prompt_len=1,
        output_len=4,
        model="m",
        lora_name="ad1",
        options=opts,
    )
    assert bs.build_openai_completions_payload(inp) == {
        "model": "ad1",
        "prompt": "hi",
        "best_of": 1,
        "max_tokens": 4,
        "stream": False,
        "temperature": 0.0,
        "ignore_eos": False,
        "logprobs": 3,
        "lora_path": "ad1",
    }
    inp.extra_request_body = {"temperature": 0.7, "ignore_eos": True}
    chat = bs.build_openai_chat_payload(inp)
    assert chat["messages"] == [{"role": "user", "content": "hi"}]
    assert chat["max_completion_tokens"] == 4 and "max_tokens" not in chat
    assert (chat["temperature"], chat["ignore_eos"], chat["top_logprobs"]) == (0.7, True, 3)
    assert bs.build_sglang_payload(inp)["top_logprobs_num"] == 3


def test_json_schema_goes_where_each_api_reads_it(tmp_path):
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}}
    path = tmp_path / "schema.json"
    path.write_text(json.dumps(schema, indent=2))
    args = bs.parse_args(["--json-schema", f"@{path}"])
    opts = bs.request_options_from_args(args)
    assert json.loads(opts.json_schema) == schema
    assert bs.request_options_from_args(bs.parse_args([])).json_schema is None
    inp = bs.RequestFuncInput(prompt="hi", api_url="u", prompt_len=1, output_len=4, model="m",
                              options=opts)
    assert bs.build_sglang_payload(inp)["sampling_params"] == {
        "temperature": 0.0, "max_new_tokens": 4, "ignore_eos": True,
        "json_schema": opts.json_schema}
    want = {"type": "json_schema", "json_schema": {"name": "bench", "schema": schema}}
    assert bs.build_openai_completions_payload(inp)["response_format"] == want
    assert bs.build_openai_chat_payload(inp)["response_format"] == want


def test_args_helpers():
    args = bs.get_default_args(num_prompts=3)
    assert (args.backend, args.num_prompts, args.seed, args.warmup_requests) == ("sglab", 3, 1, 1)
    assert args.request_rate == float("inf") and args.ready_check_timeout_sec == 60
    with pytest.raises(TypeError, match="num_prompt"):
        bs.get_default_args(num_prompt=3)
    full = bs.complete_args(SimpleNamespace(backend="sglang", num_prompts=5))
    assert (full.backend, full.num_prompts, full.random_range_ratio) == ("sglang", 5, 0.0)
    parsed = bs.parse_args(["--lora-name", "a", "b", "--random-input", "64"])  # prefix abbrev.
    assert parsed.lora_name == ["a", "b"] and parsed.random_input_len == 64


def test_auth_headers(monkeypatch):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    monkeypatch.delenv("API_KEY", raising=False)
    assert bs.get_auth_headers() == {}
    monkeypatch.setenv("API_KEY", "raw")
    assert bs.get_auth_headers() == {"Authorization": "raw"}
    monkeypatch.setenv("OPENAI_API_KEY", "sk")
    assert bs.get_auth_headers() == {"Authorization": "Bearer sk"}


def test_lora_picker():
    import random

    distinct = bs._LoraPicker(["a", "b", "c"], "distinct", 1.5)
    assert [distinct.pick() for _ in range(5)] == ["a", "b", "c", "a", "b"]
    random.seed(0)
    np.random.seed(0)
    uniform = [bs._LoraPicker(["a", "b"], "uniform", 1.5).pick() for _ in range(200)]
    assert set(uniform) == {"a", "b"}
    skewed = bs._LoraPicker(["a", "b", "c"], "skewed", 2.0)
    np.testing.assert_allclose(skewed.probs, [4 / 7, 2 / 7, 1 / 7])
    picks = [skewed.pick() for _ in range(3000)]
    assert picks.count("a") > picks.count("b") > picks.count("c") > 0
    assert bs._LoraPicker(None, "uniform", 1.5).pick() is None


def test_poisson_arrivals_follow_seeded_exponential_gaps():
    rows = [bs.DatasetRow("p", 1, 1) for _ in range(4)]
    np.random.seed(5)
    expected = np.random.exponential(1 / 20.0, size=3)
    np.random.seed(5)

    async def arrivals():
        return [time.perf_counter() async for _ in bs.get_request(rows, 20.0)]

    times = asyncio.run(arrivals())
    assert np.all(np.diff(times) >= expected - 1e-3)

    async def burst():
        return [time.perf_counter() async for _ in bs.get_request(rows, float("inf"))]

    assert max(np.diff(asyncio.run(burst()))) < 0.01


# ----------------------------------------------------------------------------------------------
# Request functions against the fake server
# ----------------------------------------------------------------------------------------------


def test_native_stream_timing_and_itl_split(fresh_server):
    out = asyncio.run(
        bs.async_request_sglang_generate(_input(fresh_server, "/generate", "timed", 4))
    )
    assert out.success, out.error
    assert out.generated_text == "w1 w2 w3 w4" and out.output_len == 4
    # Chunk 2 adds 2 tokens: its gap is split in two; chunk 3 adds none and is skipped, so the
    # last gap spans two server delays.
    assert len(out.itl) == 3 and out.itl[0] == out.itl[1]
    assert out.ttft >= 0.08 and out.itl[0] >= 0.04 and out.itl[2] >= 0.16
    assert out.latency >= out.ttft + sum(out.itl) - 1e-6
    assert out.start_time > 0
    path, body, _ = fresh_server.calls[-1]
    assert path == "/generate"
    assert body == {
        "text": "timed",
        "sampling_params": {"temperature": 0.0, "max_new_tokens": 4, "ignore_eos": True},
        "stream": True,
        "lora_path": None,
        "return_logprob": False,
        "return_routed_experts": False,
        "logprob_start_len": -1,
    }


def test_native_non_stream_ttft_is_latency(fresh_server):
    inp = _input(fresh_server, "/generate", "p", 5, options=bs.RequestOptions(stream=False))
    out = asyncio.run(bs.async_request_sglang_generate(inp))
    assert out.success and out.output_len == 5 and out.itl == []
    assert out.ttft == pytest.approx(out.latency, abs=2e-3) and out.ttft >= 0.008


def test_native_failures(fresh_server):
    out = asyncio.run(bs.async_request_sglang_generate(_input(fresh_server, "/generate", "bad", 3)))
    assert not out.success and out.error.startswith("Bad Request: ")
    assert "bad request" in out.error
    inp = _input(fresh_server, "/generate", "midstream-error", 3)
    out = asyncio.run(bs.async_request_sglang_generate(inp))
    assert not out.success and out.error == "aborted by server"
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        closed_port = s.getsockname()[1]
    inp = bs.RequestFuncInput("p", f"http://127.0.0.1:{closed_port}/generate", 1, 2, "m")
    out = asyncio.run(bs.async_request_sglang_generate(inp))
    assert not out.success and "Traceback" in out.error


def test_openai_completions_stream(fresh_server):
    inp = _input(fresh_server, "/v1/completions", "timed", 9)
    out = asyncio.run(bs.async_request_openai_completions(inp))
    assert out.success, out.error
    # No usage in the stream: output_len is the requested max_tokens, as upstream.
    assert out.output_len == 9
    assert out.generated_text == " w1 w2 w3 w4"
    # Chunk 3 carries empty text: it neither counts nor resets the clock.
    assert out.text_chunks == [" w2 w3", " w4"]
    assert len(out.itl) == 2 and out.itl[1] >= 0.16 and out.ttft >= 0.08
    body = fresh_server.calls[-1][1]
    assert body == {
        "model": "m",
        "prompt": "timed",
        "best_of": 1,
        "max_tokens": 9,
        "stream": True,
        "temperature": 0.0,
        "ignore_eos": True,
    }


def test_openai_completions_usage_sets_output_len(fresh_server):
    out = asyncio.run(
        bs.async_request_openai_completions(_input(fresh_server, "/v1/completions", "usage", 9))
    )
    assert out.success and out.output_len == 3 and out.generated_text == " w1 w2 w3"


def test_openai_chat_stream_and_non_stream(fresh_server):
    out = asyncio.run(
        bs.async_request_openai_chat_completions(
            _input(fresh_server, "/v1/chat/completions", "hi", 3)
        )
    )
    assert out.success, out.error
    assert out.generated_text == " w1 w2 w3" and out.output_len == 3
    # Role chunk (empty content) is not the first token; the null-delta finish chunk is no ITL.
    assert out.ttft >= 0.05 and len(out.itl) == 2
    assert out.latency >= out.ttft + sum(out.itl) + 0.02
    body = fresh_server.calls[-1][1]
    assert body == {
        "model": "m",
        "messages": [{"role": "user", "content": "hi"}],
        "max_completion_tokens": 3,
        "stream": True,
        "temperature": 0.0,
        "ignore_eos": True,
    }
    inp = _input(
        fresh_server, "/v1/chat/completions", "hi", 4, options=bs.RequestOptions(stream=False)
    )
    out = asyncio.run(bs.async_request_openai_chat_completions(inp))
    assert out.success and out.ttft == out.latency and out.itl == []
    assert out.generated_text == "w1 w2 w3 w4" and out.output_len == 3  # from usage


# ----------------------------------------------------------------------------------------------
# Full runs
# ----------------------------------------------------------------------------------------------


@pytest.fixture
def quick(monkeypatch):
    monkeypatch.setattr(bs, "SETTLE_SEC", 0.0)
    monkeypatch.delenv("SGLANG_IS_IN_CI", raising=False)
    monkeypatch.delenv("API_KEY", raising=False)
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)


def test_run_benchmark_native_end_to_end(fresh_server, quick, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("OPENAI_API_KEY", "k")
    out_file = tmp_path / "res.jsonl"
    args = bs.get_default_args(
        backend="sglab",
        port=fresh_server.port,
        host="127.0.0.1",
        dataset_name="random-ids",
        num_prompts=5,
        random_input_len=8,
        random_output_len=40,
        random_range_ratio=1.0,
        warmup_requests=2,
        flush_cache=True,
        profile=True,
        profile_output_dir=str(tmp_path),
        output_file=str(out_file),
        output_details=True,
        tag="e2e",
        disable_tqdm=True,
        ready_check_timeout_sec=5,
        seed=3,
    )
    result = bs.run_benchmark(args)

    assert result["completed"] == 5
    assert result["total_input_tokens"] == 5 * 7  # 8 minus the BOS the server adds
    assert result["total_output_tokens"] == 200
    assert result["total_output_tokens_retokenized"] == 200
    assert result["output_lens"] == [40] * 5 and all(len(itl) == 39 for itl in result["itls"])
    assert all(t > 0 for t in result["ttfts"]) and result["errors"] == [""] * 5
    assert result["server_info"] == SERVER_INFO and result["active_patches"] == ["0001", "0003a"]
    assert 1 <= result["max_concurrent_requests"] <= 5 and result["max_output_tokens_per_s"] > 0

    paths = fresh_server.paths()
    gen_idx = [i for i, p in enumerate(paths) if p == "/generate"]
    assert len(gen_idx) == 7
    warmup_bodies = [fresh_server.calls[i][1] for i in gen_idx[:2]]
    assert [b["sampling_params"]["max_new_tokens"] for b in warmup_bodies] == [32, 32]
    assert gen_idx[1] < paths.index("/flush_cache") < paths.index("/start_profile") < gen_idx[2]
    assert gen_idx[-1] < paths.index("/stop_profile") < paths.index("/server_info")
    assert paths[0] == "/v1/models"
    assert all(fresh_server.calls[i][2].get("Authorization") == "Bearer k" for i in gen_idx)

    lines = out_file.read_text().splitlines()
    assert len(lines) == 1
    record = json.loads(lines[0])
    assert list(record) == UPSTREAM_JSONL_KEYS + SGLAB_KEYS + DETAIL_KEYS
    assert record["tag"] == "e2e" and record["completed"] == 5
    assert record["request_rate"] == float("inf")

    printed = capsys.readouterr().out.split("\n")
    assert "============ Serving Benchmark Result ============" in printed
    assert "Backend:                                 sglab     " in printed
    assert "Successful requests:                     5         " in printed
    assert "Total generated tokens:                  200       " in printed


@pytest.mark.parametrize(
    "backend,path",
    [
        ("sglab-oai", "/v1/completions"),
        ("sglab-oai-chat", "/v1/chat/completions"),
        ("vllm", "/v1/completions"),
        ("vllm-chat", "/v1/chat/completions"),
        ("sglang", "/generate"),
        ("sglang-oai", "/v1/completions"),
    ],
)
def test_run_benchmark_backends(fresh_server, quick, tmp_path, backend, path):
    args = bs.get_default_args(
        backend=backend,
        base_url=fresh_server.base_url,
        dataset_name="random-ids",
        num_prompts=3,
        random_input_len=6,
        random_output_len=4,
        random_range_ratio=1.0,
        output_file=str(tmp_path / "r.jsonl"),
        disable_tqdm=True,
    )
    result = bs.run_benchmark(args)
    assert result["completed"] == 3 and result["total_output_tokens"] == 12
    assert result["generated_texts"] == [result["generated_texts"][0]] * 3
    native = backend == "sglang"
    assert result["output_ids"] == [[0, 1, 2, 3] if native else []] * 3
    assert fresh_server.paths().count(path) == 4  # warmup + 3
    assert json.loads((tmp_path / "r.jsonl").read_text())["backend"] == backend
    assert list(result) == UPSTREAM_JSONL_KEYS + SGLAB_KEYS + DETAIL_KEYS


def test_run_benchmark_tokenize_prompt_and_max_concurrency(fresh_server, quick, tmp_path):
    args = SimpleNamespace(  # CI style: a partial namespace
        backend="sglang",
        base_url=fresh_server.base_url,
        dataset_name="random-ids",
        num_prompts=6,
        random_input_len=5,
        random_output_len=20,
        random_range_ratio=1.0,
        tokenize_prompt=True,
        max_concurrency=2,
        output_file=str(tmp_path / "r.jsonl"),
        disable_tqdm=True,
        ready_check_timeout_sec=0,
    )
    result = bs.run_benchmark(args)
    assert result["completed"] == 6
    bodies = [b for p, b, _ in fresh_server.calls if p == "/generate"]
    assert all(len(b["input_ids"]) == 5 and "text" not in b for b in bodies)
    assert fresh_server.max_in_flight == 2
    assert result["total_input_tokens"] == 30  # ids are sent as-is: no BOS correction


def test_run_benchmark_warmup_failure_raises(fresh_server, quick, tmp_path):
    args = bs.get_default_args(
        base_url=fresh_server.base_url,
        dataset_name="random-ids",
        num_prompts=2,
        random_input_len=4,
        random_output_len=4,
        extra_request_body='{"fail_me": true}',
        output_file=str(tmp_path / "r.jsonl"),
        disable_tqdm=True,
    )
    with pytest.raises(ValueError, match="Warmup failed.*Bad Request"):
        bs.run_benchmark(args)


def test_ready_check_times_out_on_dead_server():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(RuntimeError, match="ready-check-timeout-sec 0"):
        bs.wait_for_server_ready(f"http://127.0.0.1:{port}/v1/models", 0.5, {})


def _generate_bodies(server) -> list[dict]:
    return [body for path, body, _ in server.calls if path == "/generate"]


def test_input_digests_are_of_the_requests_sent(fresh_server, quick, tmp_path, monkeypatch):
    """Per request, the digest of the body the server received (in request order: one request
    at a time); the overall digest is of the list; the jsonl line carries both."""
    monkeypatch.setenv("SGLAB_COMMIT", "abc123")
    out_file = tmp_path / "r.jsonl"

    def run(**kw):
        fresh_server.calls.clear()
        args = bs.get_default_args(
            base_url=fresh_server.base_url, dataset_name="random-ids", num_prompts=4,
            random_input_len=6, random_output_len=3, random_range_ratio=1.0, max_concurrency=1,
            warmup_requests=1, output_file=str(out_file), disable_tqdm=True, **kw)
        return bs.run_benchmark(args), _generate_bodies(fresh_server)[1:]

    result, bodies = run(seed=5)
    sent = [hashlib.sha256(json.dumps(b, sort_keys=True, separators=(",", ":")).encode())
            .hexdigest()[:16] for b in bodies]
    assert result["input_digests"] == sent and len(set(sent)) == 4
    assert result["input_digest"] == bs.inputs_digest(sent)
    line = json.loads(out_file.read_text().splitlines()[-1])
    assert (line["input_digests"], line["input_digest"]) == (sent, result["input_digest"])
    assert line["provenance"]["commit"] == "abc123"
    assert line["provenance"]["commit_source"] == "SGLAB_COMMIT"

    again, _ = run(seed=5)
    assert again["input_digests"] == sent
    # A sampling parameter changes every request's digest; another seed, the prompts.
    hot_params = {"temperature": 1, "max_new_tokens": 3}
    hot, hot_bodies = run(seed=5, extra_request_body=json.dumps({"sampling_params": hot_params}))
    assert hot_bodies[0]["sampling_params"] == hot_params
    assert all(a != b for a, b in zip(hot["input_digests"], sent))
    other, _ = run(seed=6)
    assert other["input_digest"] != result["input_digest"]


def test_prompts_do_not_depend_on_random_draws_before_the_dataset(fresh_server, quick, tmp_path,
                                                                monkeypatch):
    """What runs before the dataset (tokenizer load, ready check) may draw from the global
    generators, and may do so only on a process's first run: the prompts must not change."""

    def run() -> list[str]:
        args = bs.get_default_args(
            base_url=fresh_server.base_url, dataset_name="random-ids", num_prompts=4,
            random_input_len=6, random_output_len=3, random_range_ratio=0.5, max_concurrency=1,
            output_file=str(tmp_path / "r.jsonl"), disable_tqdm=True, seed=3)
        return bs.run_benchmark(args)["input_digests"]

    plain = run()
    load = bs.get_tokenizer

    def drawing_load(*a, **kw):
        random.random(), np.random.rand()
        return load(*a, **kw)

    monkeypatch.setattr(bs, "get_tokenizer", drawing_load)
    assert run() == plain
