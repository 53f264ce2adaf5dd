"""The report as rich tables on a terminal."""

from __future__ import annotations

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from migrator.model import (
    FaultRecord,
    GuestClockSteps,
    HgmSection,
    LatencyDistComparison,
    Metric,
    PauseRecord,
    Report,
)
from migrator.outcome import severity
from migrator.report.sources import Sources
from migrator.units import format_size

__all__ = ["render_report"]

#: The colour of each outcome severity (migrator.outcome.severity).
SEVERITY_STYLES = {"ok": "green", "warn": "yellow", "bad": "red"}


def fmt(metric: Metric | None, digits: int = 3) -> str:
    """A metric's value with its unit, or '-' when unknown; a contradicted one says by what."""
    if metric is None or metric.value is None:
        return "-"
    value = metric.value
    text = f"{value:,}" if isinstance(value, int) else f"{value:,.{digits}f}"
    text = f"{text} {metric.unit}".rstrip()
    if metric.contradicted_by is not None:
        text += f" [yellow](contradicted: {fmt(metric.contradicted_by, digits)})[/yellow]"
    return text


def _metrics_table(title: str, metrics: dict[str, Metric], sources: Sources) -> Table:
    table = Table(title=title, title_justify="left", show_edge=False)
    table.add_column("metric")
    table.add_column("value", justify="right")
    table.add_column("src", style="dim")
    for name, metric in metrics.items():
        table.add_row(name, fmt(metric), sources.cite(metric))
    return table


