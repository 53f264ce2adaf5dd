"""What the CLI prints is whole, wherever its output goes."""

from __future__ import annotations

import io
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from migrator.cli.common import PIPED_WIDTH, stdout_console

RUNS = Path(__file__).resolve().parents[1] / "data" / "runs"


def test_a_piped_report_is_never_cut(tmp_path: Path) -> None:
    # A real process with stdout piped and no terminal anywhere, as in a CI log.
    run = shutil.copytree(RUNS / "hugetlb-1g", tmp_path / "run")
    env = {key: value for key, value in os.environ.items() if key != "COLUMNS"}
    result = subprocess.run([sys.executable, "-m", "migrator", "report", str(run)],
                            stdin=subprocess.DEVNULL, capture_output=True, text=True, env=env,
                            check=False, timeout=60)
    assert result.returncode == 0, result.stderr
    assert "…" not in result.stdout
    # Cells and headers an 80-column table cuts ("ramb…", "faul…", "plac…").
    header = next(line for line in result.stdout.splitlines() if "RAMBlock ┃" in line)
    assert header.split("┃")[1:3] == ["  page ", " faults "]
    assert header.rstrip().endswith("placed at")
    assert "QEMU 7.2.22  accel tcg  backing hugetlb-1g  1024 MiB  1 vCPU  post-copy True  " \
           "preempt False" in result.stdout


def test_piped_stdout_is_wide_unless_columns_says_otherwise(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sys, "stdout", io.StringIO())
    monkeypatch.delenv("COLUMNS", raising=False)
    # FORCE_COLOR makes rich call any stream a terminal; a pipe is still a pipe.
    monkeypatch.setenv("FORCE_COLOR", "1")
    assert stdout_console().width == PIPED_WIDTH
    monkeypatch.setenv("COLUMNS", "132")
    assert stdout_console().width == 132
