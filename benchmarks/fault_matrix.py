"""Fault x phase matrix: how each injected fault ends a real post-copy migration.

Builds the two SSH namespace hosts of the integration tests
(tests/integration/sshhosts.py), then runs one scenario per row with
``migrator run`` in a child process (so the exit code is the real one) and
prints a Markdown table: the outcome migrator stated, its exit code, the
recoveries, the longest gap between guest heartbeats as they arrived at the
controller (``report.json`` ``outside_stalls.max_gap``: what the guest's users
would have seen), and what the run left behind (QEMU processes in either
namespace, files in the hosts' work dirs, hugepage pool change), which must be 0.

The scenarios are the integration tests' (512 MiB memfd guest, 256 MiB working
set, switch to post-copy after 0.3 s) with post-copy throttled to 32 MiB/s so a
fault strikes while pages are still moving, and a stream stalled for 1 s taken
as broken (tests/integration/test_faults.py).  The pool-exhausted fault needs
hugetlb backing, which the namespace hosts cannot give two QEMUs apart (they
share this machine's pools), so its rows run both QEMUs on this machine.

Each row's scenario, stdout, stderr and run directory are kept under --out.
The ``expected`` column is the outcome each row should have (docs/faults.md);
``ok`` says whether the exit code matched and nothing was left.

Usage (as root, after scripts/setup):

    .venv/bin/python benchmarks/fault_matrix.py [--only ROW ...] [--out DIR] [--list]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # the testbed and scenario helpers live in tests/
    sys.path.insert(0, str(ROOT))

from migrator.config import Scenario, dump_scenario  # noqa: E402
from migrator.metrics.summary import build_report  # noqa: E402
from tests.integration.conftest import scenario  # noqa: E402

# As the fault tests: post-copy still running when a fault strikes, a stall noticed in 1 s.
from tests.integration.fault_specs import SLOW_POSTCOPY, STALL_TIMEOUT_S, link_down, strike  # noqa: E402
from tests.integration.qemu_leftovers import qemu_processes_mentioning  # noqa: E402
from tests.integration.ssh_scenarios import leftovers, qemus_in, ssh_scenario  # noqa: E402
from tests.integration.sshhosts import SSHTestbed, make_testbed  # noqa: E402

# A kill "in pre-copy" must land before the switch: switch late (as test_faults.py does).
LATE_SWITCH: dict[str, object] = {"switchover": {"policy": "after-seconds", "seconds": 30}}
# A 3 s outage wholly inside pre-copy: the first pass throttled to 32 MiB/s (256 MiB to
# send) lasts past the outage and TCP's retransmit backoff, and the switch comes at 10 s,
# still within that first pass (QEMU 7.2 under TCG must switch within 3 passes:
# docs/qemu-notes.md).
LONG_PRECOPY: dict[str, object] = {"max_bandwidth_mib_s": 32,
                                   "switchover": {"policy": "after-seconds", "seconds": 10}}
RUN_TIMEOUT_S = 900.0
# A QEMU still there right after the run may be on its way out: how long to watch it go.
LINGER_S = 10.0
HUGEPAGE_SIZES_KIB = (2048, 1048576)


@dataclass(frozen=True)
class Row:
    """One scenario of the matrix."""

    name: str
    """What --only selects."""
    fault: str
    phase: str
    faults: list[dict[str, object]]
    expected: str
    """The outcome this row should end in."""
    expected_exit: int
    migration: dict[str, object] = field(default_factory=dict)
    says: str = ""
    """Words the run's statement (run.json) must hold: which side holds what."""
    local_hugetlb: bool = False
    """Both QEMUs on this machine, on 2 MiB hugetlb pages (not the SSH hosts)."""


RECOVERED, BEFORE, AFTER = "completed-after-recovery", "failed-before-switchover", \
    "failed-after-switchover"

