"""One run directory as one self-contained HTML page: interactive plots and the report's tables.

It draws what :func:`migrator.metrics.run_page.load_run_page_data` read from a
run directory (a :class:`~migrator.pagedata.RunPageData`; this module reads no
artifact): ``report.json`` (derived again from the raw artifacts with
``build_report`` when it is missing or of another schema) for the derived
numbers, and the raw artifacts for the series the report only summarises:

* fetch latency CDF per RAMBlock: ``report.fetch[*].histogram`` (the streaming
  histogram of the destination trace), plus QEMU's ``postcopy-latency-dist``
  when the destination QEMU reported one (>= 10.1);
* guest stall timeline per vCPU: every stall of ``src|dst/console.jsonl``
  (``load_guest``), the heartbeat gaps of the same files, the phases of
  ``report.phases``;
* bytes remaining and throughput: ``samples.jsonl`` (``query-migrate`` of both
  sides);
* per-vCPU blocktime: ``report.blocktime`` (QEMU's and the trace's);
* post-copy pauses (shaded on the stall and transfer plots) and injected
  faults: ``report.recoveries`` and ``report.faults``;
* tables: ``report.json``, ``scenario.toml`` verbatim and ``run.json``.

The page embeds plotly.js once, inline, so it opens without network access
(about 4.8 MB of the page is plotly.js).  Stall and heartbeat-gap series with
more points than :data:`MAX_POINTS` keep their largest values and say so in
their legend, so the page stays small whatever the length of the run.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import plotly.graph_objects as go  # type: ignore[import-untyped]
from jinja2 import Environment, FileSystemLoader, StrictUndefined
from markupsafe import Markup
from plotly.io.json import to_json_plotly  # type: ignore[import-untyped]
from plotly.offline import get_plotlyjs  # type: ignore[import-untyped]
from plotly.subplots import make_subplots  # type: ignore[import-untyped]

from migrator.model import Metric, PauseRecord, Phase, Report
from migrator.outcome import severity
from migrator.pagedata import BlockCdf, Cdf, Clock, RunPageData, SideSamples, StallView
from migrator.report.sources import Sources
from migrator.rundir import atomic_write
from migrator.units import format_size, format_value

__all__ = ["MAX_POINTS", "layout", "log_axis", "note", "plot", "render_run_html",
           "write_run_html"]

#: Most markers one series of a plot carries (the largest values are kept).
MAX_POINTS = 20_000
TEMPLATES = Path(__file__).parent / "templates"
MIB = float(1 << 20)
MS = 1e6
S = 1e9
# Fill colours of the phases (see PhaseTimeline.from_events for their meaning).
PHASE_COLOURS = {
    "boot": "#9e9e9e", "warmup": "#4db6ac", "setup": "#fdd835", "precopy": "#42a5f5",
    "freeze": "#e53935", "postcopy": "#fb8c00", "settle": "#7cb342", "verify": "#8e24aa",
}
PASS_COLOURS = ("#0d47a1", "#90caf9")
# Post-copy pauses, drawn over the phases (see add_pauses).
PAUSE_COLOUR = "#6a1b9a"
# The header badge of each outcome (migrator.outcome.Outcome); any other is "bad".
PLOT_CONFIG = {
    "displaylogo": False,
    "responsive": True,
    "toImageButtonOptions": {"format": "png", "scale": 2},
}
_BLOCKTIME_QEMU = re.compile(r"postcopy-vcpu-blocktime\[(\d+)\]")
_BLOCKTIME_TRACE = re.compile(r"trace blocktime vCPU (\d+)")

F64 = npt.NDArray[np.float64]


# ---------------------------------------------------------------------------
# Figures


def _keep_largest(values: F64, limit: int = MAX_POINTS) -> npt.NDArray[np.intp]:
    """Indices of the ``limit`` largest values, in their original order."""
    if values.size <= limit:
        return np.arange(values.size)
    return np.sort(np.argpartition(values, values.size - limit)[-limit:])


def layout(fig: Any, title: str, height: int) -> None:
    """Give ``fig`` the report pages' look: title top left, white template, ``height`` px."""
    fig.update_layout(
        title={"text": title, "x": 0.01, "xanchor": "left", "y": 0.99, "yanchor": "top",
               "font": {"size": 16}},
        template="plotly_white", height=height, margin={"l": 70, "r": 30, "t": 60, "b": 50},
        hoverlabel={"namelength": -1}, font={"size": 12},
    )


