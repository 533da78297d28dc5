"""A/B a patch end to end: the same servers and workload with the patch off and on.

    python -m sglab.bench_ab --patch 0001 --model-path DIR [--variants off on:pr on:packed] \\
        [--rounds 6] [--restart-each-round] [--audit first|all|none] [--server-args "..."] \\
        [--commit SHA] [--out-dir DIR] [--tag T] -- --dataset-name random-ids --num-prompts 64 ...

`--feature="ARGS"` instead of `--patch` A/Bs any server option that is not a patch (sglab's own,
such as `--enable-prefill-cuda-graph` or `--kernel-fusion on`): `off` launches without ARGS,
`on` with them.

Variants: `off`, `on` (the patch's default on path) and, for a patch with sub-modes, `on:MODE`;
each non-off variant is reported against `off`. A round is one bench_serving run (fixed seed,
greedy, `--output-details`) against a variant's server, from an empty radix cache; rounds go in
ABBA order (`bench_stats.abba_order`), `--rounds` per variant, the first of each a warm-up kept
in the report and left out of the statistics. By default each variant's server is launched once,
side by side before the first round, and all stay alive while the rounds alternate between
them; as they share one GPU and the KV pool is sized from the free memory, a KV cap
(`--max-total-tokens`, `--kv-cap-tokens`) is added to every server when the user set none, so
each variant gets the same pool; for a hybrid
(linear-attention) model the state pool is capped the same way (`--max-mamba-cache-size`,
`--mamba-cap-slots`), as it too is sized from the free memory.
`--restart-each-round` launches a fresh server per round instead.

Every run's requests must be the same: bench_serving records a digest per request sent (token
ids or text, sampling parameters), and bench_ab refuses to compare runs that differ, naming the
requests. Outputs are compared by a digest of the token ids.

The sync audit costs time per sync it sees (on CUDA each one is a Python warning), which would
slow the patch-off variant only, so by default no timed round is audited: `--audit first` counts
syncs in each variant's warm-up round (on a live server, switched on for that round only
through `/set_internal_state`); `--audit all` audits every server, timed rounds included;
`none` skips it.
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
from dataclasses import dataclass

import requests

from sglab import bench_serving, bench_stats
from sglab.srt.patches import PATCH_BY_ID, PATCHES
from sglab.srt.utils.process import (ServerProcess, kill_server, popen_launch_server,
                                     popen_launch_servers)
from sglab.srt.utils.provenance import add_provenance_args, provenance, provenance_line

# Round metrics: one value per round, from bench_serving's result (name, higher is better).
ROUND_METRICS = [("output_throughput", True), ("median_ttft_ms", False),
                 ("median_tpot_ms", False), ("median_itl_ms", False), ("p95_itl_ms", False),
                 ("median_e2e_latency_ms", False)]
# Request metrics: per-request samples pooled over the timed rounds (name, run key, percentile).
REQUEST_METRICS = [("pooled_ttft_p50_ms", "ttfts_ms", 50), ("pooled_ttft_p95_ms", "ttfts_ms", 95),
                   ("pooled_itl_p50_ms", "itls_ms", 50), ("pooled_itl_p95_ms", "itls_ms", 95)]
# 7-9 GiB of KV for the Qwen3-0.6B / Llama-3.1-8B / Qwen3-8B shapes (112-144 KiB a token): three
# 8B servers and their weights fit one H200; far above what the A/B workloads hold at once.
DEFAULT_KV_CAP_TOKENS = 65536
DEFAULT_MAMBA_CAP_SLOTS = 256


class InputsDifferError(ValueError):
    """Two runs sent different requests: their timings and outputs do not compare."""


# ----------------------------------------------------------------------------------------------
# Variants and the plan
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Variant:
    name: str  # off, on, on:MODE
    flags: tuple[str, ...]  # launch_server arguments that select it


def parse_variants(patch: str, specs: list[str]) -> list[Variant]:
    """`off` first, then the on-variants in the given order; ValueError names a bad spec."""
    if len(set(specs)) != len(specs) or "off" not in specs or len(specs) < 2:
        raise ValueError(f"--variants: need `off` and at least one on-variant, each once "
                         f"(got {' '.join(specs)})")
    return [_variant(patch, s) for s in ["off"] + [s for s in specs if s != "off"]]


def feature_variants(feature: str, specs: list[str]) -> list[Variant]:
    """`--feature`: off without the option's arguments, on with them."""
    if sorted(specs) != ["off", "on"]:
        raise ValueError(f"--variants: --feature has off and on only (got {' '.join(specs)})")
    args = tuple(shlex.split(feature))
    if not args or not args[0].startswith("--"):
        raise ValueError(f"--feature: launch_server arguments, e.g. \"--enable-prefill-cuda-"
                         f"graph\" (got {feature!r})")
    return [Variant("off", ()), Variant("on", args)]


