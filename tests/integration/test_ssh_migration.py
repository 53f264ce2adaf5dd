"""Post-copy between two SSH hosts: network namespaces with a real sshd each (sshhosts.py).

The controller (this process, in the root namespace) drives both QEMUs over SSH;
the migration stream goes over the hosts' direct link ``mig0``.  Guest RAM is
memfd-backed: the namespaces share this machine's hugepage pools and filesystem,
and two hugetlb QEMUs would only compete for the same pages.
"""

from __future__ import annotations

import json
import shutil
import signal
import stat
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import zstandard

from migrator.config import dump_scenario
from migrator.metrics.summary import build_report, write_report
from migrator.model import Report
from tests.integration.children import migrator
from tests.integration.conftest import one_error_line, ram, run_migration
from tests.integration.mid_postcopy import strike_mid_postcopy, wait_for
from tests.integration.ssh_scenarios import NOTHING, leftovers, qemus_in, ssh_scenario
from tests.integration.sshhosts import SSHTestbed

# The promise is "within seconds"; the supervisors escalate to SIGKILL after 2 s.
DEATH_LIMIT_S = 10.0


@dataclass(frozen=True)
class Migrated:
    """One finished migration between the SSH hosts, and what it left on them."""

    run_dir: Path
    report: Report
    left: dict[str, object]
    seconds: float


@pytest.fixture(scope="module")
def ssh_migrate(ssh_testbed: SSHTestbed, runs_root: Path) -> Iterator[Callable[[str], Migrated]]:
    """Migrate a named variant from host a to host b once per module."""
    root = Path(tempfile.mkdtemp(prefix="mig-", dir="/var/tmp"))
    variants: dict[str, dict[str, object]] = {"memfd-4k": {}, "preempt": {"preempt": True}}
    done: dict[str, Migrated] = {}

    def migrate(name: str) -> Migrated:
        if name not in done:
            spec = ssh_scenario(ssh_testbed, root, f"it-ssh-{name}", migration=variants[name])
            began = time.monotonic()
            run_dir = run_migration(spec, runs_root).path
            seconds = time.monotonic() - began
            report = build_report(run_dir)
            write_report(run_dir, report)
            done[name] = Migrated(run_dir, report, leftovers(ssh_testbed, root), seconds)
        return done[name]

    try:
        yield migrate
    finally:
        shutil.rmtree(root, ignore_errors=True)


def test_postcopy_between_ssh_hosts(
    ssh_migrate: Callable[[str], Migrated], ssh_testbed: SSHTestbed,
    record_property: Callable[[str, object], None],
) -> None:
    migrated = ssh_migrate("memfd-4k")
    run_dir, report = migrated.run_dir, migrated.report
    record_property("ssh_migration_s", round(migrated.seconds, 1))
    assert report.outcome == "completed"
    assert report.integrity["bad_pages"] == 0
    assert report.integrity["read_mismatches"] == 0
    assert report.integrity["pages"] == 256 * 256
    assert any(p.name == "postcopy" for p in report.phases)
    block = ram(report)
    assert block.page_size == 4096
    assert block.faults >= 1
    assert block.resolved >= 1
    assert block.latency_ms["p50"].value is not None
    assert block.latency_ms["p50"].value > 0
    # The stream went to b's address on the direct link, not through the controller.
    marks = [json.loads(line) for line in (run_dir / "timeline.jsonl").open()]
    [migrate] = [m for m in marks if m["what"] == "migrate"]
    assert migrate["uri"].startswith(f"tcp:{ssh_testbed.b.peer_address}:")
    # Each QEMU ran from its own host's work dir (QEMU-side files, guest kernel).
    meta = json.loads((run_dir / "run.json").read_text())
    for side, label in (("src", "a"), ("dst", "b")):
        argv = json.loads((run_dir / side / "argv.json").read_text())
        host_dir = f"/{label}/{run_dir.name}/"
        assert host_dir + "guest/" in argv[argv.index("-kernel") + 1]
        assert host_dir + f"{side}/qmp.sock" in argv[argv.index("-qmp") + 1]
        assert meta["host_dirs"][side]["host"] == getattr(ssh_testbed, label).address
    # Raw artifacts: the controller's own, and the QEMUs' fetched back from the hosts (the
    # trace compressed on b before it was fetched).
    for name in ("scenario.toml", "run.json", "timeline.jsonl", "samples.jsonl.zst",
                 "src/argv.json", "dst/argv.json", "dst/trace.log.zst", "dst/ramblocks.txt",
                 "src/console.jsonl.zst", "dst/console.jsonl.zst", "src/serial.log",
                 "dst/serial.log", "src/stderr.log", "dst/stderr.log", "src/events.jsonl",
                 "dst/events.jsonl", "report.json"):
        assert (run_dir / name).exists(), name
    decompressor = zstandard.ZstdDecompressor().decompressobj()
    trace = decompressor.decompress((run_dir / "dst" / "trace.log.zst").read_bytes())
    assert decompressor.eof
    assert b"postcopy_place_page" in trace
    assert not (run_dir / "dst" / "trace.log").exists()
    assert not list(run_dir.glob("**/*.sock"))
    # Nothing left on either host: no QEMU, no run directory.
    assert migrated.left == NOTHING


def test_ssh_report_is_rebuilt_identically_offline(
    ssh_migrate: Callable[[str], Migrated],
) -> None:
    migrated = ssh_migrate("memfd-4k")
    assert build_report(migrated.run_dir) == migrated.report


