"""Several run directories as one self-contained HTML page: their plots overlaid, their
headline numbers side by side.

It draws what :func:`migrator.metrics.run_overlay.load_overlay_data` read (a
:class:`~migrator.pagedata.OverlayData`; this module reads no artifact):

* the runs, each with its colour, label, outcome, t = 0 and a link to its own
  ``report.html`` when it has one;
* what differs between them: every dimension whose value is not the same in all;
* their headline numbers side by side, each citing its source, with its unit;
* the fetch latency CDFs per page size, the guest stalls, the migration stream
  and host CPU per QEMU thread, overlaid (:mod:`migrator.report.overlay_figures`).

plotly.js is inlined once, as in the run page, so it opens without network.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from markupsafe import Markup
from plotly.offline import get_plotlyjs  # type: ignore[import-untyped]

from migrator.model import Metric
from migrator.pagedata import OverlayData
from migrator.report.figures import Plot, plot
from migrator.report.html import environment, report_link
from migrator.report.overlay_figures import (
    X_AXIS,
    overlay_cdf_figures,
    overlay_stall_figure,
    overlay_thread_figure,
    overlay_transfer_figure,
    run_colour,
)
from migrator.report.run_tables import contradiction, number
from migrator.report.sources import Sources
from migrator.rundir import atomic_write
from migrator.tables import Cell, Column, Table
from migrator.units import format_value

__all__ = ["default_overlay_path", "headline_table", "render_overlay_html",
           "write_overlay_html"]


@dataclass(frozen=True)
class RunRow:
    """One run of the page's runs table."""

    number: int
    colour: str
    label: str
    outcome: str
    zero: str
    path: str
    link: str | None


def default_overlay_path(now: datetime | None = None) -> Path:
    """``migrator-compare-YYYYMMDDTHHMMSSZ.html`` in the current directory."""
    stamp = (now or datetime.now(UTC)).strftime("%Y%m%dT%H%M%SZ")
    return Path(f"migrator-compare-{stamp}.html")


def _header(number: int, run_id: str) -> str:
    return f"#{number} {run_id}"


def _cell(metric: Metric | None, unit: str, sources: Sources) -> Cell:
    """One run's value of a headline row, citing its source; its unit when not the row's."""
    if metric is None or metric.value is None:
        return number(None)
    extra = "" if metric.unit == unit else f" {metric.unit}"
    return Cell(format_value(metric.value, metric.unit) + extra + contradiction(metric),
                sources.number(metric.source), metric.source, numeric=True,
                tone="" if metric.contradicted_by is None else "warn",
                value=float(metric.value))


def headline_table(data: OverlayData, sources: Sources) -> Table:
    """The headline numbers of every run side by side: one row per number, one column per
    run, each value citing its own source."""
    table = Table("Headline numbers side by side", [
        Column("metric"), Column("unit"),
        *(Column(_header(i, run.page.report.run_id), numeric=True)
          for i, run in enumerate(data.runs, start=1))], anchor="headline")
    for row in data.headline:
        table.rows.append([Cell(row.name), Cell(row.unit),
                           *(_cell(metric, row.unit, sources) for metric in row.metrics)])
    return table


def differs_table(data: OverlayData) -> Table:
    """Every dimension whose value differs between the runs, one column per run."""
    table = Table("What differs between the runs", [
        Column("dimension"), *(Column(_header(i, run.page.report.run_id))
                               for i, run in enumerate(data.runs, start=1))], anchor="differs")
    for name in data.dimensions:
        table.rows.append([Cell(name), *(Cell(run.differs[name]) for run in data.runs)])
    return table


def _plots(data: OverlayData) -> list[Plot]:
    plots = [
        plot(f"plot-fetch-cdf-{size}" if size else "plot-fetch-cdf", "Fetch latency",
             "Cumulative distribution of per-page fetch latency of every RAMBlock of this page "
             "size that took faults, one line per run and block (destination QEMU trace, "
             "report.fetch[*].histogram; steps are histogram bucket bounds).", fig)
        for size, fig in overlay_cdf_figures(data)]
    plots += [
        plot("plot-stall-overlay", "Guest stalls",
             f"x: {X_AXIS}. Dots: each stall of any vCPU by the guest's clock (src/dst "
             "console.jsonl), placed on the host clock; crosses: gaps between heartbeat "
             "arrivals at the controller (host clock), longer than the heartbeat period plus "
             "the probe's threshold, which also count the time the VM was stopped.",
             overlay_stall_figure(data)),
        plot("plot-transfer-overlay", "Transfer",
             f"x: {X_AXIS}. query-migrate sampled on both sides (samples.jsonl), at reply "
             "time: ram.remaining above; below, the throughput, Δ ram.transferred / Δt "
             "between two consecutive samples in MiB/s. Destination lines are dotted.",
             overlay_transfer_figure(data)),
        plot("plot-threads-overlay", "Host CPU per QEMU thread",
             f"x: {X_AXIS}. CPU time between two consecutive samples of "
             "/proc/PID/task/*/stat (utime + stime, src|dst/threads.jsonl, on each QEMU's "
             "host), in % of one core: the source's migration thread and the destination's "
             "post-copy fault thread solid, each side's vCPU threads summed dashed.",
             overlay_thread_figure(data)),
    ]
    return plots


def _run_rows(data: OverlayData, page_dir: Path) -> list[RunRow]:
    return [RunRow(i, run_colour(i - 1), run.label, run.page.report.outcome, run.zero_what,
                   run.path, report_link(page_dir, Path(run.path)))
            for i, run in enumerate(data.runs, start=1)]


def render_overlay_html(data: OverlayData, page_dir: Path) -> str:
    """The overlay page of ``data``'s runs (see module docstring), its links relative to
    ``page_dir``, where it is to be written; writes nothing."""
    sources = Sources()
    headline = headline_table(data, sources)
    versions = {str(run.page.report.environment.get("migrator_version") or "")
                for run in data.runs}
    return environment().get_template("overlay.html.j2").render(
        runs=_run_rows(data, page_dir), differs=differs_table(data), headline=headline,
        plots=_plots(data), plotly_js=Markup(get_plotlyjs()),
        sources=sorted((n, s) for s, n in sources.numbers.items()),
        migrator_version=", ".join(sorted(v for v in versions if v)))


def write_overlay_html(target: Path, data: OverlayData) -> Path:
    """Write the overlay page to ``target`` atomically; returns its path."""
    atomic_write(target, render_overlay_html(data, target.parent))
    return target
