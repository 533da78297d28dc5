"""bench_ab end to end on CPU: real servers (patch off, on), real bench_serving workloads."""

from __future__ import annotations

import json
import os

import numpy as np
from sglab import bench_ab, bench_serving
from sglab.srt.utils.dummy_model import get_default_model_path


def test_bench_ab_0001_report(tmp_path, monkeypatch):
    """Two live servers (one KV cap for both), 2 ABBA rounds each, two workloads (request
    rates) per round; `--audit first`: each server's audit switched on for its warm-up round
    only (`/set_internal_state`)."""
    monkeypatch.setattr(bench_serving, "SETTLE_SEC", 0.0)
    model = get_default_model_path()
    out = bench_ab.main([
        "--patch", "0001", "--model-path", model, "--rounds", "2", "--audit", "first",
        "--kv-cap-tokens", "4096",
        "--server-args=--skip-server-warmup", "--out-dir", str(tmp_path), "--tag", "ab",
        "--request-rates", "inf", "50", "--commit", "feedc0de",
        "--", "--dataset-name", "random-ids", "--num-prompts", "6", "--random-input-len", "24",
        "--random-output-len", "6", "--tokenizer", model, "--warmup-requests", "1"])
    reports = out["reports"]
    assert [r["bench_args"][-2:] for r in reports] == [["--request-rate", "inf"],
                                                       ["--request-rate", "50.0"]]
    for report, stem in zip(reports, ["ab-rateinf", "ab-rate50"]):
        runs = report["runs"]
        assert [(r["variant"], r["round"], r["timed"]) for r in runs] == [
            ("off", 1, False), ("on", 1, False), ("on", 2, True), ("off", 2, True)]
        assert all(r["result"]["completed"] == 6 for r in runs)
        assert all(r["max_total_num_tokens"] == 4096 for r in runs)  # the cap reached them
        assert [r["audited"] for r in runs] == [True, True, False, False]
        assert "0001" not in runs[0]["active_patches"] and "0001" in runs[1]["active_patches"]
        assert runs[1]["patch_modes"]["0001"] == "pr"
        assert len({r["input_digest"] for r in runs}) == 1 and len(report["input_digests"]) == 6
        summary = report["summary"]
        assert summary["outputs_identical"] is True
        # Each run's own audit (a live server's counts since the run began): the off variant
        # uploads from pageable memory (a prefill 11 arrays, a steady decode step its new KV
        # slots), the on variant never.
        assert summary["syncs_per_step"]["off"] >= 1 and summary["syncs_per_step"]["on"] == 0
        _check_comparisons(summary["comparisons"]["on"], runs[3], runs[2])
        assert report["provenance"]["commit"] == "feedc0de"
        with open(tmp_path / f"{stem}.json") as f:
            assert json.load(f)["summary"]["outputs_identical"] is True
        md = (tmp_path / f"{stem}.md").read_text()
        assert md.index("| median_itl_ms |") < md.index("## Rounds")
        assert os.path.getsize(tmp_path / f"{stem}.png") > 1000
    # The audit counted the warm-up rounds and nothing once it was switched off again.
    assert all((r["sync_audit"]["steps"] > 0) == r["audited"] for rep in reports
               for r in rep["runs"])


def _check_comparisons(comps: list[dict], off: dict, on: dict) -> None:
    """Against the one timed round of each variant: round metrics are that round's values
    (too few rounds for an interval); pooled request metrics are percentiles of its requests."""
    by_name = {c["metric"]: c for c in comps}
    itl = by_name["median_itl_ms"]
    assert (itl["off"], itl["on"]) == (off["result"]["median_itl_ms"],
                                       on["result"]["median_itl_ms"])
    assert itl["verdict"] == "too few samples"
    ttft = by_name["pooled_ttft_p95_ms"]
    assert ttft["off"] == np.percentile(off["ttfts_ms"], 95) and ttft["n_off"] == 6
    assert ttft["ci_low"] <= ttft["ratio"] <= ttft["ci_high"]
    # Groups are requests, not tokens (a request whose tokens came in one chunk has no ITLs).
    assert 0 < by_name["pooled_itl_p50_ms"]["n_on"] <= 6
