"""Many migrations at once: controller CPU per migration, the largest N, and suite time.

Runs ``migrator bench SUITE --parallel N`` (a subprocess, as a user runs it) on a
generated suite: R repetitions of one 256 MiB TCG guest (memfd-4k, post-copy 0.3 s
after the start, query-migrate at 10 Hz), all local.  While it runs, the migrator
process's CPU times are read from /proc every 0.1 s (the last reading before it
exits is kept):

* controller CPU: the migrator process's own user + system time, all its threads
  (``/proc/PID/stat`` utime + stime), and its event-loop (main) thread's alone
  (``/proc/PID/task/PID/stat``); what is not the loop's is the worker threads that
  derive each run's report after it ends.  QEMU and other children are not in it.
* per concurrent migration, all in: controller CPU / the sum of the runs' durations
  (suite.json ``duration_s``), in % of a core: what each running migration costs
  the controller, with its start-up, each run's preflight, QEMU probes and set-up,
  teardown and report.
* per live migration: the event loop's CPU while guests run (from each run's
  ``guest-ready`` to its ``verifying`` mark: the console read, the migration driven
  and sampled at 10 Hz) divided by the live migration-seconds: the loop's CPU is
  read every 0.1 s, and an interval counts for as many runs as were live then.
  Target (issue 13): at most 1 % of a core each at 10 Hz sampling.
* QEMU and helpers: the children's CPU (cutime + cstime: QEMUs, flock, sh), in %
  of the machine's cores over the wall time.
* sampler lag: how late each query-migrate was sent beyond when it was due
  (``samples.jsonl``, plain or zstd: send - max(previous send + 1/hz, previous reply)), p50/p99
  ms: the event loop's delay, not QEMU's (QEMU's reply time is shown apart).
* peak: the most runs whose timelines (first to last mark) overlapped.

Sections: (1) controller CPU per concurrent migration, from the runs of (3); (2) the
largest N: N = 1, 2, 4, ... up to --max-n, one wave of N runs each, until the
controller becomes the limit, which is decided thus: its event loop is a single
thread, so it is the limit once that thread is busy 80 % of a core, or when the
sampler runs a period (100 ms) late at p99 while the loop is busy over 50 % (a loop
that is late but idle is starved by QEMU, not the limit itself); N beyond it is also
extrapolated as 80 % / (loop CPU per migration).  (3) how long an R-run suite takes
at each N of --parallel.

Reading the figures: most of the loop's CPU per live migration is the guest console,
not the sampling: at the default ``workload.heartbeat_ms = 5`` a running guest sends
200 lines a second, each read, stamped, parsed and appended to console.jsonl as it
arrives (on the 2-core test VM about 0.3 ms of loop CPU per line, mostly the wake-up
from idle).  One 256 MiB run measured 9.5 % of a core per live migration with 5 ms
heartbeats, 1.8 % with 50 ms, 1.5 % with 50 ms and ``collect.threads_hz = 1``.

Run it alone on the machine (it keeps both cores busy; nothing else should boot QEMUs
or reserve hugepages meanwhile):

    .venv/bin/python benchmarks/parallel_suite.py [--runs 40] [--parallel 1,2,4] [--max-n 16]

A quick version: ``--runs 8 --parallel 1,2 --max-n 4``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from itertools import pairwise
from pathlib import Path

from migrator.metrics.events import read_jsonl
from migrator.rundir import artifact_path

ROOT = Path(__file__).resolve().parents[1]
HZ = 10.0
SUITE = """
[suite]
name = "parallel-bench"
repetitions = {runs}

[base]
vm = {{ memory_mib = 256, vcpus = 1, backing = "memfd-4k", accel = "auto" }}
workload = {{ working_set_mib = 128, write_pct = 50, warmup_s = 0.5, settle_s = 0.5 }}
collect = {{ query_migrate_hz = {hz:g} }}

[base.migration]
postcopy = true
timeout_s = 600
switchover = {{ policy = "after-seconds", seconds = 0.3 }}
"""
# The controller is the limit once its one event-loop thread is this busy.
LOOP_LIMIT = 0.8
TICKS = os.sysconf("SC_CLK_TCK")
CORES = os.cpu_count() or 1


@dataclass
class Measured:
    """One suite at one N."""

    parallel: int
    runs: int
    wall_s: float
    done: int
    loop_cpu_s: float
    process_cpu_s: float
    children_cpu_s: float
    run_seconds: float
    peak: int
    lag_ms: list[float]
    reply_ms: list[float]
    live_cpu_s: float
    live_seconds: float

    @property
    def per_live_migration(self) -> float:
        """The loop's CPU while guests run, per live migration-second, % of a core."""
        return 100 * self.live_cpu_s / self.live_seconds if self.live_seconds else math.nan

    def per_migration(self, cpu_s: float) -> float:
        """``cpu_s`` per second of a running migration, in % of a core."""
        return 100 * cpu_s / self.run_seconds if self.run_seconds else math.nan

    @property
    def loop_busy(self) -> float:
        """The event-loop thread's CPU over the wall time (1 = a whole core)."""
        return self.loop_cpu_s / self.wall_s

    @property
    def controller_limited(self) -> bool:
        lag99 = percentile(self.lag_ms, 99)
        return self.loop_busy >= LOOP_LIMIT or (lag99 >= 1000 / HZ and self.loop_busy >= 0.5)


