"""Host preflight: what each host offers, and whether it meets a scenario's needs.

``migrator hosts check`` prints this; ``migrator run`` runs the same checks
before anything boots.  Every fact is read from the host through the
:class:`Host` interface (so the same code serves remote hosts), and every unmet
need carries the fix an operator can apply.
"""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import Sequence
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any, Final, Literal

from pydantic import BaseModel, ConfigDict, PrivateAttr

from migrator.config.models import (
    Accel,
    LinkDownFault,
    Scenario,
    fault_role,
)
from migrator.config.placement import format_cpu_list
from migrator.errors import (
    HostError,
    HugepageShortfall,
    MigratorError,
    MissingResource,
    PreflightError,
)
from migrator.hgm import HgmSupport, detect_hgm
from migrator.hosts.base import CommandResult, Host
from migrator.hosts.hugepages import claimed_hugepages, read_pool, reserve_hugepages
from migrator.hosts.topology import CPUS_ONLINE, Topology, read_topology
from migrator.migration.plan import MigrationPlan, plan_migration
from migrator.migration.tls import CA_CERT, ENDPOINT_FILES, Endpoint
from migrator.qemu.known_issues import postcopy_multifd_refusal
from migrator.qemu.probe import QemuFacts, SettingsTrial, probe_qemu_cached, probe_qemu_trying

__all__ = [
    "HostReport",
    "Need",
    "PreflightReport",
    "check_hosts",
    "measure_clock_offset",
    "mem_available_mib",
    "memory_groups",
    "placement_needs",
    "raise_unmet",
]

HUGEPAGE_SIZES_KIB = (2048, 1048576)
Role = Literal["source", "destination"]

CLOCK_ROUNDS: Final = 8
"""Round trips per clock-offset measurement; the fastest one is kept."""

# The host's side of the clock measurement (``python3 -I -c CLOCK_SERVER``): answers
# each line with its wall clock in ns, flushed at once.  The clock is read the
# moment the question arrives and the answer goes straight back, so the time the
# host spends is tiny and nearly symmetric around the reading.  Written for any
# python3 >= 3.7 (time.time_ns), standard library only: a remote host's python,
# which the HGM probe and the free-port finder need too.
CLOCK_SERVER: Final = (
    "import sys, time\n"
    "for _ in iter(sys.stdin.readline, ''):\n"
    "    sys.stdout.write('%d\\n' % time.time_ns())\n"
    "    sys.stdout.flush()\n"
)


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Need(_Model):
    """One thing the scenario needs from a host, and whether the host has it."""

    what: str
    met: bool
    detail: str
    fix: str = ""


class Pool(_Model):
    """A hugepage pool as the kernel reported it."""

    page_size_kib: int
    total: int
    free: int
    reserved: int


class Mount(_Model):
    """A hugetlbfs mount."""

    path: str
    options: str


class HostReport(_Model):
    """Facts about one host and the scenario's needs on it."""

    # What was probed, kept for the run that follows (not part of the JSON report).
    _qemu: QemuFacts | None = PrivateAttr(None)
    _hgm: HgmSupport | None = PrivateAttr(None)

    roles: list[Role]
    host: str
    kernel: str
    kvm_device: bool
    kvm_usable: bool | None
    kvm_detail: str
    qemu_binary: str | None
    qemu_version: str | None
    qemu_capabilities: list[str]
    hugepage_pools: list[Pool]
    hugetlbfs_mounts: list[Mount]
    userfaultfd: bool
    mem_available_mib: int | None
    cpus_online: str = "unknown"
    numa_nodes: str = "none"
    """NUMA nodes with memory, as a list (``none``: a kernel without NUMA)."""
    clock_offset_ms: float | None
    clock_rtt_ms: float | None
    hgm: dict[str, Any]
    needs: list[Need]

    @property
    def qemu_facts(self) -> QemuFacts | None:
        """The QEMU probed on this host (None when it could not be)."""
        return self._qemu

    @property
    def hgm_support(self) -> HgmSupport | None:
        """HGM support as detected on this host."""
        return self._hgm

    def for_role(self, role: Role) -> bool:
        """Whether this host plays ``role``."""
        return role in self.roles

    @property
    def unmet(self) -> list[Need]:
        """Needs the host does not meet."""
        return [need for need in self.needs if not need.met]


