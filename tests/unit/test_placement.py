"""CPU and NUMA placement: CPU lists, the scenario table, which thread gets which CPUs, the
QEMU command line, the host checks, the host helper on a live process, the report's reading."""

from __future__ import annotations

import asyncio
import os
import sys
from pathlib import Path
from typing import Any

import pytest

from migrator.config import Backing, parse_scenario
from migrator.config.placement import (
    SidePlacement,
    format_cpu_list,
    parse_cpu_list,
    placement_label,
)
from migrator.errors import ConfigError, ExitCode
from migrator.hosts.base import CommandResult
from migrator.hosts.fake import FakeHost
from migrator.hosts.local import LocalHost
from migrator.hosts.topology import read_topology
from migrator.metrics.placement import placement_of, placement_section, placement_warnings
from migrator.preflight import memory_groups, placement_needs
from migrator.qemu.affinity import affinity_helper, thread_role, wanted_cpus
from migrator.qemu.cmdline import LaunchSpec, qemu_argv
from migrator.qemu.launcher import QemuLauncher
from migrator.rundir import RunMeta


@pytest.mark.parametrize(("text", "cpus"), [
    ("0", {0}), ("0-3", {0, 1, 2, 3}), ("0-1,8,10-11", {0, 1, 8, 10, 11}), ("5,3", {3, 5}),
    ("7-7", {7})])
def test_cpu_lists_as_linux_writes_them(text: str, cpus: set[int]) -> None:
    assert parse_cpu_list(text) == cpus


@pytest.mark.parametrize(("text", "why"), [
    ("", "empty"), ("0-x", "'0-x' is not a CPU number"), ("1,,2", "'' is not a CPU number"),
    ("3-1", "range '3-1' runs backwards"), (" 1", "' 1' is not"), ("0-9000", "beyond 8191"),
    ("-1", "'-1' is not")])
def test_what_is_not_a_cpu_list(text: str, why: str) -> None:
    with pytest.raises(ValueError, match=why):
        parse_cpu_list(text)


def test_a_cpu_list_written_back_is_canonical() -> None:
    assert format_cpu_list({11, 0, 1, 2, 8, 10}) == "0-2,8,10-11"
    assert format_cpu_list({4}) == "4"
    assert format_cpu_list(set()) == ""
    assert parse_cpu_list(format_cpu_list({1, 3, 4, 5})) == {1, 3, 4, 5}


def placed(**sides: dict[str, Any]) -> dict[str, Any]:
    return {"name": "p", "vm": {"vcpus": 2, "backing": "memfd-4k", "memory_mib": 512},
            "workload": {"working_set_mib": 256}, "placement": sides}


@pytest.mark.parametrize(("sides", "message"), [
    ({"source": {"vcpu_cpus": "0-x"}},
     "scenario: placement.source.vcpu_cpus: not a CPU list: '0-x' is not a CPU number or a "
     "range N-M (write it as Linux does, e.g. '0-3,8') (got '0-x')"),
    ({"destination": {"migration_cpus": "2-1"}},
     "scenario: placement.destination.migration_cpus: not a CPU list: range '2-1' runs "
     "backwards (got '2-1')"),
    ({"source": {"io_cpus": ""}}, "scenario: placement.source.io_cpus: not a CPU list: empty"),
    ({"source": {"vcpu_cpus": [1]}},
     "placement.source.vcpu_cpus: 1 CPUs for vm.vcpus = 2; give one CPU per vCPU"),
    ({"source": {"vcpu_cpus": []}}, "placement.source.vcpu_cpus: an empty array"),
    ({"source": {"vcpu_cpus": [0, 9000]}}, "CPU 9000 is not a CPU number"),
    ({"source": {"memory_node": -1}}, "placement.source.memory_node: Input should be greater"),
    ({"source": {"migration_cpus": 0}}, "placement.source.migration_cpus: Input should be a "
                                        "valid string"),
    ({"src": {}}, "placement.src: unknown key"),
    ({"source": {"cpus": "1"}}, "placement.source.cpus: unknown key"),
])
def test_a_bad_placement_is_refused_at_load_naming_its_field(
        sides: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError) as caught:
        parse_scenario(placed(**sides))
    assert message in str(caught.value)
    assert caught.value.exit_code == ExitCode.BAD_INPUT