def _cpu(stat: Path) -> tuple[float, float]:
    """(own utime + stime, children's cutime + cstime) of a /proc stat file, seconds."""
    fields = stat.read_text().rsplit(")", 1)[1].split()
    # After the command's ")": state is field 3, utime 14, stime 15, cutime 16, cstime 17.
    own = (int(fields[11]) + int(fields[12])) / TICKS
    children = (int(fields[13]) + int(fields[14])) / TICKS
    return own, children


def percentile(values: list[float], q: float) -> float:
    if not values:
        return math.nan
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q / 100 * len(ordered)) - 1))]


def sampler_lag(run_dir: Path) -> tuple[list[float], list[float]]:
    """(how late each query-migrate was sent, QEMU's reply time), ms, both sides."""
    last: dict[str, dict[str, int]] = {}
    lags, replies = [], []
    period_ns = 1e9 / HZ
    for sample in read_jsonl(run_dir / "samples.jsonl"):
        side, sent = sample["side"], sample["host_ns"]
        previous = last.get(side)
        if previous is not None:
            due = max(previous["host_ns"] + period_ns, previous.get("reply_ns", 0))
            lags.append(max(0.0, (sent - due) / 1e6))
        if "reply_ns" in sample:
            replies.append((sample["reply_ns"] - sent) / 1e6)
        last[side] = sample
    return lags, replies


def live_windows(run_dirs: list[Path]) -> list[tuple[int, int]]:
    """Each run's live stretch, ``guest-ready`` to ``verifying``, host ns."""
    windows = []
    for run_dir in run_dirs:
        marks: dict[str, int] = {}
        for line in (run_dir / "timeline.jsonl").read_text().splitlines():
            record = json.loads(line)
            marks.setdefault(record["what"], record["host_ns"])
        if "guest-ready" in marks and "verifying" in marks:
            windows.append((marks["guest-ready"], marks["verifying"]))
    return windows


def live_cpu(series: list[tuple[int, float]], windows: list[tuple[int, int]]
             ) -> tuple[float, float]:
    """(loop CPU s in intervals with a live run, live migration-seconds in them)."""
    cpu = seconds = 0.0
    for (start, before), (end, after) in pairwise(series):
        middle = (start + end) // 2
        live = sum(1 for begin, finish in windows if begin <= middle < finish)
        if live:
            cpu += after - before
            seconds += live * (end - start) / 1e9
    return cpu, seconds


def peak_overlap(run_dirs: list[Path]) -> int:
    """The most runs whose timelines (first to last mark) overlapped at one moment."""
    edges = []
    for run_dir in run_dirs:
        times = [json.loads(line)["host_ns"]
                 for line in (run_dir / "timeline.jsonl").read_text().splitlines()]
        edges += [(min(times), 1), (max(times), -1)]
    peak = current = 0
    for _, step in sorted(edges):
        current += step
        peak = max(peak, current)
    return peak


