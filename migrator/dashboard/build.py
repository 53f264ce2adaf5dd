"""The nightly dashboard: a static site built from the results store.

What is compared with what
    Runs are grouped by ``scenario_hash`` (the same resolved scenario.toml: the
    same experiment).  A group's *nights* are the 24 h periods starting at
    ``night_start_hour`` UTC (default 12:00, so a job that runs across midnight
    stays one night), each named by the date it starts on.

    * candidate (default): the group's runs of its newest night;
    * baseline (default): the group's runs of the ``nights`` (7) nights before
      the candidate's first night.  A week smooths one odd night without keeping
      a change accepted long ago in the reference; a night that did not run
      simply is not there (the baseline is the last 7 nights that ran).

    ``candidate`` / ``baseline`` selectors replace either side; selected runs
    are still grouped by scenario hash, and a candidate group without baseline
    runs of its hash takes those of its scenario name (two QEMU builds named in
    scenario.toml give two hashes of one scenario), and the page says so.

    Verdicts are :func:`migrator.results.compare.compare`'s, with the same
    rules and alpha as ``migrator compare``: the dashboard and CI agree.

The site (every page opens from disk, no network)::

    DIR/index.html              latest night vs baseline of every scenario, regressions,
                                overview charts (nightly medians)
    DIR/scenarios/<slug>.html   one scenario: verdict of every metric, its latest runs,
                                history charts of the headline metrics (every run a point)
    DIR/runs/<run_id>.html      a run's numbers from its stored report.json, written only
                                for runs whose report.html is not under ``runs_root``
    DIR/assets/plotly.min.js    plotly.js, once, for every page
    DIR/metrics.prom            the latest summaries for Prometheus (:mod:`.prometheus`)

Clicking a point of a history chart opens that run's report.  Run pages are
kept between builds and rewritten only when the run's stored report (its
sha256) or the page layout changed, so a nightly rebuild writes a night's worth
of them.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import re
import statistics
import time
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from concurrent.futures import ProcessPoolExecutor
from contextlib import ExitStack
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import quote

from jinja2 import ChoiceLoader, Environment, FileSystemLoader, StrictUndefined
from markupsafe import Markup
from plotly.io.json import to_json_plotly  # type: ignore[import-untyped]
from plotly.offline import get_plotlyjs  # type: ignore[import-untyped]
from pydantic import ValidationError

import migrator
from migrator.dashboard.prometheus import (
    LatestSummary,
    render_textfile,
    write_textfile,
)
from migrator.errors import ConfigError
from migrator.model import SCHEMA_VERSION, Report
from migrator.outcome import severity
from migrator.report.html import (
    PLOT_CONFIG,
    Cell,
    Plot,
    Table,
    comparison_table,
    environment_line,
    fetch_table,
    headline_tables,
)
from migrator.report.html import TEMPLATES as REPORT_TEMPLATES
from migrator.report.sources import Sources
from migrator.results.compare import (
    ALPHA,
    DEFAULT_RULES,
    MetricRule,
    MetricVerdict,
    Verdict,
    compare,
)
from migrator.results.schema import DIMENSIONS
from migrator.results.store import ResultsStore, Selector
from migrator.rundir import atomic_write
from migrator.units import format_value

__all__ = [
    "DEFAULT_NIGHTS",
    "DEFAULT_NIGHT_START",
    "HEADLINE",
    "DashboardOptions",
    "DashboardResult",
    "ScenarioView",
    "build_dashboard",
    "night_of",
]

log = logging.getLogger(__name__)

TEMPLATES = Path(__file__).parent / "templates"
DEFAULT_NIGHTS = 7
DEFAULT_NIGHT_START = 12
#: Metrics drawn as history charts, with their labels; ``{block}`` is the scenario's
#: main RAMBlock (the one with the most faults).
HEADLINE: tuple[tuple[str, str], ...] = (
    ("fetch.{block}.p50_ms", "fetch latency p50"),
    ("fetch.{block}.p99_ms", "fetch latency p99"),
    ("freeze_ms", "freeze (source STOP → destination RESUME)"),
    ("qemu_downtime_ms", "QEMU downtime"),
    ("guest.max_stall_ms", "worst guest stall (guest clock)"),
    ("outside.max_gap_ms", "longest heartbeat gap (outside view)"),
    ("blocktime_ms", "QEMU post-copy blocktime"),
    ("time.postcopy_ms", "post-copy duration"),
    ("time.total_ms", "total migration time"),
)
#: The headline metrics the index draws for every scenario at once (nightly medians).
OVERVIEW = ("fetch.{block}.p50_ms", "freeze_ms", "guest.max_stall_ms", "time.postcopy_ms")
#: Headline values in the index's scenario table.
SUMMARY_COLUMNS = (("fetch.{block}.p50_ms", "fetch p50"), ("freeze_ms", "freeze"),
                   ("guest.max_stall_ms", "worst stall"))
_ORDER = {Verdict.REGRESSION: 0, Verdict.IMPROVEMENT: 1, Verdict.CHANGED: 2,
          Verdict.NO_CHANGE: 3, Verdict.INSUFFICIENT: 4}
_CSS = {Verdict.REGRESSION: "regression", Verdict.IMPROVEMENT: "improvement",
        Verdict.CHANGED: "changed", Verdict.NO_CHANGE: "no-change",
        Verdict.INSUFFICIENT: "insufficient"}
_COLOURS = {"history": "#9e9e9e", "baseline": "#1f77b4", "candidate": "#111111",
            Verdict.REGRESSION: "#cf222e", Verdict.IMPROVEMENT: "#1a7f37", "median": "#555555"}
_GRID = "#e5e8ee"
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")
#: Days a long history chart opens on (its autoscale button shows every run).
RECENT_DAYS = 90
MANIFEST = ".manifest.json"


def night_of(when: datetime, start_hour: int = DEFAULT_NIGHT_START) -> date:
    """The night ``when`` belongs to: the date the 24 h from ``start_hour`` UTC began on."""
    return (when.astimezone(UTC) - timedelta(hours=start_hour)).date()


@dataclass(frozen=True)
class DashboardOptions:
    """How :func:`build_dashboard` picks and compares runs (module docstring)."""

    candidate: Selector | None = None
    baseline: Selector | None = None
    runs_root: Path | None = None
    nights: int = DEFAULT_NIGHTS
    night_start_hour: int = DEFAULT_NIGHT_START
    rules: Sequence[MetricRule] = DEFAULT_RULES
    alpha: float = ALPHA
    #: Also write the Prometheus textfile here (the textfile collector's directory).
    textfile: Path | None = None
    #: Processes computing verdicts and run pages (both CPU-bound Python); None: one per
    #: CPU, 1: everything in this process.
    jobs: int | None = None


@dataclass
class ScenarioView:
    """One scenario hash: its history, latest night, baseline and verdicts."""

    key: str
    name: str
    slug: str
    history: list[dict[str, Any]]
    candidate: list[dict[str, Any]]
    baseline: list[dict[str, Any]]
    candidate_label: str
    baseline_label: str
    verdicts: list[MetricVerdict] = field(default_factory=list)
    block: str | None = None

    @property
    def regressions(self) -> list[MetricVerdict]:
        """The verdicts that are regressions."""
        return [v for v in self.verdicts if v.verdict is Verdict.REGRESSION]

    @property
    def status(self) -> str:
        """``regression``, ``insufficient`` (no metric could be tested) or ``ok``."""
        if self.regressions:
            return "regression"
        if all(v.verdict is Verdict.INSUFFICIENT for v in self.verdicts):
            return "insufficient"
        return "ok"

    def counts(self) -> dict[str, int]:
        """How many metrics got each verdict."""
        out: dict[str, int] = {}
        for v in self.verdicts:
            out[v.verdict.value] = out.get(v.verdict.value, 0) + 1
        return out

    def metric(self, template: str) -> str | None:
        """A headline template (``fetch.{block}.p50_ms``) as this scenario's metric name."""
        if "{block}" in template:
            return None if self.block is None else template.format(block=self.block)
        return template