def test_postcopy_preempt_between_ssh_hosts(ssh_migrate: Callable[[str], Migrated]) -> None:
    # The preempt channel is a second connection to the same URI, host to host.
    migrated = ssh_migrate("preempt")
    assert migrated.report.outcome == "completed"
    assert migrated.report.integrity["bad_pages"] == 0
    assert ram(migrated.report).faults >= 1
    plan = json.loads((migrated.run_dir / "run.json").read_text())["plan"]
    assert plan["destination_capabilities"]["postcopy-preempt"] is True
    assert migrated.left == NOTHING


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM], ids=["SIGKILL", "SIGTERM"])
def test_stopped_controller_leaves_nothing_on_either_host(
    ssh_testbed: SSHTestbed, work_root: Path, tmp_path: Path, sig: signal.Signals,
    record_property: Callable[[str, object], None],
) -> None:
    # Post-copy throttled to 16 MiB/s so it lasts long enough to be struck in.
    spec = ssh_scenario(ssh_testbed, work_root, "it-ssh-kill",
                        migration={"max_postcopy_bandwidth_mib_s": 16})

    def holds(run_dir: Path) -> None:
        # The run really holds what must be released: a QEMU on each host and their files.
        assert len(qemus_in(ssh_testbed.a)) == 1
        assert len(qemus_in(ssh_testbed.b)) == 1
        remote = work_root / "b" / run_dir.name
        assert (remote / "dst" / "trace.log").exists()  # compressed once QEMU has stopped
        assert {stat.S_IMODE(p.stat().st_mode) for p in (remote, remote / "dst")} == {0o700}

    struck: list[float] = []

    def strike(child: subprocess.Popen[str], _: Path) -> None:
        child.send_signal(sig)  # SIGKILL: no clean-up runs in the controller
        struck.append(time.monotonic())

    child, stderr, run_dir = strike_mid_postcopy(tmp_path, spec, strike, holds=holds,
                                                 postcopy_timeout=180)
    wait_for(lambda: leftovers(ssh_testbed, work_root) == NOTHING, DEATH_LIMIT_S,
             "the hosts to be clean")
    seconds = time.monotonic() - struck[0]
    record_property(f"controller_{sig.name}_to_clean_hosts_s", round(seconds, 3))
    print(f"\ncontroller {sig.name} -> no QEMU, no run dir on either host: {seconds:.3f} s")
    if sig == signal.SIGTERM:
        # An orderly stop also fetched what the hosts had recorded before removing it.
        assert child.returncode == 143, stderr
        assert "Traceback" not in stderr
        assert (run_dir / "dst" / "trace.log.zst").stat().st_size > 0
        assert (run_dir / "src" / "serial.log").stat().st_size > 0
        assert json.loads((run_dir / "run.json").read_text())["outcome"] == "interrupted"


@pytest.mark.parametrize("problem", ["host-key", "user", "unreachable", "qemu"])
def test_host_problems_are_one_clear_error_and_start_nothing(
    ssh_testbed: SSHTestbed, work_root: Path, tmp_path: Path, problem: str
) -> None:
    bed = ssh_testbed
    wrong_keys = tmp_path / "known_hosts"
    wrong_keys.write_text(f"{bed.a.address} {bed.b.host_key_line}\n")
    cases: dict[str, tuple[dict[str, object], dict[str, object], str]] = {
        "host-key": ({"known_hosts": str(wrong_keys)}, {},
                     f"{bed.a.address}: host key of {bed.a.address}:22 CHANGED"),
        "user": ({"user": "nobody"}, {}, "refused authentication for user 'nobody'"),
        "unreachable": ({"address": bed.unused_address}, {},
                        f"{bed.unused_address}:22"),
        "qemu": ({}, {"qemu": "/nonexistent/qemu"},
                 f"vm.qemu: /nonexistent/qemu does not exist on {bed.a.address}"),
    }
    source, vm, expected = cases[problem]
    spec = tmp_path / "s.toml"
    spec.write_text(dump_scenario(ssh_scenario(bed, work_root, "it-ssh-errors", source=source,
                                               vm=vm)))
    runs = tmp_path / "runs"
    done = migrator("run", str(spec), "--runs-dir", str(runs))
    assert done.returncode == (3 if problem == "qemu" else 1), done.stderr
    assert expected in one_error_line(done.stderr)
    [run_dir] = runs.iterdir()
    assert json.loads((run_dir / "run.json").read_text())["outcome"] == "not-started"
    assert not (run_dir / "src" / "argv.json").exists()
    assert leftovers(bed, work_root) == NOTHING
    assert not (work_root / "a").exists()
    assert not (work_root / "b").exists()


def test_unchecked_host_key_connects_and_says_so(
    ssh_testbed: SSHTestbed, work_root: Path, tmp_path: Path
) -> None:
    bed = ssh_testbed
    wrong_keys = tmp_path / "known_hosts"
    wrong_keys.write_text(f"{bed.a.address} {bed.b.host_key_line}\n")
    spec = tmp_path / "s.toml"
    # A missing QEMU stops the run at the preflight, after both connections succeeded.
    spec.write_text(dump_scenario(ssh_scenario(
        bed, work_root, "it-ssh-nocheck", source={"known_hosts": str(wrong_keys),
                                                  "check_host_key": False},
        vm={"qemu": "/nonexistent/qemu"})))
    done = migrator("run", str(spec), "--runs-dir", str(tmp_path / "runs"))
    assert done.returncode == 3, done.stderr
    warnings = [line for line in done.stderr.splitlines() if "host key checking is OFF" in line]
    assert len(warnings) == 1, done.stderr
    assert bed.a.address in warnings[0]
    assert "vm.qemu: /nonexistent/qemu does not exist" in done.stderr
