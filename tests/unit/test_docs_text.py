"""The guides' commands, read as text: they exist and name only real subcommands.

Running them is tests/integration/test_docs.py.
"""

from __future__ import annotations

import shlex

import pytest

from migrator.cli.main import COMMAND_ORDER
from tests.guides import documented_commands


def test_guides_have_commands() -> None:
    assert any(guide == "operator.md" for guide, _ in documented_commands())


@pytest.mark.parametrize(("guide", "command"), documented_commands())
def test_guides_only_use_real_subcommands(guide: str, command: str) -> None:
    argv = shlex.split(command)
    assert argv[0].endswith("migrator"), (guide, command)
    assert argv[1] in COMMAND_ORDER, (guide, command)
