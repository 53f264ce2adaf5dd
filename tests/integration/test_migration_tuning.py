"""Tuning knobs reach both real QEMUs, and a combination a QEMU refuses is refused before boot."""

from __future__ import annotations

import json
from pathlib import Path

from migrator.config import dump_scenario
from migrator.metrics.summary import build_report
from tests.integration.children import migrator
from tests.integration.conftest import run_migration, scenario
from tests.integration.refused_runs import assert_nothing_started, run_expecting_failure

TUNED = {
    "auto_converge": {"initial_pct": 30, "increment_pct": 5},
    "xbzrle_cache_mib": 16,
    "capabilities": {"validate-uuid": True},
    "parameters": {"announce-rounds": 3},
}


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


def test_postcopy_with_multifd_is_refused_before_boot_by_a_qemu_that_cannot(
        tmp_path: Path, qemu_7_root: Path) -> None:
    spec = tmp_path / "multifd.toml"
    spec.write_text(dump_scenario(scenario(
        "it-multifd", vm={"qemu_root": str(qemu_7_root)},
        migration={"multifd": {"channels": 2},
                   "switchover": {"policy": "immediately"}})))
    outcome, run_dir = run_expecting_failure(tmp_path, spec)
    assert outcome.startswith("3 error:"), outcome
    # QEMU's own words, and which QEMU said them.
    assert "QEMU 7.2." in outcome
    assert "Postcopy is not yet compatible with multifd" in outcome
    assert_nothing_started(run_dir)


def test_postcopy_with_multifd_passes_preflight_on_a_qemu_that_takes_it(
        tmp_path: Path, qemu_11_root: Path) -> None:
    spec = tmp_path / "multifd.toml"
    spec.write_text(dump_scenario(scenario(
        "it-multifd-11", vm={"qemu_root": str(qemu_11_root)},
        migration={"multifd": {"channels": 2}})))
    checked = migrator("hosts", "check", str(spec))
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert "QEMU 11.1." in checked.stdout
    assert "takes them" in checked.stdout
