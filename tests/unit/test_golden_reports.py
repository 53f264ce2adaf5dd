"""Golden values: exact report.json numbers of the recorded runs in tests/data/runs/.

test_summary.py checks relations (freeze > QEMU's downtime, ...); these pin the
numbers themselves, so that a changed percentile formula, rounding, unit or
attribution fails a test instead of silently moving every report.

GOLDEN VALUES, computed once from the code at the time of writing and written as
literals. They change only when a metric's definition changes on purpose; then
regenerate them and review the diff:

    rm -rf /tmp/golden && cp -r tests/data/runs /tmp/golden
    .venv/bin/python -c "from pathlib import Path; \
from migrator.metrics.summary import build_report; \
r = build_report(Path('/tmp/golden/hugetlb-2m')); print(r.model_dump_json(indent=1))"

(build_report on a copy: ``migrator report`` would write report.json into the run.)
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest

from migrator.metrics.summary import build_report
from migrator.model import Report

RUNS = Path(__file__).resolve().parents[1] / "data" / "runs"
LATENCY_KEYS = ("p50", "p90", "p99", "p99.9", "max", "mean")

GOLDEN: dict[str, dict[str, Any]] = {
    "hugetlb-1g": {
        "outcome": "completed",
        # ramblock -> (page size, faults, resolved, placement granularity)
        "blocks": {"ram0": (1 << 30, 1, 1, 1 << 30)},
        # ram0 fetch latency in ms, LATENCY_KEYS order
        "latency_ms": (1008.807, 1008.807, 1008.807, 1008.807, 1008.807, 1008.807),
        "freeze_ms": 1436.122,
        "qemu_downtime_ms": 3,
        # worst guest stall: (vcpu, ms, phase)
        "worst_stall": (0, 70.875, "freeze"),
        # vCPU 0: (stalls, max ms, p99 ms, total stalled ms)
        "vcpu0": (92, 70.8746, 0.001, 467.9468),
        "transfer": {"ram.transferred": 325350183, "ram.precopy-bytes": 162572089,
                     "ram.postcopy-bytes": 162778094, "ram.postcopy-requests": 1,
                     "ram.dirty-sync-count": 2},
        "blocktime": {"postcopy-blocktime (all vCPUs)": 0, "postcopy-vcpu-blocktime[0]": 0},
    },
    "hugetlb-2m": {
        "outcome": "completed",
        "blocks": {"ram0": (2 << 20, 15, 15, 2 << 20)},
        "latency_ms": (6.8977, 119.7998, 143.712, 143.712, 143.712, 31.0687),
        "freeze_ms": 15.932,
        "qemu_downtime_ms": 8,
        "worst_stall": (0, 352.183, "precopy-pass-1"),
        "vcpu0": (58, 352.1827, 0.001, 856.5961),
        "transfer": {"ram.transferred": 207726488, "ram.precopy-bytes": 117772798,
                     "ram.postcopy-bytes": 89953690, "ram.postcopy-requests": 15,
                     "ram.dirty-sync-count": 2},
        "blocktime": {"postcopy-blocktime (all vCPUs)": 325, "postcopy-vcpu-blocktime[0]": 325,
                      "trace blocktime vCPU 0": 460.413},
    },
    "crashed-memfd-4k": {
        # run.json records "error", a name older runs gave every failure; the events say
        # the switch happened before the guest crashed.
        "outcome": "failed-after-switchover",
        "blocks": {},
        "latency_ms": None,
        "freeze_ms": 6.013,
        "qemu_downtime_ms": 1,
        "worst_stall": (0, 5.864, "precopy-pass-1"),
        "vcpu0": (11, 5.8643, None, 41.8417),
        "transfer": {"ram.transferred": 210063152, "ram.precopy-bytes": 176430851,
                     "ram.postcopy-bytes": 33632301, "ram.postcopy-requests": 0,
                     "ram.dirty-sync-count": 5},
        "blocktime": {"postcopy-blocktime (all vCPUs)": 0, "postcopy-vcpu-blocktime[0]": 0},
    },
}


@pytest.fixture(scope="module", params=sorted(GOLDEN))
def recorded(request: pytest.FixtureRequest,
             tmp_path_factory: pytest.TempPathFactory) -> tuple[Report, dict[str, Any]]:
    """The report of one recorded run (built on a copy) and its golden values."""
    run: str = request.param
    copy = tmp_path_factory.mktemp("golden") / run
    shutil.copytree(RUNS / run, copy)
    return build_report(copy), GOLDEN[run]


def test_outcome(recorded: tuple[Report, dict[str, Any]]) -> None:
    report, golden = recorded
    assert report.outcome == golden["outcome"]
    run = next(name for name, values in GOLDEN.items() if values is golden)
    recorded_outcome = json.loads((RUNS / run / "run.json").read_text())["outcome"]
    disagreements = [w for w in report.warnings if w.startswith("outcome: run.json records")]
    if recorded_outcome == golden["outcome"]:
        assert not disagreements
    else:
        assert disagreements == [
            f"outcome: run.json records {recorded_outcome!r}, the raw artifacts say "
            f"{golden['outcome']!r} (MIGRATION events, timeline marks, the guest's verify line "
            "and the final query-migrate); the report shows the latter"]


def test_fault_counts_per_ramblock(recorded: tuple[Report, dict[str, Any]]) -> None:
    report, golden = recorded
    faulted = {b.ramblock: (b.page_size, b.faults, b.resolved, b.placement_granularity)
               for b in report.fetch if b.faults}
    assert faulted == golden["blocks"]
    assert all(b.unresolved == 0 for b in report.fetch)


def test_fetch_latency_ms(recorded: tuple[Report, dict[str, Any]]) -> None:
    report, golden = recorded
    blocks = [b for b in report.fetch if b.faults]
    if golden["latency_ms"] is None:
        assert blocks == []
        return
    [ram] = blocks
    assert tuple(ram.latency_ms[k].value for k in LATENCY_KEYS) == golden["latency_ms"]
    assert {m.unit for m in ram.latency_ms.values()} == {"ms"}


def test_freeze_and_qemu_downtime_ms(recorded: tuple[Report, dict[str, Any]]) -> None:
    report, golden = recorded
    assert report.freeze is not None
    assert report.freeze.freeze.value == golden["freeze_ms"]
    assert report.freeze.qemu_downtime.value == golden["qemu_downtime_ms"]


def test_worst_guest_stall(recorded: tuple[Report, dict[str, Any]]) -> None:
    report, golden = recorded
    worst = report.worst_guest_stalls[0]
    assert (worst.vcpu, worst.duration_ms, worst.phase) == golden["worst_stall"]
    assert worst.duration_ms == max(s.duration_ms for s in report.worst_guest_stalls)


def test_vcpu_stall_summary(recorded: tuple[Report, dict[str, Any]]) -> None:
    report, golden = recorded
    [vcpu0] = report.guest_stalls
    assert vcpu0.vcpu == 0
    assert (vcpu0.stalls, vcpu0.max_ms.value, vcpu0.p99_ms.value,
            vcpu0.total_stalled_ms.value) == golden["vcpu0"]


def test_transfer_counters(recorded: tuple[Report, dict[str, Any]]) -> None:
    report, golden = recorded
    assert {k: m.value for k, m in report.transfer.items()} == golden["transfer"]


def test_blocktime(recorded: tuple[Report, dict[str, Any]]) -> None:
    report, golden = recorded
    assert {k: m.value for k, m in report.blocktime.items()} == golden["blocktime"]
