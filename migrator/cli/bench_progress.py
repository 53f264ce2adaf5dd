"""Live progress of a benchmark suite: the current run's progress under a line for the suite."""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path

from rich.console import Console, Group
from rich.text import Text

from migrator.bench.runner import RunRecord, RunStatus, SuiteObserver, SuiteState
from migrator.bench.suite import PlannedRun
from migrator.cli.progress import LiveProgress

__all__ = ["SuiteProgress"]

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