def test_a_placement_loads_and_labels_without_commas() -> None:
    scenario = parse_scenario(placed(
        source={"vcpu_cpus": "1-2,4", "migration_cpus": "0", "memory_node": 0},
        destination={"vcpu_cpus": [3, 5], "io_cpus": "6"}))
    source, destination = scenario.placement.of("source"), scenario.placement.of("destination")
    assert source is not None
    assert destination is not None
    assert source.label() == "vcpu=1-2+4;mig=0;node=0"
    assert destination.label() == "vcpu=3/5;io=6"
    label = placement_label({"src": source, "dst": destination})
    assert label == "src:vcpu=1-2+4;mig=0;node=0 dst:vcpu=3/5;io=6"
    assert "," not in label
    # The report reads the same label back from the scenario as dumped into the run.
    assert placement_of(scenario.model_dump(mode="json", exclude_none=True)) == label


def test_no_placement_is_none_and_an_empty_table_is_none_too() -> None:
    scenario = parse_scenario(placed(destination={}))
    assert scenario.placement.of("source") is None
    assert scenario.placement.of("destination") is None
    assert placement_label({"src": None, "dst": SidePlacement()}) == ""


TCG, KVM = "CPU 0/TCG", "CPU 1/KVM"
PID = 100


@pytest.mark.parametrize(("tid", "name", "role"), [
    (101, TCG, "vcpu"), (102, KVM, "vcpu"),
    # A vCPU is known by the id QEMU reports, never by its name.
    (103, "CPU 7/TCG", "other"),
    (104, "live_migration", "migration"), (105, "mig/src/main", "migration"),
    (106, "return path", "migration"), (107, "fault-default", "migration"),
    (108, "postcopy/listen", "migration"), (109, "mig/dst/preempt", "migration"),
    (110, "multifdsend_0", "migration"), (PID, "qemu-system-x86", "main loop"),
    # A QEMU run from a root's loader names its main thread after the loader.
    (PID, "ld-linux-x86-64", "main loop"), (111, "call_rcu", "other"),
    (112, "IO mon_iothread", "other")])
def test_thread_roles(tid: int, name: str, role: str) -> None:
    assert thread_role(tid, name, PID, {101: [0], 102: [1]}) == role


def test_wanted_cpus_per_role() -> None:
    spec = SidePlacement(vcpu_cpus=[2, 3], migration_cpus="0", io_cpus="1")
    assert wanted_cpus(spec, "vcpu", [1]) == frozenset({3})
    # Single-threaded TCG: one thread runs every vCPU, and gets all their CPUs.
    assert wanted_cpus(spec, "vcpu", [0, 1]) == frozenset({2, 3})
    assert wanted_cpus(spec, "migration") == frozenset({0})
    assert wanted_cpus(spec, "main loop") == frozenset({1})
    assert wanted_cpus(spec, "other") == frozenset({1})


def test_unset_fields_fall_back_to_the_cpus_qemu_started_under() -> None:
    only_migration = SidePlacement(migration_cpus="0-1")
    assert only_migration.launch_cpus == "0-1"
    assert wanted_cpus(only_migration, "main loop") == frozenset({0, 1})
    # vCPUs were never asked onto the migration CPUs: the host's default (None).
    assert wanted_cpus(only_migration, "vcpu", [0]) is None
    only_io = SidePlacement(io_cpus="3", vcpu_cpus="1")
    assert wanted_cpus(only_io, "migration") == frozenset({3})
    assert wanted_cpus(only_io, "vcpu", [0]) == frozenset({1})
    only_vcpus = SidePlacement(vcpu_cpus="1")
    assert only_vcpus.launch_cpus is None
    assert wanted_cpus(only_vcpus, "migration") is None
    assert wanted_cpus(only_vcpus, "main loop") is None


def launch(**kw: Any) -> list[str]:
    return qemu_argv(LaunchSpec(
        launcher=QemuLauncher("/usr/bin/qemu-system-x86_64"), name="src", memory_mib=1024,
        vcpus=1, backing=kw.pop("backing", Backing.MEMFD_4K), accel="kvm", machine="pc",
        kernel=Path("/k"), initrd=Path("/i"), append="a", qmp_socket=Path("/q.sock"),
        serial_args=(), **kw))


