"""Fault injection: the ``[[faults]]`` of a scenario, done for real at their phase.

Each timed fault waits for its phase (a MIGRATION status one of the QEMUs
announces), then ``after_ms``, then strikes: a network interface down and up
again, ``migrate-pause``, SIGKILL or SIGSTOP/SIGCONT of a QEMU, or the SSH
connection to a host dropped.  Whatever ends the run, a fault with a duration
is undone (the link brought up, the QEMU continued).  Each strike is marked on
the timeline just before it happens (``fault-injected``) and each undo just
after (``fault-cleared``), so the report can set each fault beside what the
guest saw.

The pool-exhausted fault is not timed: :func:`exhaust_hugepage_pool` fills the
destination's free hugepages with a hugetlbfs file before its QEMU starts.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

from migrator.aio import finish_even_if_cancelled
from migrator.config.models import (
    ConnectionLossFault,
    FaultSpec,
    KillFault,
    LinkDownFault,
    MigratePauseFault,
    PoolExhaustedFault,
    StopFault,
    fault_role,
)
from migrator.errors import HostError, MigrationError
from migrator.guest.console import Side
from migrator.hosts.base import Host
from migrator.hosts.hugepages import read_pool
from migrator.qemu.monitor import status_in
from migrator.qemu.process import QemuProcess
from migrator.rundir import SIDE_OF_ROLE

__all__ = ["FaultTargets", "exhaust_hugepage_pool", "inject_faults"]

log = logging.getLogger(__name__)



@dataclass(frozen=True)
class FaultTargets:
    """What faults act on: each side's host and QEMU, and the run's timeline."""

    hosts: Mapping[Side, Host]
    qemus: Mapping[Side, QemuProcess]
    mark: Callable[..., None]


async def _phase_begins(fault: FaultSpec, targets: FaultTargets) -> None:
    """Return when the fault's phase begins (see :class:`~migrator.config.models._TimedFault`)."""
    assert not isinstance(fault, PoolExhaustedFault)
    source = targets.qemus["src"].monitor
    if fault.at == "precopy":
        await source.wait_for_event("MIGRATION", status_in("active"))
    elif fault.at == "postcopy":
        await targets.qemus["dst"].monitor.wait_for_event("MIGRATION", status_in("postcopy-active"))
    else:
        recovering = await source.wait_for_event("MIGRATION", status_in("postcopy-recover"))
        if fault.at == "recovered":
            since = source.events.index(recovering) + 1
            await source.wait_for_event("MIGRATION", status_in("postcopy-active"), since=since)


async def _run_checked(host: Host, argv: list[str], what: str) -> None:
    result = await host.run(argv, timeout=30)
    result.check(f"{what} on {host.name}")


async def _signal(qemu: QemuProcess, name: str) -> None:
    """Send signal ``name`` (e.g. ``KILL``) to a QEMU by its pid on its host."""
    if qemu.pid is None:
        raise MigrationError(f"faults: {qemu.name} QEMU has no pid to signal")
    await _run_checked(qemu.host, ["kill", "-s", name, str(qemu.pid)],
                       f"sending SIG{name} to {qemu.name} QEMU (pid {qemu.pid})")


async def _for_duration(strike: Awaitable[None], undo: Callable[[], Awaitable[None]],
                        seconds: float, cleared: Callable[[], None]) -> None:
    """``strike``, hold for ``seconds``, then ``undo`` even if cancelled, and mark it cleared."""
    try:
        await strike
        await asyncio.sleep(seconds)
    finally:
        await finish_even_if_cancelled(undo())
        cleared()


async def _strike(index: int, fault: FaultSpec, targets: FaultTargets) -> None:
    """Inject one fault now (marked just before), and undo it after its duration.

    The undo is entered before the strike: a strike cancelled while its command
    is in flight may still have taken effect, and undoing twice is harmless
    (``ip link set up`` on a link that is up, SIGCONT to a running process).
    """
    details = fault.model_dump(mode="json")
    targets.mark("fault-injected", index=index, **details)
    side = SIDE_OF_ROLE[fault_role(fault)]
    host, qemu = targets.hosts[side], targets.qemus[side]

    def cleared() -> None:
        targets.mark("fault-cleared", index=index, kind=fault.kind)

    if isinstance(fault, LinkDownFault):
        link = ["ip", "link", "set", "dev", fault.interface]
        await _for_duration(
            _run_checked(host, [*link, "down"], f"taking {fault.interface} down"),
            lambda: _run_checked(host, [*link, "up"], f"bringing {fault.interface} up"),
            fault.duration_s, cleared)
    elif isinstance(fault, StopFault):
        await _for_duration(_signal(qemu, "STOP"), lambda: _signal(qemu, "CONT"),
                            fault.duration_s, cleared)
    elif isinstance(fault, KillFault):
        await _signal(qemu, "KILL")
    elif isinstance(fault, MigratePauseFault):
        await qemu.monitor.migrate_pause()
    elif isinstance(fault, ConnectionLossFault):
        await host.sever()


async def _one(index: int, fault: FaultSpec, targets: FaultTargets) -> None:
    assert not isinstance(fault, PoolExhaustedFault)
    try:
        await _phase_begins(fault, targets)
        await asyncio.sleep(fault.after_ms / 1000)
    except asyncio.CancelledError:
        targets.mark("fault-not-injected", index=index, kind=fault.kind,
                     reason=f"the run moved on before {fault.at} + {fault.after_ms} ms")
        raise
    await _strike(index, fault, targets)


async def inject_faults(faults: tuple[FaultSpec, ...], targets: FaultTargets) -> None:
    """Inject every timed fault at its phase; returns when all are done (run beside the migration).

    A fault that cannot be injected (a command failing on its host) raises: the
    run would not be the scenario it claims to be.
    """
    async with asyncio.TaskGroup() as group:
        for index, fault in enumerate(faults):
            if not isinstance(fault, PoolExhaustedFault):
                group.create_task(_one(index, fault, targets), name=f"fault-{index}")


async def exhaust_hugepage_pool(host: Host, directory: Path, page_kib: int) -> Path:
    """Take every free ``page_kib`` hugepage on ``host`` with one file in ``directory``.

    The file (returned) holds the pages until it is removed.  :class:`HostError`
    when the pages cannot be taken.
    """
    # Free pages include those reserved by mappings not yet touched (the source QEMU's).
    free = (await read_pool(host, page_kib)).available
    hog = directory / "pool-exhausted"
    if free:
        try:
            await _run_checked(host, ["fallocate", "-l", str(free * page_kib * 1024), str(hog)],
                               f"taking the {free} free {page_kib} kB hugepages")
        except HostError:
            await host.remove_tree(hog)
            raise
    log.info("%s: %d free %d kB hugepages taken by %s", host.name, free, page_kib, hog)
    return hog