def _variant(patch: str, spec: str) -> Variant:
    on, _, mode = spec.partition(":")
    if on not in ("on", "off") or (on == "off" and mode):
        raise ValueError(f"--variants: {spec!r} is not off, on or on:MODE")
    if patch == "all":
        if mode:
            raise ValueError("--variants: --patch all has no modes (use off, on)")
        return Variant(spec, ("--patches", "all" if on == "on" else "none"))
    p = PATCH_BY_ID[patch]
    flags = (f"--{'enable' if on == 'on' else 'disable'}-{p.cli}",)
    if mode and mode not in p.modes:
        modes = ", ".join(f"on:{m}" for m in p.modes) or "none"
        raise ValueError(f"--variants: patch {patch} has no mode {mode!r} (modes: {modes})")
    return Variant(spec, flags + ((p.mode_cli, mode) if mode else ()))


@dataclass(frozen=True)
class Step:
    """One run: a variant's round (from 1); `--audit first` audits the warm-up rounds."""

    variant: str
    round: int
    warmup: bool
    audited: bool

    @property
    def timed(self) -> bool:
        return not self.warmup

    @property
    def label(self) -> str:
        return f"{self.variant} r{self.round}"


def plan_steps(variants: list[str], rounds: int, audit: str) -> list[Step]:
    """The ABBA rounds in execution order."""
    order = bench_stats.abba_order(variants, rounds)
    seen: dict[str, int] = {}
    steps = []
    for v, warm in zip(order, bench_stats.warmup_flags(order)):
        seen[v] = seen.get(v, 0) + 1
        steps.append(Step(v, seen[v], warm, audit == "all" or (audit == "first" and warm)))
    return steps


# ----------------------------------------------------------------------------------------------
# Servers
# ----------------------------------------------------------------------------------------------


class ServerSet:
    """The variants' servers. Live servers (one per variant) are reused across rounds; fresh
    ones serve one step. Leaving the block stops every server, on error or SIGTERM too."""

    def __init__(self, args: argparse.Namespace, variants: list[Variant], kv_cap: list[str]):
        self.args = args
        self.variants = {v.name: v for v in variants}
        self.kv_cap = kv_cap
        self.live: dict[str, ServerProcess] = {}
        self.fresh: list[ServerProcess] = []

    def __enter__(self) -> ServerSet:
        return self

    def __exit__(self, *exc) -> None:
        # A second SIGTERM must not cut the cleanup short.
        previous = signal.signal(signal.SIGTERM, signal.SIG_IGN)
        try:
            for server in [*self.live.values(), *self.fresh]:
                kill_server(server)
        finally:
            signal.signal(signal.SIGTERM, previous)

    def server_for(self, step: Step) -> tuple[ServerProcess, bool]:
        """(server, is_fresh): a fresh launch per step with --restart-each-round. A live
        server is launched audited only under `--audit all`."""
        if self.args.restart_each_round:
            self.fresh.append(self._launch(step.variant, step.audited))
            return self.fresh[-1], True
        if not self.live:
            self.launch_live()
        return self.live[step.variant], False

    def launch_live(self) -> None:
        """Every variant's live server, launched side by side: one launch's wait, not one
        per variant."""
        names = list(self.variants)
        audited = self.args.audit == "all"
        servers = popen_launch_servers([self.argv(v, audited) for v in names],
                                       timeout=self.args.launch_timeout)
        self.live = dict(zip(names, servers))

    def stop(self, server: ServerProcess) -> None:
        kill_server(server)
        self.fresh.remove(server)

    def argv(self, variant: str, audited: bool) -> list[str]:
        argv = ["--model-path", self.args.model_path, *shlex.split(self.args.server_args),
                *self.kv_cap, *self.variants[variant].flags]
        return argv + ["--enable-sync-audit"] if audited else argv

    def _launch(self, variant: str, audited: bool) -> ServerProcess:
        return popen_launch_server(self.argv(variant, audited), timeout=self.args.launch_timeout)


