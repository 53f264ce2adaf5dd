"""The first things a user meets: --version, --help (its order, names and speed), -v."""

from __future__ import annotations

import asyncio
import importlib.metadata
import logging
import os
import re
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import typer
from typer.testing import CliRunner

import migrator
from migrator.cli.common import run_until_interrupted
from migrator.cli.main import COMMAND_ORDER, app
from migrator.errors import ConfigError

ROOT = Path(__file__).resolve().parents[2]
DATA = ROOT / "tests" / "data" / "bad" / "files"
# Imported only by the commands that need them: each costs a noticeable part of a second.
HEAVY = ("migrator.runner", "migrator.bench", "migrator.config", "migrator.dashboard",
         "migrator.metrics", "migrator.results", "asyncio", "asyncssh", "numpy", "scipy",
         "plotly", "sqlalchemy", "alembic", "pydantic", "jinja2", "prometheus_client")


def invoke(*args: str) -> Any:
    return CliRunner().invoke(app, list(args))


def command_paths(group: Any = None, prefix: tuple[str, ...] = ()) -> Iterator[tuple[str, ...]]:
    """Every command and group of ``migrator``, as the words that name it."""
    group = typer.main.get_command(app) if group is None else group
    for name, command in group.commands.items():
        yield (*prefix, name)
        if hasattr(command, "commands"):
            yield from command_paths(command, (*prefix, name))


def test_version_prints_the_package_version() -> None:
    result = invoke("--version")
    assert result.exit_code == 0
    assert result.output == f"migrator {migrator.__version__}\n"
    # The installed distribution says the same (pyproject.toml and migrator/__init__.py).
    assert importlib.metadata.version("migrator") == migrator.__version__


def test_help_lists_commands_in_the_order_a_user_needs_them() -> None:
    assert COMMAND_ORDER == ("run", "report", "hosts", "config", "bench", "results", "compare",
                             "dashboard")
    result = invoke("--help")
    assert result.exit_code == 0
    listed = re.findall(r"^│ (\w+) ", result.output, re.MULTILINE)
    assert listed == list(COMMAND_ORDER)


def test_readme_lists_commands_in_the_same_order() -> None:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    section = readme.split("## Commands", 1)[1].split("\n## ", 1)[0]
    named = re.findall(r"^ {4}migrator (\w+)", section, re.MULTILINE)
    assert list(dict.fromkeys(named)) == list(COMMAND_ORDER)


@pytest.mark.parametrize("path", list(command_paths()), ids=" ".join)
def test_metavars_name_what_to_give(path: tuple[str, ...]) -> None:
    result = invoke(*path, "--help")
    assert result.exit_code == 0
    # typer's default: the parameter's name in braces ({scenario}, {run_dir}).
    assert not re.search(r"\{[a-z_]+\}", result.output), result.output
    expected = {("run",): "SCENARIO.toml", ("hosts", "check"): "SCENARIO.toml",
                ("config", "check"): "SCENARIO.toml", ("report",): "RUN_DIR",
                ("results", "import"): "RUN_DIR", ("bench",): "SUITE.toml"}
    if path in expected:
        assert f"{{{expected[path]}}}" in result.output.splitlines()[1]  # the usage line


@pytest.mark.parametrize("words", [("run",), ("report",), ("hosts", "check"),
                                   ("config", "check"), ("bench",)])
def test_a_missing_argument_is_named_as_in_the_usage(words: tuple[str, ...]) -> None:
    result = invoke(*words)
    assert result.exit_code == 2
    usage = result.output.splitlines()[0]
    [metavar] = re.findall(r"\{(.+)\}", usage)
    assert f"Missing argument '{metavar}'" in result.output


