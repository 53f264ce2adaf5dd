"""Per-metric verdicts between two sets of runs: a permutation test AND a minimum effect.

A metric is a ``regression`` (or ``improvement``) only when both hold:

* a two-sided permutation test of the **difference of means** gives p < alpha
  (0.01 by default), so the shift is unlikely to be run-to-run noise, and
* the relative change of the mean, ``(candidate - baseline) / |baseline|``,
  exceeds the metric's threshold (:data:`DEFAULT_RULES`), so it is big enough
  to matter;

in the direction the metric's rule calls worse (or better).  Anything else is
``no change``.  Metrics whose direction carries no judgement (fault counts,
requests) say ``changed`` instead and never fail a comparison.

Why means: each sample is already one run's summary (a percentile over
thousands of faults, a worst stall), and suites repeat a handful of runs.  The
median difference ties many permutations with the observed split: perfectly
separated samples give p = 0.048 at 5 vs 5 and need 8 runs a side for
p < 0.01, against 5 for the mean (tests/unit/test_compare.py shows both).  A
single slow run moves the mean, and that is a real cost a user pays.
This is Firecracker's ``tools/ab_test.py`` rule (p-value and minimum effect).

Why a sample floor: an exact two-sided permutation test of n1 vs n2 runs has
C(n1 + n2, n1) equally likely splits, so its smallest possible p is
``2 / C(n1 + n2, n1)``: 0.33 at 2 vs 2, 0.1 at 3 vs 3, 0.029 at 4 vs 4 and
0.0079 at 5 vs 5.  Below :data:`MIN_SAMPLES` runs a side the test is not run;
above it, while the smallest achievable p is still >= alpha, the verdict is
``insufficient data`` and says significance is impossible, never a silent
``no change``.  :func:`min_runs_per_side` gives the floor (5 for alpha 0.01).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from enum import StrEnum
from fnmatch import fnmatchcase
from typing import Any

import numpy as np
import numpy.typing as npt
from scipy import stats  # type: ignore[import-untyped]  # scipy ships no type hints

__all__ = [
    "ALPHA",
    "DEFAULT_RULES",
    "MIN_SAMPLES",
    "Direction",
    "MetricRule",
    "MetricVerdict",
    "Verdict",
    "compare",
    "compare_metric",
    "has_regression",
    "min_runs_per_side",
    "permutation_p",
    "rule_for",
    "smallest_p",
]

ALPHA = 0.01
MIN_SAMPLES = 3
_BATCH_VALUES = 2_000_000


class Direction(StrEnum):
    """Which way a metric gets better."""

    LOWER = "lower is better"
    HIGHER = "higher is better"
    NEUTRAL = "informational"


class Verdict(StrEnum):
    """The outcome for one metric."""

    REGRESSION = "regression"
    IMPROVEMENT = "improvement"
    CHANGED = "changed"
    NO_CHANGE = "no change"
    INSUFFICIENT = "insufficient data"


@dataclass(frozen=True)
class MetricRule:
    """Direction and minimum relative effect of the metrics matching ``pattern`` (fnmatch)."""

    pattern: str
    direction: Direction
    threshold: float
    why: str = ""


#: First match wins.  The reasons are in docs/results.md; in short: aggregates over
#: many faults (fetch percentiles, durations, bytes) vary little run to run, so 10 %
#: is a change worth a look; single worst events (a stall, the freeze, a max) ride on
#: scheduler noise and need 20 % before they mean something.
DEFAULT_RULES: tuple[MetricRule, ...] = (
    MetricRule("integrity.*", Direction.LOWER, 0.0, "any bad page is a failure"),
    MetricRule("fetch.*.faults", Direction.NEUTRAL, 0.20,
               "fault count follows workload and page size"),
    MetricRule("fetch.*.backlog_*", Direction.NEUTRAL, 0.20,
               "pages queued ahead of requests: explains latency, not a goal"),
    MetricRule("fetch.*.max_ms", Direction.LOWER, 0.20, "single worst fault"),
    MetricRule("fetch.*.p999_ms", Direction.LOWER, 0.20, "tail: a handful of faults"),
    MetricRule("fetch.*_ms", Direction.LOWER, 0.10, "per-page fetch latency"),
    MetricRule("qemu.*latency_ms", Direction.LOWER, 0.10, "QEMU's own fetch latency"),
    MetricRule("freeze_ms", Direction.LOWER, 0.20, "one event per run"),
    MetricRule("qemu_downtime_ms", Direction.LOWER, 0.20, "one event per run"),
    MetricRule("guest.*", Direction.LOWER, 0.20, "guest-visible stalls"),
    MetricRule("outside.*", Direction.LOWER, 0.20, "stalls seen from outside"),
    MetricRule("*blocktime_ms", Direction.LOWER, 0.20, "time vCPUs waited for pages"),
    MetricRule("time.boot_ms", Direction.NEUTRAL, 0.20, "guest boot, not migration"),
    MetricRule("time.*_ms", Direction.LOWER, 0.10, "migration phase durations"),
    MetricRule("transfer.*_bytes", Direction.LOWER, 0.10, "bytes on the wire"),
    MetricRule("*", Direction.NEUTRAL, 0.20, "counts that follow the workload"),
)


def rule_for(metric: str, rules: Sequence[MetricRule] = DEFAULT_RULES) -> MetricRule:
    """The first rule whose pattern matches ``metric`` (neutral, 20 % when none does)."""
    for rule in rules:
        if fnmatchcase(metric, rule.pattern):
            return rule
    return MetricRule("*", Direction.NEUTRAL, 0.20)


def smallest_p(n1: int, n2: int) -> float:
    """Smallest two-sided p an exact permutation test of n1 vs n2 samples can give."""
    return min(1.0, 2 / math.comb(n1 + n2, n1))


def min_runs_per_side(alpha: float = ALPHA) -> int:
    """Fewest runs per side (equal sides) at which p < ``alpha`` is achievable at all."""
    n = 1
    while smallest_p(n, n) >= alpha:
        n += 1
    return n


@dataclass(frozen=True)
class MetricVerdict:
    """The comparison of one metric between baseline and candidate runs."""

    metric: str
    verdict: Verdict
    direction: Direction
    threshold: float
    baseline_n: int
    candidate_n: int
    baseline_mean: float | None
    candidate_mean: float | None
    relative_change: float | None
    p_value: float | None
    note: str

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form (enums as their strings, infinities as strings)."""
        out = asdict(self)
        out["verdict"] = self.verdict.value
        out["direction"] = self.direction.value
        change = self.relative_change
        if change is not None and math.isinf(change):
            out["relative_change"] = "inf" if change > 0 else "-inf"
        return out


