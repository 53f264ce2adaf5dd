"""The dashboard's scenario pages and index, from the scenario views and their verdicts."""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC
from pathlib import Path
from typing import Any
from urllib.parse import quote

from jinja2 import Environment
from markupsafe import Markup

from migrator.dashboard.figures import dashboard_plot, history_figure, overview_figure
from migrator.dashboard.run_pages import RunLinks
from migrator.dashboard.views import DashboardOptions, ScenarioView
from migrator.results.compare import Verdict
from migrator.rundir import atomic_write
from migrator.units import format_value

__all__ = ["HEADLINE", "OVERVIEW", "SUMMARY_COLUMNS", "VerdictRow", "verdict_rows",
           "write_index", "write_scenario_page"]

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
_CSS = {Verdict.REGRESSION: "regression", Verdict.IMPROVEMENT: "improvement",
        Verdict.CHANGED: "changed", Verdict.NO_CHANGE: "no-change",
        Verdict.INSUFFICIENT: "insufficient"}


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

def write_scenario_page(out: Path, env: Environment, view: ScenarioView, links: RunLinks,
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
        plots.append(dashboard_plot(div_id, label, f"{metric} per run start (UTC)", figure))
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


def write_index(out: Path, env: Environment, views: Sequence[ScenarioView], links: RunLinks,
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
            plots.append(dashboard_plot(f"overview-{number}", labels[template], caption, figure))
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
