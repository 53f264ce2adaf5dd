"""CPU and NUMA placement on real QEMUs: threads pinned as asked and seen running there, guest
RAM bound to its node, and a placement the host cannot give refused before anything boots.

This machine has CPUs 0-1 and one NUMA node (0): vCPUs go to CPU 1, the migration threads
(and so everything else QEMU runs) to CPU 0, on both sides.
"""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path
from typing import Any

import pytest

from migrator.config import dump_scenario
from migrator.config.placement import parse_cpu_list
from migrator.metrics.events import read_jsonl
from migrator.metrics.summary import build_report
from migrator.qemu.threads import THREADS_FILE
from migrator.results import ResultsStore, parse_selector
from migrator.rundir import RunDir, RunMeta, artifact_path
from tests.integration.conftest import (
    QEMU_7_SWITCHOVER,
    QEMU_11_SWITCHOVER,
    run_migration,
    scenario,
)
from tests.integration.qemu_leftovers import POOL, assert_released
from tests.integration.refused_runs import assert_nothing_started, run_expecting_failure
from tests.integration.ssh_scenarios import NOTHING, leftovers, ssh_scenario
from tests.integration.sshhosts import SSHTestbed

PINNED = {"vcpu_cpus": "1", "migration_cpus": "0"}
# The migration threads each QEMU generation names (qemu/threads.py).
SOURCE_MAIN = {"mig/src/main", "live_migration"}
FAULT = {"mig/dst/fault", "fault-default"}


def ran_on(run: Path, side: str) -> dict[tuple[int, str], set[int]]:
    """The CPUs each thread was seen on in ``SIDE/threads.jsonl`` in samples where it had
    run since the one before (its ticks grew): where it really ran during the migration."""
    seen: dict[tuple[int, str], set[int]] = defaultdict(set)
    ticks: dict[int, int] = {}
    assert artifact_path(run / side / THREADS_FILE) is not None, f"no {side}/{THREADS_FILE}"
    for record in read_jsonl(run / side / THREADS_FILE):
        for tid, name, utime, stime, cpu in record.get("threads", []):
            if tid in ticks and utime + stime > ticks[tid]:
                seen[(tid, name)].add(cpu)
            ticks[tid] = utime + stime
    return seen


def check_pinned(run: RunDir, fault_names: set[str], source_names: set[str]) -> dict[str, Any]:
    """run.json's placement is what was asked, and each thread ran where it was pinned."""
    meta = RunMeta.read(run.path)
    assert meta.placement is not None
    recorded: dict[str, Any] = {}
    for role, side, migration_names in (("source", "src", source_names),
                                        ("destination", "dst", fault_names)):
        record = getattr(meta.placement, role)
        assert record.asked["vcpu_cpus"] in ("1", [1])
        assert record.launched_under == "0"
        threads = {thread.name: thread for thread in record.threads}
        vcpus = [t for t in record.threads if t.role == "vcpu"]
        assert len(vcpus) == 1
        assert vcpus[0].pinned
        assert (vcpus[0].wanted, vcpus[0].cpus) == ("1", "1")
        [migration] = [threads[name] for name in migration_names if name in threads]
        assert migration.role == "migration"
        # Inherited from QEMU's start under taskset: on CPU 0 from its first instruction.
        assert (migration.wanted, migration.cpus, migration.pinned) == ("0", "0", False)
        assert all(t.cpus == t.wanted for t in record.threads), record.threads
        assert record.errors == []
        # Really there: every sample in which a thread had run saw it on its CPU.  The
        # source's vCPU may stop before the sampler's first look; the destination's runs
        # the guest from the switch.  The fault thread may never run long enough to show:
        # the migration threads together (the source's sends, the destination's loads).
        where = ran_on(run.path, side)
        vcpu_ran = where[(vcpus[0].tid, vcpus[0].name)]
        assert vcpu_ran <= {1}
        if side == "dst":
            assert vcpu_ran == {1}
        assert set().union(*(where[(t.tid, t.name)] for t in record.threads
                             if t.role == "migration")) == {0}
        for (tid, name), cpus in where.items():
            wanted = {t.tid: t.wanted for t in record.threads}.get(tid)
            if wanted is not None:
                assert cpus <= parse_cpu_list(wanted), (name, cpus)
        recorded[side] = record
    return recorded


