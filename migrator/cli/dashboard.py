"""``migrator dashboard``: the nightly dashboard (static site + Prometheus textfile).

A thin command over :func:`migrator.dashboard.build_dashboard`; the heavy
imports happen inside it so the rest of the CLI starts fast.  Exit codes: 0
built; 1 built, and ``--fail-on-regression`` was given and a scenario
regressed; 2 nothing built (bad selector or option, store unreachable or
empty).
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape

from migrator.cli.common import VerboseOption, fail, setup_logging
from migrator.cli.common import out as stdout
from migrator.cli.results import (
    AlphaOption,
    DbOption,
    ThresholdOption,
    open_store,
    thresholds,
)
from migrator.errors import ConfigError, ExitCode, MigratorError

__all__ = ["dashboard"]


def dashboard(
    out: Annotated[Path, typer.Option("--out", metavar="DIR",
                                      help="directory of the site (created; rebuilt in place)")],
    db: DbOption = None,
    baseline: Annotated[str | None, typer.Option(
        "--baseline", metavar="SELECTOR",
        help="baseline runs (key=value filters or run ids), matched to the latest runs by "
             "scenario hash, else scenario name; default: each scenario's previous nights")
    ] = None,
    candidate: Annotated[str | None, typer.Option(
        "--candidate", metavar="SELECTOR",
        help="the runs to judge; default: each scenario's newest night")] = None,
    runs_root: Annotated[Path | None, typer.Option(
        "--runs-root", metavar="DIR",
        help="where run directories live: a run with DIR/<run_id>/report.html is linked "
             "there, others get a page from their stored report.json")] = None,
    textfile: Annotated[Path | None, typer.Option(
        "--textfile", metavar="FILE",
        help="also write the Prometheus textfile here, e.g. into node_exporter's "
             "--collector.textfile.directory (replaced atomically)")] = None,
    # Defaults: DEFAULT_NIGHTS and DEFAULT_NIGHT_START of migrator.dashboard.views, not
    # imported here because that module loads plotly and scipy (a test keeps them equal).
    nights: Annotated[int, typer.Option(
        "--nights", min=1, help="nights before the latest that form the default baseline")] = 7,
    night_start: Annotated[int, typer.Option(
        "--night-start", min=0, max=23, metavar="HOUR",
        help="hour (UTC) a night starts at: runs from then until the same hour the next day "
             "are one night")] = 12,
    threshold: ThresholdOption = None,
    alpha: AlphaOption = 0.01,
    jobs: Annotated[int | None, typer.Option(
        "--jobs", min=1, help="processes for verdicts and run pages (default: one per CPU)")
    ] = None,
    fail_on_regression: Annotated[bool, typer.Option(
        "--fail-on-regression", help="exit 1 when any scenario's latest night regressed")
    ] = False,
    verbose: VerboseOption = False,
) -> None:
    """Write a static dashboard of the results store and DIR/metrics.prom for Prometheus.

    index.html shows each scenario's latest night against its baseline (the 7
    nights before it unless --baseline says otherwise) with per-metric verdicts
    from the same test as 'migrator compare', regressions badged; one page per
    scenario draws the history of its headline metrics, every run a point linked
    to its report.  No page needs the network.
    """
    from migrator.dashboard import DashboardOptions, build_dashboard
    from migrator.results.store import parse_selector

    setup_logging(verbose)
    try:
        options = DashboardOptions(
            candidate=parse_selector(candidate) if candidate else None,
            baseline=parse_selector(baseline) if baseline else None,
            runs_root=runs_root, textfile=textfile, nights=nights, night_start_hour=night_start,
            rules=thresholds(threshold or []), alpha=alpha, jobs=jobs)
        with open_store(db) as store:
            result = build_dashboard(store, out, options)
    except MigratorError as error:
        raise fail(error, ExitCode.BAD_INPUT) from None
    except OSError as error:
        # An --out or --textfile that cannot be written: the user's to fix, not a bug.
        raise fail(ConfigError(f"cannot write the dashboard: {error}")) from None
    stdout.print(f"dashboard: {result.index} ({len(result.scenarios)} scenarios, "
                 f"{result.run_pages_written} run pages written, {result.run_pages_kept} "
                 f"unchanged, {result.timings['total']:.1f} s)", highlight=False, soft_wrap=True)
    for path in (result.textfile, textfile):
        if path is not None:
            stdout.print(f"prometheus textfile: {path}", highlight=False, soft_wrap=True)
    for view in result.regressed:
        names = ", ".join(v.metric for v in view.regressions)
        # Escaped: scenario names and selectors are user text that may look like markup.
        stdout.print(f"[bold red]regression[/bold red] "
                     f"{escape(f'{view.name} ({view.candidate_label}): {names}')}",
                     highlight=False, soft_wrap=True)
    if fail_on_regression and result.regressed:
        raise typer.Exit(ExitCode.FAILED)
