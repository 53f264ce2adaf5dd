"""How many runs one kernel holds at once: memory, hugepages and cores.

``migrator bench --parallel N`` runs up to N runs at a time; this module says
which of them may share a machine.  Hosts are grouped by the kernel they run
(``/proc/sys/kernel/random/boot_id``): two SSH entries for namespaces of one
machine, or the local host reached twice, are one kernel with one memory, one
hugepage pool per page size and one set of cores.  Each kernel's capacity is
read once, before the first run (:func:`probe_capacity`), and each run's
demand on it follows from its scenario (:func:`needs_of`).  The rule
(:func:`shortfall`), for the runs active on one kernel together:

* **Memory**: every QEMU on the kernel takes its guest's memory (4 KiB backings;
  hugetlb guests take pool pages instead) plus :data:`QEMU_OVERHEAD_MIB`, and
  a hugepage pool grown beyond its free pages takes that growth from memory
  too.  All of it together stays within ``MemAvailable`` at the start, less
  :data:`MEMORY_RESERVE_FRACTION` of it for the host's own processes.
* **Hugepages**: a reservation counts the pages of every other open
  reservation as taken, and pages another run's QEMU has mapped are also gone
  from the pool, so with runs of P1..Pk pages of one size open together, a
  reservation may need the pool to hold up to ``2 x sum(P) - min(P)`` pages
  (:mod:`migrator.hosts.hugepages`, "conservative").  What the pool's free
  pages (less other migrator processes' claims) do not cover is grown from
  memory, as above.  A run alone needs exactly its own pages.
* **Cores**: only one side's vCPUs run at a time (the source's before the
  switch, the destination's after), so a run takes ``vm.vcpus`` cores of each
  kernel it runs on.  Together the runs take at most the kernel's cores
  (``nproc``) times ``vcpus_per_core`` (1 by default: each guest vCPU has a
  core of its own, so runs do not steal each other's time).  A run alone always
  fits: more vCPUs than cores is what a single run does today.
* **Alone**: a run whose faults change the host for everyone (``link-down``,
  ``pool-exhausted``) runs with no other run on its kernels; a destination
  with a fixed ``migration_port`` takes that port, so two runs that name the
  same one never overlap.

A run that does not fit next to the active ones waits (in suite order); a run
that does not fit even alone is refused before anything starts.  The numbers
are read once: memory that other processes take meanwhile is not seen, and a
1 GiB pool that cannot grow at run time (no contiguous memory left) fails its
run's preflight as it would alone.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from migrator.config.models import (
    HostSpec,
    HostsSpec,
    LinkDownFault,
    PoolExhaustedFault,
    Scenario,
    SSHHostSpec,
)
from migrator.errors import MigratorError
from migrator.hosts.base import Host
from migrator.hosts.hugepages import read_pool
from migrator.hosts.identity import kernel_identity
from migrator.hosts.pool_claims import hold_pool_lock, other_processes_claims
from migrator.preflight import mem_available_mib
from migrator.runner import scenario_hosts

__all__ = [
    "MEMORY_RESERVE_FRACTION",
    "QEMU_OVERHEAD_MIB",
    "Demand",
    "KernelCapacity",
    "RunNeeds",
    "needs_of",
    "pool_pages_needed",
    "probe_capacity",
    "probe_host",
    "shortfall",
]

#: Memory a QEMU takes beyond its guest's RAM.  Measured: 107 MiB peak (82 MiB anonymous,
#: 25 MiB file-backed: TCG's code buffer, QEMU's own heap and libraries) for a 256 MiB
#: TCG guest on QEMU 10.0.2; KVM needs less.
QEMU_OVERHEAD_MIB = 128
#: The share of ``MemAvailable`` left to the host's page cache and its other processes.
MEMORY_RESERVE_FRACTION = 0.1


@dataclass(frozen=True)
class KernelCapacity:
    """What one running kernel offers runs, as read before the first run."""

    kernel: str
    """Its boot id (:func:`migrator.hosts.identity.kernel_identity`)."""
    hosts: tuple[str, ...]
    """The names it was reached as (for messages)."""
    cpus: int
    """Cores the host's processes may use (``nproc``)."""
    mem_available_mib: int
    """``MemAvailable`` of ``/proc/meminfo``, MiB."""
    free_hugepages: Mapping[int, int] = field(default_factory=dict)
    """Per page size in kB: free pages not reserved by mappings nor claimed by other
    migrator processes (pools the suite's runs do not use are left out)."""

    @property
    def name(self) -> str:
        """How messages name it."""
        return "+".join(self.hosts)

    @property
    def memory_budget_mib(self) -> int:
        """The memory runs may take: MemAvailable less the reserve."""
        return int(self.mem_available_mib * (1 - MEMORY_RESERVE_FRACTION))