def note(fig: Any, text: str, centre: bool = False, above: int = 8) -> None:
    """Say on the plot what is missing: centred on an empty plot, else under the title.

    ``above``: pixels between the note and the plot area (room for subplot titles).
    """
    if centre:
        where = {"x": 0.5, "y": 0.5, "xanchor": "center", "yanchor": "middle"}
    else:
        # Room between the title and the plot area (the mode bar has the top right corner).
        lines = text.count("<br>") + 1
        fig.update_layout(margin={"t": 58 + above + 16 * lines})
        where = {"x": 0.0, "y": 1.0, "xanchor": "left", "yanchor": "bottom", "yshift": above}
    fig.add_annotation(text=text, xref="paper", yref="paper", showarrow=False, align="left",
                       font={"size": 12, "color": "#9a3412"}, **where)


# Log axes labelled 1-2-5 per decade: plotly's default labels the 2 and 5 of each decade
# alone ("5 10 2 5 100"), which reads badly.
LOG_TICKS = [m * 10.0**e for e in range(-3, 6) for m in (1, 2, 5)]


def log_axis(title: str) -> dict[str, Any]:
    """Keyword arguments of ``update_xaxes``/``update_yaxes`` for a log axis labelled
    1-2-5 per decade (:data:`LOG_TICKS`)."""
    return {"type": "log", "title_text": title, "tickvals": LOG_TICKS,
            "ticktext": [f"{v:g}" for v in LOG_TICKS]}


def cdf_trace(cdf: Cdf, name: str) -> Any:
    """The step CDF of a non-empty fetch latency histogram as a trace in ms
    (:func:`migrator.metrics.run_page.histogram_cdf`)."""
    return go.Scatter(
        x=cdf.x_ms, y=cdf.fraction, mode="lines+markers", line_shape="hv", marker={"size": 5},
        name=name,
        hovertemplate="≤ %{x:.4g} ms: %{y:.1%} of faults<extra>%{fullData.name}</extra>",
    )


def fetch_cdf_figure(report: Report, cdfs: Iterable[BlockCdf]) -> Any:
    """(a) Fetch latency CDF per RAMBlock, log x, from each block's histogram buckets.

    ``cdfs``: the blocks' CDFs (:func:`migrator.metrics.run_page.fetch_cdfs`).
    Each step is a bucket's upper bound (clamped to the exact max): the
    fraction of faults whose latency is at most that, within the histogram's
    stated relative error.  QEMU's own ``postcopy-latency-dist`` is added when
    the destination reported it.
    """
    fig = go.Figure()
    for block in cdfs:
        size = format_size(block.page_size)
        fig.add_trace(cdf_trace(block.cdf, f"{block.ramblock} · {size} pages · "
                                           f"{block.cdf.count:,} faults"))
    dist = report.qemu_latency_dist
    if dist and any(dist.get("counts", [])):
        counts = np.array(dist["counts"], dtype=np.float64)
        # Bucket k holds [2^k, 2^(k+1)) us; the last is open-ended, so it is drawn at its
        # lower bound.
        upper_us = 2.0 ** np.arange(1, counts.size + 1)
        upper_us[-1] = 2.0 ** (counts.size - 1)
        fig.add_trace(go.Scatter(
            x=upper_us / 1e3, y=np.cumsum(counts) / counts.sum(), mode="lines+markers",
            line={"dash": "dot"}, line_shape="hv",
            name="QEMU postcopy-latency-dist (all blocks, power-of-2 buckets)",
            hovertemplate="< %{x:.4g} ms: %{y:.1%} of faults<extra>QEMU</extra>",
        ))
    layout(fig, "Per-page fetch latency CDF (destination trace: fault request → page placed)",
            420)
    fig.update_xaxes(**log_axis("fetch latency, ms (log)"))
    fig.update_yaxes(title_text="fraction of faults ≤ x", range=[0, 1.02], tickformat=".0%")
    fig.update_layout(legend={"orientation": "h", "y": -0.22, "x": 0})
    if not fig.data:
        note(fig, "no fetch latencies: the run has no destination trace or took no faults",
              centre=True)
    return fig


