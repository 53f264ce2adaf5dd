"""A finished suite directory as one self-contained HTML page.

Reads ``DIR/suite.json`` (:func:`load_state`), ``DIR/suite.toml`` (the suite as
last run, for the page-size table; the table is left out when it cannot be
read or the suite does not vary ``vm.backing``) and each finished run's report
once, for the plots and the page-size table (``report.json``, derived again in
memory when missing or outdated).  The page holds:

* a table of every run: id, status, error or reason, duration, and a link to
  ``runs/<dir>/report.html`` when that file exists (relative to the page);
* the page-size table (:func:`build_page_size_table`);
* fetch latency p50 on the guest RAM block per run, grouped by the axis labels
  (one marker per repetition, log y);
* the fetch latency CDF of every run's guest RAM block, overlaid (the same
  look as the run page's, :func:`~migrator.report.figures.cdf_figure`).

plotly.js is inlined once, as in the run page, so it opens without network.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import plotly.graph_objects as go  # type: ignore[import-untyped]
from markupsafe import Markup
from plotly.offline import get_plotlyjs  # type: ignore[import-untyped]

from migrator.bench.pagesize import (
    build_page_size_table,
    load_done_reports,
    row_cells,
    table_footnotes,
    table_headers,
)
from migrator.bench.runner import RunRecord, RunStatus, SuiteState, load_state
from migrator.bench.suite import PlannedRun, Suite, load_suite
from migrator.errors import MigratorError
from migrator.metrics.run_page import block_cdf, guest_ram_block
from migrator.model import BlockFetch, Report
from migrator.report import figures
from migrator.report.figures import Plot, block_cdf_trace, layout, log_axis, note, plot
from migrator.report.html import environment, report_link
from migrator.rundir import atomic_write
from migrator.tables import Cell, Table
from migrator.units import format_size

__all__ = ["SUITE_HTML", "render_suite_html", "write_suite_html"]

SUITE_HTML = "suite.html"
TEMPLATES = Path(__file__).parent / "templates"
_STATUS_BADGE = {RunStatus.DONE: "ok", RunStatus.FAILED: "bad"}


@dataclass(frozen=True)
class RunRow:
    """One row of the runs table for the template."""

    run_id: str
    status: str
    badge: str
    message: str
    duration: str
    run_dir: str
    link: str | None


@dataclass(frozen=True)
class RunResult:
    """A finished run's report and its guest RAM block (None when it has no trace)."""

    record: RunRecord
    report: Report
    block: BlockFetch | None


def _load_suite(suite_dir: Path) -> Suite | None:
    try:
        return load_suite(suite_dir / "suite.toml")
    except (MigratorError, OSError):
        return None


def _results(state_runs: dict[str, RunRecord], reports: dict[str, Report],
             planned: dict[str, PlannedRun]) -> dict[str, RunResult]:
    """The finished runs with their reports and guest RAM blocks (any block of the most
    faults when the run is no longer in the suite file)."""
    out = {}
    for run_id, report in reports.items():
        plan = planned.get(run_id)
        page_size = plan.scenario.vm.backing.page_size if plan is not None else None
        out[run_id] = RunResult(state_runs[run_id], report, guest_ram_block(report, page_size))
    return out


def _group(record: RunRecord) -> str:
    """The run's axis labels without the repetition: one x category per combination."""
    return ",".join(f"{axis}={label}" for axis, label in record.labels.items()) or "base"


def p50_figure(results: dict[str, RunResult]) -> Any:
    """Fetch p50 on the guest RAM block per run, one category per combination, log y."""
    fig = go.Figure()
    by_group: dict[str, list[tuple[str, float, int]]] = {}
    for run_id, result in results.items():
        block = result.block
        metric = block.latency_ms.get("p50") if block is not None else None
        if block is None or metric is None or not isinstance(metric.value, int | float):
            continue
        by_group.setdefault(_group(result.record), []).append(
            (run_id, float(metric.value), block.page_size))
    for group, points in by_group.items():
        fig.add_trace(go.Scatter(
            x=[group] * len(points), y=[p[1] for p in points], mode="markers",
            marker={"size": 10, "opacity": 0.8}, name=group,
            text=[f"{p[0]} · {format_size(p[2])} pages" for p in points],
            hovertemplate="%{text}<br>p50 %{y:.4g} ms<extra></extra>",
        ))
    layout(fig, "Fetch latency p50 per run (guest RAM block)", 420)
    fig.update_yaxes(**log_axis("fetch latency p50, ms (log)"))
    fig.update_xaxes(title_text="combination (one marker per repetition)", type="category")
    fig.update_layout(showlegend=False)
    if not fig.data:
        note(fig, "no finished run has fetch latencies (no destination trace?)", centre=True)
    return fig


