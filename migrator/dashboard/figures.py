"""The dashboard's charts as plain plotly.js figure dicts: a scenario's history, the overview.

Building plotly.py Figures for thousands of points per chart would take most of
the build, so these are the dicts plotly.js reads.  Clicking a point opens its
run's report (a history) or its scenario's page (the overview).
"""

from __future__ import annotations

import statistics
from collections import defaultdict
from collections.abc import Mapping, Sequence
from datetime import UTC, date, datetime, timedelta
from typing import Any

from markupsafe import Markup
from plotly.io.json import to_json_plotly  # type: ignore[import-untyped]

from migrator.dashboard.views import ScenarioView, night_of
from migrator.report.figures import PLOT_CONFIG, Plot
from migrator.results.compare import MetricVerdict, Verdict

__all__ = ["RECENT_DAYS", "dashboard_plot", "history_figure", "overview_figure"]

_COLOURS = {"history": "#9e9e9e", "baseline": "#1f77b4", "candidate": "#111111",
            Verdict.REGRESSION: "#cf222e", Verdict.IMPROVEMENT: "#1a7f37", "median": "#555555"}
_GRID = "#e5e8ee"
#: Days a long history chart opens on (its autoscale button shows every run).
RECENT_DAYS = 90


def _when(row: Mapping[str, Any]) -> str:
    # plotly.js reads "yyyy-mm-dd HH:MM:SS" as a date; an offset suffix it does not.
    stamp: datetime = row["run_date"].astimezone(UTC)
    return stamp.strftime("%Y-%m-%d %H:%M:%S")


def _layout(title: str, y_title: str, height: int = 320) -> dict[str, Any]:
    return {
        "title": {"text": title, "x": 0.01, "xanchor": "left", "font": {"size": 14}},
        "height": height, "margin": {"l": 64, "r": 16, "t": 40, "b": 64},
        "paper_bgcolor": "#ffffff", "plot_bgcolor": "#ffffff", "font": {"size": 12},
        "hovermode": "closest", "hoverlabel": {"namelength": -1},
        "xaxis": {"type": "date", "gridcolor": _GRID, "linecolor": "#bbbbbb"},
        "yaxis": {"gridcolor": _GRID, "zerolinecolor": _GRID, "linecolor": "#bbbbbb",
                  "rangemode": "tozero", "title": {"text": y_title}},
        # Below the date ticks, which take two lines ("00:00" over "Nov 22, 2026").
        "legend": {"orientation": "h", "x": 0, "y": -0.2, "yanchor": "top"},
    }


