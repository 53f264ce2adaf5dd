"""The run report's tables, each defined once from a :class:`~migrator.model.Report`.

The terminal (:mod:`migrator.report.terminal`), the HTML run page
(:mod:`migrator.report.html`) and the dashboard's run pages
(:mod:`migrator.dashboard.run_pages`) draw these same tables, each the ones it
has room for: headline metrics (freeze, timings, transfer, blocktime, the
outside view of the guest's stalls, integrity), fetch latency per RAMBlock,
comparisons of two sources, QEMU's latency buckets next to the trace's, the
guest's stalls and clock steps, post-copy pauses and injected faults, and,
for the HTML page only, the phases and the facts of ``run.json``.  Every value
cites its source through one :class:`~migrator.report.sources.Sources` per
page; what a narrow terminal leaves out or rounds is marked in the model
(:mod:`migrator.tables`), never defined a second time.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from migrator.model import Metric, PauseRecord, Report
from migrator.pagedata import Clock
from migrator.report.sources import Sources
from migrator.tables import Cell, Column, Note, Row, Table
from migrator.units import flat_fields, format_size, format_value

__all__ = [
    "METRIC_COLUMNS",
    "blocktime_table",
    "clock_step_table",
    "comparison_table",
    "contradiction",
    "environment_line",
    "facts_table",
    "fault_table",
    "fetch_table",
    "freeze_table",
    "headline_tables",
    "integrity_table",
    "latency_dist_table",
    "metric_row",
    "metric_table",
    "number",
    "outside_table",
    "pause_table",
    "phase_table",
    "placement_table",
    "stall_tables",
    "thread_cpu_table",
    "vcpu_stall_table",
    "worst_gap_table",
    "worst_stall_table",
]

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


def thread_cpu_table(report: Report, sources: Sources) -> Table | None:
    """Host CPU time per QEMU thread kind, side and phase (None for runs without samples)."""
    if not report.thread_cpu:
        return None
    by_side = {row.side: row.sampled.source for row in report.thread_cpu}
    cited = " ".join(f"{side} [{sources.number(source)}]" for side, source in by_side.items())
    table = Table(f"Host CPU per QEMU thread, CPU s ({cited})", [
        Column("side"), Column("thread"),
        *(Column(header, "CPU s", numeric=True, rounded=True)
          # The windows are the driver's marks (migrate, postcopy-requested, finished), not
          # the phases of the event timeline: the headers say so.
          for header in ("migrate → switch", "switch → done", "sampled"))], anchor="threads")
    for row in report.thread_cpu:
        table.rows.append([Cell(row.side), Cell(row.thread),
                           *(number(metric.value) for metric in
                             (row.precopy, row.postcopy, row.sampled))])
    return table


def placement_table(report: Report, sources: Sources) -> Table | None:
    """Each QEMU thread's CPUs as ``[placement.*]`` wanted them and as read back, and the
    guest RAM's NUMA binding (None for runs without a placement)."""
    placement = report.placement
    if placement is None:
        return None
    table = Table(f"CPU and NUMA placement [{sources.number(placement.source)}]", [
        Column("side"), Column("thread"), Column("tid", numeric=True), Column("role"),
        Column("wanted CPUs"), Column("CPUs read back"), Column("set by")],
        anchor="placement")
    for thread in placement.threads:
        off = thread.cpus != thread.wanted
        table.rows.append([
            Cell(thread.side), Cell(thread.name), Cell(str(thread.tid), numeric=True),
            Cell(thread.role), Cell(thread.wanted),
            Cell(thread.cpus, tone="bad" if off else ""),
            Cell("migrator" if thread.pinned else "inherited")])
    for ram in placement.memory:
        pages = ", ".join(f"node {node}: {count}" for node, count in sorted(ram.pages.items()))
        size = f" of {format_size(ram.page_kib << 10)}" if ram.page_kib else ""
        table.notes.append(Note(
            f"{ram.side} guest RAM bound to node {ram.node}: policy {ram.policy or 'not found'}"
            + (f", pages{size} {pages}" if pages else ""),
            "" if ram.policy == f"bind:{ram.node}" else "warn"))
    table.notes.append(Note("inherited: the thread had its CPUs from QEMU's start (taskset -c), "
                            "which every thread QEMU creates inherits", "dim"))
    return table


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
              blocktime_table(report, sources), thread_cpu_table(report, sources),
              placement_table(report, sources), outside_table(report, sources),
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
        Column("backlog p50 (placements)", "placements", rounded=True),
        Column("backlog max (placements)", "placements", detail=True),
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
    value = "-" if metric.value is None else \
        f"{format_value(metric.value, metric.unit)} {metric.unit}".rstrip()
    return Cell(value + contradiction(metric),
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


# The guest's stalls and its clock's steps.  A ``t`` column places an event on the HTML
# page's time axis, so it is there only when a Clock is given (the terminal has none).

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


# Post-copy pauses and injected faults.  Times are the report's own, in s since the
# ``migrate`` mark: the HTML plots' t = 0 too, as their cited source says.

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
    if env.get("tuning"):
        parts.append(f"tuning {env['tuning']}")
    if env.get("placement"):
        parts.append(f"placement {env['placement']}")
    return " · ".join(parts)


def facts_table(meta: Mapping[str, Any]) -> Table:
    """Every field of ``run.json`` (host, QEMU, accelerator, plan, outcome), flattened."""
    return Table.of("Host and QEMU facts (run.json)", ["field", "value"],
                    [[Cell(k), Cell(v)] for k, v in flat_fields(meta)], anchor="facts")
