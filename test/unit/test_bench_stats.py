"""sglab.bench_stats on synthetic data: known effects are found, null effects are not, the order
is ABBA, intervals are reproducible and resample whole requests."""

from __future__ import annotations

import math

import numpy as np
import pytest
from sglab import bench_stats as st


def _rounds(rng, center: float, n: int = 5, noise: float = 0.01) -> list[float]:
    return list(center * (1 + noise * rng.standard_normal(n)))


def test_abba_order_and_warmups():
    order = st.abba_order(["off", "on"], 6)
    assert order == ["off", "on", "on", "off", "off", "on", "on", "off", "off", "on", "on", "off"]
    three = st.abba_order(["A", "B", "C"], 3)
    assert three == ["A", "B", "C", "C", "B", "A", "A", "B", "C"]
    assert all(three.count(v) == 3 for v in "ABC")
    assert st.warmup_flags(order) == [True, True] + [False] * 10
    assert st.warmup_flags(three) == [True] * 3 + [False] * 6


def test_known_5_percent_effect_is_detected_over_rounds():
    """5 timed rounds, 1% round-to-round noise: latency 5% up is `slower`, throughput 5% up is
    `faster`, and the interval contains the true 1.05 and excludes 1."""
    rng = np.random.default_rng(1)
    for metric, higher, verdict in (("median_itl_ms", False, st.SLOWER),
                                    ("output_throughput", True, st.FASTER)):
        off, on = _rounds(rng, 10.0), _rounds(rng, 10.5)
        c = st.compare(metric, off, on, higher)
        assert c.verdict == verdict
        assert 1.0 < c.ci_low < 1.05 < c.ci_high
        assert c.ratio == pytest.approx(np.median(on) / np.median(off))
        assert c.detectable < 0.05 and (c.n_off, c.n_on) == (5, 5)


def test_detection_and_coverage_rates_over_many_synthetic_runs():
    """Calibration, not one lucky seed: over 100 synthetic A/Bs of 5 rounds each, a 5% effect
    under 1% noise is always detected, the interval covers the true ratio most of the time, and
    a null effect is called `no detectable difference` in most runs."""
    rng = np.random.default_rng(7)
    detected = covered = null_clean = 0
    for _ in range(100):
        c = st.compare("median_itl_ms", _rounds(rng, 10.0), _rounds(rng, 10.5), False)
        detected += c.verdict == st.SLOWER
        covered += c.ci_low <= 1.05 <= c.ci_high
        n = st.compare("median_itl_ms", _rounds(rng, 10.0), _rounds(rng, 10.0), False)
        null_clean += n.verdict == st.NO_DIFFERENCE
    assert detected == 100
    assert covered >= 80 and null_clean >= 80  # a 5-sample percentile bootstrap undercovers


def test_null_effect_is_no_detectable_difference():
    rng = np.random.default_rng(2)
    c = st.compare("median_ttft_ms", _rounds(rng, 20.0), _rounds(rng, 20.0), False)
    assert c.verdict == st.NO_DIFFERENCE and c.ci_low < 1.0 < c.ci_high
    # The smallest detectable effect follows the noise: ~1% noise, a few % detectable.
    assert 0.003 < c.detectable < 0.03


def test_per_request_effect_on_ttft_and_itl():
    """Pooled per-request samples: TTFT (one value a request) and ITL (many a request)."""
    rng = np.random.default_rng(3)
    ttft_off = rng.lognormal(np.log(50), 0.2, 3000)
    ttft_on = rng.lognormal(np.log(50 * 0.95), 0.2, 3000)
    for q in (50, 95):
        c = st.compare("pooled_ttft_ms", ttft_off, ttft_on, False, q=q)
        assert c.verdict == st.FASTER and c.ci_low < 0.95 < c.ci_high < 1.0

    def itls(scale: float) -> list[list[float]]:
        return [list(scale * rng.lognormal(0, 0.05) * rng.lognormal(0, 0.1, 40))
                for _ in range(400)]

    c = st.compare("pooled_itl_p50_ms", itls(1.0), itls(1.05), False)
    assert c.verdict == st.SLOWER and c.ci_low < 1.05 < c.ci_high
    null = st.compare("pooled_itl_p50_ms", itls(1.0), itls(1.0), False)
    assert null.verdict == st.NO_DIFFERENCE


def test_itls_are_resampled_by_request():
    """A request's ITLs move together (same batch, same steps): resampling single ITLs would
    pretend 50x the evidence. The interval over requests is as wide as one value a request."""
    rng = np.random.default_rng(4)
    levels_off, levels_on = rng.lognormal(0, 0.2, 60), rng.lognormal(0, 0.2, 60)
    grouped = st.compare("itl", [[x] * 50 for x in levels_off], [[x] * 50 for x in levels_on],
                         False)
    one_each = st.compare("itl", levels_off, levels_on, False)
    flat = st.compare("itl", np.repeat(levels_off, 50), np.repeat(levels_on, 50), False)

    def width(c):
        return math.log(c.ci_high / c.ci_low)

    assert width(grouped) == pytest.approx(width(one_each), rel=0.25)
    assert width(flat) < width(grouped) / 4


def test_verdict_directions_and_detectable_effect():
    assert st.verdict(0.90, 0.95, higher_is_better=False) == st.FASTER
    assert st.verdict(0.90, 0.95, higher_is_better=True) == st.SLOWER
    assert st.verdict(1.02, 1.10, higher_is_better=False) == st.SLOWER
    assert st.verdict(1.02, 1.10, higher_is_better=True) == st.FASTER
    assert st.verdict(0.98, 1.01, higher_is_better=True) == st.NO_DIFFERENCE
    assert st.detectable_effect(0.97, 1.03) == pytest.approx(math.sqrt(1.03 / 0.97) - 1)
    assert st.detectable_effect(1.0, 1.0) == 0.0


def test_interval_is_reproducible_and_seeded():
    rng = np.random.default_rng(5)
    off, on = _rounds(rng, 10.0, n=200), _rounds(rng, 10.2, n=200)
    assert st.ratio_interval(off, on) == st.ratio_interval(off, on)
    assert st.ratio_interval(off, on) != st.ratio_interval(off, on, seed=st.SEED + 1)
    assert st.compare("m", off, on, False) == st.compare("m", off, on, False)


def test_too_few_samples_and_empty_groups():
    c = st.compare("m", [10.0, 10.1], [11.0, 11.2, 11.1], False)
    assert c.verdict == st.TOO_FEW and c.ci_low is None and c.detectable is None
    assert c.ratio == pytest.approx(11.1 / 10.05)
    assert st.num_groups([[], [1.0, 2.0], 3.0]) == 2
    assert st.compare("m", [0.0] * 4, [1.0] * 4, False).verdict == st.UNDEFINED
    with pytest.raises(ValueError, match="no samples for on"):
        st.compare("m", [1.0], [[]], False)
