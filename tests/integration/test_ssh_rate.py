"""Post-copy of hugetlb-2m guests between the SSH hosts with the migration link rate-limited.

The two namespace hosts (sshhosts.py) share this machine's kernel, so both
QEMUs draw on one 2 MiB pool: the run's reservations account for each other
(migrator/hosts/hugepages.py, "claims").  ``mig0`` is shaped with ``tc ...
tbf`` on both ends (netem and fq do not exist in this kernel: rate only, no
delay), and the measured 2 MiB fetch latency (the ``ram0`` p50 of the report)
must grow as the rate falls: without post-copy preempt a requested page waits
for its own 2 MiB and whatever the stream has queued ahead of it, both of which
take longer on a slower link.

Every run must really be post-copy (migrator holds downtime-limit at 1 ms until the
switch); the report's pass count is printed beside each rate.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from migrator.errors import MigratorError
from migrator.hosts.hugepages import claimed_hugepages
from migrator.hosts.local import LocalHost
from migrator.metrics.summary import build_report, write_report
from migrator.model import Report
from tests.integration.conftest import ram, run_migration
from tests.integration.ssh_scenarios import NOTHING, leftovers, ssh_scenario
from tests.integration.sshhosts import SSHTestbed, shaped_migration_link

# Falling rates.  A 2 MiB page alone takes 42 ms at 400 Mbit/s and 84 ms at 200 Mbit/s,
# far above TCG's unshaped ~6 ms and its noise; 200 Mbit/s still moves the ~450 MB
# the source sends in under 20 s, so each run stays short.
RATES = ("unlimited", "400mbit", "200mbit")


@dataclass(frozen=True)
class RateRun:
    """One migration at one rate: its report (None if none could be built) and its error."""

    rate: str
    run_dir: Path | None
    report: Report | None
    error: str | None
    seconds: float
    sent_bytes: dict[str, int] | None
    """Bytes each host's tbf let out during the run (None: the link was not shaped)."""
    left: dict[str, object]

    def passes(self) -> int | None:
        """The source's final dirty-sync count."""
        if self.report is None:
            return None
        value = self.report.transfer["ram.dirty-sync-count"].value
        return None if value is None else int(value)

    def p50_ms(self) -> float:
        """The guest RAM block's median fetch latency."""
        assert self.report is not None, self.error
        value = ram(self.report).latency_ms["p50"].value
        assert value is not None
        return value


@pytest.fixture(scope="module")
def rate_run(ssh_testbed: SSHTestbed, runs_root: Path) -> Iterator[Callable[[str], RateRun]]:
    """Migrate at a named rate once per module (one run at a time: two cores)."""
    root = Path(tempfile.mkdtemp(prefix="mig-", dir="/var/tmp"))
    done: dict[str, RateRun] = {}

    def migrate(rate: str) -> RateRun:
        if rate in done:
            return done[rate]
        # QEMU's max-postcopy-bandwidth stays at its default, 0 = unlimited: tbf is the limit.
        spec = ssh_scenario(ssh_testbed, root, f"it-ssh-tbf-{rate}",
                            vm={"backing": "hugetlb-2m"})
        shaping = (contextlib.nullcontext() if rate == "unlimited"
                   else shaped_migration_link(ssh_testbed, rate))
        run_dir: Path | None = None
        error: str | None = None
        began = time.monotonic()
        with shaping as link:
            before = link.sent_bytes() if link else None
            try:
                run_dir = run_migration(spec, runs_root).path
            except MigratorError as failed:
                error = f"{type(failed).__name__}: {failed}"
                run_dir = getattr(failed, "run_dir", None)
            after = link.sent_bytes() if link else None
        seconds = time.monotonic() - began
        report = None
        if run_dir is not None:
            with contextlib.suppress(MigratorError):
                report = build_report(run_dir)
                write_report(run_dir, report)
        sent = ({label: after[label] - before[label] for label in after}
                if before is not None and after is not None else None)
        done[rate] = RateRun(rate, run_dir, report, error, seconds, sent,
                             leftovers(ssh_testbed, root))
        return done[rate]

    try:
        yield migrate
    finally:
        shutil.rmtree(root, ignore_errors=True)


@pytest.mark.parametrize("rate", RATES)
def test_hugetlb_postcopy_over_a_shaped_link(
    rate_run: Callable[[str], RateRun], rate: str,
    record_property: Callable[[str, object], None],
) -> None:
    run = rate_run(rate)
    record_property(f"tbf_{rate}_run_s", round(run.seconds, 1))
    passes = run.passes()
    assert run.error is None
    assert run.report is not None
    assert run.report.outcome == "completed"
    assert run.report.integrity["bad_pages"] == 0
    assert run.report.integrity["read_mismatches"] == 0
    assert any(p.name == "postcopy" for p in run.report.phases)
    block = ram(run.report)
    assert block.page_size == 2 << 20
    assert block.faults >= 1
    assert block.resolved >= 1
    assert run.p50_ms() > 0
    record_property(f"tbf_{rate}_p50_ms", round(run.p50_ms(), 3))
    print(f"\n{rate}: ram0 p50 {run.p50_ms():.3f} ms over {block.resolved} faults, "
          f"{passes} passes, run {run.seconds:.1f} s, tbf sent {run.sent_bytes}")
    if run.sent_bytes is not None:
        # The stream really went through the shaped link: the working set (256 MiB of
        # written pages) left a, and only page requests and acks came back from b.
        assert run.sent_bytes["a"] > 128 << 20
        assert run.sent_bytes["b"] < run.sent_bytes["a"] // 10
    # Both QEMUs gone, both run directories removed, no hugepage claim left open.
    assert run.left == NOTHING
    assert asyncio.run(claimed_hugepages(LocalHost(), 2048)) == 0


def test_fetch_latency_grows_as_the_rate_falls(
    rate_run: Callable[[str], RateRun], record_property: Callable[[str, object], None],
) -> None:
    runs = [rate_run(rate) for rate in RATES]
    p50 = {run.rate: run.p50_ms() for run in runs}
    record_property("tbf_p50_ms", p50)
    print(f"\nram0 p50 by rate: {p50}")
    for faster, slower in itertools.pairwise(RATES):
        assert p50[faster] < p50[slower], p50