def render_report(report: Report, console: Console) -> None:
    """Print the whole report."""
    sources = Sources()
    env = report.environment
    outcome_style = SEVERITY_STYLES[severity(report.outcome)]
    console.print(
        f"[bold]{escape(report.scenario)}[/bold]  run {escape(report.run_id)}  outcome "
        f"[{outcome_style}]{escape(report.outcome)}[/{outcome_style}]",
        highlight=False,
    )
    if report.statement:
        console.print(f"[bold {outcome_style}]{escape(report.statement)}[/]", highlight=False)
    # The statement of a failed run already holds the error.
    if report.error and (not report.statement or report.error not in report.statement):
        console.print(f"[red]{escape(report.error)}[/red]", highlight=False)
    console.print(
        f"QEMU {env.get('qemu_version', '?')}  accel {env.get('accel', '?')}  backing "
        f"{env.get('backing', '?')}  {env.get('memory_mib', '?')} MiB  "
        f"{env.get('vcpus', '?')} vCPU  post-copy {env.get('postcopy')}  preempt "
        f"{env.get('preempt')}",
        highlight=False,
    )
    if report.recoveries:
        _render_pauses(report, console, sources)
    if report.faults:
        _render_faults(report.faults, console, sources)

    if report.fetch:
        cite = sources.cite(report.fetch[0].latency_ms["max"])
        table = Table(title=f"Per-page fetch latency, ms {cite}", title_justify="left",
                      show_edge=False)
        # Reports written before the backlog existed have none. Only its p50 here, to fit
        # 80 columns; report.json and the HTML page also have p90 and max.
        ahead = report.fetch[0].backlog_placements.get("p50")
        backlog = f"backlog\np50 {sources.cite(ahead)}" if ahead else "backlog\np50"
        for column in ("ramblock", "page", "faults", "p50", "p90", "p99", "p99.9", "max",
                       backlog, "placed at"):
            table.add_column(column, justify="right" if column != "ramblock" else "left")
        faulted = [block for block in report.fetch if block.faults]
        for block in faulted:
            lat, queued = block.latency_ms, block.backlog_placements
            table.add_row(
                block.ramblock, format_size(block.page_size), f"{block.faults:,}",
                *(_num(lat.get(k)) for k in ("p50", "p90", "p99", "p99.9", "max")),
                _num(queued.get("p50")),
                format_size(block.placement_granularity) if block.placement_granularity else "-",
            )
        console.print(table)
        quiet = [block for block in report.fetch if not block.faults]
        if quiet:
            pages = sum(block.pages_placed_background for block in quiet)
            console.print(f"  {len(quiet)} other RAMBlocks took no faults ({pages:,} pages "
                          "arrived in the background)", highlight=False)

    if report.hgm is not None:
        _render_hgm(report.hgm, console, sources)

    if report.freeze is not None:
        console.print(_metrics_table("Freeze", {
            "source STOP -> destination RESUME": report.freeze.freeze,
            "QEMU's reported downtime": report.freeze.qemu_downtime,
        }, sources))

    if report.guest_stalls:
        first = report.guest_stalls[0]
        cite = sources.cite(first.max_ms)
        table = Table(title=f"vCPU stalls by the guest's own clock, ms {cite}",
                      title_justify="left", show_edge=False)
        for column in ("vCPU", "stalls", "max", "p99 gap", "total", "stalls by phase"):
            table.add_column(column, justify="left" if column == "stalls by phase" else "right")
        for vcpu in report.guest_stalls:
            table.add_row(str(vcpu.vcpu), str(vcpu.stalls), _num(vcpu.max_ms),
                          _num(vcpu.p99_ms), _num(vcpu.total_stalled_ms),
                          ", ".join(f"{k} {v}" for k, v in vcpu.by_phase.items()))
        console.print(table)
    if report.guest_clock_steps is not None and report.guest_clock_steps.steps:
        _render_clock_steps(report.guest_clock_steps, console, sources)

    if report.outside_stalls is not None:
        outside = report.outside_stalls
        console.print(_metrics_table(
            f"Stalls seen from outside: heartbeat gaps ({outside.heartbeats:,} heartbeats, "
            f"{outside.lost} lost, period {outside.period_ms:g} ms)",
            {"max gap": outside.max_gap, "p99 gap": outside.p99_gap}, sources,
        ))
        if outside.worst:
            worst = ", ".join(f"{s.duration_ms:,.1f} ms ({s.phase})" for s in outside.worst[:5])
            console.print(f"  worst gaps: {worst}", highlight=False)

    for title, metrics in (("Blocktime", report.blocktime), ("Timings", report.timings),
                           ("Transfer", report.transfer)):
        if metrics:
            console.print(_metrics_table(title, metrics, sources))

    if report.qemu_latency:
        console.print(_metrics_table("QEMU's own post-copy latency", report.qemu_latency,
                                     sources))
    if report.latency_dist_comparison is not None:
        _latency_dist(report.latency_dist_comparison, console)

    if report.comparisons:
        table = Table(title="Where two sources measure the same thing", title_justify="left",
                      show_edge=False)
        for column in ("quantity", "A", "B", "B - A"):
            table.add_column(column, justify="left" if column == "quantity" else "right")
        for c in report.comparisons:
            diff = "-" if c.difference is None else f"{c.difference:,.3f} {c.a.unit}"
            table.add_row(c.quantity, f"{fmt(c.a)} {sources.cite(c.a)}",
                          f"{fmt(c.b)} {sources.cite(c.b)}", diff)
        console.print(table)
        for c in report.comparisons:
            if c.note:
                console.print(f"  [dim]{c.quantity}: {c.note}[/dim]", highlight=False)

    integrity = report.integrity
    if integrity:
        bad = integrity.get("bad_pages")
        style = "green" if bad == 0 else "red"
        console.print(f"Guest integrity: [{style}]{bad} bad pages[/{style}] of "
                      f"{integrity.get('pages')} checked", highlight=False)
    for warning in report.warnings:
        console.print(f"[yellow]warning:[/yellow] {warning}", highlight=False)
    console.print(f"[dim]Sources:\n{sources.legend()}[/dim]", highlight=False)


def _render_clock_steps(steps: GuestClockSteps, console: Console, sources: Sources) -> None:
    """The guest clock's steps: not stalls, so apart from the stall table."""
    # A short title: rich wraps it to the table's width.
    table = Table(title=f"Guest clock steps, not stalls: {steps.count.value} "
                        f"{sources.cite(steps.count)}, largest back "
                        f"{_num(steps.largest_back)} ms {sources.cite(steps.largest_back)}",
                  title_justify="left", show_edge=False)
    for column in ("vCPU", "step, ms", "phase", "reported as", "src"):
        table.add_column(column, justify="left" if column in ("phase", "reported as")
                         else "right")
    for step in steps.steps:
        table.add_row(str(step.vcpu), _num(step.step), step.phase, step.reported_as,
                      sources.cite(step.step))
    console.print(table)
    console.print("  [dim]step < 0: the guest's CLOCK_MONOTONIC went back; largest steps "
                  "first[/dim]", highlight=False)


def _seconds(metric: Metric) -> str:
    """A time in s to the ms, or '-'."""
    return "-" if metric.value is None else f"{metric.value:,.3f}"


