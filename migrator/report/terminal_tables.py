"""The report's tables as an 80-column terminal shows them, built once from a Report.

Narrower than the HTML page's (:mod:`migrator.report.run_tables`): fewer
columns, values to about three significant digits with the unit in the title,
sources cited as ``[n]`` marks whose legend ends the report.  The terminal
(:mod:`migrator.report.terminal`) draws them in order: :func:`leading_tables`,
the HGM block, then :func:`trailing_tables` (sources are numbered in that order).
"""

from __future__ import annotations

from migrator.model import (
    FaultRecord,
    GuestClockSteps,
    LatencyDistComparison,
    Metric,
    PauseRecord,
    Report,
)
from migrator.report.sources import Sources
from migrator.tables import Cell, Column, Note, Table
from migrator.units import format_size

__all__ = ["fmt", "leading_tables", "num", "size_of", "trailing_tables"]


def fmt(metric: Metric | None, digits: int = 3) -> str:
    """A metric's value with its unit, or '-' when unknown; a contradicted one says by what."""
    if metric is None or metric.value is None:
        return "-"
    value = metric.value
    text = f"{value:,}" if isinstance(value, int) else f"{value:,.{digits}f}"
    text = f"{text} {metric.unit}".rstrip()
    if metric.contradicted_by is not None:
        text += f" (contradicted: {fmt(metric.contradicted_by, digits)})"
    return text


def num(metric: Metric | None) -> str:
    """A metric's value alone (the unit is in the table's title)."""
    if metric is None or metric.value is None:
        return "-"
    value = metric.value
    if isinstance(value, int):
        return f"{value:,}"
    # Three significant digits or so: latencies span 10 us to seconds.
    return f"{value:,.0f}" if value >= 100 else f"{value:.3g}"


def size_of(metric: Metric) -> str:
    """A size metric's value in binary units, or '-' when it is not a whole byte count."""
    return format_size(metric.value) if isinstance(metric.value, int) else "-"


def _seconds(metric: Metric) -> str:
    """A time in s to the ms, or '-'."""
    return "-" if metric.value is None else f"{metric.value:,.3f}"


def _us(micros: int) -> str:
    """A bucket bound in us, ms or s (bounds are powers of two: three digits suffice)."""
    if micros < 1000:
        return f"{micros} us"
    if micros < 1_000_000:
        return f"{micros / 1e3:.3g} ms"
    return f"{micros / 1e6:.3g} s"


def _columns(headers: tuple[str, ...], left: tuple[str, ...], unit: str = "") -> list[str]:
    """Columns named ``headers``: those in ``left`` hold text, the others numbers in ``unit``."""
    return [Column(h) if h in left else Column(h, unit, numeric=True) for h in headers]


def _value(metric: Metric) -> Cell:
    """A metric's value with its unit (:func:`fmt`), a warning when contradicted."""
    return Cell(fmt(metric), numeric=True, tone="" if metric.contradicted_by is None else "warn")


def metrics_table(title: str, metrics: dict[str, Metric], sources: Sources) -> Table:
    """One row per metric: name, value with unit, cited source."""
    table = Table(title, [Column("metric"), Column("value", numeric=True),
                          Column("src", tone="dim")])
    for name, metric in metrics.items():
        table.rows.append([Cell(name), _value(metric), Cell(sources.cite(metric))])
    return table


def leading_tables(report: Report, sources: Sources) -> list[Table]:
    """Post-copy pauses, injected faults and fetch latency: what comes before HGM."""
    tables = []
    if report.recoveries:
        tables.append(pause_table(report, sources))
    if report.faults:
        tables.append(fault_table(report.faults, sources))
    if report.fetch:
        tables.append(fetch_table(report, sources))
    return tables


def trailing_tables(report: Report, sources: Sources) -> list[Table]:
    """Freeze, guest stalls, outside view, headline metrics, QEMU vs trace, comparisons."""
    tables = []
    if report.freeze is not None:
        tables.append(metrics_table("Freeze", {
            "source STOP -> destination RESUME": report.freeze.freeze,
            "QEMU's reported downtime": report.freeze.qemu_downtime,
        }, sources))
    if report.guest_stalls:
        tables.append(stall_table(report, sources))
    if report.guest_clock_steps is not None and report.guest_clock_steps.steps:
        tables.append(clock_step_table(report.guest_clock_steps, sources))
    outside = report.outside_stalls
    if outside is not None:
        table = metrics_table(
            f"Stalls seen from outside: heartbeat gaps ({outside.heartbeats:,} heartbeats, "
            f"{outside.lost} lost, period {outside.period_ms:g} ms)",
            {"max gap": outside.max_gap, "p99 gap": outside.p99_gap}, sources)
        if outside.worst:
            worst = ", ".join(f"{s.duration_ms:,.1f} ms ({s.phase})" for s in outside.worst[:5])
            table.notes.append(Note(f"worst gaps: {worst}"))
        tables.append(table)
    for title, metrics in (("Blocktime", report.blocktime), ("Timings", report.timings),
                           ("Transfer", report.transfer)):
        if metrics:
            tables.append(metrics_table(title, metrics, sources))
    if report.qemu_latency:
        tables.append(metrics_table("QEMU's own post-copy latency", report.qemu_latency,
                                    sources))
    if report.latency_dist_comparison is not None:
        tables.append(latency_dist_table(report.latency_dist_comparison))
    if report.comparisons:
        tables.append(comparison_table(report, sources))
    return tables


