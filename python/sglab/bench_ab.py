"""A/B a patch end to end: the same server and workload with the patch off and on.

    python -m sglab.bench_ab --patch 0001 --model-path DIR [--server-args "..."] \\
        [--repeats 2] [--out-dir DIR] -- --dataset-name random-ids --num-prompts 64 ...

Rounds alternate off, on, off, on; each launches a fresh server, runs bench_serving (fixed
seed, greedy, `--output-details`), reads `/get_server_info`, and stops the server. The report
gives medians per variant, the on/off ratio and its spread across rounds, syncs per step, and
whether outputs were token-identical.

The sync audit itself costs time per sync it sees (on CUDA each one is a Python warning), which
would slow the patch-off variant only. So by default (`--audit first`) only the first round
runs with `--enable-sync-audit` and gives the sync counts, and the timings come from the other
rounds; with a single round, or `--audit all`, every round is both audited and timed.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shlex
import signal
import statistics
import sys
import tempfile
import time

import requests

from sglab import bench_serving
from sglab.srt.patches import PATCH_BY_ID
from sglab.srt.utils.process import kill_server, popen_launch_server

METRICS = ["median_ttft_ms", "median_tpot_ms", "median_itl_ms", "p95_itl_ms",
           "output_throughput"]


def variant_flags(patch: str, on: bool) -> list[str]:
    if patch == "all":
        return ["--patches", "all" if on else "none"]
    p = PATCH_BY_ID[patch]
    return [f"--{'enable' if on else 'disable'}-{p.cli}"]


def run_variant(args: argparse.Namespace, on: bool, workloads: list[list[str]],
                audited: bool = True) -> list[dict]:
    """One server launch; each workload (a bench_serving argv) runs against it in turn."""
    server_argv = ["--model-path", args.model_path, *shlex.split(args.server_args),
                   *variant_flags(args.patch, on)]
    if audited:
        server_argv.append("--enable-sync-audit")
    server = popen_launch_server(server_argv, timeout=args.launch_timeout)
    try:
        return [_run_workload(server.base_url, on, audited, argv) for argv in workloads]
    finally:
        kill_server(server)


def _audit(base_url: str) -> tuple[dict, dict | None]:
    info = requests.get(f"{base_url}/get_server_info", timeout=30).json()
    return info, (info.get("internal_states") or [{}])[0].get("sync_audit")


def _audit_delta(before: dict | None, after: dict | None) -> dict | None:
    """The audit of one workload: counts since `before` (warmup, earlier workloads)."""
    if not after:
        return after
    before = before or {"steps": 0, "totals": {}}
    steps = after["steps"] - before["steps"]
    totals = {region: {kind: n - before["totals"].get(region, {}).get(kind, 0)
                       for kind, n in kinds.items()}
              for region, kinds in after["totals"].items()}
    total = sum(sum(k.values()) for k in totals.values())
    return {"enabled": after["enabled"], "steps": steps,
            "syncs_per_step": total / steps if steps else 0.0, "totals": totals,
            "per_step": {r: {k: n / steps for k, n in kinds.items()}
                         for r, kinds in totals.items()} if steps else {}}


def _run_workload(base_url: str, on: bool, audited: bool, bench_argv: list[str]) -> dict:
    _, audit_before = _audit(base_url)
    out_file = tempfile.NamedTemporaryFile(suffix=".jsonl", delete=False).name
    bargs = bench_serving.parse_args([
        "--backend", "sglab", "--base-url", base_url, "--output-file", out_file,
        "--output-details", "--disable-tqdm", *bench_argv])
    result = bench_serving.run_benchmark(bargs)
    info, audit_after = _audit(base_url)
    return {"on": on, "audited": audited,
            "result": {k: result.get(k) for k in METRICS + ["completed"]},
            "itls": [x for per_req in result.get("itls", []) for x in per_req],
            "generated_texts": result.get("generated_texts", []),
            "output_ids": result.get("output_ids", []),
            "output_lens": result.get("output_lens", []),
            "sync_audit": _audit_delta(audit_before, audit_after),
            "active_patches": info.get("active_patches")}


def summarize(runs: list[dict]) -> dict:
    timed = [r for r in runs if not r["audited"]] or runs
    audited = [r for r in runs if r["audited"]] or runs
    off = [r for r in timed if not r["on"]]
    on = [r for r in timed if r["on"]]
    summary = {"timed_runs": len(timed)}
    for m in METRICS:
        off_v = [r["result"][m] for r in off if r["result"][m] is not None]
        on_v = [r["result"][m] for r in on if r["result"][m] is not None]
        if not off_v or not on_v:
            continue
        ratios = [b / a for a, b in zip(off_v, on_v) if a]
        summary[m] = {"off": statistics.median(off_v), "on": statistics.median(on_v),
                      "ratio": statistics.median(ratios) if ratios else None,
                      "ratio_min": min(ratios, default=None),
                      "ratio_max": max(ratios, default=None)}
    summary["syncs_per_step"] = {
        "off": statistics.median(_syncs(r) for r in audited if not r["on"]),
        "on": statistics.median(_syncs(r) for r in audited if r["on"])}
    summary["outputs_identical"] = all(_outputs(r) == _outputs(runs[0]) for r in runs)
    return summary


def _outputs(run: dict) -> list:
    """Token ids where the server reports them (native /generate), else the texts: streamed
    text can differ between runs with identical tokens, by where chunks split invalid UTF-8."""
    if any(run.get("output_ids") or []):
        return run["output_ids"]
    return [run["generated_texts"], run["output_lens"]]


def _syncs(run: dict) -> float:
    audit = run.get("sync_audit") or {}
    return float(audit.get("syncs_per_step", 0.0))


def to_markdown(report: dict) -> str:
    s = report["summary"]
    lines = [f"# bench_ab: patch {report['patch']}", "",
             f"model `{report['model_path']}`, server args `{report['server_args']}`, "
             f"bench args `{' '.join(report['bench_args'])}`, {report['repeats']} rounds "
             f"(off/on alternating), commit {report.get('commit', 'unknown')}; timings from "
             f"{s['timed_runs']} runs{_timed_note(report)}", "",
             "| metric | off (median) | on (median) | on/off | spread across rounds |",
             "|---|---|---|---|---|"]
    for m in METRICS:
        if m in s:
            v = s[m]
            lines.append(f"| {m} | {v['off']:.3f} | {v['on']:.3f} | {v['ratio']:.3f} | "
                         f"{v['ratio_min']:.3f} – {v['ratio_max']:.3f} |")
    sy = s["syncs_per_step"]
    lines += ["", f"Audited host syncs + pageable H2D per step: off {sy['off']:.2f}, "
              f"on {sy['on']:.2f}", f"Outputs token-identical off vs on: "
              f"{'yes' if s['outputs_identical'] else 'NO'}"]
    if not s["outputs_identical"]:  # which runs differ: off vs on, or run to run
        lines.append("Output digests by run: " + ", ".join(
            f"{'on' if r['on'] else 'off'} r{i // 2 + 1} `{r['output_digest']}`"
            for i, r in enumerate(report["runs"])))
    return "\n".join(lines) + "\n"


def _timed_note(report: dict) -> str:
    audited = sum(r["audited"] for r in report["runs"])
    if audited == len(report["runs"]):
        return " (all audited)"
    return f" (without the audit; {audited} audited runs gave the sync counts)"


def plot_itls(runs: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    timed = [r for r in runs if not r["audited"]] or runs
    fig, ax = plt.subplots(figsize=(7, 4))
    for on, label in ((False, "patch off"), (True, "patch on")):
        itls = [x * 1e3 for r in timed if r["on"] == on for x in r["itls"]]
        if itls:
            ax.hist(itls, bins=60, alpha=0.55, label=label)
    ax.set_xlabel("inter-token latency (ms)")
    ax.set_ylabel("count")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m sglab.bench_ab")
    parser.add_argument("--patch", required=True, help="patch id, or all")
    parser.add_argument("--model-path", required=True)
    parser.add_argument("--server-args", default="", help="extra launch_server arguments")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--out-dir", default="benchmark/results")
    parser.add_argument("--tag", default=None, help="file name stem (default: date + patch)")
    parser.add_argument("--launch-timeout", type=float, default=600.0)
    parser.add_argument("--audit", choices=["first", "all", "none"], default="first",
                        help="rounds run with --enable-sync-audit (first: round 1 only, and "
                             "timings from the others when there are others)")
    parser.add_argument("--request-rates", type=float, nargs="+", default=None,
                        help="one workload per rate against the same server launch (each "
                             "gets its own report, file stem + -rate<R>)")
    parser.add_argument("bench_args", nargs=argparse.REMAINDER,
                        help="after --: bench_serving arguments")
    args = parser.parse_args(argv)
    # SIGTERM (e.g. from `timeout`) unwinds through run_variant's finally, which stops the
    # server; otherwise the server outlives us holding its GPU memory.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    if args.patch != "all" and args.patch not in PATCH_BY_ID:
        parser.error(f"--patch: unknown patch id {args.patch!r} "
                     f"(known: {', '.join(PATCH_BY_ID)}, all)")
    bench_argv = [a for a in args.bench_args if a != "--"]
    if "--seed" not in bench_argv:
        bench_argv += ["--seed", "1"]
    workloads = [(f"-rate{_fmt_rate(r)}", bench_argv + ["--request-rate", str(r)])
                 for r in args.request_rates] if args.request_rates else [("", bench_argv)]
    launches = []
    for i in range(args.repeats):
        for on in (False, True):
            launches.append(run_variant(args, on, [w for _, w in workloads],
                                        args.audit == "all" or (i == 0 and args.audit == "first")))
    stem = os.path.join(args.out_dir, args.tag or
                        f"{time.strftime('%Y-%m-%d')}-bench-ab-{args.patch}")
    reports = [_write_report(args, w, [launch[j] for launch in launches], stem + suffix)
               for j, (suffix, w) in enumerate(workloads)]
    return reports[0] if len(reports) == 1 else {"reports": reports}


# Per-request lists kept out of the JSON report (the digest stands for the outputs).
_PER_TOKEN_KEYS = ("itls", "generated_texts", "output_ids")


def _digest(run: dict) -> str:
    """Which runs produced the same tokens, when outputs are not identical across all."""
    data = json.dumps(_outputs(run)).encode()
    return hashlib.sha1(data).hexdigest()[:12]


def _fmt_rate(rate: float) -> str:
    return str(int(rate)) if float(rate).is_integer() else str(rate)


def _write_report(args: argparse.Namespace, bench_argv: list[str], runs: list[dict],
                  stem: str) -> dict:
    report = {"patch": args.patch, "model_path": args.model_path,
              "server_args": args.server_args, "bench_args": bench_argv,
              "repeats": args.repeats, "commit": _commit(), "summary": summarize(runs),
              "runs": [{**{k: v for k, v in r.items() if k not in _PER_TOKEN_KEYS},
                        "output_digest": _digest(r)} for r in runs]}
    os.makedirs(os.path.dirname(stem) or ".", exist_ok=True)
    with open(stem + ".json", "w") as f:
        json.dump(report, f, indent=1)
    with open(stem + ".md", "w") as f:
        f.write(to_markdown(report))
    plot_itls(runs, stem + ".png")
    print(to_markdown(report), flush=True)
    return report


def _commit() -> str:
    import subprocess

    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                             text=True, cwd=os.path.dirname(os.path.abspath(__file__)))
        return out.stdout.strip() or "unknown"
    except OSError:
        return "unknown"


if __name__ == "__main__":
    main()
