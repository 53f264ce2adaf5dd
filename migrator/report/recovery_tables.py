"""The run report's tables of post-copy pauses and injected faults, defined once.

Drawn by the terminal and the HTML run page (see :mod:`migrator.report.run_tables`
for the conventions).  Times are the report's own, in s since the ``migrate``
mark: the HTML plots' t = 0 too, as their cited source says.  Why a pause
happened and where the guest's gaps began are detail columns; a compact
rendering says them in a note per pause instead.
"""

from __future__ import annotations

from migrator.model import Metric, PauseRecord, Report
from migrator.report.run_tables import number
from migrator.report.sources import Sources
from migrator.tables import Cell, Column, Note, Table

__all__ = ["fault_table", "pause_table"]


def _seconds(metric: Metric, sources: Sources, prefix: str = "") -> Cell:
    """A time in s to the ms citing its source, or '-'."""
    if metric.value is None:
        return Cell("-", numeric=True)
    return Cell(f"{prefix}{metric.value:,.3f}", sources.number(metric.source), metric.source,
                numeric=True)


def _since(pause: PauseRecord, start_ns: int | None) -> float | None:
    """``start_ns`` in s since migrate, through the pause's own start (None if unknown)."""
    if start_ns is None or pause.began.value is None:
        return None
    return pause.began.value + (start_ns - pause.began_ns) / 1e9


def _from(start: float | None) -> Cell:
    return Cell("-" if start is None else f"{start:,.3f}", numeric=True)


def pause_table(report: Report, sources: Sources) -> Table:
    """Each post-copy pause: times, attempts, result and what the guest saw through it."""
    table = Table("Post-copy pauses and recoveries, s since migrate", [
        Column("#", numeric=True), Column("cause", detail=True),
        Column("after fault", detail=True), Column("began"), Column("both paused"),
        Column("recovered"), Column("took"), Column("attempts"), Column("result"),
        Column("guest gap"), Column("guest gap from", detail=True), Column("probe stall"),
        Column("probe stall from", detail=True), Column("note", detail=True)], anchor="pauses")
    for pause in report.recoveries:
        gap_from = _since(pause, pause.guest_gap_start_ns)
        stall_from = _since(pause, pause.probe_stall_start_ns)
        table.rows.append([
            Cell(str(pause.number), numeric=True), Cell(pause.cause),
            Cell("-" if pause.fault is None else str(pause.fault)),
            *(_seconds(m, sources) for m in (pause.began, pause.both_paused, pause.recovered,
                                             pause.duration)),
            number(pause.attempts.value, sources.number(pause.attempts.source),
                   pause.attempts.source),
            Cell(pause.result, tone="ok" if pause.result == "recovered" else "bad"),
            _seconds(pause.guest_gap, sources, "≥ " if pause.guest_gap_open else ""),
            _from(gap_from), _seconds(pause.probe_stall, sources), _from(stall_from),
            Cell(pause.note)])
        table.notes.append(Note(_pause_sentence(report, pause, gap_from, stall_from),
                                compact=True))
    table.notes.append(Note(
        "both paused: both sides paused; guest gap: the longest silence between guest "
        "heartbeat arrivals (host clock) overlapping the pause, and when it began (≥: no "
        "heartbeat came after it before the run ended); probe stall: the longest stall the "
        "guest probe saw by its own clock overlapping it", "dim"))
    return table


def _pause_sentence(report: Report, pause: PauseRecord, gap_from: float | None,
                    stall_from: float | None) -> str:
    """``#N: cause, after which fault; note; where the guest's gaps began``: the detail
    columns of one pause in words."""
    parts = [pause.cause]
    fault = next((f for f in report.faults if f.index == pause.fault), None)
    if fault is not None and fault.kind != "migrate-pause" and fault.injected_ns:
        parts[0] += (f", {(pause.began_ns - fault.injected_ns) / 1e9:.1f} s after fault "
                     f"{fault.index} ({fault.kind})")
    if pause.note:
        parts.append(pause.note)
    seen = [f"{name} from {start:.3f} s" for name, start in (
        ("guest gap", gap_from), ("probe stall", stall_from)) if start is not None]
    if seen:
        parts.append(", ".join(seen))
    return f"#{pause.number}: " + "; ".join(parts)


def fault_table(report: Report, sources: Sources) -> Table:
    """Each [[faults]] entry: what, where, when it was due, injected and cleared."""
    table = Table("Faults injected, s since migrate", [
        Column("#", numeric=True), Column("kind"), Column("target"), Column("due"),
        Column("duration", "s", numeric=True), Column("injected"), Column("cleared"),
        Column("status")], anchor="faults")
    for fault in report.faults:
        missing = fault.status in ("not injected", "not recorded")
        table.rows.append([
            Cell(str(fault.index), numeric=True), Cell(fault.kind), Cell(fault.target),
            Cell(fault.due), number(fault.duration_s), _seconds(fault.injected, sources),
            _seconds(fault.cleared, sources), Cell(fault.status, tone="warn" if missing else "")])
    table.notes.append(Note("due: the phase the fault waited for, plus after_ms", "dim"))
    table.notes += [Note(f"#{fault.index} {fault.status}: {fault.reason}")
                    for fault in report.faults if fault.reason]
    return table