class PreflightReport(_Model):
    """Both hosts of a scenario."""

    scenario: str
    hosts: list[HostReport]

    @property
    def ok(self) -> bool:
        """True when every need on every host is met."""
        return not any(host.unmet for host in self.hosts)


async def _text(host: Host, path: str) -> str | None:
    try:
        return await host.read_text(Path(path))
    except (FileNotFoundError, PermissionError):
        return None


async def measure_clock_offset(host: Host) -> tuple[float | None, float | None]:
    """Host wall clock minus ours, in ms, with the round trip it was measured over.

    All round trips go over one running :data:`CLOCK_SERVER` (one SSH channel
    on a remote host): a command per reading would put the session set-up,
    which happens before the host reads its clock, into the round trip and
    skew the estimate by up to half of it.  The host's reading is compared to
    the midpoint of ours, so the error is at most half the round trip; the
    fastest of :data:`CLOCK_ROUNDS` (the first also waits for python to start)
    bounds it best.  ``(None, None)`` when the host cannot run the server; ``(0, 0)``
    for the controller's own machine.
    """
    if host.is_controller_machine:
        # The same kernel's clock: the offset is 0 by definition, and measuring it would
        # cost a python start-up on every run.
        return 0.0, 0.0
    best: tuple[float, float] | None = None
    try:
        async with host.exchange_lines(["python3", "-I", "-c", CLOCK_SERVER]) as clock:
            for _ in range(CLOCK_ROUNDS):
                # The round trip by a monotonic clock; the wall clock only for the reading.
                sent_wall, sent = time.time_ns(), time.perf_counter_ns()
                answer = await clock.ask("t", timeout=10)
                rtt_ns = time.perf_counter_ns() - sent
                if not answer.isdigit():
                    return None, None
                offset = (int(answer) - (sent_wall + rtt_ns / 2)) / 1e6
                if best is None or rtt_ns / 1e6 < best[1]:
                    best = (offset, rtt_ns / 1e6)
    except HostError:
        return None, None
    assert best is not None
    return round(best[0], 3), round(best[1], 3)


def _mounts(proc_mounts: str) -> list[Mount]:
    mounts = []
    for line in proc_mounts.splitlines():
        fields = line.split()
        if len(fields) >= 4 and fields[2] == "hugetlbfs":
            mounts.append(Mount(path=fields[1].replace("\\040", " "), options=fields[3]))
    return mounts


def mem_available_mib(meminfo: str | None) -> int | None:
    """``MemAvailable`` of a /proc/meminfo text, in MiB (None when it has none)."""
    for line in (meminfo or "").splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) // 1024
    return None


MemoryGroup = tuple[Host, int | None, int]
"""A host, the NUMA node its VMs' RAM is bound to (None: any), and how many VMs that is."""


def memory_groups(scenario: Scenario,
                  hosts: Sequence[tuple[Host, Sequence[Role]]]) -> list[MemoryGroup]:
    """The VMs of each host grouped by the NUMA node their RAM is bound to, in host order.

    A run reserves hugepages per group (a bound VM's pages must come from its node),
    and so does the preflight: both call this.
    """
    groups: dict[tuple[Host, int | None], int] = {}
    for host, roles in hosts:
        for role in roles:
            side = scenario.placement.of(role)
            key = (host, side.memory_node if side is not None else None)
            groups[key] = groups.get(key, 0) + 1
    return [(host, node, vms) for (host, node), vms in groups.items()]