def pause_table(report: Report, sources: Sources) -> Table:
    """One row per post-copy pause (times since migrate), then a line on each: why, what failed."""
    pauses = report.recoveries
    first = pauses[0]
    # One-word headers, sources in the title: 80 columns hold the table uncut.
    table = Table(f"Post-copy pauses and recoveries, s since migrate "
                  f"{sources.cite(first.began)}; gap {sources.cite(first.guest_gap)}, "
                  f"stall {sources.cite(first.probe_stall)}, "
                  f"tries {sources.cite(first.attempts)}",
                  _columns(("#", "began", "paused", "recovered", "took", "tries", "result",
                            "gap", "stall"), left=("result",), unit="s"), fit=True)
    for pause in pauses:
        table.rows.append([
            *(Cell(text, numeric=True) for text in (
                str(pause.number), _seconds(pause.began), _seconds(pause.both_paused),
                _seconds(pause.recovered), _seconds(pause.duration), num(pause.attempts))),
            Cell(pause.result, tone="ok" if pause.result == "recovered" else "bad"),
            Cell((">" if pause.guest_gap_open else "") + _seconds(pause.guest_gap),
                 numeric=True),
            Cell(_seconds(pause.probe_stall), numeric=True)])
    injected = {f.index: f for f in report.faults}
    for pause in pauses:
        parts = [pause.cause]
        fault = injected.get(pause.fault) if pause.fault is not None else None
        if fault is not None and fault.kind != "migrate-pause" and fault.injected_ns:
            parts[0] += (f", {(pause.began_ns - fault.injected_ns) / 1e9:.1f} s after fault "
                         f"{fault.index} ({fault.kind})")
        if pause.note:
            parts.append(pause.note)
        seen = [f"{name} from {start:.3f} s" for name, start in (
            ("guest gap", _since(pause, pause.guest_gap_start_ns)),
            ("probe stall", _since(pause, pause.probe_stall_start_ns))) if start is not None]
        if seen:
            parts.append(", ".join(seen))
        table.notes.append(Note(f"#{pause.number}: " + "; ".join(parts)))
    table.notes.append(Note(
        "paused: both sides paused; gap: the longest silence between guest heartbeats (host "
        "clock) overlapping the pause ('>': no heartbeat came after it); stall: the longest "
        "stall the guest probe saw by its own clock overlapping it", "dim"))
    return table


def _since(pause: PauseRecord, start_ns: int | None) -> float | None:
    """``start_ns`` in s since migrate, through the pause's own start (None if unknown)."""
    if start_ns is None or pause.began.value is None:
        return None
    return pause.began.value + (start_ns - pause.began_ns) / 1e9


def fault_table(faults: list[FaultRecord], sources: Sources) -> Table:
    """One row per [[faults]] entry: what, where, when it was due, injected and cleared."""
    table = Table(f"Faults injected, s since migrate {sources.cite(faults[0].injected)}",
                  _columns(("#", "kind", "target", "due", "injected", "cleared", "status"),
                           left=("kind", "target", "due", "status"), unit="s"))
    for fault in faults:
        kind = fault.kind if fault.duration_s is None else f"{fault.kind} {fault.duration_s:g} s"
        missing = fault.status in ("not injected", "not recorded")
        table.rows.append([
            Cell(str(fault.index), numeric=True), Cell(kind), Cell(fault.target),
            Cell(fault.due), Cell(_seconds(fault.injected), numeric=True),
            Cell(_seconds(fault.cleared), numeric=True),
            Cell(fault.status, tone="warn" if missing else "")])
    table.notes += [Note(f"#{fault.index} {fault.status}: {fault.reason}")
                    for fault in faults if fault.reason]
    return table


