"""Statistical verdicts on constructed samples: permutation test AND minimum effect."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

from migrator.metrics.summary import build_report
from migrator.results.compare import (
    DEFAULT_RULES,
    Direction,
    MetricRule,
    Verdict,
    compare,
    has_regression,
    min_runs_per_side,
    permutation_p,
    rule_for,
    smallest_p,
)
from migrator.results.schema import report_metrics

RUNS = Path(__file__).resolve().parents[1] / "data" / "runs"
LATENCY = "fetch.ram0.p50_ms"


def runs(metric: str, values: list[float] | np.ndarray) -> list[dict[str, float]]:
    """One sample dict per run, as the store hands them to compare()."""
    return [{metric: float(v)} for v in values]


def noisy(mean: float, sd: float, n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).normal(mean, sd, n)


def test_clear_shift_is_a_regression() -> None:
    base = runs(LATENCY, noisy(10.0, 0.4, 8, seed=1))
    cand = runs(LATENCY, noisy(13.0, 0.4, 8, seed=2))
    [v] = compare(base, cand)
    assert v.verdict is Verdict.REGRESSION
    assert v.p_value is not None
    assert v.p_value < 0.01
    assert v.relative_change is not None
    assert v.relative_change > 0.25
    assert v.direction is Direction.LOWER
    assert has_regression([v])


def test_no_shift_is_no_change() -> None:
    base = runs(LATENCY, noisy(10.0, 0.4, 8, seed=3))
    cand = runs(LATENCY, noisy(10.0, 0.4, 8, seed=4))
    [v] = compare(base, cand)
    assert v.verdict is Verdict.NO_CHANGE
    assert v.p_value is not None
    assert v.p_value >= 0.01
    assert "noise" in v.note
    assert not has_regression([v])


def test_significant_shift_below_threshold_is_no_change() -> None:
    # 5 % slower with almost no noise: the test is sure, the effect is under 10 %.
    base = runs(LATENCY, noisy(10.0, 0.02, 8, seed=5))
    cand = runs(LATENCY, noisy(10.5, 0.02, 8, seed=6))
    [v] = compare(base, cand)
    assert v.p_value is not None
    assert v.p_value < 0.01
    assert v.relative_change == pytest.approx(0.05, abs=0.01)
    assert v.verdict is Verdict.NO_CHANGE
    assert "within the 10% threshold" in v.note


def test_improvement_direction() -> None:
    base = runs("freeze_ms", noisy(100.0, 3, 6, seed=7))
    cand = runs("freeze_ms", noisy(60.0, 3, 6, seed=8))
    [v] = compare(base, cand)
    assert v.verdict is Verdict.IMPROVEMENT
    assert not has_regression([v])


def test_higher_is_better_rule_flips_the_verdict() -> None:
    rules = [MetricRule("throughput", Direction.HIGHER, 0.1), *DEFAULT_RULES]
    base = runs("throughput", noisy(100.0, 2, 6, seed=9))
    cand = runs("throughput", noisy(60.0, 2, 6, seed=10))
    [v] = compare(base, cand, rules=rules)
    assert v.verdict is Verdict.REGRESSION


@pytest.mark.parametrize("n", [1, 2])
def test_too_few_samples_is_insufficient_data(n: int) -> None:
    [v] = compare(runs(LATENCY, [10.0] * n), runs(LATENCY, [50.0] * 8))
    assert v.verdict is Verdict.INSUFFICIENT
    assert v.p_value is None
    assert f"{n} baseline vs 8 candidate" in v.note


def test_three_runs_a_side_cannot_be_significant_and_says_so() -> None:
    [v] = compare(runs(LATENCY, [10, 10.1, 10.2]), runs(LATENCY, [50, 50.1, 50.2]))
    assert v.verdict is Verdict.INSUFFICIENT
    assert "smallest achievable p is 0.1" in v.note
    assert "need 5 runs a side" in v.note


def test_smallest_p_matches_scipys_exact_test() -> None:
    assert smallest_p(3, 3) == pytest.approx(0.1)
    assert smallest_p(4, 4) == pytest.approx(2 / 70)
    assert smallest_p(5, 5) == pytest.approx(2 / 252)
    assert min_runs_per_side(0.01) == 5
    assert min_runs_per_side(0.05) == 4
    for n in (3, 4, 5):
        separated = permutation_p(np.arange(n, dtype=float), np.arange(n, dtype=float) + 100)
        assert separated == pytest.approx(smallest_p(n, n))


def test_medians_would_need_eight_runs_a_side() -> None:
    # Why compare() tests the mean: the median statistic ties the extreme split with others.
    from scipy import stats  # type: ignore[import-untyped]

    def median_p(n: int) -> float:
        result = stats.permutation_test(
            (np.arange(n, dtype=float), np.arange(n, dtype=float) + 100),
            lambda x, y, axis: np.median(y, axis=axis) - np.median(x, axis=axis),
            vectorized=True, rng=np.random.default_rng(0))
        return float(result.pvalue)

    assert median_p(5) == pytest.approx(0.0476, abs=1e-3)
    assert median_p(7) > 0.01 > median_p(8)


def test_five_runs_a_side_can_flag_a_regression() -> None:
    [v] = compare(runs(LATENCY, [10, 10.1, 9.9, 10.2, 10]),
                  runs(LATENCY, [14, 14.2, 13.9, 14.1, 14]))
    assert v.verdict is Verdict.REGRESSION
    assert v.p_value == pytest.approx(2 / 252)


def test_metric_on_one_side_only_is_insufficient() -> None:
    base = runs(LATENCY, [1, 2, 3, 4, 5])
    cand = runs("freeze_ms", [1, 2, 3, 4, 5])
    verdicts = {v.metric: v for v in compare(base, cand)}
    assert verdicts[LATENCY].candidate_n == 0
    assert verdicts["freeze_ms"].baseline_n == 0
    assert {v.verdict for v in verdicts.values()} == {Verdict.INSUFFICIENT}


def test_from_zero_is_an_infinite_change() -> None:
    [v] = compare(runs("integrity.bad_pages", [0] * 6), runs("integrity.bad_pages", [3] * 6))
    assert v.verdict is Verdict.REGRESSION
    assert v.relative_change == math.inf
    assert v.to_dict()["relative_change"] == "inf"
    assert v.to_dict()["verdict"] == "regression"


def test_neutral_metric_changes_without_failing() -> None:
    [v] = compare(runs("postcopy_requests", [10, 11, 10, 11, 10]),
                  runs("postcopy_requests", [40, 41, 40, 41, 40]))
    assert v.verdict is Verdict.CHANGED
    assert not has_regression([v])


def test_monte_carlo_verdicts_are_reproducible() -> None:
    # C(24, 12) splits > 9999 resamples: scipy samples at random, with our fixed seed.
    base = runs(LATENCY, noisy(10, 1, 12, seed=11))
    cand = runs(LATENCY, noisy(10.8, 1, 12, seed=12))
    first, second = compare(base, cand), compare(base, cand)
    assert first == second


def test_metric_patterns_restrict_the_comparison() -> None:
    base = [{LATENCY: 1.0, "freeze_ms": 2.0}] * 5
    verdicts = compare(base, base, metrics=["fetch.*"])
    assert [v.metric for v in verdicts] == [LATENCY]


@pytest.mark.parametrize(("metric", "direction", "threshold"), [
    ("fetch.ram0.p50_ms", Direction.LOWER, 0.10),
    ("fetch.ram0.p99_ms", Direction.LOWER, 0.10),
    ("fetch.ram0.max_ms", Direction.LOWER, 0.20),
    ("fetch.ram0.faults", Direction.NEUTRAL, 0.20),
    ("fetch.ram0.backlog_p50", Direction.NEUTRAL, 0.20),
    ("freeze_ms", Direction.LOWER, 0.20),
    ("guest.max_stall_ms", Direction.LOWER, 0.20),
    ("outside.max_gap_ms", Direction.LOWER, 0.20),
    ("blocktime_ms", Direction.LOWER, 0.20),
    ("time.postcopy_ms", Direction.LOWER, 0.10),
    ("postcopy_requests", Direction.NEUTRAL, 0.20),
])
def test_rules(metric: str, direction: Direction, threshold: float) -> None:
    rule = rule_for(metric)
    assert (rule.direction, rule.threshold) == (direction, threshold)


def test_every_stored_metric_has_a_deliberate_rule() -> None:
    # The catch-all rule is for counts; a new latency or stall metric must not land there.
    names = {m.name for run in ("hugetlb-1g", "hugetlb-2m", "crashed-memfd-4k")
             for m in report_metrics(build_report(RUNS / run))}
    caught_all = {n for n in names if rule_for(n).pattern == "*"}
    assert caught_all == {"postcopy_requests", "transfer.dirty_sync_count"}
    assert not any(n.endswith("_ms") for n in caught_all)