async def _hugepage_needs(scenario: Scenario, groups: Sequence[MemoryGroup]) -> list[Need]:
    """Really reserve every group's pages at once (then give them back): free counts are not
    enough, and hosts that share one kernel must find room for all their VMs together.

    ``groups``: :func:`memory_groups`; one Need per group.
    """
    size_kib, per_vm = scenario.vm.hugepages
    size = "1G" if size_kib == 1048576 else f"{size_kib // 1024}M"
    needs = []
    async with AsyncExitStack() as held:
        for host, node, vms in groups:
            needed = vms * per_vm
            on_node = "" if node is None else f" on NUMA node {node}"
            what = f"{needed} free hugepages of {size_kib} kB{on_node}"
            others = await claimed_hugepages(host, size_kib)
            alongside = (f" alongside {others} claimed for other VMs on the same kernel"
                         if others else "")
            try:
                added = await held.enter_async_context(
                    reserve_hugepages(host, size_kib, needed, node))
            except HugepageShortfall as error:
                boot = ("" if node is None else
                        f", or set /sys/devices/system/node/node{node}/hugepages/"
                        f"hugepages-{size_kib}kB/nr_hugepages")
                needs.append(Need(
                    what=what, met=False,
                    detail=f"only {error.free} could be had{alongside} (pool grown and given "
                           "back)",
                    fix=f"free memory on {host.name}{on_node}, or reserve them at boot with "
                        f"hugepagesz={size} hugepages={needed + others} on its kernel command "
                        f"line{boot}"))
                continue
            except MissingResource as error:
                needs.append(Need(what=what, met=False, detail=str(error),
                                  fix="choose a memory_node the host has" if node is not None
                                  else f"a kernel with {size_kib} kB hugepages"))
                continue
            except MigratorError as error:
                needs.append(Need(what=what, met=False, detail=str(error), fix="run as root"))
                continue
            grown = f" (pool grown by {added} and given back)" if added else ""
            needs.append(Need(what=what, met=True, detail=f"could be reserved{alongside}{grown}"))
    return needs


async def _tls_needs(host: Host, roles: list[Role], scenario: Scenario) -> list[Need]:
    """Provided TLS credentials: each role's files exist in its directory on this host.

    Generated credentials need nothing here; what QEMU thinks of the files
    (validity, chain, gnutls) it says when the run adds them.
    """
    tls = scenario.migration.tls
    if tls is None or tls.source_dir is None or tls.destination_dir is None:
        return []
    needs = []
    sides: tuple[tuple[Role, Path, Endpoint], ...] = (
        ("source", tls.source_dir, "client"), ("destination", tls.destination_dir, "server"))
    for role, directory, endpoint in sides:
        if role not in roles:
            continue
        names = (CA_CERT, *ENDPOINT_FILES[endpoint])
        missing = [name for name in names if not await host.exists(directory / name)]
        needs.append(Need(
            what=f"TLS credentials in migration.tls.{role}_dir {directory}",
            met=not missing,
            detail=f"missing {', '.join(missing)}" if missing else ", ".join(names) + " present",
            fix=f"put {', '.join(names)} there on {host.name} (docs/hosts.md, Migration over "
                "TLS), or unset both directories to use throwaway certificates" if missing
            else "",
        ))
    return needs


# What each fault kind runs on its host (migrator/faults.py), and a harmless call proving
# the command is there.
_FAULT_COMMANDS: dict[str, tuple[str, ...]] = {
    "link-down": ("ip", "-V"),
    "kill": ("kill", "-l"),
    "stop": ("kill", "-l"),
    "pool-exhausted": ("fallocate", "--version"),
}


async def _command_found(host: Host, argv: Sequence[str]) -> CommandResult | None:
    """What ``argv`` (a harmless call of a command) printed on ``host``; None unless it ran
    with status 0."""
    try:
        result = await host.run(list(argv), timeout=30)
    except HostError:
        return None
    return result if result.status == 0 else None


async def _fault_needs(host: Host, roles: list[Role], scenario: Scenario) -> list[Need]:
    """What the scenario's faults run on this host: each command, and a link's interface."""
    needs = []
    for index, fault in enumerate(scenario.faults):
        if fault_role(fault) not in roles:
            continue
        what = f"faults.{index} ({fault.kind})"
        command = _FAULT_COMMANDS.get(fault.kind)
        if command is not None:
            found = await _command_found(host, command) is not None
            needs.append(Need(
                what=f"{what}: {command[0]}", met=found,
                detail="present" if found else f"{command[0]} not found on {host.name}",
                fix="" if found else f"install {command[0]} on {host.name}"))
        if isinstance(fault, LinkDownFault):
            link = Path("/sys/class/net") / fault.interface
            present = await host.exists(link)
            needs.append(Need(
                what=f"{what}: interface {fault.interface}", met=present,
                detail="present" if present else f"no {link} on {host.name}",
                fix="" if present else "name the interface that carries the migration "
                                       "stream (ip link lists them)"))
    return needs


