"""``migrator``: run a post-copy migration and read what it cost the guest.

Every command module is imported here to register its command, so none of them
imports anything heavy at module level (the runner, asyncssh, numpy, plotly,
SQLAlchemy...): each command imports what it needs when it runs, and
``migrator --help`` stays fast (``benchmarks/cli_startup.py``).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.markup import escape
from typer.core import TyperGroup

import migrator
from migrator.cli.bench import bench
from migrator.cli.common import (
    RunDirArgument,
    ScenarioArgument,
    VerboseOption,
    err,
    fail,
    interrupted,
    out,
    print_json,
    run_until_interrupted,
    setup_logging,
)
from migrator.cli.dashboard import dashboard
from migrator.cli.hosts import hosts_app
from migrator.cli.results import compare, results_app
from migrator.errors import ArtifactError, ConfigError, ExitCode, MigratorError

if TYPE_CHECKING:
    from migrator.metrics.run_artifacts import RunArtifacts
    from migrator.model import Report

__all__ = ["COMMAND_ORDER", "app"]

#: ``migrator --help`` lists the commands in the order a user needs them: one run and its
#: report, the hosts and scenario checks, then suites, the store, CI and the dashboard.
COMMAND_ORDER = ("run", "report", "hosts", "config", "bench", "results", "compare", "dashboard")


class _InOrder(TyperGroup):
    """A command group that lists its commands in :data:`COMMAND_ORDER`.

    typer lists plain commands before sub-groups (``hosts``, ``config``,
    ``results``) whatever order they were added in.
    """

    # ctx is typer's vendored click.Context, a private class: Any keeps the override valid.
    def list_commands(self, ctx: Any) -> list[str]:
        """The group's commands, in :data:`COMMAND_ORDER` (any other name last)."""
        names = super().list_commands(ctx)
        return sorted(names, key=lambda name: (COMMAND_ORDER.index(name)
                                               if name in COMMAND_ORDER else len(COMMAND_ORDER)))


app = typer.Typer(cls=_InOrder, no_args_is_help=True, add_completion=False,
                  help="Orchestrate QEMU post-copy migrations of hugepage-backed VMs and "
                       "measure per-page fetch latency and vCPU stalls.")
config_app = typer.Typer(no_args_is_help=True, help="Scenario files.")
app.add_typer(config_app, name="config")
app.add_typer(hosts_app, name="hosts")
app.add_typer(results_app, name="results")
app.command("compare")(compare)
app.command("bench")(bench)
app.command("dashboard")(dashboard)


def _print_version(value: bool) -> None:
    if value:
        typer.echo(f"migrator {migrator.__version__}")
        raise typer.Exit


@app.callback()
def _options(
    version: Annotated[bool, typer.Option(
        "--version", callback=_print_version, is_eager=True,
        help="print migrator's version and exit")] = False,
) -> None:
    """Options of ``migrator`` itself, given before the command (--version acts at once)."""
    del version  # handled by its callback, which exits


HtmlOption = Annotated[bool, typer.Option(
    "--html", help="also write RUN_DIR/report.html: a self-contained page with interactive plots")]
JsonOption = Annotated[bool, typer.Option("--json", help="print report.json, not tables")]