ROWS: tuple[Row, ...] = (
    Row("none", "none", "-", [], "completed", 0),
    Row("link-down-postcopy", "link-down 3 s (dst mig0)", "postcopy",
        [link_down("postcopy")], RECOVERED, 6),
    Row("link-down-twice", "link-down 3 s (dst mig0), twice", "postcopy + recovered",
        [link_down("postcopy"), link_down("recovered")], RECOVERED, 6),
    # Wholly in pre-copy: TCP rides the outage out, there is nothing to pause or recover.
    Row("link-down-precopy", "link-down 3 s (dst mig0)", "precopy",
        [link_down("precopy", after_ms=100)], "completed", 0, LONG_PRECOPY),
    # Struck 100 ms into a 0.3 s pre-copy: the outage spans the switch, so post-copy
    # starts on a dead link and is recovered.
    Row("link-down-switch", "link-down 3 s (dst mig0)", "precopy, across the switch",
        [link_down("precopy", after_ms=100)], RECOVERED, 6),
    Row("pause-src-postcopy", "migrate-pause source", "postcopy",
        [strike("migrate-pause", "source", "postcopy")], RECOVERED, 6),
    Row("pause-dst-postcopy", "migrate-pause destination", "postcopy",
        [strike("migrate-pause", "destination", "postcopy")], RECOVERED, 6),
    Row("stop-src-postcopy", "stop (SIGSTOP) source 3 s", "postcopy",
        [strike("stop", "source", "postcopy", duration_s=3.0)], RECOVERED, 6),
    Row("stop-dst-postcopy", "stop (SIGSTOP) destination 3 s", "postcopy",
        [strike("stop", "destination", "postcopy", duration_s=3.0)], RECOVERED, 6),
    Row("kill-src-precopy", "kill source", "precopy",
        [strike("kill", "source", "precopy", after_ms=100)], BEFORE, 4, LATE_SWITCH,
        says="the guest died with its source QEMU"),
    Row("kill-src-postcopy", "kill source", "postcopy",
        [strike("kill", "source", "postcopy")], AFTER, 5, says="the source QEMU"),
    Row("kill-dst-precopy", "kill destination", "precopy",
        [strike("kill", "destination", "precopy", after_ms=100)], BEFORE, 4, LATE_SWITCH,
        says="still running on the source"),
    Row("kill-dst-postcopy", "kill destination", "postcopy",
        [strike("kill", "destination", "postcopy")], AFTER, 5, says="the destination QEMU"),
    Row("connloss-src-postcopy", "connection-loss source", "postcopy",
        [strike("connection-loss", "source", "postcopy")], AFTER, 5, says="the source QEMU"),
    Row("connloss-dst-postcopy", "connection-loss destination", "postcopy",
        [strike("connection-loss", "destination", "postcopy")], AFTER, 5,
        says="the destination QEMU"),
    # "During recovery": struck when the source reports postcopy-recover after a first
    # outage.  QEMU 7.2's recovery handshake takes milliseconds here, so the strike lands
    # as post-copy resumes.
    Row("link-down-recovery", "link-down 3 s, then 2 s more as the source reconnects",
        "postcopy + recovery", [link_down("postcopy"), link_down("recovery", 0, 2.0)],
        RECOVERED, 6),
    Row("kill-dst-recovery", "link-down 3 s, then kill destination as the source reconnects",
        "postcopy + recovery",
        [link_down("postcopy"), strike("kill", "destination", "recovery", after_ms=0)],
        AFTER, 5, says="the destination QEMU"),
    Row("link-down-no-recovery", "link-down 3 s, recovery.auto = false", "postcopy",
        [link_down("postcopy")], AFTER, 5, {"recovery": {"auto": False}},
        says="recovery.auto = false"),
    Row("local-hugetlb-none", "none (local, hugetlb-2m)", "-", [], "completed", 0,
        local_hugetlb=True),
    Row("pool-exhausted", "pool-exhausted (local, hugetlb-2m)", "before start",
        [{"kind": "pool-exhausted"}], BEFORE, 4, local_hugetlb=True,
        says="unable to map backing store"),
)


