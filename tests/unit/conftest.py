"""Fixtures shared by the unit tests: the migration driver and its recovery, file modes."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from migrator.hosts import hugepages
from migrator.rundir import JsonlWriter
from tests.unit.scripted_monitor import ScriptedMonitor


@pytest.fixture
def sides(tmp_path: Path) -> tuple[ScriptedMonitor, ScriptedMonitor, JsonlWriter]:
    """Scripted source and destination monitors and a timeline."""
    return (ScriptedMonitor("src", tmp_path), ScriptedMonitor("dst", tmp_path),
            JsonlWriter(tmp_path / "timeline.jsonl"))


@pytest.fixture
def umask_022() -> Iterator[None]:
    """The usual umask (022) for the test, whatever the one pytest runs under."""
    old = os.umask(0o022)
    try:
        yield
    finally:
        os.umask(old)


@pytest.fixture(autouse=True)
def _no_hugepage_retry_waits(monkeypatch: pytest.MonkeyPatch) -> None:
    # A pool that grows short is asked again after real waits (seconds, hosts/hugepages.py);
    # against fake kernels they only slow the tests down.
    monkeypatch.setattr(hugepages, "GROW_RETRY_DELAYS_S",
                        (0.0,) * len(hugepages.GROW_RETRY_DELAYS_S))