# python3 runs the affinity helper (qemu/affinity.py) and must offer sched_setaffinity.
_AFFINITY_PYTHON = ("python3", "-I", "-c", "import os; os.sched_setaffinity")


def _cpus_need(host: Host, field: str, cpus: frozenset[int], topology: Topology) -> Need:
    """The CPUs a side names are online on its host."""
    what = f"{field}: CPUs {format_cpu_list(cpus)} online"
    online = topology.cpus_online
    if online is None:
        return Need(what=what, met=False,
                    detail=f"{host.name} cannot say which CPUs are online (no {CPUS_ONLINE})",
                    fix=f"unset the CPU lists of [{field}]")
    missing = cpus - online
    if missing:
        return Need(what=what, met=False,
                    detail=f"CPU {format_cpu_list(missing)} not online on {host.name}, which "
                           f"has CPUs {topology.cpus_text} online",
                    fix=f"name CPUs among {topology.cpus_text} in [{field}]")
    return Need(what=what, met=True, detail=f"{host.name} has CPUs {topology.cpus_text} online")


def _node_need(host: Host, field: str, node: int, topology: Topology) -> Need:
    """The NUMA node a side binds its guest RAM to is there, with memory."""
    what = f"{field}.memory_node = {node}"
    nodes = topology.memory_nodes
    if nodes is not None and node in nodes:
        return Need(what=what, met=True, detail=f"{host.name} has NUMA node {node} with memory")
    if not nodes:
        return Need(what=what, met=False,
                    detail=f"{host.name} has no NUMA node {node} with memory (it has no NUMA "
                           "nodes)",
                    fix=f"unset {field}.memory_node")
    return Need(what=what, met=False,
                detail=f"{host.name} has no NUMA node {node} with memory (it has node "
                       f"{topology.nodes_text})",
                fix=f"set memory_node to one of {topology.nodes_text}")


async def placement_needs(host: Host, roles: list[Role], scenario: Scenario,
                          topology: Topology) -> list[Need]:
    """Each role's ``[placement.*]`` against the host: its CPUs online, its node there with
    memory, and the commands that apply it (python3 always, taskset where QEMU starts
    under it)."""
    sides = [(role, side) for role in roles if (side := scenario.placement.of(role))]
    needs = []
    for role, side in sides:
        field = f"placement.{role}"
        if side.all_cpus:
            needs.append(_cpus_need(host, field, side.all_cpus, topology))
        if side.memory_node is not None:
            needs.append(_node_need(host, field, side.memory_node, topology))
    commands: list[tuple[str, tuple[str, ...], str]] = []
    if sides:
        commands.append(("python3 with sched_setaffinity (CPU placement)", _AFFINITY_PYTHON,
                         f"install python3 on {host.name}"))
    if any(side.launch_cpus is not None for _, side in sides):
        commands.append(("taskset (CPU placement: QEMU starts under it)",
                         ("taskset", "--version"), f"install util-linux on {host.name}"))
    for what, argv, fix in commands:
        found = await _command_found(host, argv) is not None
        needs.append(Need(what=what, met=found,
                          detail="present" if found else f"not found on {host.name}",
                          fix="" if found else fix))
    return needs


async def _compressor_needs(host: Host, roles: list[Role], scenario: Scenario) -> list[Need]:
    """The zstd command on the destination's host, which compresses its trace there once QEMU
    has stopped (:mod:`migrator.hosts.compress`); the controller compresses everything else
    itself."""
    collect = scenario.collect
    if "destination" not in roles or not collect.trace or collect.compress != "zstd":
        return []
    found = await _command_found(host, ("zstd", "--version"))
    met = found is not None
    version = re.search(r"v(\d+(?:\.\d+)+)", found.stdout) if found is not None else None
    return [Need(
        what="zstd (collect.compress = \"zstd\": the destination trace is compressed there)",
        met=met,
        detail=(f"zstd {version.group(1)}" if version else "present") if met
        else f"zstd not found on {host.name}",
        fix="" if met else f"apt install zstd on {host.name}, or set collect.compress = "
                           "\"none\" to keep the trace plain")]


