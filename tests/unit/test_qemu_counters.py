"""QEMU's own counters, read from real query-migrate replies of QEMU 7.2 and 11.1."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from migrator.metrics.qemu_counters import LAST_SAMPLE, load_counters
from migrator.metrics.summary import build_report

DATA = Path(__file__).resolve().parents[1] / "data"
RUNS = DATA / "runs"


def final_replies(version: str, backing: str) -> dict[str, dict[str, object]]:
    """The last query-migrate reply of each side in a recorded run (after completion)."""
    last: dict[str, dict[str, object]] = {}
    for line in (DATA / f"qemu-{version}" / backing / "query-migrate.jsonl").open():
        record = json.loads(line)
        last[record["side"]] = record["return"]
    return last


@pytest.fixture
def run_with_11_1_counters(tmp_path: Path) -> Path:
    """A recorded run dir whose final replies are swapped for real QEMU 11.1 ones."""
    run = tmp_path / "run"
    shutil.copytree(RUNS / "hugetlb-2m", run)
    (run / "final-query-migrate.json").write_text(json.dumps(final_replies("11.1",
                                                                          "hugetlbfs-2m")))
    return run


def test_qemu_11_1_latency_fields_reach_the_report(run_with_11_1_counters: Path) -> None:
    report = build_report(run_with_11_1_counters)
    latency = report.qemu_latency["postcopy-latency"]
    assert latency.unit == "ms"
    assert latency.value == pytest.approx(5.107942)
    assert report.qemu_latency["postcopy-vcpu-latency[0]"].value == pytest.approx(5.1079)
    assert report.qemu_latency_dist is not None
    assert sum(report.qemu_latency_dist["counts"]) == 254
    assert report.blocktime["postcopy-blocktime (all vCPUs)"].value == 1600
    quantities = {c.quantity for c in report.comparisons}
    assert "mean fetch latency" in quantities


def test_qemu_7_2_has_no_latency_fields() -> None:
    report = build_report(RUNS / "hugetlb-2m")
    assert report.qemu_latency == {}
    assert report.qemu_latency_dist is None


def test_last_samples_stand_in_when_the_run_died(tmp_path: Path) -> None:
    run = tmp_path / "run"
    shutil.copytree(RUNS / "hugetlb-2m", run)
    (run / "final-query-migrate.json").unlink()
    counters = load_counters(run)
    assert counters.origin == LAST_SAMPLE
    assert counters.metric("src", "ram.transferred", "bytes").value is not None
    assert counters.metric("src", "no.such.field", "x").value is None
