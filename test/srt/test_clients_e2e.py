"""bench_serving and few-shot gsm8k against a real sglab server on the tiny default model."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from sglab import bench_serving
from sglab.test import few_shot_gsm8k

SERVER_ARGS = ["--skip-server-warmup"]
UPSTREAM_JSONL_KEYS = [
    "tag", "backend", "dataset_name", "request_rate", "max_concurrency", "sharegpt_output_len",
    "random_input_len", "random_output_len", "random_range_ratio", "server_info", "duration",
    "completed", "total_input_tokens", "total_input_text_tokens", "total_input_vision_tokens",
    "total_output_tokens", "total_output_tokens_retokenized", "request_throughput",
    "input_throughput", "output_throughput", "total_throughput", "mean_e2e_latency_ms",
    "median_e2e_latency_ms", "std_e2e_latency_ms", "p90_e2e_latency_ms", "p99_e2e_latency_ms",
    "mean_ttft_ms", "median_ttft_ms", "std_ttft_ms", "p99_ttft_ms", "mean_tpot_ms",
    "median_tpot_ms", "std_tpot_ms", "p99_tpot_ms", "mean_itl_ms", "median_itl_ms",
    "std_itl_ms", "p95_itl_ms", "p99_itl_ms", "concurrency", "accept_length",
    "max_output_tokens_per_s", "max_concurrent_requests"]


@pytest.mark.parametrize("backend", ["sglab", "sglab-oai", "sglab-oai-chat"])
def test_bench_serving_backends(server, tmp_path, backend):
    out_file = tmp_path / "bench.jsonl"
    cmd = [sys.executable, "-m", "sglab.bench_serving", "--backend", backend,
           "--base-url", server.base_url, "--dataset-name", "random-ids", "--num-prompts", "20",
           "--random-input-len", "32", "--random-output-len", "8", "--random-range-ratio", "1",
           "--tokenizer", server.model_path, "--output-file", str(out_file),
           "--output-details", "--disable-tqdm", "--max-concurrency", "8"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.splitlines()
    start = lines.index("============ Serving Benchmark Result ============")
    block = lines[start:start + 37]
    assert block[1].startswith("Backend:") and block[1].split()[1] == backend
    assert block[4] == f"{'Successful requests:':<40} {20:<10}"
    assert block[-1] == "=" * 50
    record = json.loads(out_file.read_text().splitlines()[-1])
    assert list(record)[:len(UPSTREAM_JSONL_KEYS)] == UPSTREAM_JSONL_KEYS
    assert record["completed"] == 20 and not any(record["errors"])
    # ignore_eos: every request generates exactly the requested 8 tokens, as the server says.
    assert record["output_lens"] == [8] * 20
    assert record["total_output_tokens"] == 160
    assert record["server_info"]["active_patches"] == record["active_patches"]


def test_bench_serving_token_counts_match_server(server):
    args = bench_serving.get_default_args(
        backend="sglab", base_url=server.base_url, dataset_name="random-ids", num_prompts=5,
        random_input_len=16, random_output_len=6, random_range_ratio=1.0,
        tokenizer=server.model_path, disable_tqdm=True, output_file=os.devnull,
        disable_ignore_eos=True, output_details=True)
    result = bench_serving.run_benchmark(args)
    assert result["completed"] == 5
    # Without ignore_eos the server decides the length; the client must report its counts.
    assert all(1 <= n <= 6 for n in result["output_lens"])
    assert result["total_output_tokens"] == sum(result["output_lens"])


def _write_gsm8k_style(path, n: int = 12) -> str:
    """GSM8K's jsonl layout (question, worked answer ending in '#### N'), made up here so the
    test needs no dataset checkout."""
    with open(path, "w") as f:
        for i in range(n):
            a, b = 3 + i, 7 + 2 * i
            f.write(json.dumps({
                "question": f"Sam has {a} apples and buys {b} more. How many apples does he have?",
                "answer": f"He has {a} + {b} = <<{a}+{b}={a + b}>>{a + b} apples.\n#### {a + b}",
            }) + "\n")
    return str(path)


def test_gsm8k_end_to_end(server, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    port = int(server.base_url.rsplit(":", 1)[1])
    args = few_shot_gsm8k.build_parser().parse_args([
        "--data-path", _write_gsm8k_style(tmp_path / "gsm8k.jsonl"), "--num-questions", "10", "--num-shots", "2", "--parallel", "4",
        "--port", str(port), "--max-new-tokens", "16", "--output-file", "answers.txt"])
    metrics = few_shot_gsm8k.run_eval(args)
    printed = capsys.readouterr().out
    assert f"Accuracy: {metrics['accuracy']:.3f}" in printed
    assert f"Invalid: {metrics['invalid']:.3f}" in printed
    assert f"Latency: {metrics['latency']:.3f} s" in printed
    assert 0.0 <= metrics["accuracy"] <= 1.0 and 0.0 <= metrics["invalid"] <= 1.0
    assert metrics["accuracy"] + metrics["invalid"] <= 1.0
    # Throughput counts the server's completion tokens: 10 answers of at most 16 tokens.
    assert 0 < metrics["output_throughput"] * metrics["latency"] <= 160 + 1e-6
    dump = (tmp_path / "answers.txt").read_text()
    assert dump.count("Question:") >= 10
    assert sorted(os.listdir(tmp_path)) == ["answers.txt", "gsm8k.jsonl"]