@dataclass(frozen=True)
class DashboardResult:
    """What :func:`build_dashboard` wrote."""

    out: Path
    index: Path
    scenario_pages: list[Path]
    run_pages_written: int
    run_pages_kept: int
    textfile: Path
    scenarios: list[ScenarioView]
    #: Seconds spent per stage (select, samples, verdicts, run pages, pages, prometheus).
    timings: dict[str, float]

    @property
    def regressed(self) -> list[ScenarioView]:
        """Scenarios with at least one regressed metric."""
        return [s for s in self.scenarios if s.regressions]


# ---------------------------------------------------------------------------
# Choosing runs


def _slug(text: str) -> str:
    return _UNSAFE.sub("_", text).strip("._") or "run"


def _by_hash(rows: Iterable[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    out: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for row in rows:
        out[row["scenario_hash"]].append(row)
    return out


def _nights_text(nights: Sequence[date]) -> str:
    if not nights:
        return "no night"
    if len(nights) == 1:
        return f"night of {nights[0]}"
    return f"{len(nights)} nights, {nights[0]} to {nights[-1]}"


def select_views(store: ResultsStore, options: DashboardOptions) -> list[ScenarioView]:
    """Group the stored runs into :class:`ScenarioView`s with candidate and baseline runs.

    Raises :class:`ConfigError` when a selector matches no stored run.
    """
    history = _by_hash(store.select())
    night = options.night_start_hour

    def nights(rows: Iterable[dict[str, Any]]) -> list[date]:
        return sorted({night_of(r["run_date"], night) for r in rows})

    if options.candidate is not None:
        chosen = store.select(options.candidate)
        if not chosen:
            raise ConfigError(f"candidate selector {str(options.candidate)!r} matches no "
                              "stored run", field="--candidate")
        candidates = _by_hash(chosen)
    else:
        candidates = {}
        for key, rows in history.items():
            last = nights(rows)[-1]
            candidates[key] = [r for r in rows if night_of(r["run_date"], night) == last]
    base_rows: list[dict[str, Any]] | None = None
    if options.baseline is not None:
        base_rows = store.select(options.baseline)
        if not base_rows:
            raise ConfigError(f"baseline selector {str(options.baseline)!r} matches no "
                              "stored run", field="--baseline")

    views = []
    for key, cand in candidates.items():
        cand_ids = {r["run_id"] for r in cand}
        past = history.get(key, [])
        cand_nights = nights(cand)
        if base_rows is None:
            earlier = [n for n in nights(past) if n < cand_nights[0]][-options.nights:]
            wanted = set(earlier)
            baseline = [r for r in past if r["run_id"] not in cand_ids
                        and night_of(r["run_date"], night) in wanted]
            base_label = (f"up to {options.nights} nights before the latest: "
                          f"{_nights_text(earlier)}" if earlier
                          else "no earlier night of this scenario")
        else:
            baseline = [r for r in base_rows
                        if r["scenario_hash"] == key and r["run_id"] not in cand_ids]
            base_label = f"{options.baseline}, same scenario hash"
            if not baseline:
                name = cand[0]["scenario"]
                baseline = [r for r in base_rows
                            if r["scenario"] == name and r["run_id"] not in cand_ids]
                base_label = (f"{options.baseline}, same scenario name {name!r} (no baseline "
                              "run has this scenario hash)")
        cand_label = (str(options.candidate) + f" ({_nights_text(cand_nights)})"
                      if options.candidate is not None else _nights_text(cand_nights))
        name = cand[-1]["scenario"]
        views.append(ScenarioView(
            key=key, name=name, slug=f"{_slug(name)}-{key[:8]}", history=past, candidate=cand,
            baseline=baseline, candidate_label=cand_label, baseline_label=base_label))
    views.sort(key=lambda v: (v.name, v.key))
    return views


def _main_block(samples: Iterable[Mapping[str, float]]) -> str | None:
    """The RAMBlock with the most faults over ``samples`` (the guest's RAM)."""
    faults: dict[str, float] = defaultdict(float)
    for sample in samples:
        for name, value in sample.items():
            if name.startswith("fetch.") and name.endswith(".faults"):
                faults[name[len("fetch."):-len(".faults")]] += value
    return max(faults, key=lambda b: faults[b]) if faults else None


_VerdictJob = tuple[list[dict[str, float]], list[dict[str, float]], Sequence[MetricRule], float]


def _compare_one(job: _VerdictJob) -> list[MetricVerdict]:
    baseline, candidate, rules, alpha = job
    verdicts = compare(baseline, candidate, rules=rules, alpha=alpha)
    return sorted(verdicts, key=lambda v: (_ORDER[v.verdict], v.metric))


def _verdict_jobs(views: Sequence[ScenarioView], samples: Mapping[str, Mapping[str, float]],
                  options: DashboardOptions) -> list[_VerdictJob]:
    return [([dict(samples[r["run_id"]]) for r in v.baseline],
             [dict(samples[r["run_id"]]) for r in v.candidate], options.rules, options.alpha)
            for v in views]


# ---------------------------------------------------------------------------
# Links


class RunLinks:
    """Where each run's report is, as a link from a page of the site.

    A run's own ``report.html`` under ``runs_root/<run_id>/`` is linked where it
    is (a relative path, so the site and the runs can move together); every
    other run gets a page ``runs/<run_id>.html`` generated from its stored report.
    """

    def __init__(self, out: Path, runs_root: Path | None) -> None:
        self.out = out.resolve()
        self.runs_root = runs_root.resolve() if runs_root is not None else None
        self._site: dict[str, tuple[str, bool]] = {}

    def _find(self, run_id: str) -> tuple[str, bool]:
        # A run id is a directory name; anything else must not become a path outside the root.
        if self.runs_root is not None and run_id not in {".", ".."} and "/" not in run_id:
            report = self.runs_root / run_id / "report.html"
            if report.is_file():
                return os.path.relpath(report, self.out), False
        return f"runs/{_slug(run_id)}.html", True

    def site_path(self, run_id: str) -> str:
        """The report of ``run_id`` relative to the site's root directory."""
        found = self._site.get(run_id)
        if found is None:
            found = self._site[run_id] = self._find(run_id)
        return found[0]

    def generated(self, run_id: str) -> bool:
        """True when ``run_id`` needs a page generated from its stored report."""
        self.site_path(run_id)
        return self._site[run_id][1]

    def href(self, run_id: str, depth: int) -> str:
        """Link to the report of ``run_id`` from a page ``depth`` directories below the root."""
        return "../" * depth + quote(self.site_path(run_id))


# ---------------------------------------------------------------------------
# Figures (plain plotly.js figure dicts: building plotly.py Figures for thousands of
# points per chart would take most of the build)


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


def _plot(div_id: str, title: str, caption: str, figure: dict[str, Any]) -> Plot:
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


# ---------------------------------------------------------------------------
# Page models


@dataclass(frozen=True)
class VerdictRow:
    """One metric's verdict as the templates show it."""

    metric: str
    css: str
    verdict: str
    n: str
    baseline: str
    candidate: str
    change: str
    p: str
    threshold: str
    note: str
    chart: str | None


def _change(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value:+.1%}" if math.isfinite(value) else "from 0"


def _shown(value: float | None, unit: str) -> str:
    return "-" if value is None else f"{format_value(value, unit)} {unit}".strip()


def verdict_rows(view: ScenarioView, units: Mapping[str, str],
                 charts: Mapping[str, str]) -> list[VerdictRow]:
    """The verdict table of one scenario, regressions first."""
    return [VerdictRow(
        metric=v.metric, css=_CSS[v.verdict], verdict=v.verdict.value,
        n=f"{v.baseline_n} / {v.candidate_n}",
        baseline=_shown(v.baseline_mean, units.get(v.metric, "")),
        candidate=_shown(v.candidate_mean, units.get(v.metric, "")),
        change=_change(v.relative_change), p="-" if v.p_value is None else f"{v.p_value:.2g}",
        threshold=f"{v.threshold:.0%}", note=v.note, chart=charts.get(v.metric),
    ) for v in view.verdicts]


@dataclass(frozen=True)
class RunRow:
    """A run in a table: link, date and the dimensions that vary between nights."""

    run_id: str
    href: str
    date: str
    qemu: str
    host: str
    values: list[str]


def _run_rows(rows: Sequence[Mapping[str, Any]], links: RunLinks, depth: int,
              metrics: Sequence[str], samples: Mapping[str, Mapping[str, float]],
              units: Mapping[str, str]) -> list[RunRow]:
    return [RunRow(
        run_id=r["run_id"], href=links.href(r["run_id"], depth),
        date=r["run_date"].astimezone(UTC).strftime("%Y-%m-%d %H:%M"),
        qemu=r["qemu_version"] or "-", host=r["destination_host"] or "-",
        values=[_shown(samples[r["run_id"]].get(m), units.get(m, "")) for m in metrics],
    ) for r in sorted(rows, key=lambda r: (r["run_date"], r["run_id"]), reverse=True)]


def _distinct(rows: Iterable[Mapping[str, Any]], key: str) -> str:
    return ", ".join(sorted({str(r[key]) for r in rows if r[key] is not None})) or "-"


def _json_script(value: Any) -> Markup:
    """JSON for a ``<script type="application/json">`` block (cannot close the element)."""
    text = json.dumps(value, separators=(",", ":"))
    return Markup(text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026"))


def _environment() -> Environment:
    # The report's templates come second so that their macros (tables, style) are shared.
    loader = ChoiceLoader([FileSystemLoader(TEMPLATES), FileSystemLoader(REPORT_TEMPLATES)])
    return Environment(loader=loader, autoescape=True, undefined=StrictUndefined,
                       trim_blocks=True, lstrip_blocks=True, keep_trailing_newline=True)


def _layout_version() -> str:
    """Changes whenever a generated run page would look different."""
    digest = hashlib.sha256(migrator.__version__.encode())
    # This module, the report's tables (report/html.py) and the templates the page uses.
    for path in (Path(__file__), REPORT_TEMPLATES.parent / "html.py",
                 TEMPLATES / "run_page.html.j2", TEMPLATES / "_dash.html.j2",
                 REPORT_TEMPLATES / "_macros.html.j2"):
        digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


# ---------------------------------------------------------------------------
# Run pages


def _dimension_table(row: Mapping[str, Any]) -> Table:
    cells = [[Cell(key), Cell(format_value(row.get(key)))] for key in DIMENSIONS if key != "run_id"]
    for key in ("origin", "imported_at"):
        if row.get(key) is not None:
            cells.append([Cell(key), Cell(format_value(row[key]))])
    return Table("Dimensions (results store)", ["dimension", "value"], cells)


def _metric_table(sample: Mapping[str, float], units: Mapping[str, str]) -> Table:
    return Table("Stored metrics (what the verdicts compare)", ["metric", "value", "unit"],
                 [[Cell(name), Cell(format_value(sample[name], units.get(name, "")), numeric=True),
                   Cell(units.get(name, ""))] for name in sorted(sample)])


def render_run_page(env: Environment, row: Mapping[str, Any], document: Mapping[str, Any],
                    sample: Mapping[str, float], units: Mapping[str, str],
                    scenario_href: str) -> str:
    """A run's page from its stored report.json: the report's own tables, no plots."""
    report: Report | None = None
    problem = ""
    if document.get("schema_version") != SCHEMA_VERSION:
        problem = (f"stored report is schema {document.get('schema_version')}, this migrator "
                   f"reads {SCHEMA_VERSION}: only the stored metrics are shown")
    else:
        try:
            report = Report.model_validate(document)
        except ValidationError as error:
            problem = f"stored report does not validate ({error.error_count()} errors)"
    sources = Sources()
    tables: list[Table] = []
    if report is not None:
        tables = [*headline_tables(report, sources), fetch_table(report, sources),
                  comparison_table(report, sources)]
    return env.get_template("run_page.html.j2").render(
        row=row, report=report, problem=problem, tables=tables,
        badge=severity(str(row["outcome"])),
        dimensions=_dimension_table(row),
        # The report's tables show the same numbers; only without them are these needed.
        metrics=_metric_table(sample, units) if report is None else None,
        env_line=environment_line(report) if report is not None else "",
        sources=sorted((n, s) for s, n in sources.numbers.items()),
        scenario_href=scenario_href, prefix="../",
        raw=json.dumps(document, indent=1, sort_keys=True) if report is None else "",
        generator=migrator.__version__,
    )


@dataclass(frozen=True)
class RunPageJob:
    """Run pages to write: per run its row, file name, metrics and scenario page link."""

    url: str | None
    folder: Path
    pages: list[tuple[dict[str, Any], str, dict[str, float], str]]
    units: dict[str, str]


def render_run_pages(job: RunPageJob,
                     store: ResultsStore | None = None) -> list[tuple[str, str]]:
    """Write the pages of ``job``, reading reports from ``store`` (else one it attaches
    to at ``job.url``, :meth:`ResultsStore.attach`).

    Runs in a worker process of :func:`build_dashboard`, hence the picklable
    job and a store per call.  Returns ``(run_id, report_sha256)`` per page written.
    """
    own = store is None
    if store is None:
        if job.url is None:
            raise ValueError("a run page job without a store URL needs the store")
        store = ResultsStore.attach(job.url)
    env = _environment()
    by_id = {row["run_id"]: (row, name, sample, href) for row, name, sample, href in job.pages}
    done = []
    try:
        for run_id, document in store.stored_reports(list(by_id)):
            row, name, sample, href = by_id[run_id]
            atomic_write(job.folder / name,
                         render_run_page(env, row, document, sample, job.units, href))
            done.append((run_id, str(row["report_sha256"])))
    finally:
        if own:
            store.close()
    return done


@dataclass
class RunPagePlan:
    """Which run pages a build writes, and the manifest of those it keeps."""

    folder: Path
    manifest: dict[str, Any]
    todo: list[tuple[dict[str, Any], str, dict[str, float], str]]
    kept: int

    def jobs(self, url: str | None, units: dict[str, str], parts: int) -> list[RunPageJob]:
        """The pages to write in ``parts`` jobs of about equal size."""
        size = max(1, -(-len(self.todo) // max(parts, 1)))
        return [RunPageJob(url, self.folder, self.todo[i:i + size], units)
                for i in range(0, len(self.todo), size)]

    def finish(self, done: Iterable[tuple[str, str]]) -> None:
        """Record the pages written in the manifest (written last: a build that dies
        before it leaves pages the next build rewrites, never a manifest that lies)."""
        self.manifest["pages"].update(done)
        atomic_write(self.folder / MANIFEST, json.dumps(self.manifest, indent=0, sort_keys=True))


def plan_run_pages(out: Path, rows: Mapping[str, dict[str, Any]], links: RunLinks,
                   scenario_of: Mapping[str, str],
                   samples: Mapping[str, Mapping[str, float]]) -> RunPagePlan:
    """The run pages missing or stale (report or layout changed); removes unlinked ones."""
    folder = out / "runs"
    folder.mkdir(parents=True, exist_ok=True)
    version = _layout_version()
    try:
        manifest = json.loads((folder / MANIFEST).read_text())
        if manifest.get("layout") != version:
            manifest = {"layout": version, "pages": {}}
    except (OSError, ValueError):
        manifest = {"layout": version, "pages": {}}
    built: dict[str, str] = manifest["pages"]
    wanted = {run_id: _slug(run_id) + ".html" for run_id in rows if links.generated(run_id)}
    for run_id in set(built) - set(wanted):
        # Only pages this builder wrote (listed in its manifest) are ever removed.
        (folder / (_slug(run_id) + ".html")).unlink(missing_ok=True)
        del built[run_id]
    todo = []
    for run_id, name in wanted.items():
        if built.get(run_id) == rows[run_id]["report_sha256"] and (folder / name).is_file():
            continue
        built.pop(run_id, None)
        todo.append((rows[run_id], name, dict(samples.get(run_id, {})),
                     f"../scenarios/{quote(scenario_of[run_id])}.html"))
    return RunPagePlan(folder, manifest, todo, len(wanted) - len(todo))


# ---------------------------------------------------------------------------
# The site


def _summaries(views: Sequence[ScenarioView], samples: Mapping[str, Mapping[str, float]],
               units: Mapping[str, str]) -> list[LatestSummary]:
    """The latest night per label set (scenario, backing, QEMU, destination host)."""
    out = []
    # Newest first: when two scenario hashes share a label set, the newer night is kept.
    for view in sorted(views, key=lambda v: max(r["run_date"] for r in v.candidate),
                       reverse=True):
        groups: dict[tuple[Any, ...], list[Mapping[str, Any]]] = defaultdict(list)
        for row in view.candidate:
            groups[(row["scenario"], row["backing"], row["qemu_version"],
                    row["destination_host"])].append(row)
        for (scenario, backing, qemu, host), rows in sorted(
                groups.items(), key=lambda item: tuple(str(k) for k in item[0])):
            values: dict[str, list[float]] = defaultdict(list)
            for run in rows:
                for name, value in samples[run["run_id"]].items():
                    values[name].append(value)
            out.append(LatestSummary(
                labels={"scenario": scenario, "backing": backing or "", "qemu_version":
                        qemu or "", "host": host or ""},
                means={name: statistics.fmean(vs) for name, vs in values.items()},
                units=units, runs=len(rows), last_run=max(r["run_date"] for r in rows),
                regressions=len(view.regressions)))
    return out


def _write_assets(out: Path) -> None:
    assets = out / "assets"
    assets.mkdir(parents=True, exist_ok=True)
    target = assets / "plotly.min.js"
    script = get_plotlyjs().encode()
    # 4.8 MB: rewritten only when the installed plotly changed.
    if not target.is_file() or target.stat().st_size != len(script) \
            or target.read_bytes() != script:
        atomic_write(target, script)


def build_dashboard(store: ResultsStore, out: Path,
                    options: DashboardOptions | None = None) -> DashboardResult:
    """Build the site into ``out`` (created; files of an earlier build are replaced).

    Raises :class:`ConfigError` when a selector matches no run or the store has
    no completed run.
    """
    options = options or DashboardOptions()
    if options.nights < 1:
        raise ConfigError("--nights must be at least 1", field="--nights")
    if not 0 <= options.night_start_hour < 24:
        raise ConfigError("--night-start must be an hour, 0 to 23", field="--night-start")
    timings: dict[str, float] = {}
    started = clock = time.perf_counter()

    def lap(stage: str) -> None:
        nonlocal clock
        now = time.perf_counter()
        timings[stage] = now - clock
        clock = now

    views = select_views(store, options)
    if not views:
        raise ConfigError("the results store has no completed run: import some first "
                          "(migrator results import RUN_DIR...)")
    rows: dict[str, dict[str, Any]] = {}
    scenario_of: dict[str, str] = {}
    for view in views:
        for row in (*view.history, *view.baseline, *view.candidate):
            rows.setdefault(row["run_id"], row)
            scenario_of.setdefault(row["run_id"], view.slug)
    lap("select")
    samples = store.metric_samples(list(rows))
    units = store.units(sorted({name for sample in samples.values() for name in sample}))
    for view in views:
        view.block = _main_block(samples[r["run_id"]] for r in (*view.history, *view.candidate))
    lap("samples")

    out.mkdir(parents=True, exist_ok=True)
    env = _environment()
    links = RunLinks(out, options.runs_root)
    plan = plan_run_pages(out, rows, links, scenario_of, samples)
    url = store.shared_url
    workers = options.jobs or os.cpu_count() or 1
    if url is None:
        workers = 1  # another process cannot open this database
    with ExitStack() as stack:
        # Permutation tests and page rendering are CPU-bound Python: processes, not threads.
        # Verdicts go first (the pages need them); run pages are rendered meanwhile.
        pool = stack.enter_context(ProcessPoolExecutor(workers)) if workers > 1 else None
        verdict_jobs = _verdict_jobs(views, samples, options)
        page_futures = []
        if pool is not None:
            verdict_futures = [pool.submit(_compare_one, job) for job in verdict_jobs]
            page_futures = [pool.submit(render_run_pages, job)
                            for job in plan.jobs(url, units, workers * 4)]
            verdicts = [future.result() for future in verdict_futures]
        else:
            verdicts = [_compare_one(job) for job in verdict_jobs]
        for view, found in zip(views, verdicts, strict=True):
            view.verdicts = found
        lap("verdicts")

        _write_assets(out)
        (out / "scenarios").mkdir(exist_ok=True)
        generated_at = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
        common = {"generated_at": generated_at, "generator": migrator.__version__,
                  "store": store.display_url,
                  "night_start": options.night_start_hour, "nights": options.nights,
                  "alpha": options.alpha}
        pages, charts = [], {}
        for view in views:
            page, charts[view.key] = _write_scenario_page(out, env, view, links, samples,
                                                           units, options, common)
            pages.append(page)
        index = _write_index(out, env, views, links, charts, samples, units, options, common)
        lap("pages")

        if pool is not None:
            done = [item for future in page_futures for item in future.result()]
        else:
            done = [item for job in plan.jobs(url, units, 1)
                    for item in render_run_pages(job, store)]
        plan.finish(done)
        written, kept = len(done), plan.kept
        lap("run pages")
    textfile = out / "metrics.prom"
    text = render_textfile(_summaries(views, samples, units))
    write_textfile(textfile, text)
    if options.textfile is not None:
        options.textfile.parent.mkdir(parents=True, exist_ok=True)
        write_textfile(options.textfile, text)
    lap("prometheus")
    timings["total"] = time.perf_counter() - started
    log.info("dashboard: %d scenarios, %d run pages written, %d kept, in %.2f s", len(views),
             written, kept, timings["total"])
    return DashboardResult(out, index, pages, written, kept, textfile, views, timings)


def _write_scenario_page(out: Path, env: Environment, view: ScenarioView, links: RunLinks,
                         samples: Mapping[str, Mapping[str, float]], units: Mapping[str, str],
                         options: DashboardOptions,
                         common: Mapping[str, Any]) -> tuple[Path, dict[str, str]]:
    """Write one scenario's page; returns it and the chart id of each metric drawn."""
    verdicts = {v.metric: v for v in view.verdicts}
    charted: list[tuple[str, str]] = []
    for template, label in HEADLINE:
        metric = view.metric(template)
        if metric is not None and metric in verdicts:
            charted.append((metric, label))
    # A regression outside the headline metrics gets its history drawn too.
    charted += [(v.metric, v.metric) for v in view.regressions
                if v.metric not in {m for m, _ in charted}]
    every = {r["run_id"]: r for r in (*view.history, *view.baseline, *view.candidate)}
    link_ids = sorted(every, key=lambda i: (every[i]["run_date"], i))
    link_index = {run_id: i for i, run_id in enumerate(link_ids)}
    plots, charts = [], {}
    for number, (metric, label) in enumerate(charted):
        div_id = f"plot-{number}"
        charts[metric] = div_id
        figure = history_figure(view, metric, label, units.get(metric, ""), samples,
                                link_index, verdicts.get(metric), options.night_start_hour)
        plots.append(_plot(div_id, label, f"{metric} per run start (UTC)", figure))
    shown = [m for m, _ in charted[:4]]
    page = out / "scenarios" / f"{view.slug}.html"
    first = view.candidate[-1]
    atomic_write(page, env.get_template("scenario.html.j2").render(
        **common, prefix="../", view=view, first=first, plots=plots,
        verdicts=verdict_rows(view, units, charts), counts=view.counts(),
        regressions=len(view.regressions),
        qemu=_distinct(view.candidate, "qemu_version"),
        hosts=_distinct(view.candidate, "destination_host"),
        run_columns=shown,
        candidate_runs=_run_rows(view.candidate, links, 1, shown, samples, units),
        baseline_runs=_run_rows(view.baseline, links, 1, shown, samples, units),
        links=_json_script([links.href(run_id, 1) for run_id in link_ids]),
    ))
    return page, charts


@dataclass(frozen=True)
class ScenarioRow:
    """A scenario in the index table."""

    view: ScenarioView
    href: str
    qemu: str
    host: str
    values: list[str]
    regressions: int
    improvements: int


@dataclass(frozen=True)
class RegressionRow:
    """One regressed metric of one scenario, for the index."""

    scenario: str
    href: str
    metric: VerdictRow
    runs: list[tuple[str, str]]


def _write_index(out: Path, env: Environment, views: Sequence[ScenarioView], links: RunLinks,
                 charts: Mapping[str, Mapping[str, str]],
                 samples: Mapping[str, Mapping[str, float]], units: Mapping[str, str],
                 options: DashboardOptions, common: Mapping[str, Any]) -> Path:
    """Write index.html: every scenario's latest night, the regressions, overview charts."""
    scenario_rows, regression_rows = [], []
    for view in views:
        href = f"scenarios/{quote(view.slug)}.html"
        verdicts = {v.metric: v for v in view.verdicts}
        values = []
        for template, _ in SUMMARY_COLUMNS:
            metric = view.metric(template)
            verdict = verdicts.get(metric or "")
            if verdict is None or metric is None:
                values.append("-")
                continue
            change = "" if verdict.relative_change is None or not verdict.baseline_n \
                else f" ({_change(verdict.relative_change)})"
            values.append(_shown(verdict.candidate_mean, units.get(metric, "")) + change)
        counts = view.counts()
        scenario_rows.append(ScenarioRow(
            view, href, _distinct(view.candidate, "qemu_version"),
            _distinct(view.candidate, "destination_host"), values,
            counts.get(Verdict.REGRESSION.value, 0), counts.get(Verdict.IMPROVEMENT.value, 0)))
        for row in verdict_rows(view, units, charts[view.key]):
            if row.css == "regression":
                regression_rows.append(RegressionRow(
                    view.name, href, row,
                    [(r["run_id"], links.href(r["run_id"], 0)) for r in view.candidate]))
    plots = []
    scenario_links = [f"scenarios/{quote(v.slug)}.html" for v in views]
    labels = dict(HEADLINE)
    for number, template in enumerate(OVERVIEW):
        names = [m for m in (v.metric(template) for v in views) if m is not None]
        unit = units.get(names[0], "") if names else ""
        figure = overview_figure(views, template, labels[template], unit, samples,
                                 options.night_start_hour)
        if figure["data"]:
            caption = template.replace("{block}", "<main RAMBlock>") + ", nightly median (UTC)"
            plots.append(_plot(f"overview-{number}", labels[template], caption, figure))
    index = out / "index.html"
    atomic_write(index, env.get_template("index.html.j2").render(
        **common, prefix="", scenarios=scenario_rows, regressions=regression_rows,
        summary_columns=[label for _, label in SUMMARY_COLUMNS], plots=plots,
        runs=sum(len(v.history) for v in views),
        regressed=sum(1 for v in views if v.regressions),
        tested=any(v.status != "insufficient" for v in views),
        links=_json_script(scenario_links),
    ))
    return index