@dataclass
class Result:
    """What one row's run ended as, and what it left."""

    row: Row
    exit_code: int | None = None
    outcome: str = "?"
    recoveries: int | None = None
    max_gap_ms: float | None = None
    left: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0
    notes: list[str] = field(default_factory=list)
    statement_ok: bool = True
    """The statement names what the row's ``says`` expects."""
    injected_all: bool = True
    """Every fault of the row struck (a timeline ``fault-injected`` mark each)."""
    stderr_ok: bool = True
    """No traceback and at most one ``error:`` line on stderr."""

    @property
    def left_count(self) -> int:
        return int(sum(abs(v) for v in self.left.values()))

    @property
    def ok(self) -> bool:
        return (self.exit_code == self.row.expected_exit and self.outcome == self.row.expected
                and self.left_count == 0 and self.injected_all and self.statement_ok
                and self.stderr_ok)


def migration_section(row: Row) -> dict[str, object]:
    """SLOW_POSTCOPY with the row's own settings on top (recovery merged key by key)."""
    recovery: dict[str, object] = {"stall_timeout_s": STALL_TIMEOUT_S}
    extra = row.migration.get("recovery")
    if isinstance(extra, dict):
        recovery.update(extra)
    return {**SLOW_POSTCOPY, **row.migration, "recovery": recovery}


def make_scenario(row: Row, bed: SSHTestbed | None, work_root: Path) -> Scenario:
    name = f"fm-{row.name}"
    if row.local_hugetlb or bed is None:
        return scenario(name, vm={"backing": "hugetlb-2m", "memory_mib": 512},
                        migration=migration_section(row), faults=row.faults)
    return ssh_scenario(bed, work_root, name, migration=migration_section(row),
                        faults=row.faults)


def hugepage_pools() -> dict[int, int]:
    """nr_hugepages of each size this machine has."""
    pools = {}
    for size in HUGEPAGE_SIZES_KIB:
        path = Path(f"/sys/kernel/mm/hugepages/hugepages-{size}kB/nr_hugepages")
        if path.exists():
            pools[size] = int(path.read_text())
    return pools


def local_files(run_id: str) -> list[str]:
    """Files and directories named after the run where a local run puts hugetlbfs and mounts."""
    places = [Path("/run/migrator"), Path("/dev/hugepages")]
    for line in Path("/proc/mounts").read_text().splitlines():
        fields = line.split()
        if len(fields) > 2 and fields[2] == "hugetlbfs":
            places.append(Path(fields[1].replace("\\040", " ")))
    found: set[str] = set()
    for place in places:
        with contextlib.suppress(OSError):
            found.update(str(p) for p in place.iterdir() if run_id in p.name)
    return sorted(found)


def temp_dirs() -> set[str]:
    """migrator's temporary socket directories on this machine (mktemp -d -t migrator-*)."""
    return {str(p) for p in Path(tempfile.gettempdir()).glob("migrator-????????")}