def _user_sets(server_args: str, flag: str) -> bool:
    return any(a == flag or a.startswith(flag + "=") for a in shlex.split(server_args))


def kv_cap_flags(server_args: str, live_servers: int, cap_tokens: int) -> list[str]:
    """`--max-total-tokens CAP` when servers share the device and the user set no cap."""
    if live_servers < 2 or _user_sets(server_args, "--max-total-tokens") or cap_tokens <= 0:
        return []
    return ["--max-total-tokens", str(cap_tokens)]


def mamba_cap_flags(server_args: str, live_servers: int, cap_slots: int,
                    model_path: str) -> list[str]:
    """`--max-mamba-cache-size CAP` for a hybrid model when servers share the device: its
    state pool is otherwise a share of all free memory, leaving none for the next server."""
    if (live_servers < 2 or cap_slots <= 0 or not _is_hybrid(model_path)
            or _user_sets(server_args, "--max-mamba-cache-size")):
        return []
    return ["--max-mamba-cache-size", str(cap_slots)]


def _is_hybrid(model_path: str) -> bool:
    from sglab.srt.configs.mamba_utils import is_hybrid_architecture

    try:
        with open(os.path.join(model_path, "config.json")) as f:
            return is_hybrid_architecture(json.load(f).get("architectures") or [])
    except (OSError, ValueError):
        return False


# ----------------------------------------------------------------------------------------------
# One run
# ----------------------------------------------------------------------------------------------


def _server_info(base_url: str) -> dict:
    return requests.get(f"{base_url}/get_server_info", timeout=30).json()


def _sync_audit(info: dict) -> dict | None:
    return (info.get("internal_states") or [{}])[0].get("sync_audit")


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


def _flush_cache(base_url: str) -> None:
    """Every round starts from an empty radix cache, as on a fresh server."""
    resp = requests.post(f"{base_url}/flush_cache", params={"timeout": 30}, timeout=60)
    if resp.status_code != 200:
        raise RuntimeError(f"flush_cache failed ({resp.status_code}): {resp.text[:200]}")


def _set_sync_audit(base_url: str, enabled: bool) -> None:
    resp = requests.post(f"{base_url}/set_internal_state", timeout=60,
                         json={"server_args": {"enable_sync_audit": enabled}})
    if resp.status_code != 200:
        raise RuntimeError(f"set_internal_state failed ({resp.status_code}): {resp.text[:200]}")


def run_workload(base_url: str, step: Step, bench_argv: list[str],
                 switch_audit: bool = False) -> dict:
    """One bench_serving run against `base_url`; the run record bench_ab keeps. With
    `switch_audit` the server's sync audit is on for this run only."""
    _flush_cache(base_url)
    if switch_audit:
        _set_sync_audit(base_url, True)
    audit_before = _sync_audit(_server_info(base_url))
    with tempfile.TemporaryDirectory() as tmp:
        bargs = bench_serving.parse_args([
            "--backend", "sglab", "--base-url", base_url, "--output-file",
            os.path.join(tmp, "run.jsonl"), "--output-details", "--disable-tqdm", *bench_argv])
        result = bench_serving.run_benchmark(bargs)
    info = _server_info(base_url)
    if switch_audit:
        _set_sync_audit(base_url, False)
    ok = [not e for e in result["errors"]]
    return {"variant": step.variant, "round": step.round, "warmup": step.warmup,
            "audited": step.audited, "timed": step.timed, "label": step.label,
            "result": {m: result.get(m) for m, _ in ROUND_METRICS} | {
                "completed": result["completed"], "requests": len(ok)},
            "ttfts_ms": [t * 1e3 for t, good in zip(result["ttfts"], ok) if good],
            "itls_ms": [[x * 1e3 for x in itl] for itl, good in zip(result["itls"], ok) if good],
            "generated_texts": result["generated_texts"], "output_ids": result["output_ids"],
            "output_lens": result["output_lens"], "input_digest": result["input_digest"],
            "input_digests": result["input_digests"],
            "sync_audit": _audit_delta(audit_before, _sync_audit(info)),
            "active_patches": info.get("active_patches"), "patch_modes": _patch_modes(info),
            "max_total_num_tokens": info.get("max_total_num_tokens")}


def _patch_modes(info: dict) -> dict:
    return {p.id: info.get(p.mode_field) for p in PATCHES if p.mode_field}


