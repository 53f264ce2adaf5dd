"""Interrupting a run mid-post-copy leaves nothing behind and keeps the raw artifacts."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import zstandard

from migrator.metrics.events import read_jsonl
from migrator.model import Report
from tests.integration.conftest import one_error_line, ram, scenario
from tests.integration.mid_postcopy import strike_mid_postcopy
from tests.integration.qemu_leftovers import POOL, assert_released, qemu_processes_mentioning


def destination_pid(run_dir: Path) -> int:
    for line in (run_dir / "timeline.jsonl").read_text().splitlines():
        record = json.loads(line)
        if record["what"] == "destination-started":
            return int(record["pid"])
    raise AssertionError("no destination-started mark")


def run_and_strike(tmp_path: Path, strike: Callable[[subprocess.Popen[str], Path], None]
                   ) -> tuple[subprocess.Popen[str], str, Path]:
    """A slow local hugetlb-2m post-copy, struck mid-way."""

    def holds(run_dir: Path) -> None:
        time.sleep(0.3)
        # The run really holds what must be released: two QEMUs and a hugetlbfs directory.
        assert len(qemu_processes_mentioning(run_dir.name)) == 2
        assert [m for m in Path("/proc/mounts").read_text().splitlines() if "hugetlbfs" in m]

    # Post-copy throttled to 16 MiB/s so it lasts long enough to be struck in.
    spec = scenario("it-interrupt", vm={"backing": "hugetlb-2m"},
                    migration={"max_postcopy_bandwidth_mib_s": 16})
    return strike_mid_postcopy(tmp_path, spec, strike, holds=holds)


def assert_nothing_left(run_dir: Path, pool_before: str) -> None:
    """:func:`assert_released`, the raw artifacts collected so far are kept, and the
    teardown is on record (timeline and run.json), every step of it successful."""
    assert_released(run_dir, pool_before)
    meta = json.loads((run_dir / "run.json").read_text())
    assert meta["teardown"] == {"clean": True, "problems": []}
    steps = [json.loads(line) for line in (run_dir / "timeline.jsonl").read_text().splitlines()]
    released = {r["step"] for r in steps if r["what"] == "teardown-step" and r["ok"]}
    assert {"src QEMU stopped", "dst QEMU stopped", "hugepages given back on local",
            "hugetlbfs directory removed on local"} <= released, released
    assert [r["what"] for r in steps][-1] == "teardown-done"
    assert "dst trace compressed on local" in released
    # Compressed once QEMU had stopped: the stream is whole (its frame ended).
    trace = zstandard.ZstdDecompressor().decompressobj()
    text = trace.decompress((run_dir / "dst" / "trace.log.zst").read_bytes())
    assert trace.eof
    assert b"postcopy_place_page" in text
    assert not (run_dir / "dst" / "trace.log").exists()
    assert (run_dir / "src" / "events.jsonl").stat().st_size > 0
    assert os.path.getsize(run_dir / "samples.jsonl.zst") > 0
    assert any("reply" in record for record in read_jsonl(run_dir / "samples.jsonl"))


def test_destination_qemu_killed_mid_postcopy(tmp_path: Path) -> None:
    pool_before = POOL.read_text()
    child, stderr, run_dir = run_and_strike(
        tmp_path, lambda _, run: os.kill(destination_pid(run), signal.SIGKILL))
    assert child.returncode == 5, stderr  # failed after switchover
    assert "failed after switchover: dst" in one_error_line(stderr)
    assert_nothing_left(run_dir, pool_before)
    meta = json.loads((run_dir / "run.json").read_text())
    assert meta["outcome"] == "failed-after-switchover"
    # The partial report of what was observed, fetches included: the trace of a QEMU
    # that crashed is readable up to its crash.
    report = Report.model_validate_json((run_dir / "report.json").read_text())
    assert ram(report).faults >= 1
    assert ram(report).resolved >= 1


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_interrupt_mid_postcopy_leaves_nothing(tmp_path: Path, sig: signal.Signals) -> None:
    pool_before = POOL.read_text()
    child, stderr, run_dir = run_and_strike(tmp_path, lambda proc, _: proc.send_signal(sig))
    assert child.returncode == (130 if sig == signal.SIGINT else 143), stderr
    # Said only because run.json's teardown record confirms it.
    assert "interrupted: torn down cleanly" in stderr
    assert "Traceback" not in stderr
    assert_nothing_left(run_dir, pool_before)
    meta = json.loads((run_dir / "run.json").read_text())
    assert meta["outcome"] == "interrupted"