def fetch_table(report: Report, sources: Sources) -> Table:
    """Fetch latency percentiles of each RAMBlock that took faults, in ms."""
    latency = report.fetch[0].latency_ms["max"]
    title = f"Per-page fetch latency, ms {sources.cite(latency)}"
    # Reports written before the backlog existed have none. Only its p50 here, to fit
    # 80 columns; report.json and the HTML page also have p90 and max.
    ahead = report.fetch[0].backlog_placements.get("p50")
    backlog = f"backlog\np50 {sources.cite(ahead)}" if ahead else "backlog\np50"
    keys = ("p50", "p90", "p99", "p99.9", "max")
    table = Table(title, [
        Column("ramblock"), Column("page", numeric=True), Column("faults", numeric=True),
        *(Column(key, "ms", latency.source, numeric=True) for key in keys),
        Column(backlog, "placements", "" if ahead is None else ahead.source, numeric=True),
        Column("placed at", numeric=True)])
    for block in report.fetch:
        if not block.faults:
            continue
        table.rows.append([
            Cell(block.ramblock), Cell(format_size(block.page_size), numeric=True),
            Cell(f"{block.faults:,}", numeric=True),
            *(Cell(num(block.latency_ms.get(key)), numeric=True) for key in keys),
            Cell(num(block.backlog_placements.get("p50")), numeric=True),
            Cell(format_size(block.placement_granularity) if block.placement_granularity
                 else "-", numeric=True)])
    quiet = [block for block in report.fetch if not block.faults]
    if quiet:
        pages = sum(block.pages_placed_background for block in quiet)
        table.notes.append(Note(f"{len(quiet)} other RAMBlocks took no faults ({pages:,} pages "
                                "arrived in the background)"))
    return table


def stall_table(report: Report, sources: Sources) -> Table:
    """Each vCPU's stalls by the guest's own clock, in ms."""
    first = report.guest_stalls[0]
    table = Table(f"vCPU stalls by the guest's own clock, ms {sources.cite(first.max_ms)}",
                  _columns(("vCPU", "stalls", "max", "p99 gap", "total", "stalls by phase"),
                           left=("stalls by phase",), unit="ms"))
    for vcpu in report.guest_stalls:
        table.rows.append([
            *(Cell(text, numeric=True) for text in (
                str(vcpu.vcpu), str(vcpu.stalls), num(vcpu.max_ms), num(vcpu.p99_ms),
                num(vcpu.total_stalled_ms))),
            Cell(", ".join(f"{k} {v}" for k, v in vcpu.by_phase.items()))])
    return table


def clock_step_table(steps: GuestClockSteps, sources: Sources) -> Table:
    """The guest clock's steps: not stalls, so apart from the stall table."""
    # A short title: rich wraps it to the table's width.
    table = Table(f"Guest clock steps, not stalls: {steps.count.value} "
                  f"{sources.cite(steps.count)}, largest back "
                  f"{num(steps.largest_back)} ms {sources.cite(steps.largest_back)}",
                  _columns(("vCPU", "step, ms", "phase", "reported as", "src"),
                           left=("phase", "reported as")))
    for step in steps.steps:
        table.rows.append([Cell(str(step.vcpu), numeric=True), Cell(num(step.step), numeric=True),
                           Cell(step.phase), Cell(step.reported_as),
                           Cell(sources.cite(step.step), numeric=True)])
    table.notes.append(Note("step < 0: the guest's CLOCK_MONOTONIC went back; largest steps "
                            "first", "dim"))
    return table


def latency_dist_table(dist: LatencyDistComparison) -> Table:
    """QEMU's latency buckets next to the trace's, from the first to the last non-empty one."""
    # A short title: rich wraps it to the table's width.
    table = Table("Fault latency buckets: QEMU vs trace",
                  _columns(("latency", "QEMU", "trace", "trace - QEMU"), left=("latency",),
                           unit="faults"))
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


def comparison_table(report: Report, sources: Sources) -> Table:
    """Quantities two sources measure, side by side, with their difference."""
    table = Table("Where two sources measure the same thing",
                  _columns(("quantity", "A", "B", "B - A"), left=("quantity",)))
    for c in report.comparisons:
        diff = "-" if c.difference is None else f"{c.difference:,.3f} {c.a.unit}"
        table.rows.append([
            Cell(c.quantity),
            *(Cell(f"{fmt(m)} {sources.cite(m)}", numeric=True,
                   tone="" if m.contradicted_by is None else "warn") for m in (c.a, c.b)),
            Cell(diff, numeric=True)])
    table.notes += [Note(f"{c.quantity}: {c.note}", "dim") for c in report.comparisons if c.note]
    return table
