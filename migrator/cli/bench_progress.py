"""Live progress of a benchmark suite: a line for the suite, then one line per active run."""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from rich.console import Console, Group
from rich.live import Live
from rich.markup import escape
from rich.text import Text

from migrator.bench.runner import RunRecord, RunStatus, SuiteObserver, SuiteState
from migrator.bench.suite import PlannedRun
from migrator.cli.progress import mib
from migrator.runner import Observer

__all__ = ["RunLine", "SuiteProgress"]

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


class RunLine(Observer):
    """One active run: its phase and latest ``query-migrate`` per side, drawn as one line.

    Samples are only kept here; the line is drawn when the display refreshes (4 Hz),
    so N runs sampling at 10 Hz cost no redraw each.
    """

    def __init__(self, progress: SuiteProgress, index: int, run: PlannedRun) -> None:
        self.progress = progress
        self.index = index
        self.run = run
        self.started = time.monotonic()
        self.phase_name = "starting"
        #: The run's directory, once it has one: its run.json says how an interrupt left it.
        self.run_dir: Path | None = None
        self.latest: dict[str, dict[str, Any]] = {}

    @property
    def tag(self) -> str:
        """``[index/total]``, how this run's log lines begin."""
        return f"[{self.index}/{self.progress.total}]"

    def phase(self, name: str, detail: str = "") -> None:
        self.phase_name = name
        self.progress.console.log(f"[bold]{self.tag}[/bold] {escape(name)} {escape(detail)}"
                                  .rstrip(), highlight=False)

    def sample(self, side: str, reply: dict[str, Any]) -> None:
        self.latest[side] = reply

    def render(self) -> Text:
        """``[i/N] RUN-ID  phase  elapsed  src: status sent/left ...  dst: ...``."""
        line = Text.assemble(
            (f"{self.tag} ", "dim"), (self.run.run_id, "bold magenta"), "  ",
            (self.phase_name, "cyan"), f"  {time.monotonic() - self.started:6.1f} s")
        for side in ("src", "dst"):
            reply = self.latest.get(side)
            if not reply:
                continue
            ram = reply.get("ram", {})
            line.append(f"  {side} {reply.get('status', '-')} {mib(ram.get('transferred'))} "
                        f"sent, {mib(ram.get('remaining'))} left, "
                        f"{ram.get('postcopy-requests', '-')} post-copy requests")
        return line


class SuiteProgress(SuiteObserver):
    """A line for the whole suite (runs started, running, ETA, outcomes), a line per active run.

    The ETA is the mean duration of the runs finished in this invocation
    (unsupported ones take no time and are left out) times the runs not yet
    started, plus what the active runs still have left of that mean, divided
    by the runs allowed at once.
    """

    def __init__(self, console: Console, parallel: int = 1) -> None:
        self.console = console
        self.parallel = parallel
        self.total = 0
        self.started_runs = 0
        #: The active runs by index: after an interrupt, the runs it caught.
        self.active: dict[int, RunLine] = {}
        #: The most runs active at once so far: capacity may admit fewer than --parallel.
        self.peak = 0
        self.durations: list[float] = []
        self.outcomes: dict[RunStatus, int] = {}
        self.live = Live(console=console, refresh_per_second=4, transient=True,
                         get_renderable=self._render)

    def __enter__(self) -> SuiteProgress:
        self.live.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self.live.__exit__(None, None, None)

    def suite_started(self, todo: Sequence[PlannedRun], state: SuiteState) -> None:
        self.total = len(todo)
        done = state.count(RunStatus.DONE)
        if done:
            self.console.log(f"{done} run(s) already done, {len(todo)} to go")

    def run_started(self, index: int, run: PlannedRun) -> None:
        self.started_runs += 1
        self.active[index] = line = RunLine(self, index, run)
        self.peak = max(self.peak, len(self.active))
        self.console.log(f"[bold]{line.tag}[/bold] {escape(run.run_id)}", highlight=False)

    def run_observer(self, index: int, run: PlannedRun) -> Observer:
        return self.active[index]

    def run_directory(self, index: int, run: PlannedRun, path: Path) -> None:
        self.active[index].run_dir = path

    def run_finished(self, index: int, run: PlannedRun, record: RunRecord) -> None:
        line = self.active.pop(index)
        if record.status in (RunStatus.DONE, RunStatus.FAILED) and record.duration_s:
            self.durations.append(record.duration_s)
        self.outcomes[record.status] = self.outcomes.get(record.status, 0) + 1
        message = record.error or record.reason or record.run_dir or ""
        style = _OUTCOME_STYLE.get(record.status, "")
        self.console.log(
            f"[bold]{line.tag}[/bold] [{style}]{record.status.value}[/{style}] "
            f"{escape(run.run_id)} in {_duration(record.duration_s or 0)}: {escape(message)}",
            highlight=False)

    def _eta(self) -> str:
        if not self.durations:
            return "after the first run"
        mean = sum(self.durations) / len(self.durations)
        now = time.monotonic()
        left = ((self.total - self.started_runs) * mean
                + sum(max(0.0, mean - (now - line.started)) for line in self.active.values()))
        return _duration(left / max(1, self.peak))

    def _render(self) -> Group:
        if not self.total:
            return Group(Text("suite: nothing to run", style="dim"))
        counts = "  ".join(f"{status.value} {n}" for status, n in self.outcomes.items())
        running = f"   running {len(self.active)}" if self.parallel > 1 else ""
        head = Text.assemble(
            ("suite ", "dim"), (f"{self.started_runs}/{self.total}", "bold"), running,
            ("   ETA ", "dim"), self._eta(), ("   ", ""), (counts, "dim"))
        return Group(head, *(self.active[index].render() for index in sorted(self.active)))
