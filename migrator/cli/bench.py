"""``migrator bench SUITE.toml``: run a benchmark suite with live progress, then its table.

Registered in :mod:`migrator.cli.main` as ``app.command()(bench)``.
"""

from __future__ import annotations

import asyncio
import importlib.util
import signal
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console, Group
from rich.markup import escape
from rich.text import Text

from migrator.bench.pagesize import (
    build_page_size_table,
    render_page_size_table,
    write_page_size_table,
)
from migrator.bench.runner import (
    RunRecord,
    RunStatus,
    SuiteObserver,
    SuiteState,
    run_and_report,
    run_suite,
)
from migrator.bench.suite import PlannedRun, Suite, load_suite, parse_only
from migrator.cli.progress import LiveProgress
from migrator.cli.teardown import interrupted_statement
from migrator.config.models import Scenario
from migrator.errors import ConfigError, MigratorError
from migrator.rundir import RunDir
from migrator.runner import Observer

__all__ = ["SuiteProgress", "bench"]

# How each outcome is shown when a run ends.
_OUTCOME_STYLE = {
    RunStatus.DONE: "green", RunStatus.FAILED: "bold red", RunStatus.UNSUPPORTED: "yellow",
}


def _duration(seconds: float) -> str:
    seconds = max(0, round(seconds))
    if seconds < 60:
        return f"{seconds} s"
    minutes, seconds = divmod(seconds, 60)
    if minutes < 60:
        return f"{minutes}m{seconds:02d}s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m"


class SuiteProgress(LiveProgress, SuiteObserver):
    """LiveProgress of the current run under one line for the whole suite (n/N, ETA).

    The ETA is the mean duration of the runs finished in this invocation
    (unsupported ones take no time and are left out) times the runs left,
    minus what the current run has already taken.
    """

    def __init__(self, console: Console) -> None:
        # Set before LiveProgress.__init__, which renders once.
        self.total = 0
        self.index = 0
        self.run_id = ""
        # The current run's directory, once it has one: its run.json says how an
        # interrupt left it.
        self.run_dir: Path | None = None
        self.durations: list[float] = []
        self.outcomes: dict[RunStatus, int] = {}
        super().__init__(console)

    def suite_started(self, todo: Sequence[PlannedRun], state: SuiteState) -> None:
        self.total = len(todo)
        done = state.count(RunStatus.DONE)
        if done:
            self.console.log(f"{done} run(s) already done, {len(todo)} to go")
        self.live.update(self._render())

    def run_started(self, index: int, run: PlannedRun) -> None:
        self.index, self.run_id, self.run_dir = index, run.run_id, None
        self.started = time.monotonic()
        self.phase_name, self.detail, self.latest = "starting", "", {}
        self.console.log(f"[bold][{index}/{self.total}][/bold] {run.run_id}", highlight=False)
        self.live.update(self._render())

    def run_finished(self, index: int, run: PlannedRun, record: RunRecord) -> None:
        if record.status in (RunStatus.DONE, RunStatus.FAILED) and record.duration_s:
            self.durations.append(record.duration_s)
        self.outcomes[record.status] = self.outcomes.get(record.status, 0) + 1
        message = record.error or record.reason or record.run_dir or ""
        style = _OUTCOME_STYLE.get(record.status, "")
        self.console.log(
            f"[{style}]{record.status.value}[/{style}] {run.run_id} in "
            f"{_duration(record.duration_s or 0)}: {message}", highlight=False)
        self.live.update(self._render())

    def _eta(self) -> str:
        if not self.durations:
            return "after the first run"
        left = self.total - self.index + 1
        mean = sum(self.durations) / len(self.durations)
        return _duration(max(0.0, mean * left - (time.monotonic() - self.started)))

    def _render(self) -> Group:
        if not self.total:
            return Group(Text("suite: nothing to run", style="dim"))
        counts = "  ".join(f"{status.value} {n}" for status, n in self.outcomes.items())
        head = Text.assemble(
            ("suite ", "dim"), (f"{self.index}/{self.total}", "bold"),
            ("   ETA ", "dim"), self._eta(), ("   ", ""), (counts, "dim"))
        run = Text.assemble(("run ", "dim"), (self.run_id, "bold magenta"))
        return Group(head, run, super()._render())


