"""The run report's metric tables, each defined once from a :class:`~migrator.model.Report`.

The terminal (:mod:`migrator.report.terminal`), the HTML run page
(:mod:`migrator.report.html`) and the dashboard's run pages
(:mod:`migrator.dashboard.run_pages`) draw these same tables: headline metrics
(freeze, timings, transfer, blocktime, integrity), fetch latency per RAMBlock,
the outside view of the guest's stalls, comparisons of two sources, QEMU's
latency buckets next to the trace's, and, for the HTML page only, the phases
and the facts of ``run.json``.  The guest's own view of its stalls is
:mod:`migrator.report.stall_tables`', the pauses and faults
:mod:`migrator.report.recovery_tables`'.  Every value cites its source through
one :class:`~migrator.report.sources.Sources` per page; what a narrow terminal
leaves out is marked in the model (:mod:`migrator.tables`).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from datetime import UTC, datetime
from typing import Any

from migrator.model import Metric, Report
from migrator.pagedata import Clock
from migrator.report.sources import Sources
from migrator.tables import Cell, Column, Note, Row, Table
from migrator.units import format_size, format_value

__all__ = ["METRIC_COLUMNS", "blocktime_table", "comparison_table", "contradiction",
           "environment_line", "facts_table", "fetch_table", "freeze_table", "headline_tables",
           "integrity_table", "iso_time", "latency_dist_table", "metric_row", "metric_table",
           "number", "outside_table", "phase_table"]

S = 1e9

#: The columns of a table of metrics: name, value, unit, cited source.
METRIC_COLUMNS: list[str] = [Column("metric"), Column("value", numeric=True), Column("unit"),
                  Column("src", tone="dim")]


def number(value: float | None, source: int | None = None, title: str = "") -> Cell:
    """A cell holding a number (``-`` when unknown), its value kept for rounding."""
    return Cell(format_value(value), source, title, numeric=True, value=value)


def contradiction(metric: Metric) -> str:
    """`` ⚠ contradicted: VALUE UNIT`` when another source rules the value out, else ''."""
    other = metric.contradicted_by
    return "" if other is None else \
        f" ⚠ contradicted: {format_value(other.value, other.unit)} {other.unit}"


def metric_row(name: str, metric: Metric, sources: Sources) -> list[Cell]:
    """Name, value, unit and source of one metric; a contradicted value cites what
    contradicts it (the src column cites the value's own source)."""
    src = Cell("", sources.number(metric.source), metric.source)
    other = metric.contradicted_by
    value = Cell(format_value(metric.value, metric.unit) + contradiction(metric),
                 None if other is None else sources.number(other.source),
                 "" if other is None else f"contradicted by {other.source}", numeric=True,
                 tone="" if other is None else "warn")
    return [Cell(name), value, Cell(metric.unit), src]


def metric_table(title: str, metrics: Mapping[str, Metric], sources: Sources) -> Table:
    """One row per metric (:func:`metric_row`)."""
    return Table(title, list(METRIC_COLUMNS),
                 [metric_row(name, metric, sources) for name, metric in metrics.items()])


def freeze_table(report: Report, sources: Sources) -> Table | None:
    """The freeze by QMP events next to QEMU's own downtime."""
    if report.freeze is None:
        return None
    return metric_table("Freeze", {"freeze (src STOP → dst RESUME)": report.freeze.freeze,
                                   "QEMU downtime": report.freeze.qemu_downtime}, sources)


def blocktime_table(report: Report, sources: Sources) -> Table:
    """QEMU's and the trace's blocktime, then QEMU's own post-copy latency (>= 10.1)."""
    return metric_table("Blocktime", {**report.blocktime, **report.qemu_latency}, sources)


def integrity_table(report: Report) -> Table | None:
    """The guest's verify line, field by field."""
    if not report.integrity:
        return None
    return Table.of("Memory integrity (guest verify)", ["field", "value"], [
        [Cell(str(k)), Cell(json.dumps(v) if isinstance(v, list | dict) else format_value(v),
                            numeric=isinstance(v, int | float))]
        # "t" is the probe line's type tag, not a finding.
        for k, v in report.integrity.items() if k != "t"])


def headline_tables(report: Report, sources: Sources) -> list[Table]:
    """Headline metrics, each with its unit and cited source, and the outside view."""
    tables = [freeze_table(report, sources),
              metric_table("Timings", report.timings, sources),
              metric_table("Transfer", report.transfer, sources),
              blocktime_table(report, sources), outside_table(report, sources),
              integrity_table(report)]
    return [table for table in tables if table is not None]


def outside_table(report: Report, sources: Sources) -> Table | None:
    """Stalls as the controller saw them: gaps between heartbeat arrivals (host clock)."""
    outside = report.outside_stalls
    if outside is None:
        return None
    return Table("Stalls seen from outside: heartbeat gaps", list(METRIC_COLUMNS), [
        [Cell("heartbeats"), number(outside.heartbeats), Cell(""), Cell("")],
        [Cell("lost"), number(outside.lost), Cell(""), Cell("")],
        [Cell("period"), number(outside.period_ms), Cell("ms"), Cell("")],
        metric_row("max gap", outside.max_gap, sources),
        metric_row("p99 gap", outside.p99_gap, sources),
        [Cell("gaps over period + threshold"), number(outside.gaps_over_threshold), Cell(""),
         Cell("")]])


def fetch_table(report: Report, sources: Sources) -> Table:
    """Per-RAMBlock fetch latency percentiles, backlog and page counts; RAMBlocks
    without faults are detail, summed up in a compact note."""
    keys = ("p50", "p90", "p99", "p99.9", "max")
    first = report.fetch[0].latency_ms.get("max") if report.fetch else None
    source = "" if first is None else first.source
    table = Table("Per-page fetch latency per RAMBlock, ms", [
        Column("RAMBlock"), Column("page", numeric=True), Column("faults", numeric=True),
        Column("resolved", detail=True), Column("unresolved", detail=True),
        *(Column(key, "ms", source, rounded=True) for key in keys),
        Column("mean", "ms", source, detail=True, rounded=True),
        Column("backlog p50", "placements", rounded=True),
        Column("backlog max", "placements", detail=True),
        Column("placed (requested / background / zero)", detail=True),
        Column("placed at", numeric=True), Column("src", tone="dim")], anchor="fetch")
    for block in report.fetch:
        latency = block.latency_ms.get("max")
        # Cited before the backlog's source, so the latency's footnote comes first.
        src = Cell("") if latency is None else Cell("", sources.number(latency.source),
                                                    latency.source)
        table.rows.append(Row([
            Cell(block.ramblock), Cell(format_size(block.page_size), numeric=True),
            *(number(v) for v in (block.faults, block.resolved, block.unresolved)),
            *(_metric_number(block.latency_ms.get(k)) for k in (*keys, "mean")),
            *(_backlog(block.backlog_placements.get(k), sources) for k in ("p50", "max")),
            Cell(f"{block.pages_placed_requested:,} / {block.pages_placed_background:,} / "
                 f"{block.zero_pages:,}", numeric=True),
            Cell("-" if block.placement_granularity is None
                 else format_size(block.placement_granularity), numeric=True),
            src], detail=not block.faults))
    quiet = [block for block in report.fetch if not block.faults]
    if quiet:
        pages = sum(block.pages_placed_background for block in quiet)
        table.notes.append(Note(f"{len(quiet)} other RAMBlocks took no faults ({pages:,} "
                                "pages arrived in the background)", compact=True))
    if not report.fetch:
        table.notes.append(Note("no destination trace in this run"))
    return table


def _metric_number(metric: Metric | None) -> Cell:
    return number(None if metric is None else metric.value)


def _backlog(metric: Metric | None, sources: Sources) -> Cell:
    """Placements queued ahead of a requested page, citing their source; '-' for a
    report written before the backlog existed, or a block without faults."""
    if metric is None or metric.value is None:
        return number(None)
    return number(metric.value, sources.number(metric.source), metric.source)


def comparison_table(report: Report, sources: Sources) -> Table:
    """Quantities two sources measure, side by side, with their difference and why
    they can differ (a detail column, a compact note each)."""
    table = Table("Where two sources measure the same thing", [
        Column("quantity"), Column("A", numeric=True), Column("B", numeric=True),
        Column("B - A", numeric=True), Column("note", detail=True)], anchor="comparisons")
    for comp in report.comparisons:
        diff = "-" if comp.difference is None else \
            f"{format_value(comp.difference)} {comp.a.unit}".rstrip()
        table.rows.append([Cell(comp.quantity), *(_compared(m, sources) for m in (comp.a, comp.b)),
                           Cell(diff, numeric=True), Cell(comp.note)])
    table.notes += [Note(f"{c.quantity}: {c.note}", "dim", compact=True)
                    for c in report.comparisons if c.note]
    return table


def _compared(metric: Metric, sources: Sources) -> Cell:
    """One side of a comparison: value and unit citing its source (and what contradicts it)."""
    other = metric.contradicted_by
    return Cell(f"{format_value(metric.value, metric.unit)} {metric.unit}"
                f"{contradiction(metric)}".rstrip(),
                sources.number(metric.source),
                metric.source + ("" if other is None else f"; contradicted by {other.source}"),
                numeric=True, tone="" if other is None else "warn")


def _us(micros: int) -> str:
    """A bucket bound in us, ms or s (bounds are powers of two: three digits suffice)."""
    if micros < 1000:
        return f"{micros} us"
    if micros < 1_000_000:
        return f"{micros / 1e3:.3g} ms"
    return f"{micros / 1e6:.3g} s"


def latency_dist_table(report: Report) -> Table | None:
    """QEMU's latency buckets next to the trace's, from the first to the last non-empty one."""
    dist = report.latency_dist_comparison
    if dist is None:
        return None
    table = Table("Fault latency buckets: QEMU vs trace", [
        Column("latency"), *(Column(h, "faults", numeric=True)
                             for h in ("QEMU", "trace", "trace - QEMU"))], anchor="buckets")
    used = [i for i, row in enumerate(dist.rows) if row.qemu_count or row.trace_count]
    for row in dist.rows[used[0]:used[-1] + 1] if used else []:
        span = (f">= {_us(row.bucket_us_low)}" if row.bucket_us_high is None
                else f"{_us(row.bucket_us_low)} - {_us(row.bucket_us_high)}")
        table.rows.append([Cell(span), *(Cell(text, numeric=True) for text in (
            f"{row.qemu_count:,}", f"{row.trace_count:,}",
            f"{row.trace_count - row.qemu_count:+,}"))])
    worst = dist.largest_disagreement
    largest = "none" if worst is None else (
        f"{worst.trace_count - worst.qemu_count:+,} at {_us(worst.bucket_us_low)}")
    table.notes += [
        Note(f"totals: QEMU {dist.qemu_total:,}, trace {dist.trace_total:,} resolved of "
             f"{dist.trace_requests:,} requests; largest disagreement {largest}; at least "
             f"{dist.faults_in_other_buckets:,} faults in other buckets"),
        Note(f"QEMU: {dist.qemu_source}; trace: {dist.trace_source}. {dist.note}", "dim")]
    return table


def phase_table(report: Report, clock: Clock) -> Table:
    """The phases of the run with their times relative to the origin."""
    table = Table.of("Phases (host wall clock)", ["phase", "start, s", "end, s", "duration, ms"])
    for phase in report.phases:
        table.rows.append([
            Cell(phase.name), Cell(f"{clock.s(phase.start_ns):.4f}", numeric=True),
            Cell("-" if phase.end_ns is None else f"{clock.s(phase.end_ns):.4f}", numeric=True),
            Cell(format_value(None if phase.duration_ms is None else round(phase.duration_ms, 3)),
                 numeric=True)])
    return table


def environment_line(report: Report) -> str:
    """The run's setup in one line: QEMU, accelerator, backing, size, post-copy options."""
    env = report.environment
    switchover = env.get("switchover") or {}
    policy = switchover.get("policy") if isinstance(switchover, dict) else switchover
    parts = [
        f"QEMU {format_value(env.get('qemu_version'))}", f"accel {format_value(env.get('accel'))}",
        f"backing {format_value(env.get('backing'))}", f"{format_value(env.get('memory_mib'))} MiB",
        f"{format_value(env.get('vcpus'))} vCPU", f"post-copy {format_value(env.get('postcopy'))}",
        f"preempt {format_value(env.get('preempt'))}", f"switchover {format_value(policy)}",
        f"host kernel {format_value(env.get('host_kernel'))}",
        f"guest kernel {format_value(env.get('guest_kernel'))}",
    ]
    return " · ".join(parts)


def iso_time(ns: int) -> str:
    """Epoch ``ns`` as an ISO 8601 UTC time to the millisecond."""
    return datetime.fromtimestamp(ns / S, UTC).isoformat(timespec="milliseconds")


def _flatten(prefix: str, value: Any) -> Iterable[tuple[str, str]]:
    if isinstance(value, dict):
        for key, inner in value.items():
            yield from _flatten(f"{prefix}.{key}" if prefix else str(key), inner)
    elif isinstance(value, list):
        if all(not isinstance(v, dict | list) for v in value):
            yield prefix, ", ".join(str(v) for v in value) if value else "(none)"
        else:
            for index, inner in enumerate(value):
                yield from _flatten(f"{prefix}[{index}]", inner)
    elif isinstance(value, int) and not isinstance(value, bool) and prefix.endswith("_ns") \
            and value > 10**17:
        yield prefix, f"{value} ({iso_time(value)})"
    else:
        yield prefix, format_value(value) if isinstance(value, bool) else \
            "null" if value is None else str(value)


def facts_table(meta: Mapping[str, Any]) -> Table:
    """Every field of ``run.json`` (host, QEMU, accelerator, plan, outcome), flattened."""
    return Table.of("Host and QEMU facts (run.json)", ["field", "value"],
                    [[Cell(k), Cell(v)] for k, v in _flatten("", meta)], anchor="facts")
