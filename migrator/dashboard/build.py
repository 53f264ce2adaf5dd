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

import logging
import os
import statistics
import time
from collections import defaultdict
from collections.abc import Mapping, Sequence
from concurrent.futures import ProcessPoolExecutor
from contextlib import ExitStack
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from plotly.offline import get_plotlyjs  # type: ignore[import-untyped]

import migrator
from migrator.dashboard.pages import write_index, write_scenario_page
from migrator.dashboard.prometheus import LatestSummary, render_textfile, write_textfile
from migrator.dashboard.run_pages import (
    RunLinks,
    plan_run_pages,
    render_run_pages,
    site_environment,
)
from migrator.dashboard.views import (
    DashboardOptions,
    ScenarioView,
    compare_one,
    main_block,
    select_views,
    verdict_jobs,
)
from migrator.errors import ConfigError
from migrator.results.store import ResultsStore
from migrator.rundir import atomic_write

__all__ = ["DashboardResult", "build_dashboard"]

log = logging.getLogger(__name__)


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
        view.block = main_block(samples[r["run_id"]] for r in (*view.history, *view.candidate))
    lap("samples")

    out.mkdir(parents=True, exist_ok=True)
    env = site_environment()
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
        jobs = verdict_jobs(views, samples, options)
        page_futures = []
        if pool is not None:
            verdict_futures = [pool.submit(compare_one, job) for job in jobs]
            page_futures = [pool.submit(render_run_pages, job)
                            for job in plan.jobs(url, units, workers * 4)]
            verdicts = [future.result() for future in verdict_futures]
        else:
            verdicts = [compare_one(job) for job in jobs]
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
            page, charts[view.key] = write_scenario_page(out, env, view, links, samples,
                                                          units, options, common)
            pages.append(page)
        index = write_index(out, env, views, links, charts, samples, units, options, common)
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
