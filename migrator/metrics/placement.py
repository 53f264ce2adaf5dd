"""The run's CPU and NUMA placement: as the scenario asked it, and as the QEMUs' threads had it.

Inputs are raw artifacts only: ``[placement.*]`` in ``scenario.toml`` (the label
the results store and compare split on) and run.json's ``placement`` (each
thread's CPUs as read back from ``/proc/TID/status`` while the run went on, and
the guest RAM's policy from ``/proc/PID/numa_maps``; see runner/pinning.py).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from pydantic import ValidationError

from migrator.config.placement import SidePlacement, placement_label
from migrator.model import PlacedThread, PlacementSection, RamBinding
from migrator.rundir import SIDE_OF_ROLE, RunMeta, SidePlacementRecord

__all__ = ["PLACEMENT_SOURCE", "placement_of", "placement_section", "placement_warnings"]

PLACEMENT_SOURCE = ("run.json placement: Cpus_allowed_list read back from /proc/TID/status, "
                    "RAM policy from /proc/PID/numa_maps, on each QEMU's host")


def placement_of(scenario: Mapping[str, Any]) -> str:
    """The scenario's placement as :func:`placement_label` writes it ("" when none)."""
    tables = scenario.get("placement") or {}
    sides: dict[str, SidePlacement | None] = {}
    for role, side in SIDE_OF_ROLE.items():
        try:
            sides[side] = SidePlacement.model_validate(tables[role]) if role in tables else None
        except ValidationError:
            sides[side] = None  # not this version's table: no label rather than a guess
    return placement_label(sides)


def _sides(meta: RunMeta) -> list[tuple[str, SidePlacementRecord]]:
    record = meta.placement
    if record is None:
        return []
    return [(SIDE_OF_ROLE[role], side) for role, side in
            (("source", record.source), ("destination", record.destination)) if side is not None]


def placement_section(meta: RunMeta) -> PlacementSection | None:
    """Every thread each side's placement saw, and the RAM binding; None without placement."""
    sides = _sides(meta)
    if not sides:
        return None
    threads = [PlacedThread(side=side, name=thread.name, tid=thread.tid, role=thread.role,
                            wanted=thread.wanted, cpus=thread.cpus, pinned=thread.pinned)
               for side, record in sides for thread in record.threads]
    memory = [RamBinding(side=side, node=record.memory.node, policy=record.memory.policy,
                         pages=record.memory.pages, page_kib=record.memory.page_kib)
              for side, record in sides if record.memory is not None]
    return PlacementSection(source=PLACEMENT_SOURCE, threads=threads, memory=memory)


def placement_warnings(meta: RunMeta) -> list[str]:
    """A thread whose CPUs read back were not those wanted, RAM not bound to its node, and
    what the host refused."""
    warnings = []
    for side, record in _sides(meta):
        for thread in record.threads:
            if thread.cpus != thread.wanted:
                warnings.append(f"placement: {side} thread {thread.name!r} (tid {thread.tid}, "
                                f"{thread.role}) had CPUs {thread.cpus}, wanted "
                                f"{thread.wanted} ({PLACEMENT_SOURCE})")
        warnings += [f"placement: {side}: {error}" for error in record.errors]
        memory = record.memory
        if memory is None:
            continue
        elsewhere = sorted(node for node, pages in memory.pages.items()
                           if pages and node != str(memory.node))
        if memory.policy != f"bind:{memory.node}" or elsewhere:
            found = memory.error or f"policy {memory.policy}" + (
                f", pages on node {', '.join(elsewhere)}" if elsewhere else "")
            warnings.append(f"placement: {side} guest RAM asked bound to node {memory.node}: "
                            f"{found} ({PLACEMENT_SOURCE})")
    return warnings
