"""The run report's tables, built once from a :class:`~migrator.model.Report`.

The HTML run page (:mod:`migrator.report.html`) and the dashboard's run pages
(:mod:`migrator.dashboard.run_pages`) draw them: headline metrics, fetch
latency per RAMBlock, guest stalls, comparisons, pauses, faults, phases and the
facts of ``run.json``.  Every value cites its source through one
:class:`~migrator.report.sources.Sources` per page.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from datetime import UTC, datetime
from typing import Any

from migrator.model import Metric, Report
from migrator.pagedata import Clock
from migrator.report.sources import Sources
from migrator.tables import Cell, Column, Note, Table
from migrator.units import format_size, format_value

__all__ = ["comparison_table", "environment_line", "facts_table", "fault_table", "fetch_table",
           "headline_tables", "iso_time", "pause_table", "phase_table", "stall_tables"]

S = 1e9


def _contradiction(metric: Metric) -> str:
    """`` ⚠ contradicted: VALUE UNIT`` when another source rules the value out, else ''."""
    other = metric.contradicted_by
    return "" if other is None else \
        f" ⚠ contradicted: {format_value(other.value, other.unit)} {other.unit}"


def _metric_row(name: str, metric: Metric, sources: Sources) -> list[Cell]:
    # A contradicted value cites what contradicts it; the src column cites the value's own.
    other = metric.contradicted_by
    value = Cell(format_value(metric.value, metric.unit) + _contradiction(metric),
                 None if other is None else sources.number(other.source),
                 "" if other is None else f"contradicted by {other.source}", numeric=True)
    return [Cell(name), value, Cell(metric.unit),
            Cell("", source=sources.number(metric.source), title=metric.source)]


def headline_tables(report: Report, sources: Sources) -> list[Table]:
    """Headline metrics, each with its unit and cited source."""
    columns = ["metric", "value", "unit", "src"]
    tables = []
    timings = Table.of("Timings", columns)
    for name, metric in report.timings.items():
        timings.rows.append(_metric_row(name, metric, sources))
    if report.freeze is not None:
        timings.rows.append(_metric_row("freeze (src STOP → dst RESUME)", report.freeze.freeze,
                                        sources))
        timings.rows.append(_metric_row("QEMU downtime", report.freeze.qemu_downtime, sources))
    tables.append(timings)
    transfer = Table.of("Transfer", columns,
                     [_metric_row(n, m, sources) for n, m in report.transfer.items()])
    tables.append(transfer)
    blocktime = Table.of("Blocktime", columns,
                      [_metric_row(n, m, sources) for n, m in report.blocktime.items()])
    blocktime.rows += [_metric_row(n, m, sources) for n, m in report.qemu_latency.items()]
    tables.append(blocktime)
    outside = report.outside_stalls
    if outside is not None:
        tables.append(Table.of("Outside view of the guest (heartbeats)", columns, [
            [Cell("heartbeats"), Cell(format_value(outside.heartbeats), numeric=True), Cell(""),
             Cell("")],
            [Cell("lost"), Cell(format_value(outside.lost), numeric=True), Cell(""), Cell("")],
            [Cell("period"), Cell(format_value(outside.period_ms), numeric=True), Cell("ms"),
             Cell("")],
            _metric_row("max gap", outside.max_gap, sources),
            _metric_row("p99 gap", outside.p99_gap, sources),
            [Cell("gaps over period + threshold"), Cell(format_value(outside.gaps_over_threshold),
                                                          numeric=True), Cell(""), Cell("")],
        ]))
    if report.integrity:
        tables.append(Table.of("Memory integrity (guest verify)", ["field", "value"], [
            [Cell(str(k)), Cell(json.dumps(v) if isinstance(v, list | dict) else format_value(v),
                                numeric=isinstance(v, int | float))]
            # "t" is the probe line's type tag, not a finding.
            for k, v in report.integrity.items() if k != "t"
        ]))
    return tables


def _backlog_cell(backlog: dict[str, Metric], sources: Sources) -> Cell:
    """``p50 / max`` placements queued ahead of a requested page, citing their source."""
    p50, top = backlog.get("p50"), backlog.get("max")
    # No faults, or a report written before the backlog existed.
    if p50 is None or top is None or top.value is None:
        return Cell("-", numeric=True)
    return Cell(f"{format_value(p50.value)} / {format_value(top.value)}",
                sources.number(top.source), top.source, numeric=True)


def fetch_table(report: Report, sources: Sources) -> Table:
    """Per-RAMBlock fetch latency percentiles and page counts."""
    keys = ("p50", "p90", "p99", "p99.9", "max", "mean")
    first = report.fetch[0].latency_ms.get("max") if report.fetch else None
    source = "" if first is None else first.source
    table = Table.of("Fetch latency per RAMBlock, ms", [
        "RAMBlock", "page", "faults", "resolved", "unresolved",
        *(Column(key, "ms", source) for key in keys),
        Column("backlog p50 / max, placements", "placements"),
        "placed (requested / background / zero)", "placed at", "src"], anchor="fetch")
    for block in report.fetch:
        any_metric = block.latency_ms.get("max")
        # Cited before the backlog's source, so the latency's footnote comes first.
        src = Cell("") if any_metric is None else Cell("", sources.number(any_metric.source),
                                                       any_metric.source)
        table.rows.append([
            Cell(block.ramblock), Cell(format_size(block.page_size)),
            *(Cell(format_value(v), numeric=True)
              for v in (block.faults, block.resolved, block.unresolved)),
            *(Cell(format_value(block.latency_ms[k].value if k in block.latency_ms else None),
                   numeric=True) for k in keys),
            _backlog_cell(block.backlog_placements, sources),
            Cell(f"{block.pages_placed_requested:,} / {block.pages_placed_background:,} / "
                 f"{block.zero_pages:,}", numeric=True),
            Cell("-" if block.placement_granularity is None
                 else format_size(block.placement_granularity)),
            src,
        ])
    if not report.fetch:
        table.notes.append(Note("no destination trace in this run"))
    return table


def stall_tables(report: Report, sources: Sources, clock: Clock) -> list[Table]:
    """Per-vCPU guest stall summary and the worst stalls of both views."""
    per_vcpu = Table.of("Guest stalls per vCPU", [
        "vCPU", "stalls", "max, ms", "p99, ms", "total, ms", "by phase", "src"])
    for vcpu in report.guest_stalls:
        per_vcpu.rows.append([
            Cell(str(vcpu.vcpu)), Cell(format_value(vcpu.stalls), numeric=True),
            Cell(format_value(vcpu.max_ms.value), numeric=True),
            Cell(format_value(vcpu.p99_ms.value), numeric=True, title=vcpu.p99_ms.source),
            Cell(format_value(vcpu.total_stalled_ms.value), numeric=True),
            Cell(", ".join(f"{k} {v}" for k, v in vcpu.by_phase.items())),
            Cell("", sources.number(vcpu.max_ms.source), vcpu.max_ms.source),
        ])
    worst = Table.of("Worst stalls by the guest clock", ["t, s", "duration, ms", "vCPU", "phase"],
                  note="t: host wall clock, placed through the heartbeat before the stall")
    for stall in report.worst_guest_stalls:
        worst.rows.append([
            Cell(format_value(round(clock.s(stall.host_ns), 4)) if stall.host_ns else "-",
                 numeric=True),
            Cell(format_value(stall.duration_ms), numeric=True),
            Cell("-" if stall.vcpu is None else str(stall.vcpu)), Cell(stall.phase)])
    outside = Table.of("Worst heartbeat gaps (outside view)", ["t, s", "duration, ms", "phase"],
                    note="t: host wall clock at the heartbeat that opened the gap")
    if report.outside_stalls is not None:
        for stall in report.outside_stalls.worst:
            outside.rows.append([
                Cell(format_value(round(clock.s(stall.host_ns), 4)), numeric=True),
                Cell(format_value(stall.duration_ms), numeric=True), Cell(stall.phase)])
    tables = [per_vcpu, worst, outside]
    steps = report.guest_clock_steps
    if steps is not None and steps.steps:
        table = Table.of(f"Guest clock steps, not stalls: {format_value(steps.count.value)} "
                      f"[{sources.number(steps.count.source)}], largest back "
                      f"{format_value(steps.largest_back.value)} ms "
                      f"[{sources.number(steps.largest_back.source)}]",
                      ["t, s", "step, ms", "vCPU", "phase", "reported as", "src"],
                      note="step < 0: the guest's CLOCK_MONOTONIC went back; largest steps "
                           "first; t: host wall clock, placed through the heartbeat before it")
        for step in steps.steps:
            table.rows.append([
                Cell(format_value(round(clock.s(step.host_ns), 4)) if step.host_ns else "-",
                     numeric=True),
                Cell(format_value(step.step.value), numeric=True), Cell(str(step.vcpu)),
                Cell(step.phase), Cell(step.reported_as),
                Cell("", sources.number(step.step.source), step.step.source)])
        tables.append(table)
    return tables


def comparison_table(report: Report, sources: Sources) -> Table:
    """Quantities measured by two sources, side by side."""
    table = Table.of("Comparisons: one quantity, two sources",
                  ["quantity", "a", "b", "b - a", "note"], anchor="comparisons")
    for comp in report.comparisons:
        table.rows.append([
            Cell(comp.quantity), *(_compared(metric, sources) for metric in (comp.a, comp.b)),
            Cell(format_value(comp.difference), numeric=True), Cell(comp.note)])
    return table


def _compared(metric: Metric, sources: Sources) -> Cell:
    """One side of a comparison: value and unit citing its source (and what contradicts it)."""
    other = metric.contradicted_by
    return Cell(f"{format_value(metric.value, metric.unit)} {metric.unit}{_contradiction(metric)}",
                sources.number(metric.source),
                metric.source + ("" if other is None else f"; contradicted by {other.source}"),
                numeric=True)


def _at(clock: Clock, ns: int | None, metric: Metric, sources: Sources) -> Cell:
    """An instant in s on the page's time axis, citing the metric's source."""
    if ns is None:
        return Cell("-", numeric=True)
    return Cell(f"{clock.s(ns):.3f}", sources.number(metric.source), metric.source, numeric=True)


def pause_table(report: Report, sources: Sources, clock: Clock) -> Table:
    """Each post-copy pause: cause, times on the page's axis, attempts, what the guest saw."""
    table = Table.of("Post-copy pauses and recoveries", [
        "#", "cause", "after fault", "began, s", "both paused, s", "recovered, s", "took, s",
        "attempts", "result", "guest gap, s", "probe stall, s", "note"], anchor="pauses",
        note="t: the page's time axis. Guest gap: the longest silence between guest heartbeat "
             "arrivals (host clock) overlapping the pause, and when it began (≥: no heartbeat "
             "came after it before the run ended); probe stall: the longest stall the guest "
             "probe saw by its own clock overlapping it.")
    for pause in report.recoveries:
        stalls = []
        for metric, start, open_ in ((pause.guest_gap, pause.guest_gap_start_ns,
                                      pause.guest_gap_open),
                                     (pause.probe_stall, pause.probe_stall_start_ns, False)):
            text = ("≥ " if open_ else "") + format_value(metric.value)
            if metric.value is not None and start is not None:
                text += f" from {clock.s(start):.3f}"
            stalls.append(Cell(text, sources.number(metric.source), metric.source, numeric=True))
        table.rows.append([
            Cell(str(pause.number), numeric=True), Cell(pause.cause),
            Cell("-" if pause.fault is None else str(pause.fault)),
            _at(clock, pause.began_ns, pause.began, sources),
            _at(clock, pause.both_paused_ns, pause.both_paused, sources),
            _at(clock, pause.recovered_ns, pause.recovered, sources),
            Cell(format_value(pause.duration.value), sources.number(pause.duration.source),
                 pause.duration.source, numeric=True),
            Cell(format_value(pause.attempts.value), sources.number(pause.attempts.source),
                 pause.attempts.source, numeric=True),
            Cell(pause.result), *stalls,
            Cell(pause.note)])
    return table


def fault_table(report: Report, sources: Sources, clock: Clock) -> Table:
    """Each [[faults]] entry: what, where, when it was due, when injected and cleared."""
    table = Table.of("Faults injected", [
        "#", "kind", "target", "due", "duration, s", "injected, s", "cleared, s", "status"],
        anchor="faults", note="due: the phase the fault waited for, plus after_ms")
    for fault in report.faults:
        status = fault.status if fault.reason is None else f"{fault.status}: {fault.reason}"
        table.rows.append([
            Cell(str(fault.index), numeric=True), Cell(fault.kind), Cell(fault.target),
            Cell(fault.due), Cell(format_value(fault.duration_s), numeric=True),
            _at(clock, fault.injected_ns, fault.injected, sources),
            _at(clock, fault.cleared_ns, fault.cleared, sources), Cell(status)])
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