@app.command()
def run(
    scenario: ScenarioArgument,
    runs_dir: Annotated[Path, typer.Option(help="where run directories are created")] = Path(
        "runs"),
    json_out: JsonOption = False,
    html: HtmlOption = False,
    verbose: VerboseOption = False,
) -> None:
    """Run one scenario end to end and print its report."""
    import asyncio

    from migrator.cli.progress import LiveProgress
    from migrator.config.loader import load_scenario
    from migrator.metrics.run_artifacts import load_run_artifacts
    from migrator.metrics.summary import derive_report, write_report
    from migrator.outcome import EXIT_CODES, Outcome
    from migrator.report.terminal import render_report
    from migrator.runner import run_scenario

    try:
        loaded = load_scenario(scenario)
        _make_runs_dir(runs_dir)
    except MigratorError as error:
        raise fail(error) from None
    setup_logging(verbose)
    holder: dict[str, Path] = {}

    try:
        with LiveProgress(err) as progress:
            run_dir = run_until_interrupted(run_scenario(
                loaded, runs_dir, progress, on_rundir=lambda r: holder.update(path=r.path)))
    except MigratorError as error:
        _report_if_possible(holder.get("path"))
        raise fail(error) from None
    except (KeyboardInterrupt, asyncio.CancelledError) as stop:
        stopped = interrupted(stop, holder.get("path"))
        _report_if_possible(holder.get("path"))
        raise stopped from None
    artifacts = load_run_artifacts(run_dir.path)
    report = derive_report(artifacts)
    write_report(run_dir.path, report)
    if html:
        _write_html(artifacts, report)
    if json_out:
        print_json(report.model_dump_json())
    else:
        render_report(report, out)
    out.print(f"run directory: {escape(str(run_dir.path))}", highlight=False, soft_wrap=True)
    if report.outcome == Outcome.COMPLETED_AFTER_RECOVERY:
        # Success, but a distinct one: post-copy paused and was recovered (docs/operator.md).
        raise typer.Exit(EXIT_CODES[Outcome.COMPLETED_AFTER_RECOVERY])


def _make_runs_dir(runs_dir: Path) -> None:
    """Create ``--runs-dir`` up front: :class:`ConfigError` rather than a traceback later."""
    try:
        runs_dir.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        reason = "it exists and is not a directory" if runs_dir.exists() else error.strerror
        raise ConfigError(f"cannot create {runs_dir}: {reason}", field="--runs-dir") from None


def _report_if_possible(run_path: Path | None) -> None:
    """After a failed run, still derive what the raw artifacts allow."""
    if run_path is None:
        return
    from migrator.metrics.summary import build_report, write_report

    try:
        write_report(run_path, build_report(run_path))
        err.print(f"partial report: {escape(str(run_path / 'report.json'))}", highlight=False,
                  soft_wrap=True)
    except Exception as error:
        err.print(f"no report could be derived: {escape(str(error))}", highlight=False,
                  soft_wrap=True)


def _write_html(artifacts: RunArtifacts, report: Report) -> None:
    """The run's HTML page, from its artifacts and ``report`` (derived from them and just
    written to report.json: not read back)."""
    from migrator.metrics.run_page import load_run_page_data
    from migrator.report.html import write_run_html

    try:
        page = write_run_html(artifacts.path, load_run_page_data(artifacts, report))
    except MigratorError as error:
        raise fail(error) from None
    err.print(f"HTML report: {escape(str(page))}", highlight=False, soft_wrap=True)


@app.command()
def report(
    run_dir: RunDirArgument,
    json_out: JsonOption = False,
    html: HtmlOption = False,
    verbose: VerboseOption = False,
) -> None:
    """Rebuild report.json and the summary offline from a run directory's raw files."""
    from migrator.metrics.run_artifacts import load_run_artifacts
    from migrator.metrics.summary import derive_report, write_report
    from migrator.report.terminal import render_report

    setup_logging(verbose)
    try:
        if not run_dir.is_dir():
            raise ConfigError("not a directory" if run_dir.exists() else "no such directory",
                              field=str(run_dir))
        artifacts = load_run_artifacts(run_dir)
        rebuilt = derive_report(artifacts)
    except ArtifactError as error:
        # The run directory is this command's input: one it cannot read is bad input.
        raise fail(error, exit_code=ExitCode.BAD_INPUT) from None
    except MigratorError as error:
        raise fail(error) from None
    write_report(run_dir, rebuilt)
    if html:
        _write_html(artifacts, rebuilt)
    if json_out:
        print_json(rebuilt.model_dump_json())
    else:
        render_report(rebuilt, out)


@config_app.command("check")
def config_check(
    scenario: ScenarioArgument,
    verbose: VerboseOption = False,
) -> None:
    """Validate a scenario file and print it resolved (every default explicit)."""
    from migrator.config.loader import dump_scenario, load_scenario

    setup_logging(verbose)
    try:
        loaded = load_scenario(scenario)
    except MigratorError as error:
        raise fail(error) from None
    print(dump_scenario(loaded), end="")


@config_app.command("schema")
def config_schema() -> None:
    """Print the JSON Schema of scenario files."""
    from migrator.config.loader import scenario_schema

    print(scenario_schema())