def cdf_figure(results: dict[str, RunResult]) -> Any:
    """The fetch latency CDF of every run's guest RAM block, overlaid, log x."""
    cdfs = {run_id: block_cdf(result.block) for run_id, result in results.items()
            if result.block is not None}
    return figures.cdf_figure(
        [block_cdf_trace(run_id, cdf) for run_id, cdf in cdfs.items() if cdf is not None],
        "Per-page fetch latency CDF of every run (guest RAM block)", 460,
        "no finished run has fetch latencies (no destination trace?)")


def _run_rows(state_runs: dict[str, RunRecord], suite_dir: Path) -> list[RunRow]:
    rows = []
    for run_id, record in state_runs.items():
        path = record.path(suite_dir)
        rows.append(RunRow(
            run_id=run_id, status=record.status.value,
            badge=_STATUS_BADGE.get(record.status, ""),
            message=record.error or record.reason or "",
            duration="-" if record.duration_s is None else f"{record.duration_s:,.1f} s",
            run_dir=record.run_dir or "-", link=report_link(suite_dir, path)))
    return rows


def _page_size_table(suite: Suite | None, state: SuiteState, suite_dir: Path,
                     reports: dict[str, Report]) -> tuple[Table | None, list[str]]:
    if suite is None or not suite.varies_backing:
        return None, []
    table = build_page_size_table(suite, state, suite_dir, reports)
    headers = table_headers(table)
    rows = [[Cell(text, numeric=0 < i < len(headers) - 1)
             for i, text in enumerate(row_cells(row))]
            for row in table.rows]
    title = f"Page-size table ({table.environment}); times in ms"
    return Table.of(title, headers, rows, anchor="page-size"), table_footnotes(table)


def render_suite_html(suite_dir: Path) -> str:
    """The HTML page of a suite directory (see module docstring); writes nothing."""
    state = load_state(suite_dir)
    suite = _load_suite(suite_dir)
    planned = {run.run_id: run for run in suite.runs} if suite is not None else {}
    reports = load_done_reports(state.runs, suite_dir)
    results = _results(state.runs, reports, planned)
    plots: list[Plot] = [
        plot("plot-suite-p50", "Fetch p50 per run",
              "Fetch latency p50 on each finished run's guest RAM block (report.fetch), "
              "grouped by the run's axis labels; one marker per repetition.",
              p50_figure(results)),
        plot("plot-suite-cdf", "Fetch latency CDFs",
              "Cumulative distribution of per-page fetch latency on each finished run's guest "
              "RAM block (report.fetch[*].histogram; steps are histogram bucket bounds).",
              cdf_figure(results)),
    ]
    page_size, notes = _page_size_table(suite, state, suite_dir, reports)
    counts = {status.value: state.count(status) for status in RunStatus if state.count(status)}
    versions = {str(r.report.environment.get("migrator_version") or "") for r in
                results.values()}
    return environment(TEMPLATES).get_template("suite.html.j2").render(
        state=state, runs=_run_rows(state.runs, suite_dir), counts=counts, plots=plots,
        page_size=page_size, page_size_notes=notes, plotly_js=Markup(get_plotlyjs()),
        suite_readable=suite is not None,
        migrator_version=", ".join(sorted(v for v in versions if v)),
    )


def write_suite_html(suite_dir: Path) -> Path:
    """Write ``DIR/suite.html`` atomically; returns its path."""
    target = suite_dir / SUITE_HTML
    atomic_write(target, render_suite_html(suite_dir))
    return target
