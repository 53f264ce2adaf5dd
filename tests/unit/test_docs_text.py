"""The guides' commands, read as text: they exist and name only real subcommands.

Running them is tests/integration/test_docs.py.
"""

from __future__ import annotations

import shlex
from pathlib import Path

import pytest

from tests.guides import GUIDES, documented_commands


def test_guides_have_commands() -> None:
    assert any(guide == "operator.md" for guide, _ in documented_commands())


@pytest.mark.parametrize("guide", GUIDES, ids=lambda p: p.name)
def test_guides_only_use_real_subcommands(guide: Path) -> None:
    known = {"run", "report", "config", "hosts", "bench", "results", "compare", "dashboard"}
    for line in guide.read_text().splitlines():
        if line.strip().startswith("$ "):
            argv = shlex.split(line.strip()[2:])
            assert argv[0].endswith("migrator"), line
            assert argv[1] in known, line