def test_qemu_starts_under_taskset_with_its_ram_bound_to_the_node() -> None:
    argv = launch(cpus="0,2", memory_node=1)
    assert argv[:4] == ["taskset", "-c", "0,2", "/usr/bin/qemu-system-x86_64"]
    backend = argv[argv.index("-object") + 1]
    assert backend.endswith(",share=on,host-nodes=1,policy=bind")
    hugetlb = launch(backing=Backing.HUGETLB_2M, mem_path=Path("/hp/m"), memory_node=0)
    assert hugetlb[0] == "/usr/bin/qemu-system-x86_64"
    assert hugetlb[hugetlb.index("-object") + 1].endswith(
        "mem-path=/hp/m,share=on,prealloc=off,host-nodes=0,policy=bind")
    anon = launch(backing=Backing.ANON_4K, memory_node=0)
    assert anon[anon.index("-object") + 1] == (
        "memory-backend-ram,id=ram0,size=1024M,host-nodes=0,policy=bind")


def topology_host(online: str = "0-1", nodes: str | None = "0") -> FakeHost:
    host = FakeHost("h1")
    host.set_text("/sys/devices/system/cpu/online", online + "\n")
    if nodes is not None:
        host.set_text("/sys/devices/system/node/has_memory", nodes + "\n")
    return host


async def needs_of(host: FakeHost, sides: dict[str, Any],
                   roles: tuple[str, ...] = ("source", "destination")) -> dict[str, Any]:
    scenario = parse_scenario(placed(**sides))
    needs = await placement_needs(host, list(roles), scenario,  # type: ignore[arg-type]
                                  await read_topology(host))
    return {need.what: need for need in needs}


async def test_placement_needs_against_the_host() -> None:
    host = topology_host()
    needs = await needs_of(host, {"source": {"vcpu_cpus": "1", "migration_cpus": "0"},
                                  "destination": {"vcpu_cpus": [5, 1], "memory_node": 1}})
    assert needs["placement.source: CPUs 0-1 online"].met
    cpus = needs["placement.destination: CPUs 1,5 online"]
    assert not cpus.met
    assert cpus.detail == "CPU 5 not online on h1, which has CPUs 0-1 online"
    assert cpus.fix == "name CPUs among 0-1 in [placement.destination]"
    node = needs["placement.destination.memory_node = 1"]
    assert not node.met
    assert node.detail == "h1 has no NUMA node 1 with memory (it has node 0)"
    assert node.fix == "set memory_node to one of 0"
    # The commands that apply it: python3 always, taskset where QEMU starts under it.
    python = needs["python3 with sched_setaffinity (CPU placement)"]
    taskset = needs["taskset (CPU placement: QEMU starts under it)"]
    assert python.met
    assert taskset.met
    # A host where taskset does not run (status 127, as sh says "not found").
    host.commands["taskset"] = lambda argv: CommandResult(argv, 127, "", "taskset: not found")
    taskset = (await needs_of(host, {"source": {"vcpu_cpus": "1", "migration_cpus": "0"}}))[
        "taskset (CPU placement: QEMU starts under it)"]
    assert not taskset.met
    assert taskset.detail == "not found on h1"
    assert taskset.fix == "install util-linux on h1"


async def test_placement_needs_only_for_the_roles_a_host_plays() -> None:
    host = topology_host(nodes=None)
    needs = await needs_of(host, {"destination": {"memory_node": 0}}, roles=("source",))
    assert needs == {}
    needs = await needs_of(host, {"destination": {"memory_node": 0}}, roles=("destination",))
    assert needs["placement.destination.memory_node = 0"].detail == (
        "h1 has no NUMA node 0 with memory (it has no NUMA nodes)")
    # Nothing to start under: no taskset needed.
    assert not any(what.startswith("taskset") for what in needs)


def test_memory_groups_per_host_and_node() -> None:
    one, two = FakeHost("one"), FakeHost("two")
    same = parse_scenario(placed(source={"memory_node": 0}, destination={"memory_node": 0}))
    assert memory_groups(same, [(one, ["source", "destination"])]) == [(one, 0, 2)]
    split = parse_scenario(placed(source={"memory_node": 0}, destination={"memory_node": 1}))
    assert memory_groups(split, [(one, ["source", "destination"])]) == [(one, 0, 1), (one, 1, 1)]
    loose = parse_scenario(placed(source={"vcpu_cpus": "0"}))
    assert memory_groups(loose, [(one, ["source"]), (two, ["destination"])]) == [
        (one, None, 1), (two, None, 1)]


