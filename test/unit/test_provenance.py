"""sglab.srt.utils.provenance: where the commit comes from, what the machine runs, and that the
benchmark scripts' reports lead with it."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
import triton
from sglab.srt.utils import provenance as pv

BENCHMARK_DIR = os.path.join(os.path.dirname(__file__), "..", "..", "benchmark")


def test_commit_precedence_flag_env_git(monkeypatch):
    monkeypatch.setenv(pv.COMMIT_ENV, "from-env")
    assert pv.resolve_commit("from-flag") == {"commit": "from-flag", "commit_source": "--commit",
                                              "commit_verified": True}
    assert pv.resolve_commit(None) == {"commit": "from-env", "commit_source": "SGLAB_COMMIT",
                                       "commit_verified": True}
    monkeypatch.delenv(pv.COMMIT_ENV)
    head = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                          cwd=os.path.dirname(pv.__file__)).stdout.strip()
    assert pv.resolve_commit(None) == {"commit": head or "unknown",
                                       "commit_source": "git rev-parse (unverified)",
                                       "commit_verified": False}


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU record")
def test_software_stack_on_cpu():
    assert pv.software_stack() == {"gpu": "cpu", "driver": None, "cuda": None,
                                   "torch": torch.__version__, "triton": triton.__version__,
                                   "host_cpu": pv.host_cpu()}
    assert pv.host_cpu()  # the CI machine's /proc/cpuinfo names its model


def test_provenance_line():
    p = {"commit": "abc", "commit_source": "SGLAB_COMMIT", "gpu": "NVIDIA H200",
         "driver": "570.1", "cuda": "12.8", "torch": "2.9.0", "triton": None}
    assert pv.provenance_line(p) == ("commit `abc` (SGLAB_COMMIT) · NVIDIA H200, driver 570.1, "
                                     "CUDA 12.8, torch 2.9.0")
    assert pv.provenance_line({**p, "host_cpu": "Intel Xeon"}).endswith("torch 2.9.0, host Intel Xeon")


def test_benchmark_reports_lead_with_provenance(monkeypatch):
    monkeypatch.syspath_prepend(BENCHMARK_DIR)
    import bench_unified_extend
    import gpu_bench

    p = pv.provenance("c1")
    line = pv.provenance_line(p)
    engine = {**p, "bandwidth": {"bandwidth_gbps": 1000.0}, "models": {}}
    assert gpu_bench.to_markdown(engine).splitlines()[0] == line
    mode = {"calls": 1, "median_us": 1.0, "mean_us": 1.0, "prefill_round_ms": 1.0}
    unified = {**p, "preset": "x", "batch_size": 1, "prefix_len": 1, "extend_len": 1,
               "rounds": 1, "modes": {"loop": mode}}
    assert bench_unified_extend._markdown(unified).splitlines()[0] == line


def test_benchmark_scripts_take_a_commit():
    for script in ("gpu_bench.py", "bench_unified_extend.py", "profile_step.py"):
        out = subprocess.run([sys.executable, os.path.join(BENCHMARK_DIR, script), "--help"],
                             capture_output=True, text=True, timeout=120)
        assert "--commit" in out.stdout, (script, out.stderr[-500:])


def test_gpu_bench_reports_each_kernel_fusion_setting(monkeypatch):
    """`gpu_bench all --fusions off on`: one row per setting in every table, the fused one
    labelled, each against the same HF run."""
    monkeypatch.syspath_prepend(BENCHMARK_DIR)
    import gpu_bench

    def sglab(step_s: float) -> dict:
        row = {"batch_size": 1, "median_decode_latency_s": step_s, "prefill_latency_s": 0.01}
        return {"weight_bytes": 4e9, "one_batch": [row], "decode_bs1_overlap": {"step_s": step_s},
                "throughput": {"output_throughput": 100.0},
                "throughput_no_overlap": {"output_throughput": 90.0},
                "idle": {"idle_fraction": 0.1}}

    report = {**pv.provenance("c1"), "bandwidth": {"bandwidth_gbps": 4000.0}, "models": {
        "m": {gpu_bench.sglab_key("off"): sglab(0.002), gpu_bench.sglab_key("on"): sglab(0.0015),
              "hf": {"itl_bs1_s": 0.01, "output_throughput": 50.0}}}}
    rows = [line for line in gpu_bench.to_markdown(report).splitlines()
            if line.startswith("| m ") or line.startswith("| m (")]
    assert [r.split(" | ")[0] for r in rows] == ["| m", "| m (fusion-on)"] * 3
    assert "| 2.000 | 1.000 | 2.00 |" in rows[0] and "| 1.500 | 1.000 | 1.50 |" in rows[1]
    assert rows[4].startswith("| m | 100 | 90 | 50 | 2.00 |")
