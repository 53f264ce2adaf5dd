"""The report as rich tables on a terminal."""

from __future__ import annotations

from rich.console import Console
from rich.table import Table

from migrator.report.schema import Metric, Report

__all__ = ["render_report"]


def fmt(metric: Metric | None, digits: int = 3) -> str:
    """A metric's value with its unit, or '-' when unknown."""
    if metric is None or metric.value is None:
        return "-"
    value = metric.value
    text = f"{value:,}" if isinstance(value, int) else f"{value:,.{digits}f}"
    return f"{text} {metric.unit}".rstrip()


def _metrics_table(title: str, metrics: dict[str, Metric]) -> Table:
    table = Table(title=title, title_justify="left", show_edge=False)
    table.add_column("metric")
    table.add_column("value", justify="right")
    table.add_column("source", style="dim")
    for name, metric in metrics.items():
        table.add_row(name, fmt(metric), metric.source)
    return table


def render_report(report: Report, console: Console) -> None:
    """Print the whole report."""
    env = report.environment
    outcome_style = "green" if report.outcome == "completed" else "red"
    console.print(
        f"[bold]{report.scenario}[/bold]  run {report.run_id}  outcome "
        f"[{outcome_style}]{report.outcome}[/{outcome_style}]",
        highlight=False,
    )
    if report.error:
        console.print(f"[red]{report.error}[/red]", highlight=False)
    console.print(
        f"QEMU {env.get('qemu_version', '?')}  accel {env.get('accel', '?')}  backing "
        f"{env.get('backing', '?')}  {env.get('memory_mib', '?')} MiB  "
        f"{env.get('vcpus', '?')} vCPU  post-copy {env.get('postcopy')}  preempt "
        f"{env.get('preempt')}",
        highlight=False,
    )

    if report.fetch:
        table = Table(title="Per-page fetch latency (destination trace: fault request -> "
                      "placement of its host page)", title_justify="left", show_edge=False)
        for column in ("ramblock", "page", "faults", "unresolved", "p50", "p90", "p99",
                       "p99.9", "max", "granularity"):
            table.add_column(column, justify="right" if column != "ramblock" else "left")
        for block in report.fetch:
            lat = block.latency_ms
            table.add_row(
                block.ramblock, _size(block.page_size), f"{block.faults:,}",
                str(block.unresolved), *(fmt(lat.get(k)) for k in ("p50", "p90", "p99",
                                                                   "p99.9", "max")),
                _size(block.placement_granularity) if block.placement_granularity else "-",
            )
        console.print(table)

    if report.freeze is not None:
        console.print(_metrics_table("Freeze", {
            "source STOP -> destination RESUME": report.freeze.freeze,
            "QEMU's reported downtime": report.freeze.qemu_downtime,
        }))

    if report.guest_stalls:
        table = Table(title="vCPU stalls by the guest's own clock (guest probe)",
                      title_justify="left", show_edge=False)
        for column in ("vCPU", "stalls", "max", "p99 gap", "total stalled", "by phase"):
            table.add_column(column, justify="right" if column != "by phase" else "left")
        for vcpu in report.guest_stalls:
            table.add_row(str(vcpu.vcpu), str(vcpu.stalls), fmt(vcpu.max_ms), fmt(vcpu.p99_ms),
                          fmt(vcpu.total_stalled_ms),
                          ", ".join(f"{k} {v}" for k, v in vcpu.by_phase.items()))
        console.print(table)

    if report.outside_stalls is not None:
        outside = report.outside_stalls
        console.print(_metrics_table(
            f"Stalls seen from outside (heartbeat arrival gaps on the host clock; "
            f"{outside.heartbeats:,} heartbeats, {outside.lost} lost, period "
            f"{outside.period_ms:g} ms)",
            {"max gap": outside.max_gap, "p99 gap": outside.p99_gap},
        ))
        if outside.worst:
            worst = ", ".join(f"{s.duration_ms:,.1f} ms ({s.phase})" for s in outside.worst[:5])
            console.print(f"  worst gaps: {worst}", highlight=False)

    for title, metrics in (("Blocktime", report.blocktime), ("Timings", report.timings),
                           ("Transfer", report.transfer)):
        if metrics:
            console.print(_metrics_table(title, metrics))

    if report.qemu_latency:
        console.print(_metrics_table("QEMU's own post-copy latency", {
            k: v for k, v in report.qemu_latency.items() if isinstance(v, Metric)
        }))

    if report.comparisons:
        table = Table(title="Where two sources measure the same thing", title_justify="left",
                      show_edge=False)
        for column in ("quantity", "source A", "source B", "B - A", "note"):
            table.add_column(column)
        for c in report.comparisons:
            diff = "-" if c.difference is None else f"{c.difference:,.3f} {c.a.unit}"
            table.add_row(c.quantity, f"{fmt(c.a)}\n[dim]{c.a.source}[/dim]",
                          f"{fmt(c.b)}\n[dim]{c.b.source}[/dim]", diff, c.note)
        console.print(table)

    integrity = report.integrity
    if integrity:
        bad = integrity.get("bad_pages")
        style = "green" if bad == 0 else "red"
        console.print(f"Guest integrity: [{style}]{bad} bad pages[/{style}] of "
                      f"{integrity.get('pages')} checked", highlight=False)
    for warning in report.warnings:
        console.print(f"[yellow]warning:[/yellow] {warning}", highlight=False)


def _size(size: int | None) -> str:
    if size is None:
        return "-"
    for unit, factor in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if size >= factor and size % factor == 0:
            return f"{size // factor} {unit}"
    return f"{size} B"
