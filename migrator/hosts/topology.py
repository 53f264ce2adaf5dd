"""A host's CPUs and NUMA nodes, as its kernel lists them in sysfs."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from migrator.config.placement import format_cpu_list, parse_cpu_list
from migrator.hosts.base import Host

__all__ = ["CPUS_ONLINE", "NODES", "Topology", "read_topology"]

CPUS_ONLINE = Path("/sys/devices/system/cpu/online")
NODES = Path("/sys/devices/system/node")


@dataclass(frozen=True)
class Topology:
    """The CPUs online and the NUMA nodes that have memory; None where the kernel says nothing
    (no ``node`` directory: a kernel built without NUMA)."""

    cpus_online: frozenset[int] | None
    memory_nodes: frozenset[int] | None

    @property
    def cpus_text(self) -> str:
        """The CPUs online as a CPU list, ``unknown`` when not known."""
        return "unknown" if self.cpus_online is None else format_cpu_list(self.cpus_online)

    @property
    def nodes_text(self) -> str:
        """The nodes with memory as a list, ``none`` when the kernel has no NUMA."""
        return "none" if self.memory_nodes is None else format_cpu_list(self.memory_nodes)


async def _listed(host: Host, path: Path) -> frozenset[int] | None:
    """A sysfs list file (``0-3,8``) as numbers; None when absent or unreadable."""
    try:
        text = (await host.read_text(path)).strip()
    except (FileNotFoundError, PermissionError):
        return None
    try:
        return parse_cpu_list(text) if text else frozenset()
    except ValueError:
        return None


async def read_topology(host: Host) -> Topology:
    """The host's CPUs online and its NUMA nodes with memory (``has_memory``, else ``online``)."""
    nodes = await _listed(host, NODES / "has_memory")
    if nodes is None:
        nodes = await _listed(host, NODES / "online")
    return Topology(await _listed(host, CPUS_ONLINE), nodes)
