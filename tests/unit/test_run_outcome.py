"""The report derives the outcome from the raw artifacts and flags a run.json that disagrees."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest

from migrator.metrics.summary import build_report

RUNS = Path(__file__).resolve().parents[1] / "data" / "runs"


@pytest.fixture
def run(tmp_path: Path) -> Path:
    """A copy of a recorded run that completed with post-copy (hugetlb-2m)."""
    copy = tmp_path / "hugetlb-2m"
    shutil.copytree(RUNS / "hugetlb-2m", copy)
    return copy


def rewrite_meta(run: Path, **fields: Any) -> None:
    meta = json.loads((run / "run.json").read_text())
    meta.update(fields)
    (run / "run.json").write_text(json.dumps(meta))


def disagreement(warnings: list[str]) -> list[str]:
    return [w for w in warnings if w.startswith("outcome: run.json records")]


def test_a_run_json_that_agrees_is_kept_with_its_statement(run: Path) -> None:
    rewrite_meta(run, statement="completed: as the runner said it")
    report = build_report(run)
    assert (report.outcome, report.statement) == ("completed", "completed: as the runner said it")
    assert not disagreement(report.warnings)


def test_a_wrong_outcome_in_run_json_is_corrected_from_the_events(run: Path) -> None:
    rewrite_meta(run, outcome="failed-before-switchover", statement="failed before switchover: x")
    report = build_report(run)
    assert report.outcome == "completed"
    assert (report.statement or "").startswith("completed:")
    assert disagreement(report.warnings) == [
        "outcome: run.json records 'failed-before-switchover', the raw artifacts say "
        "'completed' (MIGRATION events, timeline marks, the guest's verify line and the final "
        "query-migrate); the report shows the latter"]


def test_an_error_after_the_switch_is_failed_after_switchover(run: Path) -> None:
    rewrite_meta(run, outcome="failed-before-switchover",
                 error={"type": "QemuExitedError", "message": "dst: QEMU exited (exit 1)"})
    report = build_report(run)
    # The events show postcopy-active: the switch had happened when the run failed.
    assert report.outcome == "failed-after-switchover"
    assert report.statement is not None
    assert report.statement.startswith("failed after switchover: dst: QEMU exited (exit 1);")
    assert len(disagreement(report.warnings)) == 1


def test_postcopy_asked_for_but_never_entered_is_completed_without_postcopy(run: Path) -> None:
    for side in ("src", "dst"):
        events = run / side / "events.jsonl"
        kept = [line for line in events.read_text().splitlines()
                if "postcopy" not in json.loads(line).get("data", {}).get("status", "")]
        events.write_text("".join(line + "\n" for line in kept))
    report = build_report(run)
    assert report.outcome == "completed-without-postcopy"
    assert "pre-copy completed before the switchover policy fired" in (report.statement or "")
    assert len(disagreement(report.warnings)) == 1


def test_bad_pages_seen_by_the_guest_fail_the_run_whatever_run_json_says(run: Path) -> None:
    console = run / "dst" / "console.jsonl"
    lines = console.read_text().splitlines()
    bad = []
    for line in lines:
        record = json.loads(line)
        if record["line"].startswith('@MIG {"t":"verify"'):
            probe = json.loads(record["line"].removeprefix("@MIG "))
            probe.update(bad_pages=3, first_bad=[1, 2, 3])
            record["line"] = "@MIG " + json.dumps(probe, separators=(",", ":"))
        bad.append(json.dumps(record))
    assert bad != lines, "the recorded run has a verify line"
    console.write_text("".join(line + "\n" for line in bad))
    report = build_report(run)
    assert report.outcome == "failed-after-switchover"
    assert "the guest found 3 bad pages" in (report.statement or "")


def test_an_interruption_is_taken_from_run_json(run: Path) -> None:
    rewrite_meta(run, outcome="interrupted", statement="interrupted by SIGINT")
    report = build_report(run)
    assert (report.outcome, report.statement) == ("interrupted", "interrupted by SIGINT")
    assert not disagreement(report.warnings)
