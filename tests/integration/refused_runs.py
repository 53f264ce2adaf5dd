"""A ``migrator run`` that must be refused: its exit code and one error line, nothing started."""

from __future__ import annotations

import json
from pathlib import Path

from tests.integration.children import migrator
from tests.integration.conftest import one_error_line
from tests.integration.qemu_leftovers import qemu_processes_mentioning

__all__ = ["assert_nothing_started", "run_expecting_failure"]


def run_expecting_failure(tmp_path: Path, spec_file: Path) -> tuple[str, Path | None]:
    """``migrator run spec_file`` that fails: ``"<exit> <error line>"`` and its run directory."""
    runs = tmp_path / "runs"
    done = migrator("run", str(spec_file), "--runs-dir", str(runs))
    assert done.returncode != 0
    error = one_error_line(done.stderr)
    run_dirs = list(runs.iterdir()) if runs.exists() else []
    return f"{done.returncode} {error}", (run_dirs[0] if run_dirs else None)


def assert_nothing_started(run_dir: Path | None) -> None:
    """The run has a directory, no QEMU was launched for it, and it says ``not-started``."""
    assert run_dir is not None
    assert qemu_processes_mentioning(run_dir.name) == []
    assert not (run_dir / "src" / "argv.json").exists()
    meta = json.loads((run_dir / "run.json").read_text())
    assert meta["outcome"] == "not-started"