def run_cli(spec_file: Path, runs: Path, log_dir: Path) -> tuple[int | None, float, str]:
    """``migrator run``; returns its exit code (None: it hung and was killed), seconds, stderr."""
    began = time.monotonic()
    with (log_dir / "stdout.txt").open("w") as out, (log_dir / "stderr.txt").open("w") as err:
        child = subprocess.Popen(
            [sys.executable, "-m", "migrator", "run", str(spec_file), "--runs-dir", str(runs)],
            stdout=out, stderr=err, text=True, cwd=ROOT)
        try:
            code: int | None = child.wait(RUN_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            child.send_signal(signal.SIGTERM)  # an orderly teardown, if it still can
            try:
                child.wait(60)
            except subprocess.TimeoutExpired:
                child.kill()
                child.wait()
            code = None
    return code, time.monotonic() - began, (log_dir / "stderr.txt").read_text()


def read_run(run_dir: Path, result: Result) -> str:
    """Fill outcome, recoveries and the stall from the run directory; returns the run id."""
    meta: dict[str, Any] = {}
    with contextlib.suppress(OSError, ValueError):
        meta = json.loads((run_dir / "run.json").read_text())
    result.outcome = str(meta.get("outcome", "?"))
    statement = str(meta.get("statement", ""))
    if result.row.says and result.row.says not in statement:
        shown = statement if len(statement) <= 200 else statement[:200] + "..."
        result.notes.append(f"statement lacks {result.row.says!r}: {shown}")
        result.statement_ok = False
    result.recoveries = meta.get("recoveries")
    report: Mapping[str, Any] | None = None
    try:
        report = json.loads((run_dir / "report.json").read_text())
    except (OSError, ValueError):
        try:
            report = build_report(run_dir).model_dump(mode="json")
            result.notes.append("no report.json written; rebuilt here")
        except Exception as error:
            result.notes.append(f"no report: {error}")
    if report is not None:
        outside = report.get("outside_stalls") or {}
        result.max_gap_ms = (outside.get("max_gap") or {}).get("value")
    with contextlib.suppress(OSError):
        marks = [json.loads(line) for line in (run_dir / "timeline.jsonl").open()]
        injected = sum(1 for m in marks if m.get("what") == "fault-injected")
        if injected != len(result.row.faults):
            result.notes.append(f"{injected} of {len(result.row.faults)} faults injected")
            result.injected_all = False
    return str(meta.get("run_id", run_dir.name))


def wait_gone(count: Callable[[], int], seconds: float) -> float | None:
    """Seconds until ``count()`` is 0, or None if it is not within ``seconds``."""
    began = time.monotonic()
    while time.monotonic() - began < seconds:
        if count() == 0:
            return time.monotonic() - began
        time.sleep(0.2)
    return None


def kill_pids(pids: list[int]) -> None:
    """SIGKILL QEMUs a run left (they were started by this script's child)."""
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def run_row(row: Row, bed: SSHTestbed | None, out: Path) -> Result:
    """Run one row and account for what it left."""
    result = Result(row)
    row_dir = out / row.name
    row_dir.mkdir(parents=True)
    # Short: the hosts' socket paths live under it.
    work_root = Path(tempfile.mkdtemp(prefix="mig-", dir="/var/tmp"))
    pools, temps = hugepage_pools(), temp_dirs()
    spec_file = row_dir / "scenario.toml"
    spec_file.write_text(dump_scenario(make_scenario(row, bed, work_root)))
    try:
        result.exit_code, result.seconds, stderr = run_cli(spec_file, row_dir / "runs", row_dir)
        if result.exit_code is None:
            result.notes.append(f"hung: killed after {RUN_TIMEOUT_S:g} s")
        if "Traceback" in stderr:
            result.notes.append("traceback on stderr")
            result.stderr_ok = False
        errors = [line for line in stderr.splitlines() if line.startswith("error:")]
        if len(errors) > 1:
            result.notes.append(f"{len(errors)} error lines")
            result.stderr_ok = False
        run_dirs = sorted((row_dir / "runs").glob("*"))
        if len(run_dirs) != 1:
            result.notes.append(f"{len(run_dirs)} run directories")
            return result
        run_id = read_run(run_dirs[0], result)
        if row.local_hugetlb or bed is None:
            def qemus() -> list[int]:
                return qemu_processes_mentioning(run_id)
            files = local_files(run_id) + sorted(temp_dirs() - temps)
        else:
            hosts = bed.hosts

            def qemus() -> list[int]:
                return [pid for host in hosts for pid in qemus_in(host)]
            files = cast(list[str], leftovers(bed, work_root)["files"])
        left_qemus = qemus()
        if left_qemus:
            gone = wait_gone(lambda: len(qemus()), LINGER_S)
            result.notes.append(f"QEMU {left_qemus} left; " + (
                f"gone {gone:.1f} s later" if gone is not None
                else f"still there after {LINGER_S:g} s: killed"))
            kill_pids(qemus())
        if files:
            (row_dir / "leftover-files.txt").write_text("\n".join(files) + "\n")
            result.notes.append(f"{len(files)} files left (leftover-files.txt)")
        result.left = {"qemu": len(left_qemus), "files": len(files)}
        after = hugepage_pools()
        for size, count in pools.items():
            change = after.get(size, 0) - count
            if not change:
                continue
            if row.local_hugetlb:
                result.left[f"pool {size} kB"] = change
                result.notes.append(f"{size} kB pool {change:+d} pages (another user of the "
                                    "machine may have changed it too)")
            else:
                # A memfd guest reserves no hugepages: another user of the machine did it.
                result.notes.append(f"{size} kB pool {change:+d} pages meanwhile, not by this "
                                    "run (memfd guest)")
        return result
    finally:
        shutil.rmtree(work_root, ignore_errors=True)


def render(results: list[Result]) -> str:
    """The Markdown table."""
    lines = [
        "| fault | phase | outcome | exit | expected | recoveries | max heartbeat gap ms "
        "| leftovers | wall s | ok | notes |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        gap = "-" if r.max_gap_ms is None else f"{r.max_gap_ms:.0f}"
        if r.outcome == AFTER:
            gap = f"VM lost ({gap} before)"
        code = "hung" if r.exit_code is None else str(r.exit_code)
        left = str(r.left_count) if r.left else "?"
        recoveries = "-" if r.recoveries is None else str(r.recoveries)
        notes = "; ".join(r.notes).replace("|", "/")
        lines.append(
            f"| {r.row.fault} | {r.row.phase} | {r.outcome} | {code} "
            f"| {r.row.expected} ({r.row.expected_exit}) | {recoveries} | {gap} | {left} "
            f"| {r.seconds:.0f} | {'yes' if r.ok else 'NO'} | {notes} |")
    return "\n".join(lines) + "\n"


@contextlib.contextmanager
def testbed(needed: bool) -> Iterator[SSHTestbed | None]:
    if not needed:
        yield None
        return
    with tempfile.TemporaryDirectory(prefix="fault-matrix-bed-") as scratch, \
            make_testbed(Path(scratch)) as bed:
        yield bed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", action="append", metavar="ROW", default=[],
                        help="run only this row (repeatable); --list shows the names")
    parser.add_argument("--out", type=Path, default=None,
                        help="where each row's scenario, output and run directory are kept "
                             "(default: a new directory under /var/tmp)")
    parser.add_argument("--list", action="store_true", help="list the rows and exit")
    args = parser.parse_args()
    if args.list:
        for row in ROWS:
            print(f"{row.name:24} {row.fault} at {row.phase}")
        return
    names = {row.name for row in ROWS}
    unknown = [name for name in args.only if name not in names]
    if unknown:
        sys.exit(f"unknown row(s) {', '.join(unknown)}; rows: {', '.join(sorted(names))}")
    if os.geteuid() != 0:
        sys.exit("run as root: the testbed makes network namespaces and runs reserve hugepages")
    rows = [row for row in ROWS if not args.only or row.name in args.only]
    out = args.out or Path(tempfile.mkdtemp(prefix="fault-matrix-", dir="/var/tmp"))
    out.mkdir(parents=True, exist_ok=True)
    taken = [row.name for row in rows if (out / row.name).exists()]
    if taken:
        sys.exit(f"{out} already holds {', '.join(taken)}: choose another --out")
    results = []
    with testbed(any(not row.local_hugetlb for row in rows)) as bed:
        for index, row in enumerate(rows, 1):
            print(f"[{index}/{len(rows)}] {row.name} ...", file=sys.stderr, flush=True)
            result = run_row(row, bed, out)
            results.append(result)
            print(f"    exit {result.exit_code}, {result.outcome}, {result.seconds:.0f} s"
                  + (f" ({'; '.join(result.notes)})" if result.notes else ""),
                  file=sys.stderr, flush=True)
    table = render(results)
    (out / "fault-matrix.md").write_text(table)
    print(table)
    print(f"run directories: {out}/ROW/runs/  (table: {out / 'fault-matrix.md'})")
    if not all(r.ok for r in results):
        sys.exit(1)


if __name__ == "__main__":
    main()
