"""Upstream's determinism check against a live server, once per patch-0002 index build.

    python benchmark/deterministic_served.py --model-path DIR --out DIR [--n-trials 12]

For each build (loop = patch 0002 off, batched = the PR, kernel = upstream main) a server with
--enable-deterministic-inference runs `sglab.test.test_deterministic` in every mode. Writes
DIR/deterministic-served-<build>.log (the client's own lines) and DIR/deterministic-served.md.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import sys

sys.path.insert(0, os.path.dirname(__file__))
from gpu_bench import write_results  # noqa: E402

from sglab.srt.utils.process import kill_server, popen_launch_server
from sglab.srt.utils.provenance import add_provenance_args, provenance, provenance_line
from sglab.test import test_deterministic as client

BUILDS = {"loop": ["--disable-sync-free-unified-extend"],
          "batched": ["--unified-index-build", "batched"],
          "kernel": ["--unified-index-build", "kernel"]}
MODES = ["single", "mixed", "prefix", "radix_cache", "p_vs_d"]


def run_build(args: argparse.Namespace, build: str) -> dict:
    server = popen_launch_server(["--model-path", args.model_path, *args.server_args.split(),
                                  "--enable-deterministic-inference", *BUILDS[build]])
    port = server.base_url.rsplit(":", 1)[1]
    counts, log = {}, io.StringIO()
    try:
        for mode in MODES:
            print(f"== {mode}", file=log)
            with contextlib.redirect_stdout(log):
                counts[mode] = client.main([
                    "--port", port, "--test-mode", mode, "--n-trials", str(args.n_trials),
                    "--max-new-tokens", str(args.max_new_tokens), "--return-logprob"])
    finally:
        kill_server(server)
        with open(os.path.join(args.out, f"deterministic-served-{build}.log"), "w") as f:
            f.write(log.getvalue())
    return counts


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model-path", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--server-args", default="--load-format dummy --cuda-graph-max-bs 32")
    parser.add_argument("--builds", nargs="+", default=list(BUILDS), choices=list(BUILDS))
    parser.add_argument("--n-trials", type=int, default=12)
    parser.add_argument("--max-new-tokens", type=int, default=48)
    add_provenance_args(parser)
    args = parser.parse_args()
    os.makedirs(args.out, exist_ok=True)
    results = {b: run_build(args, b) for b in args.builds}
    prov = provenance(args.commit)
    lines = ["# Deterministic inference against a live server, per 0002 index build", "",
             provenance_line(prov), "",
             f"`python benchmark/deterministic_served.py --model-path {args.model_path} "
             f"--n-trials {args.n_trials} --max-new-tokens {args.max_new_tokens}` (server "
             f"args `{args.server_args} --enable-deterministic-inference`)", "",
             "Unique samples per prompt (1 = deterministic, 0 = the prompt was not drawn); "
             "p_vs_d: sequences whose decode logprobs equal their prefill logprobs.", "",
             "| build | " + " | ".join(MODES) + " |", "|---|" + "---|" * len(MODES)]
    for b, counts in results.items():
        cells = [f"{sum(c)}/{len(c)}" if m == "p_vs_d" else ", ".join(map(str, c))
                 for m, c in counts.items()]
        lines.append(f"| {b} | " + " | ".join(cells) + " |")
    write_results(args.out, "deterministic-served", {"provenance": prov, "results": results},
                  "\n".join(lines) + "\n")
    sys.exit(0 if all(all(x <= 1 for x in c) for r in results.values() for c in r.values())
             else 1)


if __name__ == "__main__":
    main()