@pytest.fixture
def root_logging() -> Iterator[None]:
    """The root logger as it was: the commands reconfigure it (``logging.basicConfig``)."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    for handler in root.handlers:
        if handler not in handlers:
            handler.close()
    root.handlers[:], root.level = handlers, level


def logs_then_fails(*_: object, **__: object) -> Any:
    logging.getLogger("migrator.test").info("working on it")
    raise ConfigError("stopped by the test")


async def logs_then_fails_async(*args: object, **kwargs: object) -> Any:
    return logs_then_fails(*args, **kwargs)


# Per command: its words and inputs, and the function it does its work with, replaced by
# one that logs at INFO (which only -v shows) and fails.
WORKING = {
    "run": (("run", str(DATA / "valid.toml"), "--runs-dir", "{tmp}/runs"),
            "migrator.runner.run_scenario", logs_then_fails_async),
    "report": (("report", "{tmp}"), "migrator.metrics.run_artifacts.load_run_artifacts",
               logs_then_fails),
    "hosts check": (("hosts", "check", str(DATA / "valid.toml")),
                    "migrator.cli.hosts.run_checks", logs_then_fails_async),
    "config check": (("config", "check", str(DATA / "valid.toml")),
                     "migrator.config.loader.load_scenario", logs_then_fails),
    "bench": (("bench", str(DATA / "suite-valid.toml"), "--out", "{tmp}/suite"),
              "migrator.bench.runner.run_suite", logs_then_fails_async),
    "results import": (("results", "import", "{tmp}"), "migrator.cli.results.open_store",
                       logs_then_fails),
    "results list": (("results", "list"), "migrator.cli.results.open_store", logs_then_fails),
    "compare": (("compare", "qemu=a", "qemu=b"), "migrator.cli.results.open_store",
                logs_then_fails),
    "dashboard": (("dashboard", "--out", "{tmp}/site"), "migrator.cli.dashboard.open_store",
                  logs_then_fails),
}


@pytest.mark.usefixtures("root_logging")
@pytest.mark.parametrize("command", WORKING)
@pytest.mark.parametrize("verbose", ["-v", "--verbose", None])
def test_every_working_command_logs_to_stderr_with_verbose(
        command: str, verbose: str | None, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    words, target, replacement = WORKING[command]
    monkeypatch.setattr(target, replacement)
    args = [word.format(tmp=tmp_path) for word in words]
    result = invoke(*args, *([verbose] if verbose else []))
    assert result.exit_code == 2, result.output
    assert "error: stopped by the test" in result.stderr
    assert ("working on it" in result.stderr) == (verbose is not None)
    assert "working on it" not in result.stdout


def in_a_new_interpreter(code: str) -> list[str]:
    """The lines ``code`` prints, run by a fresh interpreter (nothing imported yet)."""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          check=True, timeout=60, cwd=ROOT)
    return done.stdout.splitlines()


def test_the_command_line_starts_without_heavy_imports() -> None:
    # What makes `migrator --help` take under 0.3 s (benchmarks/cli_startup.py times it).
    loaded = in_a_new_interpreter(
        "import sys, migrator.cli.main\nprint(*sorted(sys.modules), sep='\\n')")
    assert [name for name in loaded
            if any(name == heavy or name.startswith(heavy + ".") for heavy in HEAVY)] == []


def test_command_modules_do_not_import_the_main_module() -> None:
    # Each command module stands alone on migrator.cli.common: no cycle through main.
    for module in ("bench", "dashboard", "hosts", "results"):
        loaded = in_a_new_interpreter(
            f"import sys, migrator.cli.{module}\nprint('migrator.cli.main' in sys.modules)")
        assert loaded == ["False"], module


def test_sigterm_cancels_the_run_and_every_finally_runs() -> None:
    torn_down = []

    async def run() -> None:
        try:
            os.kill(os.getpid(), signal.SIGTERM)
            await asyncio.sleep(30)
        finally:
            torn_down.append(True)

    with pytest.raises(asyncio.CancelledError):
        run_until_interrupted(run())
    assert torn_down == [True]


def test_interrupts_exit_as_a_shell_reports_them(tmp_path: Path) -> None:
    from migrator.cli.common import interrupted

    assert interrupted(KeyboardInterrupt(), None).exit_code == 128 + signal.SIGINT
    assert interrupted(asyncio.CancelledError(), tmp_path).exit_code == 128 + signal.SIGTERM
