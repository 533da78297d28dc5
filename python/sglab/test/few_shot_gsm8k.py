"""Few-shot GSM-8K accuracy client for an SGLang-compatible server (native `/generate`).

Same prompt, requests, scoring and printed lines as SGLang's `python -m sglang.test.few_shot_gsm8k`,
so scores are comparable with upstream's (including its quirk: the few-shot examples are the first
`num_shots` rows of test.jsonl, which are also the first evaluated questions).

Usage:
    python -m sglab.test.few_shot_gsm8k --data-path test.jsonl --num-questions 200 --port 30000

Each prompt with its answer is written only when asked, to --output-file (upstream writes
tmp_output_gsm8k.txt into the current directory every time).
"""

from __future__ import annotations

import argparse
import ast
import json
import os
import re
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import requests
from tqdm import tqdm

INVALID = -9999999
GSM8K_URL = (
    "https://raw.githubusercontent.com/openai/grade-school-math/master/"
    "grade_school_math/data/test.jsonl"
)
CACHE_DIR = "/tmp"
STOP_STRINGS = ["Question", "Assistant:", "<|separator|>"]
# The frontend pre-caches a constant prompt prefix only when it is longer than this.
MIN_CACHED_PREFIX_CHARS = 64


def get_one_example(lines: list[dict], i: int, include_answer: bool) -> str:
    ret = "Question: " + lines[i]["question"] + "\nAnswer:"
    if include_answer:
        ret += " " + lines[i]["answer"]
    return ret


def get_few_shot_examples(lines: list[dict], k: int) -> str:
    return "".join(get_one_example(lines, i, True) + "\n\n" for i in range(k))


def get_answer_value(answer_str: str) -> int:
    """Last run of digits after removing commas; INVALID if none (or leading zeros)."""
    numbers = re.findall(r"\d+", answer_str.replace(",", ""))
    if not numbers:
        return INVALID
    try:
        return ast.literal_eval(numbers[-1])
    except SyntaxError:
        return INVALID


def read_jsonl(path: str) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip() and not line.startswith("#")]


def download_and_cache_file(url: str, filename: str | None = None) -> str:
    """Return `filename` (default /tmp/<basename>) if present, else download it there."""
    if filename is None:
        filename = os.path.join(CACHE_DIR, url.split("/")[-1])
    if os.path.exists(filename):
        return filename
    print(f"Downloading from {url} to {filename}")
    response = requests.get(url, timeout=(10, 60))
    response.raise_for_status()
    tmp = f"{filename}.{os.getpid()}.part"
    with open(tmp, "wb") as f:
        f.write(response.content)
    os.replace(tmp, filename)
    return filename


def resolve_data_path(data_path: str | None) -> str:
    """An explicit path must exist; None means the cached /tmp/test.jsonl, downloaded if absent."""
    if data_path is not None:
        if not os.path.isfile(data_path):
            raise FileNotFoundError(f"--data-path {data_path!r} is not a file")
        return data_path
    try:
        return download_and_cache_file(GSM8K_URL)
    except Exception as e:
        raise RuntimeError(
            f"No GSM-8K data: {os.path.join(CACHE_DIR, 'test.jsonl')} is absent and downloading "
            f"{GSM8K_URL} failed ({type(e).__name__}: {e}). Pass --data-path /path/to/test.jsonl."
        ) from e


def get_base_url(host: str, port: int) -> str:
    if "://" in host:
        warnings.warn(
            "A scheme in --host is deprecated; pass --host 127.0.0.1", DeprecationWarning, 2
        )
        return f"{host}:{port}"
    return f"http://{host}:{port}"


