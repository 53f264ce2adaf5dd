"""The run report's plotly figures: fetch latency CDF, guest stall timeline, transfer, blocktime,
host CPU per QEMU thread.

Each is drawn from what :func:`migrator.metrics.run_page.load_run_page_data`
read (:mod:`migrator.pagedata`); :func:`plot` serialises one for a page.  The
helpers (:func:`layout`, :func:`note`, :func:`log_axis`, :func:`cdf_figure`)
give the suite page and the dashboard the same look.  Stall and heartbeat-gap
series with more points than :data:`MAX_POINTS` keep their largest values and
say so in their legend, so a page stays small whatever the length of the run.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt
import plotly.graph_objects as go  # type: ignore[import-untyped]
from markupsafe import Markup
from plotly.io.json import to_json_plotly  # type: ignore[import-untyped]
from plotly.subplots import make_subplots  # type: ignore[import-untyped]

from migrator.model import PauseRecord, Phase, Report
from migrator.pagedata import BlockCdf, Cdf, Clock, SideSamples, StallView, ThreadLoad
from migrator.units import format_size

__all__ = ["MAX_POINTS", "MIB", "PLOT_CONFIG", "SIDE_NAMES", "Plot", "block_cdf_trace",
           "blocktime_figure", "cdf_figure", "cdf_trace", "fetch_cdf_figure", "layout",
           "log_axis", "mark_switchover", "note", "plot", "stall_timeline_figure",
           "thread_colour", "thread_figure", "thread_trace", "throughput", "transfer_figure"]

#: Most markers one series of a plot carries (the largest values are kept).
MAX_POINTS = 20_000
MIB = float(1 << 20)
# Fill colours of the phases (see PhaseTimeline.from_events for their meaning).
PHASE_COLOURS = {
    "boot": "#9e9e9e", "warmup": "#4db6ac", "setup": "#fdd835", "precopy": "#42a5f5",
    "freeze": "#e53935", "postcopy": "#fb8c00", "settle": "#7cb342", "verify": "#8e24aa",
}
PASS_COLOURS = ("#0d47a1", "#90caf9")
# Post-copy pauses, drawn over the phases (see add_pauses).
PAUSE_COLOUR = "#6a1b9a"
PLOT_CONFIG = {
    "displaylogo": False,
    "responsive": True,
    "toImageButtonOptions": {"format": "png", "scale": 2},
}
# Each kind of QEMU thread has its colour on every page; vCPUs take VCPU_COLOURS in turn.
THREAD_COLOURS = {
    "migration": "#d81b60", "return path": "#00897b", "post-copy fault": "#8e24aa",
    "post-copy listen": "#fb8c00", "multifd": "#c0ca33", "main loop": "#6d4c41",
    "other": "#9e9e9e",
}
VCPU_COLOURS = ("#1e88e5", "#43a047", "#00acc1", "#3949ab", "#7cb342", "#039be5")
#: The thread kinds a thread plot shows at first (the others are a click away in the
#: legend): where post-copy time goes.
SHOWN_THREADS = ("migration", "post-copy fault")
SIDE_NAMES = {"src": "source", "dst": "destination"}
_BLOCKTIME_QEMU = re.compile(r"postcopy-vcpu-blocktime\[(\d+)\]")
_BLOCKTIME_TRACE = re.compile(r"trace blocktime vCPU (\d+)")

F64 = npt.NDArray[np.float64]


def largest_indices(values: F64, limit: int = MAX_POINTS) -> npt.NDArray[np.intp]:
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


def block_cdf_trace(name: str, block: BlockCdf) -> Any:
    """:func:`cdf_trace` of one RAMBlock's CDF, named ``name · page size · faults``."""
    return cdf_trace(block.cdf, f"{name} · {format_size(block.page_size)} pages · "
                                f"{block.cdf.count:,} faults")


def cdf_figure(traces: Iterable[Any], title: str, height: int, empty: str) -> Any:
    """Fetch latency CDF ``traces`` overlaid, log x (the look of every page's CDF);
    ``empty``: what an empty plot says."""
    fig = go.Figure()
    for trace in traces:
        fig.add_trace(trace)
    layout(fig, title, height)
    fig.update_xaxes(**log_axis("fetch latency, ms (log)"))
    fig.update_yaxes(title_text="fraction of faults ≤ x", range=[0, 1.02], tickformat=".0%")
    fig.update_layout(legend={"orientation": "h", "y": -0.22, "x": 0})
    if not fig.data:
        note(fig, empty, centre=True)
    return fig


def fetch_cdf_figure(report: Report, cdfs: Iterable[BlockCdf]) -> Any:
    """(a) Fetch latency CDF per RAMBlock, log x, from each block's histogram buckets.

    ``cdfs``: the blocks' CDFs (:func:`migrator.metrics.run_page.fetch_cdfs`).
    Each step is a bucket's upper bound (clamped to the exact max): the
    fraction of faults whose latency is at most that, within the histogram's
    stated relative error.  QEMU's own ``postcopy-latency-dist`` is added when
    the destination reported it.
    """
    traces = [block_cdf_trace(block.ramblock, block) for block in cdfs]
    dist = report.qemu_latency_dist
    if dist and any(dist.get("counts", [])):
        counts = np.array(dist["counts"], dtype=np.float64)
        # Bucket k holds [2^k, 2^(k+1)) us; the last is open-ended, so it is drawn at its
        # lower bound.
        upper_us = 2.0 ** np.arange(1, counts.size + 1)
        upper_us[-1] = 2.0 ** (counts.size - 1)
        traces.append(go.Scatter(
            x=upper_us / 1e3, y=np.cumsum(counts) / counts.sum(), mode="lines+markers",
            line={"dash": "dot"}, line_shape="hv",
            name="QEMU postcopy-latency-dist (all blocks, power-of-2 buckets)",
            hovertemplate="< %{x:.4g} ms: %{y:.1%} of faults<extra>QEMU</extra>",
        ))
    return cdf_figure(
        traces, "Per-page fetch latency CDF (destination trace: fault request → page placed)",
        420, "no fetch latencies: the run has no destination trace or took no faults")


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
        keep = largest_indices(gaps)
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
        over = largest_indices(hb.gaps_ms)
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


