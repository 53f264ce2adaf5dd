"""The run directory and the one atomic writer every file migrator replaces goes through."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from migrator.rundir import RunDir, atomic_write


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.mark.usefixtures("umask_022")
def test_a_written_file_gets_the_umasks_mode_not_0600(tmp_path: Path) -> None:
    target = tmp_path / "report.json"
    atomic_write(target, "{}\n")
    assert target.read_text() == "{}\n"
    assert mode(target) == 0o644


def test_the_mode_follows_any_umask(tmp_path: Path) -> None:
    old = os.umask(0o027)
    try:
        atomic_write(tmp_path / "a", b"x")
    finally:
        os.umask(old)
    assert mode(tmp_path / "a") == 0o640


@pytest.mark.usefixtures("umask_022")
def test_a_replaced_file_is_renamed_over_and_leaves_nothing_behind(tmp_path: Path) -> None:
    target = tmp_path / "suite.json"
    target.write_text("old")
    target.chmod(0o600)  # as the writer of earlier versions left its files
    inode = target.stat().st_ino
    atomic_write(target, "new")
    assert target.read_text() == "new"
    assert target.stat().st_ino != inode  # readers see the old file or the new, never half
    assert mode(target) == 0o644
    assert [p.name for p in tmp_path.iterdir()] == ["suite.json"]


def test_a_failed_write_keeps_the_old_file_and_removes_its_temporary(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    target = tmp_path / "report.json"
    target.write_text("old")

    def no_rename(src: object, dst: object) -> None:
        raise OSError("no space left")

    monkeypatch.setattr(os, "replace", no_rename)
    with pytest.raises(OSError, match="no space left"):
        atomic_write(target, "new")
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["report.json"]


@pytest.mark.usefixtures("umask_022")
def test_the_run_directory_stays_private_and_its_files_follow_the_umask(tmp_path: Path) -> None:
    run = RunDir.create(tmp_path / "runs", "demo")
    # 0700 as README says: it holds the QMP sockets while the run lasts.
    assert mode(run.path) == 0o700
    assert mode(run.write_json("run.json", {"outcome": "completed"})) == 0o644
    assert run.read_json("run.json") == {"outcome": "completed"}