def build_generate_body(prompt: str, max_new_tokens: int, temperature: float) -> dict[str, Any]:
    """The body SGLang's frontend sends for `sgl.gen(max_tokens, stop)` on `/generate`."""
    return {
        "text": prompt,
        "sampling_params": {
            "skip_special_tokens": True,
            "spaces_between_special_tokens": True,
            "max_new_tokens": max_new_tokens,
            "min_new_tokens": 0,
            "n": 1,
            "stop": list(STOP_STRINGS),
            "stop_token_ids": [],
            "stop_regex": [],
            "temperature": temperature,
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


def _post_generate(base_url: str, body: dict[str, Any]) -> dict[str, Any]:
    resp = requests.post(base_url + "/generate", json=body, timeout=None)
    if resp.status_code != 200:
        raise RuntimeError(f"/generate returned {resp.status_code}: {resp.text}")
    return resp.json()


def get_model_info(base_url: str) -> dict[str, Any]:
    resp = requests.get(base_url + "/get_model_info", timeout=60)
    if resp.status_code != 200:
        raise RuntimeError(f"/get_model_info returned {resp.status_code}: {resp.text}")
    info = resp.json()
    if "model_path" not in info:
        raise RuntimeError(f"/get_model_info has no model_path: {info}")
    return info


def dump_state_text(filename: str, texts: list[str]) -> None:
    with open(filename, "w") as f:
        f.writelines(
            "=" * 40 + f" {i} " + "=" * 40 + "\n" + text + "\n" + "=" * 80 + "\n\n"
            for i, text in enumerate(texts)
        )


def run_eval(args: Any) -> dict[str, float]:
    """Run the eval against `args.host:args.port`; prints four lines and returns the metrics."""
    max_new_tokens = getattr(args, "max_new_tokens", 512)
    temperature = getattr(args, "temperature", 0.0)
    base_url = get_base_url(args.host, args.port)
    get_model_info(base_url)

    lines = read_jsonl(resolve_data_path(getattr(args, "data_path", None)))
    few_shot_examples = get_few_shot_examples(lines, args.num_shots)
    questions, labels = [], []
    for i in range(len(lines[: args.num_questions])):
        questions.append(get_one_example(lines, i, False))
        labels.append(get_answer_value(lines[i]["answer"]))
    assert all(label != INVALID for label in labels)
    prompts = [few_shot_examples + q for q in questions]

    def answer(prompt: str) -> tuple[str, int]:
        out = _post_generate(base_url, build_generate_body(prompt, max_new_tokens, temperature))
        return out["text"], out["meta_info"]["completion_tokens"]

    tic = time.perf_counter()
    if len(prompts) > 1 and len(few_shot_examples) > MIN_CACHED_PREFIX_CHARS:
        _post_generate(
            base_url, {"text": few_shot_examples, "sampling_params": {"max_new_tokens": 0}}
        )
    with ThreadPoolExecutor(max_workers=max(1, args.parallel)) as pool:
        results = list(tqdm(pool.map(answer, prompts), total=len(prompts)))
    latency = time.perf_counter() - tic

    preds = [get_answer_value(text) for text, _ in results]
    acc = float(np.mean(np.array(preds) == np.array(labels)))
    invalid = float(np.mean(np.array(preds) == INVALID))
    output_throughput = sum(n for _, n in results) / latency

    print(f"Accuracy: {acc:.3f}")
    print(f"Invalid: {invalid:.3f}")
    print(f"Latency: {latency:.3f} s")
    print(f"Output throughput: {output_throughput:.3f} token/s")
    output_file = getattr(args, "output_file", None)
    if output_file:
        dump_state_text(output_file, [p + t for p, (t, _) in zip(prompts, results)])
    return {
        "accuracy": acc,
        "invalid": invalid,
        "latency": latency,
        "output_throughput": output_throughput,
    }


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="Few-shot GSM-8K accuracy.")
    parser.add_argument("--num-shots", type=int, default=5)
    parser.add_argument(
        "--data-path", type=str, default=None, help="test.jsonl; default /tmp/test.jsonl"
    )
    parser.add_argument("--num-questions", type=int, default=200)
    parser.add_argument("--max-new-tokens", type=int, default=512)
    parser.add_argument("--parallel", type=int, default=128)
    parser.add_argument("--host", type=str, default="127.0.0.1")
    parser.add_argument("--port", type=int, default=30000)
    parser.add_argument("--temperature", type=float, default=0.0)
    parser.add_argument(
        "--output-file", type=str, default=None, help="write each prompt and its answer here"
    )
    return parser


def main(argv: list[str] | None = None) -> dict[str, float]:
    return run_eval(build_parser().parse_args(argv))


if __name__ == "__main__":
    main()
