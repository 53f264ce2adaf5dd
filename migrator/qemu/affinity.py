"""CPU affinity of a QEMU's threads on its host: which CPUs each thread should have, set
and read back in one round trip.

The decision (:func:`thread_role`, :func:`wanted_cpus`) is a pure function of a
side's ``[placement.*]`` table, the vCPU thread ids QEMU reports (``query-cpus-fast``:
vCPUs are found by id, never by name, so KVM and TCG alike) and each thread's name.

The doing is :data:`HELPER`, a small python3 program (standard library only, any
python3 >= 3.7, as the other host helpers) run on the QEMU's host through
:meth:`Host.exchange_lines`, so a local and an SSH host work alike.  Each request
line is JSON ``{"pin": [[tid, [cpu, ...]], ...], "ram_bytes": N}``: it sets each
thread's affinity (``sched_setaffinity``), then answers one JSON line with every
thread of the process as it is now, ``[tid, name, Cpus_allowed_list]`` read from
``/proc/PID/task/TID/status``; the CPUs a new process on that host gets
(``default``); the threads it could not pin with why (``errors``; a thread that
exited meanwhile is no error); and, when
``ram_bytes`` is given, the NUMA policy and pages per node of the mapping of that
size (the guest RAM) from ``/proc/PID/numa_maps`` (``ram``).
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass, field
from typing import Any, Literal

from migrator.config.placement import SidePlacement, parse_cpu_list
from migrator.errors import HostError
from migrator.hosts.base import Host, LineExchange
from migrator.qemu.threads import is_migration_thread

__all__ = [
    "HELPER",
    "AffinityHelper",
    "HostThreads",
    "RamPolicy",
    "ThreadRole",
    "affinity_helper",
    "thread_role",
    "wanted_cpus",
]

ThreadRole = Literal["vcpu", "migration", "main loop", "other"]

HELPER = r"""
import json, os, sys
pid = sys.argv[1]
tasks = "/proc/%s/task" % pid

def allowed(tid):
    with open("%s/%s/status" % (tasks, tid)) as status:
        for line in status:
            if line.startswith("Cpus_allowed_list:"):
                return line.split(":", 1)[1].strip()
    return ""

def ram(size):
    starts = set()
    with open("/proc/%s/maps" % pid) as maps:
        for line in maps:
            low, high = (int(part, 16) for part in line.split()[0].split("-"))
            if high - low == size:
                starts.add(low)
    found = []
    with open("/proc/%s/numa_maps" % pid) as numa:
        for line in numa:
            words = line.split()
            if int(words[0], 16) in starts:
                nodes = dict((w[1:].split("=")[0], int(w.split("=")[1])) for w in words[2:]
                             if w[0] == "N" and "=" in w and w[1:].split("=")[0].isdigit())
                found.append({"policy": words[1], "pages": nodes,
                              "page_kib": int(dict(w.split("=", 1) for w in words[2:]
                                                   if "=" in w).get("kernelpagesize_kB", 0))})
    return found

for line in sys.stdin:
    request = json.loads(line)
    errors = []
    for tid, cpus in request.get("pin", []):
        if not os.path.exists("%s/%d" % (tasks, tid)):
            continue
        try:
            os.sched_setaffinity(tid, cpus)
        except ProcessLookupError:
            pass
        except OSError as error:
            errors.append([tid, "%s: %s" % (error.__class__.__name__, error.strerror)])
    threads = []
    try:
        tids = os.listdir(tasks)
    except OSError:
        tids = []
    for tid in tids:
        try:
            with open("%s/%s/comm" % (tasks, tid)) as comm:
                threads.append([int(tid), comm.read().rstrip("\n"), allowed(tid)])
        except OSError:
            pass
    answer = {"threads": threads, "errors": errors,
              "default": ",".join(str(cpu) for cpu in sorted(os.sched_getaffinity(0)))}
    if request.get("ram_bytes") and threads:
        try:
            answer["ram"] = ram(request["ram_bytes"])
        except OSError as error:
            answer["ram_error"] = str(error)
    sys.stdout.write(json.dumps(answer) + "\n")
    sys.stdout.flush()