# A child with an extra thread named as QEMU's migration thread, and a mapping of a size
# nothing else has, touched so its pages are present.
CHILD = """
import ctypes, mmap, sys, threading, time
RAM = 3 * 1024 * 1024 + 8192
ram = mmap.mmap(-1, RAM)
ram.write(b"x" * RAM)
def named():
    with open("/proc/thread-self/comm", "w") as comm:
        comm.write("mig/src/main")
    time.sleep(60)
threading.Thread(target=named, daemon=True).start()
time.sleep(0.2)
print("ready", flush=True)
time.sleep(60)
"""
RAM_BYTES = 3 * 1024 * 1024 + 8192


async def test_the_helper_pins_and_reads_back_a_live_process() -> None:
    child = await asyncio.create_subprocess_exec(sys.executable, "-c", CHILD,
                                                 stdout=asyncio.subprocess.PIPE)
    try:
        assert child.stdout is not None
        assert (await child.stdout.readline()).strip() == b"ready"
        async with affinity_helper(LocalHost(), child.pid) as helper:
            seen = await helper.ask()
            assert seen.default == os.sched_getaffinity(0)
            names = {name: tid for tid, name, _ in seen.threads}
            assert names.keys() >= {"mig/src/main"}
            cpu = min(os.sched_getaffinity(0))
            pinned = await helper.ask({names["mig/src/main"]: frozenset({cpu})},
                                      ram_bytes=RAM_BYTES)
            after = {name: cpus for _, name, cpus in pinned.threads}
            assert after["mig/src/main"] == {cpu}
            assert os.sched_getaffinity(names["mig/src/main"]) == {cpu}
            # Only the thread asked for moved.
            assert os.sched_getaffinity(child.pid) == os.sched_getaffinity(0)
            assert pinned.errors == {}
            [ram] = pinned.ram or []
            assert ram.policy == "default"
            assert sum(ram.pages.values()) == RAM_BYTES // 4096
            refused = await helper.ask({names["mig/src/main"]: frozenset({4096})})
            assert "Invalid argument" in refused.errors[names["mig/src/main"]]
    finally:
        child.kill()
        await child.wait()
    async with affinity_helper(LocalHost(), child.pid) as helper:
        assert (await helper.ask()).threads == []


def meta_with(placement: dict[str, Any]) -> RunMeta:
    return RunMeta.model_validate({"run_id": "r", "scenario": "s", "placement": placement})


def thread(tid: int, name: str, role: str, wanted: str, cpus: str) -> dict[str, Any]:
    return {"tid": tid, "name": name, "role": role, "wanted": wanted, "cpus": cpus,
            "pinned": True}


def test_the_report_warns_of_a_thread_off_its_cpus_and_ram_off_its_node() -> None:
    meta = meta_with({
        "source": {"threads": [thread(1, "CPU 0/KVM", "vcpu", "1", "1"),
                               thread(2, "mig/src/main", "migration", "0", "0-1")],
                   "memory": {"node": 0, "policy": "bind:0", "pages": {"0": 10}}},
        "destination": {"threads": [thread(3, "CPU 0/KVM", "vcpu", "1", "1")],
                        "errors": ["thread 3: OSError: Invalid argument"],
                        "memory": {"node": 1, "policy": "default", "pages": {"0": 4}}}})
    warnings = placement_warnings(meta)
    assert len(warnings) == 3
    assert warnings[0].startswith("placement: src thread 'mig/src/main' (tid 2, migration) "
                                  "had CPUs 0-1, wanted 0")
    assert warnings[1] == "placement: dst: thread 3: OSError: Invalid argument"
    assert warnings[2].startswith("placement: dst guest RAM asked bound to node 1: policy "
                                  "default, pages on node 0")
    section = placement_section(meta)
    assert section is not None
    assert [(t.side, t.name) for t in section.threads] == [
        ("src", "CPU 0/KVM"), ("src", "mig/src/main"), ("dst", "CPU 0/KVM")]
    assert [(m.side, m.policy) for m in section.memory] == [("src", "bind:0"),
                                                            ("dst", "default")]


def test_a_run_without_placement_has_no_section_and_no_warning() -> None:
    meta = RunMeta.model_validate({"run_id": "r", "scenario": "s"})
    assert placement_section(meta) is None
    assert placement_warnings(meta) == []
