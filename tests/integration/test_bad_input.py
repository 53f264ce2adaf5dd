"""The bad-input corpus (``tests/data/bad/``, format in its README): every case refused cleanly.

For every case and command: the expected exit code; exactly one ``error:`` line (or, for
a command-line usage mistake, typer's usage-error box) containing each expected text;
no traceback; nothing on stdout; and nothing started: no QEMU process mentioning the
case's directory, no ``argv.json`` (written just before a QEMU is launched) under it.

Each command runs in a child process forked from a forkserver that has already imported
migrator's CLI: the same code as ``python -m migrator`` (typer's app, then the
interpreter's excepthook for an uncaught exception, output on file descriptors 1 and 2)
without paying the 0.45 s import for each of the ~250 commands.
"""

from __future__ import annotations

import functools
import multiprocessing
import os
import re
import shutil
import sys
import time
from dataclasses import dataclass
from multiprocessing.context import ForkServerContext
from pathlib import Path

import pytest

from migrator.cli.main import app
from tests.integration.qemu_leftovers import qemu_processes_mentioning

BAD = Path(__file__).resolve().parents[1] / "data" / "bad"
# How each command runs a scenario case's input ({INPUT}).
COMMANDS = {
    "run": ("run", "{INPUT}", "--runs-dir", "{TMP}/runs"),
    "config-check": ("config", "check", "{INPUT}"),
    "hosts-check": ("hosts", "check", "{INPUT}"),
}
DEFAULT_COMMANDS = ("run", "config-check", "hosts-check")
# Generous: a QEMU probe or a hugepage reservation takes a second or two.
TIMEOUT_S = 120.0
ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")
# Modules the commands import when they run (SQLAlchemy, alembic, scipy: up to a second).
LAZY_IMPORTS = ("migrator.cli.progress", "migrator.dashboard", "migrator.metrics.summary",
                "migrator.report.terminal", "migrator.results.compare",
                "migrator.results.store", "migrator.runner")


@dataclass(frozen=True)
class Expect:
    """A case's ``.expect`` file."""

    exit: int
    says: tuple[str, ...]
    hides: tuple[str, ...] = ()
    commands: tuple[str, ...] = DEFAULT_COMMANDS


def parse_expect(path: Path) -> Expect:
    """Read ``path`` (``key: value`` lines, ``#`` comments); :class:`ValueError` if malformed."""
    values: dict[str, list[str]] = {}
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip() or line.startswith("#"):
            continue
        key, sep, value = line.partition(":")
        if not sep or key not in ("exit", "says", "hides", "commands"):
            raise ValueError(f"{path}:{number}: expected exit|says|hides|commands: VALUE")
        values.setdefault(key, []).append(value.strip())
    if len(values.get("exit", [])) != 1 or not values.get("says"):
        raise ValueError(f"{path}: needs one 'exit:' line and at least one 'says:' line")
    commands = tuple(values["commands"][-1].split()) if "commands" in values else DEFAULT_COMMANDS
    unknown = set(commands) - set(COMMANDS)
    if unknown:
        raise ValueError(f"{path}: unknown commands {sorted(unknown)}; known: {list(COMMANDS)}")
    return Expect(exit=int(values["exit"][0]), says=tuple(values["says"]),
                  hides=tuple(values.get("hides", [])), commands=commands)


def corpus() -> list[object]:
    """One pytest param per (case, command); a file without its pair is a collection error."""
    params: list[object] = []
    expects = {path.stem: path for path in BAD.glob("*.expect")}
    inputs = {path.stem: path for path in BAD.iterdir()
              if path.suffix != ".expect" and path.name not in ("README.md", "files")}
    if expects.keys() != inputs.keys():
        raise ValueError(f"{BAD}: inputs and .expect files do not pair up: "
                         f"{sorted(expects.keys() ^ inputs.keys())}")
    for stem in sorted(expects):
        expect = parse_expect(expects[stem])
        source = inputs[stem]
        runs: list[tuple[str, tuple[str, ...]]]
        if source.suffix == ".args":
            text = source.read_text(encoding="utf-8")
            if not text.endswith("\n"):
                raise ValueError(f"{source}: one argument per line, each ending in a newline")
            runs = [("*", tuple(text[:-1].split("\n")))]
        else:
            runs = [(command, tuple(arg.replace("{INPUT}", f"{{DATA}}/{source.name}")
                                    for arg in COMMANDS[command]))
                    for command in expect.commands]
        for command, argv in runs:
            case_id = stem if command == "*" else f"{stem}:{command}"
            params.append(pytest.param(argv, expect, id=case_id))
    return params