def add_phases(fig: Any, phases: list[Phase], clock: Clock, legend: bool = True) -> None:
    """Shade each phase of ``report.phases`` as a vertical band (passes as a top strip)."""
    seen: set[str] = set()
    pass_number = 0
    for phase in phases:
        # A phase still open when the run ended lasts to the last thing recorded.
        end = phase.end_ns if phase.end_ns is not None else max(clock.end_ns, phase.start_ns)
        x0, x1 = clock.s(phase.start_ns), clock.s(end)
        is_pass = phase.name.startswith("precopy-pass-")
        if is_pass:
            # Passes lie inside "precopy": a strip along the top keeps both readable.
            colour, y0, opacity = PASS_COLOURS[pass_number % 2], 0.96, 0.5
            pass_number += 1
            group = "precopy passes"
        else:
            colour, y0, opacity = PHASE_COLOURS.get(phase.name, "#bdbdbd"), 0.0, 0.16
            group = phase.name
        fig.add_shape(
            type="rect", xref="x", yref="paper", x0=x0, x1=x1, y0=y0, y1=1.0,
            fillcolor=colour, opacity=opacity, line_width=0, layer="below",
            name=group, legendgroup=group, showlegend=legend and group not in seen,
            legend="legend2" if legend else None,
        )
        seen.add(group)


def add_pauses(fig: Any, pauses: list[PauseRecord], clock: Clock, legend: bool = True) -> None:
    """Shade each post-copy pause, from its start to its recovery (or the end of the run)."""
    for index, pause in enumerate(pauses):
        end = pause.recovered_ns if pause.recovered_ns is not None else clock.end_ns
        fig.add_shape(
            type="rect", xref="x", yref="paper", x0=clock.s(pause.began_ns),
            x1=clock.s(max(end, pause.began_ns)), y0=0.0, y1=0.94, fillcolor=PAUSE_COLOUR,
            opacity=0.22, line={"width": 1, "color": PAUSE_COLOUR, "dash": "dot"},
            layer="below", name="post-copy pause", legendgroup="post-copy pause",
            showlegend=legend and index == 0, legend="legend2" if legend else None,
            label={"text": f"pause {pause.number}" + (
                "" if pause.result == "recovered" else " (not recovered)"),
                "textposition": "top center", "font": {"size": 11, "color": PAUSE_COLOUR}},
        )