def throughput(data: SideSamples) -> tuple[F64, F64]:
    """Δ ``ram.transferred`` / Δt between consecutive samples of one side, in MiB/s, at the
    middle of each interval (intervals of no length are left out)."""
    dt = np.diff(data.t_s)
    ok = dt > 0
    return (data.t_s[1:] + data.t_s[:-1])[ok] / 2, np.diff(data.transferred)[ok] / dt[ok] / MIB


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
            mid, rate = throughput(data)
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


def thread_colour(thread: str) -> str:
    """The colour of one kind of thread (:data:`THREAD_COLOURS`, vCPUs in turn)."""
    if thread.startswith("vCPU "):
        return VCPU_COLOURS[int(thread.split()[1]) % len(VCPU_COLOURS)]
    return THREAD_COLOURS.get(thread, "#9e9e9e")


def thread_trace(load: ThreadLoad, name: str, shift_s: float = 0.0, **line: Any) -> Any:
    """One kind of thread's CPU use over time as a line in % of one core, its x moved by
    ``shift_s``; ``line``: the line's style (its colour, dash)."""
    count = f" ({load.threads} threads, summed)" if load.threads > 1 else ""
    return go.Scatter(
        x=load.t_s + shift_s, y=load.percent, mode="lines+markers", marker={"size": 4},
        line=line, name=name + count,
        hovertemplate="around t = %{x:.3f} s<br>%{y:.0f} % of one core"
                      f"<extra>{load.side} {load.thread}</extra>",
    )


def mark_switchover(fig: Any, x: float, text: str) -> None:
    """A dashed vertical line at ``x`` (s) over the whole plot, labelled at its top."""
    fig.add_shape(type="line", xref="x", yref="paper", x0=x, x1=x, y0=0, y1=1,
                  line={"color": "#212121", "width": 1.5, "dash": "dash"})
    fig.add_annotation(text=text, xref="x", x=x, yref="paper", y=0.9, yanchor="top",
                       xanchor="left", xshift=3, showarrow=False, bgcolor="rgba(255,255,255,0.8)",
                       font={"size": 11, "color": "#212121"})


def thread_figure(report: Report, loads: list[ThreadLoad], clock: Clock,
                  switchover_ns: int | None) -> Any:
    """(e) Host CPU over time of each kind of QEMU thread, source above destination.

    vCPUs, the source's migration thread and the destination's post-copy fault
    thread are shown; the other kinds (return path, listen thread, main loop...)
    are in the legend, hidden.  Phases shaded as on the transfer plot; the
    switchover (the source's STOP) is a dashed line.
    """
    fig = make_subplots(rows=2, cols=1, shared_xaxes=True, vertical_spacing=0.1,
                        subplot_titles=tuple(
                            f"{SIDE_NAMES[side]} QEMU threads ({side}/threads.jsonl)"
                            for side in ("src", "dst")))
    for row, side in enumerate(("src", "dst"), start=1):
        for load in (one for one in loads if one.side == side):
            trace = thread_trace(load, f"{side}: {load.thread}", color=thread_colour(load.thread))
            if not (load.thread.startswith("vCPU ") or load.thread in SHOWN_THREADS):
                trace.visible = "legendonly"
            fig.add_trace(trace, row=row, col=1)
    add_phases(fig, list(report.phases), clock, legend=False)
    add_pauses(fig, list(report.recoveries), clock, legend=False)
    if switchover_ns is not None:
        mark_switchover(fig, clock.s(switchover_ns), "switchover (src STOP)")
    layout(fig, "Host CPU per QEMU thread over time, % of one core "
                "(/proc/PID/task/*/stat utime + stime, sampled on each QEMU's host)", 560)
    fig.update_xaxes(range=clock.view())
    fig.update_xaxes(title_text=clock.axis, row=2, col=1)
    for row in (1, 2):
        fig.update_yaxes(title_text="% of one core", rangemode="tozero", row=row, col=1)
    fig.update_layout(legend={"orientation": "h", "y": -0.14, "x": 0})
    notes = []
    for side in ("src", "dst"):
        mine = [one for one in loads if one.side == side]
        if not mine:
            notes.append(f"{side}: no {side}/threads.jsonl with two samples or more (a run "
                         "recorded before thread sampling, or a QEMU that was gone at once)")
        else:
            notes.append(f"{side}: resolution {mine[0].tick_percent:.3g} % of one core (one "
                         "clock tick per median interval); a sample answered late moves ticks "
                         "into the next interval")
    note(fig, "<br>".join(notes), above=30)
    return fig


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

