"""Host preflight: what each host offers, and whether it meets a scenario's needs.

``migrator hosts check`` prints this; ``migrator run`` runs the same checks
before anything boots.  Every fact is read from the host through the
:class:`Host` interface (so the same code serves remote hosts), and every unmet
need carries the fix an operator can apply.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict

from migrator.config.models import Accel, Scenario
from migrator.errors import HugepageShortfall, MigratorError, PreflightError
from migrator.hgm import detect_hgm
from migrator.hosts.base import Host
from migrator.hosts.hugepages import read_pool, reserve_hugepages
from migrator.migration.plan import plan_migration
from migrator.qemu.probe import QemuFacts, probe_qemu

__all__ = [
    "HostReport",
    "Need",
    "PreflightReport",
    "check_hosts",
    "raise_unmet",
]

HUGEPAGE_SIZES_KIB = (2048, 1048576)
Role = Literal["source", "destination"]


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
    clock_offset_ms: float | None
    clock_rtt_ms: float | None
    hgm: dict[str, Any]
    needs: list[Need]

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


async def _clock_offset(host: Host) -> tuple[float | None, float | None]:
    """Host wall clock minus ours, in ms, with the round trip it was measured over.

    The best of three round trips bounds the error by half the smallest RTT.
    """
    best: tuple[float, float] | None = None
    for _ in range(3):
        sent = time.time_ns()
        result = await host.run(["date", "+%s%N"], timeout=10)
        back = time.time_ns()
        if result.status != 0 or not result.stdout.strip().isdigit():
            return None, None
        rtt = (back - sent) / 1e6
        offset = (int(result.stdout.strip()) - (sent + back) / 2) / 1e6
        if best is None or rtt < best[1]:
            best = (offset, rtt)
    assert best is not None
    return round(best[0], 3), round(best[1], 3)


def _mounts(proc_mounts: str) -> list[Mount]:
    mounts = []
    for line in proc_mounts.splitlines():
        fields = line.split()
        if len(fields) >= 4 and fields[2] == "hugetlbfs":
            mounts.append(Mount(path=fields[1].replace("\\040", " "), options=fields[3]))
    return mounts


def _mem_available_mib(meminfo: str | None) -> int | None:
    for line in (meminfo or "").splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) // 1024
    return None


async def _hugepage_need(host: Host, scenario: Scenario, vms: int) -> Need:
    """Really try to reserve the pages (then give them back): free counts are not enough."""
    page = scenario.vm.backing.page_size
    size_kib = page // 1024
    needed = vms * (scenario.vm.memory_mib << 20) // page
    what = f"{needed} free hugepages of {size_kib} kB"
    try:
        async with reserve_hugepages(host, size_kib, needed) as added:
            pass
    except HugepageShortfall as error:
        size = "1G" if size_kib == 1048576 else f"{size_kib // 1024}M"
        return Need(what=what, met=False,
                    detail=f"only {error.free} could be had (pool grown and given back)",
                    fix=f"free memory on {host.name}, or reserve them at boot with "
                        f"hugepagesz={size} hugepages={needed} on its kernel command line")
    except MigratorError as error:
        return Need(what=what, met=False, detail=str(error), fix="run as root")
    grown = f" (pool grown by {added} and given back)" if added else ""
    return Need(what=what, met=True, detail=f"could be reserved{grown}")


async def check_host(
    host: Host, roles: list[Role], scenario: Scenario,
    kvm: tuple[bool | None, str] | None = None,
) -> HostReport:
    """Facts and needs of one host in its roles (``kvm``: the accelerator verdict, if known)."""
    vms_on_host = len(roles)
    uname = await host.run(["uname", "-r"])
    kvm_device = await host.exists(Path("/dev/kvm"))
    qemu: QemuFacts | None = None
    needs: list[Need] = []
    try:
        qemu = await probe_qemu(host, scenario.vm.qemu)
    except MigratorError as error:
        # The error already says what to do.
        needs.append(Need(what=f"QEMU {scenario.vm.qemu}", met=False, detail=str(error)))
    if qemu is not None:
        plan = plan_migration(scenario)
        wanted = {**(plan.source_capabilities if "source" in roles else {}),
                  **(plan.destination_capabilities if "destination" in roles else {})}
        missing = sorted(name for name, on in wanted.items()
                         if on and name not in qemu.capabilities)
        needs.append(Need(
            what="migration capabilities " + ", ".join(sorted(n for n, on in wanted.items()
                                                              if on)),
            met=not missing,
            detail=f"QEMU {qemu.version} lacks: {', '.join(missing)}" if missing
            else f"QEMU {qemu.version} has them",
            fix="use a newer QEMU or turn the option off in the scenario" if missing else "",
        ))
    pools = []
    for size in HUGEPAGE_SIZES_KIB:
        try:
            pool = await read_pool(host, size)
        except MigratorError:
            continue
        pools.append(Pool(page_size_kib=size, total=pool.total, free=pool.free,
                          reserved=pool.reserved))
    if scenario.vm.backing.is_hugetlb:
        needs.append(await _hugepage_need(host, scenario, vms_on_host))
    userfaultfd = await host.exists(Path("/dev/userfaultfd")) or await host.exists(
        Path("/proc/sys/vm/unprivileged_userfaultfd"))
    if "destination" in roles and scenario.migration.postcopy:
        needs.append(Need(what="userfaultfd (post-copy)", met=userfaultfd,
                          detail="present" if userfaultfd else "no /dev/userfaultfd",
                          fix="" if userfaultfd else "a kernel with CONFIG_USERFAULTFD=y"))
    mem_mib = _mem_available_mib(await _text(host, "/proc/meminfo"))
    if not scenario.vm.backing.is_hugetlb and mem_mib is not None:
        wanted_mib = vms_on_host * scenario.vm.memory_mib
        needs.append(Need(what=f"{wanted_mib} MiB of available memory",
                          met=mem_mib >= wanted_mib, detail=f"{mem_mib} MiB available",
                          fix="" if mem_mib >= wanted_mib else "free memory or shrink vm"))
    kvm_usable, kvm_detail = kvm if kvm is not None else (None, "not probed")
    if scenario.vm.accel is Accel.KVM and kvm is not None:
        needs.append(Need(what="a usable KVM", met=bool(kvm_usable), detail=kvm_detail,
                          fix="" if kvm_usable else "set vm.accel = \"tcg\" or \"auto\""))
    hgm = await detect_hgm(host, qemu)
    offset, rtt = await _clock_offset(host)
    return HostReport(
        roles=roles, host=host.name, kernel=uname.stdout.strip(), kvm_device=kvm_device,
        kvm_usable=kvm_usable, kvm_detail=kvm_detail,
        qemu_binary=qemu.binary if qemu else None, qemu_version=qemu.version if qemu else None,
        qemu_capabilities=list(qemu.capabilities) if qemu else [],
        hugepage_pools=pools, hugetlbfs_mounts=_mounts(await _text(host, "/proc/mounts") or ""),
        userfaultfd=userfaultfd, mem_available_mib=mem_mib, clock_offset_ms=offset,
        clock_rtt_ms=rtt, hgm={**hgm.to_dict(), "supported": hgm.supported,
                               "reason": hgm.reason}, needs=needs,
    )


async def check_hosts(
    scenario: Scenario, source: Host, destination: Host,
    kvm: dict[str, tuple[bool | None, str]] | None = None,
) -> PreflightReport:
    """Check both hosts (one machine playing both roles is checked once, for two VMs)."""
    kvm = kvm or {}
    if source is destination:
        hosts = [await check_host(source, ["source", "destination"], scenario,
                                  kvm.get(source.name))]
    else:
        hosts = list(await asyncio.gather(
            check_host(source, ["source"], scenario, kvm.get(source.name)),
            check_host(destination, ["destination"], scenario, kvm.get(destination.name)),
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