def run_suite(runs: int, parallel: int, scratch: Path) -> Measured:
    """``migrator bench`` of ``runs`` runs at ``--parallel parallel``, measured."""
    out = scratch / f"n{parallel}-r{runs}"
    suite = scratch / f"suite-{runs}.toml"
    suite.write_text(SUITE.format(runs=runs, hz=HZ))
    per_core = max(1, math.ceil(parallel / CORES))  # 1-vCPU guests: N of them on CORES
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    began = time.monotonic()
    child = subprocess.Popen(
        [sys.executable, "-m", "migrator", "bench", str(suite), "--out", str(out),
         "--parallel", str(parallel), "--vcpus-per-core", str(per_core)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    process = loop = children = 0.0
    series: list[tuple[int, float]] = []  # (host ns, loop CPU s)
    while child.poll() is None:
        try:
            process, children = _cpu(Path(f"/proc/{child.pid}/stat"))
            loop, _ = _cpu(Path(f"/proc/{child.pid}/task/{child.pid}/stat"))
        except (OSError, IndexError):
            pass  # it has just exited: the last reading stands
        else:
            series.append((time.time_ns(), loop))
        time.sleep(0.1)
    wall = time.monotonic() - began
    state = json.loads((out / "suite.json").read_text())
    records = list(state["runs"].values())
    run_dirs = [out / r["run_dir"] for r in records if r["run_dir"]]
    lags: list[float] = []
    replies: list[float] = []
    for run_dir in run_dirs:
        if artifact_path(run_dir / "samples.jsonl") is not None:
            lag, reply = sampler_lag(run_dir)
            lags += lag
            replies += reply
    timed_dirs = [d for d in run_dirs if (d / "timeline.jsonl").exists()]
    live_cpu_s, live_seconds = live_cpu(series, live_windows(timed_dirs))
    return Measured(
        parallel=parallel, runs=runs, wall_s=wall, live_cpu_s=live_cpu_s,
        live_seconds=live_seconds,
        done=sum(r["status"] == "done" for r in records), loop_cpu_s=loop,
        process_cpu_s=process, children_cpu_s=children,
        run_seconds=sum(r["duration_s"] or 0 for r in records),
        peak=peak_overlap(timed_dirs),
        lag_ms=lags, reply_ms=replies)


HEADER = (f"{'N':>3} {'runs':>4} {'done':>4} {'peak':>4} {'wall s':>7} {'runs/h':>7} "
          f"{'loop CPU s':>10} {'all CPU s':>9} {'loop %/mig':>10} {'all %/mig':>9} "
          f"{'live %/mig':>10} {'loop busy':>9} {'QEMU+ % mach':>12} "
          f"{'lag p50/p99 ms':>15} {'reply p99 ms':>12}")


def row(m: Measured) -> str:
    children = 100 * m.children_cpu_s / m.wall_s / CORES
    lag = f"{percentile(m.lag_ms, 50):.1f}/{percentile(m.lag_ms, 99):.1f}"
    return (f"{m.parallel:>3} {m.runs:>4} {m.done:>4} {m.peak:>4} {m.wall_s:7.1f} "
            f"{3600 * m.runs / m.wall_s:7.0f} {m.loop_cpu_s:10.2f} {m.process_cpu_s:9.2f} "
            f"{m.per_migration(m.loop_cpu_s):10.2f} {m.per_migration(m.process_cpu_s):9.2f} "
            f"{m.per_live_migration:10.2f} {100 * m.loop_busy:8.0f}% {children:11.0f}% "
            f"{lag:>15} "
            f"{percentile(m.reply_ms, 99):12.1f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=40, help="runs of the timed suite (3)")
    parser.add_argument("--parallel", default="1,2,4",
                        help="N values of the timed suite, comma-separated")
    parser.add_argument("--max-n", type=int, default=16,
                        help="the largest N the scan (2) tries; 0 skips the scan")
    args = parser.parse_args()
    levels = [int(n) for n in args.parallel.split(",")]
    print(f"{CORES} cores; 256 MiB TCG guests (memfd-4k), query-migrate at {HZ:g} Hz; "
          "CPU per migration in % of a core per second of a running migration", flush=True)
    with tempfile.TemporaryDirectory(prefix="migrator-parallel-") as scratch_dir:
        scratch = Path(scratch_dir)
        timed = []
        print(f"\n(3) a {args.runs}-run suite at N = {args.parallel}")
        print(HEADER, flush=True)
        for parallel in levels:
            timed.append(run_suite(args.runs, parallel, scratch))
            print(row(timed[-1]), flush=True)
        print("\n(1) controller CPU per concurrent migration (target: <= 1 % of a core each "
              f"at {HZ:g} Hz sampling)")
        for m in timed:
            print(f"  N={m.parallel}: {m.per_live_migration:.2f} % of a core per live "
                  f"migration (event loop while guests run); all in: event loop "
                  f"{m.per_migration(m.loop_cpu_s):.2f} %, whole process "
                  f"{m.per_migration(m.process_cpu_s):.2f} % (start-up, set-up, teardown "
                  "and the reports derived after each run)")
        if args.max_n:
            scan(args.max_n, scratch)


def scan(max_n: int, scratch: Path) -> None:
    """(2): one wave of N runs for N = 1, 2, 4, ... until the controller is the limit."""
    print(f"\n(2) the largest N: one wave of N runs, N = 1, 2, 4 ... {max_n}")
    print(HEADER, flush=True)
    held = None
    last = None
    n = 1
    while n <= max_n:
        last = run_suite(n, n, scratch)
        print(row(last) + ("   <- controller-limited" if last.controller_limited else ""),
              flush=True)
        if last.controller_limited:
            break
        held = last
        n *= 2
    if held is None or last is None:
        print("  the controller was the limit from N=1")
        return
    per_migration = last.per_migration(last.loop_cpu_s)
    extrapolated = 100 * LOOP_LIMIT / per_migration if per_migration else math.inf
    print(f"  held without the controller being the limit: N={held.parallel} (QEMU used "
          f"{100 * held.children_cpu_s / held.wall_s / CORES:.0f} % of the machine); the "
          f"event loop at {last.per_migration(last.loop_cpu_s):.2f} % of a core per "
          f"migration would reach {100 * LOOP_LIMIT:.0f} % of a core at N ~ "
          f"{extrapolated:.0f}")


if __name__ == "__main__":
    main()
