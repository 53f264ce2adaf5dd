"""The run report's tables of what the guest saw: its stalls and its clock's steps.

Defined once from a :class:`~migrator.model.Report` and drawn by the terminal
and the HTML run page (see :mod:`migrator.report.run_tables` for the
conventions).  A ``t`` column places an event on the HTML page's time axis, so
it is there only when a :class:`~migrator.pagedata.Clock` is given (the
terminal has none).
"""

from __future__ import annotations

from migrator.model import Report
from migrator.pagedata import Clock
from migrator.report.run_tables import number
from migrator.report.sources import Sources
from migrator.tables import Cell, Column, Note, Row, Table
from migrator.units import format_value

__all__ = ["clock_step_table", "stall_tables", "vcpu_stall_table", "worst_gap_table",
           "worst_stall_table"]

#: How many of the worst heartbeat gaps a compact rendering shows.
COMPACT_GAPS = 5


def _t(clock: Clock | None, ns: int | None) -> list[Cell]:
    """The ``t, s`` cell of an event on the page's time axis (none without a clock)."""
    if clock is None:
        return []
    return [Cell(format_value(round(clock.s(ns), 4)) if ns else "-", numeric=True)]


def _t_column(clock: Clock | None) -> list[str]:
    return [] if clock is None else ["t, s"]


def vcpu_stall_table(report: Report, sources: Sources) -> Table:
    """Each vCPU's stalls by the guest's own clock: count, max, p99, total, by phase."""
    table = Table("vCPU stalls by the guest's own clock, ms", [
        Column("vCPU", numeric=True), Column("stalls", numeric=True),
        *(Column(h, "ms", rounded=True) for h in ("max", "p99", "total")),
        Column("stalls by phase"), Column("src", tone="dim")])
    for vcpu in report.guest_stalls:
        table.rows.append([
            Cell(str(vcpu.vcpu), numeric=True), number(vcpu.stalls), number(vcpu.max_ms.value),
            number(vcpu.p99_ms.value, title=vcpu.p99_ms.source),
            number(vcpu.total_stalled_ms.value),
            Cell(", ".join(f"{k} {v}" for k, v in vcpu.by_phase.items())),
            Cell("", sources.number(vcpu.max_ms.source), vcpu.max_ms.source)])
    return table


def worst_stall_table(report: Report, clock: Clock | None) -> Table:
    """The longest stalls by the guest's clock, placed on the host's."""
    table = Table("Worst stalls by the guest clock",
                  [*_t_column(clock), "duration, ms", "vCPU", "phase"])
    if clock is not None:
        table.notes.append(Note("t: host wall clock, placed through the heartbeat before the "
                                "stall"))
    for stall in report.worst_guest_stalls:
        table.rows.append([*_t(clock, stall.host_ns), number(stall.duration_ms),
                           Cell("-" if stall.vcpu is None else str(stall.vcpu)),
                           Cell(stall.phase)])
    return table


def worst_gap_table(report: Report, clock: Clock | None) -> Table | None:
    """The longest gaps between heartbeat arrivals; a compact rendering shows the first
    :data:`COMPACT_GAPS`."""
    outside = report.outside_stalls
    if outside is None:
        return None
    table = Table("Worst heartbeat gaps (outside view)",
                  [*_t_column(clock), Column("duration, ms", numeric=True), "phase"])
    if clock is not None:
        table.notes.append(Note("t: host wall clock at the heartbeat that opened the gap"))
    for index, stall in enumerate(outside.worst):
        table.rows.append(Row([*_t(clock, stall.host_ns), number(stall.duration_ms),
                               Cell(stall.phase)], detail=index >= COMPACT_GAPS))
    return table


def clock_step_table(report: Report, sources: Sources, clock: Clock | None) -> Table | None:
    """The guest clock's steps: not stalls, so apart from the stall tables."""
    steps = report.guest_clock_steps
    if steps is None or not steps.steps:
        return None
    table = Table(f"Guest clock steps, not stalls: {format_value(steps.count.value)} "
                  f"[{sources.number(steps.count.source)}], largest back "
                  f"{format_value(steps.largest_back.value)} ms "
                  f"[{sources.number(steps.largest_back.source)}]",
                  [*_t_column(clock), Column("step, ms", "ms", rounded=True),
                   Column("vCPU", numeric=True), "phase", "reported as", Column("src", tone="dim")])
    note = "step < 0: the guest's CLOCK_MONOTONIC went back; largest steps first"
    if clock is not None:
        note += "; t: host wall clock, placed through the heartbeat before it"
    table.notes.append(Note(note, "dim"))
    for step in steps.steps:
        table.rows.append([
            *_t(clock, step.host_ns), number(step.step.value), Cell(str(step.vcpu), numeric=True),
            Cell(step.phase), Cell(step.reported_as),
            Cell("", sources.number(step.step.source), step.step.source)])
    return table


def stall_tables(report: Report, sources: Sources, clock: Clock | None) -> list[Table]:
    """Per-vCPU stalls, the worst stalls of both views and the clock's steps, in that order."""
    tables = [vcpu_stall_table(report, sources), worst_stall_table(report, clock),
              worst_gap_table(report, clock), clock_step_table(report, sources, clock)]
    return [table for table in tables if table is not None]
