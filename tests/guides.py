"""The guides (docs/*.md) and the commands they show, for unit and integration tests.

A guide shows a command in one of two ways:

- ``$ COMMAND``: tests/integration/test_docs.py runs it as written;
- in a code block, after a line ``# not run by the tests: REASON``: the tests cannot run
  it (it needs hosts they cannot make, or takes too long), and the guide says why. The
  marker covers every command after it in the same code block.

A command is a line of a code block (fenced, or indented by 4 spaces after a blank line)
that starts one of the project's programs: ``migrator`` (any path to it), ``python``
running a file of the repository, or a script under ``scripts/``. Every such line must be
shown one of the two ways (tests/unit/test_docs_text.py checks that).
"""

from __future__ import annotations

import glob
import re
import shlex
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

__all__ = ["GUIDES", "NOT_RUN_MARKER", "ROOT", "GuideCommand", "code_commands", "commands_in",
           "documented_commands", "guide_commands"]

ROOT = Path(__file__).resolve().parents[1]
GUIDES = sorted((ROOT / "docs").glob("*.md"))
PROMPT = "$ "
NOT_RUN_MARKER = "# not run by the tests:"
_ASSIGNMENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*=")
_PROGRAM = re.compile(r"^(\S*/)?(migrator|python3?)$|^(\./)?scripts/\S+$")


@dataclass(frozen=True)
class GuideCommand:
    """One command line of a code block in a guide."""

    guide: str
    line: int
    command: str
    """The line as written, without the ``$ `` prompt."""
    run: bool
    """Written ``$ COMMAND``: the tests run it."""
    not_run_because: str | None
    """The reason of the ``# not run by the tests:`` marker above it in its block."""


def documented_commands() -> list[tuple[str, str]]:
    """(guide, command) for every ``$ `` line in the guides: the commands the tests run."""
    found = []
    for guide in GUIDES:
        for line in guide.read_text().splitlines():
            if line.strip().startswith(PROMPT):
                found.append((guide.name, line.strip()[len(PROMPT):]))
    return found


def guide_commands(guide: str) -> list[str]:
    """The ``$ `` commands of one guide (e.g. ``"operator.md"``), in order."""
    return [command for name, command in documented_commands() if name == guide]


def code_commands() -> list[GuideCommand]:
    """Every command line in the guides' code blocks, run by the tests or not."""
    return [command for guide in GUIDES
            for command in commands_in(guide.name, guide.read_text())]


def commands_in(guide: str, text: str) -> list[GuideCommand]:
    """Every command line in the code blocks of one guide's ``text``."""
    found = []
    for number, line, reason in _code_lines(text.splitlines()):
        run = line.startswith(PROMPT)
        command = line[len(PROMPT):] if run else line
        if _starts_a_program(command):
            found.append(GuideCommand(guide, number, command, run, reason))
    return found


def _code_lines(lines: list[str]) -> list[tuple[int, str, str | None]]:
    """(line number, stripped text, marker reason in force) for each line of a code block."""
    found: list[tuple[int, str, str | None]] = []
    fenced = indented = False
    reason: str | None = None
    previous_blank = True
    for number, line in enumerate(lines, 1):
        stripped = line.strip()
        if stripped.startswith("```"):
            fenced, indented, reason = not fenced, False, None
        elif fenced or (line.startswith("    ") and (indented or previous_blank)):
            indented = not fenced
            if stripped.startswith(NOT_RUN_MARKER):
                reason = stripped[len(NOT_RUN_MARKER):].strip() or None
            elif stripped:
                found.append((number, stripped, reason))
        elif stripped:
            indented, reason = False, None
        previous_blank = not stripped
    return found


def _starts_a_program(command: str) -> bool:
    try:
        words = shlex.split(command, comments=True)
    except ValueError:
        return False
    while words and _ASSIGNMENT.match(words[0]):
        words = words[1:]
    return bool(words) and _PROGRAM.match(words[0]) is not None


def run_on_recorded_runs(commands: list[str], where: Path) -> list[str]:
    """Run ``commands`` in ``where``, whose runs/ holds the recorded run directories
    (tests/data/runs), as the nightly job runs them; their outputs."""
    runs = where / "runs"
    for run in sorted((ROOT / "tests" / "data" / "runs").iterdir()):
        if run.is_dir():
            shutil.copytree(run, runs / run.name)
    outputs = []
    for command in commands:
        argv = shlex.split(command)
        argv[0] = str(ROOT / argv[0])
        # What the shell does with runs/* (subprocess runs no shell).
        argv = [arg for word in argv
                for arg in (sorted(glob.glob(word, root_dir=where)) if "*" in word else [word])]
        done = subprocess.run(argv, cwd=where, capture_output=True, text=True, timeout=300,
                              check=False)
        assert done.returncode == 0, f"{command}: {done.stdout[-2000:]} {done.stderr[-2000:]}"
        outputs.append(done.stdout)
    return outputs