def stall_timeline_figure(report: Report, view: StallView, clock: Clock,
                          threshold_ms: float) -> Any:
    """(b) Every guest stall per vCPU (host-clock start vs duration, log y), phases shaded.

    The outside view (heartbeat arrival gaps longer than the heartbeat period
    plus the probe's threshold, the same cut ``report.outside_stalls`` counts)
    is the second kind of series: it also sees the time the VM was stopped,
    which the guest clock does not.
    """
    fig = go.Figure()
    for series in view.series:
        vcpu = series.vcpu
        gaps = series.gaps_ms
        keep = _keep_largest(gaps)
        stall_starts = [series.starts_ns[i] for i in keep.tolist()]
        name = f"vCPU {vcpu}: guest stall (guest clock)"
        if keep.size < gaps.size:
            name += f", {keep.size:,} longest of {gaps.size:,}"
        fig.add_trace(go.Scatter(
            x=np.array([clock.s(ns) for ns in stall_starts]), y=gaps[keep], mode="markers",
            marker={"size": 7, "opacity": 0.8}, name=name,
            customdata=[series.phases[i] for i in keep.tolist()],
            hovertemplate="t = %{x:.4f} s<br>%{y:.4g} ms<br>phase %{customdata}"
                          f"<extra>vCPU {vcpu}</extra>",
        ))
    outside = report.outside_stalls
    hb = view.heartbeat_gaps
    if hb is not None:
        name = f"outside view: heartbeat gap > {hb.cut_ms:.3g} ms (host clock)"
        if hb.gaps_ms.size > MAX_POINTS:
            name += f", {MAX_POINTS:,} longest of {hb.gaps_ms.size:,}"
        over = _keep_largest(hb.gaps_ms)
        starts = hb.starts_ns[over]
        fig.add_trace(go.Scatter(
            x=np.array([clock.s(ns) for ns in starts.tolist()]), y=hb.gaps_ms[over],
            mode="markers",
            marker={"symbol": "x-thin", "size": 9, "line": {"width": 2, "color": "#212121"}},
            name=name,
            customdata=[hb.spans[i] for i in over.tolist()],
            hovertemplate="gap from t = %{x:.4f} s<br>%{y:.4g} ms<br>phase %{customdata}"
                          "<extra>heartbeats</extra>",
        ))
    fig.add_hline(y=threshold_ms, line={"dash": "dot", "color": "#757575", "width": 1})
    # Annotations on a log axis take log10(y) (add_hline's own label would land at 10**y).
    fig.add_annotation(text=f"probe threshold {threshold_ms:g} ms", xref="paper", x=1.0,
                       yref="y", y=math.log10(threshold_ms), xanchor="right",
                       yanchor="bottom", showarrow=False, font={"size": 11, "color": "#555"})
    add_phases(fig, list(report.phases), clock)
    add_pauses(fig, list(report.recoveries), clock)
    title = "Guest stalls per vCPU on the host clock, migration phases shaded"
    if report.recoveries:
        title += ", post-copy pauses in purple"
    layout(fig, title, 480)
    fig.update_xaxes(title_text=clock.axis, range=clock.view())
    fig.update_yaxes(**log_axis("stall duration, ms (log)"))
    fig.update_layout(
        legend={"orientation": "h", "y": -0.18, "x": 0},
        legend2={"title": {"text": "phases"}, "x": 1.01, "y": 1, "bgcolor": "rgba(0,0,0,0)"},
        margin={"r": 150},
    )
    notes = []
    if not view.stalls:
        notes.append("the guest probe reported no stalls")
    if view.clock_steps:
        notes.append(f"{view.clock_steps} guest clock step(s), not stalls, are not "
                     "drawn: see the clock steps table")
    if view.unplaced:
        notes.append(f"{view.unplaced} stall(s) before the first heartbeat cannot be placed on "
                     "the host clock")
    if outside is None:
        notes.append("fewer than two heartbeats: no outside view")
    if notes:
        note(fig, "<br>".join(notes))
    return fig


def transfer_figure(report: Report, samples: Mapping[str, SideSamples], clock: Clock) -> Any:
    """(c) ``ram.remaining`` and the throughput (``ram.transferred`` deltas) of both sides."""
    fig = make_subplots(rows=2, cols=1, shared_xaxes=True, vertical_spacing=0.09,
                        subplot_titles=("bytes remaining (query-migrate ram.remaining)",
                                        "throughput (Δ ram.transferred / Δt between samples)"))
    colours = {"src": "#1e88e5", "dst": "#d81b60"}
    missing = []
    for side in ("src", "dst"):
        data = samples.get(side)
        if data is None or data.t_s.size == 0:
            replies = data.replies if data else 0
            missing.append(f"{side}: {replies} query-migrate replies, none with ram statistics"
                           + (" (QEMU keeps them on the source only)" if side == "dst" else ""))
            continue
        label = "source" if side == "src" else "destination"
        fig.add_trace(go.Scatter(
            x=data.t_s, y=data.remaining / MIB, mode="lines+markers", marker={"size": 4},
            line={"color": colours[side]}, name=f"{label}: ram.remaining",
            customdata=data.remaining,
            hovertemplate="t = %{x:.3f} s<br>%{y:.1f} MiB (%{customdata:,} B)"
                          f"<extra>{side}</extra>",
        ), row=1, col=1)
        if data.t_s.size > 1:
            dt = np.diff(data.t_s)
            ok = dt > 0
            rate = np.diff(data.transferred)[ok] / dt[ok] / MIB
            mid = (data.t_s[1:] + data.t_s[:-1])[ok] / 2
            fig.add_trace(go.Scatter(
                x=mid, y=rate, mode="lines+markers", marker={"size": 4},
                line={"color": colours[side]}, name=f"{label}: Δ ram.transferred / Δt",
                hovertemplate="around t = %{x:.3f} s<br>%{y:.1f} MiB/s"
                              f"<extra>{side}</extra>",
            ), row=2, col=1)
            if np.isfinite(data.mbps).any():
                fig.add_trace(go.Scatter(
                    x=data.t_s, y=data.mbps * 1e6 / 8 / MIB, mode="lines",
                    line={"color": colours[side], "dash": "dot"}, visible="legendonly",
                    name=f"{label}: QEMU's own ram.mbps estimate",
                    hovertemplate="t = %{x:.3f} s<br>%{y:.1f} MiB/s<extra>mbps</extra>",
                ), row=2, col=1)
    add_phases(fig, list(report.phases), clock, legend=False)
    add_pauses(fig, list(report.recoveries), clock, legend=False)
    layout(fig, "Migration stream over time, both sides (samples.jsonl)", 560)
    fig.update_xaxes(range=clock.view())
    fig.update_xaxes(title_text=clock.axis, row=2, col=1)
    fig.update_yaxes(title_text="MiB", rangemode="tozero", row=1, col=1)
    fig.update_yaxes(title_text="MiB/s", rangemode="tozero", row=2, col=1)
    fig.update_layout(legend={"orientation": "h", "y": -0.14, "x": 0})
    if missing:
        note(fig, "<br>".join(missing), above=30)
    return fig


