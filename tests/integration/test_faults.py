"""Faults injected between the two SSH namespace hosts, and what each run ends as.

The migration link ``mig0`` joins the hosts directly and SSH uses the control
links, so taking ``mig0`` down cuts the migration stream and nothing else (see
sshhosts.py).  Every test checks the outcome migrator states, its exit code
where the CLI runs, and that nothing is left on either host.
"""

from __future__ import annotations

import json
import subprocess
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest
import zstandard

from migrator.config import Scenario, dump_scenario
from migrator.metrics.events import read_jsonl
from tests.integration.children import run_migrator
from tests.integration.conftest import (
    QEMU_7_SWITCHOVER,
    QEMU_11_SWITCHOVER,
    one_error_line,
    run_migration,
    scenario,
)
from tests.integration.fault_specs import SLOW_POSTCOPY, link_down, strike
from tests.integration.qemu_leftovers import POOL, assert_released
from tests.integration.ssh_scenarios import NOTHING, leftovers, ssh_scenario
from tests.integration.sshhosts import SSHTestbed


def statuses(run_dir: Path, side: str) -> list[str]:
    """The MIGRATION statuses ``side`` announced, in order."""
    return [str(r["data"]["status"]) for r in read_jsonl(run_dir / side / "events.jsonl")
            if r["event"] == "MIGRATION"]


def marks(run_dir: Path, what: str) -> list[dict[str, Any]]:
    """The timeline marks named ``what``."""
    return [r for r in read_jsonl(run_dir / "timeline.jsonl") if r["what"] == what]


def run_in_process(spec: Scenario, runs_root: Path) -> Path:
    return run_migration(spec, runs_root).path


def run_cli(tmp_path: Path, spec: Scenario) -> tuple[subprocess.CompletedProcess[str], Path]:
    """``migrator run`` in a child process; returns it and the run directory."""
    spec_file = tmp_path / "s.toml"
    spec_file.write_text(dump_scenario(spec))

    runs = tmp_path / "runs"
    done = run_migrator(["run", str(spec_file), "--runs-dir", str(runs)], timeout=600)
    [run_dir] = runs.iterdir()
    return done, run_dir


def assert_recovered(run_dir: Path, outages: int, faults: Sequence[int]) -> dict[str, Any]:
    """Paused on both sides ``outages`` times, recovered as often, completed, 0 bad pages."""
    meta: dict[str, Any] = json.loads((run_dir / "run.json").read_text())
    assert meta["outcome"] == "completed-after-recovery", meta.get("statement")
    assert meta["recoveries"] == outages
    for side in ("src", "dst"):
        seen = statuses(run_dir, side)
        assert seen.count("postcopy-paused") >= outages, (side, seen)
        assert seen[-1] == "completed", (side, seen)
    assert len(marks(run_dir, "both-paused")) == outages
    assert len(marks(run_dir, "recovered")) == outages
    injected = [m["index"] for m in marks(run_dir, "fault-injected")]
    assert injected == list(faults)
    assert len(marks(run_dir, "fault-cleared")) == len(faults)
    assert meta["verify"]["bad_pages"] == 0
    assert meta["verify"]["pages"] > 0
    return meta


def test_link_down_3s_in_postcopy_pauses_both_sides_then_recovers(
    ssh_testbed: SSHTestbed, work_root: Path, runs_root: Path,
) -> None:
    spec = ssh_scenario(ssh_testbed, work_root, "it-link-down", migration=SLOW_POSTCOPY,
                        faults=[link_down("postcopy")])
    run_dir = run_in_process(spec, runs_root)
    assert_recovered(run_dir, outages=1, faults=[0])
    # The pause came from the outage: the stream stalled while the link was down.
    [injected] = marks(run_dir, "fault-injected")
    [paused] = marks(run_dir, "both-paused")
    [cleared] = marks(run_dir, "fault-cleared")
    [recovered] = marks(run_dir, "recovered")
    assert injected["host_ns"] < paused["host_ns"] < cleared["host_ns"] < recovered["host_ns"]
    assert leftovers(ssh_testbed, work_root) == NOTHING


def test_two_link_outages_in_one_run_are_both_recovered(
    ssh_testbed: SSHTestbed, work_root: Path, tmp_path: Path,
) -> None:
    spec = ssh_scenario(ssh_testbed, work_root, "it-link-down-twice", migration=SLOW_POSTCOPY,
                        faults=[link_down("postcopy"), link_down("recovered")])
    done, run_dir = run_cli(tmp_path, spec)
    assert done.returncode == 6, done.stderr  # completed after recovery
    assert "completed-after-recovery" in done.stdout
    assert_recovered(run_dir, outages=2, faults=[0, 1])
    assert leftovers(ssh_testbed, work_root) == NOTHING


