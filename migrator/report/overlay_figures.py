"""The overlay page's plotly figures: several runs in one plot each.

Drawn from what :func:`migrator.metrics.run_overlay.load_overlay_data` read
(:class:`~migrator.pagedata.OverlayData`): the fetch latency CDFs of each page
size, the guest stalls and the migration stream over time, and host CPU per
QEMU thread.  Time axes are in s since each run's own t = 0, its switchover
(``OverlayRun.zero_what``), so the runs line up where the guest left the
source.  Each run keeps one colour on every figure, and its traces form one
legend group titled with its label.  The look and the helpers are the run
page's (:mod:`migrator.report.figures`).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any

import numpy as np
import plotly.graph_objects as go  # type: ignore[import-untyped]
from plotly.subplots import make_subplots  # type: ignore[import-untyped]

from migrator.pagedata import OverlayData, OverlayRun
from migrator.report.figures import (
    MAX_POINTS,
    MIB,
    SIDE_NAMES,
    cdf_figure,
    cdf_trace,
    largest_indices,
    layout,
    log_axis,
    mark_switchover,
    note,
    thread_trace,
    throughput,
)
from migrator.units import format_size

__all__ = ["RUN_COLOURS", "X_AXIS", "overlay_cdf_figures", "overlay_stall_figure",
           "overlay_thread_figure", "overlay_transfer_figure", "run_colour"]

#: One colour per run, the same on every figure of the page.
RUN_COLOURS = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#17becf", "#8c564b",
               "#e377c2", "#7f7f7f", "#bcbd22")
X_AXIS = "s since each run's t = 0: its switchover, else its migrate (host wall clock)"
# Legend entries are long (a run's label): one per line under the plot, each taking this
# many pixels, so that a figure grows with its legend instead of squeezing its plot.
_LEGEND_LINE_PX = 21


def run_colour(index: int) -> str:
    """The colour of the ``index``-th run."""
    return RUN_COLOURS[index % len(RUN_COLOURS)]


def _grouped(trace: Any, index: int, run: OverlayRun, first: bool) -> Any:
    """``trace`` in the legend group of run ``index``, titled with its label."""
    trace.update(legendgroup=f"run-{index}")
    if first:
        trace.update(legendgrouptitle_text=run.label)
    return trace


def _legend_below(fig: Any, entries: int, plot_px: int) -> None:
    """A vertical legend under the plot, one entry per line; the figure grows to hold it."""
    # The legend's top sits about 70 px under the plot area (clear of the x axis title);
    # the plot area is the figure's height less its margins, ~110 px.
    fig.update_layout(height=plot_px + entries * _LEGEND_LINE_PX, showlegend=True,
                      legend={"orientation": "v", "x": 0, "y": -70 / (plot_px - 110),
                              "yanchor": "top", "groupclick": "toggleitem",
                              "tracegroupgap": 6})


def _x_range(data: OverlayData) -> list[float]:
    """Every run's initial view (from its warm-up to the last thing it saw), moved onto the
    overlay's axis, all together."""
    spans = [[x + run.shift_s for x in run.page.clock.view()] for run in data.runs]
    return [min(lo for lo, _ in spans), max(hi for _, hi in spans)]


def overlay_cdf_figures(data: OverlayData) -> Iterator[tuple[int, Any]]:
    """(page size, figure): the fetch latency CDF of every RAMBlock of that page size that
    took faults, of every run, overlaid; one figure per page size, smallest first (one
    empty figure, page size 0, when no run has fetch latencies)."""
    sizes = sorted({block.page_size for run in data.runs for block in run.page.fetch_cdfs})
    if not sizes:
        yield 0, cdf_figure([], "Per-page fetch latency CDF", 420,
                            "no run has fetch latencies: no destination trace, or no faults")
    for size in sizes:
        traces = []
        for index, run in enumerate(data.runs):
            for block in run.page.fetch_cdfs:
                if block.page_size != size:
                    continue
                trace = cdf_trace(block.cdf, f"{run.label} · {block.ramblock} · "
                                             f"{block.cdf.count:,} faults")
                trace.update(line_color=run_colour(index), marker_color=run_colour(index))
                traces.append(trace)
        fig = cdf_figure(traces, f"Per-page fetch latency CDF, {format_size(size)} pages "
                                 "(destination trace: fault request → page placed)", 420,
                         "no faults")
        _legend_below(fig, len(traces), 420)
        yield size, fig


