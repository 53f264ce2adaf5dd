"""The integration tests' one retry after a guest kernel crash under TCG, and nothing else."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from tests.integration.conftest import (
    TcgGuestCrash,
    bench_once_more_if_tcg_crashed,
    once_more_if_tcg_crashed,
    tcg_guest_crash,
)

RECORDED = Path(__file__).parents[1] / "data" / "recovery" / "link-down-twice"
CRASH = {"side": "dst", "line": "kernel BUG at lib/list_debug.c:59!"}


def run_dir(tmp_path: Path, name: str, accel: str, crash: dict[str, str] | None) -> Path:
    """A real run's run.json, with its accelerator and guest crash (as the runner records it)."""
    path = tmp_path / name
    path.mkdir(parents=True)
    meta = json.loads((RECORDED / "run.json").read_text())
    meta["accel"]["accel"] = accel
    if crash:
        meta["guest_crash"] = crash
    (path / "run.json").write_text(json.dumps(meta))
    return path


def test_a_tcg_crash_is_named_with_its_side(tmp_path: Path) -> None:
    crashed = run_dir(tmp_path, "a", "tcg", CRASH)
    assert tcg_guest_crash(crashed) == "dst: kernel BUG at lib/list_debug.c:59!"


@pytest.mark.parametrize(("accel", "crash"), [("kvm", CRASH), ("tcg", None)])
def test_no_retry_on_kvm_or_without_a_crash(tmp_path: Path, accel: str,
                                            crash: dict[str, str] | None) -> None:
    first = run_dir(tmp_path, "first", accel, crash)
    attempts: list[int] = []

    def attempt(number: int) -> Path:
        attempts.append(number)
        return first

    assert once_more_if_tcg_crashed(attempt, lambda path: path) == first
    assert attempts == [0]


def test_one_retry_after_a_tcg_crash_with_a_warning(tmp_path: Path) -> None:
    runs = [run_dir(tmp_path, "first", "tcg", CRASH), run_dir(tmp_path, "second", "tcg", CRASH)]
    with pytest.warns(TcgGuestCrash, match="first: the guest kernel crashed under TCG"):
        result = once_more_if_tcg_crashed(lambda number: runs[number], lambda path: path)
    # The second run is returned as it is: crashing again fails the test that reads it.
    assert result == runs[1]


def test_a_bench_is_resumed_once_after_a_tcg_crash(tmp_path: Path) -> None:
    out = tmp_path / "out"
    crashed = run_dir(out / "runs", "crashed", "tcg", CRASH)
    state = {"runs": {"a": {"status": "done", "run_dir": "runs/fine"},
                      "b": {"status": "failed", "run_dir": str(crashed.relative_to(out))}}}
    (out / "suite.json").write_text(json.dumps(state))
    calls: list[list[str]] = []

    def bench(extra: list[str]) -> subprocess.CompletedProcess[str]:
        calls.append(extra)
        return subprocess.CompletedProcess([], 1 if len(calls) == 1 else 0, "", "")

    with pytest.warns(TcgGuestCrash, match="crashed: the guest kernel crashed"):
        done = bench_once_more_if_tcg_crashed(bench, out)
    assert calls == [[], ["--resume"]]
    assert done.returncode == 0