def _recent(layout: dict[str, Any], xs: Sequence[str]) -> None:
    """Open a long history on its last :data:`RECENT_DAYS` days (autoscale shows it all)."""
    if not xs:
        return
    first, last = min(xs), max(xs)
    start = datetime.fromisoformat(last) - timedelta(days=RECENT_DAYS)
    if datetime.fromisoformat(first) < start - timedelta(days=RECENT_DAYS // 2):
        end = datetime.fromisoformat(last) + timedelta(days=1)
        layout["xaxis"]["range"] = [f"{start:%Y-%m-%d %H:%M:%S}", f"{end:%Y-%m-%d %H:%M:%S}"]


def dashboard_plot(div_id: str, title: str, caption: str, figure: dict[str, Any]) -> Plot:
    """A plotly.js figure dict as a page's :class:`~migrator.report.figures.Plot`."""
    # plotly's encoder escapes <, > and /, so scenario names cannot end the <script>.
    return Plot(div_id, title, caption,
                Markup(to_json_plotly({**figure, "config": PLOT_CONFIG})))


def _night_medians(rows: Sequence[Mapping[str, Any]], metric: str,
                   samples: Mapping[str, Mapping[str, float]],
                   night_start: int) -> tuple[list[str], list[float]]:
    """Per night: the mean run time and the median value of ``metric``."""
    per_night: dict[date, list[tuple[float, float]]] = defaultdict(list)
    for row in rows:
        value = samples[row["run_id"]].get(metric)
        if value is not None:
            per_night[night_of(row["run_date"], night_start)].append(
                (row["run_date"].timestamp(), value))
    xs, ys = [], []
    for night in sorted(per_night):
        points = per_night[night]
        middle = datetime.fromtimestamp(statistics.fmean(t for t, _ in points), UTC)
        xs.append(middle.strftime("%Y-%m-%d %H:%M:%S"))
        ys.append(statistics.median(v for _, v in points))
    return xs, ys


def history_figure(view: ScenarioView, metric: str, label: str, unit: str,
                   samples: Mapping[str, Mapping[str, float]], link_index: Mapping[str, int],
                   verdict: MetricVerdict | None, night_start: int) -> dict[str, Any]:
    """Every run of the scenario as a point (baseline and candidate marked), nightly medians."""
    role = {r["run_id"]: "baseline" for r in view.baseline}
    role.update({r["run_id"]: "candidate" for r in view.candidate})
    seen: dict[str, Mapping[str, Any]] = {}
    for row in (*view.history, *view.baseline, *view.candidate):
        seen.setdefault(row["run_id"], row)
    rows = sorted(seen.values(), key=lambda r: (r["run_date"], r["run_id"]))
    series: dict[str, tuple[list[str], list[float], list[int]]] = {
        k: ([], [], []) for k in ("history", "baseline", "candidate")}
    for run in rows:
        value = samples[run["run_id"]].get(metric)
        if value is None:
            continue
        xs, ys, links = series[role.get(run["run_id"], "history")]
        xs.append(_when(run))
        ys.append(value)
        links.append(link_index[run["run_id"]])
    kind = verdict.verdict if verdict is not None else Verdict.INSUFFICIENT
    names = {"history": "earlier runs", "baseline": f"baseline ({len(view.baseline)} runs)",
             "candidate": f"latest ({len(view.candidate)} runs)"
                          + (f": {kind.value}" if verdict is not None else "")}
    traces: list[dict[str, Any]] = []
    for key, (xs, ys, links) in series.items():
        if not xs:
            continue
        colour = _COLOURS.get(kind, _COLOURS["candidate"]) if key == "candidate" \
            else _COLOURS[key]
        traces.append({
            "type": "scatter", "mode": "markers", "name": names[key], "x": xs, "y": ys,
            "customdata": links,
            "marker": {"color": colour, "size": 8 if key == "candidate" else 5,
                       "opacity": 0.9 if key != "history" else 0.6},
            "hovertemplate": "%{x}<br>%{y:.4g} " + unit + "<br>click: run report<extra>"
                             + names[key] + "</extra>",
        })
    xs_m, ys_m = _night_medians(rows, metric, samples, night_start)
    if len(xs_m) > 1:
        traces.insert(0, {
            "type": "scatter", "mode": "lines", "name": "nightly median", "x": xs_m, "y": ys_m,
            "line": {"color": _COLOURS["median"], "width": 1.5}, "hoverinfo": "skip"})
    title = label if metric == label else f"{label} · {metric}"
    layout = _layout(title, f"{unit or 'value'}")
    base_x = series["baseline"][0]
    if base_x:
        layout["shapes"] = [{"type": "rect", "xref": "x", "yref": "paper", "x0": base_x[0],
                             "x1": base_x[-1], "y0": 0, "y1": 1, "fillcolor": "#1f77b4",
                             "opacity": 0.08, "line": {"width": 0}, "layer": "below"}]
    _recent(layout, [x for xs, _, _ in series.values() for x in xs])
    return {"data": traces, "layout": layout}


def overview_figure(views: Sequence[ScenarioView], template: str, label: str, unit: str,
                    samples: Mapping[str, Mapping[str, float]], night_start: int) -> dict[str, Any]:
    """One line per scenario: nightly medians of a headline metric; a click opens the scenario."""
    traces: list[dict[str, Any]] = []
    for index, view in enumerate(views):
        metric = view.metric(template)
        if metric is None:
            continue
        xs, ys = _night_medians(view.history or view.candidate, metric, samples, night_start)
        if not xs:
            continue
        traces.append({
            "type": "scatter", "mode": "lines+markers", "name": view.name, "x": xs, "y": ys,
            "customdata": [index] * len(xs), "marker": {"size": 4}, "line": {"width": 1.5},
            "hovertemplate": "%{x}<br>%{y:.4g} " + unit + "<br>click: scenario page<extra>"
                             + view.name + "</extra>",
        })
    layout = _layout(label, f"{unit or 'value'} (log)", height=340)
    layout["yaxis"]["type"] = "log"
    layout["yaxis"].pop("rangemode")
    _recent(layout, [x for trace in traces for x in trace["x"]])
    return {"data": traces, "layout": layout}
