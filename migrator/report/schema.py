"""The versioned schema of ``report.json``.

Every number is a :class:`Metric`: a value with its unit and the source it was
measured from.  Where two sources measure the same thing the report carries a
:class:`Comparison` holding both and how far apart they are.  Bump
:data:`SCHEMA_VERSION` on any incompatible change.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field

__all__ = [
    "SCHEMA_VERSION",
    "BlockFetch",
    "Comparison",
    "Freeze",
    "GuestVcpuStalls",
    "Metric",
    "OutsideStalls",
    "Phase",
    "Report",
    "Stall",
]

SCHEMA_VERSION = 1


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Metric(_Model):
    """One measured number, with its unit and where it came from."""

    value: float | int | None
    unit: str
    source: str


class Comparison(_Model):
    """Two sources measuring the same quantity, side by side."""

    quantity: str
    a: Metric
    b: Metric
    difference: float | None = Field(description="b - a, in a's unit, when both are known")
    note: str = ""


class Phase(_Model):
    """A stretch of the run on the host wall clock."""

    name: str
    start_ns: int
    end_ns: int | None

    @property
    def duration_ms(self) -> float | None:
        """Length in ms, when the phase ended."""
        return None if self.end_ns is None else (self.end_ns - self.start_ns) / 1e6


class Stall(_Model):
    """One stall: when (host wall clock), how long, where, in which phase."""

    host_ns: int
    duration_ms: float
    vcpu: int | None = None
    phase: str = ""


class BlockFetch(_Model):
    """Per-page fetch latency of one RAMBlock (destination QEMU trace)."""

    ramblock: str
    page_size: int
    faults: int
    resolved: int
    unresolved: int
    pages_placed_requested: int
    pages_placed_background: int
    zero_pages: int
    placement_granularity: int | None
    latency_ms: dict[str, Metric]
    histogram: dict[str, Any]


class Freeze(_Model):
    """The real freeze next to QEMU's reported downtime."""

    source_stop_ns: int | None
    destination_resume_ns: int | None
    freeze: Metric
    qemu_downtime: Metric


class GuestVcpuStalls(_Model):
    """Stalls one vCPU saw by its own clock (guest probe)."""

    vcpu: int
    stalls: int
    max_ms: Metric
    p99_ms: Metric
    total_stalled_ms: Metric
    by_phase: dict[str, int]
    histogram: dict[str, Any] | None = None


class OutsideStalls(_Model):
    """Gaps between guest heartbeats as they arrived at the controller (host clock)."""

    heartbeats: int
    lost: int
    period_ms: float
    max_gap: Metric
    p99_gap: Metric
    gaps_over_threshold: int
    worst: list[Stall]


class Report(_Model):
    """Everything derived from one run directory."""

    schema_version: int = SCHEMA_VERSION
    run_id: str
    scenario: str
    outcome: str
    error: str | None = None
    environment: dict[str, Any]
    phases: list[Phase]
    timings: dict[str, Metric]
    transfer: dict[str, Metric]
    freeze: Freeze | None
    fetch: list[BlockFetch]
    blocktime: dict[str, Metric]
    qemu_latency: dict[str, Metric]
    qemu_latency_dist: dict[str, Any] | None = None
    guest_stalls: list[GuestVcpuStalls]
    worst_guest_stalls: list[Stall]
    outside_stalls: OutsideStalls | None
    integrity: dict[str, Any]
    comparisons: list[Comparison]
    warnings: list[str]