@dataclass(frozen=True)
class Demand:
    """What one run takes from one kernel while it runs."""

    memory_mib: int
    """Guest memory of its 4 KiB-backed QEMUs there plus every QEMU's overhead."""
    vcpus: int
    """Cores its running vCPUs take there."""
    hugepages: Mapping[int, int] = field(default_factory=dict)
    """Pool pages it reserves there, per page size in kB."""


@dataclass(frozen=True)
class RunNeeds:
    """One run's demand on each kernel it uses, and what it cannot share."""

    demands: Mapping[str, Demand] = field(default_factory=dict)
    """Per kernel (boot id)."""
    exclusive: frozenset[str] = frozenset()
    """Resources no two active runs may hold (a fixed migration port)."""
    alone: bool = False
    """No other run may be active on its kernels (it changes the host for everyone)."""

    @property
    def kernels(self) -> frozenset[str]:
        """The kernels it runs on."""
        return frozenset(self.demands)


def needs_of(scenario: Scenario, kernel_of: Mapping[HostSpec, str]) -> RunNeeds:
    """A run's needs, given which kernel each of its host entries runs."""
    vm = scenario.vm
    sides: dict[str, int] = {}
    for spec in (scenario.hosts.source, scenario.hosts.destination):
        sides[kernel_of[spec]] = sides.get(kernel_of[spec], 0) + 1
    demands = {}
    for kernel, qemus in sides.items():
        guest_mib = 0 if vm.backing.is_hugetlb else vm.memory_mib
        size_kib, per_vm = vm.hugepages
        pages = {size_kib: qemus * per_vm} if vm.backing.is_hugetlb else {}
        demands[kernel] = Demand(memory_mib=qemus * (guest_mib + QEMU_OVERHEAD_MIB),
                                 vcpus=vm.vcpus, hugepages=pages)
    destination = scenario.hosts.destination
    exclusive = frozenset(
        {f"port {destination.stream_address}:{destination.migration_port}"}
        if isinstance(destination, SSHHostSpec) and destination.migration_port else ())
    alone = any(isinstance(fault, LinkDownFault | PoolExhaustedFault)
                for fault in scenario.faults)
    return RunNeeds(demands=demands, exclusive=exclusive, alone=alone)


def pool_pages_needed(pages: Sequence[int]) -> int:
    """The most pages one pool may have to hold for reservations of ``pages`` open together.

    ``2 x sum - min``: the last reservation counts every other one's pages as claimed,
    and those a QEMU has mapped are also gone from the free count (see the module
    docstring); the smallest coming last is the worst order.
    """
    return 2 * sum(pages) - min(pages) if pages else 0


