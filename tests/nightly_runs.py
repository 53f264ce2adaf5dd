"""Runs for the nightly dashboard tests: the recorded run directories, and stores of nights.

Shared by the dashboard's unit tests and its browser test: a store built by
:func:`nightly` holds 6 baseline runs and 6 runs on :data:`LAST_NIGHT`,
constructed from one recorded run with chosen metric values.
"""

from __future__ import annotations

import dataclasses
from datetime import UTC, datetime, timedelta
from pathlib import Path

from migrator.results.schema import MetricValue
from migrator.results.store import ResultsStore, RunRecord

__all__ = ["LAST_NIGHT", "RUNS", "nightly", "record"]

RUNS = Path(__file__).resolve().parent / "data" / "runs"
# The last night starts at 12:00 UTC on this date (the default night start).
LAST_NIGHT = datetime(2026, 11, 24, 22, 0, tzinfo=UTC)


def record(store: ResultsStore, template: RunRecord, run_id: str, when: datetime,
           freeze_ms: float, p50_ms: float, **dimensions: object) -> None:
    """A run like ``template`` at ``when`` with chosen metric values (a constructed sample)."""
    store.record(dataclasses.replace(
        template, run_id=run_id, report_sha256=f"{run_id}-{freeze_ms}-{p50_ms}",
        dimensions={**template.dimensions, "run_id": run_id, "run_date": when, **dimensions},
        report={**template.report, "run_id": run_id},
        metrics=[MetricValue("freeze_ms", freeze_ms, "ms", "test"),
                 MetricValue("fetch.ram0.p50_ms", p50_ms, "ms", "test"),
                 MetricValue("fetch.ram0.faults", 15, "faults", "test"),
                 MetricValue("transfer.ram_bytes", 2e8, "bytes", "test")]))


def nightly(db: Path, template: RunRecord, freeze_shift: float) -> Path:
    """6 baseline runs (3 nights of 2) and 6 runs on the last night, freeze times ``shift``."""
    with ResultsStore.open(db) as store:
        for night in range(1, 4):
            for rep in range(2):
                record(store, template, f"base-{night}-{rep}",
                       LAST_NIGHT - timedelta(days=night, minutes=-10 * rep),
                       10 + 0.1 * rep + 0.05 * night, 5 + 0.01 * rep)
        for rep in range(6):
            # 22:00 to 00:30: the night's job runs past midnight and stays one night.
            record(store, template, f"cand-{rep}", LAST_NIGHT + timedelta(minutes=30 * rep),
                   (10 + 0.1 * (rep % 2) + 0.05 * (rep % 3 + 1)) * freeze_shift,
                   5 + 0.01 * (rep % 2))
    return db