"""


def thread_role(tid: int, name: str, pid: int,
                vcpu_tids: Mapping[int, Sequence[int]]) -> ThreadRole:
    """What a thread is for placement: a vCPU (by id), a migration thread (by name), the
    main loop (the thread whose id is the process id), or another."""
    if tid in vcpu_tids:
        return "vcpu"
    if is_migration_thread(name):
        return "migration"
    return "main loop" if tid == pid else "other"


def wanted_cpus(spec: SidePlacement, role: ThreadRole,
                vcpu_indexes: Sequence[int] = ()) -> frozenset[int] | None:
    """The CPUs a thread of ``role`` should have; None: the host's default for a process.

    vCPUs get ``vcpu_cpus`` (a vCPU thread that serves several vCPUs, as
    single-threaded TCG's, the union of theirs), or the host's default when it
    is unset: never the CPUs QEMU was started under, which were not asked for
    them.  Migration threads get ``migration_cpus``; they and every other
    thread otherwise get the CPUs QEMU was started under
    (:attr:`SidePlacement.launch_cpus`), if any.
    """
    if role == "vcpu":
        if spec.vcpu_cpus is None:
            return None
        cpus: frozenset[int] = frozenset()
        for index in vcpu_indexes:
            cpus |= spec.vcpu_set(index) or frozenset()
        return cpus
    if role == "migration" and spec.migration_cpus is not None:
        return parse_cpu_list(spec.migration_cpus)
    launch = spec.launch_cpus
    return parse_cpu_list(launch) if launch is not None else None


@dataclass(frozen=True)
class RamPolicy:
    """The guest RAM mapping's NUMA policy (``bind:0``, ``default``) and pages per node."""

    policy: str
    pages: dict[str, int]
    page_kib: int


@dataclass(frozen=True)
class HostThreads:
    """One answer of :data:`HELPER`: every thread as it is now, and what failed."""

    threads: list[tuple[int, str, frozenset[int]]]
    default: frozenset[int]
    errors: dict[int, str] = field(default_factory=dict)
    ram: list[RamPolicy] | None = None
    ram_error: str | None = None


class AffinityHelper:
    """A running :data:`HELPER` for one QEMU process (see :func:`affinity_helper`)."""

    def __init__(self, exchange: LineExchange) -> None:
        self._exchange = exchange

    async def ask(self, pins: Mapping[int, frozenset[int]] | None = None,
                  ram_bytes: int | None = None) -> HostThreads:
        """Pin ``pins`` (tid to CPUs), then every thread's affinity as read back.

        No threads when the process is gone.
        """
        request: dict[str, Any] = {"pin": [[tid, sorted(cpus)] for tid, cpus in
                                           (pins or {}).items()]}
        if ram_bytes:
            request["ram_bytes"] = ram_bytes
        answer = json.loads(await self._exchange.ask(json.dumps(request), timeout=10.0))
        return HostThreads(
            threads=[(int(tid), str(name), parse_cpu_list(cpus) if cpus else frozenset())
                     for tid, name, cpus in answer["threads"]],
            default=parse_cpu_list(answer["default"]),
            errors={int(tid): str(why) for tid, why in answer["errors"]},
            ram=None if "ram" not in answer else [
                RamPolicy(str(one["policy"]), {str(k): int(v) for k, v in one["pages"].items()},
                          int(one["page_kib"])) for one in answer["ram"]],
            ram_error=answer.get("ram_error"))


@asynccontextmanager
async def affinity_helper(host: Host, pid: int) -> AsyncIterator[AffinityHelper]:
    """:data:`HELPER` running on ``host`` for process ``pid``, for the block.

    :class:`HostError` when the host has no python3 to run it.
    """
    async with AsyncExitStack() as stack:
        try:
            exchange = await stack.enter_async_context(
                host.exchange_lines(["python3", "-I", "-c", HELPER, str(pid)]))
        except HostError as error:
            raise HostError(f"{error}; CPU placement needs python3 on {host.name}") from None
        yield AffinityHelper(exchange)