def check_same_inputs(first: dict, run: dict) -> None:
    """Raise InputsDifferError, naming the request indices, if `run` sent other requests."""
    a, b = first["input_digests"], run["input_digests"]
    if a == b:
        return
    what = f"{run['label']} and {first['label']} sent different requests"
    if len(a) != len(b):
        raise InputsDifferError(f"{what}: {len(b)} vs {len(a)} requests; refusing to compare")
    idx = [i for i, (x, y) in enumerate(zip(a, b)) if x != y]
    shown = ", ".join(map(str, idx[:20])) + (", ..." if len(idx) > 20 else "")
    raise InputsDifferError(f"{what}: {len(idx)} of {len(a)} differ (request indices "
                            f"{shown}); refusing to compare")


def run_steps(args: argparse.Namespace, variants: list[Variant], steps: list[Step],
              workloads: list[list[str]], kv_cap: list[str]) -> list[list[dict]]:
    """Every step against its server, each workload in turn: runs[workload] in run order.
    With `--time-budget`, a step that would likely end past the budget (its longest step so
    far; a kept-alive server's launch, paid once, not counted) is not started."""
    runs: list[list[dict]] = [[] for _ in workloads]
    start, longest = time.monotonic(), 0.0
    with ServerSet(args, variants, kv_cap) as servers:
        for step in steps:
            if args.time_budget and time.monotonic() - start + longest > args.time_budget:
                break
            began = time.monotonic()
            server, fresh = servers.server_for(step)
            if not fresh:
                began = time.monotonic()
            switch = step.audited and not fresh and args.audit == "first"
            for j, bench_argv in enumerate(workloads):
                run = run_workload(server.base_url, step, bench_argv, switch)
                if runs[j]:
                    check_same_inputs(runs[j][0], run)
                runs[j].append(run)
            if fresh:
                servers.stop(server)
            longest = max(longest, time.monotonic() - began)
    return runs


# ----------------------------------------------------------------------------------------------
# Summary
# ----------------------------------------------------------------------------------------------


def compare_variant(runs: list[dict], variant: str) -> list[bench_stats.Comparison]:
    """`variant` vs off over the timed runs: round metrics, then pooled request metrics."""
    timed = [r for r in runs if r["timed"]]
    off = [r for r in timed if r["variant"] == "off"]
    on = [r for r in timed if r["variant"] == variant]
    samples = [(m, higher, 50, [[r["result"][m] for r in rs if r["result"].get(m) is not None]
                                for rs in (off, on)]) for m, higher in ROUND_METRICS]
    samples += [(m, False, q, [[g for r in rs for g in r[key]] for rs in (off, on)])
                for m, key, q in REQUEST_METRICS]
    return [bench_stats.compare(m, s_off, s_on, higher, q=q)
            for m, higher, q, (s_off, s_on) in samples
            if bench_stats.num_groups(s_off) and bench_stats.num_groups(s_on)]


def summarize(runs: list[dict], variants: list[str]) -> dict:
    audited = [r for r in runs if r["audited"]]
    syncs = {v: statistics.median(_syncs(r) for r in audited if r["variant"] == v)
             for v in variants if any(r["variant"] == v for r in audited)}
    return {"timed_runs": sum(r["timed"] for r in runs),
            "comparisons": {v: [c.to_dict() for c in compare_variant(runs, v)]
                            for v in variants[1:]},
            "syncs_per_step": syncs,
            "outputs_identical": all(_outputs(r) == _outputs(runs[0]) for r in runs)}


def _outputs(run: dict) -> list:
    """Token ids where the server reports them (native /generate), else the texts: streamed
    text can differ between runs with identical tokens, by where chunks split invalid UTF-8."""
    if any(run.get("output_ids") or []):
        return run["output_ids"]
    return [run["generated_texts"], run["output_lens"]]


def _syncs(run: dict) -> float:
    audit = run.get("sync_audit") or {}
    return float(audit.get("syncs_per_step", 0.0))


def _digest(run: dict) -> str:
    """Which runs produced the same tokens."""
    return hashlib.sha1(json.dumps(_outputs(run)).encode()).hexdigest()[:12]


# ----------------------------------------------------------------------------------------------
# Report
# ----------------------------------------------------------------------------------------------