def _mean_difference(x: npt.NDArray[np.float64], y: npt.NDArray[np.float64],
                     axis: int) -> npt.NDArray[np.float64]:
    return np.asarray(np.mean(y, axis=axis) - np.mean(x, axis=axis), dtype=np.float64)


def permutation_p(baseline: npt.NDArray[np.float64], candidate: npt.NDArray[np.float64],
                  *, n_resamples: int = 9999, seed: int = 0) -> float:
    """Two-sided permutation-test p of the difference of means.

    Exact (every split) when C(n1 + n2, n1) <= ``n_resamples``, else Monte Carlo
    with a fixed seed, so the same samples always get the same verdict.
    """
    # scipy materialises (resamples in a batch) x (n1 + n2) values; bound that to ~16 MB
    # so a store-wide comparison of thousands of runs does not need gigabytes.
    batch = max(1, _BATCH_VALUES // (len(baseline) + len(candidate)))
    result = stats.permutation_test(
        (baseline, candidate), _mean_difference, permutation_type="independent",
        vectorized=True, n_resamples=n_resamples, batch=batch, alternative="two-sided",
        rng=np.random.default_rng(seed))
    return float(result.pvalue)


def _relative(base: float, cand: float) -> float:
    if base == 0:
        return 0.0 if cand == 0 else math.copysign(math.inf, cand)
    return (cand - base) / abs(base)


def _values(samples: Iterable[Mapping[str, float]], metric: str) -> npt.NDArray[np.float64]:
    values = [float(s[metric]) for s in samples if metric in s]
    array = np.array(values, dtype=np.float64)
    return array[np.isfinite(array)]


def _pct(value: float) -> str:
    return f"{value:+.1%}" if math.isfinite(value) else ("from zero" if value > 0 else "to zero")


def compare_metric(
    metric: str, baseline: npt.NDArray[np.float64], candidate: npt.NDArray[np.float64], *,
    rule: MetricRule, alpha: float = ALPHA, min_samples: int = MIN_SAMPLES,
    n_resamples: int = 9999, seed: int = 0,
) -> MetricVerdict:
    """The verdict on one metric from its per-run samples (see module docstring)."""
    nb, nc = len(baseline), len(candidate)
    base_mean = float(np.mean(baseline)) if nb else None
    cand_mean = float(np.mean(candidate)) if nc else None
    change = (_relative(base_mean, cand_mean)
              if base_mean is not None and cand_mean is not None else None)

    def verdict(kind: Verdict, p: float | None, note: str) -> MetricVerdict:
        return MetricVerdict(metric, kind, rule.direction, rule.threshold, nb, nc, base_mean,
                             cand_mean, change, p, note)

    if nb < min_samples or nc < min_samples:
        return verdict(Verdict.INSUFFICIENT, None,
                       f"{nb} baseline vs {nc} candidate runs; at least {min_samples} a side "
                       f"needed, {min_runs_per_side(alpha)} for p < {alpha:g} to be possible")
    floor = smallest_p(nb, nc)
    if floor >= alpha:
        return verdict(Verdict.INSUFFICIENT, None,
                       f"with {nb} vs {nc} runs the smallest achievable p is {floor:.3g}, "
                       f"so p < {alpha:g} is impossible; need {min_runs_per_side(alpha)} "
                       "runs a side")
    assert change is not None
    p = permutation_p(baseline, candidate, n_resamples=n_resamples, seed=seed)
    if p >= alpha:
        return verdict(Verdict.NO_CHANGE, p, f"p = {p:.3g} >= {alpha:g}: within run-to-run noise")
    if abs(change) <= rule.threshold:
        return verdict(Verdict.NO_CHANGE, p, f"significant (p = {p:.3g}) but {_pct(change)} is "
                       f"within the {rule.threshold:.0%} threshold")
    note = f"{_pct(change)} (threshold {rule.threshold:.0%}), p = {p:.3g}"
    if rule.direction is Direction.NEUTRAL:
        return verdict(Verdict.CHANGED, p, note)
    worse = change > 0 if rule.direction is Direction.LOWER else change < 0
    return verdict(Verdict.REGRESSION if worse else Verdict.IMPROVEMENT, p, note)


def compare(
    baseline: Sequence[Mapping[str, float]], candidate: Sequence[Mapping[str, float]], *,
    rules: Sequence[MetricRule] = DEFAULT_RULES, alpha: float = ALPHA,
    min_samples: int = MIN_SAMPLES, metrics: Sequence[str] = (), n_resamples: int = 9999,
    seed: int = 0,
) -> list[MetricVerdict]:
    """Verdicts for every metric either side has, by metric name.

    ``baseline`` and ``candidate`` hold one mapping per run (metric name ->
    value); a run lacking a metric does not count towards that metric's n.
    ``metrics`` restricts the comparison to names matching any of its fnmatch
    patterns.
    """
    names = sorted({name for sample in (*baseline, *candidate) for name in sample})
    if metrics:
        names = [n for n in names if any(fnmatchcase(n, pattern) for pattern in metrics)]
    return [
        compare_metric(name, _values(baseline, name), _values(candidate, name),
                       rule=rule_for(name, rules), alpha=alpha, min_samples=min_samples,
                       n_resamples=n_resamples, seed=seed)
        for name in names
    ]


def has_regression(verdicts: Iterable[MetricVerdict]) -> bool:
    """True when any metric regressed (the CI exit-code question)."""
    return any(v.verdict is Verdict.REGRESSION for v in verdicts)
