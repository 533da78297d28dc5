"""sglab.test.few_shot_gsm8k and benchmark/gsm8k/bench_sglab.py against an in-test server."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import SimpleNamespace
from typing import ClassVar

import pytest
import requests
from sglab.test import few_shot_gsm8k as g

REPO = Path(__file__).resolve().parents[2]

DATA = [
    {"question": "Q zero?", "answer": "9 * 2 = <<9*2=18>>18\n#### 18"},
    {"question": "Q one?", "answer": "2+1=<<2+1=3>>3\n#### 3"},
    {"question": "Q two?", "answer": "It is 70,000 dollars.\n#### 70,000"},
    {"question": "Q three?", "answer": "#### 540"},
]
# Replies by question: right, wrong, no number (INVALID), right. completion_tokens 10..40.
REPLIES = {
    "Q zero?": (" She makes 9 * 2 = $18.\n#### 18", 10),
    "Q one?": (" It takes 2 + 2 = 4 bolts.\n#### 4", 20),
    "Q two?": (" I do not know.", 30),
    "Q three?": (" 540", 40),
}


@pytest.mark.parametrize(
    "text,value",
    [
        ("The answer is 1,234.", 1234),
        ("3 apples and 5 pears", 5),
        ("#### 18", 18),
        ("-3", 3),
        ("2.5", 5),
        ("0", 0),
        ("no digits here", g.INVALID),
        ("007", g.INVALID),
        ("", g.INVALID),
    ],
)
def test_get_answer_value(text, value):
    assert g.get_answer_value(text) == value


def test_prompt_format_keeps_shots_in_the_evaluated_rows():
    prefix = g.get_few_shot_examples(DATA, 2)
    assert prefix == (
        "Question: Q zero?\nAnswer: 9 * 2 = <<9*2=18>>18\n#### 18\n\n"
        "Question: Q one?\nAnswer: 2+1=<<2+1=3>>3\n#### 3\n\n"
    )
    assert g.get_one_example(DATA, 0, False) == "Question: Q zero?\nAnswer:"


class _Handler(BaseHTTPRequestHandler):
    calls: ClassVar[list] = []

    def log_message(self, *args):
        pass

    def _reply(self, status: int, obj) -> None:
        data = json.dumps(obj).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self):
        self.calls.append((self.path, None))
        if self.path == "/get_model_info":
            return self._reply(200, {"model_path": "/models/fake", "is_generation": True})
        return self._reply(404, {"error": {"message": "not found"}})

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        self.calls.append((self.path, body))
        if body["sampling_params"]["max_new_tokens"] == 0:
            return self._reply(200, {"text": "", "meta_info": {"completion_tokens": 0}})
        question = body["text"].rsplit("Question: ", 1)[1].split("\n")[0]
        if question == "Q boom?":
            return self._reply(500, {"error": {"message": "boom"}})
        text, n = REPLIES[question]
        return self._reply(200, {"text": text, "meta_info": {"completion_tokens": n}})


@pytest.fixture
def server():
    _Handler.calls = []
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield SimpleNamespace(port=httpd.server_address[1], calls=_Handler.calls)
    httpd.shutdown()
    httpd.server_close()


@pytest.fixture
def data_file(tmp_path):
    path = tmp_path / "test.jsonl"
    path.write_text("# comment line\n" + "\n".join(json.dumps(d) for d in DATA) + "\n")
    return str(path)


def _args(port, data_path, **kw):
    base = {
        "num_shots": 2,
        "data_path": data_path,
        "num_questions": 4,
        "max_new_tokens": 512,
        "parallel": 3,
        "host": "127.0.0.1",
        "port": port,
        "temperature": 0.0,
    }
    return SimpleNamespace(**{**base, **kw})


def test_run_eval_scores_requests_and_output(server, data_file, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    metrics = g.run_eval(_args(server.port, data_file, output_file=str(tmp_path / "out.txt")))

    assert set(metrics) == {"accuracy", "invalid", "latency", "output_throughput"}
    assert metrics["accuracy"] == 0.5 and metrics["invalid"] == 0.25
    assert metrics["output_throughput"] == pytest.approx(100 / metrics["latency"])

    printed = [ln for ln in capsys.readouterr().out.splitlines() if ln]
    assert printed[-4:-2] == ["Accuracy: 0.500", "Invalid: 0.250"]
    assert re.fullmatch(r"Latency: \d+\.\d{3} s", printed[-2])
    assert re.fullmatch(r"Output throughput: \d+\.\d{3} token/s", printed[-1])

    prefix = (
        "Question: Q zero?\nAnswer: 9 * 2 = <<9*2=18>>18\n#### 18\n\n"
        "Question: Q one?\nAnswer: 2+1=<<2+1=3>>3\n#### 3\n\n"
    )
    assert server.calls[0] == ("/get_model_info", None)
    assert server.calls[1] == (
        "/generate",
        {"text": prefix, "sampling_params": {"max_new_tokens": 0}},
    )
    bodies = sorted((b for p, b in server.calls[2:]), key=lambda b: b["text"])
    assert len(bodies) == 4 and all(p == "/generate" for p, _ in server.calls[2:])
    for body, q in zip(bodies, ["Q one?", "Q three?", "Q two?", "Q zero?"]):
        assert body == {
            "text": prefix + f"Question: {q}\nAnswer:",
            "sampling_params": {
                "skip_special_tokens": True,
                "spaces_between_special_tokens": True,
                "max_new_tokens": 512,
                "min_new_tokens": 0,
                "n": 1,
                "stop": ["Question", "Assistant:", "<|separator|>"],
                "stop_token_ids": [],
                "stop_regex": [],
                "temperature": 0.0,
                "top_p": 1.0,
                "top_k": -1,
                "min_p": 0.0,
                "frequency_penalty": 0.0,
                "presence_penalty": 0.0,
                "ignore_eos": False,
                "regex": None,
                "json_schema": None,
            },
        }

    dump = (tmp_path / "out.txt").read_text()
    assert dump.count("=" * 80) == 4
    assert prefix + "Question: Q two?\nAnswer: I do not know." in dump


def test_run_eval_single_question_skips_prefix_cache(server, data_file, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    args = SimpleNamespace(
        num_shots=2,
        data_path=data_file,
        num_questions=1,
        parallel=1,
        host="http://127.0.0.1",
        port=server.port,
    )
    with pytest.warns(DeprecationWarning):
        metrics = g.run_eval(args)
    assert metrics["accuracy"] == 1.0 and metrics["invalid"] == 0.0
    assert os.listdir(tmp_path) == ["test.jsonl"]  # no answers file unless --output-file
    assert [p for p, _ in server.calls] == ["/get_model_info", "/generate"]
    assert server.calls[1][1]["sampling_params"]["max_new_tokens"] == 512


def test_run_eval_raises_on_http_error(server, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "boom.jsonl"
    path.write_text(json.dumps({"question": "Q boom?", "answer": "#### 1"}) + "\n")
    with pytest.raises(RuntimeError, match="500"):
        g.run_eval(_args(server.port, str(path), num_shots=0, num_questions=1))


def test_resolve_data_path(tmp_path, monkeypatch, data_file):
    assert g.resolve_data_path(data_file) == data_file
    with pytest.raises(FileNotFoundError, match="missing.jsonl"):
        g.resolve_data_path(str(tmp_path / "missing.jsonl"))

    cache = tmp_path / "cache"
    cache.mkdir()
    monkeypatch.setattr(g, "CACHE_DIR", str(cache))

    def offline(*args, **kwargs):
        raise requests.ConnectionError("no network")

    monkeypatch.setattr(g.requests, "get", offline)
    with pytest.raises(RuntimeError, match="--data-path"):
        g.resolve_data_path(None)

    (cache / "test.jsonl").write_text(json.dumps(DATA[0]) + "\n")
    assert g.resolve_data_path(None) == str(cache / "test.jsonl")


def test_download_caches_into_cache_dir(tmp_path, monkeypatch):
    monkeypatch.setattr(g, "CACHE_DIR", str(tmp_path))
    fetched = []

    def fake_get(url, timeout):
        fetched.append(url)
        return SimpleNamespace(
            content=b'{"question": "q", "answer": "#### 1"}\n', raise_for_status=lambda: None
        )

    monkeypatch.setattr(g.requests, "get", fake_get)
    path = g.resolve_data_path(None)
    assert path == str(tmp_path / "test.jsonl") and fetched == [g.GSM8K_URL]
    assert g.read_jsonl(path) == [{"question": "q", "answer": "#### 1"}]
    assert g.resolve_data_path(None) == path and len(fetched) == 1  # reused, not re-fetched


def test_cli_defaults():
    args = g.build_parser().parse_args([])
    assert (args.num_shots, args.num_questions, args.max_new_tokens, args.parallel) == (
        5,
        200,
        512,
        128,
    )
    assert (args.data_path, args.host, args.port, args.temperature) == (
        None,
        "127.0.0.1",
        30000,
        0.0,
    )


def test_bench_sglab_appends_result_line(server, data_file, tmp_path, monkeypatch):
    spec = importlib.util.spec_from_file_location(
        "bench_sglab", REPO / "benchmark" / "gsm8k" / "bench_sglab.py"
    )
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    monkeypatch.chdir(tmp_path)
    result_file = tmp_path / "result.jsonl"
    argv = [
        "--data-path",
        data_file,
        "--num-questions",
        "4",
        "--num-shots",
        "2",
        "--port",
        str(server.port),
        "--result-file",
        str(result_file),
    ]
    for _ in range(2):
        mod.main(mod.build_parser().parse_args(argv))
    lines = [json.loads(x) for x in result_file.read_text().splitlines()]
    assert len(lines) == 2
    assert list(lines[0]) == [
        "task",
        "backend",
        "num_gpus",
        "latency",
        "accuracy",
        "num_requests",
        "other",
    ]
    assert lines[0]["accuracy"] == 0.5 and lines[0]["backend"] == "srt"
    assert lines[0]["other"] == {"num_questions": 4, "parallel": 64}
    assert (tmp_path / "tmp_output_srt.txt").exists()