def to_markdown(report: dict) -> str:
    """Verdicts first (one table per on-variant), then method, rounds, syncs, outputs."""
    s = report["summary"]
    subject = (f"patch {report['patch']}" if report.get("patch") else
               f"feature `{report['feature']}`")
    lines = [f"# bench_ab: {subject}, {' vs '.join(report['variants'])}", "",
             provenance_line(report["provenance"]), ""]
    for variant, comps in s["comparisons"].items():
        lines += [f"## {variant} vs off", "",
                  f"| metric | over | off | {variant} | ratio | 95% CI | verdict | detectable |",
                  "|---|---|---|---|---|---|---|---|", *map(_comparison_row, comps), ""]
    lines += ["## Method", "", _method(report), "", *_rounds_table(report["runs"]), "",
              "## Syncs per step (sync audit)", ""]
    if s["syncs_per_step"]:
        lines += ["| variant | host syncs + pageable H2D per step |", "|---|---|"]
        lines += [f"| {v} | {n:.2f} |" for v, n in s["syncs_per_step"].items()]
    else:
        lines.append("Not audited (`--audit none`).")
    lines += ["", "## Outputs", "", f"Token-identical across all {len(report['runs'])} runs: "
              f"{'yes' if s['outputs_identical'] else 'NO (see the digests per run above)'}",
              f"Inputs identical across all runs (checked per request): yes, input digest "
              f"`{report['input_digest']}`"]
    return "\n".join(lines) + "\n"


def _rounds_table(runs: list[dict]) -> list[str]:
    lines = ["## Rounds", "", "| run | variant | round | kind | completed | output tok/s | "
             "median TTFT (ms) | median ITL (ms) | output digest |",
             "|---|---|---|---|---|---|---|---|---|"]
    for i, r in enumerate(runs, 1):
        res = r["result"]
        lines.append(f"| {i} | {r['variant']} | {r['round'] or '-'} | {_kind(r)} | "
                     f"{res['completed']}/{res['requests']} | {_num(res['output_throughput'])} | "
                     f"{_num(res['median_ttft_ms'])} | {_num(res['median_itl_ms'])} | "
                     f"`{r['output_digest']}` |")
    return lines


def _method(report: dict) -> str:
    n = report["rounds"]
    planned, ran = report.get("planned_runs"), len(report["runs"])
    cut = (f" (stopped by `--time-budget` after {ran} of the {planned} planned runs)"
           if planned and ran < planned else "")
    launch = ("a fresh server per round" if report["restart_each_round"] else
              "each variant's server launched once, side by side, all kept alive")
    cap = report["kv_cap"]
    cap_note = (f"; KV pool capped at {cap['max_total_tokens']} tokens for every server "
                f"(`--max-total-tokens`, added: {cap['reason']})" if cap else "")
    mamba = report.get("mamba_cap")
    if mamba:
        cap_note += (f"; state pool capped at {mamba['max_mamba_cache_size']} slots "
                     f"(`--max-mamba-cache-size`, added: {mamba['reason']})")
    audit = {"first": "sync audit in the warm-up rounds" + (
                 "" if report["restart_each_round"] else
                 " (switched on for that round only), never a timed round"),
             "all": "every run audited, timed rounds included (their timings carry the audit's "
                    "cost)", "none": "no sync audit"}
    return (f"Model `{report['model_path']}`, server args `{report['server_args']}`, bench args "
            f"`{' '.join(report['bench_args'])}`. {n} rounds per variant in ABBA order{cut}, "
            f"{launch}{cap_note}; the first round of each variant is a warm-up, left out of the "
            f"statistics; {audit[report['audit']]}. Ratio = on/off of the median (or P95) over "
            f"rounds (round metrics) or over requests pooled from the timed rounds; 95% "
            f"percentile-bootstrap interval ({bench_stats.N_BOOT} resamples, seed "
            f"{bench_stats.SEED}); verdict `faster` / `slower` when the interval excludes 1; "
            f"detectable = exp(h) - 1 for the interval's half-width h on the log scale, the "
            f"smallest effect this run could tell from noise (`sglab/bench_stats.py`).")


def _comparison_row(c: dict) -> str:
    unit = "rounds" if c["metric"] in dict(ROUND_METRICS) else "requests"
    ci = (f"{c['ci_low']:.3f} – {c['ci_high']:.3f}" if c["ci_low"] is not None else "-")
    det = f"±{c['detectable'] * 100:.1f}%" if c["detectable"] is not None else "-"
    return (f"| {c['metric']} | {c['n_off']}+{c['n_on']} {unit} | {_num(c['off'])} | "
            f"{_num(c['on'])} | {c['ratio']:.3f} | {ci} | {c['verdict']} | {det} |")


