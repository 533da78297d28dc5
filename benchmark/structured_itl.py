"""Decode ITL of JSON-schema-constrained requests vs the same requests unconstrained.

    python benchmark/structured_itl.py --model-path DIR --out DIR [--rounds 6]

One server; bench_serving (sglab backend, random ids, concurrency 8) alternates the two
workloads in ABBA order over the rounds, the constrained one with `--json-schema SCHEMA`
(a simple object). Per-request ITLs of every round are compared with bench_stats (median
ratio constrained / unconstrained, 95% bootstrap interval). Writes DIR/structured-itl.json
and DIR/structured-itl.md. The target: within 10% at concurrency 8.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from types import SimpleNamespace

sys.path.insert(0, os.path.dirname(__file__))
from gpu_bench import write_results  # noqa: E402

from sglab.bench_serving import run_benchmark
from sglab.bench_stats import compare
from sglab.srt.utils.process import kill_server, popen_launch_server
from sglab.srt.utils.provenance import add_provenance_args, provenance, provenance_line

SCHEMA = {"type": "object", "required": ["name", "age", "tags"], "properties": {
    "name": {"type": "string"}, "age": {"type": "integer"},
    "tags": {"type": "array", "items": {"type": "string"}}}}
VARIANTS = ("unconstrained", "json_schema")


def run_round(args: argparse.Namespace, base_url: str, variant: str) -> dict:
    bench = SimpleNamespace(
        backend="sglang", base_url=base_url, tokenizer=args.model_path,
        dataset_name="random-ids", random_range_ratio=1.0, num_prompts=args.num_prompts,
        random_input_len=args.input_len, random_output_len=args.output_len,
        max_concurrency=args.concurrency, disable_tqdm=True, seed=1,
        json_schema=json.dumps(SCHEMA) if variant == "json_schema" else None,
        output_file=os.path.join(args.out, "structured-itl.jsonl"), tag=variant)
    record = run_benchmark(bench)
    return {"itls": [x for x in record["itls"] if x], "completed": record["completed"],
            "median_itl_ms": record["median_itl_ms"], "output_tokens":
            record["total_output_tokens"], "errors": sum(map(bool, record["errors"]))}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model-path", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--server-args", default="--load-format dummy --cuda-graph-max-bs 32")
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--num-prompts", type=int, default=32)
    parser.add_argument("--input-len", type=int, default=128)
    parser.add_argument("--output-len", type=int, default=128)
    add_provenance_args(parser)
    args = parser.parse_args()
    os.makedirs(args.out, exist_ok=True)
    server = popen_launch_server(["--model-path", args.model_path, *args.server_args.split()])
    runs: dict[str, list[dict]] = {v: [] for v in VARIANTS}
    try:
        for variant in VARIANTS:  # warm-up (graph capture, grammar compilation), not kept
            run_round(args, server.base_url, variant)
        for r in range(args.rounds):  # ABBA
            order = VARIANTS if r % 2 == 0 else VARIANTS[::-1]
            for variant in order:
                runs[variant].append(run_round(args, server.base_url, variant))
    finally:
        kill_server(server)
    itl = compare("itl", [x for run in runs["unconstrained"] for x in run["itls"]],
                  [x for run in runs["json_schema"] for x in run["itls"]],
                  higher_is_better=False)
    prov = provenance(args.commit)
    lines = ["# Structured decoding: decode ITL with a JSON schema vs unconstrained", "",
             provenance_line(prov), "",
             f"`python benchmark/structured_itl.py --model-path {args.model_path} --rounds "
             f"{args.rounds} --concurrency {args.concurrency}` (server args "
             f"`{args.server_args}`), {args.num_prompts} prompts of {args.input_len} tokens, "
             f"{args.output_len} output tokens, schema `{json.dumps(SCHEMA)}`", "",
             "| variant | median ITL per round (ms) | output tokens per round | errors |",
             "|---|---|---|---|"]
    for variant, rounds in runs.items():
        medians = ", ".join(f"{run['median_itl_ms']:.3f}" for run in rounds)
        tokens = ", ".join(str(run["output_tokens"]) for run in rounds)
        errors = sum(run["errors"] for run in rounds)
        lines.append(f"| {variant} | {medians} | {tokens} | {errors} |")
    ci = "n/a" if itl.ci_low is None else f"{itl.ci_low:.3f} .. {itl.ci_high:.3f}"
    lines += ["", f"Median ITL ratio json_schema / unconstrained: {itl.ratio:.3f} (95% CI "
              f"{ci}, requests resampled; {itl.verdict}); target <= 1.10."]
    write_results(args.out, "structured-itl", {"provenance": prov, "schema": SCHEMA,
                                               "runs": runs, "itl": dataclasses.asdict(itl)},
                  "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
