"""After an interrupt the CLI says only what run.json's "teardown" confirms."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

import pytest
from rich.text import Text
from typer.testing import CliRunner

from migrator.cli.main import app
from migrator.cli.teardown import interrupted_statement
from migrator.config.models import Scenario
from migrator.rundir import RunDir
from migrator.runner import Observer

DATA = Path(__file__).resolve().parents[1] / "data" / "bad" / "files"
PROBLEMS = ["hugepages: gave back 0 of 512 pages: write nr_hugepages: Device or resource busy",
            "qemu src: still running after SIGKILL (pid 4242)"]
CLEAN = "interrupted: torn down cleanly (every QEMU stopped, hugepages given back)"
# What each kind of run.json makes the CLI say; {run} is the run directory.
CASES: dict[str, tuple[dict[str, Any] | None, list[str]]] = {
    "clean": ({"teardown": {"clean": True, "problems": []}}, [CLEAN]),
    "problems": ({"teardown": {"clean": False, "problems": PROBLEMS}}, [
        "interrupted: clean-up incomplete, left behind (see {run}/timeline.jsonl):",
        f"  {PROBLEMS[0]}", f"  {PROBLEMS[1]}"]),
    "no teardown key": ({"outcome": "interrupted"},
                        ["interrupted; clean-up not confirmed, see {run}/timeline.jsonl"]),
    "no run.json": (None, ["interrupted; clean-up not confirmed, see {run}/timeline.jsonl"]),
    "malformed": ({"teardown": {"clean": "yes"}},
                  ["interrupted; clean-up not confirmed, see {run}/timeline.jsonl"]),
}


def plain(markup: str) -> str:
    """The text rich prints for ``markup`` (styles dropped)."""
    return Text.from_markup(markup).plain


def craft(run: Path, meta: dict[str, Any] | None) -> Path:
    run.mkdir(parents=True, exist_ok=True)
    if meta is not None:
        # Every run.json names its run and scenario from the start.
        (run / "run.json").write_text(json.dumps({"run_id": run.name, "scenario": "s", **meta}))
    return run


@pytest.mark.parametrize("case", CASES)
def test_the_statement_says_what_run_json_confirms(tmp_path: Path, case: str) -> None:
    meta, expected = CASES[case]
    run = craft(tmp_path / "run", meta)
    lines = plain(interrupted_statement(run)).splitlines()
    assert lines == [line.format(run=run) for line in expected]
    if case != "clean":
        assert "torn down cleanly" not in "\n".join(lines)


def test_without_a_run_directory_nothing_is_claimed() -> None:
    assert plain(interrupted_statement(None)) == (
        "interrupted before the run had a run directory")


def test_problems_are_printed_as_written_not_as_markup(tmp_path: Path) -> None:
    run = craft(tmp_path / "run", {"teardown": {"clean": False, "problems": ["[bold]x[/]"]}})
    assert plain(interrupted_statement(run)).splitlines()[1] == "  [bold]x[/]"


RunScenario = Callable[[Scenario, Path, Observer, Callable[[RunDir], None]],
                      Coroutine[Any, Any, RunDir]]


def interrupted_run(meta: dict[str, Any] | None) -> RunScenario:
    """A run_scenario that makes its run directory, records ``meta``, then is interrupted."""
    async def run_scenario(scenario: Scenario, runs_root: Path, observer: Observer,
                           on_rundir: Callable[[RunDir], None]) -> RunDir:
        run = RunDir.create(runs_root, scenario.name)
        on_rundir(run)
        craft(run.path, meta)
        raise asyncio.CancelledError  # as SIGTERM cancels the run
    return run_scenario


@pytest.mark.parametrize("case", ["clean", "problems", "no teardown key"])
def test_run_says_how_the_teardown_went(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                        case: str) -> None:
    meta, expected = CASES[case]
    monkeypatch.setattr("migrator.runner.run_scenario", interrupted_run(meta))
    runs = tmp_path / "runs"
    result = CliRunner().invoke(app, ["run", str(DATA / "valid.toml"), "--runs-dir", str(runs)])
    assert result.exit_code == 143, result.output
    [run] = runs.iterdir()
    lines = result.output.splitlines()
    for line in expected:
        assert line.format(run=run) in lines
    if case != "clean":
        assert "torn down cleanly" not in result.output
        assert "every QEMU stopped" not in result.output


def test_bench_says_how_the_current_runs_teardown_went(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    meta, expected = CASES["problems"]

    async def run_and_report(scenario: Scenario, runs_root: Path, observer: Observer,
                             on_rundir: Callable[[RunDir], None], *, html: bool) -> Path:
        await interrupted_run(meta)(scenario, runs_root, observer, on_rundir)
        raise AssertionError("unreachable")

    monkeypatch.setattr("migrator.bench.runner.run_and_report", run_and_report)
    out = tmp_path / "suite"
    result = CliRunner().invoke(app, ["bench", str(DATA / "suite-valid.toml"), "--out", str(out)])
    assert result.exit_code == 143, result.output
    [run] = (out / "runs").iterdir()
    lines = result.output.splitlines()
    for line in expected:
        assert line.format(run=run) in lines
    assert "torn down cleanly" not in result.output
    assert (f"run preempt=false,rep=1 is recorded as failed; {out / 'suite.json'} is saved, "
            "--resume continues") in lines