def _kind(run: dict) -> str:
    kind = ["warm-up" if run["warmup"] else "timed"]
    return ", ".join(kind + (["audited"] if run["audited"] else []))


def _num(x: float | None) -> str:
    return "-" if x is None else f"{x:.3f}" if abs(x) < 100 else f"{x:.1f}"


def plot(runs: list[dict], variants: list[str], path: str) -> None:
    """Per-round median ITL and throughput in run order (warm-up hollow), next to the ITL
    distribution of each variant's timed rounds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    colors = {v: f"C{i}" for i, v in enumerate(variants)}
    for ax, metric in zip(axes[:2], ("median_itl_ms", "output_throughput")):
        for i, r in enumerate(runs, 1):
            c, y = colors[r["variant"]], r["result"][metric]
            if y is None:
                continue
            ax.scatter(i, y, marker="o", edgecolors=c, facecolors="none" if r["warmup"] else c)
        ax.set_xlabel("run (order executed; hollow = warm-up)")
        ax.set_ylabel(metric)
    for v in variants:
        itls = [x for r in runs if r["timed"] and r["variant"] == v for g in r["itls_ms"]
                for x in g]
        if itls:
            axes[2].hist(itls, bins=60, alpha=0.5, color=colors[v], label=v)
    axes[2].set_xlabel("inter-token latency (ms), timed rounds")
    axes[2].set_ylabel("count")
    for v in variants:
        axes[0].scatter([], [], color=colors[v], label=v)
    axes[0].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# Per-request lists kept out of the JSON report (digests stand for outputs and inputs).
_PER_TOKEN_KEYS = ("itls_ms", "generated_texts", "output_ids", "input_digests")


def write_report(meta: dict, bench_argv: list[str], runs: list[dict], stem: str) -> dict:
    report = {**meta, "bench_args": bench_argv, "summary": summarize(runs, meta["variants"]),
              "input_digest": runs[0]["input_digest"],
              "input_digests": runs[0]["input_digests"],
              "runs": [{**{k: v for k, v in r.items() if k not in _PER_TOKEN_KEYS},
                        "output_digest": _digest(r)} for r in runs]}
    os.makedirs(os.path.dirname(stem) or ".", exist_ok=True)
    with open(stem + ".json", "w") as f:
        json.dump(report, f, indent=1)
    md = to_markdown(report)
    with open(stem + ".md", "w") as f:
        f.write(md)
    plot(runs, meta["variants"], stem + ".png")
    print(md, flush=True)
    return report


# ----------------------------------------------------------------------------------------------
# CLI
# ----------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m sglab.bench_ab")
    add = parser.add_argument
    what = parser.add_mutually_exclusive_group(required=True)
    what.add_argument("--patch", help="patch id, or all")
    what.add_argument("--feature", help="launch_server arguments of a non-patch option: off "
                      "without them, on with them")
    add("--model-path", required=True)
    add("--variants", nargs="+", default=["off", "on"],
        help="off and one or more of on, on:MODE (a patch's sub-modes); each vs off")
    add("--rounds", type=int, default=6,
        help="rounds per variant, ABBA order; the first of each is a warm-up (>= 2)")
    add("--restart-each-round", action="store_true",
        help="a fresh server per round (default: one server per variant, kept alive)")
    add("--audit", choices=["first", "all", "none"], default="first",
        help="first: sync counts from each variant's warm-up round (a live server's audit "
             "is switched on for that round only); all: every run audited; none")
    add("--kv-cap-tokens", type=int, default=DEFAULT_KV_CAP_TOKENS,
        help="--max-total-tokens given to every server when several run at once and "
             "--server-args sets none (0: never)")
    add("--mamba-cap-slots", type=int, default=DEFAULT_MAMBA_CAP_SLOTS,
        help="--max-mamba-cache-size given to every server of a hybrid model when several run "
             "at once and --server-args sets none (0: never)")
    add("--server-args", default="", help="extra launch_server arguments")
    add("--out-dir", default="benchmark/results")
    add("--tag", default=None, help="file name stem (default: date + patch)")
    add("--launch-timeout", type=float, default=600.0)
    add("--time-budget", type=float, default=None, metavar="SECONDS",
        help="start no round that would likely end past SECONDS (by the longest round so "
             "far); the report covers the rounds run and says how many were planned")
    add("--request-rates", type=float, nargs="+", default=None,
        help="one workload per rate against the same servers (each gets its own report, "
             "file stem + -rate<R>)")
    add("--max-concurrencies", type=int, nargs="+", default=None,
        help="one workload per concurrency, as --request-rates (file stem + -c<N>); with "
             "both, every pair")
    add("--save-outputs", action="store_true",
        help="also write every run's output token ids (file stem + .outputs.json)")
    add_provenance_args(parser)
    add("bench_args", nargs=argparse.REMAINDER, help="after --: bench_serving arguments")
    return parser


def _workloads(bench_argv: list[str], rates: list[float] | None,
               concurrencies: list[int] | None) -> list[tuple[str, list[str]]]:
    """(file stem suffix, bench_serving argv) per workload of the sweep."""
    rate_opts = [(f"-rate{_fmt_rate(r)}", ["--request-rate", str(r)]) for r in rates or []]
    conc_opts = [(f"-c{c}", ["--max-concurrency", str(c)]) for c in concurrencies or []]
    return [(r[0] + c[0], bench_argv + r[1] + c[1])
            for r in rate_opts or [("", [])] for c in conc_opts or [("", [])]]


def _subject_slug(args: argparse.Namespace) -> str:
    if args.patch:
        return args.patch
    return "-".join(a.lstrip("-") for a in shlex.split(args.feature))


def _fmt_rate(rate: float) -> str:
    return str(int(rate)) if float(rate).is_integer() else str(rate)


def main(argv: list[str] | None = None) -> dict:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.patch is not None and args.patch != "all" and args.patch not in PATCH_BY_ID:
        parser.error(f"--patch: unknown patch id {args.patch!r} "
                     f"(known: {', '.join(PATCH_BY_ID)}, all)")
    if args.rounds < 2:
        parser.error("--rounds: at least 2 (the first round of each variant is a warm-up)")
    if args.time_budget is not None and args.time_budget <= 0:
        parser.error(f"--time-budget: a positive number of seconds, got {args.time_budget}")
    try:
        variants = feature_variants(args.feature, args.variants) if args.feature else \
            parse_variants(args.patch, args.variants)
    except ValueError as e:
        parser.error(str(e))
    # SIGTERM (e.g. from `timeout`) unwinds through ServerSet, which stops every server;
    # otherwise they outlive us holding GPU memory.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    bench_argv = [a for a in args.bench_args if a != "--"]
    if "--seed" not in bench_argv:
        bench_argv += ["--seed", "1"]
    workloads = _workloads(bench_argv, args.request_rates, args.max_concurrencies)
    names = [v.name for v in variants]
    steps = plan_steps(names, args.rounds, args.audit)
    live = 1 if args.restart_each_round else len(variants)
    kv_cap = kv_cap_flags(args.server_args, live, args.kv_cap_tokens)
    mamba_cap = mamba_cap_flags(args.server_args, live, args.mamba_cap_slots, args.model_path)
    meta = {"patch": args.patch, "feature": args.feature, "variants": names, "model_path": args.model_path,
            "server_args": args.server_args, "rounds": args.rounds,
            "restart_each_round": args.restart_each_round, "audit": args.audit,
            "kv_cap": {"max_total_tokens": int(kv_cap[1]),
                       "reason": f"{live} servers at once"} if kv_cap else None,
            "mamba_cap": {"max_mamba_cache_size": int(mamba_cap[1]),
                          "reason": f"{live} servers at once"} if mamba_cap else None,
            "planned_runs": len(steps), "provenance": provenance(args.commit)}
    try:
        runs = run_steps(args, variants, steps, [w for _, w in workloads],
                         kv_cap + mamba_cap)
    except InputsDifferError as e:
        parser.exit(2, f"bench_ab: error: {e}\n")
    stem = os.path.join(args.out_dir, args.tag or
                        f"{time.strftime('%Y-%m-%d')}-bench-ab-{_subject_slug(args)}")
    reports = [write_report(meta, w, runs[j], stem + suffix)
               for j, (suffix, w) in enumerate(workloads)]
    if args.save_outputs:
        for j, (suffix, _) in enumerate(workloads):
            with open(stem + suffix + ".outputs.json", "w") as f:
                json.dump({r["label"]: r["output_ids"] for r in runs[j]}, f)
    return reports[0] if len(reports) == 1 else {"reports": reports}


if __name__ == "__main__":
    main()
