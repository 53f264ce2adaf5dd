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
    from migrator.pagedata import RunPageData

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
        from migrator.metrics.run_page import load_run_page_data

        try:
            page = load_run_page_data(artifacts, report)
        except MigratorError as error:
            raise fail(error) from None
        _write_html(run_dir.path, page)
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


def _write_html(run_dir: Path, page: RunPageData) -> None:
    """The run's HTML page, from its page data (derived from the report just written to
    report.json: not read back)."""
    from migrator.report.html import write_run_html

    try:
        written = write_run_html(run_dir, page)
    except MigratorError as error:
        raise fail(error) from None
    err.print(f"HTML report: {escape(str(written))}", highlight=False, soft_wrap=True)


RunDirsArgument = Annotated[list[Path], typer.Argument(
    metavar="RUN_DIR",
    help="run directories made by 'migrator run'; with two or more and --html, also one "
         "page overlaying them all")]
OverlayOption = Annotated[Path | None, typer.Option(
    "--out", metavar="FILE",
    help="where the overlay page of two or more runs goes (with --html); default "
         "./migrator-compare-<UTC time>.html")]


@app.command()
def report(
    run_dirs: RunDirsArgument,
    json_out: Annotated[bool, typer.Option(
        "--json", help="print report.json, not tables (a JSON array with several runs)")] = False,
    html: Annotated[bool, typer.Option(
        "--html", help="also write RUN_DIR/report.html of each run, and with two or more runs "
                       "one page overlaying them (see --out): self-contained, interactive "
                       "plots")] = False,
    out_file: OverlayOption = None,
    verbose: VerboseOption = False,
) -> None:
    """Rebuild report.json and the summary offline from run directories' raw files.

    With --html, each run also gets RUN_DIR/report.html; with two or more runs,
    one more page overlays their fetch latency CDFs, guest stalls, throughput
    and host CPU per QEMU thread, aligned at each run's switchover, with their
    headline numbers side by side (--out, default in the current directory).

    Every run directory is read and its report derived before anything is
    written: one that is not a run, or for the overlay page one that never
    started migrating, stops the command (exit 2) with nothing written.
    """
    from migrator.report.terminal import render_report

    setup_logging(verbose)
    overlay = html and len(run_dirs) > 1
    try:
        if out_file is not None and not overlay:
            raise ConfigError("the overlay page needs --html and two or more run directories",
                              field="--out")
        runs = [_derive(run_dir) for run_dir in _distinct(run_dirs)]
        pages = []
        if html:
            from migrator.metrics.run_page import load_run_page_data

            pages = [load_run_page_data(artifacts, rebuilt) for artifacts, rebuilt in runs]
        data = target = None
        if overlay:
            from migrator.metrics.run_overlay import load_overlay_data
            from migrator.report.overlay import default_overlay_path

            target = _overlay_target(out_file or default_overlay_path())
            data = load_overlay_data(runs, pages)
    except ArtifactError as error:
        # The run directories are this command's input: one it cannot read is bad input.
        raise fail(error, exit_code=ExitCode.BAD_INPUT) from None
    except MigratorError as error:
        raise fail(error) from None
    from migrator.metrics.summary import write_report

    for artifacts, rebuilt in runs:
        write_report(artifacts.path, rebuilt)
    for (artifacts, _), page in zip(runs, pages, strict=False):
        _write_html(artifacts.path, page)
    if data is not None and target is not None:
        from migrator.report.overlay import write_overlay_html

        write_overlay_html(target, data)
        err.print(f"overlay page: {escape(str(target))}", highlight=False, soft_wrap=True)
    if json_out:
        import json

        reports = [rebuilt.model_dump(mode="json") for _, rebuilt in runs]
        print_json(json.dumps(reports[0] if len(reports) == 1 else reports))
    else:
        for _, rebuilt in runs:
            render_report(rebuilt, out)


def _distinct(run_dirs: list[Path]) -> list[Path]:
    """``run_dirs``, each existing once (ConfigError naming the one given twice)."""
    seen: set[Path] = set()
    for run_dir in run_dirs:
        if not run_dir.is_dir():
            raise ConfigError("not a directory" if run_dir.exists() else "no such directory",
                              field=str(run_dir))
        real = run_dir.resolve()
        if real in seen:
            raise ConfigError("given twice: each run directory once", field=str(run_dir))
        seen.add(real)
    return run_dirs


def _derive(run_dir: Path) -> tuple[RunArtifacts, Report]:
    """One run directory's artifacts and its report derived from them (nothing written)."""
    from migrator.metrics.run_artifacts import load_run_artifacts
    from migrator.metrics.summary import derive_report

    artifacts = load_run_artifacts(run_dir)
    return artifacts, derive_report(artifacts)


def _overlay_target(path: Path) -> Path:
    """``--out`` checked before anything is written: its directory exists, it is no
    directory itself."""
    if path.is_dir():
        raise ConfigError("is a directory: give a file name", field=f"--out {path}")
    if not path.parent.is_dir():
        raise ConfigError(f"no such directory: {path.parent}", field=f"--out {path}")
    return path


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
