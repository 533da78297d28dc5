"""Few-shot GSM-8K against a running server, appending a result line to --result-file.

Arguments and result line as SGLang's benchmark/gsm8k/bench_sglang.py:
    python benchmark/gsm8k/bench_sglab.py --num-questions 200 --parallel 64 --port 30000
"""

from __future__ import annotations

import argparse
import json
import os
from types import SimpleNamespace

from sglab.test.few_shot_gsm8k import run_eval


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="Few-shot GSM-8K accuracy (bench_sglang style).")
    parser.add_argument("--num-shots", type=int, default=5)
    parser.add_argument(
        "--data-path", type=str, default="test.jsonl", help="Falls back to /tmp/test.jsonl."
    )
    parser.add_argument("--num-questions", type=int, default=200)
    parser.add_argument("--parallel", type=int, default=64)
    parser.add_argument("--host", type=str, default="127.0.0.1")
    parser.add_argument("--port", type=int, default=30000)
    parser.add_argument("--backend", type=str, default="srt", choices=["srt"])
    parser.add_argument("--device", type=str, default="auto")
    parser.add_argument("--result-file", type=str, default="result.jsonl")
    parser.add_argument("--raw-result-file", type=str, default=None)
    return parser


def main(args: argparse.Namespace) -> dict[str, float]:
    metrics = run_eval(
        SimpleNamespace(
            num_shots=args.num_shots,
            data_path=args.data_path if os.path.isfile(args.data_path) else None,
            num_questions=args.num_questions,
            max_new_tokens=512,
            temperature=0.0,
            parallel=args.parallel,
            host=args.host,
            port=args.port,
            output_file=f"tmp_output_{args.backend}.txt",
        )
    )
    with open(args.result_file, "a") as fout:
        value = {
            "task": "gsm8k",
            "backend": args.backend,
            "num_gpus": 1,
            "latency": round(metrics["latency"], 3),
            "accuracy": round(metrics["accuracy"], 3),
            "num_requests": args.num_questions,
            "other": {"num_questions": args.num_questions, "parallel": args.parallel},
        }
        fout.write(json.dumps(value) + "\n")
    return metrics


if __name__ == "__main__":
    main(build_parser().parse_args())
