"""Reports are pure functions of recorded run directories."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from migrator.cli.main import app
from migrator.errors import ArtifactError
from migrator.guest.crash import kernel_crash
from migrator.metrics.ramblock import load_ramblocks
from migrator.metrics.summary import build_report, write_report
from migrator.metrics.trace import analyze_trace
from migrator.model import Report
from migrator.report.run_tables import fetch_table
from migrator.report.sources import Sources
from tests.unit.rendering import terminal_text

RUNS = Path(__file__).resolve().parents[1] / "data" / "runs"


@pytest.fixture
def run_copy(tmp_path: Path) -> Path:
    """A writable copy of the recorded 1 GiB run."""
    target = tmp_path / "run"
    shutil.copytree(RUNS / "hugetlb-1g", target)
    return target


BACKLOG_COLUMNS = ("backlog p50 (placements)", "backlog max (placements)")

def test_1g_report_shows_the_freeze_qemu_does_not_report() -> None:
    report = build_report(RUNS / "hugetlb-1g")
    assert report.outcome == "completed"
    assert report.integrity["bad_pages"] == 0
    ram = next(b for b in report.fetch if b.ramblock == "ram0")
    assert ram.page_size == 1 << 30
    assert ram.faults == 1
    assert ram.placement_granularity == 1 << 30
    freeze = report.freeze
    assert freeze is not None
    assert isinstance(freeze.freeze.value, float)
    assert isinstance(freeze.qemu_downtime.value, int)
    assert freeze.freeze.value > 1000 > 100 * freeze.qemu_downtime.value
    assert freeze.freeze.unit == "ms"
    assert "STOP" in freeze.freeze.source
    names = [p.name for p in report.phases]
    assert names[:3] == ["boot", "warmup", "setup"]
    assert {"precopy", "precopy-pass-1", "freeze", "postcopy", "settle", "verify"} <= set(names)
    # Stalls are attributed to the pre-copy pass they fell in.
    assert "precopy-pass-1" in report.guest_stalls[0].by_phase
    compared = {c.quantity: c for c in report.comparisons}
    switchover = compared["VM stopped during switchover"]
    assert switchover.difference is not None
    assert switchover.difference > 1000
    outside = report.outside_stalls
    assert outside is not None
    assert outside.max_gap.value is not None
    assert outside.max_gap.value >= 0.9 * freeze.freeze.value
    assert outside.worst[0].phase.startswith("precopy")


def test_every_metric_names_its_source_and_unit() -> None:
    report = build_report(RUNS / "hugetlb-2m")
    metrics = [*report.timings.values(), *report.transfer.values(), *report.blocktime.values()]
    for block in report.fetch:
        metrics += block.latency_ms.values()
        metrics += block.backlog_placements.values()
    assert metrics
    for metric in metrics:
        assert metric.unit
        assert metric.source


def test_2m_report_resolves_faults_on_2m_pages() -> None:
    report = build_report(RUNS / "hugetlb-2m")
    ram = next(b for b in report.fetch if b.ramblock == "ram0")
    assert ram.page_size == 2 << 20
    assert ram.faults > 0
    assert ram.unresolved == 0
    p50 = ram.latency_ms["p50"].value
    assert p50 is not None
    assert p50 > 0.1  # a 2 MiB fetch is never sub-100 us here


def test_fetch_has_the_backlog_ahead_of_each_request() -> None:
    """Placements between a request and its page: queueing, told apart from page size."""
    run = RUNS / "hugetlb-2m"
    report = build_report(run)
    ram = next(b for b in report.fetch if b.ramblock == "ram0")
    backlog = ram.backlog_placements
    assert list(backlog) == ["p50", "p90", "max"]
    for metric in backlog.values():
        assert metric.unit == "placements"
        assert metric.source.startswith("dst QEMU trace: placements between ")
    hist = analyze_trace(run / "dst" / "trace.log",
                         load_ramblocks(run / "dst" / "ramblocks.txt")).block("ram0").backlog
    assert hist.count == ram.resolved
    assert (backlog["p50"].value, backlog["max"].value) == (hist.quantile(0.5), hist.max)
    p50, top = backlog["p50"].value, backlog["max"].value
    assert "backlog" in terminal_text(report)
    assert f"{p50:,}" in ram0_cells(terminal_text(report))
    table = fetch_table(report, Sources())
    [row] = [row for row in table.rows if row[0].text == "ram0"]
    assert [row[table.columns.index(h)].text for h in BACKLOG_COLUMNS] == [
        f"{p50:,}", f"{top:,}"]


def ram0_cells(terminal: str) -> list[str]:
    """The cells of the guest RAM block's row in the terminal's fetch latency table."""
    row = next(line for line in terminal.splitlines() if line.lstrip().startswith("ram0"))
    return [cell.strip() for cell in row.split("│")]


def test_reports_written_before_the_backlog_still_load_and_render() -> None:
    old = json.loads(build_report(RUNS / "hugetlb-2m").model_dump_json())
    for block in old["fetch"]:
        del block["backlog_placements"]
    report = Report.model_validate(old)
    assert all(block.backlog_placements == {} for block in report.fetch)
    assert "-" in ram0_cells(terminal_text(report))
    table = fetch_table(report, Sources())
    columns = [table.columns.index(h) for h in BACKLOG_COLUMNS]
    assert {row[column].text for row in table.rows for column in columns} == {"-"}


def test_rebuild_is_deterministic_and_round_trips(run_copy: Path) -> None:
    first = build_report(run_copy)
    written = write_report(run_copy, first)
    assert Report.model_validate_json(written.read_text()) == first
    assert build_report(run_copy) == first


def test_torn_artifacts_still_give_a_report(run_copy: Path) -> None:
    for name in ("samples.jsonl", "timeline.jsonl", "dst/console.jsonl", "dst/trace.log"):
        path = run_copy / name
        data = path.read_bytes()
        path.write_bytes(data[: len(data) - 7])  # cut the last line mid-way
    report = build_report(run_copy)
    assert report.freeze is not None
    assert report.fetch


def test_missing_run_json_is_a_clear_error(run_copy: Path) -> None:
    (run_copy / "run.json").unlink()
    with pytest.raises(ArtifactError, match=r"run\.json: missing"):
        build_report(run_copy)


def test_crashed_run_without_trace_reports_what_it_has() -> None:
    run = RUNS / "crashed-memfd-4k"
    report = build_report(run)
    assert report.outcome == "failed-after-switchover"
    assert report.fetch == []
    assert report.integrity == {}
    crash = kernel_crash((run / "dst" / "serial.log").read_text())
    assert crash == "BUG: kernel NULL pointer dereference, address: 0000000000000000"


def test_kernel_crash_ignores_healthy_consoles() -> None:
    healthy = (RUNS / "hugetlb-1g" / "dst" / "serial.log").read_text()
    assert kernel_crash(healthy) is None
    assert kernel_crash("[ 1.0] Kernel panic - not syncing: Fatal exception\n") == (
        "Kernel panic - not syncing: Fatal exception")


def test_cli_report_rebuilds_offline(run_copy: Path) -> None:
    (run_copy / "report.json").unlink(missing_ok=True)
    result = CliRunner().invoke(app, ["report", str(run_copy)])
    assert result.exit_code == 0, result.output
    assert "Per-page fetch latency" in result.output
    assert (run_copy / "report.json").exists()


def test_cli_report_on_a_non_run_dir_fails_cleanly(tmp_path: Path) -> None:
    result = CliRunner().invoke(app, ["report", str(tmp_path)])
    assert result.exit_code == 2  # a directory that is not a run is bad input
    assert "run.json: missing" in result.output
    assert "Traceback" not in result.output
