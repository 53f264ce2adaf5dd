"""The guides' commands, read as text: they exist, name only real programs and subcommands,
and each is either run by the tests or marked with the reason it is not.

Running them is tests/unit/test_guide_commands.py (on recorded runs) and
tests/integration/test_docs.py (with real VMs).
"""

from __future__ import annotations

import re
import shlex

import pytest

from migrator.cli.main import COMMAND_ORDER
from tests.guides import NOT_RUN_MARKER, ROOT, code_commands, commands_in, documented_commands

DOCS_TESTS = (ROOT / "tests" / "unit" / "test_guide_commands.py",
              ROOT / "tests" / "integration" / "test_docs.py")


def test_guides_have_commands() -> None:
    assert any(guide == "operator.md" for guide, _ in documented_commands())


@pytest.mark.parametrize(("guide", "command"), documented_commands())
def test_guides_only_use_real_subcommands(guide: str, command: str) -> None:
    argv = shlex.split(command)
    if argv[0].endswith("migrator"):
        assert argv[1] in COMMAND_ORDER, (guide, command)
    else:
        # A project script (scripts/...), or python running a file of the repository.
        script = argv[1] if argv[0].endswith(("python", "python3")) else argv[0]
        assert (ROOT / script).is_file(), (guide, command)


def test_every_guide_command_is_run_or_says_why_not() -> None:
    unaccounted = [f"{c.guide}:{c.line}: {c.command}" for c in code_commands()
                   if not c.run and c.not_run_because is None]
    assert not unaccounted, (
        f"write these as '$ COMMAND' and run them in {DOCS_TESTS[1].name}, or put a line "
        f"'{NOT_RUN_MARKER} REASON' above them in their code block: {unaccounted}")


def test_every_guide_with_run_commands_is_run() -> None:
    """Each guide with ``$ `` commands has a test (in one of DOCS_TESTS) that runs them all."""
    with_commands = {guide for guide, _ in documented_commands()}
    run = {guide for test in DOCS_TESTS
           for guide in re.findall(r'guide_commands\("([\w.-]+\.md)"\)', test.read_text())}
    assert with_commands <= run, sorted(with_commands - run)


def test_the_not_run_marker_is_recognised() -> None:
    commands = code_commands()
    assert any(c.not_run_because for c in commands)
    assert all(not (c.run and c.not_run_because) for c in commands), \
        [c for c in commands if c.run and c.not_run_because]


def test_commands_are_found_in_code_blocks_with_their_marker() -> None:
    text = """Prose that names migrator run is not a command.

    $ .venv/bin/migrator config check a.toml

    [vm]
    backing = "hugetlb-2m"

    # not run by the tests: needs two remote hosts
    .venv/bin/migrator run pair.toml
    MIRROR=http://deb.example scripts/make-qemu-root DIR

Prose ends the block, and the marker with it:

```
.venv/bin/python benchmarks/fault_matrix.py --list   # a comment
```
"""
    found = [(c.line, c.command, c.run, c.not_run_because) for c in commands_in("g.md", text)]
    assert found == [
        (3, ".venv/bin/migrator config check a.toml", True, None),
        (9, ".venv/bin/migrator run pair.toml", False, "needs two remote hosts"),
        (10, "MIRROR=http://deb.example scripts/make-qemu-root DIR", False,
         "needs two remote hosts"),
        (15, ".venv/bin/python benchmarks/fault_matrix.py --list   # a comment", False, None),
    ]