def _render_pauses(report: Report, console: Console, sources: Sources) -> None:
    """One row per post-copy pause (times since migrate), then a line on each: why, what failed."""
    pauses = report.recoveries
    first = pauses[0]
    # One-word headers, sources in the title: 80 columns hold the table uncut.
    table = Table(title=f"Post-copy pauses and recoveries, s since migrate "
                        f"{sources.cite(first.began)}; gap {sources.cite(first.guest_gap)}, "
                        f"stall {sources.cite(first.probe_stall)}, "
                        f"tries {sources.cite(first.attempts)}",
                  title_justify="left", show_edge=False)
    rows = [[str(pause.number), _seconds(pause.began), _seconds(pause.both_paused),
             _seconds(pause.recovered), _seconds(pause.duration), _num(pause.attempts),
             pause.result, (">" if pause.guest_gap_open else "") + _seconds(pause.guest_gap),
             _seconds(pause.probe_stall)]
            for pause in pauses]
    for index, column in enumerate(("#", "began", "paused", "recovered", "took", "tries",
                                    "result", "gap", "stall")):
        table.add_column(column, justify="left" if column == "result" else "right",
                         min_width=max(len(column), *(len(row[index]) for row in rows)))
    for pause, row in zip(pauses, rows, strict=True):
        style = "green" if pause.result == "recovered" else "red"
        table.add_row(*row[:6], f"[{style}]{row[6]}[/{style}]", *row[7:])
    console.print(table)
    injected = {f.index: f for f in report.faults}
    for pause in pauses:
        parts = [escape(pause.cause)]
        fault = injected.get(pause.fault) if pause.fault is not None else None
        if fault is not None and fault.kind != "migrate-pause" and fault.injected_ns:
            parts[0] += (f", {(pause.began_ns - fault.injected_ns) / 1e9:.1f} s after fault "
                         f"{fault.index} ({escape(fault.kind)})")
        if pause.note:
            parts.append(escape(pause.note))
        seen = [f"{name} from {start:.3f} s" for name, start in (
            ("guest gap", _since(pause, pause.guest_gap_start_ns)),
            ("probe stall", _since(pause, pause.probe_stall_start_ns))) if start is not None]
        if seen:
            parts.append(", ".join(seen))
        console.print(f"  #{pause.number}: " + "; ".join(parts), highlight=False)
    console.print("  [dim]paused: both sides paused; gap: the longest silence between guest "
                  "heartbeats (host clock) overlapping the pause ('>': no heartbeat came after "
                  "it); stall: the longest stall the guest probe saw by its own clock "
                  "overlapping it[/dim]", highlight=False)


def _since(pause: PauseRecord, start_ns: int | None) -> float | None:
    """``start_ns`` in s since migrate, through the pause's own start (None if unknown)."""
    if start_ns is None or pause.began.value is None:
        return None
    return pause.began.value + (start_ns - pause.began_ns) / 1e9


def _render_faults(faults: list[FaultRecord], console: Console, sources: Sources) -> None:
    """One row per [[faults]] entry: what, where, when it was due, injected and cleared."""
    table = Table(title=f"Faults injected, s since migrate {sources.cite(faults[0].injected)}",
                  title_justify="left", show_edge=False)
    for column in ("#", "kind", "target", "due", "injected", "cleared", "status"):
        table.add_column(column, justify="right" if column in ("#", "injected", "cleared")
                         else "left")
    for fault in faults:
        kind = fault.kind if fault.duration_s is None else f"{fault.kind} {fault.duration_s:g} s"
        status = escape(fault.status)
        if fault.status in ("not injected", "not recorded"):
            status = f"[yellow]{status}[/yellow]"
        table.add_row(str(fault.index), escape(kind), escape(fault.target), escape(fault.due),
                      _seconds(fault.injected), _seconds(fault.cleared), status)
    console.print(table)
    for fault in faults:
        if fault.reason:
            console.print(f"  #{fault.index} {escape(fault.status)}: {escape(fault.reason)}",
                          highlight=False)


