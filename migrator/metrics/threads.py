"""Host CPU time per QEMU thread kind, per side and phase, from ``SIDE/threads.jsonl``.

The samples (:mod:`migrator.qemu.threads`) hold each thread's cumulative user and
system clock ticks.  A thread's CPU time in a window is its ticks at the window's
end less those at its start, each read from the last sample at or before that
moment (a thread born inside the window starts from 0).  Threads are grouped by
what their names say: QEMU names vCPU threads ``CPU N/KVM`` or ``CPU N/TCG``, the
source's migration thread ``live_migration`` (``mig/src/main`` from 9.1), the
destination's post-copy fault thread ``postcopy/fault`` (``mig/dst/fault``), which
requests pages, and its listen thread (``mig/dst/listen``), which loads the stream
and places the pages; the source's return path (``mig/src/return``) takes the
destination's page requests.

Windows come from the migrator timeline (controller wall clock, as the samples):
pre-copy from ``migrate`` to ``postcopy-requested`` (or to the end of the
migration), post-copy from ``postcopy-requested`` to ``destination-finished``.
"""

from __future__ import annotations

import bisect
import re
from collections import defaultdict
from collections.abc import Iterable
from pathlib import Path

from migrator.metrics.events import MigrationEvents, read_jsonl
from migrator.model import Metric, ThreadCpu
from migrator.qemu.threads import THREADS_FILE
from migrator.rundir import artifact_path

__all__ = ["thread_cpu", "thread_kind"]

_VCPU = re.compile(r"^CPU (\d+)/")
_ORDER = ("migration", "return path", "post-copy fault", "post-copy listen", "multifd",
          "main loop", "other")


def thread_kind(name: str) -> str:
    """What a QEMU thread does, from its name (see module docstring)."""
    if match := _VCPU.match(name):
        return f"vCPU {match.group(1)}"
    if name in ("live_migration", "mig/src/main"):
        return "migration"
    if name in ("return path", "mig/src/return", "mig/src/rp-thr"):
        return "return path"
    if "fault" in name:
        return "post-copy fault"
    if "listen" in name:
        return "post-copy listen"
    if name.startswith(("multifd", "mig/src/send", "mig/dst/recv")):
        return "multifd"
    if name.startswith("qemu-system"):
        return "main loop"
    return "other"


class _Series:
    """Cumulative ticks of one thread at each sample time."""

    def __init__(self) -> None:
        self.times: list[int] = []
        self.ticks: list[int] = []

    def at(self, ns: int) -> int:
        """Ticks at the last sample at or before ``ns``; 0 before the thread was seen."""
        index = bisect.bisect_right(self.times, ns) - 1
        return self.ticks[index] if index >= 0 else 0


def _load(path: Path) -> tuple[int, list[int], dict[tuple[int, str], _Series]]:
    """(ticks per second, sample times, series per (tid, name)) of one side's file."""
    per_second = 100
    times: list[int] = []
    series: dict[tuple[int, str], _Series] = defaultdict(_Series)
    for record in read_jsonl(path):
        if isinstance(record.get("clock_ticks_per_s"), int):
            per_second = record["clock_ticks_per_s"]
            continue
        host_ns, threads = record.get("host_ns"), record.get("threads")
        if not isinstance(host_ns, int) or not isinstance(threads, list):
            continue
        times.append(host_ns)
        for tid, name, utime, stime in threads:
            one = series[(int(tid), str(name))]
            one.times.append(host_ns)
            one.ticks.append(int(utime) + int(stime))
    return per_second, times, series


def _windows(ev: MigrationEvents) -> tuple[tuple[int, int] | None, tuple[int, int] | None]:
    """The pre-copy and post-copy windows (controller ns), None where they did not happen."""
    marks = ev.marks
    start = marks.get("migrate")
    end = marks.get("destination-finished") or marks.get("source-finished")
    switch = marks.get("postcopy-requested")
    if start is None or end is None:
        return None, None
    precopy = (start, switch if switch is not None else end)
    return precopy, ((switch, end) if switch is not None else None)


def _seconds(series: Iterable[_Series], window: tuple[int, int] | None,
             sampled: tuple[int, int], per_second: int) -> float | None:
    """CPU seconds of ``series`` in ``window``, clipped to the ``sampled`` span (before
    the first sample a thread's ticks are not known, only that it had some)."""
    if window is None:
        return None
    start, end = max(window[0], sampled[0]), min(window[1], sampled[1])
    if end <= start:
        return 0.0
    return round(sum(one.at(end) - one.at(start) for one in series) / per_second, 3)


def _order(kind: str) -> tuple[int, int, str]:
    if kind.startswith("vCPU "):
        return 0, int(kind.split()[1]), kind
    return 1, _ORDER.index(kind) if kind in _ORDER else len(_ORDER), kind


def thread_cpu(run_path: Path, ev: MigrationEvents) -> list[ThreadCpu]:
    """CPU seconds per thread kind, side and phase (see module docstring)."""
    precopy, postcopy = _windows(ev)
    rows = []
    for side in ("src", "dst"):
        path = run_path / side / THREADS_FILE
        if artifact_path(path) is None:
            continue
        per_second, times, series = _load(path)
        if len(times) < 2:
            continue
        by_kind: dict[str, list[_Series]] = defaultdict(list)
        for (_tid, name), one in series.items():
            by_kind[thread_kind(name)].append(one)
        source = (f"/proc/PID/task/*/stat utime+stime on the {side} host, sampled "
                  f"({side}/{THREADS_FILE}); windows from the migrator timeline: migrate -> "
                  "postcopy-requested -> destination-finished")

        def metric(value: float | None, source: str = source) -> Metric:
            return Metric(value=value, unit="CPU s", source=source)

        for kind in sorted(by_kind, key=_order):
            group = by_kind[kind]
            span = (times[0], times[-1])
            rows.append(ThreadCpu(
                side=side, thread=kind,
                precopy=metric(_seconds(group, precopy, span, per_second)),
                postcopy=metric(_seconds(group, postcopy, span, per_second)),
                sampled=metric(_seconds(group, span, span, per_second))))
    return rows
