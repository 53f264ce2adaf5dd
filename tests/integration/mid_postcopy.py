"""A ``migrator run`` child struck mid-post-copy: watched until post-copy begins, then struck."""

from __future__ import annotations

import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from migrator.config import Scenario, dump_scenario
from tests.integration.children import migrator_child

__all__ = ["strike_mid_postcopy", "wait_for"]


def wait_for(predicate: object, timeout: float, what: str) -> None:
    """Poll ``predicate`` every 50 ms; fail the test if it is not true within ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():  # type: ignore[operator]
            return
        time.sleep(0.05)
    pytest.fail(f"timed out waiting for {what}")


def dst_in_postcopy(run_dir: Path) -> bool:
    """Whether the destination QEMU of ``run_dir`` has announced post-copy."""
    events = run_dir / "dst" / "events.jsonl"
    return events.exists() and '"postcopy-active"' in events.read_text()


def strike_mid_postcopy(
    tmp_path: Path, spec: Scenario, strike: Callable[[subprocess.Popen[str], Path], None], *,
    holds: Callable[[Path], None], postcopy_timeout: float = 120,
) -> tuple[subprocess.Popen[str], str, Path]:
    """Run ``spec`` in a ``migrator run`` child; mid-post-copy check ``holds``, then strike.

    Returns the finished child, its stderr and the run directory.
    """
    scenario_file = tmp_path / "s.toml"
    scenario_file.write_text(dump_scenario(spec))
    runs = tmp_path / "runs"
    with migrator_child(["run", str(scenario_file), "--runs-dir", str(runs)],
                        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE) as child:
        wait_for(lambda: runs.exists() and any(runs.iterdir()), 60, "the run directory")
        run_dir = next(runs.iterdir())
        wait_for(lambda: dst_in_postcopy(run_dir), postcopy_timeout,
                 "post-copy on the destination")
        holds(run_dir)
        strike(child, run_dir)
        _, stderr = child.communicate(timeout=60)
    return child, stderr, run_dir
