"""Host CPU time per QEMU thread kind, per side and phase, from ``SIDE/threads.jsonl``.

The samples (:mod:`migrator.qemu.threads`) hold each thread's cumulative user and
system clock ticks.  A thread's CPU time in a window is its ticks at the window's
end less those at its start, each read from the last sample at or before that
moment (a thread born inside the window starts from 0).  Threads are grouped by
what their names say (:func:`~migrator.qemu.threads.thread_kind`).

Windows come from the migrator timeline (controller wall clock, as the samples):
pre-copy from ``migrate`` to ``postcopy-requested`` (or to the end of the
migration), post-copy from ``postcopy-requested`` to ``destination-finished``.
Over time (:func:`thread_load`, the run page's plot), the windows are the
intervals between consecutive samples, and the CPU time in each is given in %
of one core.
"""

from __future__ import annotations

import bisect
from collections import defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt

from migrator.metrics.events import MigrationEvents, read_jsonl
from migrator.model import Metric, ThreadCpu
from migrator.qemu.threads import THREADS_FILE, thread_kind
from migrator.rundir import SIDES, artifact_path

__all__ = ["ThreadSamples", "load_thread_samples", "source_of", "thread_cpu", "thread_load"]

F64 = npt.NDArray[np.float64]

_ORDER = ("migration", "return path", "post-copy fault", "post-copy listen", "multifd",
          "main loop", "other")


class _Series:
    """Cumulative ticks of one thread at each sample time."""

    def __init__(self) -> None:
        self.times: list[int] = []
        self.ticks: list[int] = []

    def at(self, ns: int) -> int:
        """Ticks at the last sample at or before ``ns``; 0 before the thread was seen."""
        index = bisect.bisect_right(self.times, ns) - 1
        return self.ticks[index] if index >= 0 else 0


@dataclass(frozen=True)
class ThreadSamples:
    """One side's ``threads.jsonl``: the host's clock ticks per second, the sample times
    (controller ns) and each thread's cumulative ticks, by (tid, name)."""

    per_second: int
    times: list[int]
    series: dict[tuple[int, str], _Series]

    def by_kind(self) -> dict[str, list[_Series]]:
        """The threads' series grouped by :func:`thread_kind`, in report order."""
        kinds: dict[str, list[_Series]] = defaultdict(list)
        for (_tid, name), one in self.series.items():
            kinds[thread_kind(name)].append(one)
        return {kind: kinds[kind] for kind in sorted(kinds, key=_order)}


def _load(path: Path) -> ThreadSamples:
    """One side's samples file (see :class:`ThreadSamples`)."""
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
        for tid, name, utime, stime, *_ in threads:
            one = series[(int(tid), str(name))]
            one.times.append(host_ns)
            one.ticks.append(int(utime) + int(stime))
    return ThreadSamples(per_second, times, dict(series))


def load_thread_samples(run_path: Path) -> dict[str, ThreadSamples]:
    """Each side's ``SIDE/threads.jsonl`` with at least two samples (the others say
    nothing about a rate), keyed ``src``, ``dst``."""
    out = {}
    for side in SIDES:
        path = run_path / side / THREADS_FILE
        if artifact_path(path) is not None and len((samples := _load(path)).times) >= 2:
            out[side] = samples
    return out


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


def source_of(side: str) -> str:
    """Where one side's thread CPU times come from."""
    return f"/proc/PID/task/*/stat utime+stime on the {side} host, sampled ({side}/{THREADS_FILE})"


def thread_cpu(samples: Mapping[str, ThreadSamples], ev: MigrationEvents) -> list[ThreadCpu]:
    """CPU seconds per thread kind, side and phase (see module docstring)."""
    precopy, postcopy = _windows(ev)
    rows = []
    for side, sampled in samples.items():
        source = (f"{source_of(side)}; windows from the migrator timeline: migrate -> "
                  "postcopy-requested -> destination-finished")

        def metric(value: float | None, source: str = source) -> Metric:
            return Metric(value=value, unit="CPU s", source=source)

        span = (sampled.times[0], sampled.times[-1])
        for kind, group in sampled.by_kind().items():
            rows.append(ThreadCpu(
                side=side, thread=kind,
                precopy=metric(_seconds(group, precopy, span, sampled.per_second)),
                postcopy=metric(_seconds(group, postcopy, span, sampled.per_second)),
                sampled=metric(_seconds(group, span, span, sampled.per_second))))
    return rows


def thread_load(samples: ThreadSamples) -> list[tuple[str, int, F64]]:
    """Per thread kind: how many threads, and their CPU use between each two consecutive
    samples in % of one core (Δ(utime + stime) / clock ticks per second / Δt, summed
    over the kind's threads); every kind on the same intervals, those of ``samples.times``."""
    times = np.array(samples.times, dtype=np.int64)
    dt_s = np.diff(times) / 1e9
    out = []
    for kind, group in samples.by_kind().items():
        ticks = np.array([sum(one.at(int(t)) for one in group) for t in times],
                         dtype=np.float64)
        with np.errstate(divide="ignore", invalid="ignore"):
            percent = np.where(dt_s > 0, np.diff(ticks) / samples.per_second / dt_s * 100, 0.0)
        out.append((kind, len(group), percent))
    return out
