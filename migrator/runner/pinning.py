"""``[placement.*]`` applied to a running QEMU: its threads pinned, and what was seen recorded.

How each thread gets its CPUs, earliest first:

1. QEMU starts under ``taskset -c`` with :attr:`SidePlacement.launch_cpus`
   (``io_cpus``, else ``migration_cpus``): every thread it ever creates starts
   there, the migration threads that ``migrate`` brings included.
2. Once QMP is up, the vCPU threads (by the ids ``query-cpus-fast`` gives) get
   ``vcpu_cpus``, and every thread already there what
   :func:`~migrator.qemu.affinity.wanted_cpus` says.
3. While the migration runs, every thread is looked at :data:`WATCH_HZ` times a
   second: a new one (a migration thread when ``io_cpus`` is set too, so that it
   did not inherit its CPUs) is moved within one period, and each thread's CPUs
   are read back from ``/proc/TID/status``.

The guest RAM's NUMA binding is QEMU's (``host-nodes``, ``policy=bind`` on the
memory backend); its policy and pages per node are read back from
``/proc/PID/numa_maps`` after start and again after the migration.

run.json's ``placement`` holds, per side, what was asked and what was seen:
every thread's tid, name, role, the CPUs wanted and the CPUs read back (the
last reading; a thread that has exited keeps its last), and the RAM's policy.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Collection
from contextlib import AsyncExitStack
from typing import Any

from migrator.aio import paced
from migrator.config.placement import SidePlacement, format_cpu_list
from migrator.errors import HostError, PreflightError
from migrator.guest.console import Side
from migrator.qemu.affinity import (
    AffinityHelper,
    HostThreads,
    ThreadRole,
    affinity_helper,
    thread_role,
    wanted_cpus,
)
from migrator.qemu.process import QemuProcess
from migrator.rundir import ROLE_OF_SIDE

__all__ = ["WATCH_HZ", "SidePinner", "start_pinning"]

log = logging.getLogger(__name__)

WATCH_HZ = 20.0
"""Looks per second at a QEMU's threads while it migrates (a new one is moved within 50 ms)."""

class SidePinner:
    """One side's placement, applied to its QEMU through :class:`AffinityHelper`."""

    def __init__(self, side: Side, spec: SidePlacement, qemu: QemuProcess,
                 helper: AffinityHelper, vcpus: dict[int, int], ram_bytes: int) -> None:
        self.side = side
        self.spec = spec
        self.qemu = qemu
        self.helper = helper
        self.ram_bytes = ram_bytes
        # vCPU thread id -> the vCPU indexes it runs (one each, except under
        # single-threaded TCG).
        self.vcpu_tids: dict[int, list[int]] = {}
        for index, tid in sorted(vcpus.items()):
            self.vcpu_tids.setdefault(tid, []).append(index)
        self.threads: dict[int, dict[str, Any]] = {}
        # Each refusal once, however many looks met it.
        self.errors: dict[str, None] = {}
        self.memory: dict[str, Any] | None = None
        self.default: frozenset[int] = frozenset()

    @property
    def field(self) -> str:
        """The scenario table this side's placement comes from."""
        return f"placement.{ROLE_OF_SIDE[self.side]}"

    def _wanted(self, tid: int, name: str) -> tuple[ThreadRole, frozenset[int]]:
        pid = self.qemu.pid or 0
        role = thread_role(tid, name, pid, self.vcpu_tids)
        cpus = wanted_cpus(self.spec, role, self.vcpu_tids.get(tid, ()))
        return role, self.default if cpus is None else cpus

    async def apply(self) -> HostThreads:
        """Pin every thread not on its CPUs, then record each thread as read back."""
        seen = await self.helper.ask()
        self.default = seen.default
        pins = {tid: cpus for tid, name, now in seen.threads
                if (cpus := self._wanted(tid, name)[1]) != now}
        if pins:
            seen = await self.helper.ask(pins)
        for tid, why in seen.errors.items():
            self.errors[f"thread {tid}: {why}"] = None
        self._record(seen, pins.keys())
        return seen

    def _record(self, seen: HostThreads, pinned: Collection[int]) -> None:
        now_ns = time.time_ns()
        for tid, name, cpus in seen.threads:
            role, wanted = self._wanted(tid, name)
            entry = self.threads.setdefault(tid, {"tid": tid, "first_seen_ns": now_ns,
                                                  "pinned": False})
            entry.update(name=name, role=role, wanted=format_cpu_list(wanted),
                         cpus=format_cpu_list(cpus))
            entry["pinned"] = entry["pinned"] or tid in pinned

    async def pin_at_start(self) -> None:
        """The first pinning, right after QMP is up; :class:`PreflightError` if refused."""
        await self.apply()
        if self.errors:
            raise PreflightError(f"{self.field}: {self.qemu.host.name} refused the CPUs: "
                                 f"{'; '.join(self.errors)} (are they in the cpuset migrator "
                                 "runs in?)")
        await self.read_memory()

    async def watch(self, hz: float = WATCH_HZ) -> None:
        """:meth:`apply` ``hz`` times a second until cancelled or the process is gone."""
        async for _ in paced(hz):
            try:
                seen = await self.apply()
            except HostError as error:
                log.warning("%s: placement watch stops: %s", self.side, error)
                return
            if not seen.threads:
                return

    async def read_memory(self) -> None:
        """The guest RAM's NUMA policy and pages per node, read back (with ``memory_node``).

        A helper that no longer answers leaves the last reading (a warning is logged).
        """
        if self.spec.memory_node is None:
            return
        try:
            seen = await self.helper.ask(ram_bytes=self.ram_bytes)
        except HostError as error:
            log.warning("%s: guest RAM policy not read: %s", self.side, error)
            return
        record: dict[str, Any] = {"node": self.spec.memory_node, "policy": None}
        if seen.ram:
            ram = seen.ram[0]
            record.update(policy=ram.policy, pages=ram.pages, page_kib=ram.page_kib)
        elif seen.threads:
            record["error"] = seen.ram_error or (
                f"no mapping of {self.ram_bytes} bytes in /proc/PID/numa_maps")
        else:
            return  # gone: keep what was read before
        self.memory = record

    def record(self) -> dict[str, Any]:
        """This side's part of run.json's ``placement``."""
        asked = self.spec.model_dump(mode="json", exclude_none=True)
        return {
            "host": self.qemu.host.name, "asked": asked,
            "launched_under": self.spec.launch_cpus,
            "default_cpus": format_cpu_list(self.default),
            "threads": sorted(self.threads.values(), key=lambda entry: entry["tid"]),
            "errors": list(self.errors), "memory": self.memory,
        }


async def start_pinning(stack: AsyncExitStack, side: Side, spec: SidePlacement | None,
                        qemu: QemuProcess, ram_bytes: int) -> SidePinner | None:
    """Pin a just-started QEMU's threads (None without a placement); the helper lives on
    ``stack``."""
    if spec is None or qemu.pid is None:
        return None
    helper = await stack.enter_async_context(affinity_helper(qemu.host, qemu.pid))
    pinner = SidePinner(side, spec, qemu, helper, await qemu.monitor.vcpu_threads(), ram_bytes)
    await pinner.pin_at_start()
    return pinner