def _summary(suite: Suite, state: SuiteState, selected: Sequence[str], out_dir: Path,
             console: Console) -> int:
    """Print the outcome of the selected runs; returns the number that failed."""
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
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="log to stderr")] = False,
) -> None:
    """Run a benchmark suite: every combination of its axes, one run at a time.

    Each run goes to DIR/runs/; DIR/suite.json records every run's status (done,
    failed, skipped, unsupported), run directory, error and timings after each
    run, and DIR/bench.log the debug log.  A failed run never stops the rest.
    When an axis varies vm.backing, the page-size table is printed at the end and
    written as DIR/page-size.md and DIR/page-size.csv.

    Exit status: 0 when no selected run failed (unsupported HGM runs do not
    count as failures), 1 when any failed, 2 for a bad suite file or option,
    130/143 when interrupted (the state is saved: --resume continues).
    """
    # Not at module level: migrator.cli.main imports this module to register the command.
    from migrator.cli.main import _fail, _setup_logging, err
    from migrator.cli.main import out as stdout

    try:
        suite = load_suite(suite_file)
        selection = parse_only(only or [], suite)
        if html and importlib.util.find_spec("migrator.report.html") is None:
            raise ConfigError("HTML reports are not part of this migrator", field="--html")
    except MigratorError as error:
        raise _fail(error) from None
    out_dir = out if out is not None else Path("bench") / suite.name
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise _fail(ConfigError(f"cannot make the suite directory: {error.strerror}",
                                field=f"--out {out_dir}")) from None
    _setup_logging(verbose, out_dir / "bench.log")

    progress = SuiteProgress(err)

    async def run_one(scenario: Scenario, runs_root: Path, observer: Observer,
                      on_rundir: Callable[[RunDir], None]) -> Path:
        def remember(run: RunDir) -> None:
            progress.run_dir = run.path
            on_rundir(run)

        return await run_and_report(scenario, runs_root, observer, remember, html=html)

    async def main(progress: SuiteProgress) -> SuiteState:
        # SIGTERM gets the same orderly teardown as Ctrl-C: cancel, then every finally runs.
        task = asyncio.current_task()
        assert task is not None
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, task.cancel)
        return await run_suite(suite, out_dir, resume=resume, selection=selection,
                               only=only or [], observer=progress, run_fn=run_one)

    try:
        with progress:
            state = asyncio.run(main(progress))
    except MigratorError as error:
        raise _fail(error) from None
    except (KeyboardInterrupt, asyncio.CancelledError) as stop:
        err.print(interrupted_statement(progress.run_dir), highlight=False, soft_wrap=True)
        current = f"run {progress.run_id} is recorded as failed; " if progress.run_id else ""
        err.print(f"{escape(current)}{escape(str(out_dir / 'suite.json'))} is saved, --resume "
                  "continues", highlight=False, soft_wrap=True)
        raise typer.Exit(130 if isinstance(stop, KeyboardInterrupt) else 143) from None

    if suite.varies_backing:
        table = build_page_size_table(suite, state, out_dir)
        markdown, comma = write_page_size_table(table, out_dir)
        render_page_size_table(table, stdout)
        stdout.print(f"table: {markdown} {comma}", highlight=False, soft_wrap=True)
    if html:
        from migrator.report.suite_html import write_suite_html

        try:
            page = write_suite_html(out_dir)
        except MigratorError as error:
            err.print(f"[yellow]no suite.html[/yellow]: {error}", highlight=False)
        else:
            stdout.print(f"suite page: {page}", highlight=False, soft_wrap=True)
    selected = [run.run_id for run in suite.select(selection)]
    failed = _summary(suite, state, selected, out_dir, stdout)
    if failed:
        raise typer.Exit(1)