@dataclass(frozen=True)
class Outcome:
    """What one command did."""

    code: int
    stdout: str
    stderr: str
    seconds: float


def _cli_child(argv: list[str], cwd: str, stdout: str, stderr: str) -> None:
    """Run the CLI as ``python -m migrator ARGV`` would, in a forked child; exits."""
    os.chdir(cwd)
    for fd, name in ((1, stdout), (2, stderr)):
        target = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        os.dup2(target, fd)
        os.close(target)
    sys.stdout = open(1, "w", encoding="utf-8", closefd=False)  # noqa: SIM115
    sys.stderr = open(2, "w", encoding="utf-8", errors="backslashreplace",  # noqa: SIM115
                      closefd=False)
    code = 1
    try:
        app(args=argv, prog_name="migrator")
        code = 0
    except SystemExit as stop:
        if stop.code is None or isinstance(stop.code, int):
            code = stop.code or 0
        else:
            print(stop.code, file=sys.stderr)
    except BaseException as error:
        # What the interpreter does with an uncaught exception (typer installs its hook).
        sys.excepthook(type(error), error, error.__traceback__)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


@functools.cache
def _forkserver() -> ForkServerContext:
    context = multiprocessing.get_context("forkserver")
    # The server imports this module (so migrator's CLI) and what commands import lazily
    # once; every child starts warm.
    context.set_forkserver_preload([__name__, *LAZY_IMPORTS])
    return context


def migrator(argv: list[str], cwd: Path) -> Outcome:
    """Run ``migrator ARGV`` in ``cwd``."""
    out, err = cwd / ".stdout", cwd / ".stderr"
    child = _forkserver().Process(target=_cli_child, args=(argv, str(cwd), str(out), str(err)))
    started = time.monotonic()
    child.start()
    child.join(TIMEOUT_S)
    if child.exitcode is None:
        child.kill()
        child.join()
        pytest.fail(f"migrator {' '.join(argv)} still running after {TIMEOUT_S:g} s")
    seconds = time.monotonic() - started
    # A child that died before redirecting its output left no files.
    stdout, stderr = (ANSI.sub("", path.read_text(errors="replace")) if path.exists()
                      else f"(no {path.name}: the child died first)\n" for path in (out, err))
    return Outcome(child.exitcode, stdout, stderr, seconds)


def usage_error(stderr: str) -> str | None:
    """The message of typer's usage-error box (rich) or ``Error:`` line, on one line."""
    lines = stderr.splitlines()
    for index, line in enumerate(lines):
        if line.startswith("╭─ Error"):
            body = []
            for inner in lines[index + 1:]:
                if inner.startswith("╰"):
                    break
                body.append(inner.strip().strip("│"))
            return " ".join(" ".join(body).split())
        if line.startswith("Error: "):
            return line
    return None


@pytest.mark.parametrize(("argv", "expect"), corpus())
def test_bad_input(argv: tuple[str, ...], expect: Expect, tmp_path: Path) -> None:
    data = tmp_path / "data"
    # A private copy: a command that wrongly wrote into its input leaves the repository alone.
    shutil.copytree(BAD, data, symlinks=True)
    args = [arg.replace("{DATA}", str(data)).replace("{TMP}", str(tmp_path)) for arg in argv]
    outcome = migrator(args, tmp_path)
    shown = (f"migrator {' '.join(args)}\nexit {outcome.code}\n"
             f"--- stdout\n{outcome.stdout}--- stderr\n{outcome.stderr}")

    assert "Traceback" not in outcome.stdout + outcome.stderr, shown
    assert outcome.code == expect.exit, shown
    errors = [line for line in outcome.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) <= 1, shown
    message = errors[0] if errors else usage_error(outcome.stderr)
    assert message is not None, f"no 'error:' line and no usage error\n{shown}"
    if not errors:
        assert expect.exit == 2, f"a usage error exits 2\n{shown}"
    for text in expect.says:
        assert text in message, f"{text!r} not in the error\n{shown}"
    for text in expect.hides:
        assert text not in outcome.stdout + outcome.stderr, f"{text!r} shown\n{shown}"
    assert outcome.stdout == "", shown

    assert qemu_processes_mentioning(str(tmp_path)) == [], shown
    assert sorted(tmp_path.rglob("argv.json")) == [], shown