def blocktime_figure(report: Report) -> Any:
    """(d) Per-vCPU blocktime, QEMU's ``postcopy-vcpu-blocktime`` next to the trace's."""
    series: dict[str, dict[int, float | None]] = {"qemu": {}, "trace": {}}
    sources: dict[str, str] = {}
    for key, metric in report.blocktime.items():
        for kind, pattern in (("qemu", _BLOCKTIME_QEMU), ("trace", _BLOCKTIME_TRACE)):
            match = pattern.fullmatch(key)
            if match:
                value = metric.value
                series[kind][int(match.group(1))] = None if value is None else float(value)
                sources[kind] = metric.source
    vcpus = sorted(set(series["qemu"]) | set(series["trace"])
                   | {v.vcpu for v in report.guest_stalls})
    fig = go.Figure()
    labels = [f"vCPU {v}" for v in vcpus]
    names = {"qemu": "QEMU postcopy-vcpu-blocktime", "trace": "trace: blocktime begin → placed"}
    for kind, colour in (("qemu", "#5e35b1"), ("trace", "#00897b")):
        values = [series[kind].get(v) for v in vcpus]
        fig.add_trace(go.Bar(
            x=labels, y=values, name=f"{names[kind]} ({sources.get(kind, 'not reported')})",
            marker_color=colour, text=["-" if v is None else f"{v:,.1f}" for v in values],
            textposition="outside", cliponaxis=False,
            hovertemplate="%{x}: %{y:,.3f} ms<extra>" + names[kind] + "</extra>",
        ))
    fig.add_trace(go.Bar(
        x=[f"vCPU {v.vcpu}" for v in report.guest_stalls],
        y=[v.total_stalled_ms.value for v in report.guest_stalls],
        name="guest probe: sum of stalls over threshold (guest clock)", marker_color="#bdbdbd",
        visible="legendonly",
        hovertemplate="%{x}: %{y:,.3f} ms<extra>guest probe</extra>",
    ))
    total = report.blocktime.get("postcopy-blocktime (all vCPUs)")
    title = "Post-copy blocktime per vCPU"
    if total is not None and total.value is not None:
        title += f" (QEMU, all vCPUs overlapping: {total.value:,} {total.unit})"
    layout(fig, title, 360)
    # A few vCPUs would otherwise get bars as wide as the plot.
    fig.update_layout(barmode="group", bargap=0.55 if len(vcpus) < 4 else 0.2,
                      legend={"orientation": "h", "y": -0.2, "x": 0})
    fig.update_yaxes(title_text="ms", rangemode="tozero")
    notes = []
    if not series["qemu"]:
        notes.append("QEMU reported no per-vCPU blocktime (postcopy-blocktime capability off?)")
    if not series["trace"]:
        notes.append("the trace has no blocktime begin events for any vCPU")
    if notes:
        note(fig, "<br>".join(notes))
    return fig


