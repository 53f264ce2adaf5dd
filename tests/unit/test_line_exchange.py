"""Line dialogues with a command (Host.exchange_lines) and the clock offset built on them."""

from __future__ import annotations

import time

import pytest

from migrator.config import Scenario, parse_scenario
from migrator.errors import HostError
from migrator.hosts.fake import FakeHost
from migrator.hosts.local import LocalHost
from migrator.preflight import (
    CLOCK_ROUNDS,
    Need,
    PreflightReport,
    check_hosts,
    measure_clock_offset,
)
from tests.ssh_cases import alive
from tests.unit.fake_kernel import FakeKernel

ECHO = ["sh", "-c", 'while IFS= read -r q; do echo "re: $q"; done']


async def test_local_dialogue_answers_each_line() -> None:
    async with LocalHost().exchange_lines(ECHO) as dialogue:
        assert await dialogue.ask("one") == "re: one"
        assert await dialogue.ask("two words") == "re: two words"
        with pytest.raises(ValueError, match="one line at a time"):
            await dialogue.ask("a\nb")


async def test_local_command_that_stops_answering_says_why() -> None:
    script = 'read q; echo "re: $q"; echo gone >&2; exit 3'
    async with LocalHost().exchange_lines(["sh", "-c", script]) as dialogue:
        assert await dialogue.ask("x") == "re: x"
        with pytest.raises(HostError, match=r"sh on local stopped answering \(exit 3\): gone"):
            await dialogue.ask("y")


async def test_local_silent_command_times_out_and_is_ended_with_its_children() -> None:
    started = time.monotonic()
    # Prints its child's pid, then never answers again and ignores SIGTERM (so does the child).
    script = "trap '' TERM; sleep 1000.125 & echo $!; wait"
    async with LocalHost().exchange_lines(["sh", "-c", script]) as dialogue:
        child = int(await dialogue.ask("pid?"))
        with pytest.raises(HostError, match=r"did not answer within 0\.2 s"):
            await dialogue.ask("anyone?", timeout=0.2)
        assert alive(child)
    # stdin closed, 2 s to end by itself, then SIGKILL to the whole group.
    assert time.monotonic() - started < 5
    assert not alive(child)


async def test_local_missing_command_is_a_host_error() -> None:
    with pytest.raises(HostError, match="no-such-command-xyz: command not found on local"):
        async with LocalHost().exchange_lines(["no-such-command-xyz"]):
            pytest.fail("must not get here")


async def test_clock_offset_of_this_machine_is_zero_without_a_clock_server() -> None:
    # The same kernel's clock: nothing is started (a fake "controller machine" with no
    # python3 dialogue would otherwise answer (None, None)).
    host = FakeHost("here")
    host.is_controller_machine = True
    assert await measure_clock_offset(host) == (0.0, 0.0)
    assert await measure_clock_offset(LocalHost()) == (0.0, 0.0)


async def test_clock_offset_takes_the_fastest_round_trip() -> None:
    host = FakeHost("ahead")
    asked: list[str] = []

    def clock(argv: tuple[str, ...], line: str) -> str:
        assert argv[:3] == ("python3", "-I", "-c")
        asked.append(line)
        return str(time.time_ns() + 5_000_000_000)  # 5 s ahead

    host.dialogues["python3"] = clock
    offset, rtt = await measure_clock_offset(host)
    assert len(asked) == CLOCK_ROUNDS
    assert offset is not None
    assert rtt is not None
    assert abs(offset - 5000) <= rtt / 2 + 1


async def test_clock_offset_unknown_without_python_or_with_garbage() -> None:
    assert await measure_clock_offset(FakeHost()) == (None, None)
    host = FakeHost()
    host.dialogues["python3"] = lambda argv, line: "Traceback"
    assert await measure_clock_offset(host) == (None, None)


def hugetlb_scenario() -> Scenario:
    """Two 2 GiB guests on 1 GiB pages: two pages per host."""
    return parse_scenario({"name": "t", "vm": {"memory_mib": 2048, "backing": "hugetlb-1g"},
                           "workload": {"working_set_mib": 256}})


def hugepage_needs(report: PreflightReport) -> list[Need]:
    """The one hugepage need of each host the preflight checked, in its order."""
    needs = []
    for host in report.hosts:
        [need] = [n for n in host.needs if "free hugepages of" in n.what]
        needs.append(need)
    return needs


async def test_hugepage_needs_of_two_hosts_on_one_kernel_add_up() -> None:
    scenario = hugetlb_scenario()
    kernel = FakeKernel(total=0, free=0, limit=3, boot_id="one-machine")
    a, b = kernel.host("a"), kernel.host("b")
    need_a, need_b = hugepage_needs(await check_hosts(scenario, a, b))
    assert need_a.what == need_b.what == "2 free hugepages of 1048576 kB"
    assert need_a.met
    assert need_a.detail == "could be reserved (pool grown by 2 and given back)"
    assert not need_b.met
    assert need_b.detail == ("only 1 could be had alongside 2 claimed for other VMs on the "
                             "same kernel (pool grown and given back)")
    assert "hugepagesz=1G hugepages=4" in need_b.fix
    assert kernel.total == 0


async def test_hugepage_needs_of_two_kernels_are_separate() -> None:
    scenario = hugetlb_scenario()
    first = FakeKernel(total=0, free=0, limit=3, boot_id="one")
    second = FakeKernel(total=0, free=0, limit=3, boot_id="two")
    needs = hugepage_needs(await check_hosts(scenario, first.host("a"), second.host("b")))
    assert [n.met for n in needs] == [True, True]
    assert first.total == second.total == 0
