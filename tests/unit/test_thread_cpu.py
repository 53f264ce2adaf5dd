"""Host CPU per QEMU thread: the stat-line parser, the thread kinds, the windows, the sampler."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
from pathlib import Path

from migrator.hosts.local import LocalHost
from migrator.metrics.events import MigrationEvents
from migrator.metrics.threads import load_thread_samples, thread_cpu, thread_load
from migrator.qemu.threads import THREADS_FILE, parse_stat_line, sample_threads, thread_kind
from migrator.rundir import JsonlWriter

S = 1_000_000_000


def test_a_stat_line_with_spaces_and_parens_in_the_name() -> None:
    line = ("4242 (CPU 0/KVM) S 1 2 3 0 -1 4194624 100 0 0 0 1234 56 0 0 20 0 5 0 99 "
            "1000 10 18446744073709551615")
    assert parse_stat_line(line) == (4242, "CPU 0/KVM", 1234, 56, None)
    assert parse_stat_line("4243 (odd) name)) R 1 2 3 0 -1 0 0 0 0 0 7 8 0 0") == (
        4243, "odd) name)", 7, 8, None)
    # A whole line (Linux 6.x, 52 fields): utime 14, stime 15, the last CPU 39.
    fields = ["0"] * 53
    fields[3], fields[14], fields[15], fields[38], fields[39] = "R", "300", "20", "17", "1"
    whole = "77 (mig/src/main) " + " ".join(fields[3:])
    assert parse_stat_line(whole) == (77, "mig/src/main", 300, 20, 1)
    assert parse_stat_line("garbage") is None
    assert parse_stat_line("12 (short) S 1 2") is None


def test_thread_kinds_across_qemu_generations() -> None:
    kinds = {name: thread_kind(name) for name in (
        "CPU 0/TCG", "CPU 12/KVM", "live_migration", "mig/src/main", "mig/src/return",
        "postcopy/fault", "mig/dst/fault", "mig/dst/listen", "multifdsend_0",
        "qemu-system-x86", "IO mon_iothread")}
    assert kinds == {
        "CPU 0/TCG": "vCPU 0", "CPU 12/KVM": "vCPU 12", "live_migration": "migration",
        "mig/src/main": "migration", "mig/src/return": "return path",
        "postcopy/fault": "post-copy fault", "mig/dst/fault": "post-copy fault",
        "mig/dst/listen": "post-copy listen", "multifdsend_0": "multifd",
        "qemu-system-x86": "main loop", "IO mon_iothread": "other"}


def write_samples(run: Path, side: str, samples: list[tuple[float, list[list[object]]]]) -> None:
    (run / side).mkdir(parents=True, exist_ok=True)
    lines = [{"host_ns": 0, "clock_ticks_per_s": 100}] + [
        {"host_ns": int(t * S), "threads": threads} for t, threads in samples]
    (run / side / THREADS_FILE).write_text("".join(json.dumps(r) + "\n" for r in lines))


def test_cpu_seconds_per_phase_from_cumulative_ticks(tmp_path: Path) -> None:
    # vCPU ticks: 500 at t=1 (before migrate: boot), +100 by t=3 (pre-copy), +50 by t=5.
    write_samples(tmp_path, "dst", [
        (1.0, [[7, "CPU 0/KVM", 400, 100]]),
        (3.0, [[7, "CPU 0/KVM", 480, 120], [9, "mig/dst/fault", 0, 0]]),
        (5.0, [[7, "CPU 0/KVM", 520, 130], [9, "mig/dst/fault", 20, 10]]),
    ])
    events = MigrationEvents(events=[], marks={
        "migrate": int(1.0 * S), "postcopy-requested": int(3.0 * S),
        "destination-finished": int(5.0 * S)})
    rows = {(row.side, row.thread): row
            for row in thread_cpu(load_thread_samples(tmp_path), events)}
    vcpu, fault = rows[("dst", "vCPU 0")], rows[("dst", "post-copy fault")]
    assert (vcpu.precopy.value, vcpu.postcopy.value, vcpu.sampled.value) == (1.0, 0.5, 1.5)
    # Born inside the sampled span: counted from 0.
    assert (fault.precopy.value, fault.postcopy.value) == (0.0, 0.3)
    assert vcpu.precopy.unit == "CPU s"
    assert "dst/threads.jsonl" in vcpu.precopy.source


def test_a_window_starting_before_the_first_sample_is_clipped(tmp_path: Path) -> None:
    write_samples(tmp_path, "src", [(2.0, [[7, "CPU 0/TCG", 1000, 0]]),
                                    (4.0, [[7, "CPU 0/TCG", 1100, 0]])])
    events = MigrationEvents(events=[], marks={"migrate": int(1.0 * S),
                                               "source-finished": int(4.0 * S)})
    [row] = thread_cpu(load_thread_samples(tmp_path), events)
    # Not the 10 s of ticks the thread had before sampling began.
    assert row.precopy.value == 1.0
    assert row.postcopy.value is None


def test_cpu_load_over_time_per_kind(tmp_path: Path) -> None:
    # 100 ticks/s: 10 ticks in 0.1 s is one core, fully busy.
    write_samples(tmp_path, "src", [
        (1.0, [[7, "CPU 0/TCG", 100, 0], [8, "CPU 1/TCG", 50, 0]]),
        (1.1, [[7, "CPU 0/TCG", 105, 5], [8, "CPU 1/TCG", 52, 0], [9, "mig/src/main", 1, 1]]),
        (1.3, [[7, "CPU 0/TCG", 105, 5], [9, "mig/src/main", 6, 2]]),
    ])
    load = {kind: (threads, [round(p, 6) for p in percent])
            for kind, threads, percent in thread_load(load_thread_samples(tmp_path)["src"])}
    assert load == {
        "vCPU 0": (1, [100.0, 0.0]),
        # Gone by the last sample: its ticks stay, it used nothing more.
        "vCPU 1": (1, [20.0, 0.0]),
        # Born after the first sample: counted from 0, as in the per-phase table.
        "migration": (1, [20.0, 30.0]),
    }
    assert list(load) == ["vCPU 0", "vCPU 1", "migration"]


def test_a_side_with_one_sample_has_no_load(tmp_path: Path) -> None:
    write_samples(tmp_path, "dst", [(1.0, [[7, "CPU 0/KVM", 1, 0]])])
    assert load_thread_samples(tmp_path) == {}


async def test_the_sampler_reads_a_live_process_threads(tmp_path: Path) -> None:
    out = JsonlWriter(tmp_path / THREADS_FILE)
    task = asyncio.create_task(sample_threads(LocalHost(), os.getpid(), out, hz=50))
    await asyncio.sleep(0.3)
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
    out.close()
    records = [json.loads(line) for line in (tmp_path / THREADS_FILE).read_text().splitlines()]
    assert records[0]["clock_ticks_per_s"] > 0
    samples = records[1:]
    assert len(samples) >= 3
    assert any(thread[0] == os.getpid() for thread in samples[0]["threads"])
