"""Statistics for bench_ab: round order, on/off ratios with bootstrap intervals, verdicts.

Pure functions over numbers (numpy only), so they are tested on synthetic data.

- **Order.** Variants alternate in ABBA order (A B B A A B ..., for three A B C C B A ...), so a
  slow drift of the machine (clocks, thermals, caches) weighs on every variant alike. The first
  round of each variant is a warm-up: kept in the report, left out of the statistics.
- **Ratio.** For a metric, the ratio is statistic(on) / statistic(off), where the statistic is a
  percentile (the median, or P95) of the pooled samples of each variant. A sample is a *group*:
  one round's summary value (output throughput, a round's median ITL), one request's TTFT, or all
  ITLs of one request (the tokens of a request are not independent, so they are resampled
  together).
- **Interval.** A 95% percentile-bootstrap interval: each variant's groups are resampled with
  replacement, independently, `n_boot` times with a fixed seed (reports are reproducible), and
  the 2.5th and 97.5th percentiles of the resampled ratios bound it.
- **Verdict.** `faster` or `slower` when the interval excludes 1 (direction-aware: for latency
  lower is better, for throughput higher), else `no detectable difference`; with fewer than
  `MIN_SAMPLES` groups per variant, `too few samples` (no interval).
- **Detectable effect.** With half-width h of the interval on the log scale,
  h = (ln hi - ln lo) / 2, an effect e is declared only when |ln(1 + e)| > h (for an interval of
  that width around the true ratio). The smallest detectable effect is exp(h) - 1: an effect of
  that size is found about half the time, one 1.43x that size 80% of the time
  ((1.96 + 0.84) / 1.96, for a normal estimate).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np

LEVEL = 0.95
N_BOOT = 2000
SEED = 0
MIN_SAMPLES = 3

FASTER, SLOWER, NO_DIFFERENCE = "faster", "slower", "no detectable difference"
TOO_FEW = "too few samples"
UNDEFINED = "undefined (off is 0)"


def abba_order(variants: Sequence[str], rounds: int) -> list[str]:
    """`rounds` rounds of each variant: forward, then backward, and so on (A B B A A B ...)."""
    order: list[str] = []
    for r in range(rounds):
        order += list(variants) if r % 2 == 0 else list(reversed(variants))
    return order


def warmup_flags(order: Sequence[str]) -> list[bool]:
    """True at the first round of each variant."""
    seen: set[str] = set()
    flags = []
    for v in order:
        flags.append(v not in seen)
        seen.add(v)
    return flags


@dataclass(frozen=True)
class Comparison:
    metric: str
    higher_is_better: bool
    off: float  # the statistic of each variant's pooled samples
    on: float
    ratio: float  # on / off
    ci_low: float | None
    ci_high: float | None
    verdict: str
    detectable: float | None  # smallest detectable relative effect (0.03 = 3%)
    n_off: int  # groups (rounds or requests)
    n_on: int

    def to_dict(self) -> dict:
        return asdict(self)


def _groups(samples: Sequence) -> list[np.ndarray]:
    """A sample is a number (a group of one) or a sequence of numbers; empty groups drop out."""
    groups = [np.atleast_1d(np.asarray(s, dtype=float)) for s in samples]
    return [g for g in groups if g.size]


def num_groups(samples: Sequence) -> int:
    """How many non-empty groups `compare` would see."""
    return len(_groups(samples))


def _statistic(groups: list[np.ndarray], q: float) -> float:
    return float(np.percentile(np.concatenate(groups), q))


def _bootstrap(groups: list[np.ndarray], q: float, n_boot: int,
               rng: np.random.Generator) -> np.ndarray:
    """The statistic of `n_boot` resamples of the groups (with replacement)."""
    idx = rng.integers(0, len(groups), size=(n_boot, len(groups)))
    if all(g.size == 1 for g in groups):
        values = np.concatenate(groups)
        return np.percentile(values[idx], q, axis=1)
    return np.array([_statistic([groups[i] for i in row], q) for row in idx])


def ratio_interval(off: Sequence, on: Sequence, q: float = 50.0, n_boot: int = N_BOOT,
                   seed: int = SEED, level: float = LEVEL) -> tuple[float, float]:
    """Percentile-bootstrap interval of statistic(on) / statistic(off)."""
    rng = np.random.default_rng(seed)
    g_off, g_on = _groups(off), _groups(on)
    ratios = _bootstrap(g_on, q, n_boot, rng) / _bootstrap(g_off, q, n_boot, rng)
    tail = (1 - level) / 2 * 100
    lo, hi = np.percentile(ratios, [tail, 100 - tail])
    return float(lo), float(hi)


def verdict(ci_low: float, ci_high: float, higher_is_better: bool) -> str:
    if ci_low <= 1.0 <= ci_high:
        return NO_DIFFERENCE
    on_is_higher = ci_low > 1.0
    return FASTER if on_is_higher == higher_is_better else SLOWER


def detectable_effect(ci_low: float, ci_high: float) -> float:
    """exp(h) - 1, h the interval's half-width on the log scale (see the module docstring)."""
    return float(np.expm1((np.log(ci_high) - np.log(ci_low)) / 2))


def compare(metric: str, off: Sequence, on: Sequence, higher_is_better: bool,
            q: float = 50.0, n_boot: int = N_BOOT, seed: int = SEED) -> Comparison:
    """on vs off for one metric; `off` / `on` are samples (numbers or per-request sequences)."""
    g_off, g_on = _groups(off), _groups(on)
    if not g_off or not g_on:
        raise ValueError(f"{metric}: no samples for {'off' if not g_off else 'on'}")
    s_off, s_on = _statistic(g_off, q), _statistic(g_on, q)
    ratio = s_on / s_off if s_off > 0 else float("nan")
    base = dict(metric=metric, higher_is_better=higher_is_better, off=s_off, on=s_on,
                ratio=ratio, n_off=len(g_off), n_on=len(g_on))
    if not s_off > 0 or min(len(g_off), len(g_on)) < MIN_SAMPLES:
        return Comparison(**base, ci_low=None, ci_high=None, detectable=None,
                          verdict=UNDEFINED if not s_off > 0 else TOO_FEW)
    lo, hi = ratio_interval(g_off, g_on, q, n_boot, seed)
    return Comparison(**base, ci_low=lo, ci_high=hi, verdict=verdict(lo, hi, higher_is_better),
                      detectable=detectable_effect(lo, hi))