async def check_host(
    host: Host, roles: list[Role], scenario: Scenario,
    kvm: tuple[bool | None, str] | None = None, hugepages: list[Need] | None = None,
    cache_file: Path | None = None,
) -> HostReport:
    """Facts and needs of one host in its roles.

    ``kvm``: the accelerator verdict, if known.  ``hugepages``: the hugepage needs
    as :func:`check_hosts` found them for all hosts together; None checks this
    host alone.  ``cache_file``: where the QEMU and HGM probes' answers are kept while
    the host's boot id and the QEMU binary stay the same (None probes afresh).
    """
    vms_on_host = len(roles)
    uname = await host.run(["uname", "-r"])
    kvm_device = await host.exists(Path("/dev/kvm"))
    qemu: QemuFacts | None = None
    topology = await read_topology(host)
    # First: an impossible placement is the first thing to say about the host.
    needs: list[Need] = await placement_needs(host, roles, scenario, topology)
    plan = plan_migration(scenario)
    refused: list[str] = []
    try:
        trials = _settings_trials(plan, roles)
        qemu, refused = await (
            probe_qemu_cached(host, scenario.vm.qemu, scenario.vm.qemu_root, trials, cache_file)
            if cache_file is not None
            else probe_qemu_trying(host, scenario.vm.qemu, scenario.vm.qemu_root, trials))
    except MigratorError as error:
        # The error already says what to do.
        root = scenario.vm.qemu_root
        where = f" in vm.qemu_root {root}" if root else ""
        needs.append(Need(what=f"QEMU {scenario.vm.qemu}{where}", met=False,
                          detail=str(error)))
    if qemu is not None:
        wanted = {**(plan.source_capabilities if "source" in roles else {}),
                  **(plan.destination_capabilities if "destination" in roles else {})}
        # Named in the scenario, even as false: QEMU rejects a name it does not know.
        missing = sorted(name for name, on in wanted.items()
                         if (on or name in scenario.migration.capabilities)
                         and name not in qemu.capabilities)
        needs.append(Need(
            what="migration capabilities " + ", ".join(sorted(n for n, on in wanted.items()
                                                              if on)),
            met=not missing,
            detail=f"QEMU {qemu.version} lacks: {', '.join(missing)}" if missing
            else f"QEMU {qemu.version} has them",
            fix="use a newer QEMU or turn the option off in the scenario" if missing else "",
        ))
        if not missing:
            refused += [refusal for role in roles
                        if (refusal := postcopy_multifd_refusal(
                            qemu.version, plan.source_capabilities if role == "source"
                            else plan.destination_capabilities))]
            needs.append(Need(
                what="migration settings (capabilities and parameters)", met=not refused,
                detail=(f"QEMU {qemu.version} cannot run them: " + "; ".join(refused))
                if refused
                else f"QEMU {qemu.version} takes them",
                fix="change them in the scenario's migration table (QEMU's own words say "
                    "which), or use a QEMU that takes them" if refused else ""))
    pools = []
    for size in HUGEPAGE_SIZES_KIB:
        try:
            pool = await read_pool(host, size)
        except MigratorError:
            continue
        pools.append(Pool(page_size_kib=size, total=pool.total, free=pool.free,
                          reserved=pool.reserved))
    if scenario.vm.backing.is_hugetlb:
        needs += hugepages if hugepages is not None else await _hugepage_needs(
            scenario, memory_groups(scenario, [(host, roles)]))
    userfaultfd = await host.exists(Path("/dev/userfaultfd")) or await host.exists(
        Path("/proc/sys/vm/unprivileged_userfaultfd"))
    if "destination" in roles and scenario.migration.postcopy:
        needs.append(Need(what="userfaultfd (post-copy)", met=userfaultfd,
                          detail="present" if userfaultfd else "no /dev/userfaultfd",
                          fix="" if userfaultfd else "a kernel with CONFIG_USERFAULTFD=y"))
    needs.extend(await _tls_needs(host, roles, scenario))
    needs.extend(await _fault_needs(host, roles, scenario))
    needs.extend(await _compressor_needs(host, roles, scenario))
    mem_mib = mem_available_mib(await _text(host, "/proc/meminfo"))
    if not scenario.vm.backing.is_hugetlb and mem_mib is not None:
        wanted_mib = vms_on_host * scenario.vm.memory_mib
        needs.append(Need(what=f"{wanted_mib} MiB of available memory",
                          met=mem_mib >= wanted_mib, detail=f"{mem_mib} MiB available",
                          fix="" if mem_mib >= wanted_mib else "free memory or shrink vm"))
    kvm_usable, kvm_detail = kvm if kvm is not None else (None, "not probed")
    if scenario.vm.accel is Accel.KVM and kvm is not None:
        needs.append(Need(what="a usable KVM", met=bool(kvm_usable), detail=kvm_detail,
                          fix="" if kvm_usable else "set vm.accel = \"tcg\" or \"auto\""))
    hgm = await detect_hgm(host, qemu, cache_file)
    offset, rtt = await measure_clock_offset(host)
    report = HostReport(
        roles=roles, host=host.name, kernel=uname.stdout.strip(), kvm_device=kvm_device,
        kvm_usable=kvm_usable, kvm_detail=kvm_detail,
        qemu_binary=qemu.binary if qemu else None, qemu_version=qemu.version if qemu else None,
        qemu_capabilities=list(qemu.capabilities) if qemu else [],
        hugepage_pools=pools, hugetlbfs_mounts=_mounts(await _text(host, "/proc/mounts") or ""),
        userfaultfd=userfaultfd, mem_available_mib=mem_mib, cpus_online=topology.cpus_text,
        numa_nodes=topology.nodes_text, clock_offset_ms=offset,
        clock_rtt_ms=rtt, hgm={**hgm.to_dict(), "supported": hgm.supported,
                               "reason": hgm.reason}, needs=needs,
    )
    report._qemu, report._hgm = qemu, hgm
    return report


