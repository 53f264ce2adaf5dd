"""``migrator``: run a post-copy migration and read what it cost the guest."""

from __future__ import annotations

import asyncio
import logging
import signal
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape

from migrator.cli.bench import bench
from migrator.cli.console import stdout_console
from migrator.cli.dashboard import dashboard
from migrator.cli.hosts import hosts_app
from migrator.cli.results import compare, results_app
from migrator.cli.teardown import interrupted_statement
from migrator.config.loader import load_scenario, scenario_schema
from migrator.errors import ArtifactError, ConfigError, MigratorError
from migrator.outcome import EXIT_CODES, Outcome
from migrator.rundir import RunDir

__all__ = ["app"]

app = typer.Typer(no_args_is_help=True, add_completion=False,
                  help="Orchestrate QEMU post-copy migrations of hugepage-backed VMs and "
                       "measure per-page fetch latency and vCPU stalls.")
config_app = typer.Typer(no_args_is_help=True, help="Scenario files.")
app.add_typer(config_app, name="config")
app.add_typer(hosts_app, name="hosts")
app.add_typer(results_app, name="results")
app.command("compare")(compare)
app.command("bench")(bench)
app.command("dashboard")(dashboard)

err = Console(stderr=True, log_path=False)
out = stdout_console()


def _fail(error: MigratorError, exit_code: int | None = None) -> typer.Exit:
    """Print a migrator error as one line and give its exit code (or ``exit_code``)."""
    # Escaped: messages quote user input (names, paths), which may look like rich markup.
    err.print(f"[bold red]error:[/bold red] {escape(str(error))}", highlight=False,
              soft_wrap=True)
    run_dir = getattr(error, "run_dir", None)
    if run_dir is not None:
        err.print(f"raw artifacts kept in {escape(str(run_dir))}", highlight=False,
                  soft_wrap=True)
    return typer.Exit(error.exit_code if exit_code is None else exit_code)


def _setup_logging(verbose: bool, log_file: Path | None = None) -> None:
    handlers: list[logging.Handler] = []
    if log_file is not None:
        handler = logging.FileHandler(log_file)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        handler.setLevel(logging.DEBUG)
        handlers.append(handler)
    if verbose:
        stream = logging.StreamHandler(sys.stderr)
        stream.setLevel(logging.INFO)
        handlers.append(stream)
    logging.basicConfig(level=logging.DEBUG if handlers else logging.WARNING,
                        handlers=handlers or None, force=True)
    # qemu.qmp logs every disconnect at INFO; that is noise for a user.
    logging.getLogger("qemu.qmp").setLevel(logging.WARNING)
    # asyncssh logs every exec request (with the whole remote supervisor) at INFO.
    logging.getLogger("asyncssh").setLevel(logging.WARNING)


@app.command()
def run(
    scenario: Annotated[Path, typer.Argument(help="scenario TOML file")],
    runs_dir: Annotated[Path, typer.Option(help="where run directories are created")] = Path(
        "runs"),
    json_out: Annotated[bool, typer.Option("--json", help="print report.json, not tables")] = False,
    html: HtmlOption = False,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="log to stderr")] = False,
) -> None:
    """Run one scenario end to end and print its report."""
    from migrator.cli.progress import LiveProgress
    from migrator.metrics.summary import build_report, write_report
    from migrator.report.terminal import render_report
    from migrator.runner import run_scenario

    try:
        loaded = load_scenario(scenario)
        _make_runs_dir(runs_dir)
    except MigratorError as error:
        raise _fail(error) from None
    _setup_logging(verbose)
    holder: dict[str, Path] = {}

    async def main() -> RunDir:
        # SIGTERM gets the same orderly teardown as Ctrl-C: cancel, then every finally runs.
        task = asyncio.current_task()
        assert task is not None
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, task.cancel)
        return await run_scenario(
            loaded, runs_dir, progress, on_rundir=lambda r: holder.update(path=r.path))

    try:
        with LiveProgress(err) as progress:
            run_dir = asyncio.run(main())
    except MigratorError as error:
        _report_if_possible(holder.get("path"))
        raise _fail(error) from None
    except (KeyboardInterrupt, asyncio.CancelledError) as stop:
        err.print(interrupted_statement(holder.get("path")), highlight=False, soft_wrap=True)
        _report_if_possible(holder.get("path"))
        raise typer.Exit(130 if isinstance(stop, KeyboardInterrupt) else 143) from None
    report = build_report(run_dir.path)
    write_report(run_dir.path, report)
    if html:
        _write_html(run_dir.path)
    if json_out:
        out.print_json(report.model_dump_json())
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


HtmlOption = Annotated[bool, typer.Option(
    "--html", help="also write RUN_DIR/report.html: a self-contained page with interactive plots")]


def _write_html(run_dir: Path) -> None:
    from migrator.report.html import write_run_html

    try:
        page = write_run_html(run_dir)  # reads the report.json just written
    except MigratorError as error:
        raise _fail(error) from None
    err.print(f"HTML report: {escape(str(page))}", highlight=False, soft_wrap=True)


@app.command()
def report(
    run_dir: Annotated[Path, typer.Argument(help="a run directory made by 'migrator run'")],
    json_out: Annotated[bool, typer.Option("--json", help="print report.json, not tables")] = False,
    html: HtmlOption = False,
) -> None:
    """Rebuild report.json and the summary offline from a run directory's raw files."""
    from migrator.metrics.summary import build_report, write_report
    from migrator.report.terminal import render_report

    try:
        if not run_dir.is_dir():
            raise ConfigError("not a directory" if run_dir.exists() else "no such directory",
                              field=str(run_dir))
        rebuilt = build_report(run_dir)
    except ArtifactError as error:
        # The run directory is this command's input: one it cannot read is bad input.
        raise _fail(error, exit_code=ConfigError.exit_code) from None
    except MigratorError as error:
        raise _fail(error) from None
    write_report(run_dir, rebuilt)
    if html:
        _write_html(run_dir)
    if json_out:
        out.print_json(rebuilt.model_dump_json())
    else:
        render_report(rebuilt, out)


@config_app.command("schema")
def config_schema() -> None:
    """Print the JSON Schema of scenario files."""
    print(scenario_schema())


@config_app.command("check")
def config_check(
    scenario: Annotated[Path, typer.Argument(help="scenario TOML file")],
) -> None:
    """Validate a scenario file and print it resolved (every default explicit)."""
    from migrator.config.loader import dump_scenario

    try:
        loaded = load_scenario(scenario)
    except MigratorError as error:
        raise _fail(error) from None
    print(dump_scenario(loaded), end="")
