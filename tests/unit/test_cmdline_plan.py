"""QEMU argv and migration plans are pure functions of the scenario."""

from __future__ import annotations

from pathlib import Path

import pytest

from migrator.config import Backing, parse_scenario
from migrator.errors import MissingCapability
from migrator.guest.build import GuestArtifacts
from migrator.hosts.local import LocalHost
from migrator.migration.plan import UNLIMITED_BANDWIDTH, check_capabilities, plan_migration
from migrator.qemu.accel import AccelDecision
from migrator.qemu.cmdline import LaunchSpec, qemu_argv, shell_line
from migrator.qemu.launcher import QemuLauncher
from migrator.qemu.probe import QemuFacts
from migrator.runner.placement import QEMU_OUTPUT_FILES, TRACE_LOG, Place, launch_spec


def spec(backing: Backing, **kw: object) -> LaunchSpec:
    base: dict[str, object] = dict(
        launcher=QemuLauncher("/usr/bin/qemu-system-x86_64"), name="dst", memory_mib=1024, vcpus=2,
        backing=backing, accel="tcg", machine="pc", kernel=Path("/k"), initrd=Path("/i"),
        append="console=ttyS0 a=b", qmp_socket=Path("/run/x/dst-qmp.sock"),
        serial_args=("-serial", "null"),
    )
    base.update(kw)
    return LaunchSpec(**base)  # type: ignore[arg-type]


def value_after(argv: list[str], flag: str) -> list[str]:
    return [argv[i + 1] for i, a in enumerate(argv) if a == flag]


def test_hugetlb_backend_is_shared_file_on_hugetlbfs() -> None:
    argv = qemu_argv(spec(Backing.HUGETLB_1G, mem_path=Path("/hp/migrator-r")))
    assert value_after(argv, "-object") == [
        "memory-backend-file,id=ram0,size=1024M,mem-path=/hp/migrator-r,share=on,prealloc=off"
    ]
    assert value_after(argv, "-machine") == ["pc,memory-backend=ram0"]


def test_hugetlb_without_mem_path_is_refused() -> None:
    with pytest.raises(ValueError, match="needs a hugetlbfs mem_path"):
        qemu_argv(spec(Backing.HUGETLB_2M))


@pytest.mark.parametrize(
    ("backing", "backend"),
    [(Backing.MEMFD_4K, "memory-backend-memfd,id=ram0,size=1024M,share=on"),
     (Backing.ANON_4K, "memory-backend-ram,id=ram0,size=1024M")],
)
def test_small_page_backends(backing: Backing, backend: str) -> None:
    assert value_after(qemu_argv(spec(backing)), "-object") == [backend]


def test_destination_is_incoming_defer_and_traced() -> None:
    argv = qemu_argv(spec(Backing.MEMFD_4K, incoming=True, trace_file=Path("/r/dst/trace.log")))
    assert value_after(argv, "-incoming") == ["defer"]
    assert value_after(argv, "-D") == ["/r/dst/trace.log"]
    assert "enable=postcopy_place_page" in value_after(argv, "-trace")
    assert value_after(argv, "-qmp") == ["unix:/run/x/dst-qmp.sock,server=on,wait=off"]


def test_source_is_neither_incoming_nor_traced() -> None:
    argv = qemu_argv(spec(Backing.MEMFD_4K))
    assert "-incoming" not in argv
    assert "-D" not in argv


def test_shell_line_quotes_the_kernel_command_line() -> None:
    line = shell_line(qemu_argv(spec(Backing.MEMFD_4K)))
    assert "-append 'console=ttyS0 a=b'" in line


def facts(*caps: str) -> QemuFacts:
    return QemuFacts("/usr/bin/qemu", "7.2.0", "", tuple(caps))


def test_plan_postcopy_preempt_blocktime() -> None:
    scenario = parse_scenario({"name": "x", "migration": {"preempt": True}})
    plan = plan_migration(scenario)
    assert plan.source_capabilities == {"events": True, "postcopy-ram": True,
                                        "postcopy-preempt": True}
    assert plan.destination_capabilities["postcopy-blocktime"] is True
    assert plan.source_parameters["max-bandwidth"] == UNLIMITED_BANDWIDTH


def test_plan_precopy_only_and_limits() -> None:
    scenario = parse_scenario({"name": "x", "migration": {
        "postcopy": False, "max_bandwidth_mib_s": 100, "downtime_limit_ms": 50}})
    plan = plan_migration(scenario)
    assert plan.needed == {"events"}
    assert plan.source_parameters == {"max-bandwidth": 100 << 20, "downtime-limit": 50}


def test_postcopy_holds_the_downtime_limit_at_1_ms_unless_the_scenario_sets_one() -> None:
    # 1 ms, not 0: QEMU 7.2-10.0 would then complete pre-copy at the end of its first
    # round, whatever the switchover policy (migration/plan.py).
    held = plan_migration(parse_scenario({"name": "x"}))
    assert held.source_parameters["downtime-limit"] == 1
    assert "downtime-limit" not in held.destination_parameters
    chosen = plan_migration(parse_scenario({"name": "x",
                                            "migration": {"downtime_limit_ms": 300}}))
    assert chosen.source_parameters["downtime-limit"] == 300
    precopy = plan_migration(parse_scenario({"name": "x", "migration": {"postcopy": False}}))
    assert "downtime-limit" not in precopy.source_parameters  # QEMU's own default


def test_missing_capabilities_are_named() -> None:
    plan = plan_migration(parse_scenario({"name": "x", "migration": {"preempt": True}}))
    with pytest.raises(MissingCapability) as caught:
        check_capabilities(plan, facts("events", "postcopy-ram"))
    assert caught.value.missing == ["postcopy-blocktime", "postcopy-preempt"]
    assert "lacks migration capabilities: postcopy-blocktime, postcopy-preempt" in str(
        caught.value)
    check_capabilities(plan, facts("events", "postcopy-ram", "postcopy-preempt",
                                   "postcopy-blocktime"))


@pytest.mark.parametrize("compress", ["zstd", "none"])
def test_the_destination_writes_its_trace_plain_either_way(compress: str) -> None:
    scenario = parse_scenario({"name": "x", "vm": {"backing": "memfd-4k"},
                               "collect": {"compress": compress}})
    place = Place(LocalHost(), Path("/r/dst"), Path("/r/dst"),
                  GuestArtifacts(Path("/k"), Path("/i"), "0" * 64, "6.1.0"))
    facts = QemuFacts("/usr/bin/qemu-system-x86_64", "10.0.2", "", ())
    accel = AccelDecision("tcg", "tcg", "explicit", "asked for")
    dst = qemu_argv(launch_spec(scenario, "dst", place, facts, accel, None))
    # Compressed after QEMU has stopped, never while it writes (migrator/hosts/compress.py).
    assert value_after(dst, "-D") == ["/r/dst/trace.log"]
    # Either form is fetched back from a remote host with QEMU's own files.
    assert {TRACE_LOG, TRACE_LOG + ".zst"} <= set(QEMU_OUTPUT_FILES)
    # Only the destination is traced.
    assert "-D" not in qemu_argv(launch_spec(scenario, "src", place, facts, accel, None))
