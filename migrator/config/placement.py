"""Where each side's QEMU runs on its host: the ``[placement.source]`` and
``[placement.destination]`` tables (CPUs per kind of thread, the NUMA node of guest RAM).

CPU lists are written as Linux writes them (``/sys/devices/system/cpu/online``,
``Cpus_allowed_list``, ``taskset -c``): CPU numbers and ranges joined by commas,
``"0-3,8,10-11"``.  :func:`parse_cpu_list` reads one, :func:`format_cpu_list` writes
one back in that canonical form.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from typing import Literal

from pydantic import Field, field_validator

from migrator.config.base import ScenarioModel

__all__ = [
    "MAX_CPU",
    "PlacementSpec",
    "SidePlacement",
    "format_cpu_list",
    "parse_cpu_list",
    "placement_label",
]

MAX_CPU = 8191
"""The highest CPU number a list may name (the kernel's NR_CPUS is at most 8192)."""

_ITEM = re.compile(r"^(\d+)(?:-(\d+))?$")


def parse_cpu_list(text: str) -> frozenset[int]:
    """The CPUs of a list such as ``"0-3,8"``; ValueError saying what is wrong with it."""
    if not text:
        raise ValueError("not a CPU list: empty; give CPU numbers and ranges such as '0-3,8'")
    cpus: set[int] = set()
    for item in text.split(","):
        match = _ITEM.match(item)
        if match is None:
            raise ValueError(f"not a CPU list: {item!r} is not a CPU number or a range N-M "
                             "(write it as Linux does, e.g. '0-3,8')")
        first = int(match.group(1))
        last = int(match.group(2)) if match.group(2) is not None else first
        if last < first:
            raise ValueError(f"not a CPU list: range {item!r} runs backwards")
        if last > MAX_CPU:
            raise ValueError(f"not a CPU list: CPU {last} is beyond {MAX_CPU}")
        cpus.update(range(first, last + 1))
    return frozenset(cpus)


def format_cpu_list(cpus: Iterable[int]) -> str:
    """``cpus`` as a canonical CPU list: sorted, runs of two or more as ranges (``0-3,8``)."""
    ordered = sorted(set(cpus))
    parts: list[str] = []
    start = previous = None
    for cpu in [*ordered, None]:
        if previous is not None and cpu == previous + 1:
            previous = cpu
            continue
        if start is not None and previous is not None:
            parts.append(str(start) if start == previous else f"{start}-{previous}")
        start = previous = cpu
    return ",".join(parts)


def _checked(text: str | None) -> str | None:
    """A CPU list as written, once it parses (ValueError otherwise)."""
    if text is not None:
        parse_cpu_list(text)
    return text


class SidePlacement(ScenarioModel):
    """CPUs and NUMA node for one side's QEMU, on that side's host.

    Unset fields leave that part to the kernel's scheduler.  Threads other than
    vCPUs and migration threads (the main loop, RCU, the monitor's I/O thread)
    run on ``io_cpus`` if set, else on ``migration_cpus``: QEMU is started under
    ``taskset -c`` with that list, so every thread it creates later (the
    migration threads come with ``migrate``) starts on it.
    """

    vcpu_cpus: str | list[int] | None = Field(
        None,
        description="host CPUs of the vCPU threads: a CPU list string (\"2-3\") that every "
                    "vCPU thread may run on, or an array with one CPU per vCPU ([2, 3]: vCPU "
                    "0 on CPU 2, vCPU 1 on CPU 3), as many as vm.vcpus")
    migration_cpus: str | None = Field(
        None,
        description="CPU list of the migration threads: on the source the migration thread "
                    "(live_migration, mig/src/main) and its return path; on the destination "
                    "the post-copy fault and listen threads (postcopy/*, mig/dst/*); multifd "
                    "channels on both. Also where every other thread runs when io_cpus is "
                    "unset")
    io_cpus: str | None = Field(
        None,
        description="CPU list of every other QEMU thread: the main loop (which also loads "
                    "the pre-copy stream on a destination before QEMU 11), RCU, the "
                    "monitor's I/O thread; unset: migration_cpus")
    memory_node: int | None = Field(
        None, ge=0, le=1023,
        description="host NUMA node the guest RAM is bound to (memory backend host-nodes=N, "
                    "policy=bind); with a hugetlb backing the node's own hugepage pool "
                    "supplies the pages")

    @field_validator("migration_cpus", "io_cpus")
    @classmethod
    def _cpu_list(cls, text: str | None) -> str | None:
        return _checked(text)

    @field_validator("vcpu_cpus")
    @classmethod
    def _vcpu_cpus(cls, value: str | list[int] | None) -> str | list[int] | None:
        if isinstance(value, str):
            return _checked(value)
        if isinstance(value, list):
            if not value:
                raise ValueError("an empty array: give one CPU per vCPU, or a CPU list "
                                 "string for all of them")
            for cpu in value:
                if not 0 <= cpu <= MAX_CPU:
                    raise ValueError(f"CPU {cpu} is not a CPU number (0 to {MAX_CPU})")
        return value

    @property
    def is_empty(self) -> bool:
        """Nothing asked: QEMU runs as it would without the table."""
        return (self.vcpu_cpus, self.migration_cpus, self.io_cpus,
                self.memory_node) == (None, None, None, None)

    def vcpu_set(self, index: int) -> frozenset[int] | None:
        """The CPUs vCPU ``index`` may run on, None when not asked."""
        if self.vcpu_cpus is None:
            return None
        if isinstance(self.vcpu_cpus, str):
            return parse_cpu_list(self.vcpu_cpus)
        return frozenset({self.vcpu_cpus[index]})

    @property
    def launch_cpus(self) -> str | None:
        """The CPU list QEMU is started under (``taskset -c``), None for no restriction."""
        return self.io_cpus or self.migration_cpus

    @property
    def all_cpus(self) -> frozenset[int]:
        """Every CPU the side names, in any field."""
        named: set[int] = set()
        for text in (self.migration_cpus, self.io_cpus,
                     self.vcpu_cpus if isinstance(self.vcpu_cpus, str) else None):
            if text is not None:
                named |= parse_cpu_list(text)
        if isinstance(self.vcpu_cpus, list):
            named.update(self.vcpu_cpus)
        return frozenset(named)

    def label(self) -> str:
        """The side's fields as one text without commas: ``vcpu=1;mig=0+2-3;node=0``.

        A CPU list's commas become ``+``, a per-vCPU array is joined with ``/``.
        """
        parts = []
        if self.vcpu_cpus is not None:
            vcpus = (self.vcpu_cpus if isinstance(self.vcpu_cpus, str)
                     else "/".join(str(cpu) for cpu in self.vcpu_cpus))
            parts.append(f"vcpu={vcpus}")
        for key, text in (("mig", self.migration_cpus), ("io", self.io_cpus)):
            if text is not None:
                parts.append(f"{key}={text}")
        if self.memory_node is not None:
            parts.append(f"node={self.memory_node}")
        return ";".join(parts).replace(",", "+")


class PlacementSpec(ScenarioModel):
    """``[placement.source]`` and ``[placement.destination]``: each side on its own host."""

    source: SidePlacement | None = Field(
        None, description="[placement.source]: the source QEMU (unset: no placement)")
    destination: SidePlacement | None = Field(
        None, description="[placement.destination]: the destination QEMU (unset: no placement)")

    def of(self, role: Literal["source", "destination"]) -> SidePlacement | None:
        """The placement asked for ``role``, None when there is none (or it is empty)."""
        side = self.source if role == "source" else self.destination
        return None if side is None or side.is_empty else side


def placement_label(sides: Mapping[str, SidePlacement | None]) -> str:
    """Both sides' placement as one text: ``src:vcpu=1;mig=0 dst:vcpu=1;mig=0``.

    ``sides`` maps ``src``/``dst`` to each side's placement; "" when neither has one.
    No comma, so it can be a selector value.
    """
    return " ".join(f"{side}:{spec.label()}" for side, spec in sides.items()
                    if spec is not None and not spec.is_empty)
