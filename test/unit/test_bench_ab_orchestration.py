"""sglab.bench_ab's orchestration without a model: which servers are launched with which flags,
which run goes to which server in which order, what is refused, what is always stopped.
Servers and bench_serving runs are replaced by fakes that record what they were asked to do."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import psutil
import pytest
from sglab import bench_ab, bench_stats
from sglab.srt.utils.process import ServerProcess

DIGESTS = [f"{i:016x}" for i in range(6)]


class Fakes:
    """Launches, stops and bench_serving runs, recorded in order."""

    def __init__(self, monkeypatch, values=None, digests=None):
        self.launches: list[list[str]] = []
        self.batches: list[int] = []  # servers per popen_launch_servers call
        self.stopped: list[str] = []
        self.rounds: list[tuple[str, str, int]] = []  # (server url, variant, round)
        self.switched: list[tuple[str, int]] = []  # (server url, round) audited by switching
        self.values = values or (lambda step: 10.0)
        self.digests = digests or (lambda step: DIGESTS)
        monkeypatch.setattr(bench_ab, "popen_launch_server", self.launch)
        monkeypatch.setattr(bench_ab, "popen_launch_servers", self.launch_all)
        monkeypatch.setattr(bench_ab, "kill_server", self.kill)
        monkeypatch.setattr(bench_ab, "run_workload", self.run)

    def launch(self, argv, timeout):
        self.launches.append(argv)
        return ServerProcess(None, f"fake://{len(self.launches)}", "")

    def launch_all(self, argvs, timeout):
        self.batches.append(len(argvs))
        return [self.launch(argv, timeout) for argv in argvs]

    def kill(self, server):
        self.stopped.append(server.base_url)

    def run(self, base_url, step, bench_argv, switch_audit=False):
        self.rounds.append((base_url, step.variant, step.round))
        if switch_audit:
            self.switched.append((base_url, step.round))
        v = self.values(step)
        return {"variant": step.variant, "round": step.round, "warmup": step.warmup,
                "audited": step.audited, "timed": step.timed, "label": step.label,
                "result": {m: v for m, _ in bench_ab.ROUND_METRICS} | {"completed": 6,
                                                                       "requests": 6},
                "ttfts_ms": [v] * 6, "itls_ms": [[v, v]] * 6, "generated_texts": ["a"] * 6,
                "output_ids": [[1, 2]] * 6, "output_lens": [2] * 6,
                "input_digests": self.digests(step), "input_digest": "d",
                "sync_audit": {"syncs_per_step": 9.0 if step.variant == "off" else 0.0}
                if step.audited else None,
                "active_patches": [], "patch_modes": {}, "max_total_num_tokens": 4096}


def _main(tmp_path, *extra, variants=("off", "on"), rounds="3"):
    return bench_ab.main(["--patch", "0001", "--model-path", "m", "--out-dir", str(tmp_path),
                          "--tag", "ab", "--rounds", rounds, "--variants", *variants, *extra,
                          "--", "--num-prompts", "6"])


def test_live_servers_launched_once_warmups_audited_by_switching_and_kv_cap(tmp_path,
                                                                            monkeypatch):
    fakes = Fakes(monkeypatch)
    report = _main(tmp_path)
    cap = ["--max-total-tokens", str(bench_ab.DEFAULT_KV_CAP_TOKENS)]
    # One launch per variant, none audited from the start: the audit is switched on at runtime
    # for each warm-up round only.
    assert fakes.launches == [["--model-path", "m", *cap, "--disable-pinned-h2d"],
                              ["--model-path", "m", *cap, "--enable-pinned-h2d"]]
    assert fakes.batches == [2]  # side by side, in one call
    assert fakes.rounds == [("fake://1", "off", 1), ("fake://2", "on", 1), ("fake://2", "on", 2),
                            ("fake://1", "off", 2), ("fake://1", "off", 3), ("fake://2", "on", 3)]
    assert fakes.switched == [("fake://1", 1), ("fake://2", 1)]
    assert sorted(fakes.stopped) == ["fake://1", "fake://2"]
    assert report["kv_cap"] == {"max_total_tokens": bench_ab.DEFAULT_KV_CAP_TOKENS,
                                "reason": "2 servers at once"}
    runs = report["runs"]
    assert [(r["timed"], r["warmup"], r["audited"]) for r in runs] == (
        [(False, True, True)] * 2 + [(True, False, False)] * 4)
    assert report["summary"]["syncs_per_step"] == {"off": 9.0, "on": 0.0}
    md = (tmp_path / "ab.md").read_text()
    assert "--max-total-tokens" in md and "switched on for that round only" in md


def test_restart_each_round_audits_warmups_and_needs_no_cap(tmp_path, monkeypatch):
    fakes = Fakes(monkeypatch)
    report = _main(tmp_path, "--restart-each-round", "--server-args", "--device cpu")
    assert len(fakes.launches) == 6 and fakes.stopped == [f"fake://{i}" for i in range(1, 7)]
    assert [a[-1] == "--enable-sync-audit" for a in fakes.launches] == [True, True] + [False] * 4
    assert all("--max-total-tokens" not in a and a[2:4] == ["--device", "cpu"]
               for a in fakes.launches)
    assert [(v, r) for _, v, r in fakes.rounds] == [("off", 1), ("on", 1), ("on", 2), ("off", 2),
                                                    ("off", 3), ("on", 3)]
    assert report["kv_cap"] is None


def test_user_kv_cap_is_kept_and_audit_all(tmp_path, monkeypatch):
    fakes = Fakes(monkeypatch)
    _main(tmp_path, "--audit", "all", "--server-args=--max-total-tokens=1000")
    assert len(fakes.launches) == 2  # no separate audit runs: the live servers are audited
    assert all(a.count("--max-total-tokens=1000") == 1 and "--max-total-tokens" not in a
               and a[-1] == "--enable-sync-audit" for a in fakes.launches)
    assert bench_ab.kv_cap_flags("", 2, 0) == [] and bench_ab.kv_cap_flags("", 1, 5) == []


def test_three_way_each_on_variant_against_off(tmp_path, monkeypatch):
    values = {"off": 10.0, "on:pr": 11.0, "on:packed": 9.0}
    fakes = Fakes(monkeypatch, values=lambda step: values[step.variant] * (1 + 0.001 * step.round))
    report = _main(tmp_path, "--audit", "none", variants=("off", "on:pr", "on:packed"),
                   rounds="6")
    assert [a[-1] for a in fakes.launches] == ["--disable-pinned-h2d", "pr", "packed"]
    assert [v for _, v, _ in fakes.rounds[:6]] == ["off", "on:pr", "on:packed", "on:packed",
                                                   "on:pr", "off"]
    comps = report["summary"]["comparisons"]
    assert list(comps) == ["on:pr", "on:packed"]
    itl = {v: next(c for c in comps[v] if c["metric"] == "median_itl_ms") for v in comps}
    assert itl["on:pr"]["verdict"] == bench_stats.SLOWER
    assert itl["on:packed"]["verdict"] == bench_stats.FASTER
    tput = next(c for c in comps["on:packed"] if c["metric"] == "output_throughput")
    assert tput["verdict"] == bench_stats.SLOWER and tput["n_off"] == 5
    md = (tmp_path / "ab.md").read_text()
    assert md.index("## on:pr vs off") < md.index("## on:packed vs off") < md.index("## Rounds")


def test_time_budget_starts_no_round_that_would_end_past_it(tmp_path, monkeypatch):
    """Each round takes 10 s of a fake clock: with a 35 s budget the fourth round (30 s + 10 s
    > 35 s) is not started, the report covers three runs and says six were planned."""
    clock = {"t": 0.0}
    monkeypatch.setattr(bench_ab.time, "monotonic", lambda: clock["t"])
    fakes = Fakes(monkeypatch)
    run = fakes.run

    def slow(*a, **k):
        clock["t"] += 10.0
        return run(*a, **k)

    monkeypatch.setattr(bench_ab, "run_workload", slow)
    report = _main(tmp_path, "--time-budget", "35")
    assert [(v, r) for _, v, r in fakes.rounds] == [("off", 1), ("on", 1), ("on", 2)]
    assert len(report["runs"]) == 3 and report["planned_runs"] == 6
    assert sorted(fakes.stopped) == ["fake://1", "fake://2"]
    assert "after 3 of the 6 planned runs" in (tmp_path / "ab.md").read_text()


def test_live_servers_launch_side_by_side_and_the_launch_is_not_a_round(tmp_path,
                                                                       monkeypatch):
    """The live servers start in one call (30 s of a fake clock for both) and rounds take
    10 s: the launch is paid once, so with a 100 s budget the rounds go on until 100 s
    (launch + 7 rounds)."""
    clock = {"t": 0.0}
    monkeypatch.setattr(bench_ab.time, "monotonic", lambda: clock["t"])
    fakes = Fakes(monkeypatch)
    run, launch_all = fakes.run, fakes.launch_all

    def slow_run(*a, **k):
        clock["t"] += 10.0
        return run(*a, **k)

    def slow_launch_all(*a, **k):
        clock["t"] += 30.0
        return launch_all(*a, **k)

    monkeypatch.setattr(bench_ab, "run_workload", slow_run)
    monkeypatch.setattr(bench_ab, "popen_launch_servers", slow_launch_all)
    report = _main(tmp_path, "--time-budget", "100", rounds="6")
    assert fakes.batches == [2] and len(fakes.launches) == 2
    assert len(report["runs"]) == 7 and clock["t"] == 100.0


def test_warmup_rounds_are_reported_but_not_counted(tmp_path, monkeypatch):
    """Warm-up rounds 10x slower than the rest: the ratios see only the timed rounds."""
    rng = np.random.default_rng(0)
    noise = {(v, r): 1 + 0.01 * rng.standard_normal() for v in ("off", "on") for r in range(7)}

    def values(step):
        base = 10.0 if step.variant == "off" else 10.5
        return base * noise[step.variant, step.round] * (10 if step.warmup else 1)

    Fakes(monkeypatch, values=values)
    report = _main(tmp_path, "--audit", "none", rounds="6")
    comp = next(c for c in report["summary"]["comparisons"]["on"]
                if c["metric"] == "median_itl_ms")
    timed = {v: [values(bench_ab.Step(v, r, False, False)) for r in range(2, 7)]
             for v in ("off", "on")}
    assert comp["off"] == pytest.approx(np.median(timed["off"]))
    assert comp["ratio"] == pytest.approx(np.median(timed["on"]) / np.median(timed["off"]))
    assert comp["verdict"] == bench_stats.SLOWER
    runs = report["runs"]
    assert [r["warmup"] for r in runs] == [True, True] + [False] * 10
    assert runs[0]["result"]["median_itl_ms"] == pytest.approx(100.0, rel=0.05)


def test_differing_inputs_are_refused_with_the_request_indices(tmp_path, monkeypatch, capsys):
    changed = DIGESTS[:2] + ["x" * 16] + DIGESTS[3:4] + ["y" * 16] + DIGESTS[5:]
    fakes = Fakes(monkeypatch, digests=lambda s: changed if s.label == "on r2" else DIGESTS)
    with pytest.raises(SystemExit) as exit_info:
        _main(tmp_path, "--audit", "none")
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "on r2 and off r1 sent different requests: 2 of 6 differ (request indices 2, 4)" in err
    assert sorted(fakes.stopped) == ["fake://1", "fake://2"]
    assert not (tmp_path / "ab.json").exists()
    with pytest.raises(bench_ab.InputsDifferError, match="5 vs 6 requests"):
        bench_ab.check_same_inputs({"label": "off r1", "input_digests": DIGESTS},
                                   {"label": "on r1", "input_digests": DIGESTS[:5]})


def test_a_failing_round_still_stops_every_server(tmp_path, monkeypatch):
    fakes = Fakes(monkeypatch)

    def boom(base_url, step, bench_argv, switch_audit=False):
        if step.variant == "on":
            raise RuntimeError("server died")
        return Fakes.run(fakes, base_url, step, bench_argv, switch_audit)

    monkeypatch.setattr(bench_ab, "run_workload", boom)
    with pytest.raises(RuntimeError, match="server died"):
        _main(tmp_path, "--audit", "none")
    assert sorted(fakes.stopped) == ["fake://1", "fake://2"]


def test_report_leads_with_verdicts_then_rounds_with_digests(tmp_path, monkeypatch):
    Fakes(monkeypatch, values=lambda s: 10.0 + 0.01 * s.round + (s.variant == "on"))
    report = _main(tmp_path, "--commit", "c0ffee")
    md = (tmp_path / "ab.md").read_text()
    head = md.split("\n\n")
    assert head[0] == "# bench_ab: patch 0001, off vs on"
    assert head[1].startswith("commit `c0ffee` (--commit) · ")
    table = md.index("| metric | over | off | on | ratio | 95% CI | verdict | detectable |")
    assert head[2] == "## on vs off" and table < md.index("## Method") < md.index("## Rounds")
    assert md.index("## Rounds") < md.index("## Syncs per step") < md.index("## Outputs")
    assert "| median_itl_ms | 2+2 rounds |" in md  # 3 rounds, the first a warm-up
    assert "| pooled_ttft_p50_ms | 12+12 requests |" in md
    digest = report["runs"][0]["output_digest"]
    assert md.count(f"`{digest}`") == 6 and "Token-identical across all 6 runs: yes" in md
    saved = json.loads((tmp_path / "ab.json").read_text())
    assert saved["provenance"]["commit"] == "c0ffee" and saved["input_digests"] == DIGESTS
    assert "itls_ms" not in saved["runs"][0] and saved["runs"][0]["ttfts_ms"]
    assert (tmp_path / "ab.png").stat().st_size > 1000


def test_cli_errors_name_the_flag(tmp_path, capsys):
    for extra, message in ((["--rounds", "1"], "--rounds: at least 2"),
                           (["--variants", "off", "on:bogus"], "patch 0001 has no mode 'bogus'"),
                           (["--variants", "on"], "need `off`"),
                           (["--time-budget", "0"], "--time-budget: a positive number")):
        with pytest.raises(SystemExit):
            bench_ab.main(["--patch", "0001", "--model-path", "m", *extra])
        assert message in capsys.readouterr().err


# A bench_ab whose "servers" are `sleep` processes in their own sessions (as real servers are):
# it blocks in the first `on` round, both live servers up, until the test sends SIGTERM.
_BENCH_AB_CHILD = """
import os, subprocess, sys, time
from sglab import bench_ab
from sglab.srt.utils.process import ServerProcess