def overlay_stall_figure(data: OverlayData) -> Any:
    """Every guest stall (the guest's clock) and heartbeat gap (the controller's) of every
    run on one time axis, t = 0 at each run's switchover, log y."""
    fig = go.Figure()
    entries = 0
    for index, run in enumerate(data.runs):
        colour, shift, first = run_colour(index), run.shift_s, True
        clock, view = run.page.clock, run.page.stalls
        if view.series:
            starts = np.concatenate([np.array(s.starts_ns, dtype=np.int64) for s in view.series])
            gaps = np.concatenate([s.gaps_ms for s in view.series])
            vcpus = np.concatenate([np.full(len(s.starts_ns), s.vcpu) for s in view.series])
            keep = largest_indices(gaps)
            name = "guest stalls, every vCPU (guest clock)"
            if keep.size < gaps.size:
                name += f", {keep.size:,} longest of {gaps.size:,}"
            fig.add_trace(_grouped(go.Scatter(
                x=np.array([clock.s(int(ns)) for ns in starts[keep]]) + shift, y=gaps[keep],
                mode="markers", marker={"size": 7, "opacity": 0.75, "color": colour},
                name=name, customdata=vcpus[keep],
                hovertemplate="t = %{x:.4f} s<br>%{y:.4g} ms<br>vCPU %{customdata}"
                              f"<extra>{run.page.report.run_id}</extra>",
            ), index, run, first))
            first, entries = False, entries + 1
        hb = view.heartbeat_gaps
        if hb is not None and hb.gaps_ms.size:
            over = largest_indices(hb.gaps_ms)
            name = f"heartbeat gaps > {hb.cut_ms:.3g} ms (host clock)"
            if over.size < hb.gaps_ms.size:
                name += f", {MAX_POINTS:,} longest of {hb.gaps_ms.size:,}"
            fig.add_trace(_grouped(go.Scatter(
                x=np.array([clock.s(int(ns)) for ns in hb.starts_ns[over]]) + shift,
                y=hb.gaps_ms[over], mode="markers", name=name,
                marker={"symbol": "x-thin", "size": 9, "line": {"width": 2, "color": colour}},
                hovertemplate="gap from t = %{x:.4f} s<br>%{y:.4g} ms"
                              f"<extra>{run.page.report.run_id}</extra>",
            ), index, run, first))
            first, entries = False, entries + 1
    thresholds = {run.page.threshold_ms for run in data.runs}
    if len(thresholds) == 1:
        [threshold] = thresholds
        fig.add_hline(y=threshold, line={"dash": "dot", "color": "#757575", "width": 1})
        # Annotations on a log axis take log10(y).
        fig.add_annotation(text=f"probe threshold {threshold:g} ms", xref="paper", x=1.0,
                           yref="y", y=math.log10(threshold), xanchor="right",
                           yanchor="bottom", showarrow=False, font={"size": 11, "color": "#555"})
    mark_switchover(fig, 0.0, "t = 0")
    layout(fig, "Guest stalls of every run, aligned at the switchover", 480)
    fig.update_xaxes(title_text=X_AXIS, range=_x_range(data))
    fig.update_yaxes(**log_axis("stall duration, ms (log)"))
    _legend_below(fig, entries + len(data.runs), 480)
    if not fig.data:
        note(fig, "no run has guest stalls or heartbeat gaps", centre=True)
    return fig


