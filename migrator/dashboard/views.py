"""Which runs the dashboard compares: scenario groups, their latest night, their baseline.

Runs are grouped by ``scenario_hash``; see :mod:`migrator.dashboard.build` for
what a night, the candidate and the baseline are.  The verdicts of each group
come from :func:`migrator.results.compare.compare` (:func:`compare_views`).
"""

from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any

from migrator.errors import ConfigError
from migrator.results.compare import (
    ALPHA,
    DEFAULT_RULES,
    MetricRule,
    MetricVerdict,
    Verdict,
    compare,
)
from migrator.results.store import ResultsStore, Selector

__all__ = ["DEFAULT_NIGHTS", "DEFAULT_NIGHT_START", "DashboardOptions", "ScenarioView",
           "VerdictJob", "compare_one", "main_block", "night_of", "select_views", "slug",
           "verdict_jobs"]

DEFAULT_NIGHTS = 7
DEFAULT_NIGHT_START = 12
_ORDER = {Verdict.REGRESSION: 0, Verdict.IMPROVEMENT: 1, Verdict.CHANGED: 2,
          Verdict.NO_CHANGE: 3, Verdict.INSUFFICIENT: 4}
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")


def night_of(when: datetime, start_hour: int = DEFAULT_NIGHT_START) -> date:
    """The night ``when`` belongs to: the date the 24 h from ``start_hour`` UTC began on."""
    return (when.astimezone(UTC) - timedelta(hours=start_hour)).date()


@dataclass(frozen=True)
class DashboardOptions:
    """How :func:`build_dashboard` picks and compares runs (module docstring)."""

    candidate: Selector | None = None
    baseline: Selector | None = None
    runs_root: Path | None = None
    nights: int = DEFAULT_NIGHTS
    night_start_hour: int = DEFAULT_NIGHT_START
    rules: Sequence[MetricRule] = DEFAULT_RULES
    alpha: float = ALPHA
    #: Also write the Prometheus textfile here (the textfile collector's directory).
    textfile: Path | None = None
    #: Processes computing verdicts and run pages (both CPU-bound Python); None: one per
    #: CPU, 1: everything in this process.
    jobs: int | None = None


@dataclass
class ScenarioView:
    """One scenario hash: its history, latest night, baseline and verdicts."""

    key: str
    name: str
    slug: str
    history: list[dict[str, Any]]
    candidate: list[dict[str, Any]]
    baseline: list[dict[str, Any]]
    candidate_label: str
    baseline_label: str
    verdicts: list[MetricVerdict] = field(default_factory=list)
    block: str | None = None

    @property
    def regressions(self) -> list[MetricVerdict]:
        """The verdicts that are regressions."""
        return [v for v in self.verdicts if v.verdict is Verdict.REGRESSION]

    @property
    def status(self) -> str:
        """``regression``, ``insufficient`` (no metric could be tested) or ``ok``."""
        if self.regressions:
            return "regression"
        if all(v.verdict is Verdict.INSUFFICIENT for v in self.verdicts):
            return "insufficient"
        return "ok"

    def counts(self) -> dict[str, int]:
        """How many metrics got each verdict."""
        out: dict[str, int] = {}
        for v in self.verdicts:
            out[v.verdict.value] = out.get(v.verdict.value, 0) + 1
        return out

    def metric(self, template: str) -> str | None:
        """A headline template (``fetch.{block}.p50_ms``) as this scenario's metric name."""
        if "{block}" in template:
            return None if self.block is None else template.format(block=self.block)
        return template

def slug(text: str) -> str:
    """``text`` as a file name: runs of other characters than letters, digits, ``._-`` as ``_``."""
    return _UNSAFE.sub("_", text).strip("._") or "run"