def launch(argv, timeout):
    proc = subprocess.Popen(["sleep", "600"], start_new_session=True)
    print("launched", proc.pid, flush=True)
    return ServerProcess(proc, f"fake://{proc.pid}", os.devnull)

def run(base_url, step, bench_argv, switch_audit=False):
    if step.variant == "on":
        print("ready", flush=True)
        time.sleep(600)
    return {"label": step.label, "input_digests": []}

def launch_all(argvs, timeout):
    return [launch(argv, timeout) for argv in argvs]

bench_ab.popen_launch_servers, bench_ab.run_workload = launch_all, run
bench_ab.main(sys.argv[1:])
"""

# popen_launch_servers with two servers replaced by `sleep`: the first never gets healthy, so
# the caller is still waiting for it, the second started too, when the test sends SIGTERM.
_LAUNCH_CHILD = """
import signal, subprocess, sys
import requests
from sglab.srt.utils import process

popen = subprocess.Popen

def sleeper(cmd, **kwargs):
    proc = popen(["sleep", "600"], **kwargs)
    print("launched", proc.pid, flush=True)
    return proc

def health_check(self, url, **kwargs):
    print("ready", flush=True)
    raise requests.ConnectionError(url)

subprocess.Popen, requests.Session.get = sleeper, health_check
signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
process.popen_launch_servers([["--model-path", "a"], ["--model-path", "b"]], timeout=600)
"""


def _sigterm_when_ready(script: str, *argv: str) -> tuple[int, list[int]]:
    """Run `script`, SIGTERM it once it prints `ready`; (exit code, pids it launched)."""
    child = subprocess.Popen([sys.executable, "-c", script, *argv], stdout=subprocess.PIPE,
                             text=True)
    pids = []
    for line in child.stdout:
        if line.startswith("launched"):
            pids.append(int(line.split()[1]))
        if line.strip() == "ready":
            break
    child.terminate()
    return child.wait(60), pids


def _running(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _survivors(pids: list[int]) -> list[int]:
    """The pids still running; they are killed here, so a failing test leaves none behind."""
    alive = [p for p in pids if _running(p)]
    for pid in alive:
        psutil.Process(pid).kill()
    return alive


def test_sigterm_stops_every_live_server(tmp_path):
    rc, pids = _sigterm_when_ready(_BENCH_AB_CHILD, "--patch", "0001", "--model-path", "m",
                                   "--audit", "none", "--out-dir", str(tmp_path))
    assert _survivors(pids) == []
    assert rc == 143 and len(pids) == 2


def test_sigterm_while_servers_launch_stops_them_all():
    rc, pids = _sigterm_when_ready(_LAUNCH_CHILD)
    assert _survivors(pids) == []
    assert rc == 143 and len(pids) == 2


def test_workload_sweep_by_rate_and_concurrency():
    from sglab.bench_ab import _workloads

    assert _workloads(["x"], None, None) == [("", ["x"])]
    assert [s for s, _ in _workloads(["x"], [1, 8], None)] == ["-rate1", "-rate8"]
    sweep = _workloads(["x"], [0.5], [1, 32])
    assert sweep == [("-rate0.5-c1", ["x", "--request-rate", "0.5", "--max-concurrency", "1"]),
                     ("-rate0.5-c32", ["x", "--request-rate", "0.5", "--max-concurrency", "32"])]


def test_hybrid_model_state_pool_capped_when_servers_share_the_device(tmp_path, monkeypatch):
    hybrid, dense = tmp_path / "hybrid", tmp_path / "dense"
    for path, arch in ((hybrid, "Qwen3_5ForCausalLM"), (dense, "Qwen3ForCausalLM")):
        path.mkdir()
        (path / "config.json").write_text(json.dumps({"architectures": [arch]}))
    cap = ["--max-mamba-cache-size", str(bench_ab.DEFAULT_MAMBA_CAP_SLOTS)]
    assert bench_ab.mamba_cap_flags("", 2, bench_ab.DEFAULT_MAMBA_CAP_SLOTS, str(hybrid)) == cap
    assert bench_ab.mamba_cap_flags("", 2, 256, str(dense)) == []
    assert bench_ab.mamba_cap_flags("", 1, 256, str(hybrid)) == []
    assert bench_ab.mamba_cap_flags("--max-mamba-cache-size=9", 3, 256, str(hybrid)) == []
    fakes = Fakes(monkeypatch)
    report = bench_ab.main(["--patch", "0003b", "--model-path", str(hybrid), "--out-dir",
                            str(tmp_path), "--tag", "ab", "--rounds", "2", "--audit", "none",
                            "--", "--num-prompts", "2"])
    assert fakes.launches and all(a.count("--max-mamba-cache-size") == 1 for a in fakes.launches)
    assert report["mamba_cap"]["max_mamba_cache_size"] == bench_ab.DEFAULT_MAMBA_CAP_SLOTS
    assert "--max-mamba-cache-size" in (tmp_path / "ab.md").read_text()


def test_feature_ab_launches_off_without_and_on_with_the_option(tmp_path, monkeypatch):
    fakes = Fakes(monkeypatch)
    report = bench_ab.main(["--feature=--enable-prefill-cuda-graph", "--model-path", "m",
                            "--out-dir", str(tmp_path), "--rounds", "2", "--audit", "none",
                            "--kv-cap-tokens", "0", "--", "--num-prompts", "2"])
    assert fakes.launches == [["--model-path", "m"],
                              ["--model-path", "m", "--enable-prefill-cuda-graph"]]
    assert report["feature"] == "--enable-prefill-cuda-graph" and report["patch"] is None
    md = next(tmp_path.glob("*-bench-ab-enable-prefill-cuda-graph.md")).read_text()
    assert md.startswith("# bench_ab: feature `--enable-prefill-cuda-graph`, off vs on")
    with pytest.raises(ValueError, match="off and on only"):
        bench_ab.feature_variants("--kernel-fusion on", ["off", "on", "on:x"])
    with pytest.raises(ValueError, match="launch_server arguments"):
        bench_ab.feature_variants("kernel-fusion", ["off", "on"])
    with pytest.raises(SystemExit):
        bench_ab.main(["--patch", "0001", "--feature=--x", "--model-path", "m"])