def overlay_transfer_figure(data: OverlayData) -> Any:
    """Bytes remaining and throughput (Δ ``ram.transferred`` / Δt) of every run over time,
    from both sides' ``query-migrate`` samples; the destination's dotted."""
    fig = make_subplots(rows=2, cols=1, shared_xaxes=True, vertical_spacing=0.09,
                        subplot_titles=("bytes remaining (query-migrate ram.remaining)",
                                        "throughput (Δ ram.transferred / Δt between samples)"))
    entries = 0
    for index, run in enumerate(data.runs):
        first = True
        for side, dash in (("src", "solid"), ("dst", "dot")):
            samples = run.page.samples.get(side)
            if samples is None or samples.t_s.size == 0:
                continue
            line = {"color": run_colour(index), "dash": dash}
            fig.add_trace(_grouped(go.Scatter(
                x=samples.t_s + run.shift_s, y=samples.remaining / MIB, mode="lines",
                line=line, name=f"{SIDE_NAMES[side]}: ram.remaining",
                hovertemplate="t = %{x:.3f} s<br>%{y:.1f} MiB"
                              f"<extra>{run.page.report.run_id} {side}</extra>",
            ), index, run, first), row=1, col=1)
            first, entries = False, entries + 1
            if samples.t_s.size > 1:
                mid, rate = throughput(samples)
                fig.add_trace(_grouped(go.Scatter(
                    x=mid + run.shift_s, y=rate, mode="lines+markers", marker={"size": 4},
                    line=line, name=f"{SIDE_NAMES[side]}: Δ ram.transferred / Δt",
                    hovertemplate="around t = %{x:.3f} s<br>%{y:.1f} MiB/s"
                                  f"<extra>{run.page.report.run_id} {side}</extra>",
                ), index, run, False), row=2, col=1)
                entries += 1
    mark_switchover(fig, 0.0, "t = 0")
    layout(fig, "Migration stream of every run over time (samples.jsonl), aligned at the "
                "switchover", 560)
    fig.update_xaxes(range=_x_range(data))
    fig.update_xaxes(title_text=X_AXIS, row=2, col=1)
    fig.update_yaxes(title_text="MiB", rangemode="tozero", row=1, col=1)
    fig.update_yaxes(title_text="MiB/s", rangemode="tozero", row=2, col=1)
    _legend_below(fig, entries + len(data.runs), 560)
    if not fig.data:
        note(fig, "no run has query-migrate samples with ram statistics", above=30)
    return fig


def overlay_thread_figure(data: OverlayData) -> Any:
    """Host CPU over time of the source's migration thread, the destination's post-copy
    fault thread and each side's vCPUs (summed, dashed), for every run, in % of one core."""
    fig = make_subplots(rows=2, cols=1, shared_xaxes=True, vertical_spacing=0.1,
                        subplot_titles=tuple(
                            f"{SIDE_NAMES[side]} QEMU threads ({side}/threads.jsonl)"
                            for side in ("src", "dst")))
    entries, without = 0, []
    for index, run in enumerate(data.runs):
        if not run.threads:
            without.append(run.page.report.run_id)
        for position, load in enumerate(run.threads):
            dash = "dash" if load.thread == "vCPUs" else "solid"
            fig.add_trace(_grouped(thread_trace(load, f"{load.side}: {load.thread}", run.shift_s,
                                                color=run_colour(index), dash=dash),
                                   index, run, position == 0),
                          row=1 if load.side == "src" else 2, col=1)
            entries += 1
    mark_switchover(fig, 0.0, "t = 0")
    layout(fig, "Host CPU per QEMU thread of every run, % of one core (/proc/PID/task/*/stat "
                "utime + stime, sampled on each QEMU's host)", 560)
    fig.update_xaxes(range=_x_range(data))
    fig.update_xaxes(title_text=X_AXIS, row=2, col=1)
    for row in (1, 2):
        fig.update_yaxes(title_text="% of one core", rangemode="tozero", row=row, col=1)
    _legend_below(fig, entries + len(data.runs), 560)
    if without:
        note(fig, "no thread samples (recorded before thread sampling?): " + ", ".join(without),
             above=30)
    return fig