def _latency_dist(dist: LatencyDistComparison, console: Console) -> None:
    """QEMU's latency buckets next to the trace's, from the first to the last non-empty one."""
    # A short title: rich wraps it to the table's width.
    table = Table(title="Fault latency buckets: QEMU vs trace", title_justify="left",
                  show_edge=False)
    for column in ("latency", "QEMU", "trace", "trace - QEMU"):
        table.add_column(column, justify="left" if column == "latency" else "right")
    used = [i for i, row in enumerate(dist.rows) if row.qemu_count or row.trace_count]
    for row in dist.rows[used[0]:used[-1] + 1] if used else []:
        span = (f">= {_us(row.bucket_us_low)}" if row.bucket_us_high is None
                else f"{_us(row.bucket_us_low)} - {_us(row.bucket_us_high)}")
        table.add_row(span, f"{row.qemu_count:,}", f"{row.trace_count:,}",
                      f"{row.trace_count - row.qemu_count:+,}")
    console.print(table)
    worst = dist.largest_disagreement
    largest = "none" if worst is None else (
        f"{worst.trace_count - worst.qemu_count:+,} at {_us(worst.bucket_us_low)}")
    console.print(
        f"  totals: QEMU {dist.qemu_total:,}, trace {dist.trace_total:,} resolved of "
        f"{dist.trace_requests:,} requests; largest disagreement {largest}; at least "
        f"{dist.faults_in_other_buckets:,} faults in other buckets", highlight=False)
    console.print(f"  [dim]QEMU: {dist.qemu_source}; trace: {dist.trace_source}. "
                  f"{dist.note}[/dim]", highlight=False)


def _us(micros: int) -> str:
    """A bucket bound in us, ms or s (bounds are powers of two: three digits suffice)."""
    if micros < 1000:
        return f"{micros} us"
    if micros < 1_000_000:
        return f"{micros / 1e3:.3g} ms"
    return f"{micros / 1e6:.3g} s"


def _render_hgm(hgm: HgmSection, console: Console, sources: Sources) -> None:
    """The short HGM block: decision, fetch granularity per huge-page block, mapping."""
    state = "[green]enabled[/green]" if hgm.enabled else "disabled"
    mode = f"hgm = {hgm.mode}" if hgm.mode else "no hgm setting"
    console.print(f"[bold]HGM[/bold] {state} ({mode}): {escape(hgm.reason)}", highlight=False)
    for block in hgm.blocks:
        verdict = {True: "as decided", False: "[red]NOT as decided[/red]", None: ""}[
            block.matches_decision]
        console.print(
            f"  {block.ramblock} ({format_size(block.page_size)} pages): {block.fetched}, "
            f"placed at "
            f"{_size_of(block.placement_granularity)} over {block.pages_placed:,} "
            f"placement{'' if block.pages_placed == 1 else 's'} "
            f"{sources.cite(block.placement_granularity)} {verdict}".rstrip(),
            highlight=False)
    mapping = hgm.mapping
    if mapping is not None:
        spans = " -> ".join(f"{span.level.upper()} ({span.phase})" for span in mapping.timeline)
        last = mapping.timeline[-1].mapped if mapping.timeline else None
        mapped = f", {fmt(last)} mapped at the end" if last and last.value is not None else ""
        console.print(f"  guest RAM mapping, {mapping.found:,} of {mapping.samples:,} samples "
                      f"{sources.cite(mapping.collapse.peak_split)}: {spans or '-'}{mapped}",
                      highlight=False)
        collapse = mapping.collapse
        if not mapping.hgm_counters:
            detail = "the kernel prints no HGM counters: huge pages are mapped whole"
        elif collapse.status == "collapsed":
            detail = (f"collapsed {fmt(collapse.collapsed_after_completion)} after completion "
                      f"(+/- {fmt(collapse.uncertainty)}) "
                      f"{sources.cite(collapse.collapsed_after_completion)}; peak split "
                      f"{fmt(collapse.peak_split)}")
        elif collapse.status == "not-collapsed":
            detail = (f"[yellow]still split at the last sample[/yellow]; peak split "
                      f"{fmt(collapse.peak_split)}")
        else:
            detail = collapse.status
        console.print(f"  split/collapse: {detail}", highlight=False)
    for note in hgm.notes:
        console.print(f"  [dim]{escape(note)}[/dim]", highlight=False)


def _size_of(metric: Metric) -> str:
    """A size metric's value in binary units, or '-' when it is not a whole byte count."""
    return format_size(metric.value) if isinstance(metric.value, int) else "-"


def _num(metric: Metric | None) -> str:
    """A metric's value alone (the unit is in the table's title)."""
    if metric is None or metric.value is None:
        return "-"
    value = metric.value
    if isinstance(value, int):
        return f"{value:,}"
    # Three significant digits or so: latencies span 10 us to seconds.
    return f"{value:,.0f}" if value >= 100 else f"{value:.3g}"