def test_destination_killed_in_postcopy_fails_after_switchover(
    ssh_testbed: SSHTestbed, work_root: Path, tmp_path: Path,
) -> None:
    spec = ssh_scenario(ssh_testbed, work_root, "it-kill-dst", migration=SLOW_POSTCOPY,
                        faults=[strike("kill", "destination", "postcopy")])
    done, run_dir = run_cli(tmp_path, spec)
    assert done.returncode == 5, done.stderr
    line = one_error_line(done.stderr)
    assert "failed after switchover" in line
    assert "the VM is lost" in line
    assert "destination QEMU" in line
    meta = json.loads((run_dir / "run.json").read_text())
    assert meta["outcome"] == "failed-after-switchover"
    report = json.loads((run_dir / "report.json").read_text())
    assert report["outcome"] == "failed-after-switchover"
    assert "the VM is lost" in report["statement"]
    [pause] = report["recoveries"]  # the source paused when its destination vanished
    assert pause["result"] == "not recovered"
    # The killed QEMU's trace, compressed on its host and fetched back: a whole stream,
    # with the fetches made until the kill.
    decompressor = zstandard.ZstdDecompressor().decompressobj()
    decompressor.decompress((run_dir / "dst" / "trace.log.zst").read_bytes())
    assert decompressor.eof
    [ram0] = [block for block in report["fetch"] if block["ramblock"] == "ram0"]
    assert ram0["faults"] >= 1
    assert leftovers(ssh_testbed, work_root) == NOTHING


def test_source_killed_before_switchover_fails_before_switchover(
    ssh_testbed: SSHTestbed, work_root: Path, tmp_path: Path,
) -> None:
    spec = ssh_scenario(
        ssh_testbed, work_root, "it-kill-src",
        migration={"switchover": {"policy": "after-seconds", "seconds": 30}},
        faults=[strike("kill", "source", "precopy", after_ms=100)])
    done, run_dir = run_cli(tmp_path, spec)
    assert done.returncode == 4, done.stderr
    line = one_error_line(done.stderr)
    assert "failed before switchover" in line
    assert "the guest died with its source QEMU" in line
    assert "the destination held nothing of it yet" in line
    assert "postcopy-active" not in statuses(run_dir, "dst")
    report = json.loads((run_dir / "report.json").read_text())
    assert report["outcome"] == "failed-before-switchover"
    assert "the guest died with its source QEMU" in report["statement"]
    assert "the destination held nothing of it yet" in report["statement"]
    assert leftovers(ssh_testbed, work_root) == NOTHING


def test_migrate_pause_of_the_source_in_postcopy_is_recovered(
    ssh_testbed: SSHTestbed, work_root: Path, runs_root: Path,
) -> None:
    spec = ssh_scenario(ssh_testbed, work_root, "it-migrate-pause", migration=SLOW_POSTCOPY,
                        faults=[strike("migrate-pause", "source", "postcopy")])
    run_dir = run_in_process(spec, runs_root)
    meta = json.loads((run_dir / "run.json").read_text())
    assert meta["outcome"] == "completed-after-recovery", meta.get("statement")
    assert meta["recoveries"] == 1
    # QEMU paused by itself here: the source on the command, the destination on the
    # stream's end; no watchdog was needed.
    assert marks(run_dir, "stream-stalled") == []
    assert meta["verify"]["bad_pages"] == 0
    assert leftovers(ssh_testbed, work_root) == NOTHING


def test_exhausted_destination_pool_fails_before_switchover(tmp_path: Path) -> None:
    pool = POOL.read_text()
    spec = scenario("it-pool-exhausted", vm={"backing": "hugetlb-2m"},
                    faults=[{"kind": "pool-exhausted"}])
    done, run_dir = run_cli(tmp_path, spec)
    assert done.returncode == 4, done.stderr
    line = one_error_line(done.stderr)
    assert "failed before switchover: dst" in line
    assert "Cannot allocate memory" in line  # QEMU's own reason, from its stderr
    assert "still running on the source" in line
    assert [m["kind"] for m in marks(run_dir, "fault-injected")] == ["pool-exhausted"]
    assert_released(run_dir, pool)


@pytest.mark.parametrize(("root", "switchover"), [
    # 7.2 reports a failed reconnect only on stderr (migration/recovery.py); post-copy from
    # the start keeps it clear of its TCG dirty-tracking bug (qemu/known_issues.py).
    ("qemu_7_root", QEMU_7_SWITCHOVER),
    # >= 9.1 reports it (postcopy-recover-setup, then postcopy-paused again).
    ("qemu_11_root", QEMU_11_SWITCHOVER),
])
def test_link_down_is_recovered_on_other_qemu_generations(
    ssh_testbed: SSHTestbed, work_root: Path, runs_root: Path, request: pytest.FixtureRequest,
    root: str, switchover: dict[str, object],
) -> None:
    qemu_root: Path = request.getfixturevalue(root)
    spec = ssh_scenario(ssh_testbed, work_root, f"it-link-down-{root}",
                        migration=SLOW_POSTCOPY | {"switchover": switchover},
                        vm={"qemu_root": str(qemu_root)}, faults=[link_down("postcopy")])
    run_dir = run_in_process(spec, runs_root)
    assert_recovered(run_dir, outages=1, faults=[0])
    assert leftovers(ssh_testbed, work_root) == NOTHING