# ---------------------------------------------------------------------------
# Tables


@dataclass(frozen=True)
class Cell:
    """A table cell: text, optionally a cited source (footnote number and its text)."""

    text: str
    source: int | None = None
    title: str = ""
    numeric: bool = False


@dataclass
class Table:
    """A titled table for the template: column names and rows of cells."""

    title: str
    columns: list[str]
    rows: list[list[Cell]] = field(default_factory=list)
    note: str = ""
    anchor: str = ""


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
    timings = Table("Timings", columns)
    for name, metric in report.timings.items():
        timings.rows.append(_metric_row(name, metric, sources))
    if report.freeze is not None:
        timings.rows.append(_metric_row("freeze (src STOP → dst RESUME)", report.freeze.freeze,
                                        sources))
        timings.rows.append(_metric_row("QEMU downtime", report.freeze.qemu_downtime, sources))
    tables.append(timings)
    transfer = Table("Transfer", columns,
                     [_metric_row(n, m, sources) for n, m in report.transfer.items()])
    tables.append(transfer)
    blocktime = Table("Blocktime", columns,
                      [_metric_row(n, m, sources) for n, m in report.blocktime.items()])
    blocktime.rows += [_metric_row(n, m, sources) for n, m in report.qemu_latency.items()]
    tables.append(blocktime)
    outside = report.outside_stalls
    if outside is not None:
        tables.append(Table("Outside view of the guest (heartbeats)", columns, [
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
        tables.append(Table("Memory integrity (guest verify)", ["field", "value"], [
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
    table = Table("Fetch latency per RAMBlock, ms", [
        "RAMBlock", "page", "faults", "resolved", "unresolved", *keys,
        "backlog p50 / max, placements", "placed (requested / background / zero)", "placed at",
        "src"], anchor="fetch")
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
        table.note = "no destination trace in this run"
    return table


def stall_tables(report: Report, sources: Sources, clock: Clock) -> list[Table]:
    """Per-vCPU guest stall summary and the worst stalls of both views."""
    per_vcpu = Table("Guest stalls per vCPU", [
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
    worst = Table("Worst stalls by the guest clock", ["t, s", "duration, ms", "vCPU", "phase"],
                  note="t: host wall clock, placed through the heartbeat before the stall")
    for stall in report.worst_guest_stalls:
        worst.rows.append([
            Cell(format_value(round(clock.s(stall.host_ns), 4)) if stall.host_ns else "-",
                 numeric=True),
            Cell(format_value(stall.duration_ms), numeric=True),
            Cell("-" if stall.vcpu is None else str(stall.vcpu)), Cell(stall.phase)])
    outside = Table("Worst heartbeat gaps (outside view)", ["t, s", "duration, ms", "phase"],
                    note="t: host wall clock at the heartbeat that opened the gap")
    if report.outside_stalls is not None:
        for stall in report.outside_stalls.worst:
            outside.rows.append([
                Cell(format_value(round(clock.s(stall.host_ns), 4)), numeric=True),
                Cell(format_value(stall.duration_ms), numeric=True), Cell(stall.phase)])
    tables = [per_vcpu, worst, outside]
    steps = report.guest_clock_steps
    if steps is not None and steps.steps:
        table = Table(f"Guest clock steps, not stalls: {format_value(steps.count.value)} "
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
    table = Table("Comparisons: one quantity, two sources",
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
    table = Table("Post-copy pauses and recoveries", [
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
    table = Table("Faults injected", [
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
    table = Table("Phases (host wall clock)", ["phase", "start, s", "end, s", "duration, ms"])
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


def _iso(ns: int) -> str:
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
        yield prefix, f"{value} ({_iso(value)})"
    else:
        yield prefix, format_value(value) if isinstance(value, bool) else \
            "null" if value is None else str(value)


def facts_table(meta: Mapping[str, Any]) -> Table:
    """Every field of ``run.json`` (host, QEMU, accelerator, plan, outcome), flattened."""
    return Table("Host and QEMU facts (run.json)", ["field", "value"],
                 [[Cell(k), Cell(v)] for k, v in _flatten("", meta)], anchor="facts")


# ---------------------------------------------------------------------------
# The page


@dataclass(frozen=True)
class Plot:
    """One figure for the template: its div id, caption and serialised figure."""

    div_id: str
    title: str
    caption: str
    figure_json: Markup


def plot(div_id: str, title: str, caption: str, fig: Any) -> Plot:
    """``fig`` as a :class:`Plot` of a report page, in ``<div id=div_id>``, with the
    page's plotly config."""
    # Plotly.newPlot takes {data, layout, config} as one object.  plotly's encoder escapes
    # <, > and /, so text from the run directory cannot end the <script> it lands in.
    figure = {**fig.to_plotly_json(), "config": PLOT_CONFIG}
    return Plot(div_id, title, caption, Markup(to_json_plotly(figure)))


def environment(*template_dirs: Path) -> Environment:
    """The Jinja environment of the report pages; ``template_dirs`` come before
    :data:`TEMPLATES`, so a page elsewhere (the suite page) can import ``_macros.html.j2``."""
    return Environment(loader=FileSystemLoader([*template_dirs, TEMPLATES]), autoescape=True,
                       undefined=StrictUndefined, trim_blocks=True, lstrip_blocks=True,
                       keep_trailing_newline=True)


def render_run_html(data: RunPageData) -> str:
    """The HTML report of one run directory (see module docstring) from what
    :func:`migrator.metrics.run_page.load_run_page_data` read there; writes nothing."""
    report, clock, meta = data.report, data.clock, data.meta
    plots = [
        plot("plot-fetch-cdf", "Fetch latency",
              "Cumulative distribution of per-page fetch latency per RAMBlock (destination "
              "QEMU trace, report.fetch[*].histogram; steps are histogram bucket bounds).",
              fetch_cdf_figure(report, data.fetch_cdfs)),
        plot("plot-stall-timeline", "Guest stalls",
              "Each marker is one stall of one vCPU by the guest's clock (src/dst "
              "console.jsonl), placed on the host clock; crosses are gaps between heartbeat "
              "arrivals (host clock), which also count the time the VM was stopped. Bands are "
              "the phases of report.phases; the strip along the top marks pre-copy passes; purple "
              "bands are post-copy pauses (report.recoveries).",
              stall_timeline_figure(report, data.stalls, clock, data.threshold_ms)),
        plot("plot-transfer", "Transfer",
              "query-migrate sampled on both sides (samples.jsonl), at reply time; throughput "
              "is the mean between two consecutive samples. QEMU's own ram.mbps is in the "
              "legend, hidden by default.",
              transfer_figure(report, data.samples, clock)),
        plot("plot-blocktime", "Blocktime",
              "Time each vCPU spent blocked on post-copy faults: QEMU's postcopy-vcpu-blocktime "
              "(destination query-migrate) next to the trace's (report.blocktime). The guest "
              "probe's stalled time is in the legend, hidden by default.",
              blocktime_figure(report)),
    ]
    sources = Sources()
    recovery = [pause_table(report, sources, clock)] if report.recoveries else []
    if report.faults:
        recovery.append(fault_table(report, sources, clock))
    tables_main = headline_tables(report, sources)
    fetch = fetch_table(report, sources)
    stalls = stall_tables(report, sources, clock)
    comparisons = comparison_table(report, sources)
    template = environment().get_template("run.html.j2")
    return template.render(
        report=report, report_origin=data.report_origin, plots=plots, recovery=recovery,
        badge=severity(report.outcome),
        plotly_js=Markup(get_plotlyjs()), headline=tables_main, fetch=fetch, stalls=stalls,
        comparisons=comparisons, phases=phase_table(report, clock),
        facts=facts_table(meta), scenario_text=data.scenario_text,
        sources=sorted(((n, s) for s, n in sources.numbers.items())),
        t0=f"{_iso(clock.t0_ns)} ({clock.what})", env_line=environment_line(report),
        migrator_version=str(report.environment.get("migrator_version") or ""),
    )


def write_run_html(run_path: Path, data: RunPageData) -> Path:
    """Write ``RUN/report.html`` atomically from ``data`` (what
    :func:`migrator.metrics.run_page.load_run_page_data` read in ``run_path``); returns its path."""
    target = run_path / "report.html"
    atomic_write(target, render_run_html(data))
    return target
