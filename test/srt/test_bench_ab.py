"""bench_ab end to end on CPU: two real servers (patch off, on), one bench_serving workload."""

from __future__ import annotations

import json
import os

from sglab import bench_ab
from sglab.srt.utils.dummy_model import get_default_model_path


def test_bench_ab_0001_report(tmp_path):
    """Two workloads (request rates) against each of the two launches (off, on)."""
    model = get_default_model_path()
    out = bench_ab.main([
        "--patch", "0001", "--model-path", model, "--repeats", "1",
        "--server-args=--skip-server-warmup", "--out-dir", str(tmp_path), "--tag", "ab",
        "--request-rates", "inf", "50",
        "--", "--dataset-name", "random-ids", "--num-prompts", "6", "--random-input-len", "24",
        "--random-output-len", "6", "--tokenizer", model, "--warmup-requests", "1"])
    reports = out["reports"]
    assert [r["bench_args"][-2:] for r in reports] == [["--request-rate", "inf"],
                                                       ["--request-rate", "50.0"]]
    for report, stem in zip(reports, ["ab-rateinf", "ab-rate50"]):
        summary = report["summary"]
        for metric in bench_ab.METRICS:
            assert summary[metric]["off"] > 0 and summary[metric]["on"] > 0
            assert summary[metric]["ratio"] == summary[metric]["on"] / summary[metric]["off"]
        assert summary["outputs_identical"] is True
        # Each workload's own audit: a decode step of the off variant makes 9 pageable H2D.
        assert summary["syncs_per_step"]["off"] >= 9 and summary["syncs_per_step"]["on"] == 0
        runs = report["runs"]
        assert [r["on"] for r in runs] == [False, True]
        assert all(r["result"]["completed"] == 6 for r in runs)
        assert "0001" not in runs[0]["active_patches"] and "0001" in runs[1]["active_patches"]
        with open(tmp_path / f"{stem}.json") as f:
            assert json.load(f)["summary"]["outputs_identical"] is True
        assert "| median_itl_ms |" in (tmp_path / f"{stem}.md").read_text()
        assert os.path.getsize(tmp_path / f"{stem}.png") > 1000
    audits = [r["runs"][0]["sync_audit"]["steps"] for r in reports]
    assert all(n > 0 for n in audits)


def test_audit_delta_is_one_workloads_share():
    before = {"enabled": True, "steps": 2, "syncs_per_step": 2.0,
              "totals": {"ForwardBatch.init_new": {"pageable_h2d": 4}}}
    after = {"enabled": True, "steps": 6, "syncs_per_step": 16 / 6,
             "totals": {"ForwardBatch.init_new": {"pageable_h2d": 12},
                        "LogitsProcessor": {"d2h": 4}}}
    d = bench_ab._audit_delta(before, after)
    assert d["steps"] == 4 and d["syncs_per_step"] == 3.0
    assert d["totals"] == {"ForwardBatch.init_new": {"pageable_h2d": 8},
                           "LogitsProcessor": {"d2h": 4}}
    assert d["per_step"]["ForwardBatch.init_new"]["pageable_h2d"] == 2.0
    assert bench_ab._audit_delta(None, after)["steps"] == 6


def _run(on: bool, audited: bool, itl: float, syncs: float) -> dict:
    return {"on": on, "audited": audited, "itls": [],
            "result": {m: itl for m in bench_ab.METRICS}, "generated_texts": ["a"],
            "output_lens": [1], "sync_audit": {"syncs_per_step": syncs}}


def test_summary_times_unaudited_rounds_and_counts_audited_ones():
    # Round 1 audited (the audit slows the off run), round 2 not: timings from round 2 only.
    runs = [_run(False, True, 50.0, 12.0), _run(True, True, 10.0, 0.0),
            _run(False, False, 11.0, 0.0), _run(True, False, 10.0, 0.0)]
    s = bench_ab.summarize(runs)
    assert s["timed_runs"] == 2
    assert s["median_itl_ms"]["off"] == 11.0 and s["median_itl_ms"]["on"] == 10.0
    assert s["syncs_per_step"] == {"off": 12.0, "on": 0.0}
    # A single audited round is both timed and counted.
    s1 = bench_ab.summarize(runs[:2])
    assert s1["timed_runs"] == 2 and s1["median_itl_ms"]["off"] == 50.0
    runs[3]["generated_texts"] = ["b"]
    assert bench_ab.summarize(runs)["outputs_identical"] is False
    # Token ids, where reported, decide: streamed text may split differently between runs.
    for r in runs:
        r["output_ids"] = [[5, 6]]
    assert bench_ab.summarize(runs)["outputs_identical"] is True
    runs[2]["output_ids"] = [[5, 7]]
    assert bench_ab.summarize(runs)["outputs_identical"] is False
    assert bench_ab._digest(runs[2]) != bench_ab._digest(runs[0])
    report = {"patch": "0001", "model_path": "m", "server_args": "", "bench_args": [],
              "repeats": 2, "summary": bench_ab.summarize(runs),
              "runs": [{**r, "output_digest": bench_ab._digest(r)} for r in runs]}
    md = bench_ab.to_markdown(report)
    d0, d2 = bench_ab._digest(runs[0]), bench_ab._digest(runs[2])
    assert "Outputs token-identical off vs on: NO" in md
    assert f"off r1 `{d0}`, on r1 `{d0}`, off r2 `{d2}`, on r2 `{d0}`" in md
