"""Tuning knobs reach both real QEMUs, and a combination a QEMU refuses is refused before boot."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from migrator.config import dump_scenario
from migrator.metrics.summary import build_report
from tests.integration.children import migrator
from tests.integration.conftest import host_qemu_version, run_migration, scenario
from tests.integration.refused_runs import assert_nothing_started, run_expecting_failure

TUNED = {
    "auto_converge": {"initial_pct": 30, "increment_pct": 5},
    "xbzrle_cache_mib": 16,
    "capabilities": {"validate-uuid": True},
    "parameters": {"announce-rounds": 3},
}


def settings_need(report_json: str) -> str:
    """The detail of the migration-settings need in ``hosts check --json`` output."""
    [need] = [need for host in json.loads(report_json)["hosts"] for need in host["needs"]
              if need["what"].startswith("migration settings")]
    return str(need["detail"])


def test_tuning_reaches_both_qemus_and_the_report(runs_root: Path) -> None:
    run = run_migration(scenario("it-tuned", migration=TUNED), runs_root)
    timeline = [json.loads(line) for line in (run.path / "timeline.jsonl").read_text()
                .splitlines()]
    [taken] = [mark for mark in timeline if mark["what"] == "settings-in-effect"]
    for side in ("source", "destination"):
        assert {"auto-converge", "xbzrle", "validate-uuid"} <= set(taken[side]["capabilities"])
        parameters = taken[side]["parameters"]
        assert (parameters["cpu-throttle-initial"], parameters["cpu-throttle-increment"],
                parameters["xbzrle-cache-size"], parameters["announce-rounds"]) == (
            30, 5, 16 << 20, 3)
    # xbzrle was really on: the source's query-migrate reports its cache.
    final = json.loads((run.path / "final-query-migrate.json").read_text())
    assert "xbzrle-cache" in final["src"]
    report = build_report(run.path)
    assert report.outcome == "completed"
    assert report.environment["tuning"] == (
        "announce-rounds=3;auto-converge;cpu-throttle-increment=5;cpu-throttle-initial=30;"
        "validate-uuid;xbzrle;xbzrle-cache-size=16777216")
    assert not [w for w in report.warnings if w.startswith("tuning:")]
    # Both QEMUs' threads were sampled: where the post-copy time went on each host.
    kinds = {(row.side, row.thread): row for row in report.thread_cpu}
    assert {("src", "vCPU 0"), ("src", "migration"), ("dst", "vCPU 0"),
            ("dst", "post-copy fault")} <= kinds.keys()
    assert (kinds[("src", "migration")].sampled.value or 0) > 0
    assert kinds[("dst", "post-copy fault")].postcopy.value is not None


def test_postcopy_with_multifd_is_refused_before_boot_on_qemu_7_2(
        tmp_path: Path, qemu_7_root: Path) -> None:
    """7.2 takes the pair without a word, and its destination then aborts after the switch
    (migrator/qemu/known_issues.py): refused before anything boots."""
    spec = tmp_path / "multifd.toml"
    spec.write_text(dump_scenario(scenario(
        "it-multifd", vm={"qemu_root": str(qemu_7_root)},
        migration={"multifd": {"channels": 2},
                   "switchover": {"policy": "immediately"}})))
    outcome, run_dir = run_expecting_failure(tmp_path, spec)
    assert outcome.startswith("3 error:"), outcome
    assert "QEMU 7.2." in outcome
    assert "takes post-copy with multifd but its destination aborts after the switch" in outcome
    assert_nothing_started(run_dir)


def test_postcopy_with_multifd_is_refused_in_qemu_s_own_words_on_10_0(tmp_path: Path) -> None:
    """The system QEMU (10.0 from bookworm-backports, scripts/setup) refuses the pair itself."""
    spec = tmp_path / "multifd.toml"
    spec.write_text(dump_scenario(scenario("it-multifd-10", migration={"multifd": {}})))
    version = host_qemu_version()
    if not version.startswith("10.0."):
        pytest.skip(f"the system QEMU is {version}, not the 10.0 scripts/setup installs; the "
                    "7.2 and 11.1 tests here cover the other generations")
    checked = migrator("hosts", "check", "--json", str(spec))
    assert checked.returncode == 3, checked.stdout + checked.stderr
    assert "Postcopy is not yet compatible with multifd" in settings_need(checked.stdout)


def test_postcopy_with_multifd_passes_preflight_on_a_qemu_that_takes_it(
        tmp_path: Path, qemu_11_root: Path) -> None:
    spec = tmp_path / "multifd.toml"
    spec.write_text(dump_scenario(scenario(
        "it-multifd-11", vm={"qemu_root": str(qemu_11_root)},
        migration={"multifd": {"channels": 2}})))
    checked = migrator("hosts", "check", "--json", str(spec))
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert re.fullmatch(r"QEMU 11\.1\.\d+ takes them", settings_need(checked.stdout))


def test_a_precopy_past_max_seconds_is_cancelled_and_the_guest_stays_on_the_source(
        tmp_path: Path) -> None:
    spec = tmp_path / "cancel.toml"
    # 8 MiB/s cannot move 512 MiB in 2 s: the rule must fire.
    spec.write_text(dump_scenario(scenario("it-cancel", migration={
        "postcopy": False, "max_seconds": 2.0, "max_bandwidth_mib_s": 8,
        "switchover": {"policy": "immediately"}})))
    outcome, run_dir = run_expecting_failure(tmp_path, spec)
    assert outcome.startswith("4 error: failed before switchover: migration.max_seconds: "
                              "pre-copy did not converge in 2 s; migrate_cancel sent"), outcome
    assert "still running on the source with its state intact" in outcome
    assert run_dir is not None
    timeline = [json.loads(line) for line in (run_dir / "timeline.jsonl").read_text()
                .splitlines()]
    assert [mark["reason"] for mark in timeline if mark["what"] == "cancel"] == [
        "migration.max_seconds: pre-copy did not converge in 2 s"]
    assert json.loads((run_dir / "run.json").read_text())["outcome"] == \
        "failed-before-switchover"


def test_pausing_the_source_after_passes_makes_precopy_converge(runs_root: Path) -> None:
    # 32 MiB/s against a guest rewriting 256 MiB: pre-copy alone would not converge soon.
    run = run_migration(scenario("it-pause-source", migration={
        "postcopy": False, "max_bandwidth_mib_s": 32,
        "switchover": {"policy": "pause-source-after-passes", "passes": 2}}), runs_root)
    marks = [json.loads(line) for line in (run.path / "timeline.jsonl").read_text()
             .splitlines()]
    what = [mark["what"] for mark in marks]
    assert what.index("source-paused") < what.index("destination-resumed")
    report = build_report(run.path)
    assert report.outcome == "completed"
    assert report.statement is not None
    # The guest was frozen from the pause until the destination resumed it.
    paused_ns = next(mark["host_ns"] for mark in marks if mark["what"] == "source-paused")
    resumed_ns = next(mark["host_ns"] for mark in marks if mark["what"] == "destination-resumed")
    assert report.freeze is not None
    freeze_ms = report.freeze.freeze.value
    assert freeze_ms is not None
    # QMP event times (STOP, RESUME) against the timeline's marks: a few ms apart at most.
    assert freeze_ms >= (resumed_ns - paused_ns) / 1e6 - 50