def test_threads_pinned_and_hugetlb_ram_bound_to_node_0(runs_root: Path,
                                                        tmp_path: Path) -> None:
    pool_before = POOL.read_text()
    run = run_migration(scenario(
        "it-pinned", vm={"backing": "hugetlb-2m"},
        placement={"source": {**PINNED, "memory_node": 0},
                   "destination": {"vcpu_cpus": [1], "migration_cpus": "0",
                                   "memory_node": 0}}), runs_root)
    recorded = check_pinned(run, FAULT, SOURCE_MAIN)
    for side in ("src", "dst"):
        memory = recorded[side].memory
        assert memory is not None
        assert (memory.node, memory.policy, memory.page_kib) == (0, "bind:0", 2048)
        assert set(memory.pages) == {"0"}
        assert memory.pages["0"] > 0
    # The destination holds the whole guest after the migration, every page on node 0.
    assert recorded["dst"].memory.pages["0"] == 512 * 1024 // 2048
    report = build_report(run.path)
    assert report.outcome == "completed"
    assert report.environment["placement"] == ("src:vcpu=1;mig=0;node=0 "
                                               "dst:vcpu=1;mig=0;node=0")
    assert not [w for w in report.warnings if w.startswith("placement:")], report.warnings
    assert report.placement is not None
    assert {m.side: m.policy for m in report.placement.memory} == {"src": "bind:0",
                                                                   "dst": "bind:0"}
    assert_released(run.path, pool_before)
    # The results store can split runs on it.
    with ResultsStore.open(tmp_path / "results.sqlite") as store:
        store.import_run(run.path)
        [row] = store.select(parse_selector(f"placement={report.environment['placement']}"))
        assert row["run_id"] == run.run_id


def test_threads_pinned_on_qemu_7_2_whose_thread_names_differ(
        runs_root: Path, qemu_7_root: Path) -> None:
    run = run_migration(scenario(
        "it-pinned-7", vm={"qemu_root": str(qemu_7_root)},
        migration={"switchover": QEMU_7_SWITCHOVER},
        placement={"source": PINNED, "destination": PINNED}), runs_root)
    recorded = check_pinned(run, {"fault-default"}, {"live_migration"})
    names = {t.name for t in recorded["dst"].threads}
    assert "postcopy/listen" in names
    assert build_report(run.path).outcome == "completed"


@pytest.mark.parametrize(("placement", "expected"), [
    ({"destination": {"memory_node": 1}},
     "needs placement.destination.memory_node = 1: local has no NUMA node 1 with memory (it "
     "has node 0); fix: set memory_node to one of 0"),
    ({"source": {"vcpu_cpus": "5", "migration_cpus": "0"}},
     "needs placement.source: CPUs 0,5 online: CPU 5 not online on local, which has CPUs 0-1 "
     "online; fix: name CPUs among 0-1 in [placement.source]"),
])
def test_a_placement_the_host_cannot_give_is_refused_before_boot(
        tmp_path: Path, placement: dict[str, Any], expected: str) -> None:
    pool_before = POOL.read_text()
    spec = tmp_path / "placed.toml"
    spec.write_text(dump_scenario(scenario("it-misplaced", vm={"backing": "hugetlb-2m"},
                                           placement=placement)))
    outcome, run_dir = run_expecting_failure(tmp_path, spec)
    assert outcome.startswith("3 error: source+destination local: "), outcome
    assert expected in outcome
    assert_nothing_started(run_dir)
    assert run_dir is not None
    assert_released(run_dir, pool_before)


def test_with_io_cpus_new_migration_threads_are_moved_to_theirs_on_qemu_11(
        runs_root: Path, qemu_11_root: Path) -> None:
    """QEMU starts under io_cpus, so the migration threads are born there: the watch moves
    them while the migration runs."""
    placed = {"vcpu_cpus": "1", "migration_cpus": "0", "io_cpus": "1"}
    run = run_migration(scenario(
        "it-pinned-io", vm={"qemu_root": str(qemu_11_root)},
        migration={"switchover": QEMU_11_SWITCHOVER},
        placement={"source": placed, "destination": placed}), runs_root)
    meta = RunMeta.read(run.path)
    assert meta.placement is not None
    assert meta.placement.source is not None
    for record in (meta.placement.source, meta.placement.destination):
        assert record is not None
        assert record.launched_under == "1"
        roles = {thread.name: thread for thread in record.threads}
        assert all(t.cpus == t.wanted for t in record.threads), record.threads
        migration = [t for t in record.threads if t.role == "migration"]
        assert migration
        assert all((t.cpus, t.pinned) == ("0", True) for t in migration)
        main = [t for t in record.threads if t.role == "main loop"]
        assert [(t.cpus, t.pinned) for t in main] == [("1", False)], roles
    assert {"mig/src/main", "mig/src/return"} <= {t.name for t in meta.placement.source.threads}
    assert build_report(run.path).outcome == "completed"


def test_threads_pinned_on_ssh_hosts(ssh_testbed: SSHTestbed, work_root: Path,
                                     runs_root: Path) -> None:
    """The same placement, each QEMU on its SSH host (the helper runs there, over SSH)."""
    run = run_migration(ssh_scenario(ssh_testbed, work_root, "it-ssh-pinned", placement={
        "source": PINNED, "destination": PINNED}), runs_root)
    recorded = check_pinned(run, FAULT, SOURCE_MAIN)
    assert recorded["src"].host == ssh_testbed.a.address
    assert recorded["dst"].host == ssh_testbed.b.address
    argv = json.loads((run.path / "src" / "argv.json").read_text())
    assert argv[:3] == ["taskset", "-c", "0"]
    assert build_report(run.path).outcome == "completed"
    assert leftovers(ssh_testbed, work_root) == NOTHING
