"""``migrator bench SUITE.toml``: run a benchmark suite with live progress, then its table.

Registered in :mod:`migrator.cli.main` as ``app.command()(bench)``.  The suite
machinery (:mod:`migrator.bench`, and through it the runner) is imported when
the command runs, not with this module.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.console import Console
from rich.markup import escape

from migrator.cli.common import (
    VerboseOption,
    err,
    fail,
    interrupted,
    run_until_interrupted,
    setup_logging,
)
from migrator.cli.common import out as stdout
from migrator.errors import ConfigError, ExitCode, MigratorError

if TYPE_CHECKING:
    from migrator.bench.runner import SuiteState
    from migrator.bench.suite import Suite
    from migrator.cli.bench_progress import SuiteProgress
    from migrator.config.models import Scenario
    from migrator.rundir import RunDir
    from migrator.runner import Observer

__all__ = ["bench"]


def _summary(suite: Suite, state: SuiteState, selected: Sequence[str], out_dir: Path,
             console: Console) -> int:
    """Print the outcome of the selected runs; returns the number that failed."""
    from migrator.bench.runner import RunStatus

    counts = {status: state.count(status, selected) for status in RunStatus}
    parts = [f"{n} {status.value}" for status, n in counts.items() if n]
    console.print(f"suite {suite.name}: {', '.join(parts) or 'no runs'} "
                  f"(of {len(selected)} selected)", highlight=False)
    for run_id in selected:
        record = state.runs[run_id]
        if record.status is RunStatus.FAILED:
            console.print(f"  [red]failed[/red] {run_id}: {record.error}", highlight=False,
                          soft_wrap=True)
        elif record.status is RunStatus.UNSUPPORTED:
            console.print(f"  [yellow]unsupported[/yellow] {run_id}: {record.reason}",
                          highlight=False, soft_wrap=True)
    console.print(f"state: {out_dir / 'suite.json'}", highlight=False, soft_wrap=True)
    return counts[RunStatus.FAILED]


def _interrupted(stop: BaseException, progress: SuiteProgress, out_dir: Path) -> typer.Exit:
    """Say how each run the interrupt caught was left; give the interrupt's exit."""
    caught = [progress.active[index] for index in sorted(progress.active)]
    stopped = None
    for line in caught:
        if len(caught) > 1:
            err.print(f"run {escape(line.run.run_id)}:", highlight=False, soft_wrap=True)
        stopped = interrupted(stop, line.run_dir)
    if stopped is None:
        stopped = interrupted(stop, None)
    # Run ids hold commas: "; " keeps them apart.
    ids = "; ".join(line.run.run_id for line in caught)
    current = (f"run {ids} is recorded as failed; " if len(caught) == 1
               else f"runs {ids} are recorded as failed; " if caught else "")
    err.print(f"{escape(current)}{escape(str(out_dir / 'suite.json'))} is saved, --resume "
              "continues", highlight=False, soft_wrap=True)
    return stopped


def bench(
    suite_file: Annotated[Path, typer.Argument(help="suite TOML file", metavar="SUITE.toml")],
    out: Annotated[Path | None, typer.Option(
        "--out", help="suite directory: suite.json, runs/, tables (default: bench/SUITE-NAME)",
    )] = None,
    resume: Annotated[bool, typer.Option(
        "--resume", help="continue the suite in --out: runs already done are skipped")] = False,
    only: Annotated[list[str] | None, typer.Option(
        "--only", metavar="KEY=VALUE[,...]",
        help="run only matching runs; KEY is an axis name or 'rep'; the same key twice means "
             "either value, different keys must all match; repeatable")] = None,
    html: Annotated[bool, typer.Option(
        "--html", help="also write report.html in each finished run directory and "
                       "DIR/suite.html for the whole suite")] = False,
    parallel: Annotated[int, typer.Option(
        "--parallel", min=1, metavar="N",
        help="run up to N runs at once, as many on one host as its memory, hugepages and "
             "cores hold (a run that does not fit waits)")] = 1,
    vcpus_per_core: Annotated[int, typer.Option(
        "--vcpus-per-core", min=1, metavar="K",
        help="with --parallel: how many guest vCPUs of concurrent runs may share one host "
             "core")] = 1,
    verbose: VerboseOption = False,
) -> None:
    """Run a benchmark suite: every combination of its axes, one run at a time or --parallel.

    Each run goes to DIR/runs/; DIR/suite.json records every run's status (done,
    failed, skipped, unsupported), run directory, error and timings after each
    run, in suite order, and DIR/bench.log the debug log.  A failed run never
    stops the rest.  When an axis varies vm.backing, the page-size table is
    printed at the end and written as DIR/page-size.md and DIR/page-size.csv.

    With --parallel N, up to N runs go at once in this one process; each host's
    capacity is read first and a run that could not fit even alone is refused
    before anything starts (exit 3).

    Exit status: 0 when no selected run failed (unsupported HGM runs do not
    count as failures), 1 when any failed, 2 for a bad suite file or option,
    3 when a run cannot fit its hosts even alone, 130/143 when interrupted (the
    state is saved: --resume continues).
    """
    import asyncio

    from migrator.bench.pagesize import (
        build_page_size_table,
        render_page_size_table,
        write_page_size_table,
    )
    from migrator.bench.runner import run_and_report, run_suite
    from migrator.bench.suite import load_suite, parse_only
    from migrator.cli.bench_progress import SuiteProgress

    try:
        suite = load_suite(suite_file)
        selection = parse_only(only or [], suite)
        if html and importlib.util.find_spec("migrator.report.html") is None:
            raise ConfigError("HTML reports are not part of this migrator", field="--html")
    except MigratorError as error:
        raise fail(error) from None
    out_dir = out if out is not None else Path("bench") / suite.name
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise fail(ConfigError(f"cannot make the suite directory: {error.strerror}",
                               field=f"--out {out_dir}")) from None
    setup_logging(verbose, out_dir / "bench.log")

    progress = SuiteProgress(err, parallel)

    async def run_one(scenario: Scenario, runs_root: Path, observer: Observer,
                      on_rundir: Callable[[RunDir], None]) -> Path:
        return await run_and_report(scenario, runs_root, observer, on_rundir, html=html)

    try:
        with progress:
            state = run_until_interrupted(run_suite(
                suite, out_dir, resume=resume, selection=selection, only=only or [],
                observer=progress, run_fn=run_one, parallel=parallel,
                vcpus_per_core=vcpus_per_core))
    except MigratorError as error:
        raise fail(error) from None
    except (KeyboardInterrupt, asyncio.CancelledError) as stop:
        raise _interrupted(stop, progress, out_dir) from None

    if suite.varies_backing:
        table = build_page_size_table(suite, state, out_dir)
        markdown, comma = write_page_size_table(table, out_dir)
        render_page_size_table(table, stdout)
        stdout.print(f"table: {markdown} {comma}", highlight=False, soft_wrap=True)
    if html:
        from migrator.bench.suite_html import write_suite_html

        try:
            page = write_suite_html(out_dir)
        except MigratorError as error:
            err.print(f"[yellow]no suite.html[/yellow]: {error}", highlight=False)
        else:
            stdout.print(f"suite page: {page}", highlight=False, soft_wrap=True)
    selected = [run.run_id for run in suite.select(selection)]
    failed = _summary(suite, state, selected, out_dir, stdout)
    if failed:
        raise typer.Exit(ExitCode.FAILED)