def _by_hash(rows: Iterable[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    out: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for row in rows:
        out[row["scenario_hash"]].append(row)
    return out


def _nights_text(nights: Sequence[date]) -> str:
    if not nights:
        return "no night"
    if len(nights) == 1:
        return f"night of {nights[0]}"
    return f"{len(nights)} nights, {nights[0]} to {nights[-1]}"


def select_views(store: ResultsStore, options: DashboardOptions) -> list[ScenarioView]:
    """Group the stored runs into :class:`ScenarioView`s with candidate and baseline runs.

    Raises :class:`ConfigError` when a selector matches no stored run.
    """
    history = _by_hash(store.select())
    night = options.night_start_hour

    def nights(rows: Iterable[dict[str, Any]]) -> list[date]:
        return sorted({night_of(r["run_date"], night) for r in rows})

    if options.candidate is not None:
        chosen = store.select(options.candidate)
        if not chosen:
            raise ConfigError(f"candidate selector {str(options.candidate)!r} matches no "
                              "stored run", field="--candidate")
        candidates = _by_hash(chosen)
    else:
        candidates = {}
        for key, rows in history.items():
            last = nights(rows)[-1]
            candidates[key] = [r for r in rows if night_of(r["run_date"], night) == last]
    base_rows: list[dict[str, Any]] | None = None
    if options.baseline is not None:
        base_rows = store.select(options.baseline)
        if not base_rows:
            raise ConfigError(f"baseline selector {str(options.baseline)!r} matches no "
                              "stored run", field="--baseline")

    views = []
    for key, cand in candidates.items():
        cand_ids = {r["run_id"] for r in cand}
        past = history.get(key, [])
        cand_nights = nights(cand)
        if base_rows is None:
            earlier = [n for n in nights(past) if n < cand_nights[0]][-options.nights:]
            wanted = set(earlier)
            baseline = [r for r in past if r["run_id"] not in cand_ids
                        and night_of(r["run_date"], night) in wanted]
            base_label = (f"up to {options.nights} nights before the latest: "
                          f"{_nights_text(earlier)}" if earlier
                          else "no earlier night of this scenario")
        else:
            baseline = [r for r in base_rows
                        if r["scenario_hash"] == key and r["run_id"] not in cand_ids]
            base_label = f"{options.baseline}, same scenario hash"
            if not baseline:
                name = cand[0]["scenario"]
                baseline = [r for r in base_rows
                            if r["scenario"] == name and r["run_id"] not in cand_ids]
                base_label = (f"{options.baseline}, same scenario name {name!r} (no baseline "
                              "run has this scenario hash)")
        cand_label = (str(options.candidate) + f" ({_nights_text(cand_nights)})"
                      if options.candidate is not None else _nights_text(cand_nights))
        name = cand[-1]["scenario"]
        views.append(ScenarioView(
            key=key, name=name, slug=f"{slug(name)}-{key[:8]}", history=past, candidate=cand,
            baseline=baseline, candidate_label=cand_label, baseline_label=base_label))
    views.sort(key=lambda v: (v.name, v.key))
    return views


def main_block(samples: Iterable[Mapping[str, float]]) -> str | None:
    """The RAMBlock with the most faults over ``samples`` (the guest's RAM)."""
    faults: dict[str, float] = defaultdict(float)
    for sample in samples:
        for name, value in sample.items():
            if name.startswith("fetch.") and name.endswith(".faults"):
                faults[name[len("fetch."):-len(".faults")]] += value
    return max(faults, key=lambda b: faults[b]) if faults else None


VerdictJob = tuple[list[dict[str, float]], list[dict[str, float]], Sequence[MetricRule], float]


def compare_one(job: VerdictJob) -> list[MetricVerdict]:
    """The verdicts of one scenario (baseline, candidate, rules, alpha), regressions first."""
    baseline, candidate, rules, alpha = job
    verdicts = compare(baseline, candidate, rules=rules, alpha=alpha)
    return sorted(verdicts, key=lambda v: (_ORDER[v.verdict], v.metric))


def verdict_jobs(views: Sequence[ScenarioView], samples: Mapping[str, Mapping[str, float]],
                 options: DashboardOptions) -> list[VerdictJob]:
    """One :func:`compare_one` job per view: its runs' metric samples, the rules and alpha."""
    return [([dict(samples[r["run_id"]]) for r in v.baseline],
             [dict(samples[r["run_id"]]) for r in v.candidate], options.rules, options.alpha)
            for v in views]