def _settings_trials(plan: MigrationPlan, roles: Sequence[Role]) -> list[SettingsTrial]:
    """What a host's probe QEMU is handed: the plan of each role it plays.

    The TLS parameters name a credentials object that only the run creates, so
    they are left out.
    """
    sides = {"source": (plan.source_capabilities, plan.source_parameters),
             "destination": (plan.destination_capabilities, plan.destination_parameters)}
    return [SettingsTrial(f"the {role}'s", sides[role][0],
                          {name: value for name, value in sides[role][1].items()
                           if not name.startswith("tls-")})
            for role in roles]


async def check_hosts(
    scenario: Scenario, source: Host, destination: Host,
    kvm: dict[str, tuple[bool | None, str]] | None = None, cache_file: Path | None = None,
) -> PreflightReport:
    """Check both hosts (one machine playing both roles is checked once, for two VMs).

    The hugepage needs are checked first and together, so two hosts on one
    kernel (two namespaces of a machine) must find pages for both VMs.
    ``cache_file`` as for :func:`check_host`.
    """
    kvm = kvm or {}
    if source is destination:
        hosts = [await check_host(source, ["source", "destination"], scenario,
                                  kvm.get(source.name), cache_file=cache_file)]
    else:
        pages: list[list[Need] | None] = [None, None]
        if scenario.vm.backing.is_hugetlb:
            # One group per host: each runs one VM.
            found = await _hugepage_needs(scenario, memory_groups(
                scenario, [(source, ["source"]), (destination, ["destination"])]))
            pages = [[found[0]], [found[1]]]
        hosts = list(await asyncio.gather(
            check_host(source, ["source"], scenario, kvm.get(source.name), pages[0],
                       cache_file),
            check_host(destination, ["destination"], scenario, kvm.get(destination.name),
                       pages[1], cache_file),
        ))
    return PreflightReport(scenario=scenario.name, hosts=hosts)


def raise_unmet(report: PreflightReport) -> None:
    """:class:`PreflightError` naming the first unmet need and its fix (all are in the report)."""
    unmet = [(host, need) for host in report.hosts for need in host.unmet]
    if unmet:
        host, need = unmet[0]
        more = f" (and {len(unmet) - 1} more unmet)" if len(unmet) > 1 else ""
        fix = f"; fix: {need.fix}" if need.fix else ""
        raise PreflightError(f"{'+'.join(host.roles)} {host.host}: needs {need.what}: "
                             f"{need.detail}{fix}{more}")
