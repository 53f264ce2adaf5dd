"""Fixtures shared by the unit tests of the migration driver and its recovery."""

from __future__ import annotations

from pathlib import Path

import pytest

from migrator.rundir import JsonlWriter
from tests.unit.scripted_monitor import ScriptedMonitor


@pytest.fixture
def sides(tmp_path: Path) -> tuple[ScriptedMonitor, ScriptedMonitor, JsonlWriter]:
    """Scripted source and destination monitors and a timeline."""
    return (ScriptedMonitor("src", tmp_path), ScriptedMonitor("dst", tmp_path),
            JsonlWriter(tmp_path / "timeline.jsonl"))