def shortfall(capacity: KernelCapacity, demands: Sequence[Demand],
              vcpus_per_core: int = 1) -> str | None:
    """Why ``demands`` (the runs active together on one kernel) do not fit it; None if they do."""
    vcpus = sum(demand.vcpus for demand in demands)
    cores = capacity.cpus * vcpus_per_core
    if len(demands) > 1 and vcpus > cores:
        return (f"{vcpus} vCPUs of {len(demands)} runs on {capacity.cpus} cores "
                f"({vcpus_per_core} vCPU per core)")
    memory = sum(demand.memory_mib for demand in demands)
    grown = []
    for size in sorted({size for demand in demands for size in demand.hugepages}):
        pages = [demand.hugepages[size] for demand in demands if size in demand.hugepages]
        needed = pool_pages_needed(pages)
        growth = max(0, needed - capacity.free_hugepages.get(size, 0))
        if growth:
            memory += growth * size // 1024
            grown.append(f"{growth} pages of {size} kB grown from memory")
    if memory > capacity.memory_budget_mib:
        what = f" ({', '.join(grown)})" if grown else ""
        return (f"{memory} MiB of memory{what}, of {capacity.memory_budget_mib} MiB it can "
                f"give (MemAvailable {capacity.mem_available_mib} MiB less "
                f"{MEMORY_RESERVE_FRACTION:.0%})")
    return None


async def _nproc(host: Host) -> int:
    result = await host.run(["nproc"])
    text = result.stdout.strip()
    return int(text) if result.status == 0 and text.isdigit() else 1


async def _free_pages(host: Host, size_kib: int) -> int:
    """Free pages of one pool not reserved by a mapping nor claimed by another process."""
    try:
        pool = await read_pool(host, size_kib)
    except MigratorError:
        return 0  # no such pool: the run's preflight says so
    async with hold_pool_lock(host):
        others = await other_processes_claims(host, size_kib)
    return max(0, pool.available - others)


async def probe_host(host: Host, page_sizes: Iterable[int]) -> KernelCapacity:
    """The capacity of ``host``'s kernel, with the pools of ``page_sizes`` (kB)."""
    try:
        meminfo = await host.read_text(Path("/proc/meminfo"))
    except (OSError, MigratorError):
        meminfo = ""  # then no memory to give: every run is refused, naming MemAvailable
    return KernelCapacity(
        kernel=await kernel_identity(host), hosts=(host.name,), cpus=await _nproc(host),
        mem_available_mib=mem_available_mib(meminfo) or 0,
        free_hugepages={size: await _free_pages(host, size) for size in sorted(page_sizes)})


async def probe_capacity(scenarios: Sequence[Scenario]) -> dict[HostSpec, KernelCapacity]:
    """Each host entry of ``scenarios``, with the capacity of the kernel it runs.

    Every host pair is connected once; entries on one kernel share one
    :class:`KernelCapacity` (named after all of them).
    """
    sizes: dict[HostSpec, set[int]] = {}
    pairs: dict[HostsSpec, Scenario] = {}
    for scenario in scenarios:
        pairs.setdefault(scenario.hosts, scenario)
        for spec in (scenario.hosts.source, scenario.hosts.destination):
            wanted = sizes.setdefault(spec, set())
            if scenario.vm.backing.is_hugetlb:
                wanted.add(scenario.vm.backing.page_size // 1024)
    probed: dict[HostSpec, KernelCapacity] = {}
    for scenario in pairs.values():
        async with scenario_hosts(scenario) as (source, destination):
            for spec, host in ((scenario.hosts.source, source),
                               (scenario.hosts.destination, destination)):
                if spec not in probed:
                    probed[spec] = await probe_host(host, sizes[spec])
    by_kernel: dict[str, KernelCapacity] = {}
    for capacity in probed.values():
        known = by_kernel.get(capacity.kernel)
        if known is None:
            by_kernel[capacity.kernel] = capacity
            continue
        # One kernel reached twice: its pools as the entry that reads more sizes saw them.
        pools = {**capacity.free_hugepages, **known.free_hugepages}
        hosts = known.hosts + tuple(h for h in capacity.hosts if h not in known.hosts)
        by_kernel[capacity.kernel] = KernelCapacity(
            kernel=known.kernel, hosts=hosts, cpus=known.cpus,
            mem_available_mib=known.mem_available_mib, free_hugepages=pools)
    return {spec: by_kernel[capacity.kernel] for spec, capacity in probed.items()}
